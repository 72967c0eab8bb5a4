//! Admission of requests this worker drives: routes planned over the
//! stages with free sessions (live figures from the stages' answers, and
//! the sessions this driver holds), and a bounded FIFO queue for requests
//! that find no free capacity.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use llama_cluster_shared::status::{Availability, ShardStatus};
use tokio::sync::Notify;

use super::Pipeline;
use super::host::PipelineError;
use super::route::{self, PlanError};
use crate::net::frame::{Hop, HopStats};

/// How long a driver that finds no route looks for shard records in the
/// DHT before it answers "no route".
const ROUTE_LOOKUP: Duration = Duration::from_secs(3);

/// How long a stage's reported session count is trusted.
const LIVE_FOR: Duration = Duration::from_secs(2);

/// What the driver knows of stages' capacity, and who waits for it.
#[derive(Default)]
pub(crate) struct Admission {
    inner: Mutex<AdmissionInner>,
    /// Woken when a session of this driver ends or a stage reports room.
    changed: Notify,
    next_ticket: AtomicU64,
}

#[derive(Default)]
struct AdmissionInner {
    /// Requests waiting, oldest first.
    queue: VecDeque<u64>,
    /// Sessions this driver holds per stage peer.
    held: HashMap<String, u32>,
    /// Open sessions and session limit each stage last reported, and when.
    live: HashMap<String, (u32, u32, Instant)>,
}

/// Stage sessions a request holds; given back when dropped.
pub(crate) struct Held<'a> {
    admission: &'a Admission,
    peers: Vec<String>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        {
            let mut a = self.admission.lock();
            for p in &self.peers {
                if let Some(n) = a.held.get_mut(p) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        a.held.remove(p);
                    }
                }
                // The session is closed: one fewer than the stage said.
                if let Some(live) = a.live.get_mut(p) {
                    live.0 = live.0.saturating_sub(1);
                }
            }
        }
        self.admission.changed.notify_waiters();
    }
}

/// A place in the queue, left when dropped (also when the request's
/// future is dropped because its client went away).
struct Ticket<'a> {
    admission: &'a Admission,
    id: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.admission.lock().queue.retain(|t| *t != self.id);
        crate::metrics::metrics()
            .requests_queued
            .set(self.admission.queued() as i64);
        self.admission.changed.notify_waiters();
    }
}

impl Admission {
    fn lock(&self) -> std::sync::MutexGuard<'_, AdmissionInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests waiting for capacity.
    pub(crate) fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    /// Records the figures a step's answer carried.
    pub(crate) fn note(&self, hops: &[HopStats]) {
        let mut room = false;
        {
            let mut a = self.lock();
            for h in hops.iter().filter(|h| h.max_sessions > 0) {
                let (open, max) = (h.open_sessions as u32, h.max_sessions as u32);
                let before = a.live.insert(h.peer.clone(), (open, max, Instant::now()));
                room |= before.is_some_and(|(o, m, _)| o >= m) && open < max;
            }
        }
        if room {
            self.changed.notify_waiters();
        }
    }

    /// A stage answered that it is full.
    pub(crate) fn note_full(&self, peer: &str) {
        let mut a = self.lock();
        let max = a.live.get(peer).map(|l| l.1).unwrap_or(1).max(1);
        a.live.insert(peer.to_string(), (max, max, Instant::now()));
    }

    /// The shards with the driver's view of their load: the figures the
    /// stage reported lately, else the sessions this driver holds there.
    fn with_live_load(
        &self,
        shards: &[ShardStatus],
        me: &str,
        local: (u32, u32),
    ) -> Vec<ShardStatus> {
        let a = self.lock();
        shards
            .iter()
            .map(|s| {
                let mut s = s.clone();
                let held = a.held.get(&s.peer_id).copied().unwrap_or(0);
                if s.peer_id == me {
                    (s.load, s.max_sessions) = local;
                } else if let Some((open, max, at)) = a.live.get(&s.peer_id)
                    && at.elapsed() < LIVE_FOR
                {
                    s.load = *open;
                    s.max_sessions = *max;
                } else {
                    s.load = 0;
                }
                s.load = s.load.max(held);
                s
            })
            .collect()
    }
}

impl Pipeline {
    /// Plans a route over stages with a free session, avoiding `excluded`
    /// peers, and takes a session on each stage of it.
    pub(crate) fn plan_free(
        &self,
        model: &str,
        n_layer: u32,
        excluded: &HashSet<String>,
    ) -> Result<(Vec<Hop>, Held<'_>), PlanError> {
        let snapshot = self.0.state.snapshot();
        let shards: Vec<ShardStatus> = snapshot
            .shards
            .into_iter()
            .map(|mut s| {
                if excluded.contains(&s.peer_id) {
                    s.availability = Availability::Offline;
                }
                s
            })
            .collect();
        let local = (self.active_sessions(), self.max_sessions());
        let a = &self.0.admission;
        let shards = a.with_live_load(&shards, &self.0.me, local);
        let hops = route::plan_free(&shards, model, n_layer)?;
        let peers: Vec<String> = hops.iter().map(|h| h.peer.clone()).collect();
        {
            let mut inner = a.lock();
            for p in &peers {
                *inner.held.entry(p.clone()).or_default() += 1;
            }
        }
        Ok((
            hops,
            Held {
                admission: a,
                peers,
            },
        ))
    }

    /// Waits in the FIFO queue until a route with free sessions exists
    /// (bounded by `queue_timeout` and `max_queued`), or fails at once when
    /// a layer range has no live replica. `gone` resolves when the client
    /// went away (the request leaves the queue).
    pub(crate) async fn admit(
        &self,
        model: &str,
        n_layer: u32,
        excluded: &HashSet<String>,
        deadline: Instant,
        gone: &tokio::sync::mpsc::Sender<super::driver::Chunk>,
    ) -> Result<(Vec<Hop>, Held<'_>), PipelineError> {
        let a = &self.0.admission;
        let cfg = &self.0.cfg;
        let mut looked_up = false;
        // Nobody waiting and room now: no queue.
        if a.lock().queue.is_empty()
            && let Some(r) = self
                .try_plan(model, n_layer, excluded, &mut looked_up)
                .await?
        {
            return Ok(r);
        }
        let id = a.next_ticket.fetch_add(1, Ordering::Relaxed);
        {
            let mut inner = a.lock();
            if inner.queue.len() >= cfg.max_queued {
                crate::metrics::metrics().requests_refused.inc();
                return Err(PipelineError::ResourceExhausted(format!(
                    "every session of the route is busy and {} requests are queued (max_queued {}); try again later",
                    inner.queue.len(),
                    cfg.max_queued
                )));
            }
            inner.queue.push_back(id);
        }
        let _ticket = Ticket { admission: a, id };
        crate::metrics::metrics()
            .requests_queued
            .set(a.queued() as i64);
        let started = Instant::now();
        loop {
            // Registered before looking, so that a change meanwhile wakes it.
            let changed = a.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let first = a.lock().queue.front() == Some(&id);
            if first
                && let Some(r) = self
                    .try_plan(model, n_layer, excluded, &mut looked_up)
                    .await?
            {
                crate::metrics::metrics()
                    .queue_wait
                    .observe(started.elapsed().as_secs_f64());
                a.changed.notify_waiters();
                return Ok(r);
            }
            if Instant::now() >= deadline {
                crate::metrics::metrics().requests_refused.inc();
                return Err(PipelineError::ResourceExhausted(format!(
                    "no free session on a route for {:.0} s (queue_timeout_secs {}); {} requests queued (max_queued {})",
                    started.elapsed().as_secs_f64(),
                    cfg.queue_timeout.as_secs(),
                    a.queued(),
                    cfg.max_queued
                )));
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = gone.closed() => {
                    return Err(PipelineError::Cancelled("the client went away while queued".into()));
                }
            }
        }
    }

    /// A route with free sessions (`None`: every replica of a range is
    /// busy); an error when a range has no live replica, after one lookup
    /// of the shard records.
    async fn try_plan(
        &self,
        model: &str,
        n_layer: u32,
        excluded: &HashSet<String>,
        looked_up: &mut bool,
    ) -> Result<Option<(Vec<Hop>, Held<'_>)>, PipelineError> {
        loop {
            match self.plan_free(model, n_layer, excluded) {
                Ok(r) => return Ok(Some(r)),
                Err(PlanError::Full { .. }) => return Ok(None),
                Err(e @ PlanError::NoRoute { .. }) if *looked_up => {
                    // Name the range from the manifest when no record of
                    // it is left.
                    let ranges: Vec<(u32, u32, String)> = match self.model_info().await {
                        Ok(info) => info
                            .manifest
                            .shards
                            .iter()
                            .map(|s| (s.layer_start, s.layer_end, s.id.clone()))
                            .collect(),
                        Err(_) => vec![],
                    };
                    return Err(PipelineError::Unavailable(
                        e.with_ranges(&ranges).to_string(),
                    ));
                }
                Err(e @ PlanError::NoRoute { .. }) => {
                    // A shard loaded a moment ago may not have reached
                    // this worker yet.
                    self.lookup_shards(model, n_layer, &e).await;
                    *looked_up = true;
                }
            }
        }
    }

    /// Looks the model's shard records up in the DHT until a route exists
    /// (ignoring capacity), for at most [`ROUTE_LOOKUP`]: a shard loaded a
    /// moment ago may not have reached this worker's view yet.
    async fn lookup_shards(&self, model: &str, n_layer: u32, missing: &PlanError) {
        let Ok(info) = self.model_info().await else {
            return;
        };
        let ids: Vec<String> = info.manifest.shards.iter().map(|s| s.id.clone()).collect();
        tracing::debug!("[PIPELINE] {missing}; looking up the model's shard records");
        let deadline = Instant::now() + ROUTE_LOOKUP;
        let mut tick = 0u32;
        while Instant::now() < deadline {
            // Again every second: a record published while the first
            // lookup ran may have missed it.
            if tick.is_multiple_of(10) {
                self.0.net.query_shards(ids.clone());
            }
            tick += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            if route::plan(&self.0.state.snapshot().shards, model, n_layer).is_ok() {
                return;
            }
        }
    }
}
