//! What membership costs (printed, not asserted), open and keyed clusters
//! side by side in the same run: the time from starting a worker to it
//! being connected with two running workers both ways (the keyed one
//! includes the cluster key handshake), and decode tokens/s of a 2-stage
//! pipeline.
//!
//! cargo test -p llama-cluster-tests --bench membership (a debug build, like the binaries it starts)

use std::time::{Duration, Instant};

use llama_cluster_proto::v1::InferenceRequest;
use llama_cluster_proto::v1::inference_response::Event;
use llama_cluster_proto::v1::worker_client::WorkerClient;
use llama_cluster_tests::{
    NodeProc, ReplicaCluster, binary, sees_all, split_with_cli, test_dir, wait_for, worker_args,
};

const ROUNDS: usize = 5;
const TOKENS: u32 = 64;

fn median(v: Vec<f64>) -> f64 {
    llama_cluster_tests::median_range(v).0
}

async fn decode_tps(w: &NodeProc) -> f64 {
    let mut c = WorkerClient::connect(format!("http://{}", w.grpc_addr))
        .await
        .expect("gRPC");
    let mut s = c
        .inference(InferenceRequest {
            prompt: "Write a story about a robot.".into(),
            max_tokens: TOKENS,
            ignore_eos: true,
            ..Default::default()
        })
        .await
        .expect("inference")
        .into_inner();
    let mut tps = 0.0;
    while let Some(m) = s.message().await.expect("stream") {
        if let Some(Event::Stats(st)) = m.event {
            tps = st.tokens_per_second;
        }
    }
    tps
}

/// A running cluster (bootstrap and two workers) with `extra` args on
/// every node, and where joiners go.
struct Bench {
    dir: std::path::PathBuf,
    cluster: ReplicaCluster,
    joiner_host: u8,
    extra: Vec<String>,
}

impl Bench {
    async fn start(label: &str, host: u8, extra: &[&str]) -> Bench {
        let dir = test_dir(&format!("bench-membership-{label}"));
        let manifest = split_with_cli(&dir.join("split"), 2).expect("split");
        let cluster = ReplicaCluster::start_with(&dir, &manifest, host, 1, extra, extra)
            .await
            .expect("cluster");
        Bench {
            dir,
            cluster,
            joiner_host: host + 5,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Milliseconds from starting a worker to it and the two workers seeing
    /// each other.
    async fn join(&self, i: usize) -> f64 {
        let b = self.cluster.bootstrap.addr("quic-v1");
        let (w1, w2) = (&self.cluster.workers[0], &self.cluster.workers[1]);
        let mut args = worker_args(&format!("127.0.0.{}", self.joiner_host), &[&b], None);
        args.extend(self.extra.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let t0 = Instant::now();
        let n = NodeProc::start(&self.dir, &format!("new{i}"), &args).expect("node");
        wait_for("new worker connected", Duration::from_secs(30), || async {
            (sees_all(&n, &[w1, w2]).await
                && sees_all(w1, &[&n]).await
                && sees_all(w2, &[&n]).await)
                .then_some(())
        })
        .await
        .expect("discovery");
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        drop(n);
        tokio::time::sleep(Duration::from_millis(300)).await;
        ms
    }
}

#[tokio::main]
async fn main() {
    let dir = test_dir("bench-membership");
    let key = dir.join("cluster.key");
    let st = std::process::Command::new(binary("llama-worker"))
        .args(["keygen", "--out"])
        .arg(&key)
        .status()
        .expect("keygen");
    assert!(st.success());
    let key_s = key.display().to_string();
    let open = Bench::start("open", 210, &[]).await;
    let keyed = Bench::start("keyed", 220, &["--cluster-key-file", key_s.as_str()]).await;
    // Alternating, so that whatever else runs on the machine weighs on both.
    let (mut od, mut kd, mut ot, mut kt) = (vec![], vec![], vec![], vec![]);
    for i in 0..ROUNDS {
        od.push(open.join(i).await);
        kd.push(keyed.join(i).await);
    }
    decode_tps(&open.cluster.workers[0]).await; // warm-up
    decode_tps(&keyed.cluster.workers[0]).await;
    for _ in 0..3 {
        ot.push(decode_tps(&open.cluster.workers[0]).await);
        kt.push(decode_tps(&keyed.cluster.workers[0]).await);
    }
    let (open_disc, keyed_disc, open_tps, keyed_tps) =
        (median(od), median(kd), median(ot), median(kt));
    println!(
        "membership benchmark (loopback, {ROUNDS} joins, 3 × {TOKENS}-token decodes, alternating open and keyed, debug or release as built)"
    );
    println!(
        "  start to connected with 2 workers, both ways: open {open_disc:7.1} ms  keyed {keyed_disc:7.1} ms  ratio {:.2}x",
        keyed_disc / open_disc
    );
    println!(
        "  decode tokens/s (2 stages):                   open {open_tps:7.1}     keyed {keyed_tps:7.1}     ratio {:.2}x",
        keyed_tps / open_tps
    );
}
