//! llama-cluster coordinator (thin start): reads the status of workers over
//! gRPC and runs the local demo cluster.

pub mod demo;
pub mod grpc;
pub mod openai;
pub mod status_table;
