//! What the coordinator's HTTP handlers share (the OpenAI API and the
//! dashboard).

pub struct ApiState {
    /// gRPC addresses of the workers requests may go to.
    pub workers: crate::workers::WorkerSet,
    /// Admission, load spread and failover over the drivers.
    pub drivers: crate::drivers::Drivers,
}
