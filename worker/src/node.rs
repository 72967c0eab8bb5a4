//! A running node: the swarm task that owns libp2p, the handle other tasks
//! use to reach it, and start-up (identity, listeners, bootstrap dials).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::OutboundRequestId;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, rendezvous};
use llama_cluster_shared::config::NodeConfig;
use llama_cluster_shared::dht_keys::{ShardRecord, ShardState};
use llama_cluster_shared::status::{Availability, Transport};
use llama_cluster_shared::unix_now;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::dispatcher::Dispatcher;
use crate::network::behaviour::{NodeBehaviour, NodeBehaviourEvent, Role, build_swarm};
use crate::network::links::{LinkCounters, Links};
use crate::network::{json_codec::JsonRequest, transport_of};
use crate::pipeline::frame::{ACTIVATION_PROTOCOL, MAX_FRAME as MAX_ACTIVATION_FRAME};
use crate::pipeline::{Pipeline, PipelineConfig};
use crate::state::{ConnInfo, SharedState};
use crate::torrent::Torrents;

/// How long a TCP connection replaced by QUIC stays open.
const TCP_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How long pieces for a peer that could not be dialed over TCP go over its
/// other connections before TCP is tried again.
pub(crate) const NO_TCP_FOR: Duration = Duration::from_secs(300);

/// The same when no TCP address of the peer was known yet (identify may
/// not have told its addresses at the start of a download).
pub(crate) const NO_TCP_ADDRESS_FOR: Duration = Duration::from_secs(10);

/// Requests other tasks send to the swarm task.
#[derive(Debug)]
pub enum NetCommand {
    /// Send a JSON body to a peer and return its response.
    Request {
        peer: PeerId,
        body: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, String>>,
    },
    /// Send a binary frame (activation or piece protocol) and return the answer.
    Frame {
        proto: FrameProto,
        peer: PeerId,
        body: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, String>>,
    },
    /// Re-publish this node's records now (its shard changed state).
    Publish,
    /// Ask the DHT for the latest records of these shard ids.
    QueryShards(Vec<String>),
    /// Find the providers of a DHT key, answering within `bound`.
    GetProviders {
        key: String,
        bound: Duration,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    /// Announce this node as a provider of a DHT key.
    Provide(String),
}

/// The binary request-response protocols (length-prefixed frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameProto {
    /// Shard file metadata and pieces, over any connection.
    Torrent,
    /// Shard file pieces, over a TCP connection to the peer (dialed when
    /// there is none); over any connection when the peer cannot be reached
    /// over TCP (see `network::tcp_only`).
    TorrentTcp,
}

/// Handle on the swarm task.
#[derive(Debug, Clone)]
pub struct NetHandle {
    tx: mpsc::Sender<NetCommand>,
    /// Persistent streams for activation frames.
    links: Links,
}

impl NetHandle {
    async fn call(
        &self,
        cmd: NetCommand,
        rx: oneshot::Receiver<Result<Vec<u8>, String>>,
        peer: PeerId,
        timeout: Duration,
    ) -> Result<Vec<u8>, String> {
        self.tx
            .send(cmd)
            .await
            .map_err(|_| "node is shutting down".to_string())?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("node is shutting down".into()),
            Err(_) => Err(format!("no answer from {peer} within {timeout:?}")),
        }
    }

    /// Sends `body` to `peer` over `/json-message/1.0`.
    pub async fn request(
        &self,
        peer: PeerId,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, String> {
        let (reply, rx) = oneshot::channel();
        self.call(NetCommand::Request { peer, body, reply }, rx, peer, timeout)
            .await
    }

    /// Sends a binary frame to `peer`, waiting at most `timeout`.
    pub async fn frame(
        &self,
        proto: FrameProto,
        peer: PeerId,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, String> {
        let (reply, rx) = oneshot::channel();
        self.call(
            NetCommand::Frame {
                proto,
                peer,
                body,
                reply,
            },
            rx,
            peer,
            timeout,
        )
        .await
    }

    /// Sends an activation frame to `peer` over a persistent stream,
    /// waiting at most `timeout` (a timeout's error says "within").
    pub async fn activation(
        &self,
        peer: PeerId,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, String> {
        self.links.call(peer, body, timeout).await
    }

    /// Providers of `key` in the DHT: the ones found by `bound` (peers
    /// that are gone cost a dial timeout each, so a lookup can take long),
    /// or a moment after the first ones were found.
    pub async fn get_providers(&self, key: String, bound: Duration) -> Vec<PeerId> {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(NetCommand::GetProviders { key, bound, reply })
            .await
            .is_err()
        {
            return vec![];
        }
        tokio::time::timeout(Duration::from_secs(25), rx)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    }

    /// Announces this node as a provider of `key`.
    pub fn provide(&self, key: String) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(NetCommand::Provide(key)).await;
        });
    }

    /// A handle on a channel nobody serves (unit tests of other modules).
    /// A connection to `peer` closed (see [`Links::connection_closed`]).
    pub(crate) fn connection_closed(&self, peer: &PeerId) {
        self.links.connection_closed(peer);
    }

    pub fn for_tests(tx: mpsc::Sender<NetCommand>) -> Self {
        let control = libp2p_stream::Behaviour::new().new_control();
        NetHandle {
            tx,
            links: Links::new(
                control,
                ACTIVATION_PROTOCOL,
                MAX_ACTIVATION_FRAME,
                LinkCounters::default(),
            ),
        }
    }

    /// Asks the swarm task to re-publish this node's records.
    pub fn publish(&self) {
        let _ = self.tx.try_send(NetCommand::Publish);
    }

    /// Asks the swarm task to look up the records of `shard_ids` in the
    /// DHT; what it finds lands in the node's state.
    pub fn query_shards(&self, shard_ids: Vec<String>) {
        let _ = self.tx.try_send(NetCommand::QueryShards(shard_ids));
    }
}

/// What an outbound request is waiting for.
pub(crate) enum Pending {
    External(Outbound),
    StatusProbe(PeerId),
    /// A one-way notice (SWARM_READY); the answer is only logged.
    Notice,
}

/// A request some task waits on, kept so it can be sent again once.
pub(crate) struct Outbound {
    pub peer: PeerId,
    pub reply: oneshot::Sender<Result<Vec<u8>, String>>,
    pub body: Vec<u8>,
    pub retried: u8,
}

/// A provider lookup: who was found so far, who waits, and when to answer
/// without waiting for slow (or dead) peers the query still talks to.
pub(crate) struct ProviderQuery {
    pub found: HashSet<PeerId>,
    pub reply: Option<oneshot::Sender<Vec<PeerId>>>,
    pub answer_at: Option<tokio::time::Instant>,
}

/// Where binary-protocol handlers send their responses back.
pub(crate) type FrameResponseTx = mpsc::Sender<(
    FrameProto,
    libp2p::request_response::ResponseChannel<Vec<u8>>,
    Vec<u8>,
)>;

/// Where request handlers send their responses back to the swarm task.
pub(crate) type ResponseTx =
    mpsc::Sender<(libp2p::request_response::ResponseChannel<Vec<u8>>, Vec<u8>)>;

/// Binary frames sent and not yet answered.
pub(crate) type PendingFrames = HashMap<(FrameProto, OutboundRequestId), Outbound>;

/// The swarm task's state.
pub struct Node {
    pub(crate) swarm: Swarm<NodeBehaviour>,
    /// Whether this node announces itself: rendezvous registration, DHT
    /// membership and provider records (a one-shot `fetch` does not).
    pub(crate) announce: bool,
    /// libp2p's own metrics (connections, Kademlia, identify, ping).
    pub(crate) p2p_metrics: libp2p::metrics::Metrics,
    pub(crate) cfg: NodeConfig,
    pub(crate) role: Role,
    pub(crate) state: SharedState,
    pub(crate) dispatcher: Dispatcher,
    /// Peers being dialed, with the TCP addresses to try if QUIC fails.
    pub(crate) dialing: HashMap<PeerId, Vec<Multiaddr>>,
    /// Rendezvous servers seen, with the discovery cookie of each.
    pub(crate) rendezvous_points: HashMap<PeerId, Option<rendezvous::Cookie>>,
    pub(crate) bootstrap_addrs: Vec<Multiaddr>,
    pub(crate) pending: HashMap<OutboundRequestId, Pending>,
    pub(crate) responses: ResponseTx,
    pub(crate) frame_responses: FrameResponseTx,
    pub(crate) pending_frames: PendingFrames,
    pub(crate) pipeline: Pipeline,
    pub(crate) torrents: Torrents,
    /// Provider lookups in progress: found so far, and who waits.
    pub(crate) provider_queries: HashMap<libp2p::kad::QueryId, ProviderQuery>,
    /// Whether our records have reached at least one other DHT node.
    pub(crate) published: bool,
    /// Peers already counted as discovered (for the one-time log line).
    pub(crate) discovered: HashSet<PeerId>,
    /// Peers we already tried to move from TCP to QUIC.
    pub(crate) quic_upgrade_tried: HashSet<PeerId>,
    /// Model and layer count this node checks coverage for (from its manifest).
    pub(crate) coverage_target: Option<(String, u32)>,
    /// Provider records to announce again (the routing table gained peers).
    pub(crate) reprovide_at: Option<tokio::time::Instant>,
    /// TCP connections replaced by QUIC, closed once in-flight work is done.
    pub(crate) closing: Vec<(tokio::time::Instant, PeerId, libp2p::swarm::ConnectionId)>,
    /// Connections that carried shard file pieces (and whether pieces came
    /// in over them): TCP ones stay open when QUIC comes up (pieces go over
    /// TCP, see `network::tcp_only`).
    pub(crate) piece_conns: HashMap<libp2p::swarm::ConnectionId, bool>,
    /// Peers whose TCP dial for pieces failed, and until when their pieces
    /// go over other connections.
    pub(crate) no_tcp: HashMap<PeerId, std::time::Instant>,
}

/// A started node: its identity and addresses, and the task that runs it.
pub struct RunningNode {
    pub peer_id: PeerId,
    pub listen_addrs: Vec<Multiaddr>,
    pub state: SharedState,
    pub dispatcher: Dispatcher,
    pub net: NetHandle,
    pub pipeline: Pipeline,
    pub torrents: Torrents,
    pub task: tokio::task::JoinHandle<()>,
}

fn listen_addrs_for(cfg: &NodeConfig) -> anyhow::Result<Vec<Multiaddr>> {
    let ip: std::net::IpAddr = cfg.p2p_host.parse().context("p2p_host")?;
    let ip_proto = match ip {
        std::net::IpAddr::V4(v4) => Protocol::Ip4(v4),
        std::net::IpAddr::V6(v6) => Protocol::Ip6(v6),
    };
    let base = Multiaddr::empty().with(ip_proto);
    let mut addrs = vec![];
    if cfg.quic {
        addrs.push(
            base.clone()
                .with(Protocol::Udp(cfg.p2p_port))
                .with(Protocol::QuicV1),
        );
    }
    if !(cfg.test_no_tcp_listen && cfg.quic) {
        addrs.push(base.with(Protocol::Tcp(cfg.p2p_port)));
    }
    Ok(addrs)
}

/// Parses and checks the multiaddr lists of the configuration.
pub fn parse_addr_list(field: &'static str, list: &[String]) -> anyhow::Result<Vec<Multiaddr>> {
    list.iter()
        .map(|s| {
            s.parse::<Multiaddr>().map_err(|e| {
                anyhow::Error::new(llama_cluster_shared::config::ConfigError::invalid(
                    field,
                    format!("{s:?} is not a multiaddr ({e}); example: /ip4/127.0.0.1/tcp/9000"),
                ))
            })
        })
        .collect()
}

/// Starts a node: identity, swarm, listeners, bootstrap dials, and the swarm
/// task. Returns once the node listens.
pub async fn start(
    cfg: NodeConfig,
    role: Role,
    keypair: libp2p::identity::Keypair,
) -> anyhow::Result<RunningNode> {
    start_with(cfg, role, keypair, true).await
}

/// [`start`], choosing whether the node announces itself and its files
/// (rendezvous registration, DHT membership, provider records); a one-shot
/// `fetch` that exits after its download does not.
pub async fn start_with(
    cfg: NodeConfig,
    role: Role,
    keypair: libp2p::identity::Keypair,
    announce_files: bool,
) -> anyhow::Result<RunningNode> {
    let bootstrap_addrs = parse_addr_list("bootstrap", &cfg.bootstrap)?;
    let external_addrs = parse_addr_list("external_addrs", &cfg.external_addrs)?;
    let peer_id = keypair.public().to_peer_id();
    let mut swarm = build_swarm(keypair, &cfg, role)?;
    let mut listeners = HashSet::new();
    for addr in listen_addrs_for(&cfg)? {
        let id = swarm
            .listen_on(addr.clone())
            .with_context(|| format!("cannot listen on {addr}"))?;
        listeners.insert(id);
    }
    for addr in &external_addrs {
        swarm.add_external_address(addr.clone());
    }
    let state = SharedState::new(peer_id, &cfg.cluster, role, cfg.quic);
    state.write(|s| {
        s.grpc_addr = cfg.grpc_addr.clone();
        s.resources = crate::resources::detect(cfg.memory_mb, cfg.threads);
    });
    if let Some((start, end)) = cfg.layer_range()? {
        state.write(|s| {
            s.local_shard = Some(ShardRecord {
                shard_id: cfg.shard_id.clone(),
                peer_id: peer_id.to_string(),
                addrs: vec![],
                model: cfg.shard_model.clone(),
                layer_start: start,
                layer_end: end,
                state: ShardState::Announced,
                updated_at: llama_cluster_shared::unix_now_ms(),
                load: 0,
            })
        });
    }
    let (tx, mut rx) = mpsc::channel(1024);
    let control = swarm.behaviour().streams.new_control();
    let net = NetHandle {
        tx,
        links: Links::new(
            control.clone(),
            ACTIVATION_PROTOCOL,
            MAX_ACTIVATION_FRAME,
            LinkCounters {
                frames_sent: crate::metrics::metrics().activation_frames_sent.clone(),
                streams_opened: crate::metrics::metrics().activation_streams_opened.clone(),
            },
        ),
    };
    let store_dir = crate::torrent::cache_dir(&cfg).join("torrents");
    let store = crate::torrent::store::Store::open(&store_dir)
        .with_context(|| format!("cannot open the file store {}", store_dir.display()))?;
    let hooks = crate::torrent::TestHooks {
        corrupt_pieces: cfg.test_corrupt_pieces || cfg.test_lying_meta,
        lying_meta: cfg.test_lying_meta,
        wrong_size_meta: cfg.test_wrong_size_meta,
        piece_delay: Duration::from_millis(cfg.test_piece_delay_ms),
        busy_pieces: std::sync::Arc::new(std::sync::atomic::AtomicU32::new(cfg.test_busy_pieces)),
    };
    let torrents = Torrents::new(
        store,
        net.clone(),
        state.clone(),
        hooks,
        crate::torrent::upload_limit::UploadLimit::new(cfg.upload_limit_mb_per_sec),
        announce_files,
    );
    let pipeline = Pipeline::new(
        state.clone(),
        net.clone(),
        PipelineConfig::from_node(&cfg),
        torrents.clone(),
    );
    {
        let pipeline = pipeline.clone();
        crate::network::links::serve(
            control,
            ACTIVATION_PROTOCOL,
            MAX_ACTIVATION_FRAME,
            move |peer, req| {
                let pipeline = pipeline.clone();
                async move { pipeline.handle_inbound(peer, req).await }
            },
        )?;
    }
    let dispatcher = Dispatcher::new(state.clone(), pipeline.clone(), cfg.max_message_bytes);
    let (resp_tx, mut resp_rx) = mpsc::channel(256);
    let (frame_tx, mut frame_rx) = mpsc::channel(1024);
    let mut node = Node {
        announce: announce_files,
        swarm,
        cfg,
        role,
        state: state.clone(),
        dispatcher: dispatcher.clone(),
        dialing: HashMap::new(),
        rendezvous_points: HashMap::new(),
        bootstrap_addrs,
        pending: HashMap::new(),
        responses: resp_tx,
        frame_responses: frame_tx,
        pending_frames: HashMap::new(),
        pipeline: pipeline.clone(),
        torrents: torrents.clone(),
        provider_queries: HashMap::new(),
        published: false,
        discovered: HashSet::new(),
        quic_upgrade_tried: HashSet::new(),
        closing: Vec::new(),
        piece_conns: HashMap::new(),
        no_tcp: HashMap::new(),
        reprovide_at: None,
        coverage_target: None,
        p2p_metrics: libp2p::metrics::Metrics::new(
            &mut crate::metrics::libp2p_registry()
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        ),
    };
    if let Some(m) = node
        .pipeline
        .config()
        .manifest
        .as_ref()
        .and_then(|p| llama_cluster_engine::manifest::Manifest::load(p).ok())
    {
        node.coverage_target = Some((m.model, m.n_layer));
    }

    // Wait (bounded) until every listener has an address.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !listeners.is_empty() {
        let ev = tokio::time::timeout_at(deadline, node.swarm.select_next_some())
            .await
            .context("listeners did not come up within 10 s")?;
        match ev {
            SwarmEvent::NewListenAddr { listener_id, .. } => {
                listeners.remove(&listener_id);
                node.on_swarm_event(ev);
            }
            SwarmEvent::ListenerClosed {
                reason: Err(e),
                listener_id,
                ..
            } if listeners.contains(&listener_id) => bail!("listener failed: {e}"),
            other => node.on_swarm_event(other),
        }
    }
    let listen_addrs = node.state.read(|s| s.listen_addrs.clone());
    info!(
        "[CONNECT] {} {peer_id} listening on {}",
        role.as_str(),
        listen_addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    node.publish_local_records();
    node.dial_bootstrap();

    let task = tokio::spawn(async move {
        let mut housekeeping = tokio::time::interval(Duration::from_millis(250));
        let status_every = Duration::from_secs(node.cfg.status_interval_secs);
        let mut status_tick =
            tokio::time::interval_at(tokio::time::Instant::now() + status_every, status_every);
        let discovery_every = Duration::from_secs(node.cfg.discovery_interval_secs);
        let mut discovery_tick = tokio::time::interval_at(
            tokio::time::Instant::now() + discovery_every,
            discovery_every,
        );
        let republish_every = Duration::from_secs(node.cfg.record_ttl_secs / 2);
        let mut republish_tick = tokio::time::interval_at(
            tokio::time::Instant::now() + republish_every,
            republish_every,
        );
        loop {
            tokio::select! {
                ev = node.swarm.select_next_some() => node.on_swarm_event(ev),
                cmd = rx.recv() => match cmd {
                    Some(cmd) => node.on_net_command(cmd),
                    None => break,
                },
                Some((channel, body)) = resp_rx.recv() => {
                    if node.swarm.behaviour_mut().messaging.send_response(channel, body).is_err() {
                        debug!("[MSG] response not sent: the requester went away");
                    }
                }
                Some((proto, channel, body)) = frame_rx.recv() => {
                    if node.frames(proto).send_response(channel, body).is_err() {
                        debug!("[MSG] {proto:?} response not sent: the requester went away");
                    }
                }
                _ = housekeeping.tick() => {
                    node.close_superseded();
                    node.reprovide_if_due();
                    node.answer_provider_queries();
                    node.check_swarm_ready();
                    node.drop_abandoned();
                }
                _ = status_tick.tick() => node.report_status(),
                _ = discovery_tick.tick() => node.discovery_round(),
                _ = republish_tick.tick() => node.publish_local_records(),
            }
        }
    });
    Ok(RunningNode {
        peer_id,
        listen_addrs,
        state,
        dispatcher,
        net,
        pipeline,
        torrents,
        task,
    })
}

impl Node {
    /// The behaviour of a binary protocol.
    pub(crate) fn frames(
        &mut self,
        proto: FrameProto,
    ) -> &mut libp2p::request_response::Behaviour<crate::network::frame_codec::FrameCodec> {
        match proto {
            FrameProto::Torrent => &mut self.swarm.behaviour_mut().torrent,
            FrameProto::TorrentTcp => &mut self.swarm.behaviour_mut().torrent_tcp,
        }
    }

    /// The protocol a request of `proto` to `peer` goes by: pieces for a
    /// peer whose TCP dial failed lately go over any connection.
    pub(crate) fn route_frame(&mut self, proto: FrameProto, peer: &PeerId) -> FrameProto {
        if proto != FrameProto::TorrentTcp {
            return proto;
        }
        match self.no_tcp.get(peer) {
            Some(until) if std::time::Instant::now() < *until => FrameProto::Torrent,
            Some(_) => {
                self.no_tcp.remove(peer);
                proto
            }
            None => proto,
        }
    }

    pub(crate) fn local_peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    fn on_net_command(&mut self, cmd: NetCommand) {
        match cmd {
            NetCommand::Request { peer, body, reply } => {
                if peer == self.local_peer_id() {
                    let _ = reply.send(Err("cannot relay to this node itself".into()));
                    return;
                }
                let id = self
                    .swarm
                    .behaviour_mut()
                    .messaging
                    .send_request(&peer, JsonRequest::Body(body.clone()));
                self.pending.insert(
                    id,
                    Pending::External(Outbound {
                        peer,
                        reply,
                        body,
                        retried: 0,
                    }),
                );
            }
            NetCommand::Frame {
                proto,
                peer,
                body,
                reply,
            } => {
                let proto = self.route_frame(proto, &peer);
                let id = self.frames(proto).send_request(&peer, body.clone());
                self.pending_frames.insert(
                    (proto, id),
                    Outbound {
                        peer,
                        reply,
                        body,
                        retried: 0,
                    },
                );
            }
            NetCommand::Publish => self.publish_local_records(),
            NetCommand::QueryShards(ids) => self.query_shards(ids),
            NetCommand::GetProviders { key, bound, reply } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(libp2p::kad::RecordKey::new(&key));
                self.provider_queries.insert(
                    id,
                    ProviderQuery {
                        found: HashSet::new(),
                        reply: Some(reply),
                        answer_at: Some(tokio::time::Instant::now() + bound),
                    },
                );
            }
            NetCommand::Provide(key) => {
                if let Err(e) = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .start_providing(libp2p::kad::RecordKey::new(&key))
                {
                    warn!("[DHT] cannot announce {key}: {e}");
                }
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<NodeBehaviourEvent>) {
        use libp2p::metrics::Recorder;
        self.p2p_metrics.record(&event);
        match event {
            SwarmEvent::Behaviour(ev) => match ev {
                NodeBehaviourEvent::Identify(ev) => {
                    self.p2p_metrics.record(&ev);
                    self.on_identify(ev)
                }
                NodeBehaviourEvent::Kad(ev) => {
                    self.p2p_metrics.record(&ev);
                    self.on_kad(ev)
                }
                NodeBehaviourEvent::RendezvousClient(ev) => self.on_rendezvous_client(ev),
                NodeBehaviourEvent::RendezvousServer(ev) => self.on_rendezvous_server(ev),
                NodeBehaviourEvent::Messaging(ev) => self.on_messaging(ev),
                NodeBehaviourEvent::Streams(()) => {}
                NodeBehaviourEvent::Torrent(ev) => self.on_frames(FrameProto::Torrent, ev),
                NodeBehaviourEvent::TorrentTcp(ev) => self.on_frames(FrameProto::TorrentTcp, ev),
                NodeBehaviourEvent::Ping(ev) => self.p2p_metrics.record(&ev),
            },
            SwarmEvent::NewListenAddr { address, .. } => {
                let full = address.clone().with(Protocol::P2p(self.local_peer_id()));
                debug!("[CONNECT] listening on {full}");
                if self.cfg.external_addrs.is_empty() && !is_unspecified(&address) {
                    self.swarm.add_external_address(address.clone());
                }
                self.state.write(|s| {
                    if !s.listen_addrs.contains(&full) {
                        s.listen_addrs.push(full)
                    }
                });
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.swarm.remove_external_address(&address);
                let full = address.with(Protocol::P2p(self.local_peer_id()));
                self.state.write(|s| s.listen_addrs.retain(|a| *a != full));
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                established_in,
                ..
            } => {
                self.dialing.remove(&peer_id);
                let (address, outbound) = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => (address.clone(), true),
                    ConnectedPoint::Listener { send_back_addr, .. } => {
                        (send_back_addr.clone(), false)
                    }
                };
                let transport = transport_of(&address);
                self.state.clear_suspect(&peer_id);
                if num_established.get() == 1 {
                    info!(
                        "[CONNECT] connected to {peer_id} via {} ({}, {address}, {:.0} ms)",
                        transport.as_str(),
                        if outbound { "outbound" } else { "inbound" },
                        established_in.as_secs_f64() * 1000.0
                    );
                } else {
                    debug!(
                        "[CONNECT] extra connection to {peer_id} via {}",
                        transport.as_str()
                    );
                }
                let superseded: Vec<_> = self.state.write(|s| {
                    let conns = s.connections.entry(peer_id).or_default();
                    conns.push(ConnInfo {
                        id: connection_id,
                        transport,
                        address,
                        outbound,
                    });
                    if transport == Transport::Quic {
                        conns
                            .iter()
                            .filter(|c| c.transport == Transport::Tcp)
                            .map(|c| c.id)
                            .collect()
                    } else {
                        vec![]
                    }
                });
                // Close replaced TCP connections a little later, so that
                // requests already on them finish and the peer sees QUIC too.
                let at = tokio::time::Instant::now() + TCP_CLOSE_GRACE;
                for id in superseded {
                    debug!("[CONNECT] QUIC to {peer_id} is up; closing its TCP connection soon");
                    self.closing.push((at, peer_id, id));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                self.pipeline.net().connection_closed(&peer_id);
                self.piece_conns.remove(&connection_id);
                self.state.write(|s| {
                    if let Some(conns) = s.connections.get_mut(&peer_id) {
                        conns.retain(|c| c.id != connection_id);
                        if conns.is_empty() {
                            s.connections.remove(&peer_id);
                        }
                    }
                });
                if num_established == 0 {
                    self.quic_upgrade_tried.remove(&peer_id);
                    info!(
                        "[CONNECT] disconnected from {peer_id}{}",
                        cause.map(|c| format!(" ({c})")).unwrap_or_default()
                    );
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                self.on_dial_failure(peer_id, &error.to_string());
            }
            SwarmEvent::IncomingConnectionError {
                error,
                send_back_addr,
                ..
            } => {
                debug!("[CONNECT] incoming connection from {send_back_addr} failed: {error}");
            }
            SwarmEvent::ListenerError { error, .. } => warn!("[CONNECT] listener error: {error}"),
            _ => {}
        }
    }

    /// Announces every file this node seeds again, so that peers that
    /// joined after the first announcement find them.
    fn reprovide_if_due(&mut self) {
        if self
            .reprovide_at
            .is_some_and(|at| at <= tokio::time::Instant::now())
        {
            self.reprovide_at = None;
            if !self.announce {
                return;
            }
            for m in self.torrents.store().catalog() {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .start_providing(libp2p::kad::RecordKey::new(&m.file_hash));
            }
        }
    }

    /// Answers lookups that found providers a moment ago; the query itself
    /// is stopped (it may be waiting on peers that are gone).
    fn answer_provider_queries(&mut self) {
        let now = tokio::time::Instant::now();
        let due: Vec<_> = self
            .provider_queries
            .iter()
            .filter(|(_, q)| q.answer_at.is_some_and(|at| at <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some(q) = self.provider_queries.remove(&id) {
                if let Some(r) = q.reply {
                    let _ = r.send(q.found.into_iter().collect());
                }
                if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                    query.finish();
                }
            }
        }
    }

    /// Forgets requests whose caller stopped waiting (their bodies can be large).
    fn drop_abandoned(&mut self) {
        self.pending_frames.retain(|_, out| !out.reply.is_closed());
        self.pending
            .retain(|_, p| !matches!(p, Pending::External(out) if out.reply.is_closed()));
    }

    fn close_superseded(&mut self) {
        let now = tokio::time::Instant::now();
        let due: Vec<_> = self
            .closing
            .iter()
            .filter(|(at, ..)| *at <= now)
            .map(|&(_, peer, id)| (peer, id))
            .collect();
        self.closing.retain(|(at, ..)| *at > now);
        for (peer, id) in due {
            // Pieces go over TCP: a connection that carried them, or that
            // pieces asked of its peer may be on, stays.
            let pieces_pending = self.swarm.behaviour().torrent_tcp.uses(id)
                && self
                    .pending_frames
                    .iter()
                    .any(|((proto, _), o)| *proto == FrameProto::TorrentTcp && o.peer == peer);
            if pieces_pending || self.piece_conns.contains_key(&id) {
                debug!(
                    "[CONNECT] keeping TCP connection {id} to {peer}: it carries shard file pieces"
                );
                continue;
            }
            self.swarm.close_connection(id);
        }
    }

    /// SWARM_READY: when every layer of the model is served by a ready,
    /// reachable shard. On a change, the serving worker with the smallest peer
    /// id announces it to every connected worker and in the DHT under
    /// `/llama-cluster/<cluster>/swarm-ready` (and withdraws it the same way).
    fn check_swarm_ready(&mut self) {
        // The model of the loaded shard (placement may have changed it),
        // else the configured manifest's.
        let target = self
            .pipeline
            .loaded()
            .map(|l| (l.model.clone(), l.model_layers))
            .or_else(|| self.coverage_target.clone());
        let Some((model, n_layer)) = target else {
            // No model any more (a shard being replaced): not ready.
            if self
                .state
                .write(|s| std::mem::replace(&mut s.swarm_ready, false))
            {
                info!("[STATUS] SWARM_READY withdrawn: no model loaded");
            }
            return;
        };
        let snapshot = self.state.snapshot();
        let ready = crate::pipeline::route::plan(&snapshot.shards, &model, n_layer).is_ok();
        let changed = self
            .state
            .write(|s| std::mem::replace(&mut s.swarm_ready, ready) != ready);
        if !changed {
            return;
        }
        if ready {
            info!("[STATUS] SWARM_READY: every layer of {model} is served by a ready worker");
        } else {
            info!("[STATUS] SWARM_READY withdrawn: some layers of {model} have no ready worker");
        }
        let me = self.local_peer_id().to_string();
        let servers: Vec<&str> = snapshot
            .shards
            .iter()
            .filter(|s| {
                s.model == model && s.state == llama_cluster_shared::dht_keys::ShardState::Ready
            })
            .filter(|s| s.availability != Availability::Offline)
            .map(|s| s.peer_id.as_str())
            .collect();
        let announcer =
            servers.iter().min().is_none_or(|m| *m == me) && servers.contains(&me.as_str());
        if !announcer {
            return;
        }
        let body = serde_json::json!({
            "command": "SWARM_READY", "from": me, "request_id": format!("swarm-ready-{}", unix_now()),
            "params": {"model": model, "ready": ready},
        });
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let peers: Vec<PeerId> = self.state.read(|s| {
            s.connections
                .keys()
                .filter(|p| s.agents.get(p).is_some_and(|a| a.ends_with("/worker")))
                .copied()
                .collect()
        });
        for p in peers {
            let id = self
                .swarm
                .behaviour_mut()
                .messaging
                .send_request(&p, JsonRequest::Body(bytes.clone()));
            self.pending.insert(id, Pending::Notice);
        }
        self.state
            .write(|s| s.swarm_announcement = Some((me.clone(), model.clone(), ready)));
        let value = serde_json::json!({"model": model, "ready": ready, "by": me, "at": unix_now()});
        let key = llama_cluster_shared::dht_keys::swarm_ready_key(&self.cfg.cluster);
        let record = libp2p::kad::Record::new(
            libp2p::kad::RecordKey::new(&key),
            value.to_string().into_bytes(),
        );
        if let Err(e) = self
            .swarm
            .behaviour_mut()
            .kad
            .put_record(record, libp2p::kad::Quorum::One)
        {
            debug!("[DHT] cannot store {key}: {e}");
        }
    }

    /// Prints the periodic `[STATUS]` report.
    pub(crate) fn report_status(&mut self) {
        self.refresh_from_local_store();
        let st = self.state.snapshot();
        let quic = st
            .peers
            .iter()
            .filter(|p| p.transport.as_str() == "QUIC")
            .count();
        info!(
            "[STATUS] {} {} | cluster {} | {} peers (QUIC {quic}, TCP {}) | {} shards known",
            self.role.as_str(),
            st.peer_id,
            st.cluster,
            st.peers.len(),
            st.peers.len() - quic,
            st.shards.len()
        );
        for s in &st.shards {
            let who = if s.availability == Availability::Local {
                "self".to_string()
            } else {
                s.peer_id.clone()
            };
            info!(
                "[STATUS]   {:<12} layers {:>3}-{:<3} {:<24} {:<7} {:<9} {who}",
                s.shard_id,
                s.layer_start,
                s.layer_end,
                s.model,
                s.availability.as_str(),
                s.state.as_str(),
            );
        }
    }
}

fn is_unspecified(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}
