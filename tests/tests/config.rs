//! Configuration through the real binary: defaults < TOML file < environment
//! < flags, and bad values rejected with the field named and a non-zero exit.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use llama_cluster_tests::{NodeProc, binary, test_dir};

/// Runs llama-worker expecting it to fail fast; returns (exit code, stderr).
fn run_failing(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let dir = test_dir("config-fail");
    let err_path = dir.join("stderr");
    let mut cmd = Command::new(binary("llama-worker"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("llama-worker {args:?} did not exit on a bad configuration");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        status.code().unwrap_or(-1),
        std::fs::read_to_string(err_path).unwrap(),
    )
}

#[test]
fn bad_values_name_the_field_and_exit_non_zero() {
    let base = ["--p2p-host", "127.0.0.1", "--grpc-addr", "127.0.0.1:0"];
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    }
    let (code, err) = run_failing(&with(&base, &["--p2p-port", "abc"]), &[]);
    assert_ne!(code, 0);
    assert!(err.contains("p2p_port"), "{err}");
    let (code, err) = run_failing(&base, &[("LLAMA_CLUSTER_QUIC", "maybe")]);
    assert_ne!(code, 0);
    assert!(err.contains("quic"), "{err}");
    let (code, err) = run_failing(
        &with(&base, &["--shard-id", "s", "--shard-layers", "9-1"]),
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("shard_layers"), "{err}");
    let (code, err) = run_failing(&with(&base, &["--bootstrap", "not-an-address"]), &[]);
    assert_ne!(code, 0);
    assert!(err.contains("bootstrap"), "{err}");
    let (code, err) = run_failing(&with(&base, &["--runtime-threads", "5000"]), &[]);
    assert_ne!(code, 0);
    assert!(err.contains("runtime_threads"), "{err}");
    let dir = test_dir("config-file");
    let file = dir.join("bad.toml");
    std::fs::write(&file, "clutser = \"typo\"\n").unwrap();
    let (code, err) = run_failing(&with(&base, &["--config", file.to_str().unwrap()]), &[]);
    assert_ne!(code, 0);
    assert!(err.contains("clutser"), "{err}");
    let (code, err) = run_failing(&with(&base, &["--config", "/nonexistent/llama.toml"]), &[]);
    assert_ne!(code, 0);
    assert!(err.contains("does not exist"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_beat_env_which_beats_the_file() {
    let dir = test_dir("config-precedence");
    let file = dir.join("node.toml");
    std::fs::write(
        &file,
        "cluster = \"from-file\"\nshard_id = \"file-shard\"\nshard_layers = \"0-3\"\nshard_model = \"file-model\"\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let common = [
        "--p2p-host",
        "127.0.0.15",
        "--grpc-addr",
        "127.0.0.1:0",
        "--config",
        f,
    ];
    let env = [
        ("LLAMA_CLUSTER_CLUSTER", "from-env"),
        ("LLAMA_CLUSTER_SHARD_LAYERS", "4-7"),
    ];

    let n = NodeProc::start_with_env(&dir, "file-only", &common, &[]).unwrap();
    let st = n.status().await.unwrap();
    assert_eq!(st.cluster, "from-file");
    assert_eq!(
        (st.shards[0].shard_id.as_str(), st.shards[0].layer_start),
        ("file-shard", 0)
    );
    drop(n);

    let n = NodeProc::start_with_env(&dir, "env", &common, &env).unwrap();
    let st = n.status().await.unwrap();
    assert_eq!(st.cluster, "from-env");
    assert_eq!((st.shards[0].layer_start, st.shards[0].layer_end), (4, 7));
    assert_eq!(st.shards[0].model, "file-model");
    drop(n);

    let mut args = common.to_vec();
    args.extend(["--cluster", "from-flag"]);
    let n = NodeProc::start_with_env(&dir, "flag", &args, &env).unwrap();
    let st = n.status().await.unwrap();
    assert_eq!(st.cluster, "from-flag");
    assert_eq!(st.shards[0].layer_start, 4);
    assert!(n.log().contains("async runtime threads: 1"), "{}", n.log());
    assert!(runtime_threads(&n) >= 1);
    drop(n);

    // The runtime is sized from the configuration (here the environment).
    let n = NodeProc::start_with_env(
        &dir,
        "runtime",
        &common,
        &[("LLAMA_CLUSTER_RUNTIME_THREADS", "3")],
    )
    .unwrap();
    n.status().await.unwrap();
    assert!(n.log().contains("async runtime threads: 3"), "{}", n.log());
    assert!(runtime_threads(&n) >= 3);
}

/// Threads of a process named by tokio (runtime workers, and blocking-pool
/// threads if any were started).
fn runtime_threads(n: &NodeProc) -> usize {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", n.child.id())).unwrap();
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim() == "tokio-rt-worker")
        .count()
}
