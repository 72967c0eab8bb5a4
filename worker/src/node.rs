//! The swarm task that owns libp2p: its state ([`Node`]) and event loop
//! ([`Node::run`]). Other tasks reach it through [`crate::net::NetHandle`];
//! start-up is in [`crate::startup`].

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::OutboundRequestId;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, rendezvous};
use llama_cluster_shared::config::NodeConfig;
use llama_cluster_shared::status::Transport;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::dispatcher::Dispatcher;
use crate::net::{FrameProto, NetCommand};
use crate::network::behaviour::{NodeBehaviour, NodeBehaviourEvent, Role};
use crate::network::{json_codec::JsonRequest, transport_of};
use crate::pipeline::Pipeline;
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
    pub reply: oneshot::Sender<Result<Vec<u8>, crate::net::NetError>>,
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
    /// This node's identity (it signs the shard records it publishes).
    pub(crate) keypair: libp2p::identity::Keypair,
    /// Peers admitted to the cluster (all, without a cluster key).
    pub(crate) members: crate::network::membership::Members,
    /// The cluster key handshakes (`None`: an open cluster).
    pub(crate) handshake: Option<crate::network::membership::Handshake>,
    /// Identify answers of peers not admitted yet, acted on at admission.
    pub(crate) identify_stash: HashMap<PeerId, libp2p::identify::Info>,
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

impl Node {
    /// The swarm task: swarm events, commands from [`NetHandle`]s, responses
    /// from request handlers, and periodic work, until every handle is gone.
    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::Receiver<NetCommand>,
        mut resp_rx: mpsc::Receiver<(libp2p::request_response::ResponseChannel<Vec<u8>>, Vec<u8>)>,
        mut frame_rx: mpsc::Receiver<(
            FrameProto,
            libp2p::request_response::ResponseChannel<Vec<u8>>,
            Vec<u8>,
        )>,
    ) {
        let mut housekeeping = tokio::time::interval(Duration::from_millis(250));
        let status_every = Duration::from_secs(self.cfg.status_interval_secs);
        let mut status_tick =
            tokio::time::interval_at(tokio::time::Instant::now() + status_every, status_every);
        let discovery_every = Duration::from_secs(self.cfg.discovery_interval_secs);
        let mut discovery_tick = tokio::time::interval_at(
            tokio::time::Instant::now() + discovery_every,
            discovery_every,
        );
        let republish_every = Duration::from_secs(self.cfg.record_ttl_secs / 2);
        let mut republish_tick = tokio::time::interval_at(
            tokio::time::Instant::now() + republish_every,
            republish_every,
        );
        loop {
            tokio::select! {
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.on_net_command(cmd),
                    None => break,
                },
                Some((channel, body)) = resp_rx.recv() => {
                    if self.swarm.behaviour_mut().messaging.send_response(channel, body).is_err() {
                        debug!("[MSG] response not sent: the requester went away");
                    }
                }
                Some((proto, channel, body)) = frame_rx.recv() => {
                    if self.frames(proto).send_response(channel, body).is_err() {
                        debug!("[MSG] {proto:?} response not sent: the requester went away");
                    }
                }
                _ = housekeeping.tick() => {
                    self.close_superseded();
                    self.reprovide_if_due();
                    self.answer_provider_queries();
                    self.check_swarm_ready();
                    self.drop_abandoned();
                    self.membership_deadlines();
                }
                _ = status_tick.tick() => self.report_status(),
                _ = discovery_tick.tick() => {
                    self.discovery_round();
                    if self.cfg.test_forge_records {
                        // Test only: again each round, so that shards learnt
                        // after the first publish are forged too.
                        self.publish_forged_records();
                    }
                }
                _ = republish_tick.tick() => self.publish_local_records(),
            }
        }
    }

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
                    let _ = reply.send(Err(crate::net::NetError::ToSelf));
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

    pub(crate) fn on_swarm_event(&mut self, event: SwarmEvent<NodeBehaviourEvent>) {
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
                NodeBehaviourEvent::Membership(ev) => self.on_membership(ev),
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
                if num_established.get() == 1 {
                    self.membership_connected(peer_id);
                }
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
                    self.membership_disconnected(&peer_id);
                    self.quic_upgrade_tried.remove(&peer_id);
                    self.pipeline.peer_gone(&peer_id);
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
}

fn is_unspecified(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}
