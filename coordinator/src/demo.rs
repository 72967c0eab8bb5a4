//! `llama-coordinator demo`: the whole thing on one machine. Splits the
//! model (cached), starts a bootstrap node, the workers (only worker 0 has
//! the split) and `llama-coordinator serve` as separate processes on
//! 127.0.0.x; the coordinator places the shards (workers fetch them through
//! the swarm); once SWARM_READY, the answer to a prompt streams through the
//! coordinator and the pipeline; prints the cluster table, the placement and
//! timings, and stops every process.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use llama_cluster_proto::v1::GetClusterStatusRequest;
use llama_cluster_proto::v1::InferenceRequest;
use llama_cluster_proto::v1::coordinator_client::CoordinatorClient;
use llama_cluster_proto::v1::inference_response::Event;

use crate::placer::assignment_lines;
use crate::status_table::{fetch_status, render, status_rows};

/// Ready-line prefix printed by `llama-worker` (kept in sync with the worker crate).
const READY_PREFIX: &str = "LLAMA_CLUSTER_READY ";

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub model: Option<PathBuf>,
    pub workers: usize,
    pub shards: usize,
    pub replicas: usize,
    pub prompt: String,
    pub max_tokens: u32,
    pub keep_running: bool,
}

/// A child process killed on drop.
struct Proc {
    child: Child,
    peer_id: String,
    grpc_addr: String,
    quic_addr: String,
    http_addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn worker_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let path = me.with_file_name("llama-worker");
    if !path.exists() {
        bail!(
            "{} not found next to the coordinator: build the workspace first (cargo build --bins)",
            path.display()
        );
    }
    Ok(path)
}

fn cache_dir() -> anyhow::Result<PathBuf> {
    std::env::var_os("LLAMA_CLUSTER_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/llama-cluster")))
        .context("no HOME and no LLAMA_CLUSTER_CACHE")
}

fn spawn(bin: &Path, args: &[String], log: &Path, timeout: Duration) -> anyhow::Result<Proc> {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix(READY_PREFIX) {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    let ready = match rx.recv_timeout(timeout) {
        Ok(r) => r,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} did not start within {timeout:?}; see {}",
                bin.display(),
                log.display()
            );
        }
    };
    let v: serde_json::Value = serde_json::from_str(&ready)?;
    let quic_addr = v["listen_addrs"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .filter_map(|x| x.as_str())
                .find(|a| a.contains("/quic-v1"))
        })
        .unwrap_or_default()
        .to_string();
    Ok(Proc {
        peer_id: v["peer_id"].as_str().unwrap_or_default().to_string(),
        grpc_addr: v["grpc_addr"].as_str().unwrap_or_default().to_string(),
        http_addr: v["http_addr"].as_str().unwrap_or_default().to_string(),
        quic_addr,
        child,
    })
}

/// Splits the model once into the cache (re-used while the source is unchanged).
fn split_cached(
    bin: &Path,
    model: &Path,
    shards: usize,
    cache: &Path,
) -> anyhow::Result<(PathBuf, Vec<String>)> {
    let stem = model
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let size = std::fs::metadata(model)
        .with_context(|| format!("{} is missing", model.display()))?
        .len();
    let dir = cache.join("splits").join(format!("{stem}-{size}-{shards}"));
    let manifest = dir.join("manifest.json");
    if !manifest.is_file() {
        println!("splitting {} into {shards} shards …", model.display());
        let st = Command::new(bin)
            .args(["split", "--model"])
            .arg(model)
            .arg("--out")
            .arg(&dir)
            .args(["--shards", &shards.to_string()])
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("llama-worker split failed ({st})");
        }
    }
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest)?)?;
    let ids = m["shards"]
        .as_array()
        .ok_or_else(|| anyhow!("bad manifest {}", manifest.display()))?
        .iter()
        .filter_map(|s| s["id"].as_str().map(String::from))
        .collect();
    Ok((manifest, ids))
}

/// Runs the demo.
pub async fn run(o: DemoOptions) -> anyhow::Result<()> {
    if o.workers == 0 || o.workers > 30 {
        bail!("--workers must be between 1 and 30");
    }
    if o.shards == 0 || o.shards > 30 {
        bail!("--shards must be between 1 and 30");
    }
    if o.replicas == 0 || o.shards * o.replicas > o.workers {
        bail!(
            "{} shards x {} replicas need at least {} workers; --workers is {}",
            o.shards,
            o.replicas,
            o.shards * o.replicas.max(1),
            o.workers
        );
    }
    let bin = worker_binary()?;
    let cache = cache_dir()?;
    let model = match &o.model {
        Some(m) => m.clone(),
        None => cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    if !model.is_file() {
        bail!(
            "{} is missing: run scripts/fetch-model.sh (or give --model)",
            model.display()
        );
    }
    let logs = cache.join("demo-logs");
    std::fs::create_dir_all(&logs)?;
    let t_split = Instant::now();
    let (manifest, _) = split_cached(&bin, &model, o.shards, &cache)?;
    let split_time = t_split.elapsed();

    let t0 = Instant::now();
    println!(
        "starting bootstrap node and {} workers on 127.0.0.x (logs in {}) …",
        o.workers,
        logs.display()
    );
    let boot = spawn(
        &bin,
        &[
            "bootstrap",
            "--p2p-host",
            "127.0.0.1",
            "--grpc-addr",
            "127.0.0.1:0",
        ]
        .map(String::from),
        &logs.join("bootstrap.log"),
        Duration::from_secs(30),
    )?;
    let threads = (std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        / o.workers)
        .max(1);
    let mut procs = Vec::new();
    let workers_dir = cache.join("demo-workers");
    let _ = std::fs::remove_dir_all(&workers_dir);
    for i in 0..o.workers {
        // Worker 0 holds the split and seeds it; the others start with
        // nothing and get their shard from the coordinator's placement,
        // fetched through the swarm.
        let mut args: Vec<String> = [
            "--p2p-host",
            &format!("127.0.0.{}", i + 2),
            "--grpc-addr",
            "127.0.0.1:0",
            "--bootstrap",
            &boot.quic_addr,
            "--threads",
            &threads.to_string(),
            "--cache-dir",
            &workers_dir.join(format!("worker{i}")).display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        if i == 0 {
            args.extend(["--manifest".into(), manifest.display().to_string()]);
        }
        procs.push(spawn(
            &bin,
            &args,
            &logs.join(format!("worker{i}.log")),
            Duration::from_secs(30),
        )?);
    }
    let started = t0.elapsed();

    // The coordinator, as its own process: it knows worker 0, finds the
    // others through it, places the split and serves the APIs.
    let coordinator = spawn(
        &std::env::current_exe()?,
        &[
            "serve".to_string(),
            "--workers".into(),
            procs[0].grpc_addr.clone(),
            "--manifest".into(),
            manifest.display().to_string(),
            "--replicas".into(),
            o.replicas.to_string(),
            "--http".into(),
            "127.0.0.1:0".into(),
            "--grpc".into(),
            "127.0.0.1:0".into(),
            "--poll-ms".into(),
            "250".into(),
        ],
        &logs.join("coordinator.log"),
        Duration::from_secs(30),
    )?;
    println!(
        "coordinator: OpenAI API on http://{}/v1, gRPC on {}; placing {} shards x {} replica(s) on {} workers …",
        coordinator.http_addr, coordinator.grpc_addr, o.shards, o.replicas, o.workers
    );
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", coordinator.grpc_addr))?
        .connect()
        .await
        .context("connecting to the coordinator")?;
    let mut coord = CoordinatorClient::new(ch);
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut discovered, mut transferred) = (None, None);
    let (table, placement) = loop {
        let st = coord
            .get_cluster_status(GetClusterStatusRequest {})
            .await
            .context("GetClusterStatus")?
            .into_inner();
        let statuses = status_rows(&st);
        // Discovery as the workers see it (each connected to every other).
        let mut direct = Vec::new();
        for p in &procs {
            if let Ok(st) = fetch_status(&p.grpc_addr).await {
                direct.push(st);
            }
        }
        let connected = direct.len() == procs.len()
            && direct.iter().all(|st| {
                procs
                    .iter()
                    .filter(|p| p.peer_id != st.peer_id)
                    .all(|p| st.peers.iter().any(|c| c.peer_id == p.peer_id))
            });
        if connected && discovered.is_none() {
            discovered = Some(t0.elapsed());
        }
        let placement = st.placement.clone().unwrap_or_default();
        // Every placed worker has its shard (loading or ready): transferred;
        // all ready: settled.
        let placed = |states: &[&str]| {
            !placement.assignment.is_empty()
                && placement.assignment.iter().all(|(addr, shard)| {
                    statuses.iter().any(|(a, st)| {
                        a == addr
                            && st.shards.iter().any(|s| {
                                s.availability == "LOCAL"
                                    && &s.shard_id == shard
                                    && states.contains(&s.state.as_str())
                            })
                    })
                })
        };
        let fetching = statuses
            .iter()
            .any(|(_, st)| st.torrents.iter().any(|t| t.state != "seeding"));
        if transferred.is_none() && !fetching && placed(&["loading", "ready"]) {
            transferred = Some(t0.elapsed());
        }
        // Ready: the coordinator's view and every worker's own SWARM_READY.
        if connected
            && st.swarm_ready
            && placed(&["ready"])
            && statuses.len() == procs.len()
            && statuses.iter().all(|(_, s)| s.swarm_ready)
        {
            break (render(&statuses), placement);
        }
        if Instant::now() > deadline {
            let why = placement.error;
            bail!(
                "the cluster did not become ready within 120 s{}:\n{}",
                if why.is_empty() {
                    String::new()
                } else {
                    format!(" ({why})")
                },
                render(&statuses)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let ready_at = t0.elapsed();
    println!("\n{table}");
    println!("placement:");
    for line in assignment_lines(&placement) {
        println!("  {line}");
    }
    let mut fetched = Vec::new();
    for (i, p) in procs.iter().enumerate() {
        if let Ok(st) = fetch_status(&p.grpc_addr).await {
            let bytes: u64 = st.torrents.iter().map(|t| t.fetched_bytes).sum();
            if bytes > 0 {
                fetched.push(format!("worker {i}: {:.1} MB", bytes as f64 / 1e6));
            }
        }
    }
    if !fetched.is_empty() {
        println!("shards fetched through the swarm: {}", fetched.join(", "));
    }

    // The prompt, through the pipeline, streamed.
    print!("prompt: {}\nanswer: ", o.prompt);
    let req = InferenceRequest {
        prompt: o.prompt.clone(),
        chat: true,
        max_tokens: o.max_tokens,
        ..Default::default()
    };
    let mut stream = coord
        .inference(req)
        .await
        .context("Inference")?
        .into_inner();
    let mut stats = None;
    while let Some(m) = stream.message().await? {
        match m.event {
            Some(Event::Chunk(c)) => {
                print!("{}", c.text);
                let _ = std::io::stdout().flush();
            }
            Some(Event::Stats(s)) => stats = Some(s),
            None => {}
        }
    }
    println!("\n");
    let s = stats.ok_or_else(|| anyhow!("no statistics at the end of the stream"))?;
    println!("route: {}", s.route.join(" -> "));
    println!("timings:");
    println!(
        "  split (cached after the first run) {:>8.0} ms",
        split_time.as_secs_f64() * 1000.0
    );
    println!(
        "  processes started                  {:>8.0} ms",
        started.as_secs_f64() * 1000.0
    );
    println!(
        "  all workers discovered             {:>8.0} ms",
        discovered.unwrap_or(ready_at).as_secs_f64() * 1000.0
    );
    println!(
        "  shards placed and fetched          {:>8.0} ms",
        transferred.unwrap_or(ready_at).as_secs_f64() * 1000.0
    );
    println!(
        "  shards loaded: SWARM_READY         {:>8.0} ms",
        ready_at.as_secs_f64() * 1000.0
    );
    println!(
        "  time to first token                {:>8.1} ms",
        s.time_to_first_token_ms
    );
    println!(
        "  decode                             {:>8.1} tok/s ({} prompt + {} generated tokens, {})",
        s.tokens_per_second, s.prompt_tokens, s.generated_tokens, s.finish_reason
    );
    if o.keep_running {
        println!(
            "cluster running: OpenAI API on http://{}/v1, coordinator gRPC on {}; Ctrl-C to stop",
            coordinator.http_addr, coordinator.grpc_addr
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    drop(coord);
    drop(coordinator);
    drop(procs);
    drop(boot);
    println!("stopped every process");
    Ok(())
}
