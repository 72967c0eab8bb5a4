//! llama-cluster coordinator: aggregates the status of workers over gRPC,
//! serves the Coordinator gRPC service and the OpenAI-compatible API in
//! front of them (with traces and Prometheus metrics), and runs the local
//! demo cluster.

pub mod api_state;
pub mod cluster;
pub mod dashboard;
pub mod demo;
pub mod drivers;
pub mod grpc;
pub mod metrics;
pub mod openai;
pub mod placement;
pub mod placer;
pub mod status_table;
pub mod tls;
pub mod workers;
