//! Types both sides of llama-cluster need: configuration, the JSON command
//! protocol spoken over `/json-message/1.0`, DHT keys and shard records,
//! node status, logging and trace set-up, the gRPC server's transport.

pub mod auth;
pub mod config;
pub mod dht_keys;
pub mod grpc_server;
pub mod logging;
pub mod protocol;
pub mod status;
pub mod telemetry;
pub mod tls;

/// Crate version, reported in status and identify.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
