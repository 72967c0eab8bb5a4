//! A node's view of itself and of the swarm, as returned by GET_STATUS.

use serde::{Deserialize, Serialize};

use crate::dht_keys::ShardState;

/// Whether a known shard can be reached from this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Availability {
    /// Served by this node.
    Local,
    /// Served by a peer this node is connected to.
    Online,
    /// Known from the DHT or an earlier status, peer not connected.
    Offline,
}

impl Availability {
    pub fn as_str(self) -> &'static str {
        match self {
            Availability::Local => "LOCAL",
            Availability::Online => "ONLINE",
            Availability::Offline => "OFFLINE",
        }
    }
}

/// Transport of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Transport {
    Quic,
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "QUIC",
            Transport::Tcp => "TCP",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub peer_id: String,
    pub transport: Transport,
    pub address: String,
    /// "inbound" or "outbound".
    pub direction: String,
    /// The peer's gRPC control-plane address, when it told us (empty: unknown).
    #[serde(default)]
    pub grpc_addr: String,
}

/// What a node offers for shards: the coordinator places by it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    /// Physical memory of the machine.
    pub memory_total_bytes: u64,
    /// Memory this node offers for shards (`memory_mb`, else the total).
    pub memory_budget_bytes: u64,
    /// CPU cores available to llama.cpp.
    pub cpus: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardStatus {
    pub shard_id: String,
    pub model: String,
    pub layer_start: u32,
    pub layer_end: u32,
    pub state: ShardState,
    pub peer_id: String,
    pub addrs: Vec<String>,
    pub availability: Availability,
    pub updated_at: u64,
    /// Open sessions, and the session limit (0: unknown).
    #[serde(default)]
    pub load: u32,
    #[serde(default)]
    pub max_sessions: u32,
}

impl ShardStatus {
    /// Sessions that may still be opened (unknown limit: one).
    pub fn free_sessions(&self) -> u32 {
        if self.max_sessions == 0 {
            1
        } else {
            self.max_sessions.saturating_sub(self.load)
        }
    }
}

/// A file this node seeds or downloads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TorrentStatus {
    pub file_hash: String,
    pub name: String,
    pub size: u64,
    /// "seeding" or "downloading".
    pub state: String,
    pub verified_bytes: u64,
    /// Bytes received by this process for the file.
    pub fetched_bytes: u64,
    pub pieces_done: u32,
    pub pieces_total: u32,
    pub peers: u32,
    pub bad_pieces: u32,
    /// Bytes received for the file from peers holding all of it.
    #[serde(default)]
    pub bytes_from_seeders: u64,
    /// Bytes received for the file from peers still downloading it.
    #[serde(default)]
    pub bytes_from_partial: u64,
    /// Peers dropped for sending bad pieces of it.
    #[serde(default)]
    pub bad_peers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub peer_id: String,
    pub cluster: String,
    pub version: String,
    pub uptime_secs: u64,
    pub listen_addrs: Vec<String>,
    pub quic_enabled: bool,
    pub peers: Vec<PeerStatus>,
    pub shards: Vec<ShardStatus>,
    #[serde(default)]
    pub torrents: Vec<TorrentStatus>,
    /// Every layer of the model is served by a ready, reachable worker.
    #[serde(default)]
    pub swarm_ready: bool,
    /// Peer whose SWARM_READY announcement was received last (if ready).
    #[serde(default)]
    pub swarm_ready_by: String,
    /// This node's gRPC address as others reach it.
    #[serde(default)]
    pub grpc_addr: String,
    /// `worker` or `bootstrap`.
    #[serde(default)]
    pub role: String,
    #[serde(default)]
    pub resources: Resources,
}
