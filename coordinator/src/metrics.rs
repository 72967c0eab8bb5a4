//! Prometheus metrics of the coordinator, served as text on `/metrics` of
//! the HTTP (OpenAI API) port: inference requests by API and outcome,
//! tokens, time to first token and request duration as seen by clients,
//! requests in flight, HTTP responses by status, workers reachable and
//! SWARM_READY.

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::Stream;
use llama_cluster_proto::v1::InferenceResponse;
use llama_cluster_proto::v1::inference_response::Event;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `openai` or `grpc`.
    pub api: String,
    /// `ok`, `error` (the stream ended with an error) or `cancelled`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub path: String,
    pub status: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub http_responses: Family<HttpLabels, Counter>,
    pub tokens_generated: Counter,
    pub prompt_tokens: Counter,
    pub time_to_first_token: Histogram,
    pub request_duration: Histogram,
    pub in_flight: Gauge,
    pub workers: Gauge,
    pub workers_reachable: Gauge,
    pub swarm_ready: Gauge,
    pub requests_queued: Gauge,
    pub queue_wait: Histogram,
    pub requests_refused: Counter,
    pub driver_failovers: Counter,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("llama_cluster_coordinator");
        let m = Metrics {
            requests: Family::default(),
            http_responses: Family::default(),
            tokens_generated: Counter::default(),
            prompt_tokens: Counter::default(),
            time_to_first_token: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            request_duration: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            in_flight: Gauge::default(),
            workers: Gauge::default(),
            workers_reachable: Gauge::default(),
            swarm_ready: Gauge::default(),
            requests_queued: Gauge::default(),
            queue_wait: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            requests_refused: Counter::default(),
            driver_failovers: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "inference_requests",
            "Inference requests forwarded to a worker, by API and outcome",
            m.requests.clone(),
        );
        registry.register(
            "http_responses",
            "HTTP responses of the OpenAI API, by path and status",
            m.http_responses.clone(),
        );
        registry.register(
            "tokens_generated",
            "Tokens streamed back to clients",
            m.tokens_generated.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens of completed requests",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Time from forwarding a request to its first token",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from forwarding a request to its end",
            m.request_duration.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Inference requests being streamed",
            m.in_flight.clone(),
        );
        registry.register("workers", "Workers configured", m.workers.clone());
        registry.register(
            "requests_queued",
            "Requests waiting for a free session",
            m.requests_queued.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time requests waited for a free session",
            m.queue_wait.clone(),
        );
        registry.register(
            "requests_refused",
            "Requests refused: queue full or waited too long",
            m.requests_refused.clone(),
        );
        registry.register(
            "driver_failovers",
            "Requests moved to another driver after a stream broke (resumed from the tokens delivered)",
            m.driver_failovers.clone(),
        );
        registry.register(
            "workers_reachable",
            "Workers that answered the last status poll",
            m.workers_reachable.clone(),
        );
        registry.register(
            "swarm_ready",
            "1 when every layer of the model is served by a ready worker",
            m.swarm_ready.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

/// A worker's Inference stream, counted as it is read: tokens, time to
/// first token, duration and outcome (`cancelled` when dropped early).
pub struct Metered<S> {
    inner: S,
    api: &'static str,
    t0: Instant,
    first_token: bool,
    finished: bool,
}

impl<S> Metered<S> {
    pub fn new(inner: S, api: &'static str) -> Self {
        metrics().in_flight.inc();
        Metered {
            inner,
            api,
            t0: Instant::now(),
            first_token: false,
            finished: false,
        }
    }

    fn finish(&mut self, outcome: &str) {
        if self.finished {
            return;
        }
        self.finished = true;
        let m = metrics();
        m.in_flight.dec();
        m.request_duration.observe(self.t0.elapsed().as_secs_f64());
        m.requests
            .get_or_create(&RequestLabels {
                api: self.api.into(),
                outcome: outcome.into(),
            })
            .inc();
    }
}

impl<S> Stream for Metered<S>
where
    S: Stream<Item = Result<InferenceResponse, tonic::Status>> + Unpin,
{
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let r = match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r,
        };
        match &r {
            Some(Ok(msg)) => match &msg.event {
                Some(Event::Chunk(c)) if !c.token_ids.is_empty() => {
                    let m = metrics();
                    if !self.first_token {
                        self.first_token = true;
                        m.time_to_first_token
                            .observe(self.t0.elapsed().as_secs_f64());
                    }
                    m.tokens_generated.inc_by(c.token_ids.len() as u64);
                }
                Some(Event::Stats(s)) => {
                    metrics().prompt_tokens.inc_by(s.prompt_tokens as u64);
                }
                _ => {}
            },
            Some(Err(_)) => self.finish("error"),
            None => self.finish("ok"),
        }
        Poll::Ready(r)
    }
}

impl<S> Drop for Metered<S> {
    fn drop(&mut self) {
        self.finish("cancelled");
    }
}

/// Counts one HTTP response of the OpenAI API.
pub fn http_response(path: &str, status: u16) {
    metrics()
        .http_responses
        .get_or_create(&HttpLabels {
            path: path.into(),
            status: status.to_string(),
        })
        .inc();
}
