//! What a node knows, shared between the swarm task, the dispatcher and gRPC:
//! its listen addresses, live connections and the shard records it has seen.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use llama_cluster_shared::dht_keys::ShardRecord;
use llama_cluster_shared::status::{Availability, NodeStatus, PeerStatus, ShardStatus, Transport};

use crate::network::behaviour::Role;

#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub id: ConnectionId,
    pub transport: Transport,
    pub address: Multiaddr,
    pub outbound: bool,
}

#[derive(Debug)]
pub struct StateInner {
    pub peer_id: PeerId,
    pub cluster: String,
    pub role: Role,
    pub quic_enabled: bool,
    pub started: Instant,
    pub listen_addrs: Vec<Multiaddr>,
    /// Live connections per peer, oldest first.
    pub connections: HashMap<PeerId, Vec<ConnInfo>>,
    /// Agent version reported by identify.
    pub agents: HashMap<PeerId, String>,
    /// Shard records seen, keyed by (shard id, serving peer).
    pub shards: HashMap<(String, String), ShardRecord>,
    /// The record this node publishes, if it serves a shard.
    pub local_shard: Option<ShardRecord>,
    /// Whether every layer of this node's model is served by a ready,
    /// reachable shard (this node's own view).
    pub swarm_ready: bool,
    /// The last SWARM_READY announcement received: (from, model, ready).
    pub swarm_announcement: Option<(String, String, bool)>,
    /// This node's advertised gRPC address.
    pub grpc_addr: String,
    /// gRPC addresses peers reported in their status.
    pub peer_grpc: HashMap<PeerId, String>,
    /// What this node offers for shards.
    pub resources: llama_cluster_shared::status::Resources,
    /// Peers that did not answer a request, and since when.
    pub suspects: HashMap<PeerId, Instant>,
}

/// How long a peer that did not answer stays out of routes (unless it
/// connects again first).
pub const SUSPECT_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// Cheaply clonable handle on the node state.
#[derive(Debug, Clone)]
pub struct SharedState(Arc<RwLock<StateInner>>);

impl SharedState {
    pub fn new(peer_id: PeerId, cluster: &str, role: Role, quic_enabled: bool) -> Self {
        SharedState(Arc::new(RwLock::new(StateInner {
            peer_id,
            cluster: cluster.to_string(),
            role,
            quic_enabled,
            started: Instant::now(),
            listen_addrs: vec![],
            connections: HashMap::new(),
            agents: HashMap::new(),
            shards: HashMap::new(),
            local_shard: None,
            swarm_ready: false,
            swarm_announcement: None,
            grpc_addr: String::new(),
            peer_grpc: HashMap::new(),
            resources: Default::default(),
            suspects: HashMap::new(),
        })))
    }

    /// Runs `f` with read access.
    pub fn read<R>(&self, f: impl FnOnce(&StateInner) -> R) -> R {
        let guard = self.0.read().unwrap_or_else(|e| e.into_inner());
        f(&guard)
    }

    /// Runs `f` with write access.
    pub fn write<R>(&self, f: impl FnOnce(&mut StateInner) -> R) -> R {
        let mut guard = self.0.write().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    pub fn peer_id(&self) -> PeerId {
        self.read(|s| s.peer_id)
    }

    /// Inserts or refreshes a shard record; older copies never replace newer
    /// ones. Returns true when something changed.
    pub fn upsert_shard(&self, rec: ShardRecord) -> bool {
        self.write(|s| {
            let key = (rec.shard_id.clone(), rec.peer_id.clone());
            if s.shards.get(&key) == Some(&rec) {
                return false;
            }
            // A worker serves one shard: its newest record wins, whatever
            // the shard (a stale copy of a shard it left is refused).
            let newest = s
                .shards
                .values()
                .filter(|r| r.peer_id == rec.peer_id)
                .map(|r| r.updated_at)
                .max();
            if newest.is_some_and(|t| t > rec.updated_at) {
                return false;
            }
            s.shards.retain(|(_, peer), _| *peer != rec.peer_id);
            s.shards.insert(key, rec);
            true
        })
    }

    /// Marks `peer` as not answering: its shards count as offline until it
    /// connects again or [`SUSPECT_FOR`] passes.
    pub fn suspect(&self, peer: PeerId) {
        self.write(|s| s.suspects.insert(peer, Instant::now()));
    }

    /// `peer` answered or connected again.
    pub fn clear_suspect(&self, peer: &PeerId) {
        if self.read(|s| s.suspects.contains_key(peer)) {
            self.write(|s| s.suspects.remove(peer));
        }
    }

    /// The status report shared by GET_STATUS and gRPC GetStatus.
    pub fn snapshot(&self) -> NodeStatus {
        self.read(|s| {
            let me = s.peer_id.to_string();
            let mut peers: Vec<PeerStatus> = s
                .connections
                .iter()
                .filter_map(|(peer, conns)| {
                    // The QUIC connection when there is one, else the oldest.
                    let c = conns
                        .iter()
                        .find(|c| c.transport == Transport::Quic)
                        .or(conns.first())?;
                    Some(PeerStatus {
                        peer_id: peer.to_string(),
                        transport: c.transport,
                        address: c.address.to_string(),
                        direction: if c.outbound { "outbound" } else { "inbound" }.into(),
                        grpc_addr: s.peer_grpc.get(peer).cloned().unwrap_or_default(),
                    })
                })
                .collect();
            peers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
            let mut shards: Vec<ShardStatus> = s
                .shards
                .values()
                .chain(s.local_shard.iter())
                .filter(|r| !(r.peer_id == me && s.local_shard.as_ref() != Some(*r)))
                .map(|r| {
                    let availability = if r.peer_id == me {
                        Availability::Local
                    } else if r.peer_id.parse::<PeerId>().is_ok_and(|p| {
                        s.connections.contains_key(&p)
                            && s.suspects
                                .get(&p)
                                .is_none_or(|since| since.elapsed() > SUSPECT_FOR)
                    }) {
                        Availability::Online
                    } else {
                        Availability::Offline
                    };
                    ShardStatus {
                        shard_id: r.shard_id.clone(),
                        model: r.model.clone(),
                        layer_start: r.layer_start,
                        layer_end: r.layer_end,
                        state: r.state,
                        peer_id: r.peer_id.clone(),
                        addrs: r.addrs.clone(),
                        availability,
                        updated_at: r.updated_at,
                        load: r.load,
                        max_sessions: r.max_sessions,
                    }
                })
                .collect();
            shards.sort_by(|a, b| {
                (a.layer_start, &a.shard_id, &a.peer_id).cmp(&(
                    b.layer_start,
                    &b.shard_id,
                    &b.peer_id,
                ))
            });
            NodeStatus {
                peer_id: me,
                cluster: s.cluster.clone(),
                version: llama_cluster_shared::VERSION.to_string(),
                uptime_secs: s.started.elapsed().as_secs(),
                listen_addrs: s.listen_addrs.iter().map(|a| a.to_string()).collect(),
                quic_enabled: s.quic_enabled,
                peers,
                shards,
                torrents: vec![],
                swarm_ready: s.swarm_ready,
                swarm_ready_by: s
                    .swarm_announcement
                    .as_ref()
                    .filter(|a| a.2)
                    .map(|a| a.0.clone())
                    .unwrap_or_default(),
                grpc_addr: s.grpc_addr.clone(),
                role: s.role.as_str().into(),
                resources: s.resources.clone(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llama_cluster_shared::dht_keys::ShardState;

    fn rec(shard: &str, peer: &str, at: u64) -> ShardRecord {
        ShardRecord {
            shard_id: shard.into(),
            peer_id: peer.into(),
            addrs: vec![],
            model: "m".into(),
            layer_start: 0,
            layer_end: 1,
            state: ShardState::Announced,
            updated_at: at,
            load: 0,
            max_sessions: 0,
        }
    }

    #[test]
    fn a_worker_has_one_shard_its_newest_and_suspects_are_offline() {
        let me = PeerId::random();
        let other = PeerId::random();
        let st = SharedState::new(me, "c", Role::Worker, true);
        let o = other.to_string();
        assert!(st.upsert_shard(rec("s1", &o, 10)));
        // It moved to s0: the s1 record goes …
        assert!(st.upsert_shard(rec("s0", &o, 20)));
        assert_eq!(st.read(|s| s.shards.len()), 1);
        // … and a stale copy of it (from the DHT) is refused.
        assert!(!st.upsert_shard(rec("s1", &o, 15)));
        assert_eq!(st.snapshot().shards[0].shard_id, "s0");
        // Connected, then suspected: offline until it connects again.
        st.write(|s| {
            s.connections.insert(
                other,
                vec![ConnInfo {
                    id: libp2p::swarm::ConnectionId::new_unchecked(1),
                    transport: Transport::Quic,
                    address: "/ip4/127.0.0.1/udp/1/quic-v1".parse().unwrap(),
                    outbound: true,
                }],
            )
        });
        assert_eq!(st.snapshot().shards[0].availability, Availability::Online);
        st.suspect(other);
        assert_eq!(st.snapshot().shards[0].availability, Availability::Offline);
        st.clear_suspect(&other);
        assert_eq!(st.snapshot().shards[0].availability, Availability::Online);
    }

    #[test]
    fn newer_records_win_and_availability_follows_connections() {
        let me = PeerId::random();
        let other = PeerId::random();
        let st = SharedState::new(me, "c", Role::Worker, true);
        assert!(st.upsert_shard(rec("s1", &other.to_string(), 10)));
        assert!(!st.upsert_shard(rec("s1", &other.to_string(), 5)));
        assert!(!st.upsert_shard(rec("s1", &other.to_string(), 10)));
        st.write(|s| s.local_shard = Some(rec("s0", &me.to_string(), 1)));
        let snap = st.snapshot();
        assert_eq!(snap.shards.len(), 2);
        let by_id = |id: &str| {
            snap.shards
                .iter()
                .find(|s| s.shard_id == id)
                .unwrap()
                .availability
        };
        assert_eq!(by_id("s0"), Availability::Local);
        assert_eq!(by_id("s1"), Availability::Offline);
        st.write(|s| {
            s.connections.insert(
                other,
                vec![ConnInfo {
                    id: ConnectionId::new_unchecked(1),
                    transport: Transport::Quic,
                    address: "/ip4/127.0.0.1/udp/1/quic-v1".parse().unwrap(),
                    outbound: true,
                }],
            )
        });
        let snap = st.snapshot();
        let s1 = snap.shards.iter().find(|s| s.shard_id == "s1").unwrap();
        assert_eq!(s1.availability, Availability::Online);
        assert_eq!(snap.peers.len(), 1);
        assert_eq!(snap.peers[0].transport, Transport::Quic);
    }
}
