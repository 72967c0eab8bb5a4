//! llama-cluster worker: a libp2p swarm member that discovers its peers,
//! answers JSON commands over `/json-message/1.0`, publishes its shard in the
//! Kademlia DHT and serves the gRPC control plane.

pub mod allocator;
pub mod catalog_sync;
pub mod client;
pub mod dht;
pub mod discovery;
pub mod dispatcher;
pub mod gatekeeper;
pub mod grpc;
pub mod identity;
pub mod messaging;
pub mod metrics;
pub mod net;
pub mod network;
pub mod node;
pub mod pipeline;
pub mod records;
pub mod resources;
pub mod startup;
pub mod state;
pub mod swarm_status;
pub mod torrent;

/// Prefix of the machine-readable line a node prints on stdout once it is up.
pub const READY_PREFIX: &str = "LLAMA_CLUSTER_READY ";
