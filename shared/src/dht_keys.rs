//! Kademlia keys and the shard record a worker publishes under them.

use serde::{Deserialize, Serialize};

/// Key of the record describing who serves shard `shard_id`:
/// `/llama-cluster/<cluster>/shard/<shard_id>`.
pub fn shard_key(cluster: &str, shard_id: &str) -> String {
    format!("/llama-cluster/{cluster}/shard/{shard_id}")
}

/// Key under which every worker of a cluster registers as a provider; the
/// providers of this key are the cluster's members (a DHT safety net for
/// discovery).
pub fn members_key(cluster: &str) -> String {
    format!("/llama-cluster/{cluster}/members")
}

/// Key of the cluster's readiness record: `/llama-cluster/<cluster>/swarm-ready`.
pub fn swarm_ready_key(cluster: &str) -> String {
    format!("/llama-cluster/{cluster}/swarm-ready")
}

/// Parses a shard key back into `(cluster, shard_id)`.
pub fn parse_shard_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("/llama-cluster/")?;
    let (cluster, rest) = rest.split_once('/')?;
    let shard_id = rest.strip_prefix("shard/")?;
    (!cluster.is_empty() && !shard_id.is_empty() && !shard_id.contains('/'))
        .then_some((cluster, shard_id))
}

/// True when `name` is usable as a cluster name or shard id: 1..=64 chars of
/// ASCII letters, digits, `-`, `_` and `.`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Serving state a worker announces for its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardState {
    /// Configured, not loaded yet.
    Announced,
    /// Being fetched or loaded.
    Loading,
    /// Loaded and serving.
    Ready,
    /// Loading failed.
    Failed,
}

impl ShardState {
    pub fn as_str(self) -> &'static str {
        match self {
            ShardState::Announced => "announced",
            ShardState::Loading => "loading",
            ShardState::Ready => "ready",
            ShardState::Failed => "failed",
        }
    }
}

/// The value stored under [`shard_key`]: who serves which layers of which model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub shard_id: String,
    pub peer_id: String,
    pub addrs: Vec<String>,
    pub model: String,
    pub layer_start: u32,
    pub layer_end: u32,
    pub state: ShardState,
    /// Unix time in milliseconds when the record was written; newer wins
    /// (a state change and a stale copy of the previous state within one
    /// second must still be told apart).
    pub updated_at: u64,
    /// Open inference sessions on the worker (a load hint for routing).
    #[serde(default)]
    pub load: u32,
    /// The stage's session limit (0: unknown).
    #[serde(default)]
    pub max_sessions: u32,
}

impl ShardRecord {
    /// Encodes the record as the DHT value (JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a DHT value; `None` for anything that is not a valid record.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let rec: ShardRecord = serde_json::from_slice(bytes).ok()?;
        (is_valid_name(&rec.shard_id) && rec.layer_start <= rec.layer_end).then_some(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_key_round_trips() {
        let k = shard_key("home-lab", "shard-0");
        assert_eq!(k, "/llama-cluster/home-lab/shard/shard-0");
        assert_eq!(parse_shard_key(&k), Some(("home-lab", "shard-0")));
        assert_eq!(parse_shard_key("/llama-cluster/x/members"), None);
        assert_eq!(parse_shard_key("/other/x/shard/y"), None);
    }

    #[test]
    fn names_are_checked() {
        assert!(is_valid_name("llama-cluster"));
        assert!(is_valid_name("s_0.a"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("a/b"));
        assert!(!is_valid_name(&"x".repeat(65)));
    }

    #[test]
    fn record_rejects_garbage_and_inverted_ranges() {
        let rec = ShardRecord {
            shard_id: "s0".into(),
            peer_id: "p".into(),
            addrs: vec![],
            model: "m".into(),
            layer_start: 0,
            layer_end: 14,
            state: ShardState::Ready,
            updated_at: 1,
            load: 0,
            max_sessions: 0,
        };
        assert_eq!(ShardRecord::from_bytes(&rec.to_bytes()), Some(rec.clone()));
        assert_eq!(ShardRecord::from_bytes(b"{not json"), None);
        let bad = ShardRecord {
            layer_start: 5,
            layer_end: 4,
            ..rec
        };
        assert_eq!(ShardRecord::from_bytes(&bad.to_bytes()), None);
    }
}
