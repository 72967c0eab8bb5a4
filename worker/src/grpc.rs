//! The worker's gRPC control plane (`llamacluster.v1.Worker`), with server
//! reflection and the standard `grpc.health.v1` service.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::Stream;
use libp2p::PeerId;
use llama_cluster_proto::v1::worker_server::{Worker, WorkerServer};
use llama_cluster_proto::v1::{
    GetStatusRequest, GetStatusResponse, InferenceRequest, InferenceResponse, LoadShardRequest,
    LoadShardResponse, PeerInfo, RelayRequest, RelayResponse, ShardInfo, SyncTorrentsRequest,
    SyncTorrentsResponse,
};
use llama_cluster_shared::protocol::{CommandKind, CommandResponse, ErrorCode};
use llama_cluster_shared::status::NodeStatus;
use llama_cluster_shared::unix_now;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::dispatcher::Dispatcher;
use crate::node::NetHandle;

/// Full gRPC name of the worker service (for health checks).
pub const SERVICE_NAME: &str = "llamacluster.v1.Worker";

pub struct WorkerService {
    dispatcher: Dispatcher,
    net: NetHandle,
    peer_id: String,
}

fn to_status(resp: &CommandResponse) -> Status {
    let (code, message) = match &resp.error {
        Some(e) => (e.code, e.message.clone()),
        None => (ErrorCode::Internal, "command failed".to_string()),
    };
    match code {
        ErrorCode::NotImplemented => Status::unimplemented(message),
        ErrorCode::InvalidParams | ErrorCode::MalformedJson | ErrorCode::TooLarge => {
            Status::invalid_argument(message)
        }
        ErrorCode::UnknownCommand | ErrorCode::WrongRecipient => Status::invalid_argument(message),
        ErrorCode::Unavailable => Status::unavailable(message),
        ErrorCode::Internal => Status::internal(message),
    }
}

/// Maps the dispatcher's status into the protobuf message.
pub fn status_to_proto(s: NodeStatus) -> GetStatusResponse {
    GetStatusResponse {
        peer_id: s.peer_id,
        cluster: s.cluster,
        version: s.version,
        uptime_secs: s.uptime_secs,
        listen_addrs: s.listen_addrs,
        quic_enabled: s.quic_enabled,
        peers: s
            .peers
            .into_iter()
            .map(|p| PeerInfo {
                peer_id: p.peer_id,
                transport: p.transport.as_str().into(),
                address: p.address,
                direction: p.direction,
            })
            .collect(),
        shards: s
            .shards
            .into_iter()
            .map(|sh| ShardInfo {
                shard_id: sh.shard_id,
                model: sh.model,
                layer_start: sh.layer_start,
                layer_end: sh.layer_end,
                state: sh.state.as_str().into(),
                peer_id: sh.peer_id,
                addrs: sh.addrs,
                availability: sh.availability.as_str().into(),
                updated_at: sh.updated_at,
            })
            .collect(),
    }
}

type InferenceStream = Pin<Box<dyn Stream<Item = Result<InferenceResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    #[tracing::instrument(name = "grpc.LoadShard", skip_all, fields(shard_id = %req.get_ref().shard_id))]
    async fn load_shard(
        &self,
        req: Request<LoadShardRequest>,
    ) -> Result<Response<LoadShardResponse>, Status> {
        let r = req.into_inner();
        let params = json!({
            "shard_id": r.shard_id, "model": r.model, "layer_start": r.layer_start,
            "layer_end": r.layer_end, "path": r.path, "unload": r.unload,
        });
        let resp = self.dispatcher.run(CommandKind::LoadShard, params).await;
        Err(to_status(&resp))
    }

    type InferenceStream = InferenceStream;

    #[tracing::instrument(name = "grpc.Inference", skip_all, fields(model = %req.get_ref().model))]
    async fn inference(
        &self,
        req: Request<InferenceRequest>,
    ) -> Result<Response<Self::InferenceStream>, Status> {
        let r = req.into_inner();
        let params = json!({ "model": r.model, "prompt": r.prompt, "max_tokens": r.max_tokens });
        let resp = self.dispatcher.run(CommandKind::Inference, params).await;
        Err(to_status(&resp))
    }

    #[tracing::instrument(name = "grpc.SyncTorrents", skip_all)]
    async fn sync_torrents(
        &self,
        req: Request<SyncTorrentsRequest>,
    ) -> Result<Response<SyncTorrentsResponse>, Status> {
        let params = json!({ "fetch_missing": req.get_ref().fetch_missing });
        let resp = self.dispatcher.run(CommandKind::SyncTorrents, params).await;
        Err(to_status(&resp))
    }

    #[tracing::instrument(name = "grpc.GetStatus", skip_all)]
    async fn get_status(
        &self,
        _req: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        let resp = self
            .dispatcher
            .run(CommandKind::GetStatus, Value::Null)
            .await;
        if !resp.ok {
            return Err(to_status(&resp));
        }
        let status: NodeStatus = serde_json::from_value(resp.result.unwrap_or_default())
            .map_err(|e| Status::internal(format!("status: {e}")))?;
        Ok(Response::new(status_to_proto(status)))
    }

    #[tracing::instrument(name = "grpc.Relay", skip_all, fields(to = %req.get_ref().to_peer_id))]
    async fn relay(&self, req: Request<RelayRequest>) -> Result<Response<RelayResponse>, Status> {
        let r = req.into_inner();
        let peer: PeerId = r
            .to_peer_id
            .parse()
            .map_err(|e| Status::invalid_argument(format!("to_peer_id: {e}")))?;
        let mut body: Value = serde_json::from_str(&r.json)
            .map_err(|e| Status::invalid_argument(format!("json: {e}")))?;
        if let Value::Object(map) = &mut body {
            map.entry("from").or_insert_with(|| json!(self.peer_id));
            if map.contains_key("message") {
                map.entry("timestamp").or_insert_with(|| json!(unix_now()));
            }
            if map.contains_key("command") {
                map.entry("request_id")
                    .or_insert_with(|| json!(format!("relay-{}", unix_now())));
            }
        }
        let timeout = Duration::from_millis(if r.timeout_ms == 0 {
            10_000
        } else {
            r.timeout_ms as u64
        });
        let bytes = serde_json::to_vec(&body).map_err(|e| Status::internal(e.to_string()))?;
        let t0 = Instant::now();
        let resp = self
            .net
            .request(peer, bytes, timeout)
            .await
            .map_err(Status::unavailable)?;
        Ok(Response::new(RelayResponse {
            json: String::from_utf8_lossy(&resp).into_owned(),
            round_trip_ms: t0.elapsed().as_secs_f64() * 1000.0,
        }))
    }
}

/// Binds the gRPC listener (port 0 picks a free one) and returns its address
/// and the serving future.
pub async fn serve(
    addr: &str,
    dispatcher: Dispatcher,
    net: NetHandle,
    peer_id: PeerId,
) -> anyhow::Result<(
    SocketAddr,
    impl std::future::Future<Output = anyhow::Result<()>>,
)> {
    let sock: SocketAddr = addr.parse().context("grpc_addr")?;
    let listener = TcpListener::bind(sock)
        .await
        .with_context(|| format!("cannot bind gRPC address {sock}"))?;
    let bound = listener.local_addr()?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status(SERVICE_NAME, tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(llama_cluster_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building reflection service")?;
    let service = WorkerService {
        dispatcher,
        net,
        peer_id: peer_id.to_string(),
    };
    info!("[STATUS] gRPC on {bound} (reflection, grpc.health.v1)");
    let fut = async move {
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection)
            .add_service(WorkerServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .context("gRPC server")
    };
    Ok((bound, fut))
}
