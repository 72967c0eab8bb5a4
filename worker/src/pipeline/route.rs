//! Route planning: a chain of ready shards covering every layer of a model,
//! from the shard records this worker knows.

use llama_cluster_shared::dht_keys::ShardState;
use llama_cluster_shared::status::{Availability, ShardStatus};

use super::frame::Hop;

/// Picks, layer by layer, the best shard starting where the previous one
/// ended: reachable (this worker or a connected peer) and ready; then the
/// longest range (fewer hops), this worker first, then the least loaded.
pub fn plan(shards: &[ShardStatus], model: &str, n_layer: u32) -> Result<Vec<Hop>, String> {
    let usable: Vec<&ShardStatus> = shards
        .iter()
        .filter(|s| {
            s.model == model
                && s.state == ShardState::Ready
                && s.availability != Availability::Offline
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
            return Err(format!(
                "no route for model {model}: no ready, reachable worker serves layers starting at {next} (of 0-{}); known shards: [{}]",
                n_layer - 1,
                known.join(", ")
            ));
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
        let e = plan(&s[..5], "m", 30).unwrap_err();
        assert!(e.contains("starting at 20"), "{e}");
        assert!(plan(&s, "other", 30).is_err());
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
