//! A gRPC client that goes silent mid-stream (a hung process, a machine
//! gone without closing its connections) does not keep the cluster
//! generating for nobody: the worker's gRPC server pings it, closes the
//! connection when no answer comes within `client_timeout_secs`, and the
//! request is cancelled, its sessions freed on every stage.
//!
//! The client is grpcurl, stopped with SIGSTOP while its `Inference` stream
//! flows: its kernel still answers TCP, so only the HTTP/2 pings can tell.
//! Once against a worker that drives the request, once against the
//! coordinator (whose stream to its driver then ends too).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llama_cluster_tests::clients;
use llama_cluster_tests::{
    NodeProc, PipelineCluster, metric, scrape, scrape_url, split_with_cli, start_coordinator,
    test_dir, wait_for,
};

const MAX_TOKENS: u32 = 1900;

/// The client process, killed (stopped or not) however the test ends.
struct Client(Child);

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn figure(w: &NodeProc, name: &str) -> f64 {
    let text = scrape(w).unwrap_or_default();
    metric(&text, name).unwrap_or(0.0)
}

fn total(cluster: &PipelineCluster, name: &str) -> f64 {
    cluster.workers.iter().map(|w| figure(w, name)).sum()
}

fn sessions(cluster: &PipelineCluster) -> f64 {
    total(cluster, "llama_cluster_active_sessions")
}

fn generated(cluster: &PipelineCluster) -> f64 {
    total(cluster, "llama_cluster_tokens_generated_total")
}

/// Streams a long `Inference` from `service` at `addr` with grpcurl, stops
/// grpcurl once the stream flows, and checks that every stage frees the
/// session and the driver stops generating (`logs`: for the failure).
async fn a_silent_client_is_cut(
    cluster: &PipelineCluster,
    dir: &std::path::Path,
    addr: &str,
    service: &str,
    logs: &dyn Fn() -> String,
) {
    let out_path = dir.join(format!("{service}.out"));
    let out = std::fs::File::create(&out_path).unwrap();
    let body = format!(
        r#"{{"prompt":"Write a very long story about a lighthouse keeper.","max_tokens":{MAX_TOKENS},"ignore_eos":true}}"#
    );
    let before = generated(cluster);
    let client = Command::new(clients::grpcurl().unwrap())
        .args(["-plaintext", "-d", &body, addr])
        .arg(format!("llamacluster.v1.{service}/Inference"))
        .stdout(Stdio::from(out))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = Client(client);

    // The stream flows: chunks arrive and both stages hold the session.
    let flowing = Instant::now();
    loop {
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        if text.matches("tokenIds").count() >= 20 && sessions(cluster) >= 2.0 {
            break;
        }
        assert!(
            flowing.elapsed() < Duration::from_secs(60),
            "{service}: the stream did not flow: {text}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let pid = client.0.id().to_string();
    let stop = Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    assert!(stop.success());
    let stopped = Instant::now();

    // Within the timeout (and a margin for 2 shared cores) every stage has
    // freed the session, and the driver stopped long before MAX_TOKENS.
    let freed = loop {
        if sessions(cluster) == 0.0 {
            break stopped.elapsed();
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(30),
            "{service}: the stopped client's request still holds {} sessions after 30 s \
             ({} tokens generated)\n{}",
            sessions(cluster),
            generated(cluster) - before,
            logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let n = generated(cluster) - before;
    eprintln!("{service}: sessions freed {freed:?} after SIGSTOP; {n} tokens generated");
    assert!(
        n < f64::from(MAX_TOKENS),
        "{service}: the request ran to its end ({n} tokens) instead of being cancelled"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        generated(cluster) - before,
        n,
        "{service}: the driver still generates for the stopped client"
    );
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_grpc_client_is_disconnected_and_its_request_cancelled() {
    let dir = test_dir("vanished-client");
    let manifest = split_with_cli(&dir.join("split"), 2).unwrap();
    let timeout = ["--client-timeout-secs", "3"];
    let cluster = PipelineCluster::start(&dir, &manifest, 225, &timeout)
        .await
        .unwrap();
    let driver = &cluster.workers[0];
    a_silent_client_is_cut(&cluster, &dir, &driver.grpc_addr, "Worker", &|| {
        driver.log()
    })
    .await;

    let coord = start_coordinator(&dir, &driver.grpc_addr, &timeout, &[]).unwrap();
    let http = coord.ready["http_addr"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    wait_for("the coordinator's /health", Duration::from_secs(60), || {
        let url = format!("http://{http}/health");
        async move { scrape_url(&url).ok() }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", coord.log()));
    let logs = || format!("{}\n{}", coord.log(), driver.log());
    a_silent_client_is_cut(&cluster, &dir, &coord.grpc_addr, "Coordinator", &logs).await;
}
