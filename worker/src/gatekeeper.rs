//! The node's side of cluster membership (`network::membership`): it starts
//! a handshake on every new connection, admits or disconnects peers by its
//! verdicts, disconnects those past the deadline, and acts on a peer's
//! identify answer only once the peer is admitted.

use libp2p::PeerId;
use libp2p::request_response;
use tracing::{info, warn};

use crate::network::membership::{MembershipRequest, MembershipResponse, Verdict};
use crate::node::Node;

impl Node {
    /// A first connection to `peer` is up.
    pub(crate) fn membership_connected(&mut self, peer: PeerId) {
        let (Some(h), Some(b)) = (
            self.handshake.as_mut(),
            self.swarm.behaviour_mut().membership.as_mut(),
        ) else {
            return;
        };
        h.on_connected(b, peer, std::time::Instant::now());
    }

    /// The last connection to `peer` closed.
    pub(crate) fn membership_disconnected(&mut self, peer: &PeerId) {
        self.identify_stash.remove(peer);
        if let Some(h) = self.handshake.as_mut()
            && h.on_disconnected(peer)
        {
            info!("[MEMBERSHIP] {peer} left before proving the cluster key");
        }
    }

    pub(crate) fn on_membership(
        &mut self,
        ev: request_response::Event<MembershipRequest, MembershipResponse>,
    ) {
        let (Some(h), Some(b)) = (
            self.handshake.as_mut(),
            self.swarm.behaviour_mut().membership.as_mut(),
        ) else {
            return;
        };
        match h.on_event(b, ev) {
            Verdict::Pending => {}
            Verdict::Admitted(peer) => {
                info!("[MEMBERSHIP] {peer} proved the cluster key");
                crate::metrics::metrics().peers_admitted.inc();
                if let Some(info) = self.identify_stash.remove(&peer) {
                    self.identified(peer, info);
                }
            }
            Verdict::Reject(peer, why) => self.reject_peer(peer, &why),
        }
    }

    /// Peers that did not prove the key in time are disconnected.
    pub(crate) fn membership_deadlines(&mut self) {
        let Some(h) = self.handshake.as_mut() else {
            return;
        };
        for peer in h.expired(std::time::Instant::now()) {
            self.reject_peer(
                peer,
                &format!(
                    "did not prove the cluster key within {} s",
                    crate::network::membership::PROOF_TIMEOUT.as_secs()
                ),
            );
        }
    }

    fn reject_peer(&mut self, peer: PeerId, why: &str) {
        warn!("[MEMBERSHIP] disconnecting {peer}: it {why}");
        crate::metrics::metrics().peers_rejected.inc();
        self.identify_stash.remove(&peer);
        let _ = self.swarm.disconnect_peer_id(peer);
    }
}
