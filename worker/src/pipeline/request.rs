//! A request to generate, what it streams back (chunks, then statistics),
//! and what it has produced so far, kept across routes when a stage fails.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use llama_cluster_engine::sampling::{SamplingParams, TokenLogprobs};
use llama_cluster_engine::vocab::TextStream;
use tokio::sync::mpsc;
use tracing::debug;

use super::ModelInfo;
use super::stop::StopScan;
use crate::net::frame::ActivationResponse;

/// Default number of tokens to generate.
pub const DEFAULT_MAX_TOKENS: u32 = 128;

#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    /// Empty: the model of this worker's manifest.
    pub model: String,
    pub prompt: String,
    /// Apply the model's chat template to `prompt` as one user message.
    pub chat: bool,
    /// 0: [`DEFAULT_MAX_TOKENS`].
    pub max_tokens: u32,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub return_prompt_logits: bool,
    /// Do not stop at end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
    /// A whole conversation (role, content); when set, `prompt` is ignored.
    pub messages: Vec<(String, String)>,
    /// Tokens already generated and delivered for this request by another
    /// driver that failed: generation resumes after them (their text is
    /// not sent again).
    pub resume: Vec<i32>,
}

/// A piece of the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub text: String,
    pub token_ids: Vec<i32>,
    /// One per token id, when the request asked for log-probabilities.
    pub logprobs: Vec<TokenLogprob>,
}

/// A generated token's log-probability, with the most likely tokens at its
/// step (their own `top` empty).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenLogprob {
    pub token_id: i32,
    /// The token's bytes (special tokens rendered empty).
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, Default)]
pub struct GenStats {
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub ttft_ms: f64,
    pub tokens_per_second: f64,
    pub route: Vec<String>,
    pub finish_reason: String,
    pub prompt_logits: Vec<f32>,
    pub bytes_per_token_per_hop: u64,
    pub total_ms: f64,
}

/// What does not change while a request runs.
pub(super) struct Run<'a> {
    pub(super) req: &'a GenerateRequest,
    pub(super) info: &'a ModelInfo,
    pub(super) prompt_len: usize,
    pub(super) max_tokens: usize,
    pub(super) n_ctx: usize,
    pub(super) tx: mpsc::Sender<Chunk>,
    pub(super) t0: Instant,
}

/// Log-probability entries waiting for their token's text to go out: an
/// entry goes with the chunk whose text completes its token, and those of
/// tokens a stop string cuts off are never sent, so that the entries' tokens
/// spell the text a client gets.
#[derive(Debug, Default)]
pub(super) struct LogprobQueue {
    /// Each entry with the bytes of all tokens up to its own.
    waiting: VecDeque<(usize, TokenLogprob)>,
    /// Bytes of the tokens so far.
    pieces: usize,
    /// Bytes of the text sent so far.
    sent: usize,
}

impl LogprobQueue {
    /// A token of `n` bytes, and its entry when it has one.
    pub(super) fn token(&mut self, n: usize, entry: Option<TokenLogprob>) {
        self.pieces += n;
        if let Some(e) = entry {
            self.waiting.push_back((self.pieces, e));
        }
    }

    /// `n` more bytes of text go out: the entries whose tokens they complete.
    pub(super) fn sent(&mut self, n: usize) -> Vec<TokenLogprob> {
        self.sent += n;
        let mut out = vec![];
        while self
            .waiting
            .front()
            .is_some_and(|(end, _)| *end <= self.sent)
        {
            if let Some((_, e)) = self.waiting.pop_front() {
                out.push(e);
            }
        }
        out
    }
}

/// What a request has produced so far (kept across routes).
pub(super) struct State {
    /// Prompt, then every generated token (the last one not yet in any KV
    /// cache once generation started).
    pub(super) tokens: Vec<i32>,
    pub(super) generated: usize,
    pub(super) stream: TextStream,
    pub(super) scan: StopScan,
    pub(super) ttft: Option<Duration>,
    pub(super) prompt_logits: Vec<f32>,
    pub(super) steps: u64,
    pub(super) step_us: u64,
    pub(super) hop_compute_us: Vec<u64>,
    pub(super) bytes_per_hop: u64,
    pub(super) decode_started: Option<Instant>,
    pub(super) logprobs: LogprobQueue,
}

impl State {
    /// A token whose text a client already has (a resumed request).
    pub(super) fn replay(&mut self, run: &Run<'_>, t: i32) {
        self.tokens.push(t);
        self.generated += 1;
        let bytes = run.info.vocab.piece(t);
        self.logprobs.token(bytes.len(), None);
        let piece = self.stream.push(&bytes);
        let text = self.scan.push(&piece).0;
        self.logprobs.sent(text.len());
    }

    /// Takes a sampled token (with its log-probabilities, when asked):
    /// sends its text; `Some` when the request ends.
    pub(super) async fn accept(
        &mut self,
        run: &Run<'_>,
        next: i32,
        logprobs: Option<TokenLogprobs>,
    ) -> Option<&'static str> {
        if !run.req.ignore_eos && run.info.vocab.is_eog(next) {
            return Some("stop");
        }
        self.tokens.push(next);
        self.generated += 1;
        crate::metrics::metrics().tokens_generated.inc();
        let vocab = &run.info.vocab;
        let bytes = vocab.piece(next);
        let entry = logprobs.map(|l| TokenLogprob {
            token_id: next,
            bytes: bytes.clone(),
            logprob: l.logprob,
            top: l
                .top
                .iter()
                .map(|&(token_id, logprob)| TokenLogprob {
                    token_id,
                    bytes: vocab.piece(token_id),
                    logprob,
                    top: vec![],
                })
                .collect(),
        });
        self.logprobs.token(bytes.len(), entry);
        let piece = self.stream.push(&bytes);
        let (text, stopped) = self.scan.push(&piece);
        let logprobs = self.logprobs.sent(text.len());
        if run
            .tx
            .send(Chunk {
                text,
                token_ids: vec![next],
                logprobs,
            })
            .await
            .is_err()
        {
            return Some("cancelled");
        }
        if stopped {
            return Some("stop");
        }
        if self.generated >= run.max_tokens {
            return Some("length");
        }
        if self.tokens.len() > run.n_ctx {
            return Some("context");
        }
        None
    }

    pub(super) fn note_step(&mut self, r: &ActivationResponse, took: Duration) {
        self.steps += 1;
        self.step_us += took.as_micros() as u64;
        self.hop_compute_us
            .resize(self.hop_compute_us.len().max(r.hops.len()), 0);
        for (sum, h) in self.hop_compute_us.iter_mut().zip(&r.hops) {
            *sum += h.compute_us;
        }
        self.bytes_per_hop = r
            .hops
            .iter()
            .map(|h| h.bytes_in as u64)
            .max()
            .unwrap_or(0)
            .max(self.bytes_per_hop);
    }

    pub(super) fn stats(
        &mut self,
        run: &Run<'_>,
        finish: &'static str,
        route: Vec<String>,
    ) -> GenStats {
        let decode = self
            .decode_started
            .map(|t| t.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        let steps = self.steps.max(1);
        let compute: u64 = self.hop_compute_us.iter().sum();
        debug!(
            "[PIPELINE] decode: {} steps of {} us, llama.cpp {} us (per stage {:?}), the rest {} us",
            steps,
            self.step_us / steps,
            compute / steps,
            self.hop_compute_us
                .iter()
                .map(|c| c / steps)
                .collect::<Vec<_>>(),
            self.step_us.saturating_sub(compute) / steps
        );
        GenStats {
            prompt_tokens: run.prompt_len as u32,
            generated_tokens: self.generated as u32,
            ttft_ms: self.ttft.unwrap_or_default().as_secs_f64() * 1000.0,
            tokens_per_second: if self.steps > 0 && decode > 0.0 {
                self.steps as f64 / decode
            } else {
                0.0
            },
            route,
            finish_reason: finish.into(),
            prompt_logits: std::mem::take(&mut self.prompt_logits),
            bytes_per_token_per_hop: self.bytes_per_hop,
            total_ms: run.t0.elapsed().as_secs_f64() * 1000.0,
        }
    }
}
