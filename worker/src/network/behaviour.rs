//! The libp2p behaviour of a node and the swarm built around it:
//! QUIC and TCP (noise + yamux), identify, ping, Kademlia, rendezvous
//! (server on bootstrap nodes, client on workers) and `/json-message/1.0`.

use std::time::Duration;

use anyhow::Context;
use libp2p::core::transport::OptionalTransport;
use libp2p::identity::Keypair;
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, Swarm, SwarmBuilder, identify, kad, noise, ping, quic, rendezvous,
    request_response, tcp, yamux,
};
use llama_cluster_shared::config::NodeConfig;
use llama_cluster_shared::protocol::JSON_PROTOCOL;

use super::frame_codec::FrameCodec;
use super::json_codec::JsonCodec;
use super::membership::{Gated, Members, MembershipBehaviour, membership_behaviour};
use super::tcp_only::TcpOnly;
use crate::torrent::protocol::{MAX_FRAME as MAX_TORRENT_FRAME, TORRENT_PROTOCOL};

/// What a node is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Rendezvous server and DHT bootstrap peer; serves no shard.
    Bootstrap,
    /// A cluster member that serves (or will serve) a shard.
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Bootstrap => "bootstrap",
            Role::Worker => "worker",
        }
    }
}

/// Identify protocol version shared by all llama-cluster nodes.
pub const IDENTIFY_PROTOCOL: &str = "/llama-cluster/1.0.0";

/// Agent-version prefix; the role follows (`llama-cluster/0.1.0/worker`).
pub const AGENT_PREFIX: &str = "llama-cluster/";

/// Kademlia protocol name of a cluster: clusters do not mix their DHTs.
pub fn kad_protocol(cluster: &str) -> anyhow::Result<StreamProtocol> {
    StreamProtocol::try_from_owned(format!("/llama-cluster/{cluster}/kad/1.0.0"))
        .context("invalid cluster name for the Kademlia protocol")
}

/// Every behaviour that serves a peer or learns from it is [`Gated`]: with a
/// cluster key, it sees nothing of a peer that has not proven the key
/// (`membership`).
#[derive(NetworkBehaviour)]
pub struct NodeBehaviour {
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    /// The cluster key handshake (only with a key).
    pub membership: Toggle<MembershipBehaviour>,
    pub kad: Gated<kad::Behaviour<kad::store::MemoryStore>>,
    pub rendezvous_server: Gated<Toggle<rendezvous::server::Behaviour>>,
    pub rendezvous_client: Gated<Toggle<rendezvous::client::Behaviour>>,
    pub messaging: Gated<request_response::Behaviour<JsonCodec>>,
    /// Persistent activation streams between stages (see `links`).
    pub streams: libp2p_stream::Behaviour,
    /// Serves pieces on every connection; asks over QUIC only for a peer
    /// that cannot be reached over TCP.
    pub torrent: Gated<request_response::Behaviour<FrameCodec>>,
    /// Asks for pieces over TCP connections only (see `tcp_only`). The last
    /// field: no behaviour after it can deny a connection it has accepted
    /// (the swarm would then never tell it that the connection closed).
    pub torrent_tcp: Gated<TcpOnly<request_response::Behaviour<FrameCodec>>>,
}

/// Builds the swarm of a node with `keypair`; `members` gates the
/// behaviours (keyed: the membership handshake runs).
pub fn build_swarm(
    keypair: Keypair,
    cfg: &NodeConfig,
    role: Role,
    members: Members,
) -> anyhow::Result<Swarm<NodeBehaviour>> {
    let kad_proto = kad_protocol(&cfg.cluster)?;
    let ttl = Duration::from_secs(cfg.record_ttl_secs);
    let discovery_interval = Duration::from_secs(cfg.discovery_interval_secs);
    let request_timeout = Duration::from_secs(cfg.request_timeout_secs);
    let max_message = cfg.max_message_bytes;
    let quic = cfg.quic;
    let swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        // `--no-quic` leaves QUIC out of the transport entirely: such a node
        // neither listens on nor dials a QUIC address, whichever behaviour
        // asks (Kademlia and request-response dial the addresses they know).
        .with_other_transport(|key| {
            if quic {
                OptionalTransport::some(quic::tokio::Transport::new(quic::Config::new(key)))
            } else {
                OptionalTransport::none()
            }
        })?
        .with_bandwidth_metrics(
            &mut crate::metrics::libp2p_registry()
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
        .with_behaviour(move |key| {
            let peer_id = key.public().to_peer_id();
            let mut kad_cfg = kad::Config::new(kad_proto);
            kad_cfg
                .set_record_ttl(Some(ttl))
                .set_publication_interval(Some(ttl / 2))
                .set_provider_record_ttl(Some(ttl))
                .set_provider_publication_interval(Some(ttl / 2))
                .set_query_timeout(Duration::from_secs(20))
                .set_periodic_bootstrap_interval(Some(discovery_interval))
                // Records others put are checked (signed by the peer they
                // name) before they are stored: `dht`.
                .set_record_filtering(kad::StoreInserts::FilterBoth);
            let mut kad = kad::Behaviour::with_config(
                peer_id,
                kad::store::MemoryStore::new(peer_id),
                kad_cfg,
            );
            // Loopback and LAN addresses are never "confirmed external" by
            // autonat; every node answers DHT queries.
            kad.set_mode(Some(kad::Mode::Server));
            let identify = identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL.to_string(), key.public())
                    .with_agent_version(format!(
                        "{AGENT_PREFIX}{}/{}",
                        llama_cluster_shared::VERSION,
                        role.as_str()
                    ))
                    .with_push_listen_addr_updates(true)
                    .with_interval(Duration::from_secs(60)),
            );
            let messaging = request_response::Behaviour::with_codec(
                JsonCodec::new(max_message),
                [(
                    StreamProtocol::new(JSON_PROTOCOL),
                    request_response::ProtocolSupport::Full,
                )],
                request_response::Config::default().with_request_timeout(request_timeout),
            );
            let (server, client) = match role {
                Role::Bootstrap => (
                    Some(rendezvous::server::Behaviour::new(
                        rendezvous::server::Config::default(),
                    )),
                    None,
                ),
                Role::Worker => (None, Some(rendezvous::client::Behaviour::new(key.clone()))),
            };
            let torrent_behaviour = |support| {
                request_response::Behaviour::with_codec(
                    FrameCodec::new(MAX_TORRENT_FRAME),
                    [(StreamProtocol::new(TORRENT_PROTOCOL), support)],
                    request_response::Config::default()
                        .with_request_timeout(Duration::from_secs(60))
                        .with_max_concurrent_streams(256),
                )
            };
            NodeBehaviour {
                membership: (!members.is_open()).then(membership_behaviour).into(),
                torrent: Gated::new(
                    torrent_behaviour(request_response::ProtocolSupport::Full),
                    members.clone(),
                ),
                torrent_tcp: Gated::new(
                    TcpOnly::new(torrent_behaviour(
                        request_response::ProtocolSupport::Outbound,
                    )),
                    members.clone(),
                ),
                streams: libp2p_stream::Behaviour::new(),
                identify,
                ping: ping::Behaviour::new(ping::Config::new()),
                kad: Gated::new(kad, members.clone()),
                rendezvous_server: Gated::new(server.into(), members.clone()),
                rendezvous_client: Gated::new(client.into(), members.clone()),
                messaging: Gated::new(messaging, members.clone()),
            }
        })?
        // Connections stay up between workers; they carry the pipeline.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(24 * 3600)))
        .build();
    Ok(swarm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_node_without_quic_has_no_quic_transport() {
        let quic_addr: libp2p::Multiaddr = "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap();
        let tcp_addr: libp2p::Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().unwrap();
        for quic in [true, false] {
            let cfg = NodeConfig {
                quic,
                ..NodeConfig::default()
            };
            let mut swarm = build_swarm(
                Keypair::generate_ed25519(),
                &cfg,
                Role::Worker,
                Members::new(false),
            )
            .unwrap();
            assert_eq!(swarm.listen_on(quic_addr.clone()).is_ok(), quic);
            assert!(swarm.listen_on(tcp_addr.clone()).is_ok());
        }
    }
}
