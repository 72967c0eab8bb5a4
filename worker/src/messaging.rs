//! `/json-message/1.0` traffic of the swarm task: inbound requests go to the
//! dispatcher on their own task; responses come back through a channel.

use libp2p::request_response::{Event, Message, OutboundFailure};
use llama_cluster_shared::protocol::CommandResponse;
use llama_cluster_shared::status::NodeStatus;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::net::FrameProto;
use crate::network::json_codec::JsonRequest;
use crate::node::{Node, Outbound, Pending};

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
                    Some(Pending::External(out)) => {
                        let _ = out.reply.send(Ok(response));
                    }
                    Some(Pending::StatusProbe(p)) => self.on_status_probe(p, &response),
                    Some(Pending::Notice) => debug!("[MSG] notice acknowledged by {peer}"),
                    None => debug!("[MSG] response to unknown request from {peer}"),
                },
            },
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => match self.pending.remove(&request_id) {
                Some(Pending::External(out)) => {
                    if let Some(out) = self.retry_after_close(peer, &error, out) {
                        let body = out.body.clone();
                        let id = self
                            .swarm
                            .behaviour_mut()
                            .messaging
                            .send_request(&peer, JsonRequest::Body(body));
                        self.pending.insert(id, Pending::External(out));
                    }
                }
                Some(Pending::Notice) => debug!("[MSG] notice to {peer} failed: {error}"),
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

    /// Traffic of the binary protocols: inbound frames go to the pipeline
    /// (activations) or the file store (pieces) on their own task.
    pub(crate) fn on_frames(&mut self, proto: FrameProto, ev: Event<Vec<u8>, Vec<u8>>) {
        match ev {
            Event::Message {
                peer,
                message,
                connection_id,
            } => match message {
                Message::Request {
                    request, channel, ..
                } => {
                    self.piece_conns.entry(connection_id).or_insert(false);
                    let torrents = self.torrents.clone();
                    let responses = self.frame_responses.clone();
                    tokio::spawn(async move {
                        let body = match proto {
                            FrameProto::Torrent | FrameProto::TorrentTcp => {
                                torrents.serve(peer, request).await
                            }
                        };
                        let _ = responses.send((proto, channel, body)).await;
                    });
                }
                Message::Response {
                    request_id,
                    response,
                } => {
                    let received = self.piece_conns.entry(connection_id).or_insert(false);
                    if proto == FrameProto::TorrentTcp && !std::mem::replace(received, true) {
                        info!("[TORRENT] shard file pieces from {peer} over TCP");
                    }
                    if let Some(out) = self.pending_frames.remove(&(proto, request_id)) {
                        let _ = out.reply.send(Ok(response));
                    }
                }
            },
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                let Some(out) = self.pending_frames.remove(&(proto, request_id)) else {
                    return;
                };
                // No TCP path to the peer: its pieces go over the others.
                if proto == FrameProto::TorrentTcp && matches!(error, OutboundFailure::DialFailure)
                {
                    let failed = self.swarm.behaviour().torrent_tcp.dial_failed(&peer);
                    let wait = if failed {
                        crate::node::NO_TCP_FOR
                    } else {
                        crate::node::NO_TCP_ADDRESS_FOR
                    };
                    if self
                        .no_tcp
                        .insert(peer, std::time::Instant::now() + wait)
                        .is_none()
                    {
                        info!(
                            "[TORRENT] {peer} cannot be reached over TCP ({}); asking it for pieces over its other connections for {} s",
                            if failed {
                                "its TCP addresses did not answer"
                            } else {
                                "no TCP address known"
                            },
                            wait.as_secs()
                        );
                    }
                    let id = self
                        .frames(FrameProto::Torrent)
                        .send_request(&peer, out.body.clone());
                    self.pending_frames.insert((FrameProto::Torrent, id), out);
                    return;
                }
                if let Some(out) = self.retry_after_close(peer, &error, out) {
                    let id = self.frames(proto).send_request(&peer, out.body.clone());
                    self.pending_frames.insert((proto, id), out);
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                debug!("[MSG] inbound {proto:?} request from {peer} failed: {error}")
            }
            Event::ResponseSent { .. } => {}
        }
    }

    /// A request lost because its connection closed (typically the TCP
    /// connection replaced by QUIC) is sent again, at most twice. Otherwise the caller gets the error; `None` means "resend".
    fn retry_after_close(
        &mut self,
        peer: libp2p::PeerId,
        error: &OutboundFailure,
        out: Outbound,
    ) -> Option<Outbound> {
        if matches!(error, OutboundFailure::ConnectionClosed)
            && out.retried < 2
            && self.swarm.is_connected(&peer)
        {
            debug!("[MSG] request to {peer} lost with its connection; sending again");
            return Some(Outbound {
                retried: out.retried + 1,
                ..out
            });
        }
        let _ = out.reply.send(Err(crate::net::NetError::Failed {
            peer,
            reason: error.to_string(),
        }));
        None
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
        if !status.grpc_addr.is_empty() {
            let addr = status.grpc_addr.clone();
            self.state.write(|s| s.peer_grpc.insert(peer, addr));
        }
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
                        max_sessions: s.max_sessions,
                    },
                    "peer status",
                );
            }
        }
    }
}
