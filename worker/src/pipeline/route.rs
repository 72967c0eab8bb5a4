//! Route planning: a chain of ready shards covering every layer of a model,
//! from the shard records this worker knows.

use llama_cluster_shared::dht_keys::ShardState;
use llama_cluster_shared::status::{Availability, ShardStatus};

use crate::net::frame::Hop;

/// Why no route was planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A layer range has no ready, reachable replica.
    #[error(
        "no route for model {model}: {range} of 0-{last_layer} has no ready, live replica; known shards: [{known}]"
    )]
    NoRoute {
        model: String,
        /// The range left without a replica ("layers 22-29 (id)", or
        /// "layers starting at 22" when no record of it is known).
        range: String,
        /// Its first layer.
        first_layer: u32,
        last_layer: u32,
        known: String,
    },
    /// Routes exist, but a layer range has no replica with a free session.
    #[error("every replica of {range} is busy (no free session)")]
    Full { range: String },
}

impl PlanError {
    /// Names the range from `ranges` (the manifest's `(start, end, id)`)
    /// when no record of it was known.
    pub fn with_ranges(mut self, ranges: &[(u32, u32, String)]) -> PlanError {
        if let PlanError::NoRoute {
            range, first_layer, ..
        } = &mut self
            && let Some((a, b, id)) = ranges.iter().find(|(a, _, _)| a == first_layer)
        {
            *range = format!("layers {a}-{b} ({id})");
        }
        self
    }
}

/// A route whose every stage has a free session ([`ShardStatus::free_sessions`]):
/// per layer range the replica with the most free sessions, never a full
/// one while a replica has room.
pub fn plan_free(shards: &[ShardStatus], model: &str, n_layer: u32) -> Result<Vec<Hop>, PlanError> {
    match plan_by(shards, model, n_layer, true) {
        Ok(r) => Ok(r),
        Err(busy) => match plan_by(shards, model, n_layer, false) {
            Ok(_) => Err(busy),
            Err(e) => Err(e),
        },
    }
}

/// Picks, layer by layer, the best shard starting where the previous one
/// ended: reachable (this worker or a connected peer) and ready; then the
/// longest range (fewer hops), the most free sessions, this worker first,
/// then the least loaded.
pub fn plan(shards: &[ShardStatus], model: &str, n_layer: u32) -> Result<Vec<Hop>, PlanError> {
    plan_by(shards, model, n_layer, false)
}

fn plan_by(
    shards: &[ShardStatus],
    model: &str,
    n_layer: u32,
    need_free: bool,
) -> Result<Vec<Hop>, PlanError> {
    let usable: Vec<&ShardStatus> = shards
        .iter()
        .filter(|s| {
            s.model == model
                && s.state == ShardState::Ready
                && s.availability != Availability::Offline
                && (!need_free || s.free_sessions() > 0)
        })
        .collect();
    let mut route = Vec::new();
    let mut next = 0;
    while next < n_layer {
        let best = usable
            .iter()
            .filter(|s| s.layer_start == next && s.layer_end < n_layer)
            .max_by_key(|s| {
                (
                    s.layer_end,
                    s.free_sessions(),
                    s.availability == Availability::Local,
                    std::cmp::Reverse(s.load),
                    s.updated_at,
                )
            });
        let Some(s) = best else {
            let known: Vec<String> = shards
                .iter()
                .filter(|s| s.model == model)
                .map(|s| {
                    format!(
                        "{} {}-{} {} {}",
                        s.shard_id,
                        s.layer_start,
                        s.layer_end,
                        s.state.as_str(),
                        s.availability.as_str()
                    )
                })
                .collect();
            let range = shards
                .iter()
                .filter(|s| s.model == model && s.layer_start == next)
                .map(|s| format!("layers {}-{} ({})", s.layer_start, s.layer_end, s.shard_id))
                .next()
                .unwrap_or_else(|| format!("layers starting at {next}"));
            return Err(if need_free {
                PlanError::Full { range }
            } else {
                PlanError::NoRoute {
                    model: model.to_string(),
                    range,
                    first_layer: next,
                    last_layer: n_layer.saturating_sub(1),
                    known: known.join(", "),
                }
            });
        };
        route.push(Hop {
            peer: s.peer_id.clone(),
            shard_id: s.shard_id.clone(),
            layer_start: s.layer_start,
            layer_end: s.layer_end,
        });
        next = s.layer_end + 1;
    }
    Ok(route)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(
        id: &str,
        peer: &str,
        a: u32,
        b: u32,
        state: ShardState,
        av: Availability,
        load: u32,
    ) -> ShardStatus {
        ShardStatus {
            shard_id: id.into(),
            model: "m".into(),
            layer_start: a,
            layer_end: b,
            state,
            peer_id: peer.into(),
            addrs: vec![],
            availability: av,
            updated_at: 1,
            load,
            max_sessions: 4,
        }
    }

    #[test]
    fn plans_a_covering_chain_preferring_ready_reachable_idle() {
        use Availability::*;
        use ShardState::*;
        let s = vec![
            shard("a", "p1", 0, 9, Ready, Online, 3),
            shard("a", "p2", 0, 9, Ready, Online, 0),
            shard("b", "p3", 10, 19, Loading, Online, 0),
            shard("b", "p4", 10, 19, Ready, Offline, 0),
            shard("b", "p5", 10, 19, Ready, Local, 0),
            shard("c", "p6", 20, 29, Ready, Online, 0),
        ];
        let r = plan(&s, "m", 30).unwrap();
        let peers: Vec<&str> = r.iter().map(|h| h.peer.as_str()).collect();
        assert_eq!(peers, ["p2", "p5", "p6"]);
        let e = plan(&s[..5], "m", 30).unwrap_err().to_string();
        assert!(
            e.contains("layers starting at 20 of 0-29 has no ready, live replica"),
            "{e}"
        );
        assert!(plan(&s, "other", 30).is_err());
        // With the manifest's ranges, the range is named in full.
        let e = plan(&s[..5], "m", 30)
            .unwrap_err()
            .with_ranges(&[(0, 9, "a".into()), (20, 29, "c".into())])
            .to_string();
        assert!(e.contains("layers 20-29 (c) of 0-29"), "{e}");
    }

    #[test]
    fn longer_ranges_mean_fewer_hops() {
        use Availability::*;
        let s = vec![
            shard("a", "p1", 0, 14, ShardState::Ready, Online, 0),
            shard("all", "p2", 0, 29, ShardState::Ready, Online, 0),
            shard("b", "p3", 15, 29, ShardState::Ready, Online, 0),
        ];
        assert_eq!(plan(&s, "m", 30).unwrap().len(), 1);
    }
}

#[cfg(test)]
mod capacity {
    use super::*;

    fn shard(id: &str, peer: &str, a: u32, b: u32, load: u32) -> ShardStatus {
        ShardStatus {
            shard_id: id.into(),
            model: "m".into(),
            layer_start: a,
            layer_end: b,
            state: ShardState::Ready,
            peer_id: peer.into(),
            addrs: vec![],
            availability: Availability::Online,
            updated_at: 1,
            load,
            max_sessions: 4,
        }
    }

    #[test]
    fn a_full_stage_is_never_picked_while_a_replica_has_room() {
        let s = vec![
            shard("a", "p1", 0, 9, 4),
            shard("a", "p2", 0, 9, 3),
            shard("b", "p3", 10, 19, 1),
            shard("b", "p4", 10, 19, 0),
        ];
        let r = plan_free(&s, "m", 20).unwrap();
        let peers: Vec<&str> = r.iter().map(|h| h.peer.as_str()).collect();
        assert_eq!(peers, ["p2", "p4"], "the most free sessions per range");
        let full = vec![shard("a", "p1", 0, 9, 4), shard("b", "p3", 10, 19, 0)];
        match plan_free(&full, "m", 20) {
            Err(e @ PlanError::Full { .. }) => {
                assert!(e.to_string().contains("layers 0-9 (a) is busy"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        match plan_free(&full[1..], "m", 20) {
            Err(e @ PlanError::NoRoute { .. }) => {
                assert!(e.to_string().contains("layers starting at 0"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }
}
