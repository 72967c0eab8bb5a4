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

use std::collections::HashMap;
use std::task::{Context, Poll};

use either::Either;
use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{ConnectedPoint, Endpoint, Multiaddr};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::{ConnectionClosed, ConnectionEstablished};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, DialError, DialFailure, FromSwarm, NetworkBehaviour, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};

/// TCP addresses kept per peer (the most recent ones).
const MAX_ADDRS_PER_PEER: usize = 8;

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
    /// Known TCP addresses of peers, most recent last.
    addrs: HashMap<PeerId, Vec<Multiaddr>>,
    /// Dials made for `inner` and not yet done.
    dialing: HashMap<ConnectionId, PeerId>,
}

impl<B> TcpOnly<B> {
    pub fn new(inner: B) -> Self {
        TcpOnly {
            inner,
            tcp: HashMap::new(),
            addrs: HashMap::new(),
            dialing: HashMap::new(),
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
    pub fn tcp_addresses(&self, peer: &PeerId) -> &[Multiaddr] {
        self.addrs.get(peer).map_or(&[], Vec::as_slice)
    }

    fn learn(&mut self, peer: PeerId, addr: &Multiaddr) {
        if !is_tcp(addr) {
            return;
        }
        let list = self.addrs.entry(peer).or_default();
        list.retain(|a| a != addr);
        list.push(addr.clone());
        if list.len() > MAX_ADDRS_PER_PEER {
            list.remove(0);
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
        let addrs = self.tcp_addresses(&peer).to_vec();
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
                if self.dialing.remove(&e.connection_id).is_some() {
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
}
