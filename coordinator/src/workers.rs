//! The workers the coordinator talks to: the configured addresses plus
//! every worker their status names as a peer, and who drives which model.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use llama_cluster_proto::v1::GetStatusResponse;
use tracing::info;

/// Polls a discovered worker may miss in a row before it is forgotten.
const FORGET_AFTER_MISSES: u32 = 5;

/// The workers the coordinator talks to: configured, then discovered.
#[derive(Clone, Default)]
pub struct WorkerSet(Arc<RwLock<Known>>);

#[derive(Default)]
struct Known {
    /// Configured addresses: always polled.
    seeds: BTreeSet<String>,
    /// Addresses learned from workers' peers.
    found: BTreeSet<String>,
    /// Not workers (the bootstrap) or a second address of a known worker.
    ignored: BTreeSet<String>,
    /// Polls missed in a row, per found address.
    misses: HashMap<String, u32>,
    /// Forgotten addresses not heard from since: said once, not again.
    gone: BTreeSet<String>,
    /// (model, worker driving it) from the last poll, and when.
    served: Option<(Instant, Vec<(String, String)>)>,
    /// The last poll found the cluster SWARM_READY with a model served
    /// (what the health checks say).
    ready: bool,
    /// When a poll first found each model served (Unix seconds).
    first_seen: HashMap<String, u64>,
}

/// How old the last poll's view of who serves what may be for routing a
/// request; older, the workers are asked again.
const SERVED_FRESH: Duration = Duration::from_secs(5);

impl WorkerSet {
    pub fn new(seed: impl IntoIterator<Item = String>) -> Self {
        WorkerSet(Arc::new(RwLock::new(Known {
            seeds: seed.into_iter().collect(),
            ..Default::default()
        })))
    }

    /// Remembers who serves which model (from a poll).
    pub fn set_served(&self, served: Vec<(String, String)>) {
        let mut g = self.0.write().unwrap_or_else(|e| e.into_inner());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for (model, _) in &served {
            g.first_seen.entry(model.clone()).or_insert(now);
        }
        g.served = Some((Instant::now(), served));
    }

    /// When a poll first found `model` served (Unix seconds).
    pub fn first_seen(&self, model: &str) -> Option<u64> {
        let g = self.0.read().unwrap_or_else(|e| e.into_inner());
        g.first_seen.get(model).copied()
    }

    /// Remembers whether the last poll found the cluster ready.
    pub fn set_ready(&self, ready: bool) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).ready = ready;
    }

    /// Whether the last poll found the cluster SWARM_READY with a model
    /// served: every layer of it in ready shards (no worker is asked now).
    pub fn ready(&self) -> bool {
        self.0.read().unwrap_or_else(|e| e.into_inner()).ready
    }

    /// Who serves which model: the last poll's answer when it is fresh and
    /// names someone, else the workers asked now (requests do not wait on
    /// every worker's status each time).
    pub async fn served(&self) -> Vec<(String, String)> {
        let cached = self
            .0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .served
            .clone()
            .filter(|(at, s)| at.elapsed() < SERVED_FRESH && !s.is_empty());
        match cached {
            Some((_, s)) => s,
            None => {
                let s = crate::cluster::cluster_status(&self.list(), None).await.1;
                self.set_served(s.clone());
                s
            }
        }
    }

    /// Worker gRPC addresses, sorted (configured and found).
    pub fn list(&self) -> Vec<String> {
        let g = self.0.read().unwrap_or_else(|e| e.into_inner());
        g.seeds.union(&g.found).cloned().collect()
    }

    /// One poll's outcome: learns the workers named in `statuses` (their
    /// peers' gRPC addresses, unless that peer already answered under
    /// another address), drops nodes that are not workers (the bootstrap)
    /// and second addresses of one worker, and forgets found addresses that
    /// stopped answering. True when it found a worker it did not know
    /// (whose status the poll does not have yet).
    pub fn learn(&self, statuses: &[(String, GetStatusResponse)], unreachable: &[String]) -> bool {
        let mut g = self.0.write().unwrap_or_else(|e| e.into_inner());
        let mut found_new = false;
        let mut seen: HashMap<&str, &str> = HashMap::new();
        for (addr, st) in statuses {
            g.misses.remove(addr);
            if g.gone.remove(addr) {
                info!("[DISCOVERY] worker {addr} is back");
            }
            let duplicate = seen.insert(st.peer_id.as_str(), addr.as_str()).is_some();
            // A duplicate found address goes; a bootstrap address goes from
            // wherever it was learned.
            let found_dup = duplicate && g.found.remove(addr);
            if st.role == "bootstrap" || found_dup {
                g.found.remove(addr);
                g.ignored.insert(addr.clone());
            }
        }
        for addr in unreachable {
            if g.found.contains(addr) {
                let n = g.misses.entry(addr.clone()).or_default();
                *n += 1;
                if *n >= FORGET_AFTER_MISSES {
                    g.misses.remove(addr);
                    g.found.remove(addr);
                    if g.gone.insert(addr.clone()) {
                        info!(
                            "[DISCOVERY] worker {addr} forgotten: no answer in {FORGET_AFTER_MISSES} polls"
                        );
                    }
                }
            }
        }
        for (_, st) in statuses {
            for p in &st.peers {
                if p.grpc_addr.is_empty()
                    || seen.contains_key(p.peer_id.as_str())
                    || g.ignored.contains(&p.grpc_addr)
                    || g.seeds.contains(&p.grpc_addr)
                {
                    continue;
                }
                // A gone worker that peers still name is polled again quietly.
                if g.found.insert(p.grpc_addr.clone()) && !g.gone.contains(&p.grpc_addr) {
                    info!(
                        "[DISCOVERY] worker {} found through {}",
                        p.grpc_addr, st.peer_id
                    );
                    found_new = true;
                }
            }
        }
        found_new
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llama_cluster_proto::v1::PeerInfo;

    fn status(peer: &str, role: &str, peers: &[(&str, &str)]) -> GetStatusResponse {
        GetStatusResponse {
            peer_id: peer.into(),
            role: role.into(),
            peers: peers
                .iter()
                .map(|(id, addr)| PeerInfo {
                    peer_id: id.to_string(),
                    grpc_addr: addr.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn workers_are_found_once_and_forgotten_when_gone() {
        let set = WorkerSet::new(["seed:1".to_string()]);
        // The seed names two peers: a worker and the bootstrap; it also
        // reports itself under another address (an alias), which is skipped.
        let seed = || {
            (
                "seed:1".to_string(),
                status(
                    "P0",
                    "worker",
                    &[("P1", "w1:1"), ("B", "boot:1"), ("P0", "alias:1")],
                ),
            )
        };
        assert!(set.learn(&[seed()], &[]), "new workers found");
        assert_eq!(set.list(), vec!["boot:1", "seed:1", "w1:1"]);
        assert!(!set.learn(&[seed()], &[]), "nothing new");
        set.learn(
            &[
                ("seed:1".into(), status("P0", "worker", &[])),
                ("boot:1".into(), status("B", "bootstrap", &[])),
            ],
            &["w1:1".into()],
        );
        assert_eq!(
            set.list(),
            vec!["seed:1", "w1:1"],
            "the bootstrap is no worker"
        );
        for _ in 1..FORGET_AFTER_MISSES {
            set.learn(
                &[("seed:1".into(), status("P0", "worker", &[]))],
                &["w1:1".into()],
            );
        }
        assert_eq!(
            set.list(),
            vec!["seed:1"],
            "gone after {FORGET_AFTER_MISSES} misses"
        );
        // A configured address is never forgotten.
        for _ in 0..10 {
            set.learn(&[], &["seed:1".into()]);
        }
        assert_eq!(set.list(), vec!["seed:1"]);
    }
}
