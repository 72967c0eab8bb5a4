//! The coordinator's gRPC service (`llamacluster.v1.Coordinator`): the
//! aggregated cluster status and an inference entry point that forwards to
//! a worker driving the model. Reflection and grpc.health.v1 included.

use std::pin::Pin;
use std::time::Duration;

use anyhow::Context;
use futures::Stream;
use llama_cluster_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use llama_cluster_proto::v1::{
    GetClusterStatusRequest, GetClusterStatusResponse, InferenceRequest, InferenceResponse,
};
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tracing::info;

use crate::cluster::cluster_status;
use crate::drivers::Drivers;
use crate::placer::Placer;
use crate::workers::WorkerSet;

pub struct CoordinatorService {
    workers: WorkerSet,
    placer: Option<Placer>,
    drivers: Drivers,
}

type InferenceStream = Pin<Box<dyn Stream<Item = Result<InferenceResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    #[tracing::instrument(name = "coordinator.GetClusterStatus", skip_all)]
    async fn get_cluster_status(
        &self,
        _req: Request<GetClusterStatusRequest>,
    ) -> Result<Response<GetClusterStatusResponse>, Status> {
        let mut st = cluster_status(&self.workers.list(), self.placer.as_ref())
            .await
            .0;
        let f = self.drivers.figures();
        st.queued_requests = f.queued;
        st.requests_in_flight = f.in_flight;
        st.session_capacity = f.capacity;
        st.queue_wait_ms_max = f.wait_ms_max;
        Ok(Response::new(st))
    }

    type InferenceStream = InferenceStream;

    #[tracing::instrument(name = "coordinator.Inference", skip_all, fields(model = %req.get_ref().model))]
    async fn inference(
        &self,
        req: Request<InferenceRequest>,
    ) -> Result<Response<InferenceStream>, Status> {
        self.drivers
            .tokens()
            .check_grpc(llama_cluster_shared::auth::Class::Inference, &req)?;
        let req = req.into_inner();
        info!("[API] gRPC Inference for {:?}", req.model);
        self.drivers.learn_if_empty(&self.workers).await;
        let stream = self.drivers.run(req).await?;
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
    drivers: Drivers,
    health: tonic_health::server::HealthReporter,
    poll: Duration,
) {
    let mut last = None;
    let mut polled_again = false;
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
        let found_new = workers.learn(&statuses, &unreachable);
        workers.set_served(served.clone());
        drivers.update(served.clone(), &statuses);
        // Workers just found (through the ones given) are polled at once,
        // before placement plans or readiness is judged on part of the
        // cluster: a plan without them would move shards they already
        // serve (a coordinator restarted with one seed address would
        // unload and reload live shards). Once in a row at most.
        if found_new && !polled_again {
            polled_again = true;
            continue;
        }
        polled_again = false;
        if let Some(p) = &placer {
            p.round(&statuses);
        }
        let m = crate::metrics::metrics();
        m.workers.set(st.workers.len() as i64);
        m.workers_reachable
            .set(st.workers.iter().filter(|w| w.reachable).count() as i64);
        let ready = st.swarm_ready && !served.is_empty();
        m.swarm_ready.set(ready as i64);
        workers.set_ready(ready);
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
    drivers: Drivers,
    tls: Option<&llama_cluster_shared::tls::ServerTls>,
    client_timeout: Duration,
) -> anyhow::Result<(
    std::net::SocketAddr,
    impl std::future::Future<Output = anyhow::Result<()>> + use<>,
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
    tokio::spawn(watch_cluster(
        workers.clone(),
        placer.clone(),
        drivers.clone(),
        health,
        poll,
    ));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(llama_cluster_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // Only what this server serves (the descriptors also hold the
        // other node's service).
        .with_service_name("llamacluster.v1.Coordinator")
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .build_v1()
        .context("reflection")?;
    // v1alpha too: grpcurl 1.8 and Python's grpcio-reflection speak only that.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(llama_cluster_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("llamacluster.v1.Coordinator")
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
        .build_v1alpha()
        .context("reflection v1alpha")?;
    let svc = CoordinatorService {
        workers,
        placer,
        drivers,
    };
    let builder =
        llama_cluster_shared::grpc_server::builder(tls, client_timeout).context("gRPC TLS")?;
    let fut = async move {
        builder
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
