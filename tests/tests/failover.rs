//! Nothing lost when a worker dies (#16), on real worker processes with 2
//! replicas of each shard: 8 concurrent streams (greedy, or seeded sampling
//! with penalties) go on with the text they have without a fault when a stage of their route is killed, when
//! their driver is killed (the coordinator resumes them on another driver),
//! when a stage stops answering (SIGSTOP), and when a driver does (its
//! streams move when it leaves the coordinator's pings unanswered); sessions of a dead driver are
//! freed within the lease. (A range left without a live replica, and its
//! re-placement by the coordinator: `placement.rs`.)

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use llama_cluster_proto::v1::coordinator_client::CoordinatorClient;
use llama_cluster_proto::v1::inference_response::Event;
use llama_cluster_proto::v1::worker_client::WorkerClient;
use llama_cluster_proto::v1::{InferenceRequest, InferenceResponse};
use llama_cluster_tests::{
    NodeProc, ReplicaCluster, split_with_cli, start_coordinator, test_dir, wait_for,
};

const STREAMS: usize = 8;
const TOKENS: u32 = 48;
/// Every worker's step budget, and the lease of a session without steps.
const STAGE_TIMEOUT_SECS: u64 = 3;
const LEASE_SECS: u64 = 5;
/// How long the coordinator lets a driver leave its pings unanswered.
const DRIVER_TIMEOUT_SECS: u64 = 3;

/// Stream `i`'s request: greedy, or (odd `i`) seeded sampling with the
/// frequency and presence penalties, whose state a resumed session must
/// rebuild from the tokens so far.
fn request(i: usize) -> InferenceRequest {
    let sampled = i % 2 == 1;
    InferenceRequest {
        prompt: format!("Write a short story about robot number {i}."),
        max_tokens: TOKENS,
        ignore_eos: true,
        temperature: if sampled { 0.8 } else { 0.0 },
        seed: i as u64,
        frequency_penalty: if sampled { 0.5 } else { 0.0 },
        presence_penalty: if sampled { 0.3 } else { 0.0 },
        ..Default::default()
    }
}

/// One stream's outcome.
#[derive(Debug)]
struct Run {
    tokens: Vec<i32>,
    text: String,
    /// Longest time between two chunks.
    max_gap: Duration,
    error: Option<tonic::Status>,
}

enum Target {
    Worker(String),
    Coordinator(String),
}

async fn open(
    target: &Target,
    req: InferenceRequest,
) -> Result<tonic::Streaming<InferenceResponse>, tonic::Status> {
    let connect = |a: &String| format!("http://{a}");
    match target {
        Target::Worker(a) => WorkerClient::connect(connect(a))
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?
            .inference(req)
            .await
            .map(|r| r.into_inner()),
        Target::Coordinator(a) => CoordinatorClient::connect(connect(a))
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?
            .inference(req)
            .await
            .map(|r| r.into_inner()),
    }
}

async fn stream(target: &Target, i: usize, seen: Arc<AtomicUsize>) -> Run {
    let mut run = Run {
        tokens: vec![],
        text: String::new(),
        max_gap: Duration::ZERO,
        error: None,
    };
    let mut s = match open(target, request(i)).await {
        Ok(s) => s,
        Err(e) => {
            run.error = Some(e);
            return run;
        }
    };
    let mut last = Instant::now();
    loop {
        match s.message().await {
            Ok(Some(m)) => {
                if let Some(Event::Chunk(c)) = m.event {
                    if run.tokens.len() == 5 {
                        seen.fetch_add(1, Ordering::Relaxed);
                    }
                    run.tokens.extend(c.token_ids);
                    run.text.push_str(&c.text);
                }
                run.max_gap = run.max_gap.max(last.elapsed());
                last = Instant::now();
            }
            Ok(None) => return run,
            Err(e) => {
                run.error = Some(e);
                return run;
            }
        }
    }
}

/// `STREAMS` concurrent streams to `target`; `fault` runs once every
/// stream has 5 tokens.
async fn streams_with_fault(target: Target, fault: impl FnOnce()) -> Vec<Run> {
    let target = Arc::new(target);
    let seen = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..STREAMS)
        .map(|i| {
            let (t, seen) = (target.clone(), seen.clone());
            tokio::spawn(async move { stream(&t, i, seen).await })
        })
        .collect();
    let t0 = Instant::now();
    while seen.load(Ordering::Relaxed) < STREAMS && t0.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fault();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[track_caller]
fn assert_same(what: &str, runs: &[Run], want: &[Run]) {
    for (i, (r, w)) in runs.iter().zip(want).enumerate() {
        assert!(
            r.error.is_none(),
            "{what}: stream {i} failed: {:?}",
            r.error
        );
        assert_eq!(r.tokens.len(), TOKENS as usize, "{what}: stream {i}: {r:?}");
        assert_eq!(
            r.tokens, w.tokens,
            "{what}: stream {i}: tokens differ from the run without a fault"
        );
        assert_eq!(r.text, w.text, "{what}: stream {i}: text differs");
    }
}

fn signal(w: &NodeProc, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &w.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {}", w.name);
}

async fn one_request(target: &Target) -> Result<String, tonic::Status> {
    let r = stream(target, 99, Arc::new(AtomicUsize::new(0))).await;
    match r.error {
        Some(e) => Err(e),
        None => Ok(r.text),
    }
}

async fn open_sessions(w: &NodeProc) -> Option<u32> {
    let st = w.status().await.ok()?;
    st.shards
        .iter()
        .find(|s| s.availability == "LOCAL")
        .map(|s| s.open_sessions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_the_loss_of_a_stage_a_driver_and_a_silent_stage() {
    let dir = test_dir("failover");
    let manifest = split_with_cli(&dir.join("split"), 2).unwrap();
    let timeout = STAGE_TIMEOUT_SECS.to_string();
    let lease = LEASE_SECS.to_string();
    let extra = [
        "--max-sessions",
        "8",
        "--stage-timeout-secs",
        timeout.as_str(),
        "--session-lease-secs",
        lease.as_str(),
    ];
    // w0, w2 serve shard 0; w1, w3 shard 1.
    let mut cluster = ReplicaCluster::start(&dir, &manifest, 170, 2, &extra)
        .await
        .unwrap();
    let driver_timeout = DRIVER_TIMEOUT_SECS.to_string();
    let coord = start_coordinator(
        &dir,
        &cluster.grpc_addrs(),
        &["--poll-ms", "500", "--driver-timeout-secs", &driver_timeout],
        &[],
    )
    .unwrap();
    let coord_addr = coord.ready["grpc_addr"].as_str().unwrap().to_string();
    wait_for(
        "the coordinator to see the drivers",
        Duration::from_secs(30),
        || async {
            one_request(&Target::Coordinator(coord_addr.clone()))
                .await
                .ok()
        },
    )
    .await
    .unwrap();

    // Without a fault.
    let want =
        streams_with_fault(Target::Worker(cluster.workers[0].grpc_addr.clone()), || {}).await;
    for (i, w) in want.iter().enumerate() {
        assert!(w.error.is_none(), "stream {i}: {:?}", w.error);
        assert_eq!(w.tokens.len(), TOKENS as usize);
    }

    // 1. A stage on the route (w1, not the driver) killed.
    let w0 = Target::Worker(cluster.workers[0].grpc_addr.clone());
    let runs = streams_with_fault(Target::Worker(cluster.workers[0].grpc_addr.clone()), || {
        cluster.workers[1].kill();
    })
    .await;
    assert_same("a stage killed", &runs, &want);
    one_request(&w0)
        .await
        .expect("a request right after the stage was killed");

    // 2. A driver killed (w2; the coordinator spreads the streams over w0,
    // w2 and w3, and w2 is a stage of some routes too).
    let coordinator = Target::Coordinator(coord_addr.clone());
    let victim = cluster.workers[2].child.id().to_string();
    let runs = streams_with_fault(Target::Coordinator(coord_addr.clone()), || {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &victim])
            .status();
    })
    .await;
    assert_same("a driver killed", &runs, &want);
    let killed_at = Instant::now();
    one_request(&coordinator)
        .await
        .expect("a request right after the driver was killed");
    // Sessions the dead driver held on the stages are freed within the lease.
    for i in [0, 3] {
        let w = &cluster.workers[i];
        wait_for(
            &format!("{}'s sessions to close", w.name),
            Duration::from_secs(LEASE_SECS + 5),
            || async { (open_sessions(w).await? == 0).then_some(()) },
        )
        .await
        .unwrap();
    }
    assert!(killed_at.elapsed() < Duration::from_secs(LEASE_SECS + 8));

    // 3. A stage that stops answering (SIGSTOP): a new replica of shard 1
    // (w4) joins, then w3 stops; the streams move to w4 within the step
    // budget and a margin.
    let w4 = cluster.worker(&dir, &manifest, 175, 1, &extra).unwrap();
    cluster.workers.push(w4);
    wait_for("w0 to see w4 ready", Duration::from_secs(60), || async {
        let st = cluster.workers[0].status().await.ok()?;
        st.shards
            .iter()
            .any(|s| {
                s.peer_id == cluster.workers[4].peer_id
                    && s.state == "ready"
                    && s.availability == "ONLINE"
            })
            .then_some(())
    })
    .await
    .unwrap();
    let stopped = &cluster.workers[3];
    let runs = streams_with_fault(Target::Worker(cluster.workers[0].grpc_addr.clone()), || {
        signal(stopped, "-STOP")
    })
    .await;
    signal(stopped, "-CONT");
    assert_same("a stage stopped", &runs, &want);
    let worst = runs.iter().map(|r| r.max_gap).max().unwrap_or_default();
    eprintln!("longest gap between two tokens at the SIGSTOP failover: {worst:?}");
    assert!(
        worst < Duration::from_secs(STAGE_TIMEOUT_SECS + 4),
        "failover took {worst:?}"
    );
    one_request(&w0).await.expect("a request after SIGCONT");

    // 4. A driver that stops answering (SIGSTOP w4, which drives some of
    // the coordinator's streams and is a stage of others) without closing
    // its connections, as a hung process or a machine gone from the
    // network: the coordinator's pings go unanswered, its streams resume on
    // another driver, the routes through it move within the step budget.
    let w4 = cluster.workers[4].grpc_addr.clone();
    wait_for(
        "the coordinator to know w4",
        Duration::from_secs(60),
        || async {
            let st = CoordinatorClient::connect(format!("http://{coord_addr}"))
                .await
                .ok()?
                .get_cluster_status(llama_cluster_proto::v1::GetClusterStatusRequest {})
                .await
                .ok()?
                .into_inner();
            st.workers
                .iter()
                .any(|w| w.grpc_addr == w4 && w.reachable)
                .then_some(())
        },
    )
    .await
    .unwrap();
    let failovers = || {
        let m = llama_cluster_tests::scrape_url(&format!(
            "http://{}/metrics",
            coord.ready["http_addr"].as_str().unwrap_or_default()
        ))
        .unwrap_or_default();
        llama_cluster_tests::metric(&m, "llama_cluster_coordinator_driver_failovers_total")
            .unwrap_or(0.0)
    };
    let before = failovers();
    let stopped = &cluster.workers[4];
    let runs = tokio::time::timeout(
        Duration::from_secs(90),
        streams_with_fault(Target::Coordinator(coord_addr.clone()), || {
            signal(stopped, "-STOP")
        }),
    )
    .await;
    signal(stopped, "-CONT");
    let runs = runs.expect("streams stalled on a silent driver for 90 s");
    assert_same("a driver stopped", &runs, &want);
    assert!(
        failovers() > before,
        "no stream was resumed on another driver: w4 drove none"
    );
    let worst = runs.iter().map(|r| r.max_gap).max().unwrap_or_default();
    eprintln!("longest gap between two tokens when a driver stopped: {worst:?}");
    // Found within the driver timeout; the resumed sessions may wait for
    // the stopped driver's sessions on the stages to end (the lease).
    assert!(
        worst < Duration::from_secs(DRIVER_TIMEOUT_SECS + LEASE_SECS + 4),
        "failover took {worst:?}"
    );
}
