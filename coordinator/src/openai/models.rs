//! `GET /v1/models`, `GET /v1/models/{model}` (OpenAI's list and retrieve)
//! and `GET /health` (llama-server's: 200 while the cluster is ready).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{ApiState, authorized, now};

/// Models a worker can drive now, sorted.
pub(super) async fn served(state: &ApiState) -> Vec<String> {
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

/// `created`: when a poll first found the model served.
fn model_object(state: &ApiState, id: &str) -> Value {
    let created = state.workers.first_seen(id).unwrap_or_else(now);
    json!({"id": id, "object": "model", "created": created, "owned_by": "llama-cluster"})
}

pub(super) async fn list(State(st): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorized(&st, &headers) {
        return *r;
    }
    let data: Vec<Value> = served(&st)
        .await
        .iter()
        .map(|m| model_object(&st, m))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

pub(super) async fn retrieve(
    State(st): State<Arc<ApiState>>,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorized(&st, &headers) {
        return *r;
    }
    let models = served(&st).await;
    if !models.contains(&model) {
        let body = json!({"error": {
            "message": format!("The model `{model}` does not exist; served: {models:?}"),
            "type": "invalid_request_error", "param": "model", "code": "model_not_found"}});
        return (StatusCode::NOT_FOUND, axum::Json(body)).into_response();
    }
    axum::Json(model_object(&st, &model)).into_response()
}

/// 200 `{"status": "ok"}` while the last poll found the cluster ready
/// (SWARM_READY with a model served, as the gRPC health check says), else
/// 503 in llama-server's shape. Open without the API token, like
/// llama-server's, for load balancers and probes; it asks no worker.
pub(super) async fn health(State(st): State<Arc<ApiState>>) -> Response {
    if !st.workers.ready() {
        let body = json!({"error": {"code": 503, "type": "unavailable_error",
            "message": "not ready: no model has every layer in ready shards (not SWARM_READY)"}});
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    }
    axum::Json(json!({"status": "ok"})).into_response()
}
