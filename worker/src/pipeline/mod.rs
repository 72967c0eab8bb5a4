//! The inference pipeline over the swarm.
//!
//! - [`route`]: route planning from shard records;
//! - [`host`]: loading and unloading this worker's shard (LOAD_SHARD);
//! - [`driver`]: running one request (tokenize, route, prefill, decode, stream);
//! - this module: a stage's handling of activation frames — compute locally,
//!   pass the hidden state to the next hop, send the sampled token back.

pub mod admission;
pub mod driver;
mod hop;
pub mod host;
pub mod request;
pub mod route;
mod stage_state;
pub mod stop;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use libp2p::PeerId;
use llama_cluster_engine::manifest::{Manifest, ShardEntry};
use llama_cluster_engine::stage::{ForwardRequest, StageEngine, StageInput};
use llama_cluster_engine::vocab::Vocab;
use llama_cluster_engine::{EngineError, EngineSettings};
use llama_cluster_shared::config::NodeConfig;
use tracing::{Instrument, debug, info_span};

use crate::net::NetHandle;
use crate::net::frame::{
    ActivationRequest, ActivationResponse, FrameKind, HopStats, Payload, codes,
};
use crate::state::SharedState;
use crate::torrent::Torrents;

/// Pipeline settings taken from the node configuration.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub manifest: Option<PathBuf>,
    pub engine: EngineSettings,
    pub max_sessions: usize,
    pub session_idle: Duration,
    /// A session without a step for this long is freed by its stage.
    pub session_lease: Duration,
    pub step_timeout: Duration,
    /// New routes one request may take when stages fail.
    pub max_reroutes: u32,
    /// How long, and how many, requests wait for free capacity.
    pub queue_timeout: Duration,
    pub max_queued: usize,
    pub f16: bool,
    /// Sessions run in as many waves as their route has stages.
    pub waves: bool,
    /// Trace every N-th decode step in detail (0: none).
    pub trace_decode_every: u32,
    /// Bytes a shard's fetch leaves free on the cache's disk.
    pub min_free_disk: u64,
}

impl PipelineConfig {
    pub fn from_node(cfg: &NodeConfig) -> Self {
        let mut engine = EngineSettings {
            n_ctx: cfg.n_ctx,
            n_batch: cfg.n_batch,
            n_ubatch: cfg.n_ubatch,
            ..Default::default()
        };
        if cfg.threads > 0 {
            engine.threads = cfg.threads as i32;
        }
        PipelineConfig {
            manifest: (!cfg.manifest.is_empty()).then(|| PathBuf::from(&cfg.manifest)),
            engine,
            max_sessions: cfg.max_sessions,
            session_idle: Duration::from_secs(cfg.session_idle_secs),
            session_lease: Duration::from_secs(cfg.session_lease_secs.min(cfg.session_idle_secs)),
            step_timeout: Duration::from_secs(cfg.stage_timeout_secs),
            max_reroutes: cfg.max_reroutes,
            queue_timeout: Duration::from_secs(cfg.queue_timeout_secs),
            max_queued: cfg.max_queued,
            f16: cfg.activation_f16,
            waves: cfg.pipeline_waves,
            trace_decode_every: cfg.trace_decode_every,
            min_free_disk: cfg.min_free_disk_mb.saturating_mul(1_000_000),
        }
    }
}

/// Extra wait on a hop beyond the step budget passed on to it.
const HOP_MARGIN: Duration = Duration::from_millis(300);

/// The shard this worker runs.
pub struct LoadedShard {
    pub model: String,
    /// Layers of the whole model.
    pub model_layers: u32,
    pub entry: ShardEntry,
    pub manifest_path: PathBuf,
    pub engine: StageEngine,
}

/// The driver's view of a model: its manifest and tokenizer.
pub struct ModelInfo {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    pub vocab: Vocab,
}

struct Inner {
    state: SharedState,
    net: NetHandle,
    cfg: PipelineConfig,
    me: String,
    loaded: RwLock<Option<Arc<LoadedShard>>>,
    model: Mutex<Option<Arc<ModelInfo>>>,
    load_lock: tokio::sync::Mutex<()>,
    /// Last answered step of each session: a frame delivered twice (a retry
    /// after a connection closed under it) gets the same answer instead of
    /// running the step again.
    answered: Mutex<HashMap<u64, Answered>>,
    torrents: Torrents,
    /// Steps being computed, by (session, position).
    inflight: Mutex<HashMap<(u64, u32), RunningStep>>,
    /// Capacity of the stages and the queue of requests this worker drives.
    admission: admission::Admission,
    /// The driver of each session open on this stage, and when it opened:
    /// the sessions of a driver whose connection closed are freed at once.
    session_drivers: Mutex<HashMap<u64, (PeerId, Instant)>>,
}

/// A step being computed: a duplicate of its frame waits here for its answer.
type RunningStep = tokio::sync::watch::Receiver<Option<ActivationResponse>>;

/// Marks a step as running until dropped (also when its future is dropped
/// half way, so that no entry outlives its step).
struct RunningEntry<'a> {
    pipeline: &'a Pipeline,
    key: (u64, u32),
}

impl Drop for RunningEntry<'_> {
    fn drop(&mut self) {
        self.pipeline
            .0
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

struct Answered {
    pos0: u32,
    at: Instant,
    resp: ActivationResponse,
}

/// Cheaply clonable handle on the pipeline.
#[derive(Clone)]
pub struct Pipeline(Arc<Inner>);

fn engine_code(e: &EngineError) -> u8 {
    match e {
        EngineError::InvalidInput(_) => codes::INVALID,
        EngineError::Busy(_) => codes::BUSY,
        EngineError::Session(_) => codes::SESSION,
        _ => codes::INTERNAL,
    }
}

impl Pipeline {
    pub fn new(
        state: SharedState,
        net: NetHandle,
        cfg: PipelineConfig,
        torrents: Torrents,
    ) -> Self {
        let me = state.peer_id().to_string();
        Pipeline(Arc::new(Inner {
            state,
            net,
            cfg,
            me,
            loaded: RwLock::new(None),
            model: Mutex::new(None),
            load_lock: tokio::sync::Mutex::new(()),
            answered: Mutex::new(HashMap::new()),
            torrents,
            inflight: Mutex::new(HashMap::new()),
            admission: Default::default(),
            session_drivers: Mutex::new(HashMap::new()),
        }))
    }

    pub fn net(&self) -> &NetHandle {
        &self.0.net
    }

    pub fn torrents(&self) -> &Torrents {
        &self.0.torrents
    }

    pub fn config(&self) -> &PipelineConfig {
        &self.0.cfg
    }

    pub fn loaded(&self) -> Option<Arc<LoadedShard>> {
        self.0
            .loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Handles an activation frame that arrived over the network.
    pub async fn handle_inbound(&self, from: PeerId, bytes: Vec<u8>) -> Vec<u8> {
        let n = bytes.len() as u32;
        let resp = match ActivationRequest::decode(&bytes) {
            Ok(req) => self.handle(req, n, Some(from)).await,
            Err(e) => ActivationResponse::error(
                codes::INVALID,
                format!("malformed activation frame: {e}"),
            ),
        };
        resp.encode()
    }

    /// Runs this worker's part of a step and the rest of the chain, in a
    /// `stage` span that continues the sender's trace (`from`: the sending
    /// peer; `None` when this worker sent the frame to itself).
    fn handle(
        &self,
        req: ActivationRequest,
        bytes_in: u32,
        from: Option<PeerId>,
    ) -> BoxFuture<'static, ActivationResponse> {
        let span = info_span!(
            "stage",
            session = format_args!("{:016x}", req.session),
            kind = ?req.kind,
            pos = req.pos0,
            from = %from.map(|p| p.to_string()).unwrap_or_else(|| "local".into()),
            bytes_in,
            shard = tracing::field::Empty,
            layers = tracing::field::Empty,
            compute_us = tracing::field::Empty,
        );
        llama_cluster_shared::telemetry::set_parent(&span, &req.trace);
        let me = self.clone();
        async move {
            let mut resp = me.handle_step(req, bytes_in).await;
            // An error raised here names this stage.
            if let Some(e) = resp.error.as_mut()
                && e.peer.is_empty()
            {
                e.peer = me.0.me.clone();
            }
            resp
        }
        .instrument(span)
        .boxed()
    }

    async fn handle_step(&self, mut req: ActivationRequest, bytes_in: u32) -> ActivationResponse {
        let started = Instant::now();
        // Nobody may ask for more time than this worker allows a step.
        req.budget_ms = req
            .budget_ms
            .min(self.0.cfg.step_timeout.as_millis().min(u32::MAX as u128) as u32);
        if req.route.iter().filter(|h| h.peer == self.0.me).count() > 1 {
            return ActivationResponse::error(
                codes::ROUTE,
                "route visits this worker more than once",
            );
        }
        let Some(hop) = req.route.first() else {
            return ActivationResponse::error(codes::ROUTE, "empty route");
        };
        let Some(l) = self.loaded() else {
            return ActivationResponse::error(
                codes::UNAVAILABLE,
                format!("worker {} has no shard loaded", self.0.me),
            );
        };
        if hop.peer != self.0.me
            || hop.shard_id != l.entry.id
            || hop.layer_start != l.entry.layer_start
            || hop.layer_end != l.entry.layer_end
        {
            return ActivationResponse::error(
                codes::ROUTE,
                format!(
                    "route mismatch: asked for {} (layers {}-{}) on {}, this worker {} serves {} (layers {}-{})",
                    hop.shard_id,
                    hop.layer_start,
                    hop.layer_end,
                    hop.peer,
                    self.0.me,
                    l.entry.id,
                    l.entry.layer_start,
                    l.entry.layer_end
                ),
            );
        }
        let is_last = req.route.len() == 1;
        if req.kind == FrameKind::Close {
            self.0
                .answered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&req.session);
            self.0
                .session_drivers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&req.session);
            l.engine.close(req.session);
            if !is_last {
                let mut next = req.clone();
                next.route.remove(0);
                let me = self.clone();
                tokio::spawn(
                    async move {
                        let _ = me.send(next).await;
                    }
                    .in_current_span(),
                );
            }
            return ActivationResponse {
                error: None,
                token: None,
                logits: vec![],
                hops: vec![],
                logprobs: None,
            };
        }
        if is_last != l.engine.info().is_last {
            return ActivationResponse::error(
                codes::ROUTE,
                format!(
                    "route mismatch: shard {} is {}the last stage",
                    l.entry.id,
                    if is_last { "not " } else { "" }
                ),
            );
        }
        let (session, pos0) = (req.session, req.pos0);
        if pos0 == 0 && req.driver != self.0.me {
            self.note_driver(session, &req.driver);
        }
        // A frame delivered again gets the answer of its first delivery: at
        // once when that was answered, else once it is. Both are looked up
        // under the `inflight` lock (the original leaves `inflight` only
        // after it is in `answered`).
        let running = {
            let mut inflight = self.0.inflight.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(a) = self
                .0
                .answered
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&session)
                .filter(|a| a.pos0 == pos0)
            {
                debug!(
                    "[PIPELINE] step {pos0} of session {session:016x} delivered twice; same answer"
                );
                return a.resp.clone();
            }
            if let Some(rx) = inflight.get(&(session, pos0)) {
                debug!(
                    "[PIPELINE] step {pos0} of session {session:016x} delivered twice while running"
                );
                Err(rx.clone())
            } else {
                let (tx, rx) = tokio::sync::watch::channel(None);
                inflight.insert((session, pos0), rx);
                Ok(tx)
            }
        };
        let tx = match running {
            Err(mut original) => {
                return match original.wait_for(Option::is_some).await {
                    Ok(answer) => answer.clone().unwrap_or_else(|| {
                        ActivationResponse::error(codes::INTERNAL, "empty answer to a step")
                    }),
                    Err(_) => ActivationResponse::error(
                        codes::UNAVAILABLE,
                        format!(
                            "the first delivery of step {pos0} of session {session:016x} was abandoned before its answer"
                        ),
                    ),
                };
            }
            Ok(tx) => tx,
        };
        // The step is computed right here (no task or shared future in
        // between): the stage thread's answer wakes this task directly, and
        // the hand-off to the stage thread happens before this task yields.
        let running = RunningEntry {
            pipeline: self,
            key: (session, pos0),
        };
        let resp = self.compute_step(req, &l, bytes_in, started).await;
        if resp.error.is_none() {
            let idle = self.0.cfg.session_idle;
            let mut answered = self.0.answered.lock().unwrap_or_else(|e| e.into_inner());
            answered.retain(|_, a| a.at.elapsed() < idle);
            answered.insert(
                session,
                Answered {
                    pos0,
                    at: Instant::now(),
                    resp: resp.clone(),
                },
            );
        }
        // Answered first, then no longer running: a duplicate finds one or
        // the other. Duplicates already waiting get a copy.
        drop(running);
        if tx.receiver_count() > 0 {
            let _ = tx.send(Some(resp.clone()));
        }
        resp
    }

    async fn compute_step(
        &self,
        req: ActivationRequest,
        l: &LoadedShard,
        bytes_in: u32,
        started: Instant,
    ) -> ActivationResponse {
        let is_last = req.route.len() == 1;
        let n_embd = l.engine.info().n_embd;
        let input = match req.payload {
            Payload::Tokens(t) => StageInput::Tokens(t),
            Payload::Hidden {
                n_embd: w, data, ..
            } if w as usize == n_embd => StageInput::Hidden(data),
            Payload::Hidden { n_embd: w, .. } => {
                return ActivationResponse::error(
                    codes::INVALID,
                    format!("hidden state is {w} wide, this shard expects {n_embd}"),
                );
            }
            Payload::None => {
                return ActivationResponse::error(codes::INVALID, "forward frame without payload");
            }
        };
        let n_tokens = input.n_tokens(n_embd) as u32;
        let out = l
            .engine
            .forward(ForwardRequest {
                session: req.session,
                pos0: req.pos0,
                input,
                sampling: req.sampling.clone(),
                history: req.history.clone(),
                want_logits: req.want_logits,
                sample: req.sample,
                span: tracing::Span::current(),
                depth: u32::from(req.depth),
            })
            .await;
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                return ActivationResponse::error_at(
                    engine_code(&e),
                    format!("stage {} on {}: {e}", l.entry.id, self.0.me),
                    self.0.me.clone(),
                );
            }
        };
        let span = tracing::Span::current();
        span.record("shard", l.entry.id.as_str());
        span.record(
            "layers",
            format_args!("{}-{}", l.entry.layer_start, l.entry.layer_end),
        );
        span.record("compute_us", out.compute.as_micros() as u64);
        let m = crate::metrics::metrics();
        m.stage_forward.observe(out.compute.as_secs_f64());
        m.hop_bytes_in.inc_by(bytes_in as u64);
        m.stage_steps.inc();
        let stats = HopStats {
            peer: self.0.me.clone(),
            shard_id: l.entry.id.clone(),
            compute_us: out.compute.as_micros() as u64,
            bytes_in,
            open_sessions: l.engine.active_sessions().min(u16::MAX as usize) as u16,
            max_sessions: l.engine.info().max_sessions.min(u16::MAX as usize) as u16,
            batched: out.batched.min(u16::MAX as u32) as u16,
        };
        if is_last {
            return ActivationResponse {
                error: None,
                token: out.token,
                logits: out.logits.unwrap_or_default(),
                hops: vec![stats],
                logprobs: out.logprobs,
            };
        }
        // What is left, minus the margin this worker waits beyond the
        // budget it passes on: the stage further down times out first.
        let spent = started.elapsed().as_millis() as u32;
        let budget_ms = req
            .budget_ms
            .saturating_sub(spent)
            .saturating_sub(HOP_MARGIN.as_millis() as u32);
        if budget_ms == 0 {
            return ActivationResponse::error(
                codes::TIMEOUT,
                "step budget used up before the next stage",
            );
        }
        let next = ActivationRequest {
            kind: FrameKind::Forward,
            session: req.session,
            pos0: req.pos0,
            want_logits: req.want_logits,
            sample: req.sample,
            budget_ms,
            trace: String::new(),
            driver: req.driver.clone(),
            depth: req.depth,
            route: req.route[1..].to_vec(),
            sampling: req.sampling,
            history: req.history,
            payload: Payload::Hidden {
                n_tokens,
                n_embd: n_embd as u32,
                data: out.hidden,
                f16: self.0.cfg.f16,
            },
        };
        let mut resp = self.send(next).await;
        if resp.error.is_none() {
            resp.hops.insert(0, stats);
        }
        resp
    }
}
