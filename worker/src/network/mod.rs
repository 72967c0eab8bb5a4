//! libp2p plumbing: the swarm's behaviour and the JSON codec.

pub mod behaviour;
pub mod error;
pub mod frame_codec;
pub mod json_codec;
pub mod links;
pub mod membership;
pub mod tcp_only;

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use llama_cluster_shared::status::Transport;

/// Transport of a connection, from its remote address.
pub fn transport_of(addr: &Multiaddr) -> Transport {
    if addr
        .iter()
        .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic))
    {
        Transport::Quic
    } else {
        Transport::Tcp
    }
}

/// Removes a trailing `/p2p/<peer>` from an address.
pub fn without_peer_id(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect()
}

/// The peer id in an address's `/p2p/<peer>` component, if any.
pub fn peer_id_of(addr: &Multiaddr) -> Option<libp2p::PeerId> {
    addr.iter().find_map(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports_and_peer_ids() {
        let q: Multiaddr = "/ip4/127.0.0.1/udp/9000/quic-v1".parse().unwrap();
        let t: Multiaddr = "/ip4/127.0.0.1/tcp/9000".parse().unwrap();
        assert_eq!(transport_of(&q), Transport::Quic);
        assert_eq!(transport_of(&t), Transport::Tcp);
        let id = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let with = t.clone().with(Protocol::P2p(id));
        assert_eq!(peer_id_of(&with), Some(id));
        assert_eq!(without_peer_id(&with), t);
        assert_eq!(peer_id_of(&t), None);
    }
}
