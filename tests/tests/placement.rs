//! The coordinator places a model end to end: it is given one worker's
//! address and a 2-shard split, finds the other workers through the swarm,
//! plans by memory, sends LoadShard with the manifest inline, the workers
//! fetch their shards through the swarm (only one holds the files), the
//! cluster reaches SWARM_READY, and a completion streamed through the
//! coordinator equals single-node llama.cpp. A worker that leaves makes
//! SWARM_READY drop and re-placement brings it back; a worker that joins
//! gets work on the next round.

use std::time::{Duration, Instant};

use llama_cluster_engine::EngineSettings;
use llama_cluster_engine::baseline::Baseline;
use llama_cluster_proto::v1::coordinator_client::CoordinatorClient;
use llama_cluster_proto::v1::inference_response::Event;
use llama_cluster_proto::v1::{
    GetClusterStatusRequest, GetClusterStatusResponse, InferenceRequest,
};
use llama_cluster_tests::{
    NodeProc, ReplicaCluster, coordinator_ready, model_path, split_with_cli, start_coordinator,
    test_dir, wait_for, worker_args,
};
use tonic::transport::Channel;

const N_GEN: u32 = 16;
const WAIT: Duration = Duration::from_secs(120);

fn start_worker(
    dir: &std::path::Path,
    name: &str,
    host: &str,
    boot: &str,
    memory_mb: u32,
    manifest: Option<&std::path::Path>,
    extra: &[&str],
) -> NodeProc {
    let mut args = worker_args(host, &[boot], None);
    args.extend([
        "--memory-mb".into(),
        memory_mb.to_string(),
        "--threads".into(),
        "1".into(),
    ]);
    args.extend(extra.iter().map(|a| a.to_string()));
    if let Some(m) = manifest {
        args.extend(["--manifest".into(), m.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    NodeProc::start(dir, name, &args).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

async fn client_of(coord: &NodeProc) -> CoordinatorClient<Channel> {
    let addr = coord.ready["grpc_addr"].as_str().unwrap_or_default();
    CoordinatorClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

async fn cluster(c: &mut CoordinatorClient<Channel>) -> GetClusterStatusResponse {
    c.get_cluster_status(GetClusterStatusRequest {})
        .await
        .map(|r| r.into_inner())
        .unwrap_or_default()
}

/// The worker at `addr` has `shard` loaded and ready.
fn serves(st: &GetClusterStatusResponse, addr: &str, shard: &str) -> bool {
    st.workers.iter().any(|w| {
        w.grpc_addr == addr
            && w.status.as_ref().is_some_and(|s| {
                s.shards
                    .iter()
                    .any(|x| x.availability == "LOCAL" && x.shard_id == shard && x.state == "ready")
            })
    })
}

async fn complete(c: &mut CoordinatorClient<Channel>) -> Vec<i32> {
    try_complete(c).await.unwrap()
}

async fn try_complete(c: &mut CoordinatorClient<Channel>) -> Result<Vec<i32>, tonic::Status> {
    let mut stream = c
        .inference(InferenceRequest {
            prompt: "The capital of France is".into(),
            max_tokens: N_GEN,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut tokens = Vec::new();
    while let Some(m) = stream.message().await? {
        if let Some(Event::Chunk(c)) = m.event {
            tokens.extend(c.token_ids);
        }
    }
    Ok(tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_places_shards_by_memory_and_replans_on_leave_and_join() {
    let dir = test_dir("placement");
    let manifest = split_with_cli(&dir.join("split"), 2).unwrap();
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let ids: Vec<String> = m["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    let size = |i: usize| m["shards"][i]["size"].as_u64().unwrap();
    // The shard with the output head is the larger one.
    let (big, small) = if size(1) >= size(0) {
        (ids[1].clone(), ids[0].clone())
    } else {
        (ids[0].clone(), ids[1].clone())
    };
    let boot = llama_cluster_tests::start_bootstrap(&dir).unwrap();
    let b = boot.addr("quic-v1");
    // Only the seeder has the split; the others start with nothing.
    let seeder = start_worker(
        &dir,
        "seeder",
        "127.0.0.160",
        &b,
        4000,
        Some(&manifest),
        &[],
    );
    let mut w1 = start_worker(&dir, "w1", "127.0.0.161", &b, 2000, None, &[]);
    let w2 = start_worker(&dir, "w2", "127.0.0.162", &b, 1000, None, &[]);
    // The coordinator knows one worker; it finds the rest through it.
    let coord = start_coordinator(
        &dir,
        &seeder.grpc_addr,
        &[
            "--manifest",
            &manifest.display().to_string(),
            "--replicas",
            "1",
        ],
        &[],
    )
    .unwrap();
    let mut c = client_of(&coord).await;

    // Placement: the big shard on the biggest worker, the small one on the
    // next, the spare worker a replica; everyone ready; SWARM_READY.
    let st = wait_for("placement and SWARM_READY", WAIT, || {
        let mut c = c.clone();
        let (s, a, b2) = (
            seeder.grpc_addr.clone(),
            w1.grpc_addr.clone(),
            w2.grpc_addr.clone(),
        );
        let (big, small) = (big.clone(), small.clone());
        async move {
            let st = cluster(&mut c).await;
            (st.swarm_ready
                && serves(&st, &s, &big)
                && serves(&st, &a, &small)
                && serves(&st, &b2, &big))
            .then_some(st)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", coord.log()));
    let p = st.placement.clone().expect("placement status");
    assert!(p.error.is_empty(), "{}", p.error);
    assert_eq!(p.assignment.len(), 3, "{p:?}");
    assert_eq!(st.workers.len(), 3, "the bootstrap is no worker");
    for w in &st.workers {
        let r = w.status.as_ref().unwrap().resources.unwrap();
        assert!(r.memory_total_bytes > 0 && r.cpus >= 1, "{r:?}");
    }
    // The shards came through the swarm, not from disk.
    for w in [&w1, &w2] {
        let s = w.status().await.unwrap();
        let fetched: u64 = s.torrents.iter().map(|t| t.fetched_bytes).sum();
        assert!(fetched > 0, "{} fetched nothing", w.name);
    }
    // A completion through the coordinator equals single-node llama.cpp.
    let base = Baseline::load(
        &model_path(),
        EngineSettings {
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let want = base
        .greedy(&base.tokenize("The capital of France is"), N_GEN as usize)
        .unwrap()
        .tokens;
    let got = complete(&mut c).await;
    assert!(!got.is_empty());
    assert_eq!(got[..], want[..got.len()], "tokens differ from llama.cpp");

    // Leave: the only holder of the small shard goes; SWARM_READY drops …
    let w1_addr = w1.grpc_addr.clone();
    w1.kill();
    let st = cluster(&mut c).await;
    assert!(
        !st.swarm_ready,
        "SWARM_READY must drop with the small shard gone"
    );
    // … and re-placement (a replica of the big shard moves) brings it back.
    let st = wait_for("SWARM_READY again after re-placement", WAIT, || {
        let mut c = c.clone();
        let small = small.clone();
        let w1_addr = w1_addr.clone();
        async move {
            let st = cluster(&mut c).await;
            (st.swarm_ready
                && st
                    .workers
                    .iter()
                    .any(|w| w.grpc_addr != w1_addr && serves(&st, &w.grpc_addr, &small)))
            .then_some(st)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", coord.log()));
    assert!(st.placement.unwrap().loads_sent >= 4);
    let got = complete(&mut c).await;
    assert_eq!(got[..], want[..got.len()], "tokens after re-placement");

    // Join: a new worker is found through the swarm and gets a shard.
    let w3 = start_worker(&dir, "w3", "127.0.0.163", &b, 1500, None, &[]);
    let w3_addr = w3.grpc_addr.clone();
    wait_for("the joiner to get work", WAIT, || {
        let mut c = c.clone();
        let (w3_addr, ids) = (w3_addr.clone(), ids.clone());
        async move {
            let st = cluster(&mut c).await;
            (st.swarm_ready && ids.iter().any(|id| serves(&st, &w3_addr, id))).then_some(())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", coord.log(), w3.log()));
    assert!(coord.log().contains("[PLACEMENT]"));

    // The CLI table through the coordinator: resources, placement, readiness.
    let out = std::process::Command::new(llama_cluster_tests::binary("llama-coordinator"))
        .args([
            "status",
            "--coordinator",
            coord.ready["grpc_addr"].as_str().unwrap(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for needle in [
        "MEM MiB",
        "FETCHING",
        "SWARM_READY: yes",
        "placement of smollm2-135m-instruct",
        &w3_addr,
    ] {
        assert!(text.contains(needle), "{needle:?} missing in:\n{text}");
    }
    // The worker that left is listed as unreachable until the coordinator
    // forgets it (5 polls without an answer), and never as a live worker.
    for line in text.lines().filter(|l| l.contains(&w1_addr)) {
        assert!(line.contains("unreachable"), "the worker that left: {text}");
    }
    assert!(
        text.contains(&format!("{w1_addr} ")) && text.contains("unreachable")
            || coord.log().contains(&format!("worker {w1_addr} forgotten")),
        "the worker that left is neither unreachable nor forgotten: {text}"
    );
}

/// A model that cannot fit is refused with what is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_does_not_fit_is_refused_with_a_reason() {
    let dir = test_dir("placement-nofit");
    let manifest = split_with_cli(&dir.join("split"), 2).unwrap();
    let boot = llama_cluster_tests::start_bootstrap(&dir).unwrap();
    let b = boot.addr("quic-v1");
    // Two workers offering 80 MiB each: no shard fits (each needs > 80 MiB).
    let a = start_worker(&dir, "a", "127.0.0.170", &b, 80, Some(&manifest), &[]);
    let _b = start_worker(&dir, "b", "127.0.0.171", &b, 80, None, &[]);
    let coord = start_coordinator(
        &dir,
        &a.grpc_addr,
        &["--manifest", &manifest.display().to_string()],
        &[],
    )
    .unwrap();
    let mut c = client_of(&coord).await;
    let err = wait_for("a placement error", Duration::from_secs(30), || {
        let mut c = c.clone();
        async move {
            let st = cluster(&mut c).await;
            let e = st.placement?.error;
            (e.contains("offers") && st.workers.len() == 2).then_some(e)
        }
    })
    .await
    .unwrap();
    assert!(
        err.contains("needs") && err.contains("MiB") && err.contains("80 MiB"),
        "{err}"
    );
    let st = cluster(&mut c).await;
    assert!(!st.swarm_ready);
    assert_eq!(st.placement.unwrap().loads_sent, 0);

    // A manifest sent inline is checked before anything is written or
    // fetched: not JSON, or naming a file outside the worker's cache.
    let mut w = a.client().await.unwrap();
    let first: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let first_id = first["shards"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let load = |json: String| llama_cluster_proto::v1::LoadShardRequest {
        shard_id: first_id.clone(),
        manifest_json: json,
        ..Default::default()
    };
    let e = w.load_shard(load("{not json".into())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    m["shards"][0]["file"] = "../../../../tmp/evil.gguf".into();
    let e = w.load_shard(load(m.to_string())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("not a plain file name"), "{e:?}");
}

/// The last replica of a range gone (#16): requests through the coordinator
/// fail with UNAVAILABLE naming the range, within a bounded time, while no
/// worker can take the shard; once a worker joins, the coordinator places
/// the shard on it (fetched through the swarm) and the same request
/// succeeds with the same tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_replica_gone_fails_with_unavailable_until_the_coordinator_re_places_it() {
    let dir = test_dir("last-replica");
    let manifest = split_with_cli(&dir.join("split"), 2).unwrap();
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let ids = llama_cluster_tests::shard_ids_of(&manifest).unwrap();
    let boot = llama_cluster_tests::start_bootstrap(&dir).unwrap();
    let b = boot.addr("quic-v1");
    let fast = ["--stage-timeout-secs", "3"];
    // Both hold the split; the coordinator gives each one shard.
    let mut ws = [
        start_worker(&dir, "a", "127.0.0.172", &b, 2000, Some(&manifest), &fast),
        start_worker(&dir, "z", "127.0.0.173", &b, 2000, Some(&manifest), &fast),
    ];
    let coord = start_coordinator(
        &dir,
        &ws[0].grpc_addr,
        &[
            "--manifest",
            &manifest.display().to_string(),
            "--replicas",
            "1",
            "--poll-ms",
            "500",
        ],
        &[],
    )
    .unwrap();
    coordinator_ready(&coord, WAIT).await;
    let mut c = client_of(&coord).await;
    let want = wait_for("a first completion", WAIT, || {
        let mut c = c.clone();
        async move { try_complete(&mut c).await.ok() }
    })
    .await
    .unwrap();
    assert!(!want.is_empty());

    // The holder of the last shard goes: the other one still drives.
    let st = cluster(&mut c).await;
    let last = ws
        .iter()
        .position(|w| serves(&st, &w.grpc_addr, &ids[1]))
        .expect("a worker serves the last shard");
    ws[last].kill();
    let t0 = Instant::now();
    let e = loop {
        match try_complete(&mut c).await {
            Err(e) => break e,
            Ok(_) => assert!(
                t0.elapsed() < Duration::from_secs(30),
                "still served 30 s after the last replica went"
            ),
        }
    };
    let took = t0.elapsed();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    let range = format!(
        "layers {}-{}",
        m["shards"][1]["layer_start"], m["shards"][1]["layer_end"]
    );
    assert!(e.message().contains(&range), "{}", e.message());
    assert!(took < Duration::from_secs(20), "UNAVAILABLE after {took:?}");
    eprintln!("UNAVAILABLE after {took:?}: {}", e.message());
    // Nobody can take the shard (the survivor serves the other one): the
    // answer stays UNAVAILABLE rather than hanging.
    let e = try_complete(&mut c).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");

    // A worker joins with nothing: the coordinator places the shard on it,
    // it fetches the file through the swarm, and requests succeed again.
    let j = start_worker(&dir, "joiner", "127.0.0.174", &b, 2000, None, &fast);
    let got = wait_for("the shard re-placed and served", WAIT, || {
        let mut c = c.clone();
        async move { try_complete(&mut c).await.ok() }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", coord.log(), j.log()));
    assert_eq!(got, want, "tokens after re-placement");
    let st = cluster(&mut c).await;
    assert!(
        serves(&st, &j.grpc_addr, &ids[1]),
        "the joiner serves the last shard"
    );
    assert!(coord.log().contains("[PLACEMENT]"));
}

/// A coordinator that starts beside a running cluster and is given only
/// two replicas of the same shard (the others are found through them, as
/// with one seed address after a restart) adopts the placement it finds:
/// it plans only once it has polled every worker it found, so no live
/// shard is unloaded and loaded again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_knows_part_of_a_running_cluster_moves_no_shard() {
    let dir = test_dir("adopt-partial");
    let manifest = split_with_cli(&dir.join("split"), 2).unwrap();
    let replicas = ReplicaCluster::start(&dir, &manifest, 244, 2, &[])
        .await
        .unwrap();
    // Workers 0 and 2 serve shard 0; 1 and 3 serve shard 1.
    let seeds = format!(
        "{},{}",
        replicas.workers[0].grpc_addr, replicas.workers[2].grpc_addr
    );
    let m = manifest.display().to_string();
    let args = ["--manifest", &m, "--replicas", "2", "--poll-ms", "250"];
    let coord = start_coordinator(&dir, &seeds, &args, &[]).unwrap();
    coordinator_ready(&coord, WAIT).await;
    let mut c = client_of(&coord).await;
    assert!(!complete(&mut c).await.is_empty());
    // Some more placement rounds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = coord.log();
    assert!(
        !log.contains(" → shard ") && !log.contains("[PLACEMENT] the model has"),
        "the coordinator planned on part of the cluster:\n{log}"
    );
    for w in &replicas.workers {
        assert!(
            !w.log().contains("Worker/LoadShard"),
            "{} was told to load a shard:\n{}",
            w.name,
            w.log()
        );
    }
}
