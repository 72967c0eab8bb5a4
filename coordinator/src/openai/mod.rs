//! An OpenAI-compatible HTTP API in front of the workers:
//! `GET /v1/models` (and `/v1/models/{model}`), `POST /v1/completions`,
//! `POST /v1/chat/completions`, `GET /health`,
//! with `stream: true` (server-sent events) or without, usage counts
//! included. Requests are forwarded to a worker that drives the model's
//! pipeline (gRPC `Inference`); invalid requests get OpenAI-style error JSON
//! with a 4xx status.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use llama_cluster_proto::v1::inference_response::Event;
use llama_cluster_proto::v1::{InferenceStats, TokenLogprob};

use crate::metrics::Metered;
use serde_json::{Value, json};
use tracing::{Instrument, info, info_span};

pub mod cors;
mod logprobs;
mod models;
mod request;
mod stream;

pub use crate::api_state::ApiState;

/// An OpenAI-style error response.
fn error(
    status: StatusCode,
    kind: &str,
    message: impl Into<String>,
    param: Option<&str>,
) -> Response {
    let body = json!({"error": {"message": message.into(), "type": kind, "param": param, "code": Value::Null}});
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn bad_request(message: impl Into<String>, param: &str) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        message,
        Some(param),
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn status_to_http(s: &tonic::Status) -> Response {
    use tonic::Code::*;
    let (code, kind) = match s.code() {
        InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_request_error"),
        NotFound => (StatusCode::NOT_FOUND, "invalid_request_error"),
        ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
        DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "server_error"),
        Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "server_error"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
    };
    error(code, kind, s.message(), None)
}

fn finish_reason(r: &str) -> &'static str {
    match r {
        "length" | "context" => "length",
        _ => "stop",
    }
}

async fn completions(
    State(st): State<Arc<ApiState>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let span = info_span!("POST /v1/completions", otel.kind = "server");
    llama_cluster_shared::telemetry::set_parent_from_headers(&span, &headers);
    let r = match authorized(&st, &headers) {
        Err(r) => *r,
        Ok(()) => handle(st, body, false).instrument(span).await,
    };
    crate::metrics::http_response("/v1/completions", r.status().as_u16());
    r
}

async fn chat_completions(
    State(st): State<Arc<ApiState>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let span = info_span!("POST /v1/chat/completions", otel.kind = "server");
    llama_cluster_shared::telemetry::set_parent_from_headers(&span, &headers);
    let r = match authorized(&st, &headers) {
        Err(r) => *r,
        Ok(()) => handle(st, body, true).instrument(span).await,
    };
    crate::metrics::http_response("/v1/chat/completions", r.status().as_u16());
    r
}

/// The API token, when one is configured (`Authorization: Bearer`, as
/// OpenAI clients send their key): 401 with an OpenAI-style error.
fn authorized(st: &ApiState, headers: &axum::http::HeaderMap) -> Result<(), Box<Response>> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    st.drivers
        .tokens()
        .check(llama_cluster_shared::auth::Class::Inference, header)
        .map_err(|e| {
            Box::new(error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                e.to_string(),
                None,
            ))
        })
}

async fn handle(st: Arc<ApiState>, body: Bytes, chat: bool) -> Response {
    let api = match request::parse(&body, chat) {
        Ok(a) => a,
        Err(e) => return bad_request(e.message, e.param),
    };
    let model = api.req.model.clone();
    let served = models::served(&st).await;
    if !served.contains(&model) {
        return error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist; served: {served:?}"),
            Some("model"),
        );
    }
    st.drivers.learn_if_empty(&st.workers).await;
    let mut runs = api.runs();
    let n_runs = runs.len();
    // More runs than the cluster can run and queue would fail part-way.
    if let Some(room) = st.drivers.room(&model)
        && n_runs > 1
        && n_runs > room
    {
        return bad_request(
            format!(
                "{n_runs} completions in one request are more than the cluster holds at once: {room} (its sessions and its queue's bound)"
            ),
            "n",
        );
    }
    let rest = runs.split_off(1);
    // The first run's admission decides the response's status (429 when
    // the queue is full, …); the others, if any, wait in the queue like any
    // request while the admitted ones are read, so they never hold sessions
    // their siblings wait for.
    let first = match st.drivers.run(runs.remove(0)).await {
        Ok(s) => Metered::new(s, "openai").boxed(),
        Err(s) => return status_to_http(&s),
    };
    let mut streams = vec![first];
    for r in rest {
        let drivers = st.drivers.clone();
        let run =
            futures::stream::once(async move { drivers.run(r).await }).flat_map(|a| match a {
                Ok(s) => Metered::new(s, "openai").boxed(),
                Err(s) => futures::stream::iter([Err(s)]).boxed(),
            });
        streams.push(run.boxed());
    }
    let answers = futures::stream::select_all(
        streams
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.map(move |m| (i, m))),
    );
    let head = Head {
        id: response_id(chat),
        created: now(),
        model,
        chat,
        n: api.n as usize,
        logprobs: api.req.logprobs,
        prompts: api.prompts.clone(),
    };
    info!(
        "[API] {} for {} (stream {}, {n_runs} run(s))",
        head.object(),
        head.model,
        api.stream,
    );
    if api.stream {
        stream::respond(head, answers.boxed(), n_runs, api.include_usage)
    } else {
        whole(head, answers.boxed(), n_runs).await
    }
}

/// A fresh response id (`cmpl-…` / `chatcmpl-…`): 64 random bits, or the
/// time and a process-wide count if the system has no randomness to give.
fn response_id(chat: bool) -> String {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = getrandom::u64().unwrap_or_else(|_| {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        t ^ COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    });
    format!("{}-{n:016x}", if chat { "chatcmpl" } else { "cmpl" })
}

/// What every response and chunk of one request carries.
pub(crate) struct Head {
    id: String,
    created: u64,
    model: String,
    chat: bool,
    /// Choices per prompt: the runs of indexes `k × n` read each prompt.
    n: usize,
    /// Whether choices carry their tokens' log-probabilities.
    logprobs: bool,
    /// The prompts of a completion (the offsets of its log-probabilities).
    prompts: Vec<String>,
}

impl Head {
    /// The log-probabilities of run `index`'s completion, empty so far.
    fn completion_logprobs(&self, index: usize) -> logprobs::Completion {
        let prompt = self.prompts.get(index / self.n.max(1));
        logprobs::Completion::after(prompt.map_or("", String::as_str))
    }

    fn object(&self) -> &'static str {
        if self.chat {
            "chat.completion"
        } else {
            "text_completion"
        }
    }
}

/// Usage over a request's runs: each prompt counted once, every choice's
/// tokens.
#[derive(Default)]
struct Usage {
    prompt_tokens: u32,
    completion_tokens: u32,
}

impl Usage {
    fn add(&mut self, head: &Head, index: usize, s: &InferenceStats) {
        if index.is_multiple_of(head.n.max(1)) {
            self.prompt_tokens += s.prompt_tokens;
        }
        self.completion_tokens += s.generated_tokens;
    }

    fn json(&self) -> Value {
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
               "total_tokens": self.prompt_tokens + self.completion_tokens})
    }
}

/// The answer in one JSON body: the choices in index order, usage over
/// all; the first failed run fails the request (and cancels the others).
async fn whole(head: Head, mut answers: stream::Answers, n_runs: usize) -> Response {
    let mut texts = vec![String::new(); n_runs];
    let mut finish = vec![String::new(); n_runs];
    let mut tokens: Vec<Vec<TokenLogprob>> = vec![vec![]; n_runs];
    let mut usage = Usage::default();
    while let Some((i, m)) = answers.next().await {
        match m {
            Ok(m) => match m.event {
                Some(Event::Chunk(c)) => {
                    texts[i].push_str(&c.text);
                    tokens[i].extend(c.logprobs);
                }
                Some(Event::Stats(s)) => {
                    usage.add(&head, i, &s);
                    finish[i] = s.finish_reason;
                }
                None => {}
            },
            Err(s) => return status_to_http(&s),
        }
    }
    let choices: Vec<Value> = texts
        .into_iter()
        .zip(&finish)
        .zip(&tokens)
        .enumerate()
        .map(|(i, ((text, f), toks))| {
            if head.chat {
                let lp = head.logprobs.then(|| logprobs::chat(toks));
                json!({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason(f), "logprobs": lp})
            } else {
                let lp = head.logprobs.then(|| {
                    let mut l = head.completion_logprobs(i);
                    l.push(toks);
                    l.json()
                });
                json!({"index": i, "text": text, "finish_reason": finish_reason(f), "logprobs": lp})
            }
        })
        .collect();
    axum::Json(json!({
        "id": head.id, "object": head.object(), "created": head.created, "model": head.model,
        "choices": choices, "usage": usage.json(),
    }))
    .into_response()
}

/// The API's routes.
pub fn router(state: ApiState, cors: Option<tower_http::cors::CorsLayer>) -> Router {
    // Pages of the origins `cors` allows may call the API; the dashboard's
    // JSON and /metrics stay same-origin.
    let mut api = Router::<Arc<ApiState>>::new()
        .route("/v1/models", get(models::list))
        .route("/v1/models/{*model}", get(models::retrieve))
        .route("/health", get(models::health))
        .route("/v1/health", get(models::health))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions));
    if let Some(c) = cors {
        api = api.layer(c);
    }
    api.merge(crate::dashboard::routes())
        .route(
            "/metrics",
            get(|| async {
                (
                    [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                    crate::metrics::metrics().encode(),
                )
            }),
        )
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "unknown endpoint",
                None,
            )
        })
        .with_state(Arc::new(state))
}

/// Where and how the coordinator listens.
pub struct Listen<'a> {
    /// The OpenAI API, the dashboard and `/metrics`.
    pub http: &'a str,
    /// The `llamacluster.v1.Coordinator` gRPC service.
    pub grpc: &'a str,
    /// TLS on both.
    pub tls: Option<llama_cluster_shared::tls::ServerTls>,
    /// The origins whose pages may call the HTTP API ([`cors::layer`]).
    pub cors: Option<tower_http::cors::CorsLayer>,
    /// A gRPC client silent this long is disconnected, its requests
    /// cancelled ([`llama_cluster_shared::grpc_server::builder`]).
    pub client_timeout: Duration,
}

/// Serves the OpenAI API and the coordinator's gRPC service as `listen`
/// says until the process ends.
pub async fn serve(
    listen: Listen<'_>,
    workers: crate::workers::WorkerSet,
    placer: Option<crate::placer::Placer>,
    poll: Duration,
    drivers: crate::drivers::Drivers,
) -> anyhow::Result<()> {
    let Listen {
        http,
        grpc,
        tls,
        cors,
        client_timeout,
    } = listen;
    let listener = tokio::net::TcpListener::bind(http)
        .await
        .with_context(|| format!("cannot bind {http}"))?;
    let bound = listener.local_addr()?;
    let (grpc_bound, grpc_server) = crate::grpc::serve(
        grpc,
        workers.clone(),
        placer,
        poll,
        drivers.clone(),
        tls.as_ref(),
        client_timeout,
    )
    .await?;
    println!(
        "LLAMA_CLUSTER_READY {}",
        json!({"role": "coordinator", "http_addr": bound.to_string(), "grpc_addr": grpc_bound.to_string(), "tls": tls.is_some()})
    );
    let scheme = if tls.is_some() { "https" } else { "http" };
    info!("[API] OpenAI-compatible API on {scheme}://{bound}/v1, gRPC on {grpc_bound}");
    let app = router(ApiState { workers, drivers }, cors);
    let http_server = async move {
        match tls {
            Some(t) => axum::serve(crate::tls::TlsListener::new(listener, &t)?, app).await,
            None => axum::serve(listener, app).await,
        }
        .map_err(anyhow::Error::from)
    };
    tokio::try_join!(http_server, grpc_server)?;
    Ok(())
}
