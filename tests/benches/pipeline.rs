//! Pipeline benchmark (printed, not asserted). In one run, with the same
//! thread count everywhere: prompt processing and decode speed of the
//! default model in this process through llama-cpp-2 (the baseline), and
//! through 1-, 2- and 3-stage pipelines of `llama-worker` processes on
//! loopback; figures as ratios to the baseline, resident memory of every
//! worker, and bytes sent per token per hop.
//!
//! cargo build --workspace --bins && cargo bench -p llama-cluster-tests --bench pipeline

use std::time::Duration;

use llama_cluster_engine::EngineSettings;
use llama_cluster_engine::baseline::Baseline;
use llama_cluster_engine::chain::LocalChain;
use llama_cluster_proto::v1::InferenceRequest;
use llama_cluster_proto::v1::inference_response::Event;
use llama_cluster_tests::{NodeProc, PipelineCluster, model_path, split_with_cli, test_dir};

const N_PROMPT: usize = 128;
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
    for _ in 0..2 {
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

#[tokio::main]
async fn main() {
    // Same thread count everywhere (LLAMA_CLUSTER_BENCH_THREADS, default 2).
    let threads: i32 = std::env::var("LLAMA_CLUSTER_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
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
    let mut b = (0.0f64, 0.0f64);
    for _ in 0..2 {
        let r = base.greedy(&toks, N_GEN as usize).expect("baseline");
        b.0 = b.0.max(toks.len() as f64 / r.prompt_time.as_secs_f64());
        b.1 = b.1.max((N_GEN - 1) as f64 / r.decode_time.as_secs_f64());
    }
    println!(
        "pipeline benchmark: SmolLM2-135M Q4_1, {threads} threads per process, prompt {} tokens, {N_GEN} generated",
        toks.len()
    );
    println!(
        "{:<34} {:>10} {:>7} {:>10} {:>7} {:>12}  RSS per worker (MB)",
        "", "prompt t/s", "ratio", "decode t/s", "ratio", "B/token/hop"
    );
    // The same model as one in-process stage of the llama-cluster engine
    // (persistent thread pool): the other single-node reference. Ratios are
    // against the faster of the two.
    let dir = test_dir("bench-pipeline-local");
    let one = split_with_cli(&dir.join("split"), 1).expect("split");
    let local = |manifest: &std::path::Path, n: usize| {
        tokio::task::block_in_place(|| local_chain(manifest, n, settings, &toks))
    };
    fn local_chain(
        manifest: &std::path::Path,
        n: usize,
        settings: EngineSettings,
        toks: &[i32],
    ) -> (f64, f64) {
        let mut chain =
            LocalChain::load(manifest, &(0..n).collect::<Vec<_>>(), settings).expect("local chain");
        let _ = chain.greedy(toks, 8).expect("warm-up");
        let mut r = (0.0f64, 0.0f64);
        for _ in 0..2 {
            let g = chain.greedy(toks, N_GEN as usize).expect("local chain");
            r.0 = r.0.max(toks.len() as f64 / g.prompt_time.as_secs_f64());
            r.1 = r.1.max((N_GEN - 1) as f64 / g.decode_time.as_secs_f64());
        }
        r
    }
    let e = local(&one, 1);
    let reference = (b.0.max(e.0), b.1.max(e.1));
    for (name, v) in [
        ("single process (llama-cpp-2)", b),
        ("single process (engine, 1 stage)", e),
    ] {
        println!(
            "{:<34} {:>10.1} {:>7.2} {:>10.1} {:>7.2} {:>12}  -",
            name,
            v.0,
            v.0 / reference.0,
            v.1,
            v.1 / reference.1,
            "-"
        );
    }
    drop(base);
    let b = reference;

    let thread_arg = threads.to_string();
    // Extra worker flags, e.g. BENCH_WORKER_ARGS=--no-quic.
    let extra_env = std::env::var("BENCH_WORKER_ARGS").unwrap_or_default();
    let mut worker_flags = vec!["--threads", thread_arg.as_str()];
    worker_flags.extend(extra_env.split_whitespace());
    for n in [1u32, 2, 3] {
        let dir = test_dir(&format!("bench-pipeline{n}"));
        let manifest = split_with_cli(&dir.join("split"), n).expect("split");
        if n > 1 {
            // The same stages chained in one process: the cost of splitting
            // without the network.
            let l = local(&manifest, n as usize);
            println!(
                "{:<34} {:>10.1} {:>7.2} {:>10.1} {:>7.2} {:>12}  -",
                format!("{n} stages in one process"),
                l.0,
                l.0 / b.0,
                l.1,
                l.1 / b.1,
                "-"
            );
        }
        let cluster = PipelineCluster::start(&dir, &manifest, 40 + 10 * n as u8, &worker_flags)
            .await
            .expect("cluster");
        let driver = &cluster.workers[0];
        let _ = run_remote(driver, "warm up").await;
        let (pp, tg, _, bytes) = run_remote(driver, &prompt).await;
        let rss: Vec<String> = cluster
            .workers
            .iter()
            .map(|w| format!("{:.0}", rss_mb(w.child.id())))
            .collect();
        println!(
            "{:<34} {:>10.1} {:>7.2} {:>10.1} {:>7.2} {:>12}  {}",
            format!("{n}-stage pipeline ({n} processes)"),
            pp,
            pp / b.0,
            tg,
            tg / b.1,
            if n > 1 { bytes.to_string() } else { "-".into() },
            rss.join(" / ")
        );
        drop(cluster);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!("ratios: against the faster single-process reference; decode goal: >= 0.95x");
}
