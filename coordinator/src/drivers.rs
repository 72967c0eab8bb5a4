//! Requests to the workers that drive a model:
//!
//! - **admission**: a request runs when the cluster has a free session for
//!   it (its session capacity: per layer range, the sum of the replicas'
//!   session limits; the smallest range counts), else it waits in a bounded
//!   FIFO queue (`max_queued`, `queue_timeout_secs`); beyond those it is
//!   refused with RESOURCE_EXHAUSTED and the queue's figures;
//! - **load spread**: each request goes to the driver with the fewest
//!   requests in flight, over gRPC channels kept per driver;
//! - **failover**: when a driver's stream breaks before its statistics, the
//!   driver leaves the set at once (until a poll finds it answering again)
//!   and the request goes on at another driver from the tokens already
//!   delivered (`resume_token_ids`); the client sees one stream. A driver
//!   that hangs or drops off the network without closing its connections
//!   (a stopped process, a machine without power) is found by HTTP/2 pings
//!   it no longer answers within `driver_timeout`: its connection is closed
//!   and its streams break and resume the same way.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use llama_cluster_proto::v1::inference_response::Event;
use llama_cluster_proto::v1::worker_client::WorkerClient;
use llama_cluster_proto::v1::{GetStatusResponse, InferenceRequest, InferenceResponse};
use llama_cluster_shared::auth::{Class, Tokens};
use tokio::sync::{Notify, mpsc};
use tonic::Status;
use tonic::transport::Channel;
use tracing::{Instrument, info, warn};

/// A stream of a request's answers.
pub type Answers = tokio_stream::wrappers::ReceiverStream<Result<InferenceResponse, Status>>;

#[derive(Clone)]
pub struct Drivers(Arc<Inner>);

struct Inner {
    state: Mutex<DriverState>,
    changed: Notify,
    max_queued: usize,
    queue_timeout: Duration,
    /// Drivers a request may try (the first one included).
    max_attempts: usize,
    /// How long a driver may leave an HTTP/2 ping unanswered.
    driver_timeout: Duration,
    next_ticket: AtomicU64,
    /// The API token is sent to the drivers and asked of clients.
    tokens: Tokens,
}

#[derive(Default)]
struct DriverState {
    /// (model, driver address) from the last poll.
    drivers: Vec<(String, String)>,
    /// Sessions the cluster runs at once, per model (absent: unknown).
    capacity: HashMap<String, u32>,
    channels: HashMap<String, Channel>,
    in_flight: HashMap<String, u32>,
    running: HashMap<String, u32>,
    /// Drivers whose stream or connection broke, until a poll finds them.
    down: HashSet<String>,
    queue: VecDeque<u64>,
    /// Waits of admitted requests: (when, how long).
    waits: VecDeque<(Instant, Duration)>,
}

/// What the coordinator's status reports of admission.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdmissionFigures {
    pub queued: u32,
    pub in_flight: u32,
    pub capacity: u32,
    pub wait_ms_max: f64,
}

/// Sessions `model` can run at once from the workers' statuses: per layer
/// range, the sum of the session limits of its ready replicas; the
/// smallest range bounds the whole (0: a limit is unknown).
pub fn session_capacity(statuses: &[(String, GetStatusResponse)], model: &str) -> u32 {
    let mut per_range: HashMap<(u32, u32), u32> = HashMap::new();
    let mut unknown = false;
    for (_, st) in statuses {
        for s in st
            .shards
            .iter()
            .filter(|s| s.model == model && s.availability == "LOCAL" && s.state == "ready")
        {
            unknown |= s.max_sessions == 0;
            *per_range.entry((s.layer_start, s.layer_end)).or_default() += s.max_sessions;
        }
    }
    if unknown {
        return 0;
    }
    per_range.values().copied().min().unwrap_or(0)
}

/// Gives a running request's place back when dropped.
struct Running {
    drivers: Drivers,
    model: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(n) = self.drivers.lock().running.get_mut(&self.model) {
            *n = n.saturating_sub(1);
        }
        self.drivers.0.changed.notify_waiters();
        self.drivers.publish_metrics();
    }
}

struct Ticket<'a> {
    drivers: &'a Drivers,
    id: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.drivers.lock().queue.retain(|t| *t != self.id);
        self.drivers.0.changed.notify_waiters();
        self.drivers.publish_metrics();
    }
}

impl Drivers {
    /// `max_attempts`: drivers one request may try (1: no failover);
    /// `driver_timeout`: how long a driver may leave a ping unanswered
    /// before its streams move to another.
    pub fn new(
        max_queued: usize,
        queue_timeout: Duration,
        max_attempts: usize,
        driver_timeout: Duration,
        tokens: Tokens,
    ) -> Self {
        Drivers(Arc::new(Inner {
            state: Mutex::new(DriverState::default()),
            changed: Notify::new(),
            max_queued,
            queue_timeout,
            max_attempts: max_attempts.max(1),
            driver_timeout: driver_timeout.max(Duration::from_secs(1)),
            next_ticket: AtomicU64::new(0),
            tokens,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DriverState> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A poll's outcome: who drives which model, the capacity, and the
    /// drivers that answered (no longer down).
    pub fn update(&self, drivers: Vec<(String, String)>, statuses: &[(String, GetStatusResponse)]) {
        let models: HashSet<String> = drivers.iter().map(|(m, _)| m.clone()).collect();
        {
            let mut g = self.lock();
            for (addr, _) in statuses {
                if g.down.remove(addr) {
                    info!("[API] driver {addr} answers again");
                }
            }
            g.capacity = models
                .iter()
                .map(|m| (m.clone(), session_capacity(statuses, m)))
                .filter(|(_, c)| *c > 0)
                .collect();
            g.drivers = drivers;
        }
        self.0.changed.notify_waiters();
    }

    /// Requests of `model` the cluster holds at most at once: its sessions
    /// (from the last poll) and the queue's bound; `None` before a poll.
    pub fn room(&self, model: &str) -> Option<usize> {
        let g = self.lock();
        g.capacity
            .get(model)
            .map(|c| *c as usize + self.0.max_queued)
    }

    /// Before the first poll: who drives what, asked of the workers now.
    pub async fn learn_if_empty(&self, workers: &crate::workers::WorkerSet) {
        if !self.lock().drivers.is_empty() {
            return;
        }
        let served = workers.served().await;
        let mut g = self.lock();
        if g.drivers.is_empty() {
            g.drivers = served;
        }
    }

    /// The tokens clients must present.
    pub fn tokens(&self) -> &Tokens {
        &self.0.tokens
    }

    /// The models some driver serves.
    pub fn models(&self) -> Vec<String> {
        let g = self.lock();
        let m: std::collections::BTreeSet<String> =
            g.drivers.iter().map(|(m, _)| m.clone()).collect();
        m.into_iter().collect()
    }

    pub fn figures(&self) -> AdmissionFigures {
        let mut g = self.lock();
        let minute = Duration::from_secs(60);
        while g.waits.front().is_some_and(|(at, _)| at.elapsed() > minute) {
            g.waits.pop_front();
        }
        AdmissionFigures {
            queued: g.queue.len() as u32,
            in_flight: g.running.values().sum(),
            capacity: g.capacity.values().sum(),
            wait_ms_max: g
                .waits
                .iter()
                .map(|(_, w)| w.as_secs_f64() * 1000.0)
                .fold(0.0, f64::max),
        }
    }

    fn publish_metrics(&self) {
        let f = self.figures();
        let m = crate::metrics::metrics();
        m.requests_queued.set(f.queued as i64);
    }

    /// The driver of `model` with the fewest requests in flight, not down
    /// and not tried yet; its kept channel.
    fn pick(&self, model: &str, tried: &HashSet<String>) -> Option<(String, Channel)> {
        let mut g = self.lock();
        let addr = g
            .drivers
            .iter()
            .filter(|(m, a)| m == model && !g.down.contains(a) && !tried.contains(a))
            .map(|(_, a)| a.clone())
            .min_by_key(|a| (g.in_flight.get(a).copied().unwrap_or(0), a.clone()))?;
        let ch = match g.channels.get(&addr) {
            Some(c) => c.clone(),
            None => {
                // A ping once the connection has been quiet for half the
                // timeout (at most 5 s), answered by the worker's runtime
                // however busy its llama.cpp thread is, within the rest:
                // a silent driver is found within the timeout.
                let timeout = self.0.driver_timeout;
                let interval = (timeout / 2).min(Duration::from_secs(5));
                let c = crate::tls::endpoint(&addr)
                    .ok()?
                    .connect_timeout(Duration::from_secs(3))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(interval)
                    .keep_alive_timeout(timeout - interval)
                    .keep_alive_while_idle(true)
                    .connect_lazy();
                g.channels.insert(addr.clone(), c.clone());
                c
            }
        };
        *g.in_flight.entry(addr.clone()).or_default() += 1;
        Some((addr, ch))
    }

    fn done_with(&self, addr: &str) {
        if let Some(n) = self.lock().in_flight.get_mut(addr) {
            *n = n.saturating_sub(1);
        }
    }

    fn mark_down(&self, addr: &str, why: &Status) {
        let mut g = self.lock();
        if g.down.insert(addr.to_string()) {
            warn!(
                "[API] driver {addr} left the set: {} (back once it answers a poll)",
                why.message()
            );
        }
        g.channels.remove(addr);
    }

    /// Waits for a free session of `model` in the FIFO queue.
    async fn admit(&self, model: &str) -> Result<Running, Status> {
        let id = self.0.next_ticket.fetch_add(1, Ordering::Relaxed);
        {
            let mut g = self.lock();
            let running = g.running.get(model).copied().unwrap_or(0);
            if g.queue.is_empty() && g.capacity.get(model).is_none_or(|c| running < *c) {
                *g.running.entry(model.to_string()).or_default() += 1;
                g.waits.push_back((Instant::now(), Duration::ZERO));
                drop(g);
                crate::metrics::metrics().queue_wait.observe(0.0);
                return Ok(Running {
                    drivers: self.clone(),
                    model: model.to_string(),
                });
            }
            if g.queue.len() >= self.0.max_queued {
                crate::metrics::metrics().requests_refused.inc();
                return Err(Status::resource_exhausted(format!(
                    "the cluster is busy: {} requests running, {} queued (max_queued {}); try again later",
                    g.running.get(model).copied().unwrap_or(0),
                    g.queue.len(),
                    self.0.max_queued
                )));
            }
            g.queue.push_back(id);
        }
        let _ticket = Ticket { drivers: self, id };
        self.publish_metrics();
        let started = Instant::now();
        let deadline = started + self.0.queue_timeout;
        loop {
            let changed = self.0.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut g = self.lock();
                let running = g.running.get(model).copied().unwrap_or(0);
                let room = g.capacity.get(model).is_none_or(|c| running < *c);
                if g.queue.front() == Some(&id) && room {
                    *g.running.entry(model.to_string()).or_default() += 1;
                    g.waits.push_back((Instant::now(), started.elapsed()));
                    drop(g);
                    crate::metrics::metrics()
                        .queue_wait
                        .observe(started.elapsed().as_secs_f64());
                    self.0.changed.notify_waiters();
                    return Ok(Running {
                        drivers: self.clone(),
                        model: model.to_string(),
                    });
                }
            }
            if Instant::now() >= deadline {
                let g = self.lock();
                crate::metrics::metrics().requests_refused.inc();
                return Err(Status::resource_exhausted(format!(
                    "no free session for {:.0} s (queue_timeout_secs {}): {} requests running on {} sessions, {} queued",
                    started.elapsed().as_secs_f64(),
                    self.0.queue_timeout.as_secs(),
                    g.running.get(model).copied().unwrap_or(0),
                    g.capacity.get(model).copied().unwrap_or(0),
                    g.queue.len()
                )));
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
    }

    /// Runs `req`: admission, a driver, failover. Errors found before the
    /// first answer (bad input, no driver, a full queue) are returned here.
    pub async fn run(&self, mut req: InferenceRequest) -> Result<Answers, Status> {
        if req.model.is_empty() {
            req.model = self.models().into_iter().next().unwrap_or_default();
        }
        let model = req.model.clone();
        if !self.lock().drivers.iter().any(|(m, _)| *m == model) {
            return Err(Status::not_found(format!(
                "no worker drives model {model:?}; served: {:?}",
                self.models()
            )));
        }
        let running = self.admit(&model).await?;
        let (tx, mut rx) = mpsc::channel(64);
        let me = self.clone();
        // The forwarding task continues the caller's span: the driver's
        // spans join the caller's trace.
        tokio::spawn(
            async move {
                let _running = running;
                me.forward(req, tx).await;
            }
            .in_current_span(),
        );
        // The first answer decides between an error status and a stream.
        match rx.recv().await {
            Some(Err(s)) => Err(s),
            Some(Ok(first)) => {
                let (tx2, rx2) = mpsc::channel(64);
                tokio::spawn(async move {
                    if tx2.send(Ok(first)).await.is_err() {
                        return;
                    }
                    while let Some(m) = rx.recv().await {
                        if tx2.send(m).await.is_err() {
                            return;
                        }
                    }
                });
                Ok(tokio_stream::wrappers::ReceiverStream::new(rx2))
            }
            None => Err(Status::internal("the request ended without an answer")),
        }
    }

    /// Streams the answers of one request into `tx`, moving to another
    /// driver when a stream breaks.
    async fn forward(
        &self,
        req: InferenceRequest,
        tx: mpsc::Sender<Result<InferenceResponse, Status>>,
    ) {
        let mut delivered: Vec<i32> = req.resume_token_ids.clone();
        let mut tried = HashSet::new();
        let mut last_error =
            Status::unavailable(format!("no driver for model {:?} answers", req.model));
        for attempt in 0..self.0.max_attempts {
            let Some((addr, ch)) = self.pick(&req.model, &tried) else {
                break;
            };
            tried.insert(addr.clone());
            let mut r = req.clone();
            r.resume_token_ids = delivered.clone();
            if attempt > 0 {
                info!(
                    "[API] request for {:?} resumes on driver {addr} after {} tokens",
                    r.model,
                    delivered.len()
                );
                crate::metrics::metrics().driver_failovers.inc();
            }
            let mut client =
                WorkerClient::with_interceptor(ch, llama_cluster_shared::telemetry::inject_grpc);
            let mut r = tonic::Request::new(r);
            self.0.tokens.attach(Class::Inference, &mut r);
            let outcome: Result<(), Outcome> = match client.inference(r).await {
                Ok(s) => {
                    let mut s = s.into_inner();
                    loop {
                        match s.next().await {
                            Some(Ok(m)) => {
                                let end = matches!(m.event, Some(Event::Stats(_)));
                                if let Some(Event::Chunk(c)) = &m.event {
                                    delivered.extend_from_slice(&c.token_ids);
                                }
                                if tx.send(Ok(m)).await.is_err() {
                                    // The client went away: dropping the
                                    // stream cancels the driver's request.
                                    self.done_with(&addr);
                                    return;
                                }
                                if end {
                                    break Ok(());
                                }
                            }
                            Some(Err(e)) if broken(&e) => break Err(Outcome::Broken(e)),
                            Some(Err(e)) => break Err(Outcome::Answer(e)),
                            None => {
                                break Err(Outcome::Broken(Status::unavailable(format!(
                                    "driver {addr} ended the stream before its statistics"
                                ))));
                            }
                        }
                    }
                }
                Err(e) if broken(&e) => Err(Outcome::Broken(e)),
                Err(e) => Err(Outcome::Answer(e)),
            };
            self.done_with(&addr);
            match outcome {
                Ok(()) => return,
                Err(Outcome::Broken(e)) => {
                    self.mark_down(&addr, &e);
                    last_error = e;
                }
                // The driver's own answer (bad input, no route, ...).
                Err(Outcome::Answer(e)) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
        let _ = tx.send(Err(last_error)).await;
    }
}

/// How one driver's attempt ended, when not with its statistics.
enum Outcome {
    /// The stream or connection broke: another driver resumes.
    Broken(Status),
    /// The driver answered with an error: it goes to the client.
    Answer(Status),
}

/// A status that comes from a broken transport (connection refused or
/// lost, a reset stream) rather than one the driver sent.
fn broken(s: &Status) -> bool {
    use std::error::Error;
    s.source().is_some() || matches!(s.code(), tonic::Code::Unknown | tonic::Code::Cancelled)
}
