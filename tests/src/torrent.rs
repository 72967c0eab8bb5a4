//! Shard files through the swarm, for the torrent tests: a split whose
//! middle shard (22 pieces) the downloaders fetch, workers started with
//! only its manifest, LoadShard, and the stored file and status of a
//! download.

use std::path::{Path, PathBuf};
use std::time::Duration;

use llama_cluster_proto::v1::{GetStatusResponse, LoadShardRequest};
use serde_json::Value;

use crate::{NodeProc, split_with_cli_args, wait_for, worker_args};

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
