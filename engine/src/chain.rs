//! An in-process pipeline of stages (no network): used to check a split
//! against the unsplit model and as a reference in benchmarks. The networked
//! pipeline in the worker runs the same steps with one hop per stage.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::baseline::GreedyRun;
use crate::manifest::Manifest;
use crate::sampling::SamplingParams;
use crate::stage::{ForwardRequest, StageEngine, StageInput, StageSpec};
use crate::{EngineError, EngineSettings, Result};

pub struct LocalChain {
    pub stages: Vec<StageEngine>,
    settings: EngineSettings,
    next_session: u64,
}

impl LocalChain {
    /// Loads the manifest's shards, in the given order (indices into
    /// `manifest.shards`; the natural order is `0..n`).
    pub fn load(
        manifest_path: &Path,
        order: &[usize],
        settings: EngineSettings,
    ) -> Result<LocalChain> {
        let m = Manifest::load(manifest_path)?;
        let n = order.len();
        let head = Manifest::path_of(manifest_path, &m.head.file);
        let stages = order
            .iter()
            .enumerate()
            .map(|(pos, &i)| {
                let shard = m
                    .shards
                    .get(i)
                    .ok_or_else(|| EngineError::InvalidInput(format!("no shard {i}")))?;
                StageEngine::start(StageSpec {
                    shard_path: Manifest::path_of(manifest_path, &shard.file.file),
                    head_path: Some(head.clone()),
                    is_first: pos == 0,
                    is_last: pos + 1 == n,
                    settings,
                    max_sessions: 4,
                    idle_timeout: Duration::from_secs(600),
                    kv_budget_bytes: 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LocalChain {
            stages,
            settings,
            next_session: 1,
        })
    }

    /// One step through every stage; returns (token, logits of the last token).
    fn step(
        &self,
        session: u64,
        pos0: u32,
        tokens: &[i32],
        want_logits: bool,
    ) -> Result<(Option<i32>, Option<Vec<f32>>)> {
        let mut input = StageInput::Tokens(tokens.to_vec());
        let n = self.stages.len();
        for (i, st) in self.stages.iter().enumerate() {
            let r = st.forward_blocking(ForwardRequest {
                session,
                pos0,
                input,
                sampling: Some(SamplingParams::default()),
                history: vec![],
                want_logits,
                sample: i + 1 == n,
                span: tracing::Span::none(),
                depth: n as u32,
            })?;
            if i + 1 == n {
                return Ok((r.token, r.logits));
            }
            input = StageInput::Hidden(r.hidden);
        }
        Err(EngineError::InvalidInput("empty chain".into()))
    }

    /// Greedy continuation, prompt fed in chunks of `n_batch` (as the baseline).
    pub fn greedy(&mut self, prompt: &[i32], n_gen: usize) -> Result<GreedyRun> {
        let session = self.next_session;
        self.next_session += 1;
        let t0 = Instant::now();
        let mut pos = 0u32;
        let mut last = (None, None);
        let chunks: Vec<&[i32]> = prompt.chunks(self.settings.n_batch as usize).collect();
        for (ci, chunk) in chunks.iter().enumerate() {
            let is_last = ci + 1 == chunks.len();
            last = self.step(session, pos, chunk, is_last)?;
            pos += chunk.len() as u32;
        }
        let prompt_time = t0.elapsed();
        let (first, logits) = last;
        let mut tokens = vec![first.ok_or_else(|| EngineError::Llama("no token".into()))?];
        let t1 = Instant::now();
        while tokens.len() < n_gen {
            let prev = *tokens.last().unwrap_or(&0);
            let (t, _) = self.step(session, pos, &[prev], false)?;
            pos += 1;
            tokens.push(t.ok_or_else(|| EngineError::Llama("no token".into()))?);
        }
        let decode_time = t1.elapsed();
        for st in &self.stages {
            st.close(session);
        }
        Ok(GreedyRun {
            tokens,
            prompt_logits: logits.unwrap_or_default(),
            prompt_time,
            decode_time,
        })
    }
}

/// Largest absolute difference of two equally long vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
