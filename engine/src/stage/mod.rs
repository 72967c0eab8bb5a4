//! A loaded shard on its own thread. Sessions (one sequence each of a
//! context they share, [`crate::batched`]) are opened at position 0,
//! extended step by step, closed, or evicted after a lease without steps;
//! their number is bounded. The thread gathers the steps waiting for it and
//! runs the single-token steps of all sessions in one `llama_decode`, and
//! at most one prompt chunk after them: a new session joins at the next
//! round, and a long prompt holds the others back by one chunk at most.
//! Callers never block the async runtime: requests travel over a channel
//! and answers come back on oneshots.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::info;

use worker::{Worker, session_limit};

mod waves;
mod worker;

use crate::batched::{SharedContext, kv_bytes_per_session};
use crate::ffi::{LoadedModel, ThreadPool, TokenEmbeddings};
use crate::sampling::SamplingParams;
use crate::{EngineError, EngineSettings, Result};

/// What to load and how to run it.
#[derive(Debug, Clone)]
pub struct StageSpec {
    pub shard_path: PathBuf,
    /// Head file (token embeddings); required for the first stage.
    pub head_path: Option<PathBuf>,
    pub is_first: bool,
    pub is_last: bool,
    pub settings: EngineSettings,
    /// Sessions at once; 0: as many as `kv_budget_bytes` holds (at most
    /// [`AUTO_MAX_SESSIONS`]).
    pub max_sessions: usize,
    /// A session without a step for this long is freed (its driver is gone).
    pub idle_timeout: Duration,
    /// Memory the KV caches may take (0: not checked; with
    /// `max_sessions` 0, [`AUTO_MAX_SESSIONS`]).
    pub kv_budget_bytes: u64,
}

/// The most sessions a stage opens when their number follows from memory.
pub const AUTO_MAX_SESSIONS: usize = 16;

/// What a stage thread counts (read by the worker's metrics).
#[derive(Debug, Default)]
pub struct StageCounters {
    /// `llama_decode` calls.
    pub decode_calls: AtomicU64,
    /// Steps computed (one per session per call).
    pub steps: AtomicU64,
    /// Rows (tokens) computed.
    pub rows: AtomicU64,
    /// Nanoseconds spent in llama.cpp.
    pub busy_ns: AtomicU64,
    /// The most steps one call has run so far.
    pub max_steps: AtomicU64,
    /// Micro-batches llama.cpp ran for those calls: with a KV stream per
    /// session it puts only consecutive sequence ids in one, so a call of
    /// several sessions runs one micro-batch per run of consecutive ids.
    pub micro_batches: AtomicU64,
}

/// Facts about a loaded stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageInfo {
    pub n_embd: usize,
    pub n_vocab: usize,
    pub n_layer: u32,
    pub is_first: bool,
    pub is_last: bool,
    /// Sessions at once.
    pub max_sessions: usize,
    /// KV cache bytes of one session.
    pub kv_bytes_per_session: u64,
}

/// Input of one forward step.
#[derive(Debug, Clone, PartialEq)]
pub enum StageInput {
    /// Token ids (first stage only).
    Tokens(Vec<i32>),
    /// Hidden states `[n][n_embd]` from the previous stage.
    Hidden(Vec<f32>),
}

impl StageInput {
    pub fn n_tokens(&self, n_embd: usize) -> usize {
        match self {
            StageInput::Tokens(t) => t.len(),
            StageInput::Hidden(h) => h.len() / n_embd.max(1),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ForwardRequest {
    pub session: u64,
    /// Position of the first input token; 0 (re)opens the session.
    pub pos0: u32,
    pub input: StageInput,
    /// Sampling of the session (read at position 0 by the last stage).
    pub sampling: Option<SamplingParams>,
    /// Tokens already in the context (prompt), for the repetition penalty.
    pub history: Vec<i32>,
    /// Return the last token's logits (last stage).
    pub want_logits: bool,
    /// Sample a token (last stage; false for prompt chunks before the last).
    pub sample: bool,
    /// Parent of the `llama.decode` and `sampling` spans recorded on the
    /// stage thread (`Span::none()`: none).
    pub span: tracing::Span,
    /// Stages in the session's route (1: this stage alone). A stage of a
    /// route of D stages runs its sessions in D waves, so that while it
    /// computes one wave the other stages compute the others.
    pub depth: u32,
}

#[derive(Debug, Clone, Default)]
pub struct ForwardResult {
    /// Hidden states for the next stage (non-last stages).
    pub hidden: Vec<f32>,
    /// Sampled token (last stage, when asked).
    pub token: Option<i32>,
    /// Its log-probabilities, when the session asked for them.
    pub logprobs: Option<crate::sampling::TokenLogprobs>,
    pub logits: Option<Vec<f32>>,
    /// Time spent in llama.cpp (the whole batch the step was part of).
    pub compute: Duration,
    /// Steps in the `llama_decode` call this one was part of.
    pub batched: u32,
}

pub(crate) enum Job {
    Forward(Box<ForwardRequest>, oneshot::Sender<Result<ForwardResult>>),
    Close(u64),
}

pub(crate) type Reply = oneshot::Sender<Result<ForwardResult>>;

/// Handle on a stage thread; dropping it stops the thread.
pub struct StageEngine {
    tx: Option<std::sync::mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    info: StageInfo,
    sessions: Arc<AtomicUsize>,
    /// Forward steps waiting for or running on the stage thread.
    queued: Arc<AtomicUsize>,
    counters: Arc<StageCounters>,
}

impl StageEngine {
    /// Loads the shard on a new thread; returns once it is loaded (blocking:
    /// call from `spawn_blocking` in async code).
    pub fn start(spec: StageSpec) -> Result<StageEngine> {
        if spec.is_first && spec.head_path.is_none() {
            return Err(EngineError::Load(
                "the first stage needs the head file (token embeddings)".into(),
            ));
        }
        let n_ctx = spec.settings.n_ctx;
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<StageInfo>>();
        let sessions = Arc::new(AtomicUsize::new(0));
        let counters = Arc::new(StageCounters::default());
        let (count, thread_counters) = (sessions.clone(), counters.clone());
        let thread = std::thread::Builder::new()
            .name("llama-stage".into())
            .spawn(move || {
                let worker = (|| -> Result<(Worker, u64)> {
                    let model = LoadedModel::load(&spec.shard_path)?;
                    let embeddings = match (&spec.head_path, spec.is_first) {
                        (Some(h), true) => {
                            let e = TokenEmbeddings::load(h)?;
                            if e.n_embd != model.n_embd {
                                return Err(EngineError::Load(format!(
                                    "head file embeddings are {} wide, the shard expects {}",
                                    e.n_embd, model.n_embd
                                )));
                            }
                            Some(e)
                        }
                        _ => None,
                    };
                    let per = kv_bytes_per_session(&model, spec.settings.n_ctx);
                    let n = session_limit(spec.max_sessions, per, spec.kv_budget_bytes)?;
                    let pool = ThreadPool::new(spec.settings.threads)?;
                    let ctx = SharedContext::new(
                        model.clone(),
                        &spec.settings,
                        n as u32,
                        !spec.is_last,
                        Some(pool),
                    )?;
                    Ok((
                        Worker {
                            spec,
                            model,
                            ctx,
                            embeddings,
                            sessions: HashMap::new(),
                            free: (0..n as i32).collect(),
                            pending: VecDeque::new(),
                            count,
                            counters: thread_counters,
                            next_block: 0,
                        },
                        per,
                    ))
                })();
                let mut worker = match worker {
                    Ok((w, per)) => {
                        let _ = ready_tx.send(Ok(StageInfo {
                            n_embd: w.model.n_embd,
                            n_vocab: w.model.n_vocab,
                            n_layer: w.model.n_layer,
                            is_first: w.spec.is_first,
                            is_last: w.spec.is_last,
                            max_sessions: w.ctx.n_seq() as usize,
                            kv_bytes_per_session: per,
                        }));
                        w
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                worker.run(rx);
            })
            .map_err(EngineError::Io)?;
        let info = ready_rx.recv().map_err(|_| EngineError::Stopped)??;
        info!(
            "stage loaded: {} layers, {} sessions of {} tokens ({:.1} MiB of KV cache each)",
            info.n_layer,
            info.max_sessions,
            n_ctx,
            info.kv_bytes_per_session as f64 / (1u64 << 20) as f64
        );
        Ok(StageEngine {
            tx: Some(tx),
            thread: Some(thread),
            info,
            sessions,
            queued: Arc::new(AtomicUsize::new(0)),
            counters,
        })
    }

    pub fn info(&self) -> &StageInfo {
        &self.info
    }

    /// Open sessions.
    pub fn active_sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Sessions that may still be opened.
    pub fn free_sessions(&self) -> usize {
        self.info
            .max_sessions
            .saturating_sub(self.active_sessions())
    }

    /// What the stage thread counted so far.
    pub fn counters(&self) -> &StageCounters {
        &self.counters
    }

    fn send(&self, job: Job) -> Result<()> {
        self.tx
            .as_ref()
            .ok_or(EngineError::Stopped)?
            .send(job)
            .map_err(|_| EngineError::Stopped)
    }

    /// Runs one step (async).
    pub async fn forward(&self, req: ForwardRequest) -> Result<ForwardResult> {
        struct Queued<'a>(&'a AtomicUsize);
        impl Drop for Queued<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.queued.fetch_add(1, Ordering::Relaxed);
        let _queued = Queued(&self.queued);
        let (tx, rx) = oneshot::channel();
        self.send(Job::Forward(Box::new(req), tx))?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Forward steps waiting for or running on the stage thread.
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Runs one step (blocking; not for async contexts).
    pub fn forward_blocking(&self, req: ForwardRequest) -> Result<ForwardResult> {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Forward(Box::new(req), tx))?;
        rx.blocking_recv().map_err(|_| EngineError::Stopped)?
    }

    /// Frees a session's context.
    pub fn close(&self, session: u64) {
        let _ = self.send(Job::Close(session));
    }
}

impl Drop for StageEngine {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
