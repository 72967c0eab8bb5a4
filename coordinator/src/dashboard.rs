//! The dashboard at `/`: one static page (`dashboard/index.html`, plain
//! JavaScript, embedded in the binary) and the JSON it reads every second,
//! `GET /api/cluster`: the workers (peer, transports, memory, shard, state,
//! downloads), the model's layers with who serves each, and the
//! coordinator's own request metrics. Built from the same poll of the
//! workers as `GetClusterStatus`. The page's chat box streams from
//! `/v1/chat/completions`, sending the API key the user typed (kept in the
//! browser's localStorage) as `Authorization: Bearer`; a 401 is said in the
//! page.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use llama_cluster_proto::v1::{GetClusterStatusResponse, GetStatusResponse, ShardInfo};
use serde_json::{Value, json};

use crate::api_state::ApiState;

/// Layers drawn at most (a bogus shard record cannot make the page huge).
const MAX_LAYERS: u32 = 4096;

/// The page, served as it is.
const PAGE: &str = include_str!("dashboard/index.html");

/// `/` (the page) and `/api/cluster` (its data).
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route(
            "/",
            get(|| async { ([("cache-control", "no-cache")], Html(PAGE)) }),
        )
        .route("/api/cluster", get(cluster))
}

async fn cluster(State(st): State<Arc<ApiState>>) -> Response {
    let (status, _) = crate::cluster::cluster_status(&st.workers.list(), None).await;
    let m = crate::metrics::metrics();
    let q = st.drivers.figures();
    let metrics = json!({
        "requests_queued": q.queued,
        "session_capacity": q.capacity,
        "queue_wait_ms_max": q.wait_ms_max,
        "requests_in_flight": m.in_flight.get(),
        "tokens_generated_total": m.tokens_generated.get(),
        "prompt_tokens_total": m.prompt_tokens.get(),
    });
    (
        [("cache-control", "no-store")],
        axum::Json(cluster_json(&status, metrics)),
    )
        .into_response()
}

/// The shard a worker serves itself, if any.
fn local_shard(st: &GetStatusResponse) -> Option<&ShardInfo> {
    st.shards.iter().find(|s| s.availability == "LOCAL")
}

/// The page's view of the cluster.
pub fn cluster_json(status: &GetClusterStatusResponse, metrics: Value) -> Value {
    let mut workers = Vec::new();
    // Layer → (worker index, shard state) of every local shard covering it.
    let mut by_layer: BTreeMap<u32, Vec<Value>> = BTreeMap::new();
    let mut n_layers = 0u32;
    for (i, w) in status.workers.iter().enumerate() {
        let Some(st) = &w.status else {
            workers.push(json!({
                "grpc_addr": w.grpc_addr, "reachable": false, "error": w.error,
            }));
            continue;
        };
        let mut transports: BTreeMap<&str, u32> = BTreeMap::new();
        for p in &st.peers {
            *transports.entry(p.transport.as_str()).or_default() += 1;
        }
        let shard = local_shard(st);
        if let Some(s) = shard {
            n_layers = n_layers.max(s.layer_end.saturating_add(1));
            for l in s.layer_start..=s.layer_end.min(MAX_LAYERS) {
                by_layer
                    .entry(l)
                    .or_default()
                    .push(json!({"worker": i, "state": s.state}));
            }
        }
        // Layers of shards this worker knows of (others' records) tell
        // the model's size even where nobody serves the last layers.
        for s in &st.shards {
            n_layers = n_layers.max(s.layer_end.saturating_add(1));
        }
        let downloads: Vec<Value> = st
            .torrents
            .iter()
            .filter(|t| t.state == "downloading")
            .map(|t| {
                json!({
                    "name": t.name, "size": t.size, "verified_bytes": t.verified_bytes,
                    "pieces_done": t.pieces_done, "pieces_total": t.pieces_total, "peers": t.peers,
                })
            })
            .collect();
        let res = st.resources.unwrap_or_default();
        workers.push(json!({
            "grpc_addr": w.grpc_addr,
            "reachable": true,
            "peer_id": st.peer_id,
            "version": st.version,
            "uptime_secs": st.uptime_secs,
            "peers": st.peers.len(),
            "transports": transports,
            "quic_enabled": st.quic_enabled,
            "memory_total_bytes": res.memory_total_bytes,
            "memory_budget_bytes": res.memory_budget_bytes,
            "cpus": res.cpus,
            "shard": shard.map(|s| json!({
                "id": s.shard_id, "model": s.model, "layer_start": s.layer_start,
                "layer_end": s.layer_end, "state": s.state,
            })),
            "swarm_ready": st.swarm_ready,
            "downloads": downloads,
        }));
    }
    let layers: Vec<Value> = (0..n_layers.min(MAX_LAYERS))
        .map(|l| json!(by_layer.remove(&l).unwrap_or_default()))
        .collect();
    json!({
        "swarm_ready": status.swarm_ready,
        "models": status.models,
        "workers": workers,
        "layers": layers,
        "metrics": metrics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use llama_cluster_proto::v1::{PeerInfo, Resources, TorrentInfo, WorkerStatus};

    fn shard(id: &str, a: u32, b: u32, availability: &str) -> ShardInfo {
        ShardInfo {
            shard_id: id.into(),
            model: "m".into(),
            layer_start: a,
            layer_end: b,
            state: "ready".into(),
            availability: availability.into(),
            ..Default::default()
        }
    }

    fn worker(addr: &str, peer: &str, shards: Vec<ShardInfo>) -> WorkerStatus {
        WorkerStatus {
            grpc_addr: addr.into(),
            reachable: true,
            error: String::new(),
            status: Some(GetStatusResponse {
                peer_id: peer.into(),
                shards,
                peers: vec![
                    PeerInfo {
                        transport: "QUIC".into(),
                        ..Default::default()
                    },
                    PeerInfo {
                        transport: "QUIC".into(),
                        ..Default::default()
                    },
                ],
                resources: Some(Resources {
                    memory_total_bytes: 8 << 30,
                    memory_budget_bytes: 1 << 30,
                    cpus: 2,
                }),
                torrents: vec![TorrentInfo {
                    name: "s.gguf".into(),
                    state: "downloading".into(),
                    size: 100,
                    verified_bytes: 40,
                    ..Default::default()
                }],
                ..Default::default()
            }),
        }
    }

    #[test]
    fn layers_name_their_workers_and_replicas() {
        let st = GetClusterStatusResponse {
            workers: vec![
                worker(
                    "a:1",
                    "A",
                    vec![shard("s0", 0, 4, "LOCAL"), shard("s1", 5, 9, "ONLINE")],
                ),
                worker("b:1", "B", vec![shard("s0", 0, 4, "LOCAL")]),
                WorkerStatus {
                    grpc_addr: "c:1".into(),
                    error: "refused".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let v = cluster_json(&st, json!({}));
        let layers = v["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 10, "the model's size from every known record");
        assert_eq!(layers[0].as_array().unwrap().len(), 2, "two replicas");
        assert_eq!(layers[4][1]["worker"], 1);
        assert!(layers[5].as_array().unwrap().is_empty(), "nobody serves it");
        assert_eq!(v["workers"][0]["transports"]["QUIC"], 2);
        assert_eq!(v["workers"][0]["shard"]["id"], "s0");
        assert_eq!(v["workers"][0]["downloads"][0]["verified_bytes"], 40);
        assert_eq!(v["workers"][2]["reachable"], false);
        assert_eq!(v["workers"][2]["error"], "refused");
    }
}
