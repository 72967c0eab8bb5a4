//! Driving one request: the worker that receives it tokenizes, plans a route
//! over the shard records, feeds the prompt through the stages in chunks,
//! then decodes token by token, streaming text back as it is produced.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use llama_cluster_engine::manifest::Manifest;
use llama_cluster_engine::sampling::SamplingParams;
use llama_cluster_engine::vocab::TextStream;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span};

use super::Pipeline;
use super::frame::{ActivationRequest, ActivationResponse, FrameKind, Hop, Payload, codes};
use super::host::PipelineError;
use super::route;

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
}

/// A piece of the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub text: String,
    pub token_ids: Vec<i32>,
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

/// Routes tried for one request when stages turn out dead before the first token.
const ROUTE_ATTEMPTS: u32 = 3;
/// How long a driver that finds no route looks for shard records in the
/// DHT before it answers "no route".
const ROUTE_LOOKUP: Duration = Duration::from_secs(3);

/// Why a session failed, and whether another route may do better.
struct Failure {
    error: PipelineError,
    retryable: bool,
}

impl From<PipelineError> for Failure {
    fn from(error: PipelineError) -> Self {
        Failure {
            error,
            retryable: false,
        }
    }
}

/// The peer named by a "stage … on <peer> did not answer" error.
fn unreachable_peer(msg: &str) -> Option<libp2p::PeerId> {
    let (before, _) = msg.split_once(" did not answer")?;
    before.rsplit(' ').next()?.parse().ok()
}

fn step_error(resp: &ActivationResponse) -> Option<PipelineError> {
    let (code, msg) = resp.error.clone()?;
    Some(match code {
        codes::INVALID => PipelineError::InvalidArgument(msg),
        codes::BUSY => PipelineError::ResourceExhausted(msg),
        codes::TIMEOUT => PipelineError::DeadlineExceeded(msg),
        codes::UNAVAILABLE | codes::ROUTE | codes::SESSION => PipelineError::Unavailable(msg),
        _ => PipelineError::Internal(msg),
    })
}

fn new_session_id() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// Holds back text that might be the start of a stop string.
struct StopScan {
    stops: Vec<String>,
    out: String,
    sent: usize,
}

impl StopScan {
    /// Adds text; returns (text safe to send, whether a stop string matched).
    fn push(&mut self, text: &str) -> (String, bool) {
        self.out.push_str(text);
        let from = self
            .sent
            .saturating_sub(self.stops.iter().map(|s| s.len()).max().unwrap_or(0));
        let from = (0..=from)
            .rev()
            .find(|&i| self.out.is_char_boundary(i))
            .unwrap_or(0);
        let hit = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.out[from..].find(s.as_str()).map(|p| p + from))
            .min();
        if let Some(pos) = hit {
            let pos = pos.max(self.sent);
            let send = self.out[self.sent..pos].to_string();
            self.sent = self.out.len();
            return (send, true);
        }
        let hold = self
            .stops
            .iter()
            .map(|s| s.len())
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        let mut safe = self.out.len().saturating_sub(hold).max(self.sent);
        while !self.out.is_char_boundary(safe) {
            safe -= 1;
        }
        let send = self.out[self.sent..safe].to_string();
        self.sent = safe;
        (send, false)
    }

    fn flush(&mut self) -> String {
        let s = self.out[self.sent..].to_string();
        self.sent = self.out.len();
        s
    }
}

impl Pipeline {
    /// A route once the shard records of `m` have been looked up in the DHT:
    /// a shard loaded a moment ago may not have reached this worker's view
    /// yet. Bounded by [`ROUTE_LOOKUP`]; `Err` says what is still missing.
    async fn plan_after_lookup(&self, m: &Manifest, missing: String) -> Result<Vec<Hop>, String> {
        let ids: Vec<String> = m.shards.iter().map(|s| s.id.clone()).collect();
        debug!("[PIPELINE] {missing}; looking up the model's shard records");
        let deadline = Instant::now() + ROUTE_LOOKUP;
        let mut missing = missing;
        let mut tick = 0u32;
        while Instant::now() < deadline {
            // Again every second: a record published while the first
            // lookup ran may have missed it.
            if tick.is_multiple_of(10) {
                self.0.net.query_shards(ids.clone());
            }
            tick += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            match route::plan(&self.0.state.snapshot().shards, &m.model, m.n_layer) {
                Ok(hops) => return Ok(hops),
                Err(e) => missing = e,
            }
        }
        Err(missing)
    }

    /// Runs a request to the end, sending chunks to `tx` as they come.
    pub async fn generate(
        &self,
        req: GenerateRequest,
        tx: mpsc::Sender<Chunk>,
    ) -> Result<GenStats, PipelineError> {
        let t0 = Instant::now();
        if req.messages.is_empty() && req.prompt.trim().is_empty() {
            return Err(PipelineError::InvalidArgument("prompt is empty".into()));
        }
        if let Some((role, _)) = req
            .messages
            .iter()
            .find(|(r, _)| !matches!(r.as_str(), "system" | "user" | "assistant"))
        {
            return Err(PipelineError::InvalidArgument(format!(
                "unknown message role {role:?}"
            )));
        }
        req.sampling
            .validate()
            .map_err(|e| PipelineError::InvalidArgument(e.to_string()))?;
        let info = self.model_info().await?;
        let m = &info.manifest;
        if !req.model.is_empty() && req.model != m.model {
            return Err(PipelineError::NotFound(format!(
                "unknown model {:?}; this worker drives {:?}",
                req.model, m.model
            )));
        }
        let text = if !req.messages.is_empty() {
            info.vocab
                .apply_chat_template(&req.messages)
                .map_err(|e| PipelineError::InvalidArgument(e.to_string()))?
        } else if req.chat {
            info.vocab
                .apply_chat_template(&[("user".into(), req.prompt.clone())])
                .map_err(|e| PipelineError::InvalidArgument(e.to_string()))?
        } else {
            req.prompt.clone()
        };
        let prompt = info.vocab.tokenize(&text);
        let n_ctx = self.0.cfg.engine.n_ctx as usize;
        if prompt.is_empty() {
            return Err(PipelineError::InvalidArgument(
                "prompt has no tokens".into(),
            ));
        }
        if prompt.len() >= n_ctx {
            return Err(PipelineError::InvalidArgument(format!(
                "prompt of {} tokens does not fit the context of {n_ctx} tokens",
                prompt.len()
            )));
        }
        let max_tokens = if req.max_tokens == 0 {
            DEFAULT_MAX_TOKENS
        } else {
            req.max_tokens
        } as usize;
        if max_tokens > n_ctx {
            return Err(PipelineError::InvalidArgument(format!(
                "max_tokens {max_tokens} exceeds the context of {n_ctx} tokens"
            )));
        }
        let mut session = new_session_id();
        let span = info_span!(
            "inference",
            otel.name = format_args!("{} {}", if req.chat || !req.messages.is_empty() { "chat" } else { "text_completion" }, m.model),
            session = format_args!("{session:016x}"),
            gen_ai.operation.name = if req.chat || !req.messages.is_empty() { "chat" } else { "text_completion" },
            gen_ai.system = "llama.cpp",
            gen_ai.request.model = %m.model,
            gen_ai.request.max_tokens = max_tokens,
            gen_ai.request.temperature = req.sampling.temperature as f64,
            gen_ai.request.top_p = req.sampling.top_p as f64,
            gen_ai.request.top_k = req.sampling.top_k as i64,
            gen_ai.usage.input_tokens = prompt.len(),
            gen_ai.usage.output_tokens = tracing::field::Empty,
            gen_ai.response.finish_reasons = tracing::field::Empty,
            route = tracing::field::Empty,
            stages = tracing::field::Empty,
        );
        // A stage found dead before the first token: another route, bounded.
        let mut attempt = 0;
        let (result, route_names) = loop {
            attempt += 1;
            let planned = {
                let _plan =
                    info_span!(parent: &span, "route_planning", layers = m.n_layer).entered();
                route::plan(&self.0.state.snapshot().shards, &m.model, m.n_layer)
            };
            let hops = match planned {
                Ok(hops) => hops,
                Err(e) => self
                    .plan_after_lookup(m, e)
                    .instrument(info_span!(parent: &span, "route_lookup"))
                    .await
                    .map_err(PipelineError::Unavailable)?,
            };
            let route_names: Vec<String> = hops
                .iter()
                .map(|h| format!("{}@{}", h.shard_id, h.peer))
                .collect();
            span.record("route", route_names.join(" -> ").as_str());
            span.record("stages", hops.len());
            info!(parent: &span, "[PIPELINE] session {session:016x}: {} prompt tokens over {}", prompt.len(), route_names.join(" -> "));
            let result = self
                .run_session(
                    &req,
                    &hops,
                    session,
                    &prompt,
                    max_tokens,
                    n_ctx,
                    tx.clone(),
                    t0,
                )
                .instrument(span.clone())
                .await;
            self.close_session(session, hops, &span);
            match result {
                Err(f) if f.retryable && attempt < ROUTE_ATTEMPTS => {
                    if let Some(p) = unreachable_peer(&f.error.to_string()) {
                        self.0.state.suspect(p);
                    }
                    tracing::warn!(parent: &span, "[PIPELINE] session {session:016x}: {} before the first token; trying another route", f.error);
                    session = new_session_id();
                }
                r => break (r.map_err(|f| f.error), route_names),
            }
        };
        match &result {
            Ok(s) => {
                span.record("gen_ai.usage.output_tokens", s.generated_tokens);
                span.record(
                    "gen_ai.response.finish_reasons",
                    format_args!("[\"{}\"]", s.finish_reason),
                );
            }
            Err(e) => {
                span.record("gen_ai.response.finish_reasons", "[\"error\"]");
                tracing::warn!(parent: &span, "[PIPELINE] session {session:016x} failed: {e}");
            }
        }
        let mut stats = result?;
        stats.route = route_names;
        Ok(stats)
    }

    /// Frees a session's contexts along its route, in the background.
    fn close_session(&self, session: u64, hops: Vec<Hop>, span: &tracing::Span) {
        let close = ActivationRequest {
            kind: FrameKind::Close,
            session,
            pos0: 0,
            want_logits: false,
            sample: false,
            budget_ms: 5_000,
            trace: String::new(),
            route: hops,
            sampling: None,
            history: vec![],
            payload: Payload::None,
        };
        let me = self.clone();
        tokio::spawn(
            async move {
                let _ = me.send(close).await;
            }
            .instrument(info_span!(parent: span, "close_session")),
        );
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_session(
        &self,
        req: &GenerateRequest,
        hops: &[Hop],
        session: u64,
        prompt: &[i32],
        max_tokens: usize,
        n_ctx: usize,
        tx: mpsc::Sender<Chunk>,
        t0: Instant,
    ) -> Result<GenStats, Failure> {
        let info = self.model_info().await?;
        let budget_ms = self.0.cfg.step_timeout.as_millis().min(u32::MAX as u128) as u32;
        let frame =
            |pos0: u32, tokens: Vec<i32>, last_chunk: bool, history: Vec<i32>| ActivationRequest {
                kind: FrameKind::Forward,
                session,
                pos0,
                want_logits: last_chunk && req.return_prompt_logits,
                sample: last_chunk,
                budget_ms,
                trace: String::new(),
                route: hops.to_vec(),
                sampling: Some(req.sampling.clone()),
                history,
                payload: Payload::Tokens(tokens),
            };
        // Prefill, in chunks of n_batch (as the single-node baseline does).
        let chunks: Vec<&[i32]> = prompt.chunks(self.0.cfg.engine.n_batch as usize).collect();
        let mut pos = 0u32;
        let mut resp = ActivationResponse::error(codes::INTERNAL, "no prompt");
        let prefill = info_span!("prefill", tokens = prompt.len(), chunks = chunks.len());
        for (i, c) in chunks.iter().enumerate() {
            let history = if i == 0 { prompt.to_vec() } else { vec![] };
            resp = self
                .send(frame(pos, c.to_vec(), i + 1 == chunks.len(), history))
                .instrument(prefill.clone())
                .await;
            if let Some(e) = step_error(&resp) {
                // Nothing streamed yet: a dead (connection lost) or stale
                // stage may be routed around; a slow one is reported as such.
                let retryable = matches!(e, PipelineError::Unavailable(_));
                return Err(Failure {
                    error: e,
                    retryable,
                });
            }
            pos += c.len() as u32;
        }
        drop(prefill);
        let ttft = t0.elapsed();
        let m = crate::metrics::metrics();
        m.requests.inc();
        m.time_to_first_token.observe(ttft.as_secs_f64());
        let prompt_logits = std::mem::take(&mut resp.logits);
        let mut next = resp
            .token
            .ok_or_else(|| PipelineError::Internal("the last stage returned no token".into()))?;
        let mut generated = 0usize;
        let mut stream = TextStream::default();
        let mut scan = StopScan {
            stops: req.stop.clone(),
            out: String::new(),
            sent: 0,
        };
        let mut bytes_per_hop = 0u64;
        // Where decode time goes: llama.cpp time per hop against step time.
        let mut step_us = 0u64;
        let mut hop_compute_us: Vec<u64> = Vec::new();
        let t_decode = Instant::now();
        let finish = loop {
            if !req.ignore_eos && info.vocab.is_eog(next) {
                break "stop";
            }
            generated += 1;
            m.tokens_generated.inc();
            let piece = stream.push(&info.vocab.piece(next));
            let (text, stopped) = scan.push(&piece);
            if tx
                .send(Chunk {
                    text,
                    token_ids: vec![next],
                })
                .await
                .is_err()
            {
                break "cancelled";
            }
            if stopped {
                break "stop";
            }
            if generated >= max_tokens {
                break "length";
            }
            if pos as usize >= n_ctx {
                break "context";
            }
            let t_step = Instant::now();
            let step = info_span!("decode_step", step = generated, pos = pos);
            let every = self.0.cfg.trace_decode_every as usize;
            if every == 0 || !generated.is_multiple_of(every) {
                llama_cluster_shared::telemetry::set_unsampled_parent(
                    &step,
                    &tracing::Span::current(),
                );
            }
            let r = self
                .send(frame(pos, vec![next], true, vec![]))
                .instrument(step)
                .await;
            m.token_latency.observe(t_step.elapsed().as_secs_f64());
            if let Some(e) = step_error(&r) {
                return Err(e.into());
            }
            step_us += t_step.elapsed().as_micros() as u64;
            hop_compute_us.resize(hop_compute_us.len().max(r.hops.len()), 0);
            for (sum, h) in hop_compute_us.iter_mut().zip(&r.hops) {
                *sum += h.compute_us;
            }
            bytes_per_hop = r
                .hops
                .iter()
                .map(|h| h.bytes_in as u64)
                .max()
                .unwrap_or(0)
                .max(bytes_per_hop);
            pos += 1;
            next = r.token.ok_or_else(|| {
                PipelineError::Internal("the last stage returned no token".into())
            })?;
        };
        let tail = scan.push(&stream.finish()).0 + &scan.flush();
        if !tail.is_empty() && finish != "cancelled" {
            let _ = tx
                .send(Chunk {
                    text: tail,
                    token_ids: vec![],
                })
                .await;
        }
        let decode = t_decode.elapsed().as_secs_f64();
        let steps = (generated as u64).saturating_sub(1).max(1);
        let compute: u64 = hop_compute_us.iter().sum();
        debug!(
            "[PIPELINE] decode: {} steps of {} us, llama.cpp {} us (per stage {:?}), the rest {} us",
            steps,
            step_us / steps,
            compute / steps,
            hop_compute_us.iter().map(|c| c / steps).collect::<Vec<_>>(),
            step_us.saturating_sub(compute) / steps
        );
        Ok(GenStats {
            prompt_tokens: prompt.len() as u32,
            generated_tokens: generated as u32,
            ttft_ms: ttft.as_secs_f64() * 1000.0,
            tokens_per_second: if generated > 1 && decode > 0.0 {
                (generated - 1) as f64 / decode
            } else {
                0.0
            },
            route: vec![],
            finish_reason: finish.into(),
            prompt_logits,
            bytes_per_token_per_hop: bytes_per_hop,
            total_ms: t0.elapsed().as_secs_f64() * 1000.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_of_an_unanswered_step_is_named() {
        let p = libp2p::PeerId::random();
        let msg = format!("stage m-L0-9 on {p} did not answer: request failed: Timeout");
        assert_eq!(unreachable_peer(&msg), Some(p));
        assert_eq!(unreachable_peer(&format!("unavailable: {msg}")), Some(p));
        assert_eq!(unreachable_peer("no route to layers 10-19"), None);
    }

    #[test]
    fn stop_strings_hold_back_and_cut() {
        let scan = |stops: &[&str]| StopScan {
            stops: stops.iter().map(|s| s.to_string()).collect(),
            out: String::new(),
            sent: 0,
        };
        // Text that may start a stop string is held back, the rest is sent.
        let mut s = scan(&["END"]);
        assert_eq!(s.push("hello E"), ("hello".into(), false));
        assert_eq!(s.push("N"), (" ".into(), false));
        assert_eq!(s.push("Dxyz"), ("".into(), true));
        assert_eq!(s.out[..s.out.find("END").unwrap()], *"hello ");
        let mut s = scan(&[]);
        assert_eq!(s.push("abc"), ("abc".into(), false));
        let mut s = scan(&["\n\n"]);
        assert_eq!(s.push("a\n"), ("a".into(), false));
        assert_eq!(s.push("b"), ("\n".into(), false));
        assert_eq!(s.flush(), "b");
        // Multi-byte characters are never split.
        let mut s = scan(&["é!"]);
        assert_eq!(s.push("caféé"), ("café".into(), false));
        assert_eq!(s.push("!"), ("".into(), true));
    }
}
