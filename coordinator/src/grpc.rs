//! The coordinator's gRPC service (`llamacluster.v1.Coordinator`): the
//! aggregated cluster status and an inference entry point that forwards to
//! a worker driving the model. Reflection and grpc.health.v1 included.

use std::pin::Pin;
use std::time::Duration;

use anyhow::Context;
use futures::Stream;
use llama_cluster_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use llama_cluster_proto::v1::worker_client::WorkerClient;
use llama_cluster_proto::v1::{
    GetClusterStatusRequest, GetClusterStatusResponse, InferenceRequest, InferenceResponse,
    WorkerStatus,
};
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tracing::info;

use crate::placer::{Placer, WorkerSet};
use crate::status_table::fetch_status;

pub struct CoordinatorService {
    workers: WorkerSet,
    placer: Option<Placer>,
}

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
                    if !served.iter().any(|(m, _)| m == &s.model) {
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
    out.models = served.iter().map(|(m, _)| m.clone()).collect();
    (out, served)
}

type InferenceStream = Pin<Box<dyn Stream<Item = Result<InferenceResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    #[tracing::instrument(name = "coordinator.GetClusterStatus", skip_all)]
    async fn get_cluster_status(
        &self,
        _req: Request<GetClusterStatusRequest>,
    ) -> Result<Response<GetClusterStatusResponse>, Status> {
        Ok(Response::new(
            cluster_status(&self.workers.list(), self.placer.as_ref())
                .await
                .0,
        ))
    }

    type InferenceStream = InferenceStream;

    #[tracing::instrument(name = "coordinator.Inference", skip_all, fields(model = %req.get_ref().model))]
    async fn inference(
        &self,
        req: Request<InferenceRequest>,
    ) -> Result<Response<InferenceStream>, Status> {
        let req = req.into_inner();
        let served = self.workers.served().await;
        let worker = if req.model.is_empty() {
            served.first()
        } else {
            served.iter().find(|(m, _)| *m == req.model)
        }
        .map(|(_, w)| w.clone())
        .ok_or_else(|| {
            let names: Vec<&str> = served.iter().map(|(m, _)| m.as_str()).collect();
            Status::not_found(format!(
                "no worker drives model {:?}; served: {names:?}",
                req.model
            ))
        })?;
        info!("[API] gRPC Inference for {:?} via {worker}", req.model);
        let ch = tonic::transport::Channel::from_shared(format!("http://{worker}"))
            .map_err(|e| Status::internal(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| {
                // The view was stale: the next request asks the workers again.
                self.workers.set_served(vec![]);
                Status::unavailable(format!("worker {worker}: {e}"))
            })?;
        let stream =
            WorkerClient::with_interceptor(ch, llama_cluster_shared::telemetry::inject_grpc)
                .inference(req)
                .await?
                .into_inner();
        Ok(Response::new(Box::pin(crate::metrics::Metered::new(
            stream, "grpc",
        ))))
    }
}

/// Polls the workers: the metrics' cluster gauges, and the health status,
/// SERVING exactly while the cluster is SWARM_READY with a model served.
async fn watch_cluster(
    workers: WorkerSet,
    placer: Option<Placer>,
    health: tonic_health::server::HealthReporter,
    poll: Duration,
) {
    let mut last = None;
    loop {
        let (st, served) = cluster_status(&workers.list(), placer.as_ref()).await;
        let statuses: Vec<(String, llama_cluster_proto::v1::GetStatusResponse)> = st
            .workers
            .iter()
            .filter_map(|w| w.status.clone().map(|s| (w.grpc_addr.clone(), s)))
            .collect();
        let unreachable: Vec<String> = st
            .workers
            .iter()
            .filter(|w| !w.reachable)
            .map(|w| w.grpc_addr.clone())
            .collect();
        workers.learn(&statuses, &unreachable);
        workers.set_served(served.clone());
        if let Some(p) = &placer {
            p.round(&statuses);
        }
        let m = crate::metrics::metrics();
        m.workers.set(st.workers.len() as i64);
        m.workers_reachable
            .set(st.workers.iter().filter(|w| w.reachable).count() as i64);
        let ready = st.swarm_ready && !served.is_empty();
        m.swarm_ready.set(ready as i64);
        if last != Some(ready) {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status("", status).await;
            if ready {
                health
                    .set_serving::<CoordinatorServer<CoordinatorService>>()
                    .await;
                info!("[STATUS] SWARM_READY: coordinator health SERVING");
            } else {
                health
                    .set_not_serving::<CoordinatorServer<CoordinatorService>>()
                    .await;
                info!("[STATUS] not SWARM_READY: coordinator health NOT_SERVING");
            }
            last = Some(ready);
        }
        tokio::time::sleep(poll).await;
    }
}

/// Binds the coordinator's gRPC listener; returns the address and the server future.
pub async fn serve(
    addr: &str,
    workers: WorkerSet,
    placer: Option<Placer>,
    poll: Duration,
) -> anyhow::Result<(
    std::net::SocketAddr,
    impl std::future::Future<Output = anyhow::Result<()>>,
)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind {addr}"))?;
    let bound = listener.local_addr()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    // NOT_SERVING until SWARM_READY: readiness follows the cluster.
    health
        .set_not_serving::<CoordinatorServer<CoordinatorService>>()
        .await;
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    // "liveness": SERVING while the process answers (Kubernetes liveness probe).
    health
        .set_service_status("liveness", ServingStatus::Serving)
        .await;
    tokio::spawn(watch_cluster(workers.clone(), placer.clone(), health, poll));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(llama_cluster_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("reflection")?;
    // v1alpha too: grpcurl 1.8 and Python's grpcio-reflection speak only that.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(llama_cluster_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("reflection v1alpha")?;
    let svc = CoordinatorService { workers, placer };
    let fut = async move {
        tonic::transport::Server::builder()
            .trace_fn(llama_cluster_shared::telemetry::grpc_server_span)
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(CoordinatorServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .context("coordinator gRPC")
    };
    Ok((bound, fut))
}
