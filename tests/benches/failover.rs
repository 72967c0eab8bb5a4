//! Failover benchmark (#16; printed, not asserted). A cluster of 2 shards
//! × 2 replicas behind the coordinator; per fault, 4 greedy streams run and
//! a worker (each in turn) is killed with SIGKILL once they flow. Printed:
//! the stall each stream sees (the longest gap between two of its tokens;
//! p50 and max over the faults, against the median gap without a fault),
//! and the time until the cluster serves at full capacity again after the
//! killed worker is restarted (its shard ready and the coordinator's
//! session capacity back).
//!
//! cargo build --workspace --bins && cargo bench -p llama-cluster-tests --bench failover
//! (BENCH_FAULTS=20 faults by default)

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use llama_cluster_proto::v1::coordinator_client::CoordinatorClient;
use llama_cluster_proto::v1::inference_response::Event;
use llama_cluster_proto::v1::{GetClusterStatusRequest, InferenceRequest};
use llama_cluster_tests::{
    ReplicaCluster, median_range, split_with_cli, start_coordinator, test_dir, wait_for,
};

const STREAMS: usize = 4;
const EXTRA: [&str; 6] = [
    "--max-sessions",
    "4",
    "--stage-timeout-secs",
    "3",
    "--session-lease-secs",
    "5",
];

/// The longest gap between two tokens of one stream, and whether it completed.
async fn stream(coord: String, i: usize, flowing: Arc<AtomicUsize>) -> (Duration, bool) {
    let Ok(mut c) = CoordinatorClient::connect(format!("http://{coord}")).await else {
        return (Duration::ZERO, false);
    };
    let req = InferenceRequest {
        prompt: format!("Write a short story about robot number {i}."),
        max_tokens: 96,
        ignore_eos: true,
        ..Default::default()
    };
    let Ok(s) = c.inference(req).await else {
        return (Duration::ZERO, false);
    };
    let mut s = s.into_inner();
    let (mut last, mut gap, mut n) = (Instant::now(), Duration::ZERO, 0);
    loop {
        match s.message().await {
            Ok(Some(m)) => {
                if let Some(Event::Chunk(_)) = m.event {
                    n += 1;
                    if n == 8 {
                        flowing.fetch_add(1, Ordering::Relaxed);
                    }
                    if n > 1 {
                        gap = gap.max(last.elapsed());
                    }
                    last = Instant::now();
                }
            }
            Ok(None) => return (gap, n == 96),
            Err(_) => return (gap, false),
        }
    }
}

async fn capacity(coord: &str) -> u32 {
    match CoordinatorClient::connect(format!("http://{coord}")).await {
        Ok(mut c) => c
            .get_cluster_status(GetClusterStatusRequest {})
            .await
            .map(|r| r.into_inner().session_capacity)
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// Streams with a fault (`kill`: the worker's index) or without.
async fn round(
    coord: &str,
    kill: Option<&mut llama_cluster_tests::NodeProc>,
) -> Vec<(Duration, bool)> {
    let flowing = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..STREAMS)
        .map(|i| tokio::spawn(stream(coord.to_string(), i, flowing.clone())))
        .collect();
    let t0 = Instant::now();
    while flowing.load(Ordering::Relaxed) < STREAMS && t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(w) = kill {
        w.kill();
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap_or((Duration::ZERO, false)));
    }
    out
}

#[tokio::main]
async fn main() {
    let faults: usize = std::env::var("BENCH_FAULTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = test_dir("bench-failover");
    let manifest = split_with_cli(&dir.join("split"), 2).expect("split");
    let mut cluster = ReplicaCluster::start(&dir, &manifest, 80, 2, &EXTRA)
        .await
        .expect("cluster");
    let coord = start_coordinator(&dir, &cluster.grpc_addrs(), &["--poll-ms", "500"], &[])
        .expect("coordinator");
    let addr = coord.ready["grpc_addr"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let full = wait_for("capacity", Duration::from_secs(60), || async {
        Some(capacity(&addr).await).filter(|c| *c == 8)
    })
    .await
    .expect("full capacity");
    let calm = round(&addr, None).await;
    let calm_gap = median_range(calm.iter().map(|g| g.0.as_secs_f64() * 1000.0).collect()).0;
    println!(
        "failover bench: {faults} faults, {STREAMS} streams each; full capacity {full} sessions"
    );
    println!(
        "longest gap between two tokens without a fault: {calm_gap:.1} ms (median over streams)"
    );
    let (mut stalls, mut per_fault, mut recover, mut lost) =
        (Vec::new(), Vec::new(), Vec::new(), 0);
    let mut host = 90u8;
    for f in 0..faults {
        let victim = f % cluster.workers.len();
        let shard = victim % cluster.shard_ids.len();
        let runs = round(&addr, Some(&mut cluster.workers[victim])).await;
        lost += runs.iter().filter(|r| !r.1).count();
        stalls.extend(runs.iter().map(|r| r.0.as_secs_f64() * 1000.0));
        per_fault.push(
            runs.iter()
                .map(|r| r.0.as_secs_f64() * 1000.0)
                .fold(0.0, f64::max),
        );
        // The worker comes back (a new process with the same shard).
        let t0 = Instant::now();
        host += 1;
        let w = cluster
            .worker(&dir, &manifest, host, shard, &EXTRA)
            .expect("restart");
        cluster.workers[victim] = w;
        let ok = wait_for("full capacity again", Duration::from_secs(90), || async {
            (capacity(&addr).await == full).then_some(())
        })
        .await;
        if ok.is_ok() {
            recover.push(t0.elapsed().as_secs_f64());
        }
        eprintln!(
            "fault {f}: worker {victim} (shard {shard}) killed; back in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    }
    let (p50, _, max) = median_range(stalls.clone());
    let (f50, _, fmax) = median_range(per_fault.clone());
    println!(
        "stall at failover (per fault, the longest gap of its streams): p50 {f50:.0} ms, max {fmax:.0} ms"
    );
    let (r50, _, rmax) = median_range(recover.clone());
    println!(
        "longest gap per stream, every stream of every fault: p50 {p50:.0} ms, max {max:.0} ms ({}x / {}x the calm gap)",
        (p50 / calm_gap.max(0.001)).round(),
        (max / calm_gap.max(0.001)).round()
    );
    println!(
        "streams that did not complete: {lost} of {}",
        faults * STREAMS
    );
    println!(
        "full capacity again after the restart: p50 {r50:.1} s, max {rmax:.1} s ({} of {faults} faults)",
        recover.len()
    );
}
