//! The cluster's status as the coordinator sees it: every worker's
//! GetStatus, who serves which model, SWARM_READY, the placement.

use llama_cluster_proto::v1::{GetClusterStatusResponse, WorkerStatus};

use crate::placer::Placer;
use crate::status_table::fetch_status;

/// Every worker's status; `models` with a ready shard and a worker serving each.
pub async fn cluster_status(
    workers: &[String],
    placer: Option<&Placer>,
) -> (GetClusterStatusResponse, Vec<(String, String)>) {
    let answers = futures::future::join_all(
        workers
            .iter()
            .map(|w| async move { (w.clone(), fetch_status(w).await) }),
    )
    .await;
    let mut out = GetClusterStatusResponse::default();
    let mut served: Vec<(String, String)> = Vec::new();
    let mut peers = std::collections::HashSet::new();
    for (addr, r) in answers {
        match r {
            // The bootstrap node is no worker; one worker is listed once.
            Ok(st) if st.role == "bootstrap" || !peers.insert(st.peer_id.clone()) => {}
            Ok(st) => {
                for s in st
                    .shards
                    .iter()
                    .filter(|s| s.availability == "LOCAL" && s.state == "ready")
                {
                    if !served.iter().any(|(m, a)| m == &s.model && a == &addr) {
                        served.push((s.model.clone(), addr.clone()));
                    }
                }
                out.workers.push(WorkerStatus {
                    grpc_addr: addr,
                    reachable: true,
                    error: String::new(),
                    status: Some(st),
                });
            }
            Err(e) => out.workers.push(WorkerStatus {
                grpc_addr: addr,
                reachable: false,
                error: format!("{e:#}"),
                status: None,
            }),
        }
    }
    let answered: Vec<_> = out
        .workers
        .iter()
        .filter_map(|w| w.status.as_ref())
        .collect();
    // Workers that serve nothing yet (a joiner) do not count.
    let serving: Vec<_> = answered
        .iter()
        .filter(|s| s.shards.iter().any(|x| x.availability == "LOCAL"))
        .collect();
    out.swarm_ready = !serving.is_empty() && serving.iter().all(|s| s.swarm_ready);
    if let Some(p) = placer {
        let statuses: Vec<(String, llama_cluster_proto::v1::GetStatusResponse)> = out
            .workers
            .iter()
            .filter_map(|w| w.status.clone().map(|s| (w.grpc_addr.clone(), s)))
            .collect();
        // The coordinator's own view: every shard of the placed model
        // ready on a worker that answered.
        out.swarm_ready = p.covered(&statuses);
        out.placement = Some(p.status());
    }
    let models: std::collections::BTreeSet<String> =
        served.iter().map(|(m, _)| m.clone()).collect();
    out.models = models.into_iter().collect();
    (out, served)
}
