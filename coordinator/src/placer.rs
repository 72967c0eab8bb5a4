//! The coordinator's control loop: the workers it knows (the configured
//! addresses plus every worker their status names as a peer), and, with a
//! split manifest, placement carried out: each round plans with the live
//! workers (`placement::plan`) and sends `LoadShard` (with the manifest
//! inline) to every worker that must change; workers fetch their shard
//! through the swarm.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use llama_cluster_proto::v1::worker_client::WorkerClient;
use llama_cluster_proto::v1::{GetStatusResponse, LoadShardRequest, Placement};
use tracing::{Instrument, info, info_span, warn};

use crate::placement::{self, ShardSpec, WorkerView};

/// How long a LoadShard may take (fetching a shard through the swarm
/// included) before the worker counts as free again.
const LOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// How long a worker whose LoadShard failed is left out of placement.
const FAILED_BACKOFF: Duration = Duration::from_secs(30);

/// The workers the coordinator talks to: configured, then discovered.
#[derive(Clone, Default)]
pub struct WorkerSet(Arc<RwLock<(BTreeSet<String>, BTreeSet<String>)>>);

impl WorkerSet {
    pub fn new(seed: impl IntoIterator<Item = String>) -> Self {
        WorkerSet(Arc::new(RwLock::new((
            seed.into_iter().collect(),
            BTreeSet::new(),
        ))))
    }

    /// Worker gRPC addresses, sorted.
    pub fn list(&self) -> Vec<String> {
        let g = self.0.read().unwrap_or_else(|e| e.into_inner());
        g.0.iter().cloned().collect()
    }

    /// Learns the workers named in `statuses` (their peers' gRPC addresses)
    /// and forgets nodes that turned out not to be workers (the bootstrap).
    pub fn learn(&self, statuses: &[(String, GetStatusResponse)]) {
        let mut g = self.0.write().unwrap_or_else(|e| e.into_inner());
        for (addr, st) in statuses {
            if st.role == "bootstrap" {
                g.0.remove(addr);
                g.1.insert(addr.clone());
            }
        }
        for (_, st) in statuses {
            for p in &st.peers {
                if !p.grpc_addr.is_empty()
                    && !g.1.contains(&p.grpc_addr)
                    && g.0.insert(p.grpc_addr.clone())
                {
                    info!(
                        "[DISCOVERY] worker {} found through {}",
                        p.grpc_addr, st.peer_id
                    );
                }
            }
        }
    }
}

/// A split manifest as the coordinator needs it.
#[derive(Debug, Clone)]
pub struct ManifestInfo {
    pub model: String,
    pub json: String,
    pub shards: Vec<ShardSpec>,
}

impl ManifestInfo {
    pub fn load(path: &Path) -> anyhow::Result<ManifestInfo> {
        let json = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read manifest {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&json)
            .with_context(|| format!("manifest {} is not JSON", path.display()))?;
        let model = v["model"].as_str().unwrap_or_default().to_string();
        let mut shards = Vec::new();
        for s in v["shards"].as_array().into_iter().flatten() {
            let (Some(id), Some(a), Some(b), Some(size)) = (
                s["id"].as_str(),
                s["layer_start"].as_u64(),
                s["layer_end"].as_u64(),
                s["size"].as_u64(),
            ) else {
                bail!(
                    "manifest {}: a shard lacks id, layers or file size",
                    path.display()
                );
            };
            shards.push(ShardSpec {
                id: id.into(),
                layer_start: a as u32,
                layer_end: b as u32,
                size,
            });
        }
        if model.is_empty() || shards.is_empty() {
            bail!("manifest {} names no model or no shard", path.display());
        }
        Ok(ManifestInfo {
            model,
            json,
            shards,
        })
    }
}

/// Placement carried out round after round.
#[derive(Clone)]
pub struct Placer(Arc<PlacerInner>);

struct PlacerInner {
    manifest: ManifestInfo,
    replicas: usize,
    /// LoadShard calls under way: worker → (shard, since).
    pending: Mutex<HashMap<String, (String, Instant)>>,
    /// Workers whose last LoadShard failed, left alone until then.
    backoff: Mutex<HashMap<String, Instant>>,
    status: Mutex<Placement>,
}

impl Placer {
    pub fn new(manifest: ManifestInfo, replicas: usize) -> Placer {
        let status = Placement {
            model: manifest.model.clone(),
            replicas: replicas as u32,
            ..Default::default()
        };
        Placer(Arc::new(PlacerInner {
            manifest,
            replicas: replicas.max(1),
            pending: Mutex::new(HashMap::new()),
            backoff: Mutex::new(HashMap::new()),
            status: Mutex::new(status),
        }))
    }

    /// The last plan (or why there is none).
    pub fn status(&self) -> Placement {
        self.0
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether every shard of the placed model is ready on a worker that
    /// answered (the coordinator's own view of SWARM_READY).
    pub fn covered(&self, statuses: &[(String, GetStatusResponse)]) -> bool {
        let m = &self.0.manifest;
        m.shards.iter().all(|spec| {
            statuses.iter().any(|(_, st)| {
                st.shards.iter().any(|s| {
                    s.availability == "LOCAL"
                        && s.model == m.model
                        && s.shard_id == spec.id
                        && s.state == "ready"
                })
            })
        })
    }

    /// One round: the live workers as placement sees them, a plan, and a
    /// LoadShard for every move.
    pub fn round(&self, statuses: &[(String, GetStatusResponse)]) {
        let m = &self.0.manifest;
        let mut pending = self.0.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|_, (_, since)| since.elapsed() < LOAD_TIMEOUT);
        let mut backoff = self.0.backoff.lock().unwrap_or_else(|e| e.into_inner());
        backoff.retain(|_, until| *until > Instant::now());
        let views: Vec<WorkerView> = statuses
            .iter()
            .filter(|(addr, st)| st.role != "bootstrap" && !backoff.contains_key(addr))
            .map(|(addr, st)| {
                let local = st.shards.iter().find(|s| {
                    s.availability == "LOCAL"
                        && s.model == m.model
                        && (s.state == "ready" || s.state == "loading")
                });
                WorkerView {
                    addr: addr.clone(),
                    budget: st
                        .resources
                        .as_ref()
                        .map(|r| r.memory_budget_bytes)
                        .unwrap_or(0),
                    serving: pending
                        .get(addr)
                        .map(|(s, _)| s.clone())
                        .or_else(|| local.map(|s| s.shard_id.clone())),
                }
            })
            .collect();
        let result = placement::plan(&m.shards, &views, self.0.replicas);
        let mut status = self.0.status.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Err(e) => {
                if status.error != e.to_string() {
                    warn!("[PLACEMENT] {e}");
                }
                status.error = e.to_string();
            }
            Ok(plan) => {
                if !status.error.is_empty() {
                    info!("[PLACEMENT] the model fits again");
                }
                status.error.clear();
                status.assignment = plan.assignment.clone().into_iter().collect();
                status.short = plan.short.clone();
                for mv in plan.moves {
                    status.loads_sent += 1;
                    info!(
                        "[PLACEMENT] {} → shard {} (was {})",
                        mv.addr,
                        mv.to,
                        mv.from.as_deref().unwrap_or("idle")
                    );
                    pending.insert(mv.addr.clone(), (mv.to.clone(), Instant::now()));
                    let me = self.clone();
                    let span =
                        info_span!("placement.load_shard", worker = %mv.addr, shard = %mv.to);
                    tokio::spawn(async move { me.load(mv.addr, mv.to).await }.instrument(span));
                }
            }
        }
    }

    async fn load(&self, addr: String, shard: String) {
        let r = async {
            let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
                .connect_timeout(Duration::from_secs(5))
                .timeout(LOAD_TIMEOUT)
                .connect()
                .await?;
            let out =
                WorkerClient::with_interceptor(ch, llama_cluster_shared::telemetry::inject_grpc)
                    .load_shard(LoadShardRequest {
                        shard_id: shard.clone(),
                        manifest_json: self.0.manifest.json.clone(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
            anyhow::Ok(out.state)
        }
        .await;
        match r {
            Ok(state) => info!("[PLACEMENT] {addr}: shard {shard} {state}"),
            Err(e) => {
                warn!(
                    "[PLACEMENT] {addr}: loading shard {shard} failed: {e:#}; retrying in {FAILED_BACKOFF:?}"
                );
                self.0
                    .backoff
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(addr.clone(), Instant::now() + FAILED_BACKOFF);
            }
        }
        self.0
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&addr);
    }
}

/// Shards per worker of a placement, for display.
pub fn assignment_lines(p: &Placement) -> Vec<String> {
    let by_shard: BTreeMap<&str, Vec<&str>> =
        p.assignment
            .iter()
            .fold(BTreeMap::new(), |mut acc, (w, s)| {
                acc.entry(s.as_str()).or_default().push(w.as_str());
                acc
            });
    by_shard
        .into_iter()
        .map(|(s, ws)| format!("{s}: {}", ws.join(", ")))
        .collect()
}
