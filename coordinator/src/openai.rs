//! An OpenAI-compatible HTTP API in front of the workers:
//! `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`,
//! with `stream: true` (server-sent events) or without, usage counts
//! included. Requests are forwarded to a worker that drives the model's
//! pipeline (gRPC `Inference`); invalid requests get OpenAI-style error JSON
//! with a 4xx status.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use llama_cluster_proto::v1::inference_response::Event;
use llama_cluster_proto::v1::{ChatMessage, InferenceRequest};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{Instrument, info, info_span};

/// Largest `max_tokens` accepted before asking a worker.
const MAX_TOKENS_LIMIT: u64 = 1 << 20;

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

/// Parses the fields both endpoints share into an `InferenceRequest`.
fn common(body: &Value, req: &mut InferenceRequest) -> Result<bool, Box<Response>> {
    let bad_request = |m: String, p: &str| Box::new(bad_request(m, p));
    if let Some(v) = body
        .get("max_tokens")
        .or_else(|| body.get("max_completion_tokens"))
        .filter(|v| !v.is_null())
    {
        let n = v.as_u64().ok_or_else(|| {
            bad_request("max_tokens must be a positive integer".into(), "max_tokens")
        })?;
        if n == 0 || n > MAX_TOKENS_LIMIT {
            return Err(bad_request(
                format!("max_tokens must be between 1 and {MAX_TOKENS_LIMIT}, got {n}"),
                "max_tokens",
            ));
        }
        req.max_tokens = n as u32;
    }
    let num = |k: &str| body.get(k).filter(|v| !v.is_null());
    if let Some(t) = num("temperature") {
        req.temperature = t
            .as_f64()
            .filter(|t| (0.0..=2.0).contains(t))
            .ok_or_else(|| {
                bad_request("temperature must be between 0 and 2".into(), "temperature")
            })? as f32;
    }
    if let Some(p) = num("top_p") {
        req.top_p = p
            .as_f64()
            .filter(|p| *p > 0.0 && *p <= 1.0)
            .ok_or_else(|| bad_request("top_p must be in (0, 1]".into(), "top_p"))?
            as f32;
    }
    if let Some(s) = num("seed") {
        req.seed = s
            .as_u64()
            .ok_or_else(|| bad_request("seed must be a non-negative integer".into(), "seed"))?;
    }
    match num("stop") {
        None => {}
        Some(Value::String(s)) => req.stop = vec![s.clone()],
        Some(Value::Array(a)) => {
            req.stop = a
                .iter()
                .map(|v| v.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    bad_request("stop must be a string or a list of strings".into(), "stop")
                })?
        }
        Some(_) => {
            return Err(bad_request(
                "stop must be a string or a list of strings".into(),
                "stop",
            ));
        }
    }
    // llama-server's and vLLM's extension (benchmarks): generate past
    // end-of-generation tokens.
    match num("ignore_eos") {
        None => {}
        Some(Value::Bool(b)) => req.ignore_eos = *b,
        Some(_) => {
            return Err(bad_request(
                "ignore_eos must be a boolean".into(),
                "ignore_eos",
            ));
        }
    }
    match body.get("stream") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad_request("stream must be a boolean".into(), "stream")),
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
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return bad_request("the request body must be a JSON object", "body"),
        Err(e) => return bad_request(format!("malformed JSON: {e}"), "body"),
    };
    let Some(model) = body.get("model").and_then(|m| m.as_str()).map(String::from) else {
        return bad_request("model is required", "model");
    };
    let mut req = InferenceRequest {
        model: model.clone(),
        ..Default::default()
    };
    if chat {
        let Some(msgs) = body.get("messages").and_then(|m| m.as_array()) else {
            return bad_request("messages must be a list", "messages");
        };
        if msgs.is_empty() {
            return bad_request("messages must not be empty", "messages");
        }
        for m in msgs {
            let (Some(role), Some(content)) = (
                m.get("role").and_then(|r| r.as_str()),
                m.get("content").and_then(|c| c.as_str()),
            ) else {
                return bad_request("every message needs a string role and content", "messages");
            };
            req.messages.push(ChatMessage {
                role: role.into(),
                content: content.into(),
            });
        }
    } else {
        req.prompt = match body.get("prompt") {
            Some(Value::String(p)) if !p.is_empty() => p.clone(),
            Some(Value::Array(a))
                if a.len() == 1 && a[0].as_str().is_some_and(|s| !s.is_empty()) =>
            {
                a[0].as_str().unwrap_or_default().to_string()
            }
            _ => return bad_request("prompt must be a non-empty string", "prompt"),
        };
    }
    let stream = match common(&body, &mut req) {
        Ok(s) => s,
        Err(r) => return *r,
    };
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
    let mut grpc = match st.drivers.run(req).await {
        Ok(s) => crate::metrics::Metered::new(s, "openai"),
        Err(s) => return status_to_http(&s),
    };
    let id = format!(
        "{}-{:x}",
        if chat { "chatcmpl" } else { "cmpl" },
        now() ^ (std::process::id() as u64) << 20
    );
    let created = now();
    let object = if chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    info!("[API] {object} for {model} (stream {stream})");
    if !stream {
        let (mut text, mut stats) = (String::new(), None);
        loop {
            match grpc.next().await {
                Some(Ok(m)) => match m.event {
                    Some(Event::Chunk(c)) => text.push_str(&c.text),
                    Some(Event::Stats(s)) => stats = Some(s),
                    None => {}
                },
                None => break,
                Some(Err(s)) => return status_to_http(&s),
            }
        }
        let s = stats.unwrap_or_default();
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason(&s.finish_reason), "logprobs": null})
        } else {
            json!({"index": 0, "text": text, "finish_reason": finish_reason(&s.finish_reason), "logprobs": null})
        };
        return axum::Json(json!({
            "id": id, "object": object, "created": created, "model": model,
            "choices": [choice],
            "usage": {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.generated_tokens,
                      "total_tokens": s.prompt_tokens + s.generated_tokens},
        }))
        .into_response();
    }
    // Streaming: one SSE event per text chunk, a last one with the finish
    // reason and usage, then [DONE].
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let chunk_object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    tokio::spawn(async move {
        let mk = |delta: Value, finish: Value, usage: Value| {
            let choice = if chat {
                json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null})
            } else {
                json!({"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")), "finish_reason": finish, "logprobs": null})
            };
            let mut v = json!({"id": id, "object": chunk_object, "created": created, "model": model, "choices": [choice]});
            if !usage.is_null() {
                v["usage"] = usage;
            }
            SseEvent::default().data(v.to_string())
        };
        if chat
            && tx
                .send(Ok(mk(
                    json!({"role": "assistant", "content": ""}),
                    Value::Null,
                    Value::Null,
                )))
                .await
                .is_err()
        {
            return;
        }
        loop {
            match grpc.next().await {
                Some(Ok(m)) => match m.event {
                    Some(Event::Chunk(c)) => {
                        if c.text.is_empty() {
                            continue;
                        }
                        if tx
                            .send(Ok(mk(json!({"content": c.text}), Value::Null, Value::Null)))
                            .await
                            .is_err()
                        {
                            return; // client went away: dropping the stream stops generation
                        }
                    }
                    Some(Event::Stats(s)) => {
                        let usage = json!({"prompt_tokens": s.prompt_tokens, "completion_tokens": s.generated_tokens,
                                           "total_tokens": s.prompt_tokens + s.generated_tokens});
                        let _ = tx
                            .send(Ok(mk(
                                json!({}),
                                json!(finish_reason(&s.finish_reason)),
                                usage,
                            )))
                            .await;
                    }
                    _ => {}
                },
                None => break,
                Some(Err(s)) => {
                    let err = json!({"error": {"message": s.message(), "type": "server_error", "param": null, "code": null}});
                    let _ = tx.send(Ok(SseEvent::default().data(err.to_string()))).await;
                    break;
                }
            }
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    }.in_current_span());
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx) as ReceiverSse)
        .keep_alive(KeepAlive::default())
        .into_response()
}

type ReceiverSse = tokio_stream::wrappers::ReceiverStream<Result<SseEvent, Infallible>>;

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
