//! An OpenAI-compatible HTTP API in front of the workers:
//! `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`,
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
use serde_json::{Value, json};
use tracing::{Instrument, info, info_span};

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

/// Models served by ready shards.
async fn models(state: &ApiState) -> Vec<String> {
    let mut m: Vec<String> = state
        .workers
        .served()
        .await
        .into_iter()
        .map(|(m, _)| m)
        .collect();
    m.sort();
    m.dedup();
    m
}

async fn list_models(State(st): State<Arc<ApiState>>, headers: axum::http::HeaderMap) -> Response {
    if let Err(r) = authorized(&st, &headers) {
        return *r;
    }
    let data: Vec<Value> = models(&st)
        .await
        .into_iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "llama-cluster"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
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
    let served = models(&st).await;
    if !served.contains(&model) {
        return error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist; served: {served:?}"),
            Some("model"),
        );
    }
    st.drivers.learn_if_empty(&st.workers).await;
    // One run per choice, each a session of its own; every one is admitted
    // (or refused) before the answer starts.
    let runs = futures::future::join_all((0..api.n).map(|i| st.drivers.run(api.choice(i)))).await;
    let mut streams = Vec::with_capacity(runs.len());
    for r in runs {
        match r {
            Ok(s) => streams.push(crate::metrics::Metered::new(s, "openai")),
            Err(s) => return status_to_http(&s),
        }
    }
    let head = Head {
        id: response_id(chat),
        created: now(),
        model,
        chat,
    };
    info!(
        "[API] {} for {} (stream {}, {} choice(s))",
        head.object(),
        head.model,
        api.stream,
        api.n
    );
    if api.stream {
        stream::respond(head, streams)
    } else {
        whole(head, streams).await
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
}

impl Head {
    fn object(&self) -> &'static str {
        if self.chat {
            "chat.completion"
        } else {
            "text_completion"
        }
    }
}

/// The answer in one JSON body: the choices in order, usage over all.
async fn whole(head: Head, streams: Vec<stream::Answer>) -> Response {
    let texts = futures::future::join_all(streams.into_iter().map(collect)).await;
    let (mut choices, mut prompt_tokens, mut completion_tokens) = (vec![], 0, 0);
    for (i, r) in texts.into_iter().enumerate() {
        let (text, s) = match r {
            Ok(t) => t,
            Err(s) => return status_to_http(&s),
        };
        prompt_tokens = s.prompt_tokens;
        completion_tokens += s.generated_tokens;
        choices.push(if head.chat {
            json!({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason(&s.finish_reason), "logprobs": null})
        } else {
            json!({"index": i, "text": text, "finish_reason": finish_reason(&s.finish_reason), "logprobs": null})
        });
    }
    axum::Json(json!({
        "id": head.id, "object": head.object(), "created": head.created, "model": head.model,
        "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }))
    .into_response()
}

/// The text and statistics of one run.
async fn collect(
    mut grpc: stream::Answer,
) -> Result<(String, llama_cluster_proto::v1::InferenceStats), tonic::Status> {
    let (mut text, mut stats) = (String::new(), None);
    while let Some(m) = grpc.next().await {
        match m?.event {
            Some(Event::Chunk(c)) => text.push_str(&c.text),
            Some(Event::Stats(s)) => stats = Some(s),
            None => {}
        }
    }
    Ok((text, stats.unwrap_or_default()))
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .merge(crate::dashboard::routes())
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

/// Serves the OpenAI API on `http` and the coordinator's gRPC service on
/// `grpc` until the process ends.
pub async fn serve(
    http: &str,
    grpc: &str,
    workers: crate::workers::WorkerSet,
    placer: Option<crate::placer::Placer>,
    poll: Duration,
    drivers: crate::drivers::Drivers,
    tls: Option<llama_cluster_shared::tls::ServerTls>,
) -> anyhow::Result<()> {
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
    )
    .await?;
    println!(
        "LLAMA_CLUSTER_READY {}",
        json!({"role": "coordinator", "http_addr": bound.to_string(), "grpc_addr": grpc_bound.to_string(), "tls": tls.is_some()})
    );
    let scheme = if tls.is_some() { "https" } else { "http" };
    info!("[API] OpenAI-compatible API on {scheme}://{bound}/v1, gRPC on {grpc_bound}");
    let app = router(ApiState { workers, drivers });
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
