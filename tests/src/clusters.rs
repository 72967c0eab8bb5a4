//! Clusters of real processes for the tests: a bootstrap and one worker
//! per shard ([`PipelineCluster`]), or several replicas of each
//! ([`ReplicaCluster`]), every shard loaded and seen ready.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::anyhow;
use serde_json::Value;

use crate::{NodeProc, start_bootstrap, start_bootstrap_with, wait_for, worker_args};

/// A bootstrap node and one worker per shard of `manifest`, each on its own
/// 127.0.0.x address, every shard loaded; `extra` args go to every worker.
pub struct PipelineCluster {
    pub bootstrap: NodeProc,
    pub workers: Vec<NodeProc>,
    pub shard_ids: Vec<String>,
    pub manifest: PathBuf,
}

impl PipelineCluster {
    pub async fn start(
        dir: &Path,
        manifest: &Path,
        first_host: u8,
        extra: &[&str],
    ) -> anyhow::Result<PipelineCluster> {
        Self::start_with_env(dir, manifest, first_host, extra, &[]).await
    }

    /// As [`PipelineCluster::start`], with environment variables for every worker.
    pub async fn start_with_env(
        dir: &Path,
        manifest: &Path,
        first_host: u8,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<PipelineCluster> {
        let shard_ids = shard_ids_of(manifest)?;
        let bootstrap = start_bootstrap(dir)?;
        // Workers without QUIC reach the bootstrap node over TCP.
        let b = bootstrap.addr(if extra.contains(&"--no-quic") {
            "tcp"
        } else {
            "quic-v1"
        });
        let mut workers = Vec::new();
        for (i, id) in shard_ids.iter().enumerate() {
            let host = format!("127.0.0.{}", first_host as usize + i);
            let mut args = worker_args(&host, &[&b], None);
            args.extend([
                "--manifest".into(),
                manifest.display().to_string(),
                "--shard-id".into(),
                id.clone(),
            ]);
            args.extend(["--metrics-addr".into(), "127.0.0.1:0".into()]);
            if !extra.contains(&"--threads") {
                // 2 cores shared by every process of a test: one thread each.
                args.extend(["--threads".into(), "1".into()]);
            }
            args.extend(extra.iter().map(|s| s.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            workers.push(NodeProc::start_with_env(
                dir,
                &format!("stage{i}"),
                &args,
                env,
            )?);
        }
        let c = PipelineCluster {
            bootstrap,
            workers,
            shard_ids,
            manifest: manifest.to_path_buf(),
        };
        for w in &c.workers {
            c.wait_ready_from(w).await?;
        }
        Ok(c)
    }

    /// The workers' gRPC addresses, comma-separated.
    pub fn grpc_addrs(&self) -> String {
        grpc_addrs(&self.workers)
    }

    /// Waits until `node` sees every shard ready and reachable.
    pub async fn wait_ready_from(&self, node: &NodeProc) -> anyhow::Result<()> {
        wait_until_ready(
            node,
            "every shard",
            Duration::from_secs(60),
            |s| {
                self.shard_ids
                    .contains(&s.shard_id)
                    .then(|| s.shard_id.clone())
            },
            self.shard_ids.len(),
        )
        .await
    }
}

/// The shard ids of a split manifest, in order.
pub fn shard_ids_of(manifest: &Path) -> anyhow::Result<Vec<String>> {
    let m: Value = serde_json::from_slice(&std::fs::read(manifest)?)?;
    Ok(m["shards"]
        .as_array()
        .ok_or_else(|| anyhow!("manifest has no shards"))?
        .iter()
        .filter_map(|s| s["id"].as_str().map(String::from))
        .collect())
}

/// Waits until `node` sees ready, reachable shard records for `n` distinct
/// keys (`key`: the record's key, `None` for records that do not count).
async fn wait_until_ready(
    node: &NodeProc,
    what: &str,
    timeout: Duration,
    key: impl Fn(&llama_cluster_proto::v1::ShardInfo) -> Option<String>,
    n: usize,
) -> anyhow::Result<()> {
    let key = &key;
    wait_for(
        &format!("{} to see {what} ready", node.name),
        timeout,
        || async move {
            let st = node.status().await.ok()?;
            let seen: std::collections::HashSet<String> = st
                .shards
                .iter()
                .filter(|s| s.state == "ready" && s.availability != "OFFLINE")
                .filter_map(key)
                .collect();
            (seen.len() >= n).then_some(())
        },
    )
    .await
    .map_err(|e| anyhow!("{e}\n{}", node.log()))
}

/// A bootstrap node and `replicas` workers per shard of `manifest` (worker
/// `r * shards + i` serves shard `i`), each on its own 127.0.0.x address
/// from `first_host`, every shard loaded; `extra` args go to every worker.
pub struct ReplicaCluster {
    pub bootstrap: NodeProc,
    pub workers: Vec<NodeProc>,
    pub shard_ids: Vec<String>,
}

impl ReplicaCluster {
    pub async fn start(
        dir: &Path,
        manifest: &Path,
        first_host: u8,
        replicas: usize,
        extra: &[&str],
    ) -> anyhow::Result<ReplicaCluster> {
        Self::start_with(dir, manifest, first_host, replicas, extra, &[]).await
    }

    /// [`ReplicaCluster::start`], with `bootstrap_extra` args for the
    /// bootstrap node.
    pub async fn start_with(
        dir: &Path,
        manifest: &Path,
        first_host: u8,
        replicas: usize,
        extra: &[&str],
        bootstrap_extra: &[&str],
    ) -> anyhow::Result<ReplicaCluster> {
        let shard_ids = shard_ids_of(manifest)?;
        let bootstrap = start_bootstrap_with(dir, bootstrap_extra)?;
        let mut c = ReplicaCluster {
            bootstrap,
            workers: Vec::new(),
            shard_ids,
        };
        for r in 0..replicas {
            for i in 0..c.shard_ids.len() {
                let n = r * c.shard_ids.len() + i;
                let w = c.worker(dir, manifest, first_host + n as u8, i, extra)?;
                c.workers.push(w);
            }
        }
        for w in &c.workers {
            c.wait_all_ready_from(w).await?;
        }
        Ok(c)
    }

    /// Starts one more worker on 127.0.0.`host` serving shard `index` (not
    /// added to `workers`; not waited for).
    pub fn worker(
        &self,
        dir: &Path,
        manifest: &Path,
        host: u8,
        index: usize,
        extra: &[&str],
    ) -> anyhow::Result<NodeProc> {
        let b = self.bootstrap.addr("quic-v1");
        let mut args = worker_args(&format!("127.0.0.{host}"), &[&b], None);
        args.extend([
            "--manifest".into(),
            manifest.display().to_string(),
            "--shard-id".into(),
            self.shard_ids[index].clone(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--threads".into(),
            "1".into(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        NodeProc::start(dir, &format!("w{host}-s{index}"), &args)
    }

    /// The workers' gRPC addresses, comma-separated.
    pub fn grpc_addrs(&self) -> String {
        grpc_addrs(&self.workers)
    }

    /// Waits until `node` sees every worker's shard ready and reachable.
    pub async fn wait_all_ready_from(&self, node: &NodeProc) -> anyhow::Result<()> {
        let peers: Vec<String> = self.workers.iter().map(|w| w.peer_id.clone()).collect();
        wait_until_ready(
            node,
            "every replica",
            Duration::from_secs(90),
            |s| peers.contains(&s.peer_id).then(|| s.peer_id.clone()),
            peers.len(),
        )
        .await
    }
}

/// The gRPC addresses of `workers`, comma-separated.
fn grpc_addrs(workers: &[NodeProc]) -> String {
    workers
        .iter()
        .map(|w| w.grpc_addr.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// Waits until the coordinator `coord` says SWARM_READY (its placement
/// done, every shard ready) and returns that cluster status; panics with
/// the coordinator's log after `timeout`.
pub async fn coordinator_ready(
    coord: &NodeProc,
    timeout: Duration,
) -> llama_cluster_proto::v1::GetClusterStatusResponse {
    use llama_cluster_proto::v1::GetClusterStatusRequest;
    use llama_cluster_proto::v1::coordinator_client::CoordinatorClient;
    let addr = coord.ready["grpc_addr"].as_str().unwrap_or_default();
    let c = CoordinatorClient::connect(format!("http://{addr}"))
        .await
        .unwrap_or_else(|e| panic!("coordinator at {addr:?}: {e}\n{}", coord.log()));
    wait_for("the coordinator's SWARM_READY", timeout, || {
        let mut c = c.clone();
        async move {
            let st = c
                .get_cluster_status(GetClusterStatusRequest {})
                .await
                .ok()?
                .into_inner();
            st.swarm_ready.then_some(st)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", coord.log()))
}
