//! A loaded shard on its own thread. Sessions (one llama.cpp context each)
//! are opened at position 0, extended step by step, closed, or evicted after
//! an idle timeout; their number is bounded. Callers never block the async
//! runtime: requests travel over a channel and answers come back on oneshots.

use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::ffi::{BatchInput, LoadedModel, StageContext, ThreadPool, TokenEmbeddings};
use crate::sampling::{Sampler, SamplingParams};
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
    pub max_sessions: usize,
    pub idle_timeout: Duration,
}

/// Facts about a loaded stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageInfo {
    pub n_embd: usize,
    pub n_vocab: usize,
    pub n_layer: u32,
    pub is_first: bool,
    pub is_last: bool,
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
}

#[derive(Debug, Clone, Default)]
pub struct ForwardResult {
    /// Hidden states for the next stage (non-last stages).
    pub hidden: Vec<f32>,
    /// Sampled token (last stage, when asked).
    pub token: Option<i32>,
    pub logits: Option<Vec<f32>>,
    /// Time spent in llama.cpp.
    pub compute: Duration,
}

enum Job {
    Forward(Box<ForwardRequest>, oneshot::Sender<Result<ForwardResult>>),
    Close(u64),
}

/// Handle on a stage thread; dropping it stops the thread.
pub struct StageEngine {
    tx: Option<std::sync::mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    info: StageInfo,
    sessions: Arc<AtomicUsize>,
    /// Forward steps waiting for or running on the stage thread.
    queued: Arc<AtomicUsize>,
}

struct Session {
    ctx: StageContext,
    sampler: Option<Sampler>,
    last_used: Instant,
}

struct Worker {
    spec: StageSpec,
    model: Rc<LoadedModel>,
    pool: Rc<ThreadPool>,
    embeddings: Option<TokenEmbeddings>,
    sessions: HashMap<u64, Session>,
    count: Arc<AtomicUsize>,
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
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<StageInfo>>();
        let sessions = Arc::new(AtomicUsize::new(0));
        let count = sessions.clone();
        let thread = std::thread::Builder::new()
            .name("llama-stage".into())
            .spawn(move || {
                let worker = (|| -> Result<Worker> {
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
                    let pool = ThreadPool::new(spec.settings.threads)?;
                    Ok(Worker {
                        spec,
                        model,
                        pool,
                        embeddings,
                        sessions: HashMap::new(),
                        count,
                    })
                })();
                let mut worker = match worker {
                    Ok(w) => {
                        let _ = ready_tx.send(Ok(StageInfo {
                            n_embd: w.model.n_embd,
                            n_vocab: w.model.n_vocab,
                            n_layer: w.model.n_layer,
                            is_first: w.spec.is_first,
                            is_last: w.spec.is_last,
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
        Ok(StageEngine {
            tx: Some(tx),
            thread: Some(thread),
            info,
            sessions,
            queued: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn info(&self) -> &StageInfo {
        &self.info
    }

    /// Open sessions.
    pub fn active_sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
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

impl Worker {
    fn run(&mut self, rx: std::sync::mpsc::Receiver<Job>) {
        let sweep =
            (self.spec.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            match rx.recv_timeout(sweep) {
                Ok(Job::Forward(req, reply)) => {
                    let r = self.forward(*req);
                    let _ = reply.send(r);
                }
                Ok(Job::Close(id)) => {
                    if self.sessions.remove(&id).is_some() {
                        debug!("session {id:016x} closed");
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
            self.evict_idle();
            self.count.store(self.sessions.len(), Ordering::Relaxed);
        }
        self.sessions.clear();
        self.count.store(0, Ordering::Relaxed);
    }

    fn evict_idle(&mut self) {
        let timeout = self.spec.idle_timeout;
        let before = self.sessions.len();
        self.sessions.retain(|id, s| {
            let keep = s.last_used.elapsed() < timeout;
            if !keep {
                info!("session {id:016x} evicted after {timeout:?} idle");
            }
            keep
        });
        if self.sessions.len() != before {
            self.count.store(self.sessions.len(), Ordering::Relaxed);
        }
    }

    fn forward(&mut self, req: ForwardRequest) -> Result<ForwardResult> {
        let (first, last) = (self.spec.is_first, self.spec.is_last);
        // Check the input before any session is opened for it.
        let n_in = req.input.n_tokens(self.model.n_embd);
        if n_in > self.spec.settings.n_batch as usize {
            return Err(EngineError::InvalidInput(format!(
                "batch of {n_in} tokens exceeds n_batch {} (every worker needs the same n_batch)",
                self.spec.settings.n_batch
            )));
        }
        match (&req.input, first) {
            (StageInput::Tokens(t), true) if t.is_empty() => {
                return Err(EngineError::InvalidInput("no tokens".into()));
            }
            (StageInput::Hidden(_), true) => {
                return Err(EngineError::InvalidInput(
                    "hidden-state input sent to the first stage".into(),
                ));
            }
            (StageInput::Tokens(_), false) => {
                return Err(EngineError::InvalidInput(
                    "token input sent to a stage that is not the first".into(),
                ));
            }
            (StageInput::Hidden(h), false) if h.is_empty() || h.len() % self.model.n_embd != 0 => {
                return Err(EngineError::InvalidInput(format!(
                    "hidden state of {} values is not [n][{}]",
                    h.len(),
                    self.model.n_embd
                )));
            }
            _ => {}
        }
        if req.pos0 == 0 {
            self.sessions.remove(&req.session);
        }
        if !self.sessions.contains_key(&req.session) {
            if req.pos0 != 0 {
                return Err(EngineError::Session(format!(
                    "session {:016x} is not open here (expired or never opened) at position {}",
                    req.session, req.pos0
                )));
            }
            self.evict_idle();
            if self.sessions.len() >= self.spec.max_sessions {
                return Err(EngineError::Busy(format!(
                    "{} sessions open, the limit is {}; try again later",
                    self.sessions.len(),
                    self.spec.max_sessions
                )));
            }
            let ctx = StageContext::new(
                self.model.clone(),
                &self.spec.settings,
                !last,
                Some(self.pool.clone()),
            )?;
            let sampler = if last {
                let p = req.sampling.clone().unwrap_or_default();
                let mut s = Sampler::new(&p, self.model.n_vocab)?;
                s.accept_history(&req.history);
                Some(s)
            } else {
                None
            };
            self.sessions.insert(
                req.session,
                Session {
                    ctx,
                    sampler,
                    last_used: Instant::now(),
                },
            );
            self.count.store(self.sessions.len(), Ordering::Relaxed);
        }
        let n_embd = self.model.n_embd;
        let session = self
            .sessions
            .get_mut(&req.session)
            .ok_or_else(|| EngineError::Session("session vanished".into()))?;
        session.last_used = Instant::now();
        if session.ctx.n_past != req.pos0 {
            return Err(EngineError::Session(format!(
                "position mismatch in session {:016x}: expected {}, got {}",
                req.session, session.ctx.n_past, req.pos0
            )));
        }
        let embedded;
        let input = match (&req.input, first) {
            (StageInput::Tokens(t), true) => {
                let emb = self
                    .embeddings
                    .as_ref()
                    .ok_or_else(|| EngineError::Load("no token embeddings loaded".into()))?;
                embedded = emb.embed(t)?;
                BatchInput::Embeddings(&embedded)
            }
            (StageInput::Hidden(h), false) => {
                if h.is_empty() || h.len() % n_embd != 0 {
                    return Err(EngineError::InvalidInput(format!(
                        "hidden state of {} values is not [n][{n_embd}]",
                        h.len()
                    )));
                }
                BatchInput::Embeddings(h)
            }
            (StageInput::Tokens(_), false) => {
                return Err(EngineError::InvalidInput(
                    "token input sent to a stage that is not the first".into(),
                ));
            }
            (StageInput::Hidden(_), true) => {
                return Err(EngineError::InvalidInput(
                    "hidden-state input sent to the first stage".into(),
                ));
            }
        };
        let t0 = Instant::now();
        let decode = tracing::info_span!(parent: &req.span, "llama.decode", last).entered();
        let r = session.ctx.decode(input, !last);
        drop(decode);
        if let Err(e) = r {
            warn!("session {:016x}: {e}", req.session);
            self.sessions.remove(&req.session);
            return Err(e);
        }
        let mut out = ForwardResult::default();
        if last {
            let logits = session.ctx.last_logits()?;
            if req.sample {
                let _sampling = tracing::info_span!(parent: &req.span, "sampling").entered();
                let s = session
                    .sampler
                    .as_mut()
                    .ok_or_else(|| EngineError::Session("no sampler".into()))?;
                out.token = Some(s.sample(logits)?);
            }
            if req.want_logits {
                out.logits = Some(logits.to_vec());
            }
        } else {
            out.hidden = session.ctx.take_hidden();
        }
        out.compute = t0.elapsed();
        Ok(out)
    }
}
