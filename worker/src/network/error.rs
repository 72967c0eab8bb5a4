//! Typed errors of requests to peers.

use std::time::Duration;

use libp2p::PeerId;

/// Why a request to a peer failed. The peer at fault is part of the value
/// ([`NetError::peer`]): callers never read it out of a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    #[error("node is shutting down")]
    ShuttingDown,
    #[error("no answer from {peer} within {timeout:?}")]
    Timeout { peer: PeerId, timeout: Duration },
    /// The connection failed or closed, a stream was reset, a dial failed.
    #[error("request to {peer} failed: {reason}")]
    Failed { peer: PeerId, reason: String },
    /// The peer does not speak the protocol.
    #[error("{peer} does not support the protocol: {reason}")]
    Unsupported { peer: PeerId, reason: String },
    #[error("frame of {size} bytes exceeds {max} (not sent to {peer})")]
    TooLarge {
        peer: PeerId,
        size: usize,
        max: usize,
    },
    #[error("cannot relay to this node itself")]
    ToSelf,
}

impl NetError {
    /// The peer the failure is about, when there is one.
    pub fn peer(&self) -> Option<PeerId> {
        match self {
            NetError::Timeout { peer, .. }
            | NetError::Failed { peer, .. }
            | NetError::Unsupported { peer, .. }
            | NetError::TooLarge { peer, .. } => Some(*peer),
            NetError::ShuttingDown | NetError::ToSelf => None,
        }
    }

    /// The peer did not answer in time (it may be alive but slow).
    pub fn is_timeout(&self) -> bool {
        matches!(self, NetError::Timeout { .. })
    }
}
