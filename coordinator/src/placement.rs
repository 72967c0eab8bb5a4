//! Shard placement: which worker serves which shard of a split model.
//!
//! The plan is weighted by memory (the largest shards go to the workers
//! offering the most memory, and a shard only goes where it fits), covers
//! every shard before adding replicas, keeps every worker that already
//! serves a shard where it is (fewest moves), takes a surplus replica when a
//! shard lost its last one and no free worker fits, and gives spare workers
//! extra replicas so a worker that joins gets work. A plan that cannot
//! cover the model is refused with what is missing.

use std::collections::BTreeMap;

/// Memory a worker needs beyond a shard's file: llama.cpp runtime, compute
/// buffers and the KV cache of its sessions.
pub const RUNTIME_OVERHEAD: u64 = 64 << 20;

/// Memory a shard of `size` bytes needs on a worker.
pub fn required_bytes(size: u64) -> u64 {
    size + size / 4 + RUNTIME_OVERHEAD
}

/// One shard of the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSpec {
    pub id: String,
    pub layer_start: u32,
    pub layer_end: u32,
    /// Bytes the shard holds: its tensors and the KV cache of one session.
    pub size: u64,
}

/// One live worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerView {
    /// gRPC address (the worker's key in the plan).
    pub addr: String,
    /// Memory it offers for shards.
    pub budget: u64,
    /// Shard of this model it serves or is loading, if any.
    pub serving: Option<String>,
    /// Shards it refused lately for lack of room (RESOURCE_EXHAUSTED: its
    /// disk, say): not given to it again for a while.
    pub refused: Vec<String>,
    /// Not to be changed now (it missed a poll, or its last load failed):
    /// keeps what it serves, gets nothing new, gives nothing away.
    pub frozen: bool,
}

/// A worker told to load a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub addr: String,
    pub from: Option<String>,
    pub to: String,
}

/// The outcome of planning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Worker → shard, for every worker with work (kept and moved).
    pub assignment: BTreeMap<String, String>,
    /// The changes to make.
    pub moves: Vec<Move>,
    /// Replicas per shard after the moves.
    pub replicas: BTreeMap<String, usize>,
    /// Shards with fewer replicas than asked for (not an error).
    pub short: Vec<String>,
}

/// Why no plan covers the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("no live worker to place {0} shards on")]
    NoWorkers(usize),
    #[error(
        "the model has {shards} shards but only {workers} workers are alive; {missing} ({more} more worker(s) needed)"
    )]
    NotEnoughWorkers {
        shards: usize,
        workers: usize,
        missing: String,
        more: usize,
    },
    #[error(
        "shard {shard} is refused by every worker with the memory for it ({workers}: no room on its disk, say; see the workers' logs)"
    )]
    Refused { shard: String, workers: String },
    #[error(
        "shard {shard} (layers {layers}) needs {need_mib} MiB but the largest worker with room offers {largest_mib} MiB"
    )]
    DoesNotFit {
        shard: String,
        layers: String,
        need_mib: u64,
        largest_mib: u64,
    },
}

fn mib(b: u64) -> u64 {
    b.div_ceil(1 << 20)
}

/// Plans `replicas` copies of every shard on `workers` with the fewest moves.
/// When keeping every current assignment leaves no way to cover the model,
/// it plans again from scratch (a swap may fit where moves one by one do not).
pub fn plan(
    shards: &[ShardSpec],
    workers: &[WorkerView],
    replicas: usize,
) -> Result<Plan, PlanError> {
    let first = plan_keeping(shards, workers, replicas);
    if first.is_ok() || workers.iter().all(|w| w.serving.is_none() || w.frozen) {
        return first;
    }
    let fresh: Vec<WorkerView> = workers
        .iter()
        .map(|w| WorkerView {
            serving: if w.frozen { w.serving.clone() } else { None },
            ..w.clone()
        })
        .collect();
    match plan_keeping(shards, &fresh, replicas) {
        Ok(mut p) => {
            // Moves relative to what the workers serve now.
            p.moves.retain_mut(|m| {
                let now = workers
                    .iter()
                    .find(|w| w.addr == m.addr)
                    .and_then(|w| w.serving.clone());
                m.from = now.clone();
                now.as_deref() != Some(m.to.as_str())
            });
            Ok(p)
        }
        Err(_) => first,
    }
}

fn plan_keeping(
    shards: &[ShardSpec],
    workers: &[WorkerView],
    replicas: usize,
) -> Result<Plan, PlanError> {
    if workers.is_empty() {
        return Err(PlanError::NoWorkers(shards.len()));
    }
    let replicas = replicas.max(1);
    let spec = |id: &str| shards.iter().find(|s| s.id == id);
    let fits = |w: &WorkerView, s: &ShardSpec| {
        w.budget >= required_bytes(s.size) && !w.refused.contains(&s.id)
    };
    let mut plan = Plan::default();
    let mut count: BTreeMap<String, usize> = shards.iter().map(|s| (s.id.clone(), 0)).collect();
    // Keep whoever already serves a shard of this model that fits.
    let mut free: Vec<&WorkerView> = Vec::new();
    for w in workers {
        match w.serving.as_deref().and_then(spec) {
            Some(s) if fits(w, s) || w.frozen => {
                plan.assignment.insert(w.addr.clone(), s.id.clone());
                *count.entry(s.id.clone()).or_default() += 1;
            }
            _ if w.frozen => {}
            _ => free.push(w),
        }
    }
    // Largest offers first; the address breaks ties so plans are stable.
    free.sort_by(|a, b| b.budget.cmp(&a.budget).then(a.addr.cmp(&b.addr)));
    let mut by_size: Vec<&ShardSpec> = shards.iter().collect();
    by_size.sort_by(|a, b| b.size.cmp(&a.size).then(a.id.cmp(&b.id)));

    let assign = |plan: &mut Plan, w: &WorkerView, s: &ShardSpec| {
        plan.assignment.insert(w.addr.clone(), s.id.clone());
        plan.moves.push(Move {
            addr: w.addr.clone(),
            from: w.serving.clone(),
            to: s.id.clone(),
        });
    };

    // 1. Every shard gets one worker: the largest shards the largest workers.
    for s in &by_size {
        if count[&s.id] > 0 {
            continue;
        }
        if let Some(i) = free.iter().position(|w| fits(w, s)) {
            let w = free.remove(i);
            assign(&mut plan, w, s);
            *count.entry(s.id.clone()).or_default() += 1;
            continue;
        }
        // Take a surplus replica of another shard (largest offer first).
        let donor = workers
            .iter()
            .filter(|w| !w.frozen && fits(w, s))
            .filter(|w| {
                plan.assignment
                    .get(&w.addr)
                    .is_some_and(|cur| count.get(cur).copied().unwrap_or(0) > 1)
            })
            .max_by(|a, b| a.budget.cmp(&b.budget).then(b.addr.cmp(&a.addr)));
        if let Some(w) = donor {
            if let Some(old) = plan.assignment.get(&w.addr).cloned()
                && let Some(c) = count.get_mut(&old)
            {
                *c -= 1;
            }
            plan.moves.retain(|m| m.addr != w.addr);
            assign(&mut plan, w, s);
            *count.entry(s.id.clone()).or_default() += 1;
            continue;
        }
        let uncovered: Vec<&&ShardSpec> = by_size.iter().filter(|x| count[&x.id] == 0).collect();
        let busy = workers.len() - free.len();
        if free.is_empty() && busy < shards.len() {
            let missing = uncovered
                .iter()
                .map(|x| {
                    format!(
                        "shard {} (layers {}-{}, needs {} MiB) has no worker",
                        x.id,
                        x.layer_start,
                        x.layer_end,
                        mib(required_bytes(x.size))
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            return Err(PlanError::NotEnoughWorkers {
                shards: shards.len(),
                workers: workers.len(),
                missing,
                more: uncovered.len(),
            });
        }
        let refused_by: Vec<&str> = workers
            .iter()
            .filter(|w| w.refused.contains(&s.id) && w.budget >= required_bytes(s.size))
            .map(|w| w.addr.as_str())
            .collect();
        if !refused_by.is_empty() {
            return Err(PlanError::Refused {
                shard: s.id.clone(),
                workers: refused_by.join(", "),
            });
        }
        return Err(PlanError::DoesNotFit {
            shard: s.id.clone(),
            layers: format!("{}-{}", s.layer_start, s.layer_end),
            need_mib: mib(required_bytes(s.size)),
            largest_mib: mib(free
                .first()
                .map(|w| w.budget)
                .or_else(|| workers.iter().map(|w| w.budget).max())
                .unwrap_or(0)),
        });
    }

    // 2. Replicas up to the factor, fewest first, larger shards first.
    // 3. Then spare workers: extra replicas where they fit, fewest first.
    while let Some(i) = (0..free.len()).find(|&i| by_size.iter().any(|s| fits(free[i], s))) {
        let w = free.remove(i);
        if let Some(s) = by_size
            .iter()
            .filter(|s| fits(w, s))
            .min_by_key(|s| count[&s.id])
        {
            assign(&mut plan, w, s);
            *count.entry(s.id.clone()).or_default() += 1;
        }
    }
    plan.short = by_size
        .iter()
        .filter(|s| count[&s.id] < replicas)
        .map(|s| s.id.clone())
        .collect();
    plan.replicas = count;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn shards(sizes: &[u64]) -> Vec<ShardSpec> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &mb)| ShardSpec {
                id: format!("s{i}"),
                layer_start: i as u32 * 10,
                layer_end: i as u32 * 10 + 9,
                size: mb * MIB,
            })
            .collect()
    }

    fn w(addr: &str, mb: u64, serving: Option<&str>) -> WorkerView {
        WorkerView {
            addr: addr.into(),
            budget: mb * MIB,
            serving: serving.map(String::from),
            refused: vec![],
            frozen: false,
        }
    }

    #[test]
    fn a_shard_a_worker_refused_goes_elsewhere_and_it_gets_another() {
        let s = shards(&[20, 60]);
        // b, the largest, refused s1 (no room on its disk): s1 goes to a.
        let mut b = w("b", 2000, None);
        b.refused = vec!["s1".into()];
        let p = plan(&s, &[w("a", 1000, None), b.clone()], 1).unwrap();
        assert_eq!(
            (p.assignment["a"].as_str(), p.assignment["b"].as_str()),
            ("s1", "s0")
        );
        // Refused by the only worker with the memory for it: named so.
        let e = plan(&s, &[w("a", 100, None), b], 1).unwrap_err();
        assert!(
            matches!(&e, PlanError::Refused { shard, workers } if shard == "s1" && workers == "b"),
            "{e}"
        );
    }

    #[test]
    fn largest_shard_to_largest_worker_then_replicas_then_spares() {
        let s = shards(&[20, 60]);
        let ws = [w("a", 500, None), w("b", 2000, None), w("c", 1000, None)];
        let p = plan(&s, &ws, 1).unwrap();
        assert_eq!(p.assignment["b"], "s1", "the big shard on the big worker");
        assert_eq!(p.assignment["c"], "s0");
        // The spare worker gets an extra replica.
        assert_eq!(p.assignment.len(), 3);
        assert_eq!(p.moves.len(), 3);
        assert!(p.short.is_empty());
        assert_eq!(p.replicas.values().sum::<usize>(), 3);
    }

    #[test]
    fn replication_factor_is_met_before_spares_and_shortfalls_are_named() {
        let s = shards(&[20, 20]);
        let ws = [w("a", 500, None), w("b", 500, None), w("c", 500, None)];
        let p = plan(&s, &ws, 2).unwrap();
        assert_eq!(
            p.replicas
                .values()
                .copied()
                .collect::<Vec<_>>()
                .iter()
                .sum::<usize>(),
            3
        );
        assert_eq!(p.short.len(), 1, "{p:?}");
    }

    #[test]
    fn a_stable_cluster_needs_no_move_and_a_joiner_gets_a_replica() {
        let s = shards(&[20, 60]);
        let ws = [w("a", 1000, Some("s0")), w("b", 1000, Some("s1"))];
        let p = plan(&s, &ws, 1).unwrap();
        assert!(p.moves.is_empty(), "{p:?}");
        let ws = [
            w("a", 1000, Some("s0")),
            w("b", 1000, Some("s1")),
            w("new", 1000, None),
        ];
        let p = plan(&s, &ws, 1).unwrap();
        assert_eq!(
            p.moves,
            vec![Move {
                addr: "new".into(),
                from: None,
                to: "s1".into()
            }],
            "one move, the joiner only (ties: the larger shard)"
        );
    }

    #[test]
    fn a_lost_shard_is_taken_over_by_a_surplus_replica_with_one_move() {
        let s = shards(&[20, 60]);
        // s0's only worker left; b and c both serve s1.
        let ws = [w("b", 1000, Some("s1")), w("c", 900, Some("s1"))];
        let p = plan(&s, &ws, 1).unwrap();
        assert_eq!(p.moves.len(), 1, "{p:?}");
        assert_eq!(p.moves[0].to, "s0");
        assert_eq!(p.moves[0].from.as_deref(), Some("s1"));
        assert_eq!(p.replicas["s0"], 1);
        assert_eq!(p.replicas["s1"], 1);
    }

    #[test]
    fn plans_that_cannot_cover_the_model_say_what_is_missing() {
        let s = shards(&[20, 60, 20]);
        let e = plan(&s, &[w("a", 1000, None), w("b", 1000, None)], 1).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, PlanError::NotEnoughWorkers { more: 1, .. }),
            "{msg}"
        );
        assert!(
            msg.contains("3 shards") && msg.contains("has no worker"),
            "{msg}"
        );
        // Enough workers, but the big shard fits none of them.
        let e = plan(
            &shards(&[20, 600]),
            &[w("a", 300, None), w("b", 300, None)],
            1,
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, PlanError::DoesNotFit { .. }), "{msg}");
        assert!(
            msg.contains("s1") && msg.contains("814 MiB") && msg.contains("300 MiB"),
            "{msg}"
        );
        assert_eq!(plan(&s, &[], 1).unwrap_err(), PlanError::NoWorkers(3));
    }

    #[test]
    fn a_swap_covers_what_moves_one_by_one_cannot() {
        // The big worker keeps the small shard; the small worker cannot
        // take the big one: swap them rather than refuse.
        let s = shards(&[20, 600]);
        let ws = [w("big", 1000, Some("s0")), w("small", 200, None)];
        let p = plan(&s, &ws, 1).unwrap();
        assert_eq!(p.assignment["big"], "s1");
        assert_eq!(p.assignment["small"], "s0");
        assert_eq!(p.moves.len(), 2);
        assert_eq!(
            p.moves
                .iter()
                .find(|m| m.addr == "big")
                .unwrap()
                .from
                .as_deref(),
            Some("s0")
        );
    }

    #[test]
    fn frozen_workers_keep_their_shard_and_get_nothing() {
        let s = shards(&[20, 60]);
        let mut missed = w("a", 1000, Some("s0"));
        missed.frozen = true;
        let mut failed = w("c", 1000, None);
        failed.frozen = true;
        let ws = [missed, w("b", 1000, Some("s1")), failed];
        let p = plan(&s, &ws, 1).unwrap();
        assert!(p.moves.is_empty(), "{p:?}");
        assert_eq!(p.assignment.get("c"), None);
    }

    #[test]
    fn a_worker_serving_a_shard_that_no_longer_fits_is_moved() {
        let s = shards(&[20, 60]);
        let ws = [w("a", 100, Some("s1")), w("b", 1000, None)];
        let p = plan(&s, &ws, 1).unwrap();
        assert_eq!(p.assignment["b"], "s1");
        assert_eq!(p.assignment["a"], "s0");
    }
}
