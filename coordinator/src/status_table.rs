//! The cluster table: every worker's GetStatus, aggregated.

use std::time::Duration;

use anyhow::Context;
use llama_cluster_proto::v1::worker_client::WorkerClient;
use llama_cluster_proto::v1::{GetStatusRequest, GetStatusResponse};
use tonic::transport::Channel;

/// Calls GetStatus on the worker at `addr` (`host:port`).
pub async fn fetch_status(addr: &str) -> anyhow::Result<GetStatusResponse> {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .with_context(|| format!("bad worker address {addr:?}"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot reach worker at {addr}"))?;
    Ok(
        WorkerClient::with_interceptor(ch, llama_cluster_shared::telemetry::inject_grpc)
            .get_status(GetStatusRequest {})
            .await
            .with_context(|| format!("GetStatus on {addr}"))?
            .into_inner(),
    )
}

fn short(peer: &str) -> String {
    let n = peer.len();
    if n > 10 {
        format!("…{}", &peer[n - 8..])
    } else {
        peer.to_string()
    }
}

/// Renders statuses as a plain-text table.
pub fn render(statuses: &[(String, GetStatusResponse)]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<22} {:<10} {:<10} {:>7} {:>4} {:>5} {:>4} {:>4} {:>5}  {}\n",
        "WORKER (gRPC)",
        "PEER",
        "CLUSTER",
        "MEM MiB",
        "CPUS",
        "PEERS",
        "QUIC",
        "TCP",
        "READY",
        "LOCAL SHARD (id layers state)"
    ));
    for (addr, st) in statuses {
        let quic = st.peers.iter().filter(|p| p.transport == "QUIC").count();
        let local: Vec<String> = st
            .shards
            .iter()
            .filter(|s| s.availability == "LOCAL")
            .map(|s| {
                format!(
                    "{} {}-{} {}",
                    s.shard_id, s.layer_start, s.layer_end, s.state
                )
            })
            .collect();
        let known = st
            .shards
            .iter()
            .filter(|s| s.availability != "LOCAL")
            .count();
        out.push_str(&format!(
            "{:<22} {:<10} {:<10} {:>7} {:>4} {:>5} {:>4} {:>4} {:>5}  {} (+{known} known)\n",
            addr,
            short(&st.peer_id),
            st.cluster,
            st.resources
                .as_ref()
                .map(|r| r.memory_budget_bytes >> 20)
                .unwrap_or(0),
            st.resources.as_ref().map(|r| r.cpus).unwrap_or(0),
            st.peers.len(),
            quic,
            st.peers.len() - quic,
            if st.swarm_ready { "yes" } else { "no" },
            if local.is_empty() {
                "-".to_string()
            } else {
                local.join(", ")
            },
        ));
    }
    out
}
