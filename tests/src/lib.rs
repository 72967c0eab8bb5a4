//! Test harness: starts real `llama-worker` processes on 127.0.0.x, reads
//! their ready line, talks to them over gRPC, and kills them on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use llama_cluster_proto::v1::worker_client::WorkerClient;
use llama_cluster_proto::v1::{GetStatusRequest, GetStatusResponse};
use serde_json::Value;
use tonic::transport::Channel;

mod answer;
pub mod bare_libp2p;
pub mod clients;
mod clusters;
pub mod cpu;
pub mod fuzz_cases;
pub mod self_child;
pub mod tmpfs;
pub mod torrent;

pub use answer::{Answer, infer};
pub use clusters::{PipelineCluster, ReplicaCluster, coordinator_ready, shard_ids_of};

/// Path of a workspace binary, built by `cargo build --workspace --bins`
/// (the README's test command does that first). `LLAMA_CLUSTER_BIN_DIR`
/// overrides the directory.
pub fn binary(name: &str) -> PathBuf {
    let dir = std::env::var_os("LLAMA_CLUSTER_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
            target.join("debug")
        });
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// A directory for one test's logs and files, under the target directory.
pub fn test_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-runs")
        .join(format!(
            "{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create test dir");
    dir
}

/// A node process; killed (and reaped) on drop.
pub struct NodeProc {
    pub name: String,
    /// The whole ready line (JSON).
    pub ready: Value,
    pub child: Child,
    pub peer_id: String,
    pub grpc_addr: String,
    pub listen_addrs: Vec<String>,
    pub log_path: PathBuf,
}

impl NodeProc {
    /// Starts `llama-worker <args>` and waits (bounded) for its ready line.
    pub fn start(dir: &Path, name: &str, args: &[&str]) -> anyhow::Result<NodeProc> {
        Self::start_with_env(dir, name, args, &[])
    }

    pub fn start_with_env(
        dir: &Path,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<NodeProc> {
        Self::start_bin(dir, name, "llama-worker", args, env)
    }

    /// Starts workspace binary `bin` (which prints the ready line too).
    pub fn start_bin(
        dir: &Path,
        name: &str,
        bin: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<NodeProc> {
        Self::start_wrapped(dir, name, &[], bin, args, env)
    }

    /// Starts `wrapper… <bin> <args>` (for example `setpriv …` to run the
    /// node with fewer privileges); an empty wrapper runs `bin` itself.
    pub fn start_wrapped(
        dir: &Path,
        name: &str,
        wrapper: &[&str],
        bin: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<NodeProc> {
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = match wrapper.split_first() {
            None => Command::new(binary(bin)),
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(binary(bin));
                c
            }
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .env("RUST_LOG", "info,llama_worker=debug,libp2p=warn");
        // Every node has its own file store, as on separate machines.
        cmd.env("LLAMA_CLUSTER_CACHE_DIR", dir.join(format!("{name}.cache")));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().context("spawning llama-worker")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix(llama_worker::READY_PREFIX) {
                    let _ = tx.send(rest.to_string());
                }
            }
        });
        let ready = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(r) => r,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("{name} did not become ready within 30 s; log:\n{log}");
            }
        };
        let v: Value = serde_json::from_str(&ready)?;
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        Ok(NodeProc {
            ready: v.clone(),
            name: name.to_string(),
            peer_id: s("peer_id"),
            grpc_addr: s("grpc_addr"),
            listen_addrs: v["listen_addrs"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
            child,
            log_path,
        })
    }

    /// The node's listen address for `transport` ("quic-v1" or "tcp").
    pub fn addr(&self, transport: &str) -> String {
        self.listen_addrs
            .iter()
            .find(|a| a.contains(&format!("/{transport}")))
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "{} has no {transport} address: {:?}",
                    self.name, self.listen_addrs
                )
            })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub async fn client(&self) -> anyhow::Result<WorkerClient<Channel>> {
        let ch = Channel::from_shared(format!("http://{}", self.grpc_addr))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .connect()
            .await?;
        Ok(WorkerClient::new(ch))
    }

    pub async fn status(&self) -> anyhow::Result<GetStatusResponse> {
        Ok(self
            .client()
            .await?
            .get_status(GetStatusRequest {})
            .await?
            .into_inner())
    }

    /// Kills the process now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `llama-coordinator serve` on free ports (HTTP and gRPC) in front of
/// `workers` (gRPC addresses, comma-separated), with `extra` flags.
pub fn start_coordinator(
    dir: &Path,
    workers: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<NodeProc> {
    let mut args = vec![
        "serve",
        "--workers",
        workers,
        "--http",
        "127.0.0.1:0",
        "--grpc",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    NodeProc::start_bin(dir, "coordinator", "llama-coordinator", &args, env)
}

/// A bootstrap (rendezvous) node on 127.0.0.1, gRPC on a free port.
pub fn start_bootstrap(dir: &Path) -> anyhow::Result<NodeProc> {
    start_bootstrap_with(dir, &[])
}

/// [`start_bootstrap`] with more arguments (a cluster key, say).
pub fn start_bootstrap_with(dir: &Path, extra: &[&str]) -> anyhow::Result<NodeProc> {
    let mut args = vec![
        "bootstrap",
        "--p2p-host",
        "127.0.0.1",
        "--grpc-addr",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    NodeProc::start(dir, "bootstrap", &args)
}

/// Common worker arguments: P2P on `host`, gRPC on a free port, bootstrap
/// addresses, a shard, short intervals.
pub fn worker_args(host: &str, bootstrap: &[&str], shard: Option<(&str, &str)>) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--p2p-host".into(),
        host.into(),
        "--grpc-addr".into(),
        "127.0.0.1:0".into(),
        "--status-interval-secs".into(),
        "5".into(),
        "--discovery-interval-secs".into(),
        "5".into(),
    ];
    for b in bootstrap {
        v.push("--bootstrap".into());
        v.push(b.to_string());
    }
    if let Some((id, layers)) = shard {
        v.extend([
            "--shard-id".into(),
            id.into(),
            "--shard-layers".into(),
            layers.into(),
        ]);
    }
    v
}

/// Polls `check` every 50 ms until it returns `Some`, failing after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The node's Prometheus metrics (text), scraped over HTTP.
pub fn scrape(node: &NodeProc) -> anyhow::Result<String> {
    let addr = node.ready["metrics_addr"].as_str().unwrap_or_default();
    if addr.is_empty() {
        bail!("{} serves no metrics", node.name);
    }
    scrape_url(&format!("http://{addr}/metrics"))
}

/// Fetches a Prometheus text page.
pub fn scrape_url(url: &str) -> anyhow::Result<String> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "10", url])
        .output()?;
    if !out.status.success() {
        bail!("scraping {url} failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Value of the metric line `name{...} value` whose labels include every
/// `key="value"` of `labels`.
pub fn metric_with(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Value of a metric line `name value` (or `name{labels} value`) in a scrape.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Transport of `node`'s connection to `peer`, if connected.
pub async fn transport_to(node: &NodeProc, peer: &str) -> Option<String> {
    let st = node.status().await.ok()?;
    st.peers
        .iter()
        .find(|p| p.peer_id == peer)
        .map(|p| p.transport.clone())
}

/// True when `node` is connected to every peer in `peers` and knows a shard
/// record of each peer that has one.
pub async fn sees_all(node: &NodeProc, peers: &[&NodeProc]) -> bool {
    let Ok(st) = node.status().await else {
        return false;
    };
    peers
        .iter()
        .all(|p| st.peers.iter().any(|c| c.peer_id == p.peer_id))
}

/// The unsplit default model in this process, on one thread: the reference
/// the pipeline's output is compared with.
pub fn baseline() -> llama_cluster_engine::baseline::Baseline {
    let settings = llama_cluster_engine::EngineSettings {
        threads: 1,
        ..Default::default()
    };
    llama_cluster_engine::baseline::Baseline::load(&model_path(), settings)
        .expect("the default model loads")
}

/// Path of the default model (fetched into the cache by scripts/fetch-model.sh).
pub fn model_path() -> PathBuf {
    let p = llama_cluster_engine::default_model_path();
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

/// Runs `llama-worker split` (a real process) into `out`; returns the manifest path.
pub fn split_with_cli(out: &Path, shards: u32) -> anyhow::Result<PathBuf> {
    split_with_cli_args(out, &["--shards", &shards.to_string()])
}

/// `llama-worker split` of the default model with these plan arguments
/// (`--shards N` or `--ranges a-b,…`).
pub fn split_with_cli_args(out: &Path, plan: &[&str]) -> anyhow::Result<PathBuf> {
    let mut child = Command::new(binary("llama-worker"))
        .args(["split", "--model"])
        .arg(model_path())
        .arg("--out")
        .arg(out)
        .args(plan)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(st) = child.try_wait()? {
            if !st.success() {
                bail!("llama-worker split failed: {st}");
            }
            return Ok(out.join("manifest.json"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("llama-worker split did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first value in `log` that stands between `after` and `before` on one
/// line (e.g. `log_value(log, " transferred in ", " s ")`).
pub fn log_value<T: std::str::FromStr>(log: &str, after: &str, before: &str) -> Option<T> {
    log.lines().find_map(|l| {
        l.split(after)
            .nth(1)
            .and_then(|r| r.split(before).next())
            .and_then(|v| v.parse().ok())
    })
}

/// Median, lowest and highest of `v` (benchmarks' spread over rounds);
/// NaNs when `v` is empty.
pub fn median_range(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    match (v.first(), v.last()) {
        (Some(&lo), Some(&hi)) => (v[v.len() / 2], lo, hi),
        _ => (f64::NAN, f64::NAN, f64::NAN),
    }
}
