//! `GET /v1/models`, `GET /v1/models/{model}` (OpenAI's list and retrieve)
//! and `GET /health` (llama-server's: 200 once a model can be answered).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{ApiState, authorized, error, now};

/// Models a worker can drive now (every layer served by ready shards),
/// sorted; each is given the time it was first seen served.
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
    let mut seen = state.first_seen.lock().unwrap_or_else(|e| e.into_inner());
    for id in &m {
        seen.entry(id.clone()).or_insert_with(now);
    }
    m
}

fn model_object(state: &ApiState, id: &str) -> Value {
    let created = state
        .first_seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(id)
        .copied()
        .unwrap_or_else(now);
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

/// 200 `{"status": "ok"}` while some model can be answered, else 503 with
/// why (as llama-server answers while it loads). Open without the API
/// token, like llama-server's, for load balancers and probes.
pub(super) async fn health(State(st): State<Arc<ApiState>>) -> Response {
    if served(&st).await.is_empty() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable_error",
            "no model can be answered yet: no worker holds every layer of a model in ready shards",
            None,
        );
    }
    axum::Json(json!({"status": "ok"})).into_response()
}
