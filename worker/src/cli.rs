//! `llama-worker`'s command line: the subcommands and their flags, and the
//! node flags layered over the configuration file and the environment.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use llama_cluster_shared::config::NodeConfig;

#[derive(Parser, Debug)]
#[command(name = "llama-worker", version, about = "llama-cluster worker node")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Cmd>,
    #[command(flatten)]
    pub node: NodeArgs,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run a worker (the default).
    Run(NodeArgs),
    /// Run a bootstrap node: libp2p rendezvous server and DHT bootstrap peer.
    Bootstrap(NodeArgs),
    /// Send one JSON message or command to a node and print its response.
    Send(SendArgs),
    /// Cut a GGUF model into layer-range shards plus a head file and a manifest.
    Split(SplitArgs),
    /// Join the swarm, download one file by its content hash (progress bar), copy it out.
    Fetch(FetchArgs),
    /// Write a new random cluster key (give every member the same file, as
    /// `--cluster-key-file` or `LLAMA_CLUSTER_KEY_FILE`).
    Keygen(KeygenArgs),
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Where to write the key (mode 0600).
    #[arg(long, default_value = "cluster.key")]
    pub out: PathBuf,
    /// Replace an existing file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct FetchArgs {
    /// BLAKE3 hash of the file (as in a split manifest).
    #[arg(long)]
    pub hash: String,
    /// Where to put the file.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub node: NodeArgs,
}

#[derive(Args, Debug)]
pub struct SplitArgs {
    /// The GGUF model (default: the cached default model, see scripts/fetch-model.sh).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Output directory (created).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of shards, cut where their bytes balance (the last one carries the output head).
    #[arg(long, conflicts_with = "ranges")]
    pub shards: Option<u32>,
    /// What `--shards` balances: `bytes` (memory; the default),
    /// `compute` (weights counted in elements, the head on the last shard:
    /// the stages of a pipeline then take about as long per token) or
    /// `measured` (each layer and the head timed with llama.cpp here, in
    /// steps of `--measure-sessions` sessions on one thread: loads the
    /// whole model once).
    #[arg(long, value_enum, default_value_t = Balance::Bytes, requires = "shards")]
    pub balance: Balance,
    /// With `--balance measured`: the sessions a stage decodes in one step
    /// when busy, about the concurrent requests ÷ the stages (a stage runs
    /// its sessions in as many blocks as the route has stages). The head
    /// costs about the same per step however many sessions it holds, so
    /// fewer sessions move the cut towards the last shard.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub measure_sessions: u32,
    /// Explicit layer ranges, e.g. 0-9,10-19,20-29.
    #[arg(long, value_delimiter = ',')]
    pub ranges: Vec<String>,
    /// Model name used in requests (default: from the file name).
    #[arg(long)]
    pub name: Option<String>,
}

/// What `split --shards` balances.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    Bytes,
    Compute,
    Measured,
}

/// Node options; each overrides the config file and `LLAMA_CLUSTER_*` env.
#[derive(Args, Debug, Default, Clone)]
pub struct NodeArgs {
    /// TOML configuration file.
    #[arg(long, env = "LLAMA_CLUSTER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Cluster name [default: llama-cluster].
    #[arg(long)]
    pub cluster: Option<String>,
    /// IP address for the P2P listeners [default: 0.0.0.0].
    #[arg(long)]
    pub p2p_host: Option<String>,
    /// Port for the P2P listeners, TCP and QUIC [default: 0 = any].
    #[arg(long)]
    pub p2p_port: Option<String>,
    /// Disable QUIC (TCP only).
    #[arg(long)]
    pub no_quic: bool,
    /// Bootstrap multiaddrs (comma-separated or repeated).
    #[arg(long)]
    pub bootstrap: Vec<String>,
    /// Addresses to announce (comma-separated or repeated).
    #[arg(long)]
    pub external_addrs: Vec<String>,
    /// gRPC address host:port [default: 127.0.0.1:50051].
    #[arg(long)]
    pub grpc_addr: Option<String>,
    /// File holding the node identity (created when missing).
    #[arg(long)]
    pub identity_file: Option<String>,
    /// Shard id to announce.
    #[arg(long)]
    pub shard_id: Option<String>,
    /// Model name of the announced shard.
    #[arg(long)]
    pub shard_model: Option<String>,
    /// Layer range of the announced shard, START-END.
    #[arg(long)]
    pub shard_layers: Option<String>,
    /// Seconds between [STATUS] reports.
    #[arg(long)]
    pub status_interval_secs: Option<String>,
    /// Seconds between safety-net discovery rounds.
    #[arg(long)]
    pub discovery_interval_secs: Option<String>,
    /// DHT record lifetime in seconds.
    #[arg(long)]
    pub record_ttl_secs: Option<String>,
    /// Largest JSON request accepted, in bytes.
    #[arg(long)]
    pub max_message_bytes: Option<String>,
    /// Timeout of one P2P request, in seconds.
    #[arg(long)]
    pub request_timeout_secs: Option<String>,
    /// Log format: text or json.
    #[arg(long)]
    pub log_format: Option<String>,
    /// Shorthand for --log-format json.
    #[arg(long)]
    pub json_logs: bool,
    /// Split manifest (manifest.json from `llama-worker split`).
    #[arg(long)]
    pub manifest: Option<String>,
    /// Context length of one session.
    #[arg(long)]
    pub n_ctx: Option<String>,
    /// Prompt chunk size (equal on all workers).
    #[arg(long)]
    pub n_batch: Option<String>,
    /// llama.cpp physical batch (equal on all workers).
    #[arg(long)]
    pub n_ubatch: Option<String>,
    /// llama.cpp threads (0: all cores).
    #[arg(long)]
    pub threads: Option<String>,
    /// Async runtime threads: networking and gRPC (0: one per core).
    #[arg(long)]
    pub runtime_threads: Option<String>,
    /// Concurrent sessions per worker (0: as many as memory holds).
    #[arg(long)]
    pub max_sessions: Option<String>,
    /// Idle sessions are evicted after this many seconds.
    #[arg(long)]
    pub session_idle_secs: Option<String>,
    /// A session without a step for this many seconds is freed.
    #[arg(long)]
    pub session_lease_secs: Option<String>,
    /// Routes a request may move to when stages fail.
    #[arg(long)]
    pub max_reroutes: Option<String>,
    /// Seconds a request may wait for free capacity.
    #[arg(long)]
    pub queue_timeout_secs: Option<String>,
    /// Requests that may wait for capacity at once.
    #[arg(long)]
    pub max_queued: Option<String>,
    /// Time one pipeline step may take, in seconds.
    #[arg(long)]
    pub stage_timeout_secs: Option<String>,
    /// Seconds a gRPC client may leave the server's HTTP/2 pings unanswered
    /// before its connection is closed and its requests cancelled.
    #[arg(long)]
    pub client_timeout_secs: Option<String>,
    /// The cluster key file (`llama-worker keygen`): only peers that prove
    /// the key are served.
    #[arg(long, env = "LLAMA_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<String>,
    /// Send hidden states as f16 (half the bytes; not bit-exact).
    #[arg(long)]
    pub activation_f16: bool,
    /// Cache directory for downloaded files.
    #[arg(long)]
    pub cache_dir: Option<String>,
    /// Prometheus /metrics address host:port (empty: off).
    #[arg(long)]
    pub metrics_addr: Option<String>,
    /// Memory offered for shards, in MB (0: the machine's total).
    #[arg(long)]
    pub memory_mb: Option<String>,
    /// OTLP/gRPC endpoint for traces, e.g. http://127.0.0.1:4317 (empty: off
    /// unless OTEL_EXPORTER_OTLP_ENDPOINT is set).
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// Trace every N-th decode step in detail (1: all, 0: none).
    #[arg(long)]
    pub trace_decode_every: Option<String>,
    /// Do not seed the manifest's files found on this disk.
    #[arg(long)]
    pub no_seed_manifest: bool,
    /// Upload rate limit for seeding, MB/s over all peers (0: unlimited).
    #[arg(long)]
    pub upload_limit_mb_per_sec: Option<String>,
    /// Disk space in MB a shard's fetch leaves free (refused before it starts).
    #[arg(long)]
    pub min_free_disk_mb: Option<String>,
    /// Serve no pieces of a file before it is complete (no partial seeding).
    #[arg(long)]
    pub no_partial_seeding: bool,
    /// Run a stage's sessions in one wave even on a route of several stages
    /// (no pipelining across sessions).
    #[arg(long)]
    pub no_pipeline_waves: bool,
    /// Test only: serve corrupted pieces.
    #[arg(long, hide = true)]
    pub test_corrupt_pieces: bool,
    /// Test only: serve corrupted pieces with metadata that matches them.
    #[arg(long, hide = true)]
    pub test_lying_meta: bool,
    /// Test only: serve metadata whose size is one byte short.
    #[arg(long, hide = true)]
    pub test_wrong_size_meta: bool,
    /// Test only: delay each served piece (ms).
    #[arg(long, hide = true)]
    pub test_piece_delay_ms: Option<String>,
    /// Test only: answer the first N piece requests with busy.
    #[arg(long, hide = true)]
    pub test_busy_pieces: Option<String>,
    /// Test only: listen on QUIC alone (peers cannot reach it over TCP).
    #[arg(long, hide = true)]
    pub test_no_tcp_listen: bool,
}

impl NodeArgs {
    pub fn overrides(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![];
        let mut opt = |k: &'static str, val: &Option<String>| {
            if let Some(x) = val {
                v.push((k, x.clone()));
            }
        };
        opt("cluster", &self.cluster);
        opt("p2p_host", &self.p2p_host);
        opt("p2p_port", &self.p2p_port);
        opt("grpc_addr", &self.grpc_addr);
        opt("identity_file", &self.identity_file);
        opt("shard_id", &self.shard_id);
        opt("shard_model", &self.shard_model);
        opt("shard_layers", &self.shard_layers);
        opt("status_interval_secs", &self.status_interval_secs);
        opt("discovery_interval_secs", &self.discovery_interval_secs);
        opt("record_ttl_secs", &self.record_ttl_secs);
        opt("max_message_bytes", &self.max_message_bytes);
        opt("request_timeout_secs", &self.request_timeout_secs);
        opt("log_format", &self.log_format);
        opt("manifest", &self.manifest);
        opt("cache_dir", &self.cache_dir);
        opt("metrics_addr", &self.metrics_addr);
        opt("otlp_endpoint", &self.otlp_endpoint);
        opt("memory_mb", &self.memory_mb);
        opt("trace_decode_every", &self.trace_decode_every);
        opt("test_piece_delay_ms", &self.test_piece_delay_ms);
        opt("test_busy_pieces", &self.test_busy_pieces);
        opt("n_ctx", &self.n_ctx);
        opt("n_batch", &self.n_batch);
        opt("n_ubatch", &self.n_ubatch);
        opt("threads", &self.threads);
        opt("runtime_threads", &self.runtime_threads);
        opt("upload_limit_mb_per_sec", &self.upload_limit_mb_per_sec);
        opt("min_free_disk_mb", &self.min_free_disk_mb);
        opt("max_sessions", &self.max_sessions);
        opt("session_idle_secs", &self.session_idle_secs);
        opt("session_lease_secs", &self.session_lease_secs);
        opt("max_reroutes", &self.max_reroutes);
        opt("queue_timeout_secs", &self.queue_timeout_secs);
        opt("max_queued", &self.max_queued);
        opt("stage_timeout_secs", &self.stage_timeout_secs);
        opt("client_timeout_secs", &self.client_timeout_secs);
        opt("cluster_key_file", &self.cluster_key_file);
        if self.activation_f16 {
            v.push(("activation_f16", "true".into()));
        }
        if self.no_pipeline_waves {
            v.push(("pipeline_waves", "false".into()));
        }
        if self.no_partial_seeding {
            v.push(("partial_seeding", "false".into()));
        }
        if self.no_seed_manifest {
            v.push(("seed_manifest", "false".into()));
        }
        if self.test_wrong_size_meta {
            v.push(("test_wrong_size_meta", "true".into()));
        }
        if self.test_lying_meta {
            v.push(("test_lying_meta", "true".into()));
        }
        if self.test_no_tcp_listen {
            v.push(("test_no_tcp_listen", "true".into()));
        }
        if self.test_corrupt_pieces {
            v.push(("test_corrupt_pieces", "true".into()));
        }
        if self.no_quic {
            v.push(("quic", "false".into()));
        }
        if self.json_logs {
            v.push(("log_format", "json".into()));
        }
        if !self.bootstrap.is_empty() {
            v.push(("bootstrap", self.bootstrap.join(",")));
        }
        if !self.external_addrs.is_empty() {
            v.push(("external_addrs", self.external_addrs.join(",")));
        }
        v
    }

    pub fn load(&self) -> anyhow::Result<NodeConfig> {
        let env: HashMap<String, String> = std::env::vars().collect();
        Ok(NodeConfig::load(
            self.config.as_deref(),
            &env,
            &self.overrides(),
        )?)
    }
}

#[derive(Args, Debug)]
pub struct SendArgs {
    /// Multiaddr of the node (QUIC or TCP; /p2p/<id> optional).
    #[arg(long)]
    pub addr: String,
    /// Raw JSON body to send as-is.
    #[arg(long, conflicts_with_all = ["message", "command"])]
    pub json: Option<String>,
    /// Send a plain message with this text.
    #[arg(long, conflicts_with = "command")]
    pub message: Option<String>,
    /// Send this command (GET_STATUS, LOAD_SHARD, ...).
    #[arg(long)]
    pub command: Option<String>,
    /// JSON params of the command.
    #[arg(long, default_value = "{}")]
    pub params: String,
    /// Timeout in seconds.
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
    /// The cluster key file, for a keyed cluster.
    #[arg(long, env = "LLAMA_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<PathBuf>,
    /// The cluster's name (the key handshake is bound to it).
    #[arg(long, env = "LLAMA_CLUSTER_CLUSTER", default_value = "llama-cluster")]
    pub cluster: String,
}
