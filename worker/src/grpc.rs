//! The worker's gRPC control plane (`llamacluster.v1.Worker`), with server
//! reflection and the standard `grpc.health.v1` service.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::Stream;
use libp2p::PeerId;
use llama_cluster_engine::sampling::SamplingParams;
use llama_cluster_proto::v1::inference_response::Event;
use llama_cluster_proto::v1::worker_server::{Worker, WorkerServer};
use llama_cluster_proto::v1::{
    GetStatusRequest, GetStatusResponse, InferenceRequest, InferenceResponse, InferenceStats,
    LoadShardRequest, LoadShardResponse, PeerInfo, RelayRequest, RelayResponse, ShardInfo,
    SyncTorrentsRequest, SyncTorrentsResponse, TextChunk, TorrentEntry, TorrentInfo,
};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::pipeline::driver::{GenStats, GenerateRequest};
use crate::pipeline::host::PipelineError;
use llama_cluster_shared::auth::{Class, Tokens};
use llama_cluster_shared::protocol::{CommandKind, CommandResponse, ErrorCode};
use llama_cluster_shared::status::NodeStatus;
use llama_cluster_shared::unix_now;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::dispatcher::Dispatcher;
use crate::net::NetHandle;

/// Full gRPC name of the worker service (for health checks).
pub const SERVICE_NAME: &str = "llamacluster.v1.Worker";

pub struct WorkerService {
    dispatcher: Dispatcher,
    net: NetHandle,
    peer_id: String,
    tokens: Tokens,
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
                grpc_addr: p.grpc_addr,
            })
            .collect(),
        swarm_ready: s.swarm_ready,
        swarm_ready_by: s.swarm_ready_by,
        grpc_addr: s.grpc_addr,
        role: s.role,
        resources: Some(llama_cluster_proto::v1::Resources {
            memory_total_bytes: s.resources.memory_total_bytes,
            memory_budget_bytes: s.resources.memory_budget_bytes,
            cpus: s.resources.cpus,
        }),
        torrents: s
            .torrents
            .into_iter()
            .map(|t| TorrentInfo {
                file_hash: t.file_hash,
                name: t.name,
                size: t.size,
                state: t.state,
                verified_bytes: t.verified_bytes,
                fetched_bytes: t.fetched_bytes,
                pieces_done: t.pieces_done,
                pieces_total: t.pieces_total,
                peers: t.peers,
                bad_pieces: t.bad_pieces,
                bytes_from_seeders: t.bytes_from_seeders,
                bytes_from_partial: t.bytes_from_partial,
                bad_peers: t.bad_peers,
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
                open_sessions: sh.load,
                max_sessions: sh.max_sessions,
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
        self.tokens.check_grpc(Class::Admin, &req)?;
        let r = req.into_inner();
        let pipeline = self.dispatcher.pipeline();
        let out = if r.unload {
            pipeline.unload_shard().await
        } else if r.shard_id.is_empty() {
            Err(PipelineError::InvalidArgument(
                "shard_id is required".into(),
            ))
        } else {
            pipeline
                .load_shard_from(&r.shard_id, &r.manifest, &r.manifest_json)
                .await
        }
        .map_err(pipeline_status)?;
        Ok(Response::new(LoadShardResponse {
            shard_id: out.shard_id,
            model: out.model,
            layer_start: out.layer_start,
            layer_end: out.layer_end,
            state: out.state.as_str().into(),
            message: if r.unload {
                "unloaded".into()
            } else {
                "loaded".into()
            },
            load_ms: out.load_ms,
        }))
    }

    type InferenceStream = InferenceStream;

    #[tracing::instrument(name = "grpc.Inference", skip_all, fields(model = %req.get_ref().model))]
    async fn inference(
        &self,
        req: Request<InferenceRequest>,
    ) -> Result<Response<Self::InferenceStream>, Status> {
        self.tokens.check_grpc(Class::Inference, &req)?;
        let r = req.into_inner();
        let gen_req = GenerateRequest {
            model: r.model,
            prompt: r.prompt,
            chat: r.chat,
            max_tokens: r.max_tokens,
            sampling: SamplingParams {
                temperature: r.temperature,
                top_k: r.top_k.min(i32::MAX as u32) as i32,
                top_p: if r.top_p <= 0.0 { 1.0 } else { r.top_p },
                repeat_penalty: if r.repeat_penalty <= 0.0 {
                    1.0
                } else {
                    r.repeat_penalty
                },
                penalty_last_n: SamplingParams::default().penalty_last_n,
                seed: r.seed as u32,
                frequency_penalty: r.frequency_penalty,
                presence_penalty: r.presence_penalty,
                // top_logprobs alone asks for them too.
                logprobs: (r.logprobs || r.top_logprobs > 0)
                    .then(|| r.top_logprobs.min(u32::from(u8::MAX)) as u8),
            },
            stop: r.stop,
            return_prompt_logits: r.return_prompt_logits,
            ignore_eos: r.ignore_eos,
            messages: r
                .messages
                .into_iter()
                .map(|m| (m.role, m.content))
                .collect(),
            resume: r.resume_token_ids,
        };
        let pipeline = self.dispatcher.pipeline().clone();
        let (chunk_tx, mut chunk_rx) = mpsc::channel(64);
        let run = tokio::spawn(
            async move { pipeline.generate(gen_req, chunk_tx).await }.in_current_span(),
        );
        // Errors found before the first token (bad input, no route, ...)
        // come back as the call's status; later ones end the stream.
        let first = match chunk_rx.recv().await {
            Some(c) => c,
            None => {
                return match run.await {
                    Ok(Ok(stats)) => {
                        let item = Ok(InferenceResponse {
                            event: Some(Event::Stats(stats_to_proto(stats))),
                        });
                        Ok(Response::new(
                            Box::pin(tokio_stream::iter([item])) as InferenceStream
                        ))
                    }
                    Ok(Err(e)) => Err(pipeline_status(e)),
                    Err(e) => Err(Status::internal(e.to_string())),
                };
            }
        };
        let (out_tx, out_rx) = mpsc::channel::<Result<InferenceResponse, Status>>(64);
        tokio::spawn(async move {
            let mut next = Some(first);
            while let Some(c) = next {
                let item = InferenceResponse {
                    event: Some(Event::Chunk(TextChunk {
                        text: c.text,
                        token_ids: c.token_ids,
                        logprobs: c.logprobs.into_iter().map(token_logprob).collect(),
                    })),
                };
                if out_tx.send(Ok(item)).await.is_err() {
                    return; // client went away; dropping chunk_rx stops generation
                }
                next = chunk_rx.recv().await;
            }
            let last = match run.await {
                Ok(Ok(stats)) => Ok(InferenceResponse {
                    event: Some(Event::Stats(stats_to_proto(stats))),
                }),
                Ok(Err(e)) => Err(pipeline_status(e)),
                Err(e) => Err(Status::internal(e.to_string())),
            };
            let _ = out_tx.send(last).await;
        });
        Ok(Response::new(
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(out_rx)) as InferenceStream,
        ))
    }

    #[tracing::instrument(name = "grpc.SyncTorrents", skip_all)]
    async fn sync_torrents(
        &self,
        req: Request<SyncTorrentsRequest>,
    ) -> Result<Response<SyncTorrentsResponse>, Status> {
        if req.get_ref().fetch_missing {
            self.tokens.check_grpc(Class::Admin, &req)?;
        }
        let entries = self
            .dispatcher
            .sync_torrents(req.get_ref().fetch_missing)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(SyncTorrentsResponse {
            entries: entries
                .into_iter()
                .map(|e| TorrentEntry {
                    file_hash: e.file_hash,
                    name: e.name,
                    size: e.size,
                    providers: e.providers,
                    local: e.local,
                })
                .collect(),
        }))
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
        self.tokens.check_grpc(Class::Admin, &req)?;
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
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(RelayResponse {
            json: String::from_utf8_lossy(&resp).into_owned(),
            round_trip_ms: t0.elapsed().as_secs_f64() * 1000.0,
        }))
    }
}

/// gRPC status of a pipeline error.
pub fn pipeline_status(e: PipelineError) -> Status {
    match e {
        PipelineError::InvalidArgument(m) => Status::invalid_argument(m),
        PipelineError::NotFound(m) => Status::not_found(m),
        PipelineError::Unavailable(m) => Status::unavailable(m),
        PipelineError::DeadlineExceeded(m) => Status::deadline_exceeded(m),
        PipelineError::ResourceExhausted(m) => Status::resource_exhausted(m),
        PipelineError::Internal(m) => Status::internal(m),
        PipelineError::Cancelled(m) => Status::cancelled(m),
    }
}

fn stats_to_proto(s: GenStats) -> InferenceStats {
    InferenceStats {
        prompt_tokens: s.prompt_tokens,
        generated_tokens: s.generated_tokens,
        time_to_first_token_ms: s.ttft_ms,
        tokens_per_second: s.tokens_per_second,
        route: s.route,
        finish_reason: s.finish_reason,
        prompt_logits: s.prompt_logits,
        bytes_per_token_per_hop: s.bytes_per_token_per_hop,
        total_ms: s.total_ms,
    }
}

/// grpc.health.v1 service name that is SERVING while the process answers.
pub const LIVENESS: &str = "liveness";

/// Binds the gRPC listener (port 0 picks a free one).
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    let sock: SocketAddr = addr.parse().context("grpc_addr")?;
    TcpListener::bind(sock)
        .await
        .with_context(|| format!("cannot bind gRPC address {sock}"))
}

/// The gRPC address peers and the coordinator can reach: the bound one,
/// with an unspecified IP (`0.0.0.0`) replaced by the first external or
/// P2P address's IP; empty when none is known (others then cannot learn it,
/// rather than learn a loopback address that means another machine).
pub fn advertised(bound: SocketAddr, external: &[String], p2p_host: &str) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    let from_multiaddr = external.iter().find_map(|a| {
        a.parse::<libp2p::Multiaddr>()
            .ok()?
            .iter()
            .find_map(|p| match p {
                libp2p::multiaddr::Protocol::Ip4(ip) => Some(std::net::IpAddr::V4(ip)),
                libp2p::multiaddr::Protocol::Ip6(ip) => Some(std::net::IpAddr::V6(ip)),
                _ => None,
            })
    });
    from_multiaddr
        .or_else(|| {
            p2p_host
                .parse()
                .ok()
                .filter(|ip: &std::net::IpAddr| !ip.is_unspecified())
        })
        .map(|ip| SocketAddr::new(ip, bound.port()).to_string())
        .unwrap_or_default()
}

/// Serves the gRPC API on `listener`; returns its address and the serving future.
pub async fn serve(
    listener: TcpListener,
    dispatcher: Dispatcher,
    net: NetHandle,
    peer_id: PeerId,
    tokens: Tokens,
    tls: Option<&llama_cluster_shared::tls::ServerTls>,
    client_timeout: std::time::Duration,
) -> anyhow::Result<(
    SocketAddr,
    impl std::future::Future<Output = anyhow::Result<()>>,
)> {
    let bound = listener.local_addr()?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    // "liveness": SERVING while the process answers (Kubernetes liveness probe).
    health_reporter
        .set_service_status(LIVENESS, tonic_health::ServingStatus::Serving)
        .await;
    // SERVING once the announced shard is loaded (always, for a node that
    // announces none): Kubernetes readiness follows the shard.
    let state = dispatcher.state().clone();
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let serving = state.read(|s| {
                s.local_shard
                    .as_ref()
                    .is_none_or(|r| r.state == llama_cluster_shared::dht_keys::ShardState::Ready)
            });
            if last != Some(serving) {
                let status = if serving {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                health_reporter.set_service_status("", status).await;
                health_reporter
                    .set_service_status(SERVICE_NAME, status)
                    .await;
                last = Some(serving);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(llama_cluster_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // Only what this server serves (the descriptors also hold the
        // other node's service).
        .with_service_name("llamacluster.v1.Worker")
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection")
        .build_v1()
        .context("building reflection service")?;
    // v1alpha too: grpcurl 1.8 and Python's grpcio-reflection speak only that.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(llama_cluster_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("llamacluster.v1.Worker")
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1alpha.ServerReflection")
        .build_v1alpha()
        .context("reflection v1alpha")?;
    let service = WorkerService {
        dispatcher,
        net,
        peer_id: peer_id.to_string(),
        tokens,
    };
    let builder =
        llama_cluster_shared::grpc_server::builder(tls, client_timeout).context("gRPC TLS")?;
    let mode = if tls.is_some() { "TLS" } else { "plaintext" };
    info!("[STATUS] gRPC on {bound} ({mode}; reflection, grpc.health.v1)");
    let fut = async move {
        builder
            .trace_fn(llama_cluster_shared::telemetry::grpc_server_span)
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(WorkerServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .context("gRPC server")
    };
    Ok((bound, fut))
}

/// A generated token's log-probabilities on the wire.
fn token_logprob(
    l: crate::pipeline::request::TokenLogprob,
) -> llama_cluster_proto::v1::TokenLogprob {
    llama_cluster_proto::v1::TokenLogprob {
        token_id: l.token_id,
        token: String::from_utf8_lossy(&l.bytes).into_owned(),
        bytes: l.bytes,
        logprob: l.logprob,
        top: l.top.into_iter().map(token_logprob).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advertised_address_is_reachable_or_empty() {
        let bound: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        assert_eq!(advertised(bound, &[], "0.0.0.0"), "127.0.0.1:5000");
        let any: SocketAddr = "0.0.0.0:5000".parse().unwrap();
        let ext = vec!["/ip4/10.1.2.3/udp/9000/quic-v1".to_string()];
        assert_eq!(advertised(any, &ext, "0.0.0.0"), "10.1.2.3:5000");
        assert_eq!(advertised(any, &[], "192.168.1.7"), "192.168.1.7:5000");
        assert_eq!(advertised(any, &[], "0.0.0.0"), "", "no loopback guess");
    }
}
