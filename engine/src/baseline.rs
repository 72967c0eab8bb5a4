//! The unsplit model in one process through the safe llama-cpp-2 API, with
//! the same settings as the stages: the reference that sharded output must
//! equal, and the single-node baseline of the benchmarks.

use std::num::NonZeroU32;
use std::path::Path;
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::token::LlamaToken;

use crate::sampling::argmax;
use crate::{EngineError, EngineSettings, Result};

/// Result of a greedy run.
#[derive(Debug, Clone)]
pub struct GreedyRun {
    /// Generated tokens (the first comes from the prompt's logits).
    pub tokens: Vec<i32>,
    /// Logits of the prompt's last token.
    pub prompt_logits: Vec<f32>,
    pub prompt_time: Duration,
    /// Time of the decode steps after the first token.
    pub decode_time: Duration,
}

pub struct Baseline {
    model: LlamaModel,
    settings: EngineSettings,
}

impl Baseline {
    pub fn load(path: &Path, settings: EngineSettings) -> Result<Baseline> {
        let backend = crate::backend()?;
        let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        Ok(Baseline { model, settings })
    }

    pub fn tokenize(&self, text: &str) -> Vec<i32> {
        let v = self.model.vocab();
        v.tokenize(text.as_bytes(), v.should_add_bos(), true)
            .iter()
            .map(|t| t.0)
            .collect()
    }

    /// Greedy continuation of `prompt` for `n_gen` tokens; the prompt is fed
    /// in chunks of `n_batch`, as the pipeline does.
    pub fn greedy(&self, prompt: &[i32], n_gen: usize) -> Result<GreedyRun> {
        self.greedy_with(prompt, n_gen, |_, _| {})
    }

    /// [`Baseline::greedy`] with `adjust(tokens so far, logits)` applied to
    /// the logits before each pick (a reference for the samplers' penalties).
    pub fn greedy_with(
        &self,
        prompt: &[i32],
        n_gen: usize,
        mut adjust: impl FnMut(&[i32], &mut [f32]),
    ) -> Result<GreedyRun> {
        let backend = crate::backend()?;
        let s = self.settings;
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(s.n_ctx))
            .with_n_batch(s.n_batch)
            .with_n_ubatch(s.n_ubatch)
            .with_n_seq_max(1)
            .with_n_threads(s.threads)
            .with_n_threads_batch(s.threads);
        let mut ctx = self
            .model
            .new_context(backend, params)
            .map_err(|e| EngineError::Llama(e.to_string()))?;
        let llama = |e: &dyn std::fmt::Display| EngineError::Llama(e.to_string());
        let mut batch = LlamaBatch::new(s.n_batch as usize, 1);
        let t0 = Instant::now();
        let mut pos = 0;
        for chunk in prompt.chunks(s.n_batch as usize) {
            batch.clear();
            for (i, &t) in chunk.iter().enumerate() {
                let is_last = pos + i + 1 == prompt.len();
                batch
                    .add(LlamaToken(t), (pos + i) as i32, &[0], is_last)
                    .map_err(|e| llama(&e))?;
            }
            ctx.decode(&mut batch).map_err(|e| llama(&e))?;
            pos += chunk.len();
        }
        let prompt_logits = ctx.get_logits_ith(batch.n_tokens() - 1).to_vec();
        let prompt_time = t0.elapsed();
        let mut seen = prompt.to_vec();
        let mut pick = |logits: &[f32], seen: &mut Vec<i32>| {
            let mut l = logits.to_vec();
            adjust(seen, &mut l);
            let t = argmax(&l);
            seen.push(t);
            t
        };
        let mut tokens = vec![pick(&prompt_logits, &mut seen)];
        let t1 = Instant::now();
        while tokens.len() < n_gen {
            batch.clear();
            let last = *tokens.last().unwrap_or(&0);
            batch
                .add(LlamaToken(last), pos as i32, &[0], true)
                .map_err(|e| llama(&e))?;
            ctx.decode(&mut batch).map_err(|e| llama(&e))?;
            pos += 1;
            tokens.push(pick(ctx.get_logits_ith(0), &mut seen));
        }
        Ok(GreedyRun {
            tokens,
            prompt_logits,
            prompt_time,
            decode_time: t1.elapsed(),
        })
    }

    pub fn is_eog(&self, token: i32) -> bool {
        self.model.vocab().is_eog(LlamaToken(token))
    }

    pub fn piece(&self, token: i32) -> Vec<u8> {
        self.model
            .vocab()
            .token_to_piece(LlamaToken(token), false, None)
    }
}
