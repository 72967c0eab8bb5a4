//! Shard files through the swarm, for the torrent tests: a split whose
//! middle shard (22 pieces) the downloaders fetch, workers started with
//! only its manifest, LoadShard, and the stored file and status of a
//! download.

use std::path::{Path, PathBuf};
use std::time::Duration;

use llama_cluster_proto::v1::{GetStatusResponse, LoadShardRequest};
use serde_json::Value;

use crate::{NodeProc, binary, split_with_cli_args, test_dir, wait_for, worker_args};

pub const WAIT: Duration = Duration::from_secs(90);

pub struct Split {
    pub manifest: PathBuf,
    /// Id and hash of the shard the leechers fetch (layers 10-19, 22 pieces).
    pub shard_id: String,
    pub hash: String,
    pub size: u64,
    pub file: String,
}

pub fn split(dir: &Path) -> Split {
    // Equal layer counts: the middle shard is the 22-piece file the tests count on.
    let manifest =
        split_with_cli_args(&dir.join("split"), &["--ranges", "0-9,10-19,20-29"]).unwrap();
    let m: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let s = &m["shards"][1];
    Split {
        shard_id: s["id"].as_str().unwrap().into(),
        hash: s["hash"].as_str().unwrap().into(),
        size: s["size"].as_u64().unwrap(),
        file: s["file"].as_str().unwrap().into(),
        manifest,
    }
}

/// A manifest without its files, as a fresh worker would have it.
pub fn bare_manifest(dir: &Path, name: &str, from: &Path) -> PathBuf {
    let d = dir.join(format!("{name}-manifest"));
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join("manifest.json");
    std::fs::copy(from, &p).unwrap();
    p
}

pub fn start(
    dir: &Path,
    name: &str,
    host: &str,
    boot: &str,
    manifest: &Path,
    extra: &[&str],
) -> NodeProc {
    start_with_env(dir, name, host, boot, manifest, extra, &[])
}

/// [`start`] with extra environment variables for the worker.
pub fn start_with_env(
    dir: &Path,
    name: &str,
    host: &str,
    boot: &str,
    manifest: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> NodeProc {
    let mut args = worker_args(host, &[boot], None);
    args.extend(["--manifest".into(), manifest.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    NodeProc::start_with_env(dir, name, &args, env).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

pub fn bootstrap(dir: &std::path::Path) -> NodeProc {
    crate::start_bootstrap(dir).expect("bootstrap starts")
}

pub fn stored_file(node: &NodeProc, hash: &str) -> PathBuf {
    node.log_path
        .with_file_name(format!("{}.cache", node.name))
        .join("torrents/files")
        .join(hash)
}

pub fn blake3_of(path: &Path) -> String {
    blake3::hash(&std::fs::read(path).unwrap())
        .to_hex()
        .to_string()
}

pub async fn seeding(node: &NodeProc, hash: &str) -> bool {
    node.status().await.is_ok_and(|st| {
        st.torrents
            .iter()
            .any(|t| t.file_hash == hash && t.state == "seeding")
    })
}

/// Waits (bounded) until `node` seeds file `hash`.
pub async fn wait_seeding(node: &NodeProc, hash: &str) {
    wait_for(&format!("{} seeding", node.name), WAIT, || async {
        seeding(node, hash).await.then_some(())
    })
    .await
    .unwrap();
}

pub fn torrent<'a>(
    st: &'a GetStatusResponse,
    hash: &str,
) -> Option<&'a llama_cluster_proto::v1::TorrentInfo> {
    st.torrents.iter().find(|t| t.file_hash == hash)
}

pub async fn load(
    node: &NodeProc,
    shard_id: &str,
) -> Result<llama_cluster_proto::v1::LoadShardResponse, tonic::Status> {
    node.client()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?
        .load_shard(LoadShardRequest {
            shard_id: shard_id.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// A test's directory, split and bootstrap node (`b`: its QUIC address),
/// and a worker seeding the split's files.
pub struct Seeded {
    pub dir: PathBuf,
    pub s: Split,
    /// The bootstrap node (kept running).
    pub boot: NodeProc,
    pub b: String,
    pub seeder: NodeProc,
}

/// [`Seeded`] for test `test`, its seeder at `host` started with `flags`.
pub async fn seeded(test: &str, host: &str, flags: &[&str]) -> Seeded {
    let dir = test_dir(test);
    let s = split(&dir);
    let boot = bootstrap(&dir);
    let b = boot.addr("quic-v1");
    let seeder = start(&dir, "seeder", host, &b, &s.manifest, flags);
    wait_seeding(&seeder, &s.hash).await;
    Seeded {
        dir,
        s,
        boot,
        b,
        seeder,
    }
}

/// A worker at `host` with only the manifest, after LoadShard of the
/// split's shard fetched its file through the swarm (checked: ready, and the
/// file's hash).
pub async fn loaded_leecher(dir: &Path, s: &Split, b: &str, host: &str) -> NodeProc {
    let m = bare_manifest(dir, "leech", &s.manifest);
    let leech = start(dir, "leech", host, b, &m, &[]);
    let r = load(&leech, &s.shard_id)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", leech.log()));
    assert_eq!(r.state, "ready");
    assert_eq!(blake3_of(&stored_file(&leech, &s.hash)), s.hash);
    leech
}

/// Runs `llama-worker fetch` of `hash` (no manifest, so no pin) as `name`
/// at `host`, bounded: whether it succeeded, and its log.
pub async fn fetch_cli(
    dir: &Path,
    name: &str,
    hash: &str,
    boot: &str,
    host: &str,
) -> (bool, String) {
    let log = dir.join(format!("{name}.log"));
    let fetch = tokio::process::Command::new(binary("llama-worker"))
        .args(["fetch", "--hash", hash, "--out"])
        .arg(dir.join(format!("{name}.out")))
        .args(["--bootstrap", boot, "--p2p-host", host])
        .args(["--grpc-addr", "127.0.0.1:0", "--cache-dir"])
        .arg(dir.join(format!("{name}.cache")))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .status();
    let st = tokio::time::timeout(Duration::from_secs(120), fetch)
        .await
        .expect("the fetch ends within 120 s")
        .unwrap();
    (
        st.success(),
        std::fs::read_to_string(&log).unwrap_or_default(),
    )
}
