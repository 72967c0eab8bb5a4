//! Discovery benchmark (printed, not asserted): time from starting a worker
//! process to it being connected with the running workers in both
//! directions, against the baseline of the same process starting alone
//! (spawn to ready line), measured in the same run.
//!
//! cargo bench -p llama-cluster-tests --bench discovery

use std::time::{Duration, Instant};

use llama_cluster_tests::{NodeProc, sees_all, test_dir, wait_for, worker_args};

const ROUNDS: usize = 5;

fn start(dir: &std::path::Path, name: &str, args: Vec<String>) -> NodeProc {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    NodeProc::start(dir, name, &args).expect("node starts")
}

fn median(v: Vec<f64>) -> f64 {
    llama_cluster_tests::median_range(v).0
}

#[tokio::main]
async fn main() {
    let dir = test_dir("bench-discovery");
    let boot = llama_cluster_tests::start_bootstrap(&dir).expect("bootstrap");
    let b = boot.addr("quic-v1");
    let w1 = start(
        &dir,
        "w1",
        worker_args("127.0.0.2", &[&b], Some(("b0", "0-14"))),
    );
    let w2 = start(
        &dir,
        "w2",
        worker_args("127.0.0.3", &[&b], Some(("b1", "15-29"))),
    );
    wait_for("w1-w2", Duration::from_secs(30), || async {
        sees_all(&w1, &[&w2]).await.then_some(())
    })
    .await
    .expect("w1 and w2 connect");

    let (mut base, mut disc) = (vec![], vec![]);
    for i in 0..ROUNDS {
        // Baseline: a worker with no peers, spawn to ready.
        let t0 = Instant::now();
        let alone = start(
            &dir,
            &format!("alone{i}"),
            worker_args("127.0.0.4", &[], None),
        );
        base.push(t0.elapsed().as_secs_f64() * 1000.0);
        drop(alone);
        // Discovery: spawn to connected both ways with w1 and w2.
        let t0 = Instant::now();
        let n = start(
            &dir,
            &format!("new{i}"),
            worker_args("127.0.0.5", &[&b], Some(("bn", "0-29"))),
        );
        wait_for("new worker connected", Duration::from_secs(30), || async {
            (sees_all(&n, &[&w1, &w2]).await
                && sees_all(&w1, &[&n]).await
                && sees_all(&w2, &[&n]).await)
                .then_some(())
        })
        .await
        .expect("discovery");
        disc.push(t0.elapsed().as_secs_f64() * 1000.0);
        drop(n);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (mb, md) = (median(base.clone()), median(disc.clone()));
    let max = disc.iter().cloned().fold(0.0, f64::max);
    println!("discovery benchmark ({ROUNDS} rounds, loopback, debug or release as built)");
    println!("  baseline: process start to ready, alone     median {mb:7.1} ms");
    println!("  start to connected with 2 workers, both ways median {md:7.1} ms  max {max:7.1} ms");
    println!("  ratio discovery / baseline: {:.2}x", md / mb);
    println!(
        "  target < 2000 ms: {}",
        if max < 2000.0 { "met" } else { "NOT met" }
    );
}
