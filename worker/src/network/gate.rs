//! The gate around a behaviour: no events of a peer that is not an
//! admitted cluster member (`membership`).

use std::task::{Context, Poll};
use std::time::Instant;

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

use super::membership::{Members, PROOF_TIMEOUT};

/// Events held per gate while their peers prove the key (the oldest go
/// first beyond it).
const MAX_HELD: usize = 256;

/// Wraps `B` so that it gets no event from the connections of a peer that
/// is not admitted (see the module docs). Events that come while the
/// handshake runs are held, and handed over at admission: the other side
/// may admit this node a moment before this node admits it, and send at
/// once. Held events are dropped when their connection closes or after
/// [`PROOF_TIMEOUT`].
pub struct Gated<B: NetworkBehaviour> {
    inner: B,
    members: Members,
    held: std::collections::VecDeque<(PeerId, ConnectionId, Instant, THandlerOutEvent<B>)>,
}

impl<B: NetworkBehaviour> Gated<B> {
    pub fn new(inner: B, members: Members) -> Self {
        Gated {
            inner,
            members,
            held: std::collections::VecDeque::new(),
        }
    }

    /// Hands over the held events of admitted peers; drops stale ones.
    fn release(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let now = Instant::now();
        let held = std::mem::take(&mut self.held);
        for (peer, id, at, ev) in held {
            if self.members.admits(&peer) {
                self.inner.on_connection_handler_event(peer, id, ev);
            } else if now.duration_since(at) < PROOF_TIMEOUT {
                self.held.push_back((peer, id, at, ev));
            }
        }
    }
}

impl<B: NetworkBehaviour> std::ops::Deref for Gated<B> {
    type Target = B;
    fn deref(&self) -> &B {
        &self.inner
    }
}

impl<B: NetworkBehaviour> std::ops::DerefMut for Gated<B> {
    fn deref_mut(&mut self) -> &mut B {
        &mut self.inner
    }
}

impl<B: NetworkBehaviour> NetworkBehaviour for Gated<B> {
    type ConnectionHandler = THandler<B>;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner
            .handle_established_inbound_connection(id, peer, local_addr, remote_addr)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner
            .handle_pending_outbound_connection(id, maybe_peer, addresses, effective_role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner
            .handle_established_outbound_connection(id, peer, addr, role_override, port_use)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::ConnectionClosed(c) = &event {
            self.held.retain(|(_, id, _, _)| *id != c.connection_id);
        }
        self.inner.on_swarm_event(event)
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        if self.members.admits(&peer) {
            self.release();
            self.inner.on_connection_handler_event(peer, id, event);
        } else {
            if self.held.len() >= MAX_HELD {
                self.held.pop_front();
            }
            self.held.push_back((peer, id, Instant::now(), event));
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.release();
        self.inner.poll(cx)
    }
}
