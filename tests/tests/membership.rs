//! Only members get in (#18), on real processes: a cluster whose bootstrap
//! and workers hold a cluster key answers prompts; a node without the key
//! and one with a wrong key are disconnected, learn no shard record, get
//! none of theirs stored, never register at the rendezvous, and have no
//! command or piece request answered (`llama-worker send` and
//! `fetch`), while the same requests with the right key succeed; a member
//! that publishes a forged record for another member's shard is ignored
//! and logged, and the shard stays ready.

use std::path::Path;
use std::time::Duration;

use llama_cluster_proto::v1::InferenceRequest;
use llama_cluster_proto::v1::inference_response::Event;
use llama_cluster_proto::v1::worker_client::WorkerClient;
use llama_cluster_tests::{
    NodeProc, ReplicaCluster, binary, split_with_cli, test_dir, wait_for, worker_args,
};

fn keygen(path: &Path) {
    let out = std::process::Command::new(binary("llama-worker"))
        .args(["keygen", "--out"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

async fn complete(w: &NodeProc) -> Result<String, tonic::Status> {
    let mut c = WorkerClient::connect(format!("http://{}", w.grpc_addr))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut s = c
        .inference(InferenceRequest {
            prompt: "The capital of France is".into(),
            max_tokens: 8,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut text = String::new();
    while let Some(m) = s.message().await? {
        if let Some(Event::Chunk(c)) = m.event {
            text.push_str(&c.text);
        }
    }
    Ok(text)
}

/// `llama-worker send GET_STATUS` to `addr`, bounded.
fn send(addr: &str, key: Option<&Path>) -> (bool, String) {
    let mut cmd = std::process::Command::new(binary("llama-worker"));
    cmd.args([
        "send",
        "--addr",
        addr,
        "--command",
        "GET_STATUS",
        "--timeout-secs",
        "8",
    ]);
    cmd.env_remove("LLAMA_CLUSTER_KEY_FILE");
    if let Some(k) = key {
        cmd.arg("--cluster-key-file").arg(k);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && text.contains("\"ok\":true"), text)
}

/// `llama-worker fetch` of `hash` through `boot`, bounded: whether it
/// succeeded, and its output file.
async fn fetch(
    dir: &Path,
    name: &str,
    hash: &str,
    boot: &str,
    host: &str,
    key: Option<&Path>,
) -> (bool, std::path::PathBuf) {
    let out = dir.join(format!("{name}.out"));
    let mut cmd = tokio::process::Command::new(binary("llama-worker"));
    cmd.args(["fetch", "--hash", hash, "--out"])
        .arg(&out)
        .args(["--bootstrap", boot, "--p2p-host", host])
        .args(["--grpc-addr", "127.0.0.1:0", "--cache-dir"])
        .arg(dir.join(format!("{name}.cache")))
        .env_remove("LLAMA_CLUSTER_KEY_FILE")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
        .kill_on_drop(true);
    if let Some(k) = key {
        cmd.arg("--cluster-key-file").arg(k);
    }
    let ok = match tokio::time::timeout(Duration::from_secs(45), cmd.status()).await {
        Ok(st) => st.map(|s| s.success()).unwrap_or(false),
        Err(_) => false,
    };
    (ok, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_peers_that_prove_the_cluster_key_are_served() {
    let dir = test_dir("membership");
    let (key, wrong) = (dir.join("cluster.key"), dir.join("wrong.key"));
    keygen(&key);
    keygen(&wrong);
    let key_s = key.display().to_string();
    let keyed = ["--cluster-key-file", key_s.as_str()];
    let manifest = split_with_cli(&dir.join("split"), 2).unwrap();
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let hash = m["shards"][0]["hash"].as_str().unwrap().to_string();
    let size = m["shards"][0]["size"].as_u64().unwrap();
    let cluster = ReplicaCluster::start_with(&dir, &manifest, 200, 1, &keyed, &keyed)
        .await
        .unwrap();
    let (w0, w1) = (&cluster.workers[0], &cluster.workers[1]);
    let text = complete(w0).await.expect("the keyed cluster answers");
    assert!(!text.is_empty());
    let b = cluster.bootstrap.addr("quic-v1");
    let w0_tcp = w0.addr("tcp");
    // Members register at the (keyed) rendezvous.
    wait_for("w0 registered", Duration::from_secs(30), || async {
        cluster
            .bootstrap
            .log()
            .contains(&format!("{} registered in", w0.peer_id))
            .then_some(())
    })
    .await
    .unwrap();

    // Two outsiders dial the bootstrap and a worker.
    // Each announces a shard of its own, so it would put a record.
    let outsider = |name: &str, host: &str, extra: &[&str]| {
        let mut args = worker_args(host, &[&b, &w0_tcp], Some((name, "0-9")));
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        NodeProc::start_with_env(&dir, name, &args, &[]).unwrap()
    };
    let wrong_s = wrong.display().to_string();
    let nokey = outsider("nokey", "127.0.0.202", &[]);
    let wrongkey = outsider("wrongkey", "127.0.0.203", &["--cluster-key-file", &wrong_s]);
    let members_log = || format!("{}{}{}", cluster.bootstrap.log(), w0.log(), w1.log());
    // Either side ends the connection: the members (no or a wrong proof)
    // or the outsider (the members' proof does not match its key).
    for o in [&nokey, &wrongkey] {
        let needle = format!("[MEMBERSHIP] disconnecting {}", o.peer_id);
        wait_for(
            &format!("{} to be disconnected", o.name),
            Duration::from_secs(30),
            || async {
                (members_log().contains(&needle) || o.log().contains("[MEMBERSHIP] disconnecting"))
                    .then_some(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", members_log()));
    }
    // Some more time to learn anything they could.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for o in [&nokey, &wrongkey] {
        let st = o.status().await.unwrap();
        let learnt: Vec<_> = st
            .shards
            .iter()
            .filter(|s| s.peer_id == w0.peer_id || s.peer_id == w1.peer_id)
            .collect();
        assert!(learnt.is_empty(), "{} learnt records: {learnt:?}", o.name);
        for w in [w0, w1] {
            let st = w.status().await.unwrap();
            assert!(
                st.shards.iter().all(|s| s.peer_id != o.peer_id),
                "{} has a record of {}",
                w.name,
                o.name
            );
        }
    }
    for o in [&nokey, &wrongkey] {
        assert!(
            !members_log().contains(&format!("{} proved the cluster key", o.peer_id)),
            "{} was admitted",
            o.name
        );
        // Never registered at the rendezvous.
        assert!(
            !cluster
                .bootstrap
                .log()
                .contains(&format!("{} registered in", o.peer_id)),
            "{} registered at the rendezvous",
            o.name
        );
    }
    // Whichever side checked first names the wrong key.
    assert!(
        format!("{}{}", members_log(), wrongkey.log()).contains("wrong cluster key"),
        "the wrong key is named as such:\n{}",
        wrongkey.log()
    );

    // Commands: refused without the key and with a wrong one, answered
    // with the right one.
    let (ok, text) = send(&w0_tcp, None);
    assert!(!ok, "a command without the key was answered: {text}");
    let (ok, text) = send(&w0_tcp, Some(&wrong));
    assert!(!ok, "a command with a wrong key was answered: {text}");
    let (ok, text) = send(&w0_tcp, Some(&key));
    assert!(ok, "a command with the key: {text}");

    // Pieces: none without the key or with a wrong one; the whole file
    // with the right one.
    let (ok, out) = fetch(&dir, "fetch-nokey", &hash, &b, "127.0.0.204", None).await;
    assert!(!ok && !out.exists(), "fetched without the key");
    let (ok, out) = fetch(&dir, "fetch-wrong", &hash, &b, "127.0.0.205", Some(&wrong)).await;
    assert!(!ok && !out.exists(), "fetched with a wrong key");
    let (ok, out) = fetch(&dir, "fetch-key", &hash, &b, "127.0.0.206", Some(&key)).await;
    assert!(
        ok,
        "{}",
        std::fs::read_to_string(dir.join("fetch-key.log")).unwrap_or_default()
    );
    assert_eq!(std::fs::metadata(&out).unwrap().len(), size);

    // A member forges records for the shards it knows of (marking them
    // failed): they are ignored, logged, and the shards stay ready.
    let mut args = worker_args("127.0.0.207", &[&b], None);
    args.extend(keyed.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let forger = NodeProc::start_with_env(
        &dir,
        "forger",
        &args,
        &[("LLAMA_CLUSTER_TEST_FORGE_RECORDS", "true")],
    )
    .unwrap();
    let needle = format!("but is signed by {}", forger.peer_id);
    wait_for(
        "the forged record to be ignored",
        Duration::from_secs(60),
        || async { members_log().contains(&needle).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", forger.log(), members_log()));
    let log = members_log();
    let line = log
        .lines()
        .find(|l| l.contains(&needle))
        .unwrap_or_default();
    assert!(
        line.contains(&format!("it names peer {}", w0.peer_id))
            || line.contains(&format!("it names peer {}", w1.peer_id)),
        "{line}"
    );
    // Every member still sees the other's shard ready.
    for (a, b) in [(w0, w1), (w1, w0)] {
        let st = a.status().await.unwrap();
        let s = st
            .shards
            .iter()
            .find(|s| s.peer_id == b.peer_id)
            .unwrap_or_else(|| panic!("{} knows {}'s shard", a.name, b.name));
        assert_eq!(s.state, "ready", "{s:?}");
    }
    let text = complete(w0).await.expect("the keyed cluster still answers");
    assert!(!text.is_empty());
}
