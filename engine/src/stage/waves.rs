//! Which sessions' steps one round of a stage runs together.
//!
//! On a route of D stages a stage runs its open sessions in D waves, so
//! that while it computes one wave the other stages compute the others.
//! A wave is a block of sessions with consecutive sequence ids: the open
//! sessions ranked by id, ⌈open / D⌉ to a block. llama.cpp gives every
//! sequence a KV stream of its own here and puts only consecutive ids in
//! one micro-batch, so a wave of scattered ids costs about as much as its
//! steps one by one. Blocks take turns: a session whose step arrives after
//! its block's turn waits for the next one, and from then on travels with
//! its block (the stages of a route open a session in the same order, so
//! they rank it alike).

use std::collections::{HashMap, HashSet};

/// The open sessions of a stage cut into blocks of consecutive sequence ids.
#[derive(Debug)]
pub(super) struct Waves {
    /// Sessions to a block.
    size: usize,
    /// Open sessions in each block.
    members: Vec<usize>,
    block_of: HashMap<u64, usize>,
}

impl Waves {
    /// `open`: (session, sequence id) of every open session; `depth`: the
    /// stages of their routes (1: one wave of all).
    pub(super) fn new(open: impl IntoIterator<Item = (u64, i32)>, depth: usize) -> Waves {
        let mut by_seq: Vec<(i32, u64)> = open.into_iter().map(|(id, s)| (s, id)).collect();
        by_seq.sort_unstable();
        let size = by_seq.len().div_ceil(depth.max(1)).max(1);
        let mut members = vec![0; by_seq.len().div_ceil(size).max(1)];
        let block_of = by_seq
            .iter()
            .enumerate()
            .map(|(rank, &(_, id))| {
                members[rank / size] += 1;
                (id, rank / size)
            })
            .collect();
        Waves {
            size,
            members,
            block_of,
        }
    }

    /// Single-token steps one round runs at most.
    pub(super) fn size(&self) -> usize {
        self.size
    }

    pub(super) fn count(&self) -> usize {
        self.members.len()
    }

    /// The block of an open session (`None`: not open here yet).
    pub(super) fn block_of(&self, session: u64) -> Option<usize> {
        self.block_of.get(&session).copied()
    }

    /// The block whose turn it is: `next` if one of its sessions has a
    /// single-token step waiting (`waiting`), else the first such block
    /// after it; `None` when no open session has one.
    pub(super) fn turn(
        &self,
        next: usize,
        waiting: impl IntoIterator<Item = u64>,
    ) -> Option<usize> {
        let mut has = vec![false; self.count()];
        for b in waiting.into_iter().filter_map(|s| self.block_of(s)) {
            has[b] = true;
        }
        (0..self.count())
            .map(|k| (next + k) % self.count())
            .find(|&b| has[b])
    }

    /// Whether every open session of `block` has a step waiting
    /// (`with_step`: the sessions that have one).
    pub(super) fn complete(&self, block: usize, with_step: &HashSet<u64>) -> bool {
        let n = with_step
            .iter()
            .filter(|s| self.block_of(**s) == Some(block))
            .count();
        n >= self.members.get(block).copied().unwrap_or(0)
    }
}

/// Runs of consecutive ids in `seqs` (increasing): the micro-batches
/// llama.cpp cuts a call of single-token steps into when every sequence
/// has a KV stream of its own (`split_equal` takes only consecutive ids).
pub(super) fn runs(seqs: impl IntoIterator<Item = i32>) -> usize {
    let mut n = 0;
    let mut prev = None;
    for s in seqs {
        if prev.is_none_or(|p: i32| p + 1 != s) {
            n += 1;
        }
        prev = Some(s);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_runs_of_consecutive_sequence_ids() {
        // Sessions 100..108 hold sequence ids 7..0: ranked by id.
        let w = Waves::new((0..8).map(|i| (100 + i as u64, 7 - i)), 2);
        assert_eq!((w.size(), w.count()), (4, 2));
        assert_eq!(w.block_of(107), Some(0), "sequence 0");
        assert_eq!(w.block_of(104), Some(0), "sequence 3");
        assert_eq!(w.block_of(103), Some(1), "sequence 4");
        assert_eq!(w.block_of(1), None);
        // 7 sessions over 3 stages: blocks of 3, 3 and 1.
        let w = Waves::new((0..7).map(|i| (i as u64, i)), 3);
        assert_eq!((w.size(), w.count()), (3, 3));
        // One stage: one block of all.
        let w = Waves::new((0..5).map(|i| (i as u64, i)), 1);
        assert_eq!((w.size(), w.count()), (5, 1));
        let w = Waves::new(std::iter::empty(), 2);
        assert_eq!((w.size(), w.count()), (1, 1));
    }

    #[test]
    fn blocks_take_turns_and_a_block_is_complete_when_all_its_sessions_wait() {
        let w = Waves::new((0..8).map(|i| (i as u64, i)), 2);
        // Steps of sessions 0, 2 (block 0) and 5 (block 1) are waiting.
        assert_eq!(w.turn(0, [0, 2, 5]), Some(0));
        assert_eq!(w.turn(1, [0, 2, 5]), Some(1));
        assert_eq!(w.turn(1, [0, 2]), Some(0), "block 1 has none waiting");
        assert_eq!(w.turn(0, [42]), None, "not open here");
        let with: HashSet<u64> = [0, 1, 2].into();
        assert!(!w.complete(0, &with));
        let with: HashSet<u64> = [0, 1, 2, 3, 4].into();
        assert!(w.complete(0, &with));
        assert!(!w.complete(1, &with));
    }

    #[test]
    fn runs_count_llama_cpp_micro_batches() {
        assert_eq!(runs([]), 0);
        assert_eq!(runs([3]), 1);
        assert_eq!(runs([0, 1, 2, 3]), 1);
        assert_eq!(runs([0, 1, 6, 7]), 2);
        assert_eq!(runs([0, 2, 4, 6]), 4);
    }
}
