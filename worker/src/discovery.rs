//! Finding peers: bootstrap dials, rendezvous registration and discovery,
//! identify-driven follow-ups, and direct dials that prefer QUIC and fall
//! back to TCP. A slow periodic round (rendezvous + DHT members) is only a
//! safety net; the normal path is event-driven.

use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId, identify, rendezvous};
use llama_cluster_shared::dht_keys::members_key;
use llama_cluster_shared::protocol::JSON_PROTOCOL;
use tracing::{debug, info, warn};

use crate::dispatcher::Dispatcher;
use crate::network::behaviour::{AGENT_PREFIX, Role};
use crate::network::json_codec::JsonRequest;
use crate::network::{peer_id_of, transport_of};
use crate::node::{Node, Pending};
use llama_cluster_shared::status::Transport;

/// Protocol a rendezvous server announces in identify.
const RENDEZVOUS_PROTOCOL: &str = "/rendezvous/1.0.0";

impl Node {
    fn namespace(&self) -> Option<rendezvous::Namespace> {
        rendezvous::Namespace::new(self.cfg.cluster.clone()).ok()
    }

    /// Dials every configured bootstrap address (peer id optional).
    pub(crate) fn dial_bootstrap(&mut self) {
        for addr in self.bootstrap_addrs.clone() {
            if !self.cfg.quic && transport_of(&addr) == Transport::Quic {
                warn!(
                    "[DISCOVERY] QUIC is disabled: not dialing bootstrap {addr} (give its TCP address)"
                );
                continue;
            }
            let opts = match peer_id_of(&addr) {
                Some(peer) if peer == self.local_peer_id() => continue,
                Some(peer) if self.swarm.is_connected(&peer) => continue,
                Some(peer) => DialOpts::peer_id(peer)
                    .addresses(vec![addr.clone()])
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build(),
                None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
            };
            info!("[DISCOVERY] dialing bootstrap {addr}");
            if let Err(e) = self.swarm.dial(opts) {
                warn!("[DISCOVERY] cannot dial bootstrap {addr}: {e}");
            }
        }
    }

    /// Dials `peer` directly: QUIC addresses first (when enabled), TCP only
    /// if QUIC fails or the peer has no QUIC address.
    pub(crate) fn dial_peer(&mut self, peer: PeerId, addrs: Vec<Multiaddr>, reason: &str) {
        if peer == self.local_peer_id()
            || self.swarm.is_connected(&peer)
            || self.dialing.contains_key(&peer)
        {
            return;
        }
        let (quic, tcp): (Vec<_>, Vec<_>) = addrs
            .into_iter()
            .filter(|a| !a.is_empty())
            .partition(|a| transport_of(a) == Transport::Quic);
        let quic: Vec<_> = if self.cfg.quic { quic } else { vec![] };
        let (first, fallback, via) = if quic.is_empty() {
            (tcp, vec![], "TCP")
        } else {
            (quic, tcp, "QUIC")
        };
        if first.is_empty() {
            debug!("[DISCOVERY] no usable address for {peer} ({reason})");
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(first)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        match self.swarm.dial(opts) {
            Ok(()) => {
                info!("[DISCOVERY] found {peer} via {reason}; dialing over {via}");
                self.dialing.insert(peer, fallback);
            }
            Err(e) => debug!("[DISCOVERY] found {peer} via {reason}, already dialing: {e}"),
        }
    }

    /// Another behaviour (Kademlia, request-response) may have raced us and
    /// connected over TCP to a peer that speaks QUIC: open a QUIC connection
    /// too; the TCP one is closed once QUIC is up.
    fn upgrade_to_quic(&mut self, peer: PeerId, listen_addrs: &[Multiaddr]) {
        // Only the side with the smaller peer id opens the QUIC connection,
        // so the two sides do not race each other.
        if !self.cfg.quic || self.quic_upgrade_tried.contains(&peer) || self.local_peer_id() > peer
        {
            return;
        }
        let has_quic = self.state.read(|s| {
            s.connections
                .get(&peer)
                .is_some_and(|c| c.iter().any(|c| c.transport == Transport::Quic))
        });
        let quic: Vec<Multiaddr> = listen_addrs
            .iter()
            .filter(|a| transport_of(a) == Transport::Quic)
            .cloned()
            .collect();
        if has_quic || quic.is_empty() {
            return;
        }
        self.quic_upgrade_tried.insert(peer);
        info!("[CONNECT] {peer} is connected over TCP but speaks QUIC; opening a QUIC connection");
        let opts = DialOpts::peer_id(peer)
            .addresses(quic)
            .condition(PeerCondition::Always)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            debug!("[CONNECT] QUIC upgrade of {peer} not started: {e}");
        }
    }

    /// A dial failed: try the TCP fallback once, else give up until the next
    /// discovery event.
    pub(crate) fn on_dial_failure(&mut self, peer: Option<PeerId>, error: &str) {
        let Some(peer) = peer else {
            warn!("[CONNECT] dial failed: {error}");
            return;
        };
        match self.dialing.remove(&peer) {
            Some(fallback) if !fallback.is_empty() && !self.swarm.is_connected(&peer) => {
                info!("[CONNECT] QUIC dial to {peer} failed ({error}); falling back to TCP");
                self.dialing.insert(peer, vec![]);
                let opts = DialOpts::peer_id(peer)
                    .addresses(fallback)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build();
                if self.swarm.dial(opts).is_err() {
                    self.dialing.remove(&peer);
                }
            }
            Some(_) => warn!("[CONNECT] cannot reach {peer}: {error}"),
            None => debug!("[CONNECT] dial to {peer} failed: {error}"),
        }
    }

    pub(crate) fn on_identify(&mut self, ev: identify::Event) {
        let identify::Event::Received { peer_id, info, .. } = ev else {
            return;
        };
        if !self.members.admits(&peer_id) {
            // Acted on once the peer has proven the cluster key.
            self.identify_stash.insert(peer_id, info);
            return;
        }
        self.identified(peer_id, info);
    }

    /// What an admitted peer's identify answer tells: its addresses (for
    /// Kademlia), rendezvous, a status probe.
    pub(crate) fn identified(&mut self, peer_id: PeerId, info: identify::Info) {
        let is_llama = info.agent_version.starts_with(AGENT_PREFIX);
        let is_worker = is_llama && info.agent_version.ends_with("/worker");
        self.state.write(|s| {
            s.agents.insert(peer_id, info.agent_version.clone());
        });
        let kad_proto = self.swarm.behaviour().kad.protocol_names().first().cloned();
        let speaks_kad = kad_proto.is_some_and(|k| info.protocols.contains(&k));
        if speaks_kad {
            for addr in &info.listen_addrs {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer_id, addr.clone());
            }
            if !self.published {
                self.publish_local_records();
            }
        }
        if self.discovered.insert(peer_id) {
            debug!(
                "[DISCOVERY] identified {peer_id}: {} ({} addrs)",
                info.agent_version,
                info.listen_addrs.len()
            );
        }
        self.upgrade_to_quic(peer_id, &info.listen_addrs);
        let is_rendezvous = info
            .protocols
            .iter()
            .any(|p| p.as_ref() == RENDEZVOUS_PROTOCOL);
        if is_rendezvous
            && self.role == Role::Worker
            && !self.rendezvous_points.contains_key(&peer_id)
        {
            self.rendezvous_points.insert(peer_id, None);
            self.rendezvous_register_and_discover(peer_id);
        }
        let speaks_json = info.protocols.iter().any(|p| p.as_ref() == JSON_PROTOCOL);
        if is_worker && speaks_json {
            // Event-driven shard discovery: ask the new peer what it serves.
            let body = Dispatcher::status_probe(&self.local_peer_id().to_string());
            let id = self
                .swarm
                .behaviour_mut()
                .messaging
                .send_request(&peer_id, JsonRequest::Body(body));
            self.pending.insert(id, Pending::StatusProbe(peer_id));
        }
    }

    fn rendezvous_register_and_discover(&mut self, point: PeerId) {
        let Some(ns) = self.namespace() else { return };
        let cookie = self.rendezvous_points.get(&point).cloned().flatten();
        let announce = self.announce;
        let Some(client) = self.swarm.behaviour_mut().rendezvous_client.as_mut() else {
            return;
        };
        // A one-shot node only looks: its registration would outlive it.
        if announce && let Err(e) = client.register(ns.clone(), point, None) {
            warn!("[DISCOVERY] cannot register at rendezvous {point}: {e}");
        }
        client.discover(Some(ns), cookie, None, point);
    }

    pub(crate) fn on_rendezvous_client(&mut self, ev: rendezvous::client::Event) {
        match ev {
            rendezvous::client::Event::Registered {
                rendezvous_node,
                ttl,
                namespace,
            } => info!(
                "[DISCOVERY] registered in {namespace} at rendezvous {rendezvous_node} (ttl {ttl} s)"
            ),
            rendezvous::client::Event::RegisterFailed {
                rendezvous_node,
                namespace,
                error,
            } => warn!(
                "[DISCOVERY] registration in {namespace} at {rendezvous_node} failed: {error:?}"
            ),
            rendezvous::client::Event::Discovered {
                rendezvous_node,
                registrations,
                cookie,
            } => {
                self.rendezvous_points.insert(rendezvous_node, Some(cookie));
                for reg in registrations {
                    let peer = reg.record.peer_id();
                    let addrs = reg.record.addresses().to_vec();
                    for a in &addrs {
                        self.swarm.behaviour_mut().kad.add_address(&peer, a.clone());
                    }
                    self.dial_peer(peer, addrs, "rendezvous");
                }
            }
            rendezvous::client::Event::DiscoverFailed {
                rendezvous_node,
                error,
                ..
            } => debug!("[DISCOVERY] discovery at {rendezvous_node} failed: {error:?}"),
            rendezvous::client::Event::Expired { peer } => {
                debug!("[DISCOVERY] registration of {peer} expired")
            }
        }
    }

    pub(crate) fn on_rendezvous_server(&mut self, ev: rendezvous::server::Event) {
        match ev {
            rendezvous::server::Event::PeerRegistered { peer, registration } => info!(
                "[DISCOVERY] {peer} registered in {} ({} addrs)",
                registration.namespace,
                registration.record.addresses().len()
            ),
            rendezvous::server::Event::PeerUnregistered { peer, namespace } => {
                info!("[DISCOVERY] {peer} left {namespace}")
            }
            other => debug!("[DISCOVERY] rendezvous server: {other:?}"),
        }
    }

    /// The slow safety net: re-dial bootstrap nodes when alone, refresh the
    /// rendezvous registration, look up cluster members and shard records in
    /// the DHT.
    pub(crate) fn discovery_round(&mut self) {
        if self.swarm.connected_peers().next().is_none() {
            self.dial_bootstrap();
        }
        let points: Vec<PeerId> = self
            .rendezvous_points
            .keys()
            .copied()
            .filter(|p| self.swarm.is_connected(p))
            .collect();
        for p in points {
            self.rendezvous_register_and_discover(p);
        }
        if self.swarm.connected_peers().next().is_some() {
            let key = members_key(&self.cfg.cluster);
            self.swarm
                .behaviour_mut()
                .kad
                .get_providers(key.into_bytes().into());
            self.query_known_shards();
        }
    }
}
