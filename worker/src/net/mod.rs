//! The handle other tasks use to reach the swarm task ([`NetHandle`]), the
//! commands it carries ([`NetCommand`]), their typed errors ([`NetError`])
//! and the wire types of the activation protocol ([`frame`]). Everything
//! above the swarm (pipeline, torrents, dispatcher, gRPC) depends on this
//! module, not on the swarm task itself.

pub mod frame;

use std::time::Duration;

use libp2p::PeerId;
use tokio::sync::{mpsc, oneshot};

pub use crate::network::error::NetError;
use crate::network::links::{LinkCounters, Links};
use frame::{ACTIVATION_PROTOCOL, MAX_FRAME as MAX_ACTIVATION_FRAME};

/// Requests other tasks send to the swarm task.
#[derive(Debug)]
pub enum NetCommand {
    /// Send a JSON body to a peer and return its response.
    Request {
        peer: PeerId,
        body: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, NetError>>,
    },
    /// Send a binary frame (activation or piece protocol) and return the answer.
    Frame {
        proto: FrameProto,
        peer: PeerId,
        body: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, NetError>>,
    },
    /// Re-publish this node's records now (its shard changed state).
    Publish,
    /// Ask the DHT for the latest records of these shard ids.
    QueryShards(Vec<String>),
    /// Find the providers of a DHT key, answering within `bound`.
    GetProviders {
        key: String,
        bound: Duration,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    /// Announce this node as a provider of a DHT key.
    Provide(String),
}

/// The binary request-response protocols (length-prefixed frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameProto {
    /// Shard file metadata and pieces, over any connection.
    Torrent,
    /// Shard file pieces, over a TCP connection to the peer (dialed when
    /// there is none); over any connection when the peer cannot be reached
    /// over TCP (see `network::tcp_only`).
    TorrentTcp,
}

/// Handle on the swarm task.
#[derive(Debug, Clone)]
pub struct NetHandle {
    tx: mpsc::Sender<NetCommand>,
    /// Persistent streams for activation frames.
    links: Links,
}

impl NetHandle {
    /// A handle on the swarm task that reads `tx`, with `links` for
    /// activation frames.
    pub(crate) fn new(tx: mpsc::Sender<NetCommand>, links: Links) -> Self {
        NetHandle { tx, links }
    }

    async fn call(
        &self,
        cmd: NetCommand,
        rx: oneshot::Receiver<Result<Vec<u8>, NetError>>,
        peer: PeerId,
        timeout: Duration,
    ) -> Result<Vec<u8>, NetError> {
        self.tx
            .send(cmd)
            .await
            .map_err(|_| NetError::ShuttingDown)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(NetError::ShuttingDown),
            Err(_) => Err(NetError::Timeout { peer, timeout }),
        }
    }

    /// Sends `body` to `peer` over `/json-message/1.0`.
    pub async fn request(
        &self,
        peer: PeerId,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, NetError> {
        let (reply, rx) = oneshot::channel();
        self.call(NetCommand::Request { peer, body, reply }, rx, peer, timeout)
            .await
    }

    /// Sends a binary frame to `peer`, waiting at most `timeout`.
    pub async fn frame(
        &self,
        proto: FrameProto,
        peer: PeerId,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, NetError> {
        let (reply, rx) = oneshot::channel();
        self.call(
            NetCommand::Frame {
                proto,
                peer,
                body,
                reply,
            },
            rx,
            peer,
            timeout,
        )
        .await
    }

    /// Sends an activation frame to `peer` over a persistent stream,
    /// waiting at most `timeout`.
    pub async fn activation(
        &self,
        peer: PeerId,
        body: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, NetError> {
        self.links.call(peer, body, timeout).await
    }

    /// Providers of `key` in the DHT: the ones found by `bound` (peers
    /// that are gone cost a dial timeout each, so a lookup can take long),
    /// or a moment after the first ones were found.
    pub async fn get_providers(&self, key: String, bound: Duration) -> Vec<PeerId> {
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(NetCommand::GetProviders { key, bound, reply })
            .await
            .is_err()
        {
            return vec![];
        }
        tokio::time::timeout(Duration::from_secs(25), rx)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    }

    /// Announces this node as a provider of `key`.
    pub fn provide(&self, key: String) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(NetCommand::Provide(key)).await;
        });
    }

    /// A handle on a channel nobody serves (unit tests of other modules).
    /// A connection to `peer` closed (see [`Links::connection_closed`]).
    pub(crate) fn connection_closed(&self, peer: &PeerId) {
        self.links.connection_closed(peer);
    }

    pub fn for_tests(tx: mpsc::Sender<NetCommand>) -> Self {
        let control = libp2p_stream::Behaviour::new().new_control();
        NetHandle {
            tx,
            links: Links::new(
                control,
                ACTIVATION_PROTOCOL,
                MAX_ACTIVATION_FRAME,
                LinkCounters::default(),
            ),
        }
    }

    /// Asks the swarm task to re-publish this node's records.
    pub fn publish(&self) {
        let _ = self.tx.try_send(NetCommand::Publish);
    }

    /// Asks the swarm task to look up the records of `shard_ids` in the
    /// DHT; what it finds lands in the node's state.
    pub fn query_shards(&self, shard_ids: Vec<String>) {
        let _ = self.tx.try_send(NetCommand::QueryShards(shard_ids));
    }
}
