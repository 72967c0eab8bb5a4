//! `llama-worker`: run a worker, a bootstrap (rendezvous) node, or send one
//! JSON message/command to a node.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use libp2p::Multiaddr;
use llama_cluster_engine::split::{SplitPlan, split_model};
use llama_cluster_shared::config::NodeConfig;
use llama_cluster_shared::{logging, telemetry};
use llama_worker::client::JsonClient;
use llama_worker::network::behaviour::Role;
use llama_worker::{READY_PREFIX, grpc, startup};
use serde_json::json;
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(name = "llama-worker", version, about = "llama-cluster worker node")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
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
struct KeygenArgs {
    /// Where to write the key (mode 0600).
    #[arg(long, default_value = "cluster.key")]
    out: PathBuf,
    /// Replace an existing file.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
struct FetchArgs {
    /// BLAKE3 hash of the file (as in a split manifest).
    #[arg(long)]
    hash: String,
    /// Where to put the file.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Args, Debug)]
struct SplitArgs {
    /// The GGUF model (default: the cached default model, see scripts/fetch-model.sh).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Output directory (created).
    #[arg(long)]
    out: PathBuf,
    /// Number of shards, cut where their bytes balance (the last one carries the output head).
    #[arg(long, conflicts_with = "ranges")]
    shards: Option<u32>,
    /// Explicit layer ranges, e.g. 0-9,10-19,20-29.
    #[arg(long, value_delimiter = ',')]
    ranges: Vec<String>,
    /// Model name used in requests (default: from the file name).
    #[arg(long)]
    name: Option<String>,
}

/// Node options; each overrides the config file and `LLAMA_CLUSTER_*` env.
#[derive(Args, Debug, Default, Clone)]
struct NodeArgs {
    /// TOML configuration file.
    #[arg(long, env = "LLAMA_CLUSTER_CONFIG")]
    config: Option<PathBuf>,
    /// Cluster name [default: llama-cluster].
    #[arg(long)]
    cluster: Option<String>,
    /// IP address for the P2P listeners [default: 0.0.0.0].
    #[arg(long)]
    p2p_host: Option<String>,
    /// Port for the P2P listeners, TCP and QUIC [default: 0 = any].
    #[arg(long)]
    p2p_port: Option<String>,
    /// Disable QUIC (TCP only).
    #[arg(long)]
    no_quic: bool,
    /// Bootstrap multiaddrs (comma-separated or repeated).
    #[arg(long)]
    bootstrap: Vec<String>,
    /// Addresses to announce (comma-separated or repeated).
    #[arg(long)]
    external_addrs: Vec<String>,
    /// gRPC address host:port [default: 127.0.0.1:50051].
    #[arg(long)]
    grpc_addr: Option<String>,
    /// File holding the node identity (created when missing).
    #[arg(long)]
    identity_file: Option<String>,
    /// Shard id to announce.
    #[arg(long)]
    shard_id: Option<String>,
    /// Model name of the announced shard.
    #[arg(long)]
    shard_model: Option<String>,
    /// Layer range of the announced shard, START-END.
    #[arg(long)]
    shard_layers: Option<String>,
    /// Seconds between [STATUS] reports.
    #[arg(long)]
    status_interval_secs: Option<String>,
    /// Seconds between safety-net discovery rounds.
    #[arg(long)]
    discovery_interval_secs: Option<String>,
    /// DHT record lifetime in seconds.
    #[arg(long)]
    record_ttl_secs: Option<String>,
    /// Largest JSON request accepted, in bytes.
    #[arg(long)]
    max_message_bytes: Option<String>,
    /// Timeout of one P2P request, in seconds.
    #[arg(long)]
    request_timeout_secs: Option<String>,
    /// Log format: text or json.
    #[arg(long)]
    log_format: Option<String>,
    /// Shorthand for --log-format json.
    #[arg(long)]
    json_logs: bool,
    /// Split manifest (manifest.json from `llama-worker split`).
    #[arg(long)]
    manifest: Option<String>,
    /// Context length of one session.
    #[arg(long)]
    n_ctx: Option<String>,
    /// Prompt chunk size (equal on all workers).
    #[arg(long)]
    n_batch: Option<String>,
    /// llama.cpp physical batch (equal on all workers).
    #[arg(long)]
    n_ubatch: Option<String>,
    /// llama.cpp threads (0: all cores).
    #[arg(long)]
    threads: Option<String>,
    /// Async runtime threads: networking and gRPC (0: one per core).
    #[arg(long)]
    runtime_threads: Option<String>,
    /// Concurrent sessions per worker (0: as many as memory holds).
    #[arg(long)]
    max_sessions: Option<String>,
    /// Idle sessions are evicted after this many seconds.
    #[arg(long)]
    session_idle_secs: Option<String>,
    /// A session without a step for this many seconds is freed.
    #[arg(long)]
    session_lease_secs: Option<String>,
    /// Routes a request may move to when stages fail.
    #[arg(long)]
    max_reroutes: Option<String>,
    /// Seconds a request may wait for free capacity.
    #[arg(long)]
    queue_timeout_secs: Option<String>,
    /// Requests that may wait for capacity at once.
    #[arg(long)]
    max_queued: Option<String>,
    /// Time one pipeline step may take, in seconds.
    #[arg(long)]
    stage_timeout_secs: Option<String>,
    /// The cluster key file (`llama-worker keygen`): only peers that prove
    /// the key are served.
    #[arg(long, env = "LLAMA_CLUSTER_KEY_FILE")]
    cluster_key_file: Option<String>,
    /// Send hidden states as f16 (half the bytes; not bit-exact).
    #[arg(long)]
    activation_f16: bool,
    /// Cache directory for downloaded files.
    #[arg(long)]
    cache_dir: Option<String>,
    /// Prometheus /metrics address host:port (empty: off).
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Memory offered for shards, in MB (0: the machine's total).
    #[arg(long)]
    memory_mb: Option<String>,
    /// OTLP/gRPC endpoint for traces, e.g. http://127.0.0.1:4317 (empty: off
    /// unless OTEL_EXPORTER_OTLP_ENDPOINT is set).
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Trace every N-th decode step in detail (1: all, 0: none).
    #[arg(long)]
    trace_decode_every: Option<String>,
    /// Do not seed the manifest's files found on this disk.
    #[arg(long)]
    no_seed_manifest: bool,
    /// Upload rate limit for seeding, MB/s over all peers (0: unlimited).
    #[arg(long)]
    upload_limit_mb_per_sec: Option<String>,
    /// Serve no pieces of a file before it is complete (no partial seeding).
    #[arg(long)]
    no_partial_seeding: bool,
    /// Test only: serve corrupted pieces.
    #[arg(long, hide = true)]
    test_corrupt_pieces: bool,
    /// Test only: serve corrupted pieces with metadata that matches them.
    #[arg(long, hide = true)]
    test_lying_meta: bool,
    /// Test only: serve metadata whose size is one byte short.
    #[arg(long, hide = true)]
    test_wrong_size_meta: bool,
    /// Test only: delay each served piece (ms).
    #[arg(long, hide = true)]
    test_piece_delay_ms: Option<String>,
    /// Test only: answer the first N piece requests with busy.
    #[arg(long, hide = true)]
    test_busy_pieces: Option<String>,
    /// Test only: listen on QUIC alone (peers cannot reach it over TCP).
    #[arg(long, hide = true)]
    test_no_tcp_listen: bool,
}

impl NodeArgs {
    fn overrides(&self) -> Vec<(&'static str, String)> {
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
        opt("max_sessions", &self.max_sessions);
        opt("session_idle_secs", &self.session_idle_secs);
        opt("session_lease_secs", &self.session_lease_secs);
        opt("max_reroutes", &self.max_reroutes);
        opt("queue_timeout_secs", &self.queue_timeout_secs);
        opt("max_queued", &self.max_queued);
        opt("stage_timeout_secs", &self.stage_timeout_secs);
        opt("cluster_key_file", &self.cluster_key_file);
        if self.activation_f16 {
            v.push(("activation_f16", "true".into()));
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

    fn load(&self) -> anyhow::Result<NodeConfig> {
        let env: HashMap<String, String> = std::env::vars().collect();
        Ok(NodeConfig::load(
            self.config.as_deref(),
            &env,
            &self.overrides(),
        )?)
    }
}

#[derive(Args, Debug)]
struct SendArgs {
    /// Multiaddr of the node (QUIC or TCP; /p2p/<id> optional).
    #[arg(long)]
    addr: String,
    /// Raw JSON body to send as-is.
    #[arg(long, conflicts_with_all = ["message", "command"])]
    json: Option<String>,
    /// Send a plain message with this text.
    #[arg(long, conflicts_with = "command")]
    message: Option<String>,
    /// Send this command (GET_STATUS, LOAD_SHARD, ...).
    #[arg(long)]
    command: Option<String>,
    /// JSON params of the command.
    #[arg(long, default_value = "{}")]
    params: String,
    /// Timeout in seconds.
    #[arg(long, default_value_t = 10)]
    timeout_secs: u64,
    /// The cluster key file, for a keyed cluster.
    #[arg(long, env = "LLAMA_CLUSTER_KEY_FILE")]
    cluster_key_file: Option<PathBuf>,
    /// The cluster's name (the key handshake is bound to it).
    #[arg(long, env = "LLAMA_CLUSTER_CLUSTER", default_value = "llama-cluster")]
    cluster: String,
}

fn main() -> ExitCode {
    llama_worker::allocator::tune();
    let cli = Cli::parse();
    // A node's configuration is read first: it sizes the runtime.
    let node = match &cli.command {
        None => Some((&cli.node, Role::Worker)),
        Some(Cmd::Run(a)) => Some((a, Role::Worker)),
        Some(Cmd::Bootstrap(a)) => Some((a, Role::Bootstrap)),
        _ => None,
    };
    let node = match node
        .map(|(a, role)| a.load().map(|cfg| (cfg, role)))
        .transpose()
    {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some((cfg, _)) = &node
        && cfg.runtime_threads > 0
    {
        b.worker_threads(cfg.runtime_threads as usize);
    }
    let rt = match b.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        if let Some((cfg, role)) = node {
            return run_node(cfg, role).await;
        }
        match cli.command {
            None | Some(Cmd::Run(_)) | Some(Cmd::Bootstrap(_)) => Ok(()),
            Some(Cmd::Send(a)) => send(a).await,
            Some(Cmd::Split(a)) => split(a).await,
            Some(Cmd::Fetch(a)) => fetch(a).await,
            Some(Cmd::Keygen(a)) => keygen(a),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn keygen(a: KeygenArgs) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = llama_worker::network::membership::ClusterKey::generate()?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .create_new(!a.force)
        .truncate(true)
        .mode(0o600)
        .open(&a.out)
        .with_context(|| {
            format!(
                "cannot create {} (it exists? --force replaces it)",
                a.out.display()
            )
        })?;
    f.write_all(key.to_file_text().as_bytes())
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    eprintln!(
        "wrote a new cluster key to {}; start every member with --cluster-key-file {} (or LLAMA_CLUSTER_KEY_FILE)",
        a.out.display(),
        a.out.display()
    );
    Ok(())
}

async fn run_node(mut cfg: NodeConfig, role: Role) -> anyhow::Result<()> {
    // Certificates are checked before anything starts.
    let tls = llama_cluster_shared::tls::ServerTls::load(&cfg.tls_cert_file, &cfg.tls_key_file)?;
    // Bound before the node starts, so its status names a reachable address.
    let grpc_listener = grpc::bind(&cfg.grpc_addr).await?;
    cfg.grpc_addr = grpc::advertised(
        grpc_listener.local_addr()?,
        &cfg.external_addrs,
        &cfg.p2p_host,
    );
    let keypair = llama_worker::identity::load_or_create(&cfg.identity_file)?;
    let telemetry = telemetry::init(
        cfg.log_format,
        &telemetry::TraceSettings {
            otlp_endpoint: cfg.otlp_endpoint.clone(),
            service: match role {
                Role::Bootstrap => "llama-bootstrap".into(),
                Role::Worker => "llama-worker".into(),
            },
            instance: keypair.public().to_peer_id().to_string(),
        },
    )?;
    let cluster = cfg.cluster.clone();
    let startup_shard =
        (!cfg.shard_id.is_empty() && !cfg.manifest.is_empty()).then(|| cfg.shard_id.clone());
    let seed_manifest = cfg.seed_manifest;
    let metrics_addr = cfg.metrics_addr.clone();
    info!(
        "[STATUS] async runtime threads: {} (llama.cpp runs on its own)",
        tokio::runtime::Handle::current().metrics().num_workers()
    );
    let tokens = llama_cluster_shared::auth::Tokens::load(
        &cfg.admin_token,
        &cfg.admin_token_file,
        &cfg.api_token,
        &cfg.api_token_file,
    )?;
    if !tokens.has_admin() {
        warn!(
            "[STATUS] no admin token (admin_token_file or LLAMA_CLUSTER_ADMIN_TOKEN): anyone who reaches the gRPC port can load and unload shards"
        );
    }
    let running = startup::start(cfg, role, keypair).await?;
    running.torrents.announce_all();
    let pipeline = running.pipeline.clone();
    tokio::spawn(async move {
        if seed_manifest {
            pipeline.seed_manifest_files().await;
        }
        if let Some(shard) = startup_shard
            && let Err(e) = pipeline.load_shard(&shard, None).await
        {
            error!("[SHARD] {e}");
        }
    });
    let (bound, server) = grpc::serve(
        grpc_listener,
        running.dispatcher.clone(),
        running.net.clone(),
        running.peer_id,
        tokens,
        tls.as_ref(),
    )
    .await?;
    let mut metrics_bound = String::new();
    if !metrics_addr.is_empty() {
        let state = running.state.clone();
        let pipeline = running.pipeline.clone();
        let refresh = move || {
            let m = llama_worker::metrics::metrics();
            m.active_sessions.set(pipeline.active_sessions() as i64);
            m.queue_depth.set(pipeline.queue_depth() as i64);
            m.max_sessions.set(pipeline.max_sessions() as i64);
            m.stage_decode_calls.set(pipeline.decode_calls() as i64);
            m.stage_busy.set(pipeline.busy_seconds());
            let snap = state.snapshot();
            m.dht_shard_records.set(snap.shards.len() as i64);
            for t in ["QUIC", "TCP"] {
                let n = snap
                    .peers
                    .iter()
                    .filter(|p| p.transport.as_str() == t)
                    .count();
                m.peers
                    .get_or_create(&llama_worker::metrics::TransportLabel {
                        transport: t.into(),
                    })
                    .set(n as i64);
            }
        };
        let (bound, server) = llama_worker::metrics::serve(&metrics_addr, refresh).await?;
        info!("[STATUS] Prometheus metrics on http://{bound}/metrics");
        metrics_bound = bound.to_string();
        tokio::spawn(async move {
            if let Err(e) = server.await {
                error!("metrics server: {e}");
            }
        });
    }
    let ready = json!({
        "metrics_addr": metrics_bound,
        "role": role.as_str(),
        "peer_id": running.peer_id.to_string(),
        "cluster": cluster,
        "grpc_addr": bound.to_string(),
        "listen_addrs": running.listen_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
    });
    println!("{READY_PREFIX}{ready}");
    let mut task = running.task;
    tokio::select! {
        r = server => { r?; }
        _ = &mut task => anyhow::bail!("the swarm task stopped"),
        _ = shutdown_signal() => info!("[STATUS] shutting down"),
    }
    task.abort();
    telemetry.flush();
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                error!("cannot watch SIGTERM: {e}");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn send(a: SendArgs) -> anyhow::Result<()> {
    let addr: Multiaddr = a
        .addr
        .parse()
        .with_context(|| format!("--addr {:?}", a.addr))?;
    let body = if let Some(raw) = a.json {
        raw.into_bytes()
    } else if let Some(text) = a.message {
        serde_json::to_vec(
            &json!({"from": "llama-worker-send", "message": text, "timestamp": llama_cluster_shared::unix_now()}),
        )?
    } else if let Some(cmd) = a.command {
        let params: serde_json::Value =
            serde_json::from_str(&a.params).context("--params is not JSON")?;
        serde_json::to_vec(
            &json!({"command": cmd, "from": "llama-worker-send", "request_id": "cli-1", "params": params}),
        )?
    } else {
        anyhow::bail!("give one of --json, --message or --command");
    };
    let key = a
        .cluster_key_file
        .as_deref()
        .map(llama_worker::network::membership::ClusterKey::load)
        .transpose()?;
    let mut client =
        JsonClient::connect_with(&addr, Duration::from_secs(a.timeout_secs), key, &a.cluster)
            .await?;
    let resp = client.request(body).await?;
    println!("{}", String::from_utf8_lossy(&resp));
    Ok(())
}

async fn split(a: SplitArgs) -> anyhow::Result<()> {
    logging::init(llama_cluster_shared::config::LogFormat::Text);
    let model = match a.model {
        Some(m) => m,
        None => default_model_path()?,
    };
    let plan = match (a.shards, a.ranges.is_empty()) {
        (Some(n), true) => SplitPlan::Count(n),
        (None, false) => SplitPlan::Ranges(
            a.ranges
                .iter()
                .map(|r| Ok(llama_cluster_shared::config::parse_layer_range(r)?))
                .collect::<anyhow::Result<Vec<_>>>()?,
        ),
        (None, true) => SplitPlan::Count(2),
        (Some(_), false) => anyhow::bail!("give --shards or --ranges, not both"),
    };
    let out = a.out.clone();
    let name = a.name.clone();
    let m = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut m = split_model(&model, &out, &plan, name.as_deref())?;
        // Pin every file's torrent metadata: a peer that lies about piece
        // hashes is refused before any piece is fetched from it.
        let pin = |f: &mut llama_cluster_engine::manifest::FileEntry| -> anyhow::Result<()> {
            let meta =
                llama_worker::torrent::meta::TorrentMeta::from_file(&out.join(&f.file), &f.file)?;
            f.pieces_hash = meta.pieces_hash();
            Ok(())
        };
        pin(&mut m.head)?;
        for s in &mut m.shards {
            pin(&mut s.file)?;
        }
        m.save(&out.join(llama_cluster_engine::manifest::MANIFEST_FILE))?;
        Ok(m)
    })
    .await??;
    println!(
        "model {} ({}, {} layers) split into {} shards in {}:",
        m.model,
        m.architecture,
        m.n_layer,
        m.shards.len(),
        a.out.display()
    );
    println!("  head   {:<44} {:>10} bytes", m.head.file, m.head.size);
    for s in &m.shards {
        println!(
            "  {:<6} {:<44} {:>10} bytes  layers {}-{}  id {}",
            s.index, s.file.file, s.file.size, s.layer_start, s.layer_end, s.id
        );
    }
    println!(
        "manifest: {}",
        a.out
            .join(llama_cluster_engine::manifest::MANIFEST_FILE)
            .display()
    );
    Ok(())
}

/// The default model in the cache (fetched by scripts/fetch-model.sh).
fn default_model_path() -> anyhow::Result<PathBuf> {
    let p = llama_cluster_engine::default_model_path();
    if !p.is_file() {
        anyhow::bail!(
            "{} is missing: run scripts/fetch-model.sh or give --model",
            p.display()
        );
    }
    Ok(p)
}

async fn fetch(a: FetchArgs) -> anyhow::Result<()> {
    let cfg = a.node.load()?;
    logging::init(cfg.log_format);
    if cfg.bootstrap.is_empty() {
        anyhow::bail!("give --bootstrap: the address of any node of the cluster");
    }
    let keypair = llama_worker::identity::load_or_create(&cfg.identity_file)?;
    // This process exits after the copy: it must not announce itself as a
    // provider that will be gone in a moment.
    let running = startup::start_with(cfg, Role::Worker, keypair, false).await?;
    // Bounded wait for the swarm.
    let t0 = std::time::Instant::now();
    while running.state.read(|s| s.connections.is_empty()) {
        if t0.elapsed() > Duration::from_secs(20) {
            anyhow::bail!("could not reach any node within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let torrents = running.torrents.clone();
    let hash = a.hash.clone();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .progress_chars("=> "),
    );
    let download = tokio::spawn(async move { torrents.fetch(&hash).await });
    let path = loop {
        if download.is_finished() {
            break download.await??;
        }
        if let Some(p) = running
            .torrents
            .progress()
            .into_iter()
            .find(|p| p.file_hash == a.hash)
        {
            bar.set_length(p.total_bytes);
            bar.set_position(p.verified_bytes);
            bar.set_message(format!("{} ({} peers)", p.name, p.peers));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    bar.finish();
    let tmp = a.out.with_extension("part");
    std::fs::copy(&path, &tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &a.out)?;
    println!("{} -> {}", a.hash, a.out.display());
    running.task.abort();
    Ok(())
}
