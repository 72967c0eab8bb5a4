//! `tracing` set-up: human-readable or JSON logs on stderr, filtered by
//! `RUST_LOG` (default: `info` for llama-cluster, `warn` for libp2p internals).

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Default filter when `RUST_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,libp2p_swarm=warn,libp2p_kad=warn,libp2p_quic=warn,libp2p_tcp=warn,libp2p_rendezvous=warn,h2=warn,tower=warn";

/// Installs the global subscriber; a second call is a no-op.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
