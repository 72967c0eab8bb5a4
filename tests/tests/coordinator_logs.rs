//! The coordinator's log reads like a story: a discovered worker that dies
//! is said to be forgotten once (not at every poll while its peers still
//! name it), and once to be back when it answers again; it is found once.

use std::time::Duration;

use llama_cluster_tests::{
    NodeProc, start_bootstrap, start_coordinator, test_dir, wait_for, worker_args,
};

/// Lines of `log` that contain every one of `parts`.
fn count(log: &str, parts: &[&str]) -> usize {
    log.lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .count()
}

fn start_worker(dir: &std::path::Path, name: &str, host: &str, boot: &str, grpc: &str) -> NodeProc {
    let mut args = worker_args(host, &[boot], None);
    if let Some(i) = args.iter().position(|a| a == "--grpc-addr") {
        args[i + 1] = grpc.to_string();
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    NodeProc::start(dir, name, &args).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_is_forgotten_once_and_back_once() {
    let dir = test_dir("coordinator-logs");
    let boot = start_bootstrap(&dir).unwrap();
    let b = boot.addr("quic-v1");
    let w0 = start_worker(&dir, "w0", "127.0.0.181", &b, "127.0.0.1:0");
    // w1 comes back on the same gRPC address: a port chosen now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let w1_addr = format!("127.0.0.1:{port}");
    let mut w1 = start_worker(&dir, "w1", "127.0.0.182", &b, &w1_addr);
    assert_eq!(w1.grpc_addr, w1_addr);
    // Only w0 is configured: w1 is found through it.
    let coord = start_coordinator(&dir, &w0.grpc_addr, &["--poll-ms", "300"], &[]).unwrap();
    let found = format!("worker {w1_addr} found");
    let forgotten = format!("worker {w1_addr} forgotten");
    let back = format!("worker {w1_addr} is back");
    let until = |what: String| {
        let coord = &coord;
        async move {
            wait_for(&what.clone(), Duration::from_secs(40), || async {
                coord.log().contains(&what).then_some(())
            })
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", coord.log()))
        }
    };
    until(found.clone()).await;

    w1.kill();
    until(forgotten.clone()).await;
    // Many polls later (300 ms each), while w0 may still name w1 as a peer.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let log = coord.log();
    assert_eq!(count(&log, &[&forgotten]), 1, "said once:\n{log}");
    assert_eq!(count(&log, &[&found]), 1, "found once:\n{log}");

    let _w1 = start_worker(&dir, "w1", "127.0.0.182", &b, &w1_addr);
    until(back.clone()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = coord.log();
    assert_eq!(count(&log, &[&back]), 1, "{log}");
    assert_eq!(count(&log, &[&forgotten]), 1, "{log}");
    assert_eq!(count(&log, &[&found]), 1, "{log}");
    drop(w0);
}
