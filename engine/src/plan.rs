//! How to cut a model's layers into shards: equal layer counts, explicit
//! ranges, or (what `split --shards N` uses) contiguous ranges balanced by
//! bytes, elements or measured time, the head counted on the last shard.

use crate::{EngineError, Result};

/// How to cut the layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitPlan {
    /// This many shards of (nearly) equal layer counts (by bytes, with
    /// [`SplitPlan::ranges_by_bytes`]).
    Count(u32),
    /// This many shards whose compute per token balances: weights counted
    /// in elements, whatever their type, and the last shard carrying the
    /// output head (not the embedding table, which the first stage only
    /// looks rows up in). Pipelines run as fast as their slowest stage.
    ComputeCount(u32),
    /// This many shards whose time per step balances, each layer and the
    /// head timed with llama.cpp on this machine (see [`crate::profile`])
    /// in steps of `sessions` sessions: what a stage decodes at once under
    /// load. The head's time per step hardly grows with the sessions
    /// (SmolLM2's: 7.9 ms for 4, 9.2 for 8), so the fewer they are, the
    /// more layers the first shards take.
    Measured { shards: u32, sessions: u32 },
    /// Explicit inclusive ranges, covering every layer in order.
    Ranges(Vec<(u32, u32)>),
}

impl SplitPlan {
    /// The ranges for a model of `n_layer` layers.
    pub fn ranges(&self, n_layer: u32) -> Result<Vec<(u32, u32)>> {
        let ranges = match self {
            SplitPlan::Count(0)
            | SplitPlan::ComputeCount(0)
            | SplitPlan::Measured { shards: 0, .. } => {
                return Err(EngineError::InvalidInput(
                    "shard count must be at least 1".into(),
                ));
            }
            SplitPlan::Count(n)
            | SplitPlan::ComputeCount(n)
            | SplitPlan::Measured { shards: n, .. }
                if *n > n_layer =>
            {
                return Err(EngineError::InvalidInput(format!(
                    "cannot cut {n_layer} layers into {n} shards"
                )));
            }
            SplitPlan::Count(n)
            | SplitPlan::ComputeCount(n)
            | SplitPlan::Measured { shards: n, .. } => {
                let (base, extra) = (n_layer / n, n_layer % n);
                let mut start = 0;
                (0..*n)
                    .map(|i| {
                        let len = base + u32::from(i < extra);
                        let r = (start, start + len - 1);
                        start += len;
                        r
                    })
                    .collect()
            }
            SplitPlan::Ranges(r) => r.clone(),
        };
        let mut next = 0;
        for &(a, b) in &ranges {
            if a != next || b < a {
                return Err(EngineError::InvalidInput(format!(
                    "layer ranges must cover 0-{} in order without gaps; got {a}-{b} where {next}-… was expected",
                    n_layer.saturating_sub(1)
                )));
            }
            next = b + 1;
        }
        if next != n_layer {
            return Err(EngineError::InvalidInput(format!(
                "layer ranges end at {} but the model has layers 0-{}",
                next.saturating_sub(1),
                n_layer - 1
            )));
        }
        Ok(ranges)
    }

    /// The ranges for a model whose layer `i` weighs `layer_bytes[i]`:
    /// `Count(n)` gives the contiguous ranges whose largest shard (the last
    /// one carrying `last_extra` more: output norm, head, full embeddings)
    /// is as small as possible; `Ranges` are checked and kept.
    /// Shards start at multiples of `align` (1: anywhere).
    pub fn ranges_by_bytes(
        &self,
        layer_bytes: &[u64],
        last_extra: u64,
        align: u32,
    ) -> Result<Vec<(u32, u32)>> {
        let n_layer = layer_bytes.len() as u32;
        let align = align.max(1);
        match self {
            SplitPlan::Count(n)
            | SplitPlan::ComputeCount(n)
            | SplitPlan::Measured { shards: n, .. }
                if *n >= 1 && *n <= n_layer.div_ceil(align) =>
            {
                let r = balance(layer_bytes, *n as usize, last_extra, align as usize);
                SplitPlan::Ranges(r).ranges(n_layer)
            }
            SplitPlan::Count(n)
            | SplitPlan::ComputeCount(n)
            | SplitPlan::Measured { shards: n, .. }
                if *n >= 1 && *n <= n_layer =>
            {
                Err(EngineError::InvalidInput(format!(
                    "cannot cut {n_layer} layers into {n} shards starting at multiples of {align}"
                )))
            }
            _ => self.ranges(n_layer),
        }
    }
}

/// Bytes of each shard of `ranges`, the last carrying `last_extra` more.
pub fn shard_bytes(ranges: &[(u32, u32)], layer_bytes: &[u64], last_extra: u64) -> Vec<u64> {
    ranges
        .iter()
        .enumerate()
        .map(|(i, &(a, b))| {
            let layers = layer_bytes[a as usize..=b as usize]
                .iter()
                .fold(0u64, |s, &x| s.saturating_add(x));
            layers.saturating_add(if i + 1 == ranges.len() { last_extra } else { 0 })
        })
        .collect()
}

/// Contiguous partition of the layers into `k` non-empty ranges, each
/// starting at a multiple of `align`, minimising the largest shard (linear
/// partition by dynamic programming; ties go to the earliest cut). Needs
/// `k <= ceil(n / align)`.
fn balance(w: &[u64], k: usize, last_extra: u64, align: usize) -> Vec<(u32, u32)> {
    let n = w.len();
    let mut prefix = vec![0u64; n + 1];
    for i in 0..n {
        // Saturating: the sums stay ordered, so differences do not wrap.
        prefix[i + 1] = prefix[i].saturating_add(w[i]);
    }
    let sum = |a: usize, b: usize| prefix[b] - prefix[a]; // layers a..b
    // best[j][i]: smallest largest shard of layers 0..i in j ranges; cut[j][i]: start of the j-th.
    let mut best = vec![vec![u64::MAX; n + 1]; k + 1];
    let mut cut = vec![vec![0usize; n + 1]; k + 1];
    best[0][0] = 0;
    for j in 1..=k {
        for i in j..=n {
            let extra = if j == k && i == n { last_extra } else { 0 };
            for p in (j - 1)..i {
                if best[j - 1][p] == u64::MAX || p % align != 0 {
                    continue;
                }
                let cost = best[j - 1][p].max(sum(p, i).saturating_add(extra));
                if cost < best[j][i] {
                    best[j][i] = cost;
                    cut[j][i] = p;
                }
            }
        }
    }
    let mut ranges = Vec::with_capacity(k);
    let mut i = n;
    for j in (1..=k).rev() {
        let p = cut[j][i];
        ranges.push((p as u32, i as u32 - 1));
        i = p;
    }
    ranges.reverse();
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_plans_cover_all_layers() {
        assert_eq!(
            SplitPlan::Count(3).ranges(30).unwrap(),
            vec![(0, 9), (10, 19), (20, 29)]
        );
        assert_eq!(
            SplitPlan::Count(4).ranges(30).unwrap(),
            vec![(0, 7), (8, 15), (16, 22), (23, 29)]
        );
        assert_eq!(SplitPlan::Count(1).ranges(30).unwrap(), vec![(0, 29)]);
        assert!(SplitPlan::Count(0).ranges(30).is_err());
        assert!(SplitPlan::Count(31).ranges(30).is_err());
    }

    #[test]
    fn explicit_ranges_are_checked() {
        assert!(
            SplitPlan::Ranges(vec![(0, 14), (15, 29)])
                .ranges(30)
                .is_ok()
        );
        assert!(
            SplitPlan::Ranges(vec![(0, 14), (16, 29)])
                .ranges(30)
                .is_err()
        );
        assert!(SplitPlan::Ranges(vec![(0, 14)]).ranges(30).is_err());
        assert!(SplitPlan::Ranges(vec![(0, 30)]).ranges(30).is_err());
        assert!(SplitPlan::Ranges(vec![(1, 29)]).ranges(30).is_err());
    }

    #[test]
    fn byte_plans_balance_the_largest_shard() {
        // Equal layers, a head as big as four layers on the last shard.
        let w = vec![10u64; 12];
        let r = SplitPlan::Count(3).ranges_by_bytes(&w, 40, 1).unwrap();
        let b = shard_bytes(&r, &w, 40);
        assert_eq!(b.iter().max(), Some(&60), "{r:?} {b:?}");
        assert!(
            r[2].1 - r[2].0 < 3,
            "the last shard carries the head: {r:?}"
        );
        // Without a head: equal counts.
        let r = SplitPlan::Count(3).ranges_by_bytes(&w, 0, 1).unwrap();
        assert_eq!(r, vec![(0, 3), (4, 7), (8, 11)]);
        // One heavy layer gets a shard of its own.
        let w = vec![1, 1, 100, 1, 1];
        let r = SplitPlan::Count(3).ranges_by_bytes(&w, 0, 1).unwrap();
        assert_eq!(shard_bytes(&r, &w, 0).iter().max(), Some(&100));
        assert!(SplitPlan::Count(6).ranges_by_bytes(&w, 0, 1).is_err());
        assert!(SplitPlan::Count(0).ranges_by_bytes(&w, 0, 1).is_err());
        let explicit = SplitPlan::Ranges(vec![(0, 0), (1, 4)]);
        assert_eq!(
            explicit.ranges_by_bytes(&w, 0, 1).unwrap(),
            vec![(0, 0), (1, 4)]
        );
    }

    #[test]
    fn byte_plans_keep_alignment() {
        let w = vec![10u64; 10];
        let r = SplitPlan::Count(3).ranges_by_bytes(&w, 0, 4).unwrap();
        assert_eq!(r, vec![(0, 3), (4, 7), (8, 9)]);
        let r = SplitPlan::Count(2).ranges_by_bytes(&w, 50, 4).unwrap();
        assert!(r.iter().all(|&(a, _)| a % 4 == 0), "{r:?}");
        assert!(SplitPlan::Count(4).ranges_by_bytes(&w, 0, 4).is_err());
    }
}
