//! `llama-worker`: run a worker, a bootstrap (rendezvous) node, or send one
//! JSON message/command to a node.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use libp2p::Multiaddr;
use llama_cluster_engine::split::{SplitPlan, split_model};
use llama_cluster_shared::config::NodeConfig;
use llama_cluster_shared::{logging, telemetry};
use llama_worker::client::JsonClient;
use llama_worker::network::behaviour::Role;
use llama_worker::{READY_PREFIX, grpc, startup};
use serde_json::json;
use tracing::{error, info, warn};

mod cli;
use cli::{Cli, Cmd, FetchArgs, KeygenArgs, SendArgs, SplitArgs};

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
    let client_timeout = std::time::Duration::from_secs(cfg.client_timeout_secs);
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
        client_timeout,
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
            m.stage_batch_max.set(pipeline.max_batch() as i64);
            m.stage_micro_batches.set(pipeline.micro_batches() as i64);
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

/// A split writes at least the model's bytes (every tensor once, the
/// embeddings once more in the head file): refused up front when the disk
/// of `out` has less free.
fn check_split_room(model: &std::path::Path, out: &std::path::Path) -> anyhow::Result<()> {
    let size = std::fs::metadata(model)
        .with_context(|| format!("cannot read {}", model.display()))?
        .len();
    let Some(dir) = out.ancestors().find(|d| d.is_dir()) else {
        return Ok(());
    };
    let dir = if dir.as_os_str().is_empty() {
        std::path::Path::new(".")
    } else {
        dir
    };
    let free = llama_worker::torrent::disk_space::available(dir)
        .with_context(|| format!("free space of {}", dir.display()))?;
    if free < size {
        anyhow::bail!(
            "not enough disk space in {}: the split needs at least {:.1} MB (the model's size), {:.1} MB are free",
            dir.display(),
            size as f64 / 1e6,
            free as f64 / 1e6
        );
    }
    Ok(())
}

async fn split(a: SplitArgs) -> anyhow::Result<()> {
    logging::init(llama_cluster_shared::config::LogFormat::Text);
    let model = match a.model {
        Some(m) => m,
        None => default_model_path()?,
    };
    let plan = match (a.shards, a.ranges.is_empty()) {
        (Some(n), true) if a.balance == cli::Balance::Compute => SplitPlan::ComputeCount(n),
        (Some(n), true) if a.balance == cli::Balance::Measured => SplitPlan::Measured {
            shards: n,
            sessions: a.measure_sessions,
        },
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
    check_split_room(&model, &out)?;
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
