//! `/json-message/1.0` traffic of the swarm task: inbound requests go to the
//! dispatcher on their own task; responses come back through a channel.

use libp2p::request_response::{Event, Message};
use llama_cluster_shared::protocol::CommandResponse;
use llama_cluster_shared::status::NodeStatus;
use tracing::{Instrument, debug, info_span, warn};

use crate::network::json_codec::JsonRequest;
use crate::node::{Node, Pending};

impl Node {
    pub(crate) fn on_messaging(&mut self, ev: Event<JsonRequest, Vec<u8>>) {
        match ev {
            Event::Message { peer, message, .. } => match message {
                Message::Request {
                    request, channel, ..
                } => {
                    let dispatcher = self.dispatcher.clone();
                    let responses = self.responses.clone();
                    let span = info_span!("p2p_request", peer = %peer);
                    tokio::spawn(
                        async move {
                            let body = dispatcher.handle_p2p(&peer.to_string(), request).await;
                            let _ = responses.send((channel, body)).await;
                        }
                        .instrument(span),
                    );
                }
                Message::Response {
                    request_id,
                    response,
                } => match self.pending.remove(&request_id) {
                    Some(Pending::External(tx)) => {
                        let _ = tx.send(Ok(response));
                    }
                    Some(Pending::StatusProbe(p)) => self.on_status_probe(p, &response),
                    None => debug!("[MSG] response to unknown request from {peer}"),
                },
            },
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => match self.pending.remove(&request_id) {
                Some(Pending::External(tx)) => {
                    let _ = tx.send(Err(format!("request to {peer} failed: {error}")));
                }
                Some(Pending::StatusProbe(_)) => {
                    debug!("[MSG] status probe of {peer} failed: {error}")
                }
                None => {}
            },
            Event::InboundFailure { peer, error, .. } => {
                warn!("[MSG] inbound request from {peer} failed: {error}")
            }
            Event::ResponseSent { .. } => {}
        }
    }

    fn on_status_probe(&mut self, peer: libp2p::PeerId, body: &[u8]) {
        let status = serde_json::from_slice::<CommandResponse>(body)
            .ok()
            .and_then(|r| r.result)
            .and_then(|v| serde_json::from_value::<NodeStatus>(v).ok());
        let Some(status) = status else {
            debug!("[MSG] unreadable status from {peer}");
            return;
        };
        for s in status.shards {
            if s.peer_id == peer.to_string() {
                self.learn_shard(
                    llama_cluster_shared::dht_keys::ShardRecord {
                        shard_id: s.shard_id,
                        peer_id: s.peer_id,
                        addrs: s.addrs,
                        model: s.model,
                        layer_start: s.layer_start,
                        layer_end: s.layer_end,
                        state: s.state,
                        updated_at: s.updated_at,
                        load: s.load,
                    },
                    "peer status",
                );
            }
        }
    }
}
