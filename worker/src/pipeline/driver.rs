//! Driving one request: the worker that receives it tokenizes, waits for a
//! route with free sessions ([`super::admission`]), feeds the prompt through
//! the stages in chunks, then decodes token by token, streaming text back as
//! it is produced. When a stage fails (its connection closes, a step times
//! out, it lost the session) the driver moves to a new route without that
//! stage and replays the tokens so far into it, so that the stream goes on
//! from the same position (bounded by `max_reroutes`).

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::time::Instant;

use llama_cluster_engine::vocab::TextStream;
use tokio::sync::mpsc;
use tracing::{Instrument, info, info_span, warn};

use super::Pipeline;
use super::host::PipelineError;
use super::stop::StopScan;
use crate::net::frame::{ActivationRequest, ActivationResponse, FrameKind, Hop, Payload, codes};

pub use super::request::{Chunk, DEFAULT_MAX_TOKENS, GenStats, GenerateRequest};
use super::request::{Run, State};

/// Generated tokens replayed per prefill step after a failover: fewer than
/// the 64 rows from which ggml switches to its tiled attention kernel, so
/// each row is computed as its decode step was.
const REPLAY_CHUNK: usize = 32;

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

impl Pipeline {
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
        if req.resume.len() >= max_tokens {
            return Err(PipelineError::InvalidArgument(format!(
                "{} resumed tokens leave nothing of max_tokens {max_tokens}",
                req.resume.len()
            )));
        }
        if let Some(bad) = req
            .resume
            .iter()
            .find(|&&t| t < 0 || t as usize >= info.vocab.n_vocab())
        {
            return Err(PipelineError::InvalidArgument(format!(
                "resumed token {bad} is outside the vocabulary"
            )));
        }
        let session = new_session_id();
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
        let run = Run {
            req: &req,
            info: &info,
            prompt_len: prompt.len(),
            max_tokens,
            n_ctx,
            tx,
            t0,
        };
        let result = self
            .run_with_failover(run, prompt)
            .instrument(span.clone())
            .await;
        match &result {
            Ok(s) => {
                span.record("gen_ai.usage.output_tokens", s.generated_tokens);
                span.record(
                    "gen_ai.response.finish_reasons",
                    format_args!("[\"{}\"]", s.finish_reason),
                );
                span.record("route", s.route.join(" -> ").as_str());
                span.record("stages", s.route.len());
            }
            Err(e) => {
                span.record("gen_ai.response.finish_reasons", "[\"error\"]");
                warn!(parent: &span, "[PIPELINE] request failed: {e}");
            }
        }
        result
    }

    /// Stages the frames of a route of `hops` tell the stages to run their
    /// sessions in waves over (1: one wave, with `pipeline_waves` off).
    fn depth(&self, hops: &[Hop]) -> u8 {
        if self.0.cfg.waves {
            hops.len().clamp(1, 255) as u8
        } else {
            1
        }
    }

    /// Frees a session's contexts along its route, in the background.
    fn close_session(&self, session: u64, hops: Vec<Hop>) {
        let close = ActivationRequest {
            kind: FrameKind::Close,
            session,
            pos0: 0,
            want_logits: false,
            sample: false,
            budget_ms: 5_000,
            trace: String::new(),
            driver: self.0.me.clone(),
            depth: self.depth(&hops),
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
            .instrument(info_span!("close_session")),
        );
    }

    /// Runs the request over as many routes as failures need (bounded).
    async fn run_with_failover(
        &self,
        run: Run<'_>,
        prompt: Vec<i32>,
    ) -> Result<GenStats, PipelineError> {
        let m = &run.info.manifest;
        let mut st = State {
            tokens: prompt,
            generated: 0,
            stream: TextStream::default(),
            scan: StopScan::new(run.req.stop.clone()),
            ttft: None,
            prompt_logits: vec![],
            steps: 0,
            step_us: 0,
            hop_compute_us: vec![],
            bytes_per_hop: 0,
            decode_started: None,
            logprobs: Default::default(),
        };
        // A resumed request: the text of its tokens was delivered already.
        for &t in &run.req.resume {
            st.replay(&run, t);
        }
        let mut excluded: HashSet<String> = HashSet::new();
        let mut reroutes = 0u32;
        // The wait for capacity is bounded from the request's start, and
        // again from each point where it made progress.
        let mut deadline = Instant::now() + self.0.cfg.queue_timeout;
        loop {
            let generated_before = st.generated;
            let (hops, held) = {
                let _wait = info_span!("admission").entered();
                self.admit(&m.model, m.n_layer, &excluded, deadline, &run.tx)
            }
            .await?;
            let session = new_session_id();
            let names: Vec<String> = hops
                .iter()
                .map(|h| format!("{}@{}", h.shard_id, h.peer))
                .collect();
            info!(
                "[PIPELINE] session {session:016x}: {} tokens ({} generated) over {}",
                st.tokens.len(),
                st.generated,
                names.join(" -> ")
            );
            let outcome = self.drive(&run, &hops, session, &mut st).await;
            self.close_session(session, hops);
            drop(held);
            if st.generated > generated_before {
                deadline = Instant::now() + self.0.cfg.queue_timeout;
            }
            let failure = match outcome {
                Ok(finish) => {
                    // Text held back (a possible stop string, a partial
                    // character) goes out at the end.
                    let tail = st.scan.push(&st.stream.finish()).0 + &st.scan.flush();
                    let logprobs = st.logprobs.sent(tail.len());
                    if (!tail.is_empty() || !logprobs.is_empty()) && finish != "cancelled" {
                        let _ = run
                            .tx
                            .send(Chunk {
                                text: tail,
                                token_ids: vec![],
                                logprobs,
                            })
                            .await;
                    }
                    return Ok(st.stats(&run, finish, names));
                }
                Err(f) => f,
            };
            match failure {
                Failure::Fatal(e) => return Err(e),
                Failure::Busy(peer) => {
                    // Another driver took the last session meanwhile: wait
                    // for one again.
                    self.0.admission.note_full(&peer);
                }
                Failure::Stage { error, peer } => {
                    reroutes += 1;
                    if reroutes > self.0.cfg.max_reroutes {
                        return Err(PipelineError::Unavailable(format!(
                            "gave up after {} new routes (max_reroutes {}): {error}",
                            reroutes - 1,
                            self.0.cfg.max_reroutes
                        )));
                    }
                    crate::metrics::metrics().failovers.inc();
                    if let Some(p) = &peer {
                        excluded.insert(p.clone());
                        if let Ok(id) = p.parse() {
                            self.0.state.suspect(id);
                        }
                    }
                    warn!(
                        "[PIPELINE] session {session:016x}: {error}; moving to a new route and replaying {} tokens",
                        st.tokens.len()
                    );
                }
            }
        }
    }

    /// One route: (re)builds the session's KV caches from the tokens so far
    /// and decodes until the request ends or a stage fails.
    async fn drive(
        &self,
        run: &Run<'_>,
        hops: &[Hop],
        session: u64,
        st: &mut State,
    ) -> Result<&'static str, Failure> {
        let budget_ms = self.0.cfg.step_timeout.as_millis().min(u32::MAX as u128) as u32;
        let req = run.req;
        let frame =
            |pos0: u32, tokens: Vec<i32>, sample: bool, history: Vec<i32>| ActivationRequest {
                kind: FrameKind::Forward,
                session,
                pos0,
                want_logits: sample
                    && req.return_prompt_logits
                    && pos0 as usize + tokens.len() == run.prompt_len,
                sample,
                budget_ms,
                trace: String::new(),
                driver: self.0.me.clone(),
                depth: self.depth(hops),
                route: hops.to_vec(),
                sampling: Some(req.sampling.clone()),
                history,
                payload: Payload::Tokens(tokens),
            };
        let fresh = st.generated == 0;
        // Everything but a pending sampled token goes in by prefill: the
        // prompt in chunks of n_batch (as the single-node baseline does),
        // generated tokens in chunks small enough to be computed row by row
        // as decode steps are (bit-identical KV).
        let upto = if fresh {
            st.tokens.len()
        } else {
            st.tokens.len() - 1
        };
        let mut chunks: Vec<(usize, usize)> = Vec::new();
        let n_batch = self.0.cfg.engine.n_batch as usize;
        let mut at = 0;
        while at < upto {
            let end = if at < run.prompt_len {
                (at + n_batch).min(run.prompt_len).min(upto)
            } else {
                (at + REPLAY_CHUNK).min(upto)
            };
            chunks.push((at, end));
            at = end;
        }
        let prefill = info_span!(
            "prefill",
            tokens = upto,
            chunks = chunks.len(),
            replay = !fresh
        );
        let mut last = None;
        for (i, &(a, b)) in chunks.iter().enumerate() {
            let history = if a == 0 { st.tokens.clone() } else { vec![] };
            let sample = fresh && i + 1 == chunks.len();
            let resp = self
                .send(frame(a as u32, st.tokens[a..b].to_vec(), sample, history))
                .instrument(prefill.clone())
                .await;
            self.0.admission.note(&resp.hops);
            if let Some(f) = failure(&resp) {
                return Err(f);
            }
            last = Some(resp);
        }
        drop(prefill);
        let m = crate::metrics::metrics();
        if fresh {
            let mut resp =
                last.ok_or_else(|| Failure::Fatal(PipelineError::Internal("no prompt".into())))?;
            let ttft = run.t0.elapsed();
            st.ttft = Some(ttft);
            m.requests.inc();
            m.time_to_first_token.observe(ttft.as_secs_f64());
            st.prompt_logits = std::mem::take(&mut resp.logits);
            let next = resp.token.ok_or_else(|| {
                Failure::Fatal(PipelineError::Internal(
                    "the last stage returned no token".into(),
                ))
            })?;
            if let Some(finish) = st.accept(run, next, resp.logprobs.take()).await {
                return Ok(finish);
            }
        }
        st.decode_started.get_or_insert_with(Instant::now);
        loop {
            let pos = st.tokens.len() - 1;
            let pending = st.tokens[pos];
            let t_step = Instant::now();
            let step = info_span!("decode_step", step = st.generated, pos = pos);
            let every = self.0.cfg.trace_decode_every as usize;
            if every == 0 || !st.generated.is_multiple_of(every) {
                llama_cluster_shared::telemetry::set_unsampled_parent(
                    &step,
                    &tracing::Span::current(),
                );
            }
            let mut r = self
                .send(frame(pos as u32, vec![pending], true, vec![]))
                .instrument(step)
                .await;
            m.token_latency.observe(t_step.elapsed().as_secs_f64());
            self.0.admission.note(&r.hops);
            if let Some(f) = failure(&r) {
                return Err(f);
            }
            st.note_step(&r, t_step.elapsed());
            let next = r.token.ok_or_else(|| {
                Failure::Fatal(PipelineError::Internal(
                    "the last stage returned no token".into(),
                ))
            })?;
            if let Some(finish) = st.accept(run, next, r.logprobs.take()).await {
                return Ok(finish);
            }
        }
    }
}

/// Why a route failed, and what the driver does about it.
enum Failure {
    /// Nothing another route would change (bad input, …).
    Fatal(PipelineError),
    /// A stage was full when the session opened: wait for room.
    Busy(String),
    /// A stage failed or lost the session: a new route (without `peer`,
    /// when named) and a replay.
    Stage { error: String, peer: Option<String> },
}

fn failure(resp: &ActivationResponse) -> Option<Failure> {
    let e = resp.error.as_ref()?;
    let peer = (!e.peer.is_empty()).then(|| e.peer.clone());
    let msg = e.message.clone();
    Some(match e.code {
        codes::INVALID => Failure::Fatal(PipelineError::InvalidArgument(msg)),
        codes::BUSY => Failure::Busy(e.peer.clone()),
        // The stage is alive but lost the session (expired lease): the
        // same stages may serve the replay.
        codes::SESSION => Failure::Stage {
            error: msg,
            peer: None,
        },
        _ => Failure::Stage { error: msg, peer },
    })
}
