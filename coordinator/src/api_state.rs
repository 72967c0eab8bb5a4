//! What the coordinator's HTTP handlers share (the OpenAI API and the
//! dashboard).

use std::collections::HashMap;
use std::sync::Mutex;

pub struct ApiState {
    /// gRPC addresses of the workers requests may go to.
    pub workers: crate::workers::WorkerSet,
    /// Admission, load spread and failover over the drivers.
    pub drivers: crate::drivers::Drivers,
    /// When this coordinator first saw each model served (Unix seconds):
    /// the `created` of `/v1/models`.
    pub first_seen: Mutex<HashMap<String, u64>>,
}

impl ApiState {
    pub fn new(workers: crate::workers::WorkerSet, drivers: crate::drivers::Drivers) -> ApiState {
        ApiState {
            workers,
            drivers,
            first_seen: Mutex::default(),
        }
    }
}
