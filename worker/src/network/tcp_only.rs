//! A behaviour that sees only a node's TCP connections: shard file pieces
//! travel over TCP even between workers connected over QUIC.
//!
//! Over loopback and LANs, TCP moves bulk data with less CPU than QUIC: the
//! kernel does segmentation and acknowledgements, and noise encrypts 64 KiB
//! frames where quinn encrypts, sends and acknowledges every 1452-byte
//! packet on the runtime's thread (`docs/PERFORMANCE.md`). A behaviour such
//! as request-response spreads its requests over every connection to a peer,
//! so [`TcpOnly`] hands it the TCP connections alone (others get a handler
//! that does nothing) and turns its dials into dials of the peer's TCP
//! addresses, learnt from identify and Kademlia. With no TCP address known,
//! the dial fails at once (`NoAddresses`) and the caller may use another
//! behaviour that takes any connection.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::task::{Context, Poll};

use either::Either;
use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{ConnectedPoint, Endpoint, Multiaddr};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::{ConnectionClosed, ConnectionEstablished};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, DialError, DialFailure, FromSwarm, NetworkBehaviour,
    NotifyHandler, PeerAddresses, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};

/// Peers whose TCP addresses are kept (the least recently used go first;
/// `PeerAddresses` keeps 10 addresses per peer).
const MAX_PEERS: usize = 4096;

/// Whether `addr` is a TCP address (not QUIC, not a relay or websocket).
pub fn is_tcp(addr: &Multiaddr) -> bool {
    let mut tcp = false;
    for p in addr.iter() {
        match p {
            Protocol::Tcp(_) => tcp = true,
            Protocol::QuicV1 | Protocol::Quic | Protocol::Ws(_) | Protocol::P2pCircuit => {
                return false;
            }
            _ => {}
        }
    }
    tcp
}

/// Wraps `B` so that it only sees TCP connections (see the module docs).
pub struct TcpOnly<B> {
    inner: B,
    /// Connections handed to `inner`, and their peers.
    tcp: HashMap<ConnectionId, PeerId>,
    /// Known TCP addresses of peers (an address a failed dial tried is
    /// forgotten).
    addrs: PeerAddresses,
    /// Dials made for `inner` and not yet done.
    dialing: HashMap<ConnectionId, PeerId>,
    /// Peers whose last TCP dial failed on every address it tried.
    unreachable: HashSet<PeerId>,
}

impl<B> TcpOnly<B> {
    pub fn new(inner: B) -> Self {
        TcpOnly {
            inner,
            tcp: HashMap::new(),
            addrs: PeerAddresses::new(NonZeroUsize::new(MAX_PEERS).unwrap_or(NonZeroUsize::MIN)),
            dialing: HashMap::new(),
            unreachable: HashSet::new(),
        }
    }

    /// Whether connection `id` is one this behaviour uses.
    pub fn uses(&self, id: ConnectionId) -> bool {
        self.tcp.contains_key(&id)
    }

    /// Connections handed to `inner` for `peer`.
    fn tcp_count(&self, peer: &PeerId) -> usize {
        self.tcp.values().filter(|p| *p == peer).count()
    }

    /// Known TCP addresses of `peer`.
    pub fn tcp_addresses(&mut self, peer: &PeerId) -> Vec<Multiaddr> {
        self.addrs.get(peer).collect()
    }

    /// Whether the last TCP dial of `peer` failed (rather than there being
    /// no address to dial).
    pub fn dial_failed(&self, peer: &PeerId) -> bool {
        self.unreachable.contains(peer)
    }

    fn learn(&mut self, peer: PeerId, addr: &Multiaddr) {
        if is_tcp(addr) {
            self.addrs.add(peer, addr.clone());
        }
    }

    /// A dial of `peer` made for `inner` failed: the addresses it tried are
    /// forgotten, and the peer counts as unreachable over TCP.
    fn dial_failure(&mut self, peer: PeerId, event: &FromSwarm) {
        self.addrs.on_swarm_event(event);
        if let FromSwarm::DialFailure(DialFailure {
            error: DialError::Transport(_),
            ..
        }) = event
        {
            if self.unreachable.len() >= MAX_PEERS {
                self.unreachable.clear();
            }
            self.unreachable.insert(peer);
        }
    }

    /// A dial of `inner` for `peer`, made a dial of its TCP addresses; `None`
    /// when one is already under way or no TCP address is known (then
    /// `inner` is told that the dial failed).
    fn redirect_dial(&mut self, peer: PeerId, wanted: ConnectionId) -> Option<DialOpts>
    where
        B: NetworkBehaviour,
    {
        if self.dialing.values().any(|p| *p == peer) {
            return None;
        }
        let addrs = self.tcp_addresses(&peer);
        if addrs.is_empty() {
            self.inner
                .on_swarm_event(FromSwarm::DialFailure(DialFailure {
                    peer_id: Some(peer),
                    error: &DialError::NoAddresses,
                    connection_id: wanted,
                }));
            return None;
        }
        // A QUIC connection to the peer may be up already: dial anyway.
        let opts = DialOpts::peer_id(peer)
            .condition(PeerCondition::Always)
            .addresses(addrs)
            .build();
        self.dialing.insert(opts.connection_id(), peer);
        Some(opts)
    }
}

impl<B> std::ops::Deref for TcpOnly<B> {
    type Target = B;
    fn deref(&self) -> &B {
        &self.inner
    }
}

impl<B> std::ops::DerefMut for TcpOnly<B> {
    fn deref_mut(&mut self) -> &mut B {
        &mut self.inner
    }
}

impl<B: NetworkBehaviour> NetworkBehaviour for TcpOnly<B> {
    type ConnectionHandler = Either<THandler<B>, dummy::ConnectionHandler>;
    type ToSwarm = B::ToSwarm;

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if !is_tcp(local_addr) {
            return Ok(Either::Right(dummy::ConnectionHandler));
        }
        let h =
            self.inner
                .handle_established_inbound_connection(id, peer, local_addr, remote_addr)?;
        self.tcp.insert(id, peer);
        Ok(Either::Left(h))
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if !is_tcp(addr) {
            return Ok(Either::Right(dummy::ConnectionHandler));
        }
        let h = self.inner.handle_established_outbound_connection(
            id,
            peer,
            addr,
            role_override,
            port_use,
        )?;
        self.tcp.insert(id, peer);
        Ok(Either::Left(h))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                self.dialing.remove(&e.connection_id);
                if self.tcp.contains_key(&e.connection_id) {
                    self.unreachable.remove(&e.peer_id);
                }
                if let ConnectedPoint::Dialer { address, .. } = e.endpoint {
                    self.learn(e.peer_id, address);
                }
                // Counts of other connections are of those `inner` sees.
                if self.tcp.contains_key(&e.connection_id) {
                    let other_established = self.tcp_count(&e.peer_id) - 1;
                    self.inner.on_swarm_event(FromSwarm::ConnectionEstablished(
                        ConnectionEstablished {
                            other_established,
                            ..e
                        },
                    ));
                }
            }
            FromSwarm::ConnectionClosed(e) => {
                if self.tcp.remove(&e.connection_id).is_some() {
                    let remaining_established = self.tcp_count(&e.peer_id);
                    self.inner
                        .on_swarm_event(FromSwarm::ConnectionClosed(ConnectionClosed {
                            remaining_established,
                            ..e
                        }));
                }
            }
            FromSwarm::AddressChange(e) => {
                if self.tcp.contains_key(&e.connection_id) {
                    self.inner.on_swarm_event(event);
                }
            }
            FromSwarm::DialFailure(e) => {
                // Only the dials made for `inner`: a failed QUIC dial of
                // another behaviour must not fail its requests.
                if let Some(peer) = self.dialing.remove(&e.connection_id) {
                    self.dial_failure(peer, &event);
                    self.inner.on_swarm_event(event);
                }
            }
            FromSwarm::NewExternalAddrOfPeer(e) => {
                self.learn(e.peer_id, e.addr);
                self.inner.on_swarm_event(event);
            }
            _ => self.inner.on_swarm_event(event),
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {
            Either::Left(e) => self.inner.on_connection_handler_event(peer, id, e),
            Either::Right(never) => match never {},
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        loop {
            match self.inner.poll(cx) {
                Poll::Ready(ToSwarm::Dial { opts }) => {
                    let Some(peer) = opts.get_peer_id() else {
                        continue;
                    };
                    if let Some(opts) = self.redirect_dial(peer, opts.connection_id()) {
                        return Poll::Ready(ToSwarm::Dial { opts });
                    }
                }
                // `Any` could pick a connection `inner` does not handle.
                Poll::Ready(ToSwarm::NotifyHandler {
                    peer_id,
                    handler: NotifyHandler::Any,
                    event,
                }) => {
                    let Some(&id) = self
                        .tcp
                        .iter()
                        .find(|(_, p)| **p == peer_id)
                        .map(|(id, _)| id)
                    else {
                        continue;
                    };
                    return Poll::Ready(ToSwarm::NotifyHandler {
                        peer_id,
                        handler: NotifyHandler::One(id),
                        event: Either::Left(event),
                    });
                }
                Poll::Ready(ev) => return Poll::Ready(ev.map_in(Either::Left)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tcp_addresses_are_tcp() {
        for (a, tcp) in [
            ("/ip4/127.0.0.1/tcp/4001", true),
            (
                "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWD5NeepeHrEbTXWWiHnVWid1PXzndto54Fy3XJq5taxXS",
                true,
            ),
            ("/dns4/worker-0/tcp/4001", true),
            ("/ip4/127.0.0.1/udp/4001/quic-v1", false),
            ("/ip4/127.0.0.1/tcp/4001/ws", false),
            ("/ip4/127.0.0.1", false),
        ] {
            let addr: Multiaddr = a.parse().unwrap();
            assert_eq!(is_tcp(&addr), tcp, "{a}");
        }
    }

    #[test]
    fn only_tcp_addresses_are_kept_and_those_a_failed_dial_tried_are_forgotten() {
        let mut b = TcpOnly::new(());
        let peer = PeerId::random();
        let a: Multiaddr = "/ip4/10.0.0.1/tcp/1".parse().unwrap();
        let c: Multiaddr = "/ip4/10.0.0.2/tcp/2".parse().unwrap();
        b.learn(peer, &"/ip4/10.0.0.1/udp/1/quic-v1".parse().unwrap());
        assert!(
            b.tcp_addresses(&peer).is_empty(),
            "QUIC addresses are not kept"
        );
        b.learn(peer, &a.clone().with(Protocol::P2p(peer)));
        b.learn(peer, &c);
        let kept = b.tcp_addresses(&peer);
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert!(!b.dial_failed(&peer));
        // The swarm reports the dialed address with the peer id.
        let refused = libp2p::TransportError::Other(std::io::Error::other("refused"));
        let error = DialError::Transport(vec![(a.clone().with(Protocol::P2p(peer)), refused)]);
        b.dial_failure(
            peer,
            &FromSwarm::DialFailure(DialFailure {
                peer_id: Some(peer),
                error: &error,
                connection_id: ConnectionId::new_unchecked(1),
            }),
        );
        assert_eq!(b.tcp_addresses(&peer), [c.with(Protocol::P2p(peer))]);
        assert!(b.dial_failed(&peer));
        // No address to dial is not a failed dial.
        let other = PeerId::random();
        b.dial_failure(
            other,
            &FromSwarm::DialFailure(DialFailure {
                peer_id: Some(other),
                error: &DialError::NoAddresses,
                connection_id: ConnectionId::new_unchecked(2),
            }),
        );
        assert!(!b.dial_failed(&other));
    }
}
