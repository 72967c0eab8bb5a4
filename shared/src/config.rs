//! Node configuration: defaults < TOML file < `LLAMA_CLUSTER_*` environment
//! variables < command-line flags, merged with the `config` crate.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use config::{Config, Environment, File, FileFormat};
use serde::{Deserialize, Serialize};

use crate::dht_keys::is_valid_name;

/// Prefix of the environment variables read as configuration.
pub const ENV_PREFIX: &str = "LLAMA_CLUSTER";

/// Log output format.
/// Largest JSON message accepted by default (bytes).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Configuration of a worker or bootstrap node. Every field can be set in the
/// TOML file (same name), in the environment (`LLAMA_CLUSTER_<NAME>`, upper
/// case; lists comma-separated) and by the flag `--<name>` (dashes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Cluster name; scopes DHT keys, the rendezvous namespace and the
    /// Kademlia protocol.
    pub cluster: String,
    /// IP address the P2P transports listen on.
    pub p2p_host: String,
    /// Port of the P2P transports (TCP and QUIC/UDP); 0 picks free ports.
    pub p2p_port: u16,
    /// Listen on and dial QUIC; when false only TCP is used.
    pub quic: bool,
    /// Multiaddrs of bootstrap nodes or of any known worker
    /// (`/ip4/127.0.0.1/udp/9000/quic-v1`, `/ip4/127.0.0.1/tcp/9000`; `/p2p/<id>` optional).
    pub bootstrap: Vec<String>,
    /// Addresses to announce instead of the listen addresses (NAT, Kubernetes).
    pub external_addrs: Vec<String>,
    /// gRPC control-plane address (`host:port`; port 0 picks a free port).
    pub grpc_addr: String,
    /// File holding the node's libp2p identity (created when missing);
    /// empty: a new identity at every start.
    pub identity_file: String,
    /// Id of the shard this worker announces (empty: none).
    pub shard_id: String,
    /// Model name of the announced shard.
    pub shard_model: String,
    /// Layer range of the announced shard, `START-END` (inclusive).
    pub shard_layers: String,
    /// Seconds between `[STATUS]` reports.
    pub status_interval_secs: u64,
    /// Seconds between safety-net discovery rounds (rendezvous + DHT).
    pub discovery_interval_secs: u64,
    /// Lifetime of DHT records and provider records; re-published at half of it.
    pub record_ttl_secs: u64,
    /// Largest JSON request or response accepted, in bytes.
    pub max_message_bytes: usize,
    /// Timeout of one P2P request, in seconds.
    pub request_timeout_secs: u64,
    /// `text` (human-readable) or `json`.
    pub log_format: LogFormat,
    /// Split manifest (`manifest.json` written by `llama-worker split`); its
    /// directory holds the shard and head files. Needed to serve a shard or
    /// to drive inference.
    pub manifest: String,
    /// Context length of one inference session (tokens).
    pub n_ctx: u32,
    /// Prompt chunk size; equal on every worker of a cluster.
    pub n_batch: u32,
    /// llama.cpp physical batch; equal on every worker for identical results.
    pub n_ubatch: u32,
    /// llama.cpp threads (0: all cores).
    pub threads: u32,
    /// Threads of the async runtime (networking, gRPC; 0: one per core).
    /// llama.cpp runs on its own threads; one runtime thread gives the
    /// lowest per-token latency between stages.
    pub runtime_threads: u32,
    /// Concurrent inference sessions of this worker's stage (0: as many as
    /// its memory holds, at most 16); requests beyond wait in a queue.
    pub max_sessions: usize,
    /// Sessions idle this long are evicted.
    pub session_idle_secs: u64,
    /// A stage frees a session that got no step for this long (its driver
    /// is gone); the driver rebuilds a session that was freed.
    pub session_lease_secs: u64,
    /// Time one pipeline step (all stages) may take before the stage that
    /// does not answer is failed over.
    pub stage_timeout_secs: u64,
    /// A gRPC client connection that leaves the server's HTTP/2 pings
    /// unanswered this long (a hung process, a machine gone without
    /// closing its connections) is closed, cancelling its requests.
    pub client_timeout_secs: u64,
    /// Routes a request may move to when stages fail (a new route replays
    /// the tokens so far).
    pub max_reroutes: u32,
    /// How long a request may wait for free capacity before it is refused.
    pub queue_timeout_secs: u64,
    /// Requests that may wait for capacity at once; more are refused.
    pub max_queued: usize,
    /// A stage of a route of D stages runs its sessions in D waves, so that
    /// all stages compute at once (false: every stage waits for all its
    /// sessions and runs them in one call).
    pub pipeline_waves: bool,
    /// Send hidden states between stages as f16 (half the bytes, not bit-exact).
    pub activation_f16: bool,
    /// Directory for downloaded shard files and other cached data (empty:
    /// `$LLAMA_CLUSTER_CACHE` or `~/.cache/llama-cluster`).
    pub cache_dir: String,
    /// Seed the files of the configured manifest that are on this disk.
    pub seed_manifest: bool,
    /// Upload rate limit for seeding, in MB/s (10^6 bytes) over all peers
    /// (0: unlimited).
    pub upload_limit_mb_per_sec: f64,
    /// Disk space (MB) a shard's fetch leaves free on the cache's file
    /// system; a fetch that would take more is refused before it starts.
    pub min_free_disk_mb: u64,
    /// Serve the verified pieces of a file while it is still downloading
    /// (announcing it, telling other downloaders which pieces it has).
    pub partial_seeding: bool,
    /// Prometheus `/metrics` address (`host:port`; empty: off).
    pub metrics_addr: String,
    /// Memory this worker offers for shards, in MB (0: the machine's total
    /// memory). The coordinator places shards by it.
    pub memory_mb: u64,
    /// OTLP/gRPC endpoint receiving traces (`http://host:4317`; empty:
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` if set, else traces off).
    pub otlp_endpoint: String,
    /// Admin token for the calls that change the cluster (LoadShard,
    /// SyncTorrents with fetch_missing, Relay); empty: open. Set it through
    /// the environment (`LLAMA_CLUSTER_ADMIN_TOKEN`) or `admin_token_file`.
    pub admin_token: String,
    pub admin_token_file: String,
    /// Token for inference (`LLAMA_CLUSTER_API_TOKEN` or `api_token_file`);
    /// empty: open.
    pub api_token: String,
    pub api_token_file: String,
    /// The cluster's shared secret (64 hex digits; `llama-worker keygen`
    /// writes a file): only peers that prove it are served. Set it through
    /// `cluster_key_file` (or `LLAMA_CLUSTER_KEY_FILE`), or the environment
    /// (`LLAMA_CLUSTER_KEY`); empty: the cluster is open.
    pub cluster_key: String,
    pub cluster_key_file: String,
    /// PEM certificate chain and private key of the gRPC server: TLS on
    /// (clients need the CA, `tls_ca_file`); both empty: plaintext.
    pub tls_cert_file: String,
    pub tls_key_file: String,
    /// Trace every N-th decode step in detail (hops and stages); 1: every
    /// step, 0: none (prefill and the request are always traced).
    pub trace_decode_every: u32,
    /// Test only: serve corrupted pieces.
    pub test_corrupt_pieces: bool,
    /// Test only: serve corrupted pieces with metadata that matches them.
    pub test_lying_meta: bool,
    /// Test only: serve metadata whose size is one byte short.
    pub test_wrong_size_meta: bool,
    /// Test only: delay every served piece by this many milliseconds.
    pub test_piece_delay_ms: u64,
    /// Test only: answer the first this many piece requests with busy.
    pub test_busy_pieces: u32,
    /// Test only: listen on QUIC alone (peers cannot reach it over TCP).
    pub test_no_tcp_listen: bool,
    /// Test only: publish forged shard records for other peers' shards.
    pub test_forge_records: bool,
    /// Test only: corrupt the pieces served from a download in progress (a
    /// lying partial seeder); `LLAMA_CLUSTER_TEST_CORRUPT_UPLOADS=true`.
    pub test_corrupt_uploads: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            cluster: "llama-cluster".into(),
            p2p_host: "0.0.0.0".into(),
            p2p_port: 0,
            quic: true,
            bootstrap: vec![],
            external_addrs: vec![],
            grpc_addr: "127.0.0.1:50051".into(),
            identity_file: String::new(),
            shard_id: String::new(),
            shard_model: "smollm2-135m-instruct".into(),
            shard_layers: String::new(),
            status_interval_secs: 15,
            discovery_interval_secs: 30,
            record_ttl_secs: 300,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            request_timeout_secs: 30,
            log_format: LogFormat::Text,
            manifest: String::new(),
            n_ctx: 2048,
            n_batch: 512,
            n_ubatch: 512,
            threads: 0,
            runtime_threads: 1,
            max_sessions: 0,
            session_idle_secs: 300,
            session_lease_secs: 30,
            stage_timeout_secs: 10,
            client_timeout_secs: 20,
            max_reroutes: 3,
            queue_timeout_secs: 120,
            max_queued: 256,
            pipeline_waves: true,
            activation_f16: false,
            cache_dir: String::new(),
            seed_manifest: true,
            upload_limit_mb_per_sec: 0.0,
            min_free_disk_mb: 256,
            partial_seeding: true,
            metrics_addr: String::new(),
            memory_mb: 0,
            otlp_endpoint: String::new(),
            admin_token: String::new(),
            admin_token_file: String::new(),
            api_token: String::new(),
            api_token_file: String::new(),
            cluster_key: String::new(),
            cluster_key_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            trace_decode_every: 1,
            test_corrupt_pieces: false,
            test_lying_meta: false,
            test_wrong_size_meta: false,
            test_piece_delay_ms: 0,
            test_busy_pieces: 0,
            test_no_tcp_listen: false,
            test_forge_records: false,
            test_corrupt_uploads: false,
        }
    }
}

/// A configuration value that is missing, malformed or out of range.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration: field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl ConfigError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// Field names, used to pick our variables out of the environment.
fn field_names() -> Vec<String> {
    match serde_json::to_value(NodeConfig::default()) {
        Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
        _ => vec![],
    }
}

/// `LLAMA_CLUSTER_<FIELD>` variables of `env` that name a known field.
/// Other `LLAMA_CLUSTER_*` variables (for tools around the node) are ignored.
fn env_source(env: &HashMap<String, String>) -> HashMap<String, String> {
    let fields = field_names();
    env.iter()
        .filter_map(|(k, v)| {
            let name = k
                .strip_prefix(ENV_PREFIX)?
                .strip_prefix('_')?
                .to_lowercase();
            fields
                .contains(&name)
                .then(|| (format!("{ENV_PREFIX}_{}", name.to_uppercase()), v.clone()))
        })
        .collect()
}

impl NodeConfig {
    /// Merges defaults, the TOML `file` (if any), the `env` map (pass
    /// `std::env::vars().collect()`) and `flags` (field name → value as
    /// given on the command line), then validates the result.
    pub fn load(
        file: Option<&Path>,
        env: &HashMap<String, String>,
        flags: &[(&str, String)],
    ) -> Result<NodeConfig, ConfigError> {
        let mut builder = Config::builder().add_source(Config::try_from(&NodeConfig::default())?);
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::invalid(
                    "config",
                    format!("config file {} does not exist", path.display()),
                ));
            }
            builder = builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
        }
        builder = builder.add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("bootstrap")
                .with_list_parse_key("external_addrs")
                .source(Some(env_source(env))),
        );
        for (key, value) in flags {
            builder = if matches!(*key, "bootstrap" | "external_addrs") {
                let list: Vec<String> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
                builder.set_override(*key, list)?
            } else {
                builder.set_override(*key, value.as_str())?
            };
        }
        let cfg: NodeConfig = builder.build()?.try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values the types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !is_valid_name(&self.cluster) {
            return Err(ConfigError::invalid(
                "cluster",
                format!(
                    "{:?} is not a valid name (1-64 of A-Z a-z 0-9 - _ .)",
                    self.cluster
                ),
            ));
        }
        if self.p2p_host.parse::<std::net::IpAddr>().is_err() {
            return Err(ConfigError::invalid(
                "p2p_host",
                format!("{:?} is not an IP address", self.p2p_host),
            ));
        }
        if self.grpc_addr.parse::<SocketAddr>().is_err() {
            return Err(ConfigError::invalid(
                "grpc_addr",
                format!("{:?} is not a host:port socket address", self.grpc_addr),
            ));
        }
        if !self.shard_id.is_empty() && !is_valid_name(&self.shard_id) {
            return Err(ConfigError::invalid(
                "shard_id",
                format!("{:?} is not a valid name", self.shard_id),
            ));
        }
        if !self.shard_id.is_empty() && self.manifest.is_empty() || !self.shard_layers.is_empty() {
            if self.shard_id.is_empty() {
                return Err(ConfigError::invalid(
                    "shard_id",
                    "required when shard_layers is set",
                ));
            }
            self.layer_range()?;
        }
        for (field, value) in [
            ("status_interval_secs", self.status_interval_secs),
            ("discovery_interval_secs", self.discovery_interval_secs),
            ("record_ttl_secs", self.record_ttl_secs),
            ("request_timeout_secs", self.request_timeout_secs),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(field, "must be at least 1"));
            }
        }
        if self.record_ttl_secs < 10 {
            return Err(ConfigError::invalid(
                "record_ttl_secs",
                "must be at least 10 (records are re-published at half of it)",
            ));
        }
        if !(16..=1_048_576).contains(&self.n_ctx) {
            return Err(ConfigError::invalid(
                "n_ctx",
                "must be between 16 and 1048576",
            ));
        }
        if self.n_batch == 0 || self.n_batch > self.n_ctx {
            return Err(ConfigError::invalid(
                "n_batch",
                "must be between 1 and n_ctx",
            ));
        }
        if self.n_ubatch == 0 || self.n_ubatch > self.n_batch {
            return Err(ConfigError::invalid(
                "n_ubatch",
                "must be between 1 and n_batch",
            ));
        }
        if !(self.upload_limit_mb_per_sec == 0.0
            || (1.0..=1e6).contains(&self.upload_limit_mb_per_sec))
        {
            return Err(ConfigError::invalid(
                "upload_limit_mb_per_sec",
                "must be 0 (unlimited) or between 1 and 1000000 MB/s",
            ));
        }
        let is_quic = |a: &str| a.contains("/quic");
        if !self.quic && !self.bootstrap.is_empty() && self.bootstrap.iter().all(|a| is_quic(a)) {
            return Err(ConfigError::invalid(
                "bootstrap",
                "every bootstrap address is a QUIC address, but QUIC is disabled (quic = false, --no-quic): give a TCP address (/ip4/…/tcp/…)",
            ));
        }
        if self.runtime_threads > 1024 {
            return Err(ConfigError::invalid(
                "runtime_threads",
                "must be between 0 (one per core) and 1024",
            ));
        }
        if self.max_sessions > 256 {
            return Err(ConfigError::invalid(
                "max_sessions",
                "must be between 0 (as many as memory holds) and 256",
            ));
        }
        for (field, value) in [
            ("session_idle_secs", self.session_idle_secs),
            ("session_lease_secs", self.session_lease_secs),
            ("stage_timeout_secs", self.stage_timeout_secs),
            ("client_timeout_secs", self.client_timeout_secs),
            ("queue_timeout_secs", self.queue_timeout_secs),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(field, "must be at least 1"));
            }
        }
        if !self.metrics_addr.is_empty() && self.metrics_addr.parse::<SocketAddr>().is_err() {
            return Err(ConfigError::invalid(
                "metrics_addr",
                format!("{:?} is not a host:port socket address", self.metrics_addr),
            ));
        }
        let url_ok = |u: &str| u.starts_with("http://") || u.starts_with("https://");
        if !self.otlp_endpoint.is_empty() && !url_ok(&self.otlp_endpoint) {
            return Err(ConfigError::invalid(
                "otlp_endpoint",
                format!("{:?} is not an http:// or https:// URL", self.otlp_endpoint),
            ));
        }
        if !self.manifest.is_empty() && !Path::new(&self.manifest).is_file() {
            return Err(ConfigError::invalid(
                "manifest",
                format!(
                    "{} does not exist (write one with `llama-worker split`)",
                    self.manifest
                ),
            ));
        }
        if self.tls_cert_file.is_empty() != self.tls_key_file.is_empty() {
            return Err(ConfigError::invalid(
                "tls_cert_file",
                "tls_cert_file and tls_key_file go together (both set: TLS, both empty: plaintext)",
            ));
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.max_message_bytes) {
            return Err(ConfigError::invalid(
                "max_message_bytes",
                "must be between 1024 and 67108864",
            ));
        }
        Ok(())
    }

    /// The announced layer range, parsed from `shard_layers` (`None` without
    /// a shard, or when the range comes from the manifest).
    pub fn layer_range(&self) -> Result<Option<(u32, u32)>, ConfigError> {
        if self.shard_id.is_empty() || self.shard_layers.is_empty() {
            return Ok(None);
        }
        parse_layer_range(&self.shard_layers)
            .map(Some)
            .map_err(|reason| ConfigError::invalid("shard_layers", reason.to_string()))
    }
}

/// A layer range that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayerRangeError {
    #[error("{0:?} is not a layer range START-END (for example 0-14)")]
    NotARange(String),
    #[error("{range:?}: {which} {value:?} is not a layer number")]
    NotANumber {
        range: String,
        which: &'static str,
        value: String,
    },
    #[error("{0:?}: start is after end")]
    Reversed(String),
}

/// Parses `START-END` (inclusive, START <= END).
pub fn parse_layer_range(s: &str) -> Result<(u32, u32), LayerRangeError> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| LayerRangeError::NotARange(s.to_string()))?;
    let number = |which: &'static str, v: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|_| LayerRangeError::NotANumber {
                range: s.to_string(),
                which,
                value: v.to_string(),
            })
    };
    let (a, b) = (number("start", a)?, number("end", b)?);
    if a > b {
        return Err(LayerRangeError::Reversed(s.to_string()));
    }
    Ok((a, b))
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
