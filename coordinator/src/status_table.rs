//! The cluster table: every worker's GetStatus, aggregated.

use std::time::Duration;

use anyhow::Context;
use llama_cluster_proto::v1::worker_client::WorkerClient;
use llama_cluster_proto::v1::{GetStatusRequest, GetStatusResponse};

/// Calls GetStatus on the worker at `addr` (`host:port`).
pub async fn fetch_status(addr: &str) -> anyhow::Result<GetStatusResponse> {
    let ch = crate::tls::endpoint(addr)?
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

/// The table rows of a coordinator's view: (gRPC address, status) of every
/// worker that answered.
pub fn status_rows(
    st: &llama_cluster_proto::v1::GetClusterStatusResponse,
) -> Vec<(String, GetStatusResponse)> {
    st.workers
        .iter()
        .filter_map(|w| w.status.clone().map(|s| (w.grpc_addr.clone(), s)))
        .collect()
}

/// Renders statuses as a plain-text table.
pub fn render(statuses: &[(String, GetStatusResponse)]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<22} {:<10} {:<10} {:>7} {:>4} {:>5} {:>4} {:>4} {:>5} {:>8} {:>4}  {}\n",
        "WORKER (gRPC)",
        "PEER",
        "CLUSTER",
        "MEM MiB",
        "CPUS",
        "PEERS",
        "QUIC",
        "TCP",
        "READY",
        "FETCHING",
        "SEED",
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
        // Downloads under way: pieces done of total, summed.
        let dl: Vec<_> = st
            .torrents
            .iter()
            .filter(|t| t.state != "seeding")
            .collect();
        let fetching = if dl.is_empty() {
            "-".to_string()
        } else {
            format!(
                "{}/{}",
                dl.iter().map(|t| t.pieces_done).sum::<u32>(),
                dl.iter().map(|t| t.pieces_total).sum::<u32>()
            )
        };
        out.push_str(&format!(
            "{:<22} {:<10} {:<10} {:>7} {:>4} {:>5} {:>4} {:>4} {:>5} {:>8} {:>4}  {} (+{known} known)\n",
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
            fetching,
            st.torrents.iter().filter(|t| t.state == "seeding").count(),
            if local.is_empty() {
                "-".to_string()
            } else {
                local.join(", ")
            },
        ));
    }
    out
}

/// Prints a coordinator's view: the table, unreachable workers, SWARM_READY,
/// models and the placement.
pub async fn print_cluster(coordinator: &str) -> anyhow::Result<()> {
    let ch = crate::tls::endpoint(coordinator)?
        .connect_timeout(Duration::from_secs(3))
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {coordinator}"))?;
    let st = llama_cluster_proto::v1::coordinator_client::CoordinatorClient::new(ch)
        .get_cluster_status(llama_cluster_proto::v1::GetClusterStatusRequest {})
        .await
        .context("GetClusterStatus")?
        .into_inner();
    print!("{}", render(&status_rows(&st)));
    for w in st.workers.iter().filter(|w| !w.reachable) {
        println!("{:<22} unreachable: {}", w.grpc_addr, w.error);
    }
    println!(
        "SWARM_READY: {}; models: {}",
        if st.swarm_ready { "yes" } else { "no" },
        if st.models.is_empty() {
            "-".to_string()
        } else {
            st.models.join(", ")
        }
    );
    if let Some(p) = &st.placement {
        println!(
            "placement of {} ({} replica(s) asked, {} LoadShard sent):",
            p.model, p.replicas, p.loads_sent
        );
        for line in crate::placer::assignment_lines(p) {
            println!("  {line}");
        }
        if !p.short.is_empty() {
            println!("  fewer replicas than asked: {}", p.short.join(", "));
        }
        if !p.error.is_empty() {
            println!("  cannot place: {}", p.error);
        }
    }
    Ok(())
}
