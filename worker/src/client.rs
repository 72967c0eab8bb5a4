//! A one-off libp2p client that speaks `/json-message/1.0` to a node: used by
//! `llama-worker send` and by tests that need to send raw (even malformed)
//! bytes over the real protocol.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures::StreamExt;
use libp2p::request_response::{self, Event, Message};
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, noise, tcp, yamux};
use llama_cluster_shared::protocol::JSON_PROTOCOL;

use crate::network::json_codec::{JsonCodec, JsonRequest};
use crate::network::peer_id_of;

/// Responses up to this size are accepted by the client.
const CLIENT_MAX_RESPONSE: usize = 64 * 1024 * 1024;

pub struct JsonClient {
    swarm: Swarm<request_response::Behaviour<JsonCodec>>,
    peer: PeerId,
    timeout: Duration,
}

impl JsonClient {
    /// Connects to the node at `addr` (a QUIC or TCP multiaddr, `/p2p/` optional).
    pub async fn connect(addr: &Multiaddr, timeout: Duration) -> anyhow::Result<Self> {
        let mut swarm = SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )?
            .with_quic()
            .with_behaviour(|_| {
                request_response::Behaviour::with_codec(
                    JsonCodec::new(CLIENT_MAX_RESPONSE),
                    [(
                        StreamProtocol::new(JSON_PROTOCOL),
                        request_response::ProtocolSupport::Outbound,
                    )],
                    request_response::Config::default().with_request_timeout(timeout),
                )
            })?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        let opts = match peer_id_of(addr) {
            Some(p) => DialOpts::peer_id(p).addresses(vec![addr.clone()]).build(),
            None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
        };
        swarm
            .dial(opts)
            .with_context(|| format!("dialing {addr}"))?;
        let peer = tokio::time::timeout(timeout, async {
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { peer_id, .. } => return Ok(peer_id),
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

    /// The connected node's peer id.
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
            .send_request(&self.peer, JsonRequest::Body(body));
        let timeout = self.timeout + Duration::from_secs(1);
        tokio::time::timeout(timeout, async {
            loop {
                match self.swarm.select_next_some().await {
                    SwarmEvent::Behaviour(Event::Message {
                        message:
                            Message::Response {
                                request_id,
                                response,
                            },
                        ..
                    }) if request_id == id => return Ok(response),
                    SwarmEvent::Behaviour(Event::OutboundFailure {
                        request_id, error, ..
                    }) if request_id == id => bail!("request failed: {error}"),
                    _ => {}
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no response within {timeout:?}"))?
    }
}
