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

pub mod clients;
pub mod fuzz_cases;
pub mod torrent;

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

/// A bootstrap node and one worker per shard of `manifest`, each on its own
/// 127.0.0.x address, every shard loaded; `extra` args go to every worker.
pub struct PipelineCluster {
    pub bootstrap: NodeProc,
    pub workers: Vec<NodeProc>,
    pub shard_ids: Vec<String>,
    pub manifest: PathBuf,
}

impl PipelineCluster {
    pub async fn start(
        dir: &Path,
        manifest: &Path,
        first_host: u8,
        extra: &[&str],
    ) -> anyhow::Result<PipelineCluster> {
        Self::start_with_env(dir, manifest, first_host, extra, &[]).await
    }

    /// As [`PipelineCluster::start`], with environment variables for every worker.
    pub async fn start_with_env(
        dir: &Path,
        manifest: &Path,
        first_host: u8,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<PipelineCluster> {
        let shard_ids = shard_ids_of(manifest)?;
        let bootstrap = start_bootstrap(dir)?;
        // Workers without QUIC reach the bootstrap node over TCP.
        let b = bootstrap.addr(if extra.contains(&"--no-quic") {
            "tcp"
        } else {
            "quic-v1"
        });
        let mut workers = Vec::new();
        for (i, id) in shard_ids.iter().enumerate() {
            let host = format!("127.0.0.{}", first_host as usize + i);
            let mut args = worker_args(&host, &[&b], None);
            args.extend([
                "--manifest".into(),
                manifest.display().to_string(),
                "--shard-id".into(),
                id.clone(),
            ]);
            args.extend(["--metrics-addr".into(), "127.0.0.1:0".into()]);
            if !extra.contains(&"--threads") {
                // 2 cores shared by every process of a test: one thread each.
                args.extend(["--threads".into(), "1".into()]);
            }
            args.extend(extra.iter().map(|s| s.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            workers.push(NodeProc::start_with_env(
                dir,
                &format!("stage{i}"),
                &args,
                env,
            )?);
        }
        let c = PipelineCluster {
            bootstrap,
            workers,
            shard_ids,
            manifest: manifest.to_path_buf(),
        };
        for w in &c.workers {
            c.wait_ready_from(w).await?;
        }
        Ok(c)
    }

    /// The workers' gRPC addresses, comma-separated.
    pub fn grpc_addrs(&self) -> String {
        self.workers
            .iter()
            .map(|w| w.grpc_addr.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until `node` sees every shard ready and reachable.
    pub async fn wait_ready_from(&self, node: &NodeProc) -> anyhow::Result<()> {
        wait_until_ready(
            node,
            "every shard",
            Duration::from_secs(60),
            |s| {
                self.shard_ids
                    .contains(&s.shard_id)
                    .then(|| s.shard_id.clone())
            },
            self.shard_ids.len(),
        )
        .await
    }
}

/// The shard ids of a split manifest, in order.
pub fn shard_ids_of(manifest: &Path) -> anyhow::Result<Vec<String>> {
    let m: Value = serde_json::from_slice(&std::fs::read(manifest)?)?;
    Ok(m["shards"]
        .as_array()
        .ok_or_else(|| anyhow!("manifest has no shards"))?
        .iter()
        .filter_map(|s| s["id"].as_str().map(String::from))
        .collect())
}

/// Waits until `node` sees ready, reachable shard records for `n` distinct
/// keys (`key`: the record's key, `None` for records that do not count).
async fn wait_until_ready(
    node: &NodeProc,
    what: &str,
    timeout: Duration,
    key: impl Fn(&llama_cluster_proto::v1::ShardInfo) -> Option<String>,
    n: usize,
) -> anyhow::Result<()> {
    let key = &key;
    wait_for(
        &format!("{} to see {what} ready", node.name),
        timeout,
        || async move {
            let st = node.status().await.ok()?;
            let seen: std::collections::HashSet<String> = st
                .shards
                .iter()
                .filter(|s| s.state == "ready" && s.availability != "OFFLINE")
                .filter_map(key)
                .collect();
            (seen.len() >= n).then_some(())
        },
    )
    .await
    .map_err(|e| anyhow!("{e}\n{}", node.log()))
}

/// A bootstrap node and `replicas` workers per shard of `manifest` (worker
/// `r * shards + i` serves shard `i`), each on its own 127.0.0.x address
/// from `first_host`, every shard loaded; `extra` args go to every worker.
pub struct ReplicaCluster {
    pub bootstrap: NodeProc,
    pub workers: Vec<NodeProc>,
    pub shard_ids: Vec<String>,
}

impl ReplicaCluster {
    pub async fn start(
        dir: &Path,
        manifest: &Path,
        first_host: u8,
        replicas: usize,
        extra: &[&str],
    ) -> anyhow::Result<ReplicaCluster> {
        Self::start_with(dir, manifest, first_host, replicas, extra, &[]).await
    }

    /// [`ReplicaCluster::start`], with `bootstrap_extra` args for the
    /// bootstrap node.
    pub async fn start_with(
        dir: &Path,
        manifest: &Path,
        first_host: u8,
        replicas: usize,
        extra: &[&str],
        bootstrap_extra: &[&str],
    ) -> anyhow::Result<ReplicaCluster> {
        let shard_ids = shard_ids_of(manifest)?;
        let bootstrap = start_bootstrap_with(dir, bootstrap_extra)?;
        let mut c = ReplicaCluster {
            bootstrap,
            workers: Vec::new(),
            shard_ids,
        };
        for r in 0..replicas {
            for i in 0..c.shard_ids.len() {
                let n = r * c.shard_ids.len() + i;
                let w = c.worker(dir, manifest, first_host + n as u8, i, extra)?;
                c.workers.push(w);
            }
        }
        for w in &c.workers {
            c.wait_all_ready_from(w).await?;
        }
        Ok(c)
    }

    /// Starts one more worker on 127.0.0.`host` serving shard `index` (not
    /// added to `workers`; not waited for).
    pub fn worker(
        &self,
        dir: &Path,
        manifest: &Path,
        host: u8,
        index: usize,
        extra: &[&str],
    ) -> anyhow::Result<NodeProc> {
        let b = self.bootstrap.addr("quic-v1");
        let mut args = worker_args(&format!("127.0.0.{host}"), &[&b], None);
        args.extend([
            "--manifest".into(),
            manifest.display().to_string(),
            "--shard-id".into(),
            self.shard_ids[index].clone(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--threads".into(),
            "1".into(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        NodeProc::start(dir, &format!("w{host}-s{index}"), &args)
    }

    /// The workers' gRPC addresses, comma-separated.
    pub fn grpc_addrs(&self) -> String {
        self.workers
            .iter()
            .map(|w| w.grpc_addr.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until `node` sees every worker's shard ready and reachable.
    pub async fn wait_all_ready_from(&self, node: &NodeProc) -> anyhow::Result<()> {
        let peers: Vec<String> = self.workers.iter().map(|w| w.peer_id.clone()).collect();
        wait_until_ready(
            node,
            "every replica",
            Duration::from_secs(90),
            |s| peers.contains(&s.peer_id).then(|| s.peer_id.clone()),
            peers.len(),
        )
        .await
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

/// Helper processes of the benchmarks' floors: this benchmark binary run
/// again with a role in its environment. Each prints `port N` once it
/// listens; it exits when its parent goes (its stdin, held by the parent,
/// closes), and [`SelfChildren`] kills the rest when dropped.
pub mod self_child {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Child, Command, Stdio};

    use anyhow::anyhow;

    /// Child processes killed and reaped when dropped.
    #[derive(Default)]
    pub struct SelfChildren(Vec<Child>);

    impl Drop for SelfChildren {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    impl SelfChildren {
        /// Starts this binary again with `env`; returns the port it printed.
        pub fn spawn(&mut self, env: &[(&str, String)]) -> anyhow::Result<u16> {
            let mut cmd = Command::new(std::env::current_exe()?);
            for (k, v) in env {
                cmd.env(k, v);
            }
            let mut child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?;
            let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
            self.0.push(child);
            // Printed once it listens; an empty line if it exited first.
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line)?;
            line.strip_prefix("port ")
                .and_then(|p| p.trim().parse::<u16>().ok())
                .ok_or_else(|| anyhow!("a helper process did not start: {line:?}"))
        }
    }

    /// A bench's `main`: the helper role when `role_env` is set (no async
    /// runtime; exits 1 on an error), else `bench` on a multi-thread runtime.
    pub fn main_or_helper<F: std::future::Future<Output = ()>>(
        role_env: &str,
        helper: impl FnOnce() -> anyhow::Result<()>,
        bench: impl FnOnce() -> F,
    ) {
        if std::env::var_os(role_env).is_some() {
            if let Err(e) = helper() {
                eprintln!("{role_env}: {e:#}");
                std::process::exit(1);
            }
            return;
        }
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(bench());
    }

    /// In the child: exits the process once the parent has gone.
    pub fn exit_when_parent_goes() {
        std::thread::spawn(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            std::process::exit(0);
        });
    }
}

/// CPU time (user + system) of processes, for benchmarks that compare what
/// two ways of doing the same work cost the machine, not only how long.
pub mod cpu {
    /// CPU seconds process `pid` has used so far (in clock ticks, usually
    /// 10 ms); `None` when it cannot be read.
    pub fn of_pid(pid: u32) -> Option<f64> {
        use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};
        let pid = Pid::from_u32(pid);
        let mut sys = System::new().ok()?;
        sys.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[pid]),
            true,
            ProcessRefreshKind::nothing().with_cpu(),
        );
        sys.process(pid)
            .map(|p| p.accumulated_cpu_time() as f64 / 1000.0)
    }

    /// CPU seconds used by the children of this process that have been
    /// waited for (`getrusage(RUSAGE_CHILDREN)`): the difference around
    /// running one child to completion is that child's.
    pub fn of_waited_children() -> f64 {
        // SAFETY: getrusage fills the struct it is given; zeroed is valid.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) } != 0 {
            return 0.0;
        }
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        secs(u.ru_utime) + secs(u.ru_stime)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn cpu_of_a_busy_child_is_counted() {
            let before = super::of_waited_children();
            let st = std::process::Command::new("sh")
                .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
                .status()
                .unwrap();
            assert!(st.success());
            let used = super::of_waited_children() - before;
            assert!(used > 0.0, "{used}");
            let me = super::of_pid(std::process::id()).unwrap();
            assert!(me >= 0.0);
            assert_eq!(super::of_pid(u32::MAX), None);
        }
    }
}

/// Bare libp2p nodes for the benchmarks' floors: TCP, noise and yamux, and
/// streams (`libp2p-stream`) as the only behaviour.
pub mod bare_libp2p {
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
}
