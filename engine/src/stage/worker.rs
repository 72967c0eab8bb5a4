//! The stage thread: sessions, rounds of batched steps, answers.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::waves::{Waves, runs};
use super::{
    AUTO_MAX_SESSIONS, ForwardRequest, ForwardResult, Job, Reply, StageCounters, StageInput,
    StageSpec,
};
use crate::batched::{Item, SharedContext};
use crate::ffi::{LoadedModel, TokenEmbeddings};
use crate::sampling::{Sampler, TokenLogprobs};
use crate::{EngineError, Result};

/// The longest a round waits for the steps of other sessions …
const GATHER_MAX: Duration = Duration::from_millis(5);
/// … and at least (a round of a small model takes less than the trip of
/// a step through the other stages).
const GATHER_MIN: Duration = Duration::from_millis(2);

pub(super) struct Session {
    seq: i32,
    n_past: u32,
    sampler: Option<Sampler>,
    last_used: Instant,
    /// Stages in the session's route (from its last step).
    depth: u32,
}

/// A step checked and ready for llama.cpp.
struct Ready {
    req: Box<ForwardRequest>,
    reply: Reply,
    seq: i32,
    rows: Vec<f32>,
}

pub(super) struct Worker {
    pub(super) spec: StageSpec,
    pub(super) model: Rc<LoadedModel>,
    pub(super) ctx: SharedContext,
    pub(super) embeddings: Option<TokenEmbeddings>,
    pub(super) sessions: HashMap<u64, Session>,
    /// Sequence ids not in use; the lowest is taken first, so that busy
    /// sessions tend to hold a run of consecutive ids (llama.cpp decodes
    /// consecutive runs in one micro-batch).
    pub(super) free: BTreeSet<i32>,
    pub(super) pending: VecDeque<(Box<ForwardRequest>, Reply)>,
    pub(super) count: Arc<AtomicUsize>,
    pub(super) counters: Arc<StageCounters>,
    /// The block of sessions ([`Waves`]) whose turn comes next.
    pub(super) next_block: usize,
}

/// How many sessions fit: `max` (0: as many as the budget allows, at most
/// [`AUTO_MAX_SESSIONS`]) against `budget` bytes (0: unchecked).
pub(super) fn session_limit(max: usize, per: u64, budget: u64) -> Result<usize> {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let fits = if budget == 0 {
        usize::MAX
    } else {
        (budget / per.max(1)) as usize
    };
    let n = if max == 0 {
        fits.min(AUTO_MAX_SESSIONS)
    } else {
        max
    };
    if n == 0 || n > fits {
        return Err(EngineError::Load(format!(
            "{} sessions need {:.1} MiB of KV cache ({:.1} MiB each); the memory left for it is {:.1} MiB: lower max_sessions or n_ctx, or give the worker more memory",
            n.max(1),
            mib(per * n.max(1) as u64),
            mib(per),
            mib(budget)
        )));
    }
    Ok(n)
}

impl Worker {
    pub(super) fn run(&mut self, rx: std::sync::mpsc::Receiver<Job>) {
        let sweep =
            (self.spec.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let mut last_round = Duration::ZERO;
        'outer: loop {
            if self.pending.is_empty() {
                match rx.recv_timeout(sweep) {
                    Ok(job) => self.accept(job),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            // Everything that arrived meanwhile joins this round.
            loop {
                match rx.try_recv() {
                    Ok(job) => self.accept(job),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => break 'outer,
                }
            }
            // Steps of other open sessions are on their way back from the
            // other stages: wait for them a moment (about one round, within
            // [GATHER_MIN, GATHER_MAX]; never with one session), so that
            // they share the next call. On a route of D stages a wave is
            // a block of 1/D of the sessions: the others are at the other
            // stages.
            let gather_until = Instant::now() + last_round.clamp(GATHER_MIN, GATHER_MAX);
            while !self.pending.is_empty() && !self.wave_ready() {
                match rx.recv_timeout(gather_until.saturating_duration_since(Instant::now())) {
                    Ok(job) => self.accept(job),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break 'outer,
                }
            }
            self.evict_idle();
            if !self.pending.is_empty() {
                let t0 = Instant::now();
                self.round();
                last_round = t0.elapsed();
            }
            self.count.store(self.sessions.len(), Ordering::Relaxed);
        }
        self.sessions.clear();
        self.count.store(0, Ordering::Relaxed);
    }

    /// The open sessions in blocks of consecutive sequence ids, one block
    /// per stage of their routes: on a route of D stages D waves take
    /// turns and every stage computes one while the others compute theirs;
    /// all sessions in one on a route of one.
    fn waves(&self) -> Waves {
        let depth = self.sessions.values().map(|s| s.depth).max().unwrap_or(1);
        Waves::new(
            self.sessions.iter().map(|(id, s)| (*id, s.seq)),
            depth as usize,
        )
    }

    /// Open sessions with a step waiting.
    fn waiting_sessions(&self) -> HashSet<u64> {
        self.pending
            .iter()
            .map(|(r, _)| r.session)
            .filter(|id| self.sessions.contains_key(id))
            .collect()
    }

    /// Sessions whose first waiting step is a single token (in order).
    fn waiting_singles(&self) -> Vec<u64> {
        let n_embd = self.model.n_embd;
        let mut seen = HashSet::new();
        self.pending
            .iter()
            .filter(|(r, _)| seen.insert(r.session) && r.input.n_tokens(n_embd) <= 1)
            .map(|(r, _)| r.session)
            .collect()
    }

    /// Whether the round may start: every session of the block whose turn
    /// it is has its step here; with no single-token step waiting, a
    /// wave's worth of sessions has a step here (a prompt chunk waits a
    /// moment for the decode steps on their way).
    fn wave_ready(&self) -> bool {
        let waves = self.waves();
        let with_step = self.waiting_sessions();
        match waves.turn(self.next_block, self.waiting_singles()) {
            Some(b) => waves.complete(b, &with_step),
            None => with_step.len() >= waves.size(),
        }
    }

    fn accept(&mut self, job: Job) {
        match job {
            Job::Forward(req, reply) => self.pending.push_back((req, reply)),
            Job::Close(id) => {
                if self.drop_session(id) {
                    debug!("session {id:016x} closed");
                }
            }
        }
    }

    fn drop_session(&mut self, id: u64) -> bool {
        match self.sessions.remove(&id) {
            Some(s) => {
                self.ctx.clear(s.seq);
                self.free.insert(s.seq);
                self.count.store(self.sessions.len(), Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    fn evict_idle(&mut self) {
        let timeout = self.spec.idle_timeout;
        let stale: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.last_used.elapsed() >= timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            info!("session {id:016x} freed: no step for {timeout:?}");
            self.drop_session(id);
        }
    }

    /// One round: the single-token steps of the block whose turn it is
    /// (and of sessions not open yet, while there is room) in one
    /// `llama_decode`, then the oldest multi-token step alone.
    fn round(&mut self) {
        let n_embd = self.model.n_embd;
        let n_batch = self.spec.settings.n_batch as usize;
        let waves = self.waves();
        let block = waves.turn(self.next_block, self.waiting_singles());
        if let Some(b) = block {
            self.next_block = (b + 1) % waves.count();
        }
        let room = n_batch.min(waves.size());
        let mut singles = Vec::new();
        let mut multi = None;
        let mut seen = HashSet::new();
        let mut rest = VecDeque::new();
        for (req, reply) in std::mem::take(&mut self.pending) {
            let n = req.input.n_tokens(n_embd);
            // Only the first waiting step of a session may run.
            let first = seen.insert(req.session);
            let in_turn = waves.block_of(req.session).is_none_or(|b| Some(b) == block);
            if first && n <= 1 && in_turn && singles.len() < room {
                singles.push((req, reply));
            } else if first && n > 1 && multi.is_none() {
                multi = Some((req, reply));
            } else {
                rest.push_back((req, reply));
            }
        }
        self.pending = rest;
        let mut ready: Vec<Ready> = singles
            .into_iter()
            .filter_map(|(req, reply)| self.prepare(req, reply))
            .collect();
        if !ready.is_empty() {
            ready.sort_by_key(|r| r.seq);
            self.run_batch(ready);
        }
        if let Some((req, reply)) = multi
            && let Some(r) = self.prepare(req, reply)
        {
            self.run_batch(vec![r]);
        }
    }

    /// Checks a step, opens its session at position 0, and looks up token
    /// embeddings; a step that cannot run is answered here.
    fn prepare(&mut self, req: Box<ForwardRequest>, reply: Reply) -> Option<Ready> {
        match self.try_prepare(&req) {
            Ok((seq, rows)) => Some(Ready {
                req,
                reply,
                seq,
                rows,
            }),
            Err(e) => {
                let _ = reply.send(Err(e));
                None
            }
        }
    }

    fn try_prepare(&mut self, req: &ForwardRequest) -> Result<(i32, Vec<f32>)> {
        let first = self.spec.is_first;
        let n_embd = self.model.n_embd;
        let n_in = req.input.n_tokens(n_embd);
        if n_in > self.spec.settings.n_batch as usize {
            return Err(EngineError::InvalidInput(format!(
                "batch of {n_in} tokens exceeds n_batch {} (every worker needs the same n_batch)",
                self.spec.settings.n_batch
            )));
        }
        let rows = match (&req.input, first) {
            (StageInput::Tokens(t), true) if t.is_empty() => {
                return Err(EngineError::InvalidInput("no tokens".into()));
            }
            (StageInput::Tokens(t), true) => self
                .embeddings
                .as_ref()
                .ok_or_else(|| EngineError::Load("no token embeddings loaded".into()))?
                .embed(t)?,
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
            (StageInput::Hidden(h), false) if h.is_empty() || h.len() % n_embd != 0 => {
                return Err(EngineError::InvalidInput(format!(
                    "hidden state of {} values is not [n][{n_embd}]",
                    h.len()
                )));
            }
            (StageInput::Hidden(h), false) => h.clone(),
        };
        if req.pos0 as usize + n_in > self.ctx.n_ctx() as usize {
            return Err(EngineError::InvalidInput(format!(
                "context full: {} + {n_in} tokens exceed {}",
                req.pos0,
                self.ctx.n_ctx()
            )));
        }
        if req.pos0 == 0 {
            let seq = match self.sessions.remove(&req.session) {
                Some(old) => old.seq,
                None => self.free.pop_first().ok_or_else(|| {
                    EngineError::Busy(format!(
                        "{} sessions open, the limit is {}; try again later",
                        self.sessions.len(),
                        self.ctx.n_seq()
                    ))
                })?,
            };
            self.ctx.clear(seq);
            let sampler = if self.spec.is_last {
                let p = req.sampling.clone().unwrap_or_default();
                match Sampler::new(&p, self.model.n_vocab) {
                    Ok(mut s) => {
                        s.accept_history(&req.history);
                        Some(s)
                    }
                    Err(e) => {
                        self.free.insert(seq);
                        return Err(e);
                    }
                }
            } else {
                None
            };
            self.sessions.insert(
                req.session,
                Session {
                    seq,
                    n_past: 0,
                    sampler,
                    last_used: Instant::now(),
                    depth: req.depth.max(1),
                },
            );
            self.count.store(self.sessions.len(), Ordering::Relaxed);
        }
        let session = self.sessions.get_mut(&req.session).ok_or_else(|| {
            EngineError::Session(format!(
                "session {:016x} is not open here (expired or never opened) at position {}",
                req.session, req.pos0
            ))
        })?;
        if session.n_past != req.pos0 {
            return Err(EngineError::Session(format!(
                "position mismatch in session {:016x}: expected {}, got {}",
                req.session, session.n_past, req.pos0
            )));
        }
        session.last_used = Instant::now();
        Ok((session.seq, rows))
    }

    /// Decodes `ready` (sorted by sequence id) in one call and answers each.
    fn run_batch(&mut self, ready: Vec<Ready>) {
        let last = self.spec.is_last;
        let n_embd = self.model.n_embd;
        let t0 = Instant::now();
        let result = {
            let items: Vec<Item<'_>> = ready
                .iter()
                .map(|r| Item {
                    seq: r.seq,
                    pos0: r.req.pos0,
                    rows: &r.rows,
                })
                .collect();
            let _decode = tracing::info_span!(
                parent: &ready[0].req.span,
                "llama.decode",
                last,
                batch = ready.len()
            )
            .entered();
            self.ctx.decode(&items, !last)
        };
        let compute = t0.elapsed();
        let c = self.counters.clone();
        c.decode_calls.fetch_add(1, Ordering::Relaxed);
        c.steps.fetch_add(ready.len() as u64, Ordering::Relaxed);
        c.max_steps.fetch_max(ready.len() as u64, Ordering::Relaxed);
        c.micro_batches
            .fetch_add(runs(ready.iter().map(|r| r.seq)) as u64, Ordering::Relaxed);
        c.busy_ns
            .fetch_add(compute.as_nanos() as u64, Ordering::Relaxed);
        let last_index = match result {
            Ok(ix) => ix,
            Err(e) => {
                for r in ready {
                    warn!("session {:016x}: {e}", r.req.session);
                    self.drop_session(r.req.session);
                    let _ = r.reply.send(Err(EngineError::Llama(e.to_string())));
                }
                return;
            }
        };
        let batched = ready.len() as u32;
        let mut offset = 0usize;
        for (r, idx) in ready.into_iter().zip(last_index) {
            let n = r.rows.len() / n_embd;
            c.rows.fetch_add(n as u64, Ordering::Relaxed);
            let out = self.finish(&r, idx, offset, n, compute, batched);
            offset += n;
            let _ = r.reply.send(out);
        }
    }

    fn finish(
        &mut self,
        r: &Ready,
        idx: i32,
        offset: usize,
        n: usize,
        compute: Duration,
        batched: u32,
    ) -> Result<ForwardResult> {
        let n_embd = self.model.n_embd;
        let session = self
            .sessions
            .get_mut(&r.req.session)
            .ok_or_else(|| EngineError::Session("session vanished".into()))?;
        session.n_past += n as u32;
        let mut out = ForwardResult {
            compute,
            batched,
            ..Default::default()
        };
        if self.spec.is_last {
            let logits = self.ctx.logits(idx)?;
            if r.req.sample {
                let _sampling = tracing::info_span!(parent: &r.req.span, "sampling").entered();
                let s = session
                    .sampler
                    .as_mut()
                    .ok_or_else(|| EngineError::Session("no sampler".into()))?;
                let token = s.sample(logits, session.n_past)?;
                out.logprobs = s
                    .logprobs()
                    .map(|k| TokenLogprobs::of(logits, token, k as usize));
                out.token = Some(token);
            }
            if r.req.want_logits {
                out.logits = Some(logits.to_vec());
            }
        } else {
            out.hidden = self.ctx.hidden()[offset * n_embd..(offset + n) * n_embd].to_vec();
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_limit_follows_memory() {
        let mib = 1u64 << 20;
        assert_eq!(session_limit(0, 10 * mib, 0).unwrap(), AUTO_MAX_SESSIONS);
        assert_eq!(session_limit(0, 10 * mib, 35 * mib).unwrap(), 3);
        assert_eq!(session_limit(4, 10 * mib, 40 * mib).unwrap(), 4);
        let e = session_limit(5, 10 * mib, 40 * mib)
            .unwrap_err()
            .to_string();
        assert!(e.contains("5 sessions need 50.0 MiB"), "{e}");
        assert!(session_limit(0, 10 * mib, 5 * mib).is_err());
    }
}
