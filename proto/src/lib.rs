//! Generated gRPC types and service stubs of llama-cluster.

/// `llamacluster.v1`: the worker control plane and the coordinator.
pub mod v1 {
    tonic::include_proto!("llamacluster.v1");
}

/// Encoded file descriptor set for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("llamacluster_descriptor");
