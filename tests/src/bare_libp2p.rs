//! Bare libp2p nodes for the benchmarks' floors: TCP, noise and yamux, and
//! streams (`libp2p-stream`) as the only behaviour.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, Swarm, SwarmBuilder, noise, tcp, yamux};

/// A swarm with `key` (to be polled on a tokio runtime).
pub fn swarm(key: Keypair) -> anyhow::Result<Swarm<libp2p_stream::Behaviour>> {
    Ok(SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_behaviour(|_| libp2p_stream::Behaviour::new())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
        .build())
}

/// The TCP port of a listen address.
pub fn tcp_port(addr: &Multiaddr) -> Option<u16> {
    addr.iter().find_map(|p| match p {
        Protocol::Tcp(port) => Some(port),
        _ => None,
    })
}
