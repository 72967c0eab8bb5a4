//! Serving benchmark (#15; printed, not asserted): aggregate generated
//! tokens/s and p50/p99 time per output token at several concurrencies
//! (128-token greedy completions, different prompts, streamed through the
//! OpenAI-compatible `/v1/completions`), for
//!
//! - (a) llama.cpp's `llama-server` (continuous batching, `-np` = the
//!   concurrency) pinned to 1 core (core 0, and core 1 to compare the
//!   VM's cores) and to 2 cores, when it is built
//!   (`bash scripts/build-llama-server.sh`; else the row is skipped);
//! - (b) llama-cluster, 2 stages, each worker pinned to a core of its own
//!   (`taskset`, 1 thread): two one-core machines;
//! - (c) llama-cluster, 1 stage on 1 core;
//!
//! all started first and measured level by level in turn (so that a slow
//! spell of the VM lands on all alike), with the ratios of the same run,
//! and where the two cores went in each
//! level: each stage's llama.cpp thread (its busy time), each worker's
//! other threads, the coordinator and the load generator (CPU seconds over
//! wall seconds). Two one-core machines would not share their cores with
//! the last two.
//!
//! cargo build --workspace --bins && cargo bench -p llama-cluster-tests --bench serving
//! (LLAMA_CLUSTER_BIN_DIR=target/release after `cargo build --release
//! --workspace --bins` for optimised workers and coordinator)
//! (BENCH_CONCURRENCY=1,4,8 for fewer levels, BENCH_TOKENS for another length,
//! BENCH_ONLY=b (or a, c, or several: b,c) for some of the configurations,
//! BENCH_ROUNDS=N to measure every level N times and keep each figure's best
//! (and print the ratios of each round: median, min and max),
//! BENCH_RANGES=0-17,18-29 for other ranges of the 2 stages, BENCH_BALANCE=
//! compute or bytes for another cut than the measured one,
//! BENCH_MEASURE_SESSIONS=N to time the measured cut in steps of N sessions)
//!
//! With (b), it first times llama.cpp's steps of c and c/2 sessions and
//! prints the most (b) can give over (a, 1 core), and with (a) over (a, 2
//! cores) (`serving/bound.rs`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use llama_cluster_tests::{
    NodeProc, cpu, metric, model_path, scrape, split_with_cli_args, start_bootstrap,
    start_coordinator, test_dir, wait_for, worker_args,
};
use serde_json::Value;

#[path = "serving/bound.rs"]
mod bound;

const LOAD: &str = include_str!("serving/load.py");

fn levels() -> Vec<usize> {
    std::env::var("BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,4,8,16,32".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// Whether configuration `x` ("a", "b" or "c") runs (`BENCH_ONLY`).
fn runs(x: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |v| v.split(',').any(|s| s.trim() == x))
}

fn n_tokens() -> usize {
    std::env::var("BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128)
}

/// One level's figures.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    tok_s: f64,
    tpot_p50_ms: f64,
    tpot_p99_ms: f64,
    /// Wall seconds of the level.
    wall: f64,
    /// CPU seconds of the load generator.
    client_cpu: f64,
}

/// Where the machine's CPU went during one level, in cores (CPU seconds
/// over wall seconds): what two one-core machines would not have to share.
#[derive(Debug, Clone, Default)]
struct CpuUse {
    /// Each stage's llama.cpp thread (its busy time).
    llama: Vec<f64>,
    /// Each worker's other threads (async runtime: frames, gRPC, sampling).
    rest: Vec<f64>,
    coordinator: f64,
    client: f64,
    /// Each stage's steps, `llama_decode` calls, llama.cpp micro-batches
    /// and milliseconds in llama.cpp.
    calls: Vec<[f64; 4]>,
}

/// One short completion before the levels, so that none of them pays for
/// what a first request does once (connections, caches).
fn warm_up(base: &str, model: &str) {
    let body = serde_json::json!({"model": model, "prompt": "Hello", "max_tokens": 8});
    let _ = Command::new("curl")
        .args([
            "-sf",
            "-m",
            "120",
            "-H",
            "content-type: application/json",
            "-d",
        ])
        .arg(body.to_string())
        .arg(format!("{base}/v1/completions"))
        .output();
}

fn load(dir: &Path, base: &str, model: &str, conc: usize) -> Option<Figures> {
    let script = dir.join("load.py");
    std::fs::write(&script, LOAD).ok()?;
    let cpu0 = cpu::of_waited_children();
    let t0 = std::time::Instant::now();
    let out = Command::new("python3")
        .arg(&script)
        .args([base, model, &conc.to_string(), &n_tokens().to_string()])
        .output()
        .ok()?;
    let wall = t0.elapsed().as_secs_f64();
    let client_cpu = cpu::of_waited_children() - cpu0;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    if let Some(e) = v["errors"].as_array().filter(|e| !e.is_empty()) {
        eprintln!("  errors at concurrency {conc}: {e:?}");
    }
    let tpot: Vec<f64> = v["tpot"]
        .as_array()?
        .iter()
        .filter_map(|x| x.as_f64())
        .collect();
    let pct = |p: f64| {
        if tpot.is_empty() {
            0.0
        } else {
            tpot[((tpot.len() - 1) as f64 * p).round() as usize] * 1000.0
        }
    };
    Some(Figures {
        tok_s: v["tok_s"].as_f64()?,
        tpot_p50_ms: pct(0.5),
        tpot_p99_ms: pct(0.99),
        wall,
        client_cpu,
    })
}

/// A llama-cluster configuration: workers each pinned to `cores[i]`.
struct Cluster {
    _bootstrap: NodeProc,
    workers: Vec<NodeProc>,
    coordinator: NodeProc,
    base: String,
    model: String,
}

async fn start_cluster(name: &str, shards: u32, host: u8) -> Cluster {
    let dir = test_dir(&format!("bench-serving-{name}"));
    // Pipelines run as fast as their slowest stage: cut where the layers'
    // times measured with llama.cpp balance (BENCH_BALANCE=compute for
    // weights counted in elements, bytes for the memory-balanced default,
    // BENCH_RANGES=0-17,18-29 for the 2 stages' ranges as given).
    let balance = std::env::var("BENCH_BALANCE").unwrap_or_else(|_| "measured".into());
    let n = shards.to_string();
    let ranges = std::env::var("BENCH_RANGES")
        .ok()
        .filter(|r| shards == 2 && !r.is_empty());
    let args: Vec<&str> = match &ranges {
        Some(r) => vec!["--ranges", r],
        None => vec!["--shards", &n, "--balance", &balance],
    };
    // The measured cut times steps of the sessions a stage runs at once
    // (BENCH_MEASURE_SESSIONS; the CLI's default, 4, is concurrency 8 over
    // 2 stages).
    let sessions = std::env::var("BENCH_MEASURE_SESSIONS").unwrap_or_default();
    let mut args = args;
    if balance == "measured" && ranges.is_none() && !sessions.is_empty() {
        args.extend(["--measure-sessions", &sessions]);
    }
    let manifest = split_with_cli_args(&dir.join("split"), &args).expect("split");
    let m: Value =
        serde_json::from_slice(&std::fs::read(&manifest).expect("manifest")).expect("json");
    let bootstrap = start_bootstrap(&dir).expect("bootstrap");
    let b = bootstrap.addr("quic-v1");
    let mut workers = Vec::new();
    for (i, s) in m["shards"].as_array().expect("shards").iter().enumerate() {
        let mut args = worker_args(&format!("127.0.0.{}", host as usize + i), &[&b], None);
        args.extend(
            [
                "--manifest",
                &manifest.display().to_string(),
                "--shard-id",
                s["id"].as_str().unwrap_or_default(),
                "--metrics-addr",
                "127.0.0.1:0",
                "--threads",
                "1",
                "--max-sessions",
                "32",
                "--max-queued",
                "1024",
            ]
            .map(String::from),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let core = i.to_string();
        workers.push(
            NodeProc::start_wrapped(
                &dir,
                &format!("stage{i}"),
                &["taskset", "-c", &core],
                "llama-worker",
                &args,
                &[("RUST_LOG", llama_cluster_shared::telemetry::DEFAULT_FILTER)],
            )
            .expect("worker"),
        );
    }
    let addrs: Vec<String> = workers.iter().map(|w| w.grpc_addr.clone()).collect();
    let coordinator = start_coordinator(
        &dir,
        &addrs.join(","),
        &["--max-queued", "1024", "--poll-ms", "500"],
        &[],
    )
    .expect("coordinator");
    let base = format!(
        "http://{}",
        coordinator.ready["http_addr"].as_str().unwrap_or_default()
    );
    let model = m["model"].as_str().unwrap_or_default().to_string();
    let ranges: Vec<String> = m["shards"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| format!("{}-{}", s["layer_start"], s["layer_end"]))
        .collect();
    let how = match std::env::var("BENCH_RANGES")
        .ok()
        .filter(|r| shards == 2 && !r.is_empty())
    {
        Some(_) => "ranges given by BENCH_RANGES".to_string(),
        None => format!("split balancing {balance}"),
    };
    println!("{name}: layers {} ({how})", ranges.join(", "));
    let c = Cluster {
        _bootstrap: bootstrap,
        workers,
        coordinator,
        base,
        model,
    };
    let url = format!("{}/v1/models", c.base);
    wait_for("the cluster to serve", Duration::from_secs(120), || {
        let url = url.clone();
        async move {
            let out = Command::new("curl").args(["-sf", &url]).output().ok()?;
            String::from_utf8_lossy(&out.stdout)
                .contains("smollm2")
                .then_some(())
        }
    })
    .await
    .expect("ready");
    warm_up(&c.base, &c.model);
    c
}

/// Runs one level against a cluster and reads where the CPU went.
fn measure(c: &Cluster, dir: &Path, conc: usize) -> (Option<Figures>, CpuUse) {
    let pids: Vec<u32> = c.workers.iter().map(|w| w.child.id()).collect();
    let cpu_of = |pid: u32| cpu::of_pid(pid).unwrap_or(0.0);
    let stage0: Vec<[f64; 4]> = c.workers.iter().map(stage_counts).collect();
    let cpu0: Vec<f64> = pids.iter().map(|&p| cpu_of(p)).collect();
    let coord0 = cpu_of(c.coordinator.child.id());
    let f = load(dir, &c.base, &c.model, conc);
    let Some(fig) = f else {
        return (None, CpuUse::default());
    };
    let wall = fig.wall.max(1e-9);
    // Each stage's counters over the level: busy seconds, steps, calls,
    // micro-batches.
    let during: Vec<[f64; 4]> = c
        .workers
        .iter()
        .zip(&stage0)
        .map(|(w, a)| {
            let b = stage_counts(w);
            std::array::from_fn(|k| b[k] - a[k])
        })
        .collect();
    let llama: Vec<f64> = during.iter().map(|d| d[0] / wall).collect();
    let rest = pids
        .iter()
        .zip(&cpu0)
        .zip(&llama)
        .map(|((&p, c0), l)| ((cpu_of(p) - c0) / wall - l).max(0.0))
        .collect();
    let cpu = CpuUse {
        llama,
        rest,
        coordinator: (cpu_of(c.coordinator.child.id()) - coord0) / wall,
        client: fig.client_cpu / wall,
        calls: during
            .iter()
            .map(|d| [d[1], d[2], d[3], d[0] * 1e3])
            .collect(),
    };
    (f, cpu)
}

/// A stage's busy seconds in llama.cpp, steps, `llama_decode` calls and
/// micro-batches so far (one scrape).
fn stage_counts(w: &NodeProc) -> [f64; 4] {
    let m = scrape(w).unwrap_or_default();
    [
        "llama_cluster_stage_busy_seconds",
        "llama_cluster_stage_steps_total",
        "llama_cluster_stage_decode_calls",
        "llama_cluster_stage_micro_batches",
    ]
    .map(|k| metric(&m, k).unwrap_or(0.0))
}

/// llama-server, if it was built into the cache.
fn llama_server_bin() -> Option<PathBuf> {
    let p = llama_cluster_engine::cache_root().join("llama-server/build/bin/llama-server");
    p.is_file().then_some(p)
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_llama_server(
    bin: &Path,
    cores: &str,
    threads: usize,
    np: usize,
    port: u16,
) -> Option<Server> {
    let child = Command::new("taskset")
        .args(["-c", cores])
        .arg(bin)
        .args(["-m", &model_path().display().to_string()])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["-t", &threads.to_string(), "-tb", &threads.to_string()])
        .args([
            "-np",
            &np.to_string(),
            "-c",
            &(2048 * np).to_string(),
            "-cb",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let s = Server(child);
    let url = format!("http://127.0.0.1:{port}/health");
    wait_for("llama-server", Duration::from_secs(120), || {
        let url = url.clone();
        async move {
            let out = Command::new("curl").args(["-sf", &url]).output().ok()?;
            out.status.success().then_some(())
        }
    })
    .await
    .ok()?;
    warm_up(&format!("http://127.0.0.1:{port}"), "m");
    Some(s)
}

/// Keeps the figures of the faster of two rounds (and where its cores went).
fn keep_best(best: &mut Option<Figures>, cpu: &mut CpuUse, f: Option<Figures>, u: CpuUse) {
    if let Some(f) = f
        && best.is_none_or(|b| f.tok_s > b.tok_s)
    {
        *best = Some(f);
        *cpu = u;
    }
}

fn row(name: &str, f: &[Option<Figures>]) {
    print!("{name:<34}");
    for x in f {
        match x {
            Some(x) => print!(
                " {:>7.1} ({:>5.1}/{:>5.1})",
                x.tok_s, x.tpot_p50_ms, x.tpot_p99_ms
            ),
            None => print!(" {:>21}", "-"),
        }
    }
    println!();
}

fn ratio(name: &str, a: &[Option<Figures>], b: &[Option<Figures>]) {
    print!("{name:<34}");
    for (x, y) in a.iter().zip(b) {
        match (x, y) {
            (Some(x), Some(y)) if y.tok_s > 0.0 => print!(" {:>21.2}", x.tok_s / y.tok_s),
            _ => print!(" {:>21}", "-"),
        }
    }
    println!();
}

#[tokio::main]
async fn main() {
    let levels = levels();
    let dir = test_dir("bench-serving");
    println!(
        "serving bench: {} tokens per completion, concurrency {levels:?}",
        n_tokens()
    );
    println!("cells: aggregate tok/s (p50/p99 ms per output token)");
    // Every configuration is started first and measured level by level in
    // turn, so that a slow spell of the VM lands on all of them alike; with
    // BENCH_ROUNDS > 1 each figure is the best of its rounds.
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let n = levels.len();
    let (mut a1, mut a1b, mut a2) = (vec![None; n], vec![None; n], vec![None; n]);
    let (mut b_rows, mut c_rows) = (vec![None; n], vec![None; n]);
    let (mut b_cpu, mut c_cpu) = (vec![CpuUse::default(); n], vec![CpuUse::default(); n]);
    // What the kernels allow (b) at most, timed first on an idle machine.
    let bound = if runs("b") {
        println!("timing llama.cpp's steps of c and c/2 sessions for (b)'s bound …");
        bound::two_stage_bound(&levels)
    } else {
        vec![None; n]
    };
    // tok/s of every round: [configuration][level][round] (a1, a1 on the
    // other core, a2, b, c), for the ratios round by round.
    let mut tok: Vec<Vec<Vec<Option<f64>>>> = vec![vec![Vec::new(); n]; 5];
    // (b) 2 stages on their own cores, (c) 1 stage on 1 core.
    let b = if runs("b") {
        Some(start_cluster("2stages", 2, 60).await)
    } else {
        None
    };
    let c = if runs("c") {
        Some(start_cluster("1stage", 1, 70).await)
    } else {
        None
    };
    // (a) llama-server on 1 and 2 cores, started anew for each level.
    let server = llama_server_bin().filter(|_| runs("a"));
    if server.is_none() && runs("a") {
        println!(
            "llama-server rows skipped: not built (bash scripts/build-llama-server.sh builds it into the cache, 15-25 min on 2 cores)"
        );
    }
    for round in 0..rounds {
        for (i, &conc) in levels.iter().enumerate() {
            if let Some(cl) = &b {
                let (f, u) = measure(cl, &dir, conc);
                tok[3][i].push(f.as_ref().map(|f| f.tok_s));
                keep_best(&mut b_rows[i], &mut b_cpu[i], f, u);
            }
            if let Some(cl) = &c {
                let (f, u) = measure(cl, &dir, conc);
                tok[4][i].push(f.as_ref().map(|f| f.tok_s));
                keep_best(&mut c_rows[i], &mut c_cpu[i], f, u);
            }
            if let Some(bin) = &server {
                // On each core alone (the VM's two cores need not be equally
                // fast, and (b) uses both), then on both.
                for (k, (cores, threads, out)) in
                    [("0", 1, &mut a1), ("1", 1, &mut a1b), ("0,1", 2, &mut a2)]
                        .into_iter()
                        .enumerate()
                {
                    let port = 18080 + conc as u16 + 100 * round as u16;
                    let f = match start_llama_server(bin, cores, threads, conc, port).await {
                        Some(_s) => load(&dir, &format!("http://127.0.0.1:{port}"), "m", conc),
                        None => None,
                    };
                    tok[k][i].push(f.as_ref().map(|f| f.tok_s));
                    keep_best(&mut out[i], &mut CpuUse::default(), f, CpuUse::default());
                }
            }
        }
    }
    print!("{:<34}", "concurrency");
    for l in &levels {
        print!(" {l:>21}");
    }
    println!();
    row("(a) llama-server, 1 core", &a1);
    row("(a) llama-server, the other core", &a1b);
    row("(a) llama-server, 2 cores", &a2);
    row("(b) llama-cluster, 2 stages x 1 core", &b_rows);
    row("(c) llama-cluster, 1 stage, 1 core", &c_rows);
    ratio("(b) / (a, 1 core)   goal >= 1.7 @8", &b_rows, &a1);
    ratio("(b) / (a, 2 cores)  goal >= 0.9", &b_rows, &a2);
    ratio("(c) / (a, 1 core)   goal >= 0.9", &c_rows, &a1);
    ratio("(b) / (c)", &b_rows, &c_rows);
    let tok_s = |v: &[Option<Figures>]| -> Vec<Option<f64>> {
        v.iter().map(|f| f.as_ref().map(|f| f.tok_s)).collect()
    };
    bound::print_rows(&levels, &bound, &tok_s(&a1), &tok_s(&a2), &tok_s(&b_rows));
    ratio("(a, the other core) / (a, 1 core)", &a1b, &a1);
    if rounds > 1 {
        println!("ratios round by round (each round measures all in turn): median (min-max)");
        ratio_by_round("(b) / (a, 1 core)", &tok[3], &tok[0]);
        ratio_by_round("(b) / (a, 2 cores)", &tok[3], &tok[2]);
        ratio_by_round("(c) / (a, 1 core)", &tok[4], &tok[0]);
        ratio_by_round("(a, the other core) / (a, 1 core)", &tok[1], &tok[0]);
    }
    cores("(b) cores: llama.cpp per stage", &b_cpu, |u| join(&u.llama));
    cores("(b) steps per call, stage 0 / 1", &b_cpu, |u| {
        per_call(u, 0)
    });
    cores("(b) micro-batches per call", &b_cpu, |u| per_call(u, 2));
    cores("(b) llama.cpp ms per call, stage 0 / 1", &b_cpu, |u| {
        per_call(u, 3)
    });
    cores("(b) cores: workers' other threads", &b_cpu, |u| {
        join(&u.rest)
    });
    cores("(b) cores: coordinator / client", &b_cpu, |u| {
        format!("{:.2}/{:.2}", u.coordinator, u.client)
    });
    cores("(c) cores: llama.cpp / worker rest", &c_cpu, |u| {
        format!("{}/{}", join(&u.llama), join(&u.rest))
    });
    cores("(c) cores: coordinator / client", &c_cpu, |u| {
        format!("{:.2}/{:.2}", u.coordinator, u.client)
    });
    print!("{:<34}", "(a, 1 core) cores: client");
    for f in &a1 {
        match f {
            Some(f) if f.wall > 0.0 => print!(" {:>21.2}", f.client_cpu / f.wall),
            _ => print!(" {:>21}", "-"),
        }
    }
    println!();
    println!(
        "cores: CPU seconds over wall seconds of each level; two one-core machines would not share theirs with the coordinator and the client"
    );
}

/// The ratio of `x` to `y` in each round of each level: median (min-max).
fn ratio_by_round(name: &str, x: &[Vec<Option<f64>>], y: &[Vec<Option<f64>>]) {
    print!("{name:<34}");
    for (xs, ys) in x.iter().zip(y) {
        let mut r: Vec<f64> = xs
            .iter()
            .zip(ys)
            .filter_map(|(a, b)| Some(a.as_ref()? / b.filter(|b| *b > 0.0)?))
            .collect();
        r.sort_by(f64::total_cmp);
        match (r.first(), r.last()) {
            (Some(lo), Some(hi)) => {
                let cell = format!("{:.2} ({lo:.2}-{hi:.2})", r[r.len() / 2]);
                print!(" {cell:>21}");
            }
            _ => print!(" {:>21}", "-"),
        }
    }
    println!();
}

/// Steps (`k` 0), micro-batches (`k` 2) or llama.cpp milliseconds (`k` 3)
/// per `llama_decode` call of each stage.
fn per_call(u: &CpuUse, k: usize) -> String {
    u.calls
        .iter()
        .map(|c| format!("{:.2}", c[k] / c[1].max(1.0)))
        .collect::<Vec<_>>()
        .join("/")
}

fn join(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join("/")
}

fn cores<T>(name: &str, rows: &[T], cell: impl Fn(&T) -> String) {
    print!("{name:<34}");
    for u in rows {
        print!(" {:>21}", cell(u));
    }
    println!();
}
