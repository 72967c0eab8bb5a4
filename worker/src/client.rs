//! A one-off libp2p client that speaks `/json-message/1.0` to a node: used by
//! `llama-worker send` and by tests that need to send raw (even malformed)
//! bytes over the real protocol.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures::StreamExt;
use libp2p::request_response::{self, Event, Message};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, noise, tcp, yamux};
use llama_cluster_shared::protocol::JSON_PROTOCOL;

use crate::network::json_codec::{JsonCodec, JsonRequest};
use crate::network::membership::{
    ClusterKey, Handshake, Members, MembershipBehaviour, Verdict, membership_behaviour,
};
use crate::network::peer_id_of;

/// Responses up to this size are accepted by the client.
const CLIENT_MAX_RESPONSE: usize = 64 * 1024 * 1024;

#[derive(NetworkBehaviour)]
struct ClientBehaviour {
    json: request_response::Behaviour<JsonCodec>,
    membership: Toggle<MembershipBehaviour>,
}

pub struct JsonClient {
    swarm: Swarm<ClientBehaviour>,
    peer: PeerId,
    timeout: Duration,
}

impl JsonClient {
    /// Connects to the node at `addr` (an open cluster's).
    pub async fn connect(addr: &Multiaddr, timeout: Duration) -> anyhow::Result<Self> {
        Self::connect_with(addr, timeout, None, "").await
    }

    /// Connects to the node at `addr`; with `key`, proves it first (the
    /// cluster key handshake of `cluster`).
    pub async fn connect_with(
        addr: &Multiaddr,
        timeout: Duration,
        key: Option<ClusterKey>,
        cluster: &str,
    ) -> anyhow::Result<Self> {
        let keyed = key.is_some();
        let mut swarm = SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )?
            .with_quic()
            .with_behaviour(|_| ClientBehaviour {
                json: request_response::Behaviour::with_codec(
                    JsonCodec::new(CLIENT_MAX_RESPONSE),
                    [(
                        StreamProtocol::new(JSON_PROTOCOL),
                        request_response::ProtocolSupport::Outbound,
                    )],
                    request_response::Config::default().with_request_timeout(timeout),
                ),
                membership: keyed.then(membership_behaviour).into(),
            })?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        let local = *swarm.local_peer_id();
        let mut handshake = key.map(|k| Handshake::new(k, cluster, local, Members::new(true)));
        let opts = match peer_id_of(addr) {
            Some(p) => DialOpts::peer_id(p).addresses(vec![addr.clone()]).build(),
            None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
        };
        swarm
            .dial(opts)
            .with_context(|| format!("dialing {addr}"))?;
        let peer = tokio::time::timeout(timeout, async {
            let mut peer = None;
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                        let (Some(h), Some(b)) =
                            (handshake.as_mut(), swarm.behaviour_mut().membership.as_mut())
                        else {
                            return Ok(peer_id);
                        };
                        h.on_connected(b, peer_id, std::time::Instant::now());
                        peer = Some(peer_id);
                    }
                    SwarmEvent::Behaviour(ClientBehaviourEvent::Membership(ev)) => {
                        let (Some(h), Some(b)) =
                            (handshake.as_mut(), swarm.behaviour_mut().membership.as_mut())
                        else {
                            continue;
                        };
                        match h.on_event(b, ev) {
                            Verdict::Admitted(p) if Some(p) == peer => return Ok(p),
                            Verdict::Reject(p, why) => {
                                bail!("{p} is not a member of the cluster: it {why}")
                            }
                            _ => {}
                        }
                    }
                    SwarmEvent::ConnectionClosed { peer_id, .. } if Some(peer_id) == peer => {
                        bail!(
                            "{addr} closed the connection (it wants a cluster key: give --cluster-key-file)"
                        );
                    }
                    SwarmEvent::OutgoingConnectionError { error, .. } => {
                        return Err(anyhow!("cannot connect to {addr}: {error}"));
                    }
                    _ => {}
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no connection to {addr} within {timeout:?}"))??;
        Ok(JsonClient {
            swarm,
            peer,
            timeout,
        })
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer
    }

    /// True while the connection is up.
    pub fn is_connected(&self) -> bool {
        self.swarm.is_connected(&self.peer)
    }

    /// Sends `body` as-is and returns the raw response.
    pub async fn request(&mut self, body: Vec<u8>) -> anyhow::Result<Vec<u8>> {
        let id = self
            .swarm
            .behaviour_mut()
            .json
            .send_request(&self.peer, JsonRequest::Body(body));
        let timeout = self.timeout + Duration::from_secs(1);
        tokio::time::timeout(timeout, async {
            loop {
                match self.swarm.select_next_some().await {
                    SwarmEvent::Behaviour(ClientBehaviourEvent::Json(Event::Message {
                        message:
                            Message::Response {
                                request_id,
                                response,
                            },
                        ..
                    })) if request_id == id => return Ok(response),
                    SwarmEvent::Behaviour(ClientBehaviourEvent::Json(Event::OutboundFailure {
                        request_id,
                        error,
                        ..
                    })) if request_id == id => bail!("request failed: {error}"),
                    _ => {}
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no response within {timeout:?}"))?
    }
}
