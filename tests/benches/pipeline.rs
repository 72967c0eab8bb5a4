//! Pipeline benchmark (printed, not asserted). In one run, with the same
//! thread count everywhere: prompt processing and decode speed of the
//! default model in this process through llama-cpp-2 (the baseline), and
//! through 1-, 2- and 3-stage pipelines of `llama-worker` processes on
//! loopback; figures as ratios to the baseline, resident memory of every
//! worker, and bytes sent per token per hop.
//!
//! cargo build --workspace --bins && cargo bench -p llama-cluster-tests --bench pipeline

use llama_cluster_engine::EngineSettings;
use llama_cluster_engine::baseline::Baseline;
use llama_cluster_engine::chain::LocalChain;
use llama_cluster_proto::v1::InferenceRequest;
use llama_cluster_proto::v1::inference_response::Event;
use llama_cluster_tests::{NodeProc, PipelineCluster, model_path, split_with_cli, test_dir};

#[path = "pipeline/floor.rs"]
mod floor;

const N_PROMPT: usize = 128;

/// Workers log as they do by default (the tests' harness asks for debug
/// lines on every step, which a benchmark should not pay for);
/// `BENCH_WORKER_LOG` sets another filter, e.g.
/// `info,llama_worker::pipeline::driver=debug` for where decode time goes.
fn worker_log() -> String {
    std::env::var("BENCH_WORKER_LOG")
        .unwrap_or_else(|_| llama_cluster_shared::telemetry::DEFAULT_FILTER.to_string())
}
const N_GEN: u32 = 128;

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(String::from)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// (prompt tok/s, decode tok/s, prompt tokens, bytes per token per hop)
async fn run_remote(driver: &NodeProc, prompt: &str) -> (f64, f64, u32, u64) {
    let mut client = driver.client().await.expect("client");
    let req = InferenceRequest {
        prompt: prompt.into(),
        max_tokens: N_GEN,
        ignore_eos: true,
        ..Default::default()
    };
    let mut best = (0.0, 0.0, 0, 0);
    {
        let mut stream = client
            .inference(req.clone())
            .await
            .expect("inference")
            .into_inner();
        while let Some(m) = stream.message().await.expect("stream") {
            if let Some(Event::Stats(s)) = m.event {
                let pp = s.prompt_tokens as f64 / (s.time_to_first_token_ms / 1000.0);
                if s.tokens_per_second > best.1 {
                    best = (
                        pp.max(best.0),
                        s.tokens_per_second,
                        s.prompt_tokens,
                        s.bytes_per_token_per_hop,
                    );
                }
            }
        }
    }
    best
}

/// An n-way split of the default model and an n-stage pipeline of worker
/// processes serving it (on 127.0.0.{40 + 10n}..).
async fn start_pipeline(n: u32, worker_flags: &[&str]) -> (std::path::PathBuf, PipelineCluster) {
    let dir = test_dir(&format!("bench-pipeline{n}"));
    let manifest = split_with_cli(&dir.join("split"), n).expect("split");
    let log = worker_log();
    let cluster = PipelineCluster::start_with_env(
        &dir,
        &manifest,
        40 + 10 * n as u8,
        worker_flags,
        &[("RUST_LOG", log.as_str())],
    )
    .await
    .expect("cluster");
    (manifest, cluster)
}

/// Rounds over every configuration; each figure is the best of its rounds.
/// The configurations take turns, so a slow spell of the machine (this VM
/// varies by about ±10 %) hits all of them rather than one.
fn rounds() -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// Best (prompt t/s, decode t/s) so far.
#[derive(Clone, Copy, Default)]
struct Best(f64, f64);

impl Best {
    fn add(&mut self, pp: f64, tg: f64) {
        self.0 = self.0.max(pp);
        self.1 = self.1.max(tg);
    }
}

fn local_chain_run(chain: &mut LocalChain, toks: &[i32]) -> (f64, f64) {
    let g = chain.greedy(toks, N_GEN as usize).expect("local chain");
    (
        toks.len() as f64 / g.prompt_time.as_secs_f64(),
        (N_GEN - 1) as f64 / g.decode_time.as_secs_f64(),
    )
}

/// What a pipeline step pays at every stage beyond the compute, timed on
/// this machine with the same shape: a thread that just computed for 3 ms
/// (a stage's share of a decode step) wakes another that was idle meanwhile
/// and waits for its answer, through a channel (a hand-off between the async
/// runtime and a stage thread) and through a UDP datagram of an activation's
/// size over loopback (a hop). Medians in microseconds, each round trip being
/// two wake-ups. On a VM an idle virtual CPU is halted, and waking a thread
/// there costs far more than on bare metal.
fn wake_costs() -> (f64, f64) {
    const N: usize = 200;
    let spin = |d: std::time::Duration| {
        let t = std::time::Instant::now();
        while t.elapsed() < d {
            std::hint::spin_loop();
        }
    };
    let idle = std::time::Duration::from_millis(3);
    let median = |v: Vec<f64>| llama_cluster_tests::median_range(v).0;
    let (to_tx, to_rx) = std::sync::mpsc::channel::<()>();
    let (back_tx, back_rx) = std::sync::mpsc::channel::<()>();
    let echo = std::thread::spawn(move || {
        while to_rx.recv().is_ok() {
            if back_tx.send(()).is_err() {
                break;
            }
        }
    });
    let mut handoff = Vec::with_capacity(N);
    for _ in 0..N {
        spin(idle);
        let t = std::time::Instant::now();
        to_tx.send(()).expect("echo thread");
        back_rx.recv().expect("echo thread");
        handoff.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(to_tx);
    let _ = echo.join();
    let a = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let b = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let b_addr = b.local_addr().expect("udp");
    a.connect(b_addr).expect("udp");
    b.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("udp");
    a.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("udp");
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        for _ in 0..N {
            let Ok((n, from)) = b.recv_from(&mut buf) else {
                break;
            };
            let _ = b.send_to(&buf[..n], from);
        }
    });
    let msg = [7u8; 2458];
    let mut buf = [0u8; 4096];
    let mut udp = Vec::with_capacity(N);
    for _ in 0..N {
        spin(idle);
        let t = std::time::Instant::now();
        a.send(&msg).expect("udp send");
        a.recv(&mut buf).expect("udp echo");
        udp.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let _ = echo.join();
    (median(handoff), median(udp))
}

fn main() {
    // Same thread count everywhere (LLAMA_CLUSTER_BENCH_THREADS, default 2).
    let threads: i32 = std::env::var("LLAMA_CLUSTER_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    // Or a stage of the floor chain (see `floor`): no async runtime at all.
    let settings = EngineSettings {
        threads,
        ..Default::default()
    };
    llama_cluster_tests::self_child::main_or_helper(
        floor::STAGE_ENV,
        || floor::serve_from_env(settings),
        || run(threads),
    );
}

async fn run(threads: i32) {
    // Release binaries when they are there (cargo build --release --bins).
    if std::env::var_os("LLAMA_CLUSTER_BIN_DIR").is_none() {
        let rel = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release");
        if rel.join("llama-worker").exists() {
            // SAFETY: set before any other thread reads the environment.
            unsafe { std::env::set_var("LLAMA_CLUSTER_BIN_DIR", &rel) };
        }
    }
    let settings = EngineSettings {
        threads,
        ..Default::default()
    };
    let base = Baseline::load(&model_path(), settings).expect("model");
    // A prompt of N_PROMPT tokens.
    let text = "The history of the river city goes back many centuries, to traders and farmers. "
        .repeat(16);
    let mut toks = base.tokenize(&text);
    toks.truncate(N_PROMPT);
    let prompt: String = String::from_utf8_lossy(
        &toks
            .iter()
            .flat_map(|&t| base.piece(t))
            .collect::<Vec<u8>>(),
    )
    .into_owned();
    let toks = base.tokenize(&prompt);
    let _ = base.greedy(&toks, 8).expect("warm-up");

    // Everything is loaded and started first, then measured in rounds.
    let thread_arg = threads.to_string();
    // Extra worker flags, e.g. BENCH_WORKER_ARGS=--no-quic.
    let extra_env = std::env::var("BENCH_WORKER_ARGS").unwrap_or_default();
    let mut worker_flags = vec!["--threads", thread_arg.as_str()];
    worker_flags.extend(extra_env.split_whitespace());
    // The model as in-process stages of the llama-cluster engine: 1 stage
    // (the other single-node reference, with its persistent thread pool;
    // ratios are against the faster of the two) and 2 and 3 stages chained
    // in one process (the cost of splitting without any network).
    let mut chains = Vec::new();
    let mut clusters = Vec::new();
    // The floor (see `floor`): 1 stage (its reference), then 2 and 3
    // stages on one thread and as processes over blocking TCP or libp2p.
    let mut floors: Vec<(String, floor::FloorChain)> = Vec::new();
    // BENCH_PROFILE=N: only run the N-stage pipeline, over and over for a
    // minute (for a profiler), and print nothing else.
    if let Some(n) = std::env::var("BENCH_PROFILE")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        let (_, cluster) = start_pipeline(n, &worker_flags).await;
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_secs(60) {
            let (_, tg, _, _) = run_remote(&cluster.workers[0], &prompt).await;
            eprintln!("{n}-stage pipeline: {tg:.1} tok/s");
        }
        return;
    }
    for n in [1u32, 2, 3] {
        let (manifest, cluster) = start_pipeline(n, &worker_flags).await;
        let mut chain = tokio::task::block_in_place(|| {
            LocalChain::load(&manifest, &(0..n as usize).collect::<Vec<_>>(), settings)
        })
        .expect("local chain");
        let _ = tokio::task::block_in_place(|| chain.greedy(&toks, 8)).expect("warm-up");
        chains.push(chain);
        let _ = run_remote(&cluster.workers[0], "warm up").await;
        clusters.push(cluster);
        let modes: &[(Option<floor::Link>, String)] = if n == 1 {
            &[(None, "1 stage, one thread".to_string())]
        } else {
            &[
                (None, format!("{n} stages, one thread")),
                (
                    Some(floor::Link::Tcp),
                    format!("{n} processes, blocking TCP"),
                ),
                (
                    Some(floor::Link::Libp2p),
                    format!("{n} processes, libp2p stream"),
                ),
            ]
        };
        for (processes, name) in modes {
            let f = tokio::task::block_in_place(|| {
                floor::FloorChain::load(&manifest, settings, *processes)
            })
            .expect("floor chain");
            let _ = tokio::task::block_in_place(|| f.run(&toks, 8)).expect("floor warm-up");
            floors.push((name.clone(), f));
        }
    }
    let mut baseline = Best::default();
    let mut local = [Best::default(); 3];
    let mut remote = [Best::default(); 3];
    let mut bytes = [0u64; 3];
    // Decode ratios of each configuration against a run of the reference
    // (the engine as 1 stage) made just before it, per round: pipelines of
    // 1, 2, 3 processes, then 2 and 3 stages in one process.
    let mut paired: [Vec<f64>; 5] = Default::default();
    // The floor's decode against its 1 stage run just before it, per round;
    // and whether every floor configuration gave the 1 stage's tokens.
    let mut floor_paired: Vec<Vec<f64>> = vec![Vec::new(); floors.len()];
    let mut floor_best = vec![0f64; floors.len()];
    let mut floor_mismatch: Vec<String> = Vec::new();
    let rounds = rounds();
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        tokio::task::block_in_place(|| {
            let r = base.greedy(&toks, N_GEN as usize).expect("baseline");
            baseline.add(
                toks.len() as f64 / r.prompt_time.as_secs_f64(),
                (N_GEN - 1) as f64 / r.decode_time.as_secs_f64(),
            );
            for (chain, best) in chains.iter_mut().zip(local.iter_mut()) {
                let (pp, tg) = local_chain_run(chain, &toks);
                best.add(pp, tg);
            }
        });
        for (i, cluster) in clusters.iter().enumerate() {
            let (rpp, rtg) = tokio::task::block_in_place(|| local_chain_run(&mut chains[0], &toks));
            local[0].add(rpp, rtg);
            let (pp, tg, _, b) = run_remote(&cluster.workers[0], &prompt).await;
            remote[i].add(pp, tg);
            bytes[i] = b;
            paired[i].push(tg / rtg);
        }
        tokio::task::block_in_place(|| {
            for n in 1..3 {
                let (rpp, rtg) = local_chain_run(&mut chains[0], &toks);
                local[0].add(rpp, rtg);
                let (pp, tg) = local_chain_run(&mut chains[n], &toks);
                local[n].add(pp, tg);
                paired[2 + n].push(tg / rtg);
            }
            // Three pairs per configuration and round: the floor's runs
            // are short, and this VM's speed drifts by ±20 %.
            for i in (1..floors.len()).cycle().take(3 * (floors.len() - 1)) {
                let (_, rtg, rtoks) = floors[0].1.run(&toks, N_GEN as usize).expect("floor");
                floor_best[0] = floor_best[0].max(rtg);
                let (_, tg, ftoks) = floors[i].1.run(&toks, N_GEN as usize).expect("floor");
                floor_best[i] = floor_best[i].max(tg);
                floor_paired[i].push(tg / rtg);
                if ftoks != rtoks {
                    floor_mismatch.push(floors[i].0.clone());
                }
            }
        });
    }
    let reference = Best(baseline.0.max(local[0].0), baseline.1.max(local[0].1));
    println!(
        "pipeline benchmark: SmolLM2-135M Q4_1, {threads} threads per process, prompt {} tokens, {N_GEN} generated, best of {rounds} rounds",
        toks.len()
    );
    println!(
        "{:<34} {:>10} {:>7} {:>10} {:>7} {:>12}  RSS per worker (MB)",
        "", "prompt t/s", "ratio", "decode t/s", "ratio", "B/token/hop"
    );
    let row = |name: &str, v: Best, bytes: String, rss: String| {
        println!(
            "{:<34} {:>10.1} {:>7.2} {:>10.1} {:>7.2} {:>12}  {}",
            name,
            v.0,
            v.0 / reference.0,
            v.1,
            v.1 / reference.1,
            bytes,
            rss
        );
    };
    row(
        "single process (llama-cpp-2)",
        baseline,
        "-".into(),
        "-".into(),
    );
    row(
        "single process (engine, 1 stage)",
        local[0],
        "-".into(),
        "-".into(),
    );
    for n in 1..=3usize {
        if n > 1 {
            row(
                &format!("{n} stages in one process"),
                local[n - 1],
                "-".into(),
                "-".into(),
            );
        }
        let rss: Vec<String> = clusters[n - 1]
            .workers
            .iter()
            .map(|w| format!("{:.0}", rss_mb(w.child.id())))
            .collect();
        row(
            &format!("{n}-stage pipeline ({n} processes)"),
            remote[n - 1],
            if n > 1 {
                bytes[n - 1].to_string()
            } else {
                "-".into()
            },
            rss.join(" / "),
        );
    }
    println!("ratios: against the faster single-process reference; decode goal: >= 0.95x");
    let (handoff_us, udp_us) = wake_costs();
    println!(
        "this machine, after 3 ms of compute: thread hand-off round trip {handoff_us:.0} us, loopback UDP round trip {udp_us:.0} us (each stage adds two hand-offs per step, and a hop each way)"
    );
    println!(
        "decode, paired with a run of the engine as 1 stage just before it (median of {rounds} rounds, [lowest, highest]):"
    );
    let names = [
        "1-stage pipeline",
        "2-stage pipeline",
        "3-stage pipeline",
        "2 stages in one process",
        "3 stages in one process",
    ];
    for (name, r) in names.iter().zip(paired) {
        if !r.is_empty() {
            let (mid, lo, hi) = llama_cluster_tests::median_range(r);
            println!("  {name:<32} {mid:.2}  [{lo:.2}, {hi:.2}]");
        }
    }
    println!(
        "the floor: the same decode with llama.cpp alone, greedy; between processes a blocking TCP socket on the computing thread (no runtime, no hand-off, no libp2p), or a libp2p stream (TCP, noise, yamux) on a runtime thread of its own, handing off to llama.cpp's thread as a worker does; 1 stage: {:.1} tok/s; paired with 1 stage just before it:",
        floor_best[0]
    );
    for ((name, _), r) in floors.iter().zip(floor_paired).skip(1) {
        let (mid, lo, hi) = llama_cluster_tests::median_range(r);
        println!("  {name:<32} {mid:.2}  [{lo:.2}, {hi:.2}]");
    }
    if !floor_mismatch.is_empty() {
        println!("WARNING: tokens differ from 1 stage in: {floor_mismatch:?}");
    }
    // Their libp2p nodes own runtimes, which may not be dropped on this one.
    tokio::task::block_in_place(|| drop(floors));
    drop(clusters);
}
