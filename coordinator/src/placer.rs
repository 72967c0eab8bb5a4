//! The coordinator's control loop: the workers it knows (the configured
//! addresses plus every worker their status names as a peer), and, with a
//! split manifest, placement carried out: each round plans with the live
//! workers (`placement::plan`) and sends `LoadShard` (with the manifest
//! inline) to every worker that must change; workers fetch their shard
//! through the swarm.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use llama_cluster_proto::v1::worker_client::WorkerClient;
use llama_cluster_proto::v1::{GetStatusResponse, LoadShardRequest, Placement};
use tracing::{Instrument, info, info_span, warn};

use llama_cluster_shared::auth::{Class, Tokens};

use crate::placement::{self, ShardSpec, WorkerView};

/// How long a LoadShard may take (fetching a shard through the swarm
/// included) before the worker counts as free again.
const LOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// How long a worker whose LoadShard failed is left out of placement.
const FAILED_BACKOFF: Duration = Duration::from_secs(30);

/// How long a worker that refused a shard for lack of room (its disk, say:
/// RESOURCE_EXHAUSTED) is not given that shard again; it may get another.
const REFUSED_FOR: Duration = Duration::from_secs(600);

/// Polls a worker may miss before placement treats it as gone (until then
/// it keeps its shard and gets no new one).
const GRACE_POLLS: u32 = 3;

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
            // The split's figures: tensor bytes plus the KV cache of one
            // session of the default context (2048 tokens); older
            // manifests have only the file size.
            let tensors = s["tensor_bytes"]
                .as_u64()
                .filter(|&t| t > 0)
                .unwrap_or(size);
            let kv = s["kv_bytes_per_token"].as_u64().unwrap_or(0) * 2048;
            shards.push(ShardSpec {
                id: id.into(),
                layer_start: a as u32,
                layer_end: b as u32,
                size: tensors + kv,
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
    /// LoadShard calls under way: worker → (shard, since, generation).
    pending: Mutex<HashMap<String, (String, Instant, u64)>>,
    generation: AtomicU64,
    /// Last status of every worker and the polls it missed since.
    last_seen: Mutex<HashMap<String, (GetStatusResponse, u32)>>,
    /// Workers whose last LoadShard failed, left alone until then.
    backoff: Mutex<HashMap<String, Instant>>,
    /// (worker, shard) refused for lack of room, not planned until then.
    refused: Mutex<HashMap<(String, String), Instant>>,
    status: Mutex<Placement>,
    tokens: Tokens,
}

impl Placer {
    /// `tokens`: the admin token goes with every LoadShard.
    pub fn new(manifest: ManifestInfo, replicas: usize, tokens: Tokens) -> Placer {
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
            refused: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            last_seen: Mutex::new(HashMap::new()),
            status: Mutex::new(status),
            tokens,
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
        pending.retain(|_, (_, since, _)| since.elapsed() < LOAD_TIMEOUT);
        let mut backoff = self.0.backoff.lock().unwrap_or_else(|e| e.into_inner());
        backoff.retain(|_, until| *until > Instant::now());
        let mut refused = self.0.refused.lock().unwrap_or_else(|e| e.into_inner());
        refused.retain(|_, until| *until > Instant::now());
        // A worker that missed a poll or two keeps its shard (frozen) rather
        // than having it placed elsewhere at once.
        let mut last = self.0.last_seen.lock().unwrap_or_else(|e| e.into_inner());
        for (addr, st) in statuses {
            last.insert(addr.clone(), (st.clone(), 0));
        }
        let answered: std::collections::HashSet<&String> =
            statuses.iter().map(|(a, _)| a).collect();
        for (addr, (_, misses)) in last.iter_mut() {
            if !answered.contains(addr) {
                *misses += 1;
            }
        }
        last.retain(|_, (_, misses)| *misses < GRACE_POLLS);
        let views: Vec<WorkerView> = last
            .iter()
            .filter(|(_, (st, _))| st.role != "bootstrap")
            .map(|(addr, (st, misses))| {
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
                        .map(|(s, _, _)| s.clone())
                        .or_else(|| local.map(|s| s.shard_id.clone())),
                    refused: refused
                        .keys()
                        .filter(|(a, _)| a == addr)
                        .map(|(_, s)| s.clone())
                        .collect(),
                    frozen: *misses > 0 || backoff.contains_key(addr),
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
                    let generation = self.0.generation.fetch_add(1, Ordering::Relaxed);
                    pending.insert(mv.addr.clone(), (mv.to.clone(), Instant::now(), generation));
                    let me = self.clone();
                    let span =
                        info_span!("placement.load_shard", worker = %mv.addr, shard = %mv.to);
                    tokio::spawn(
                        async move { me.load(mv.addr, mv.to, generation).await }.instrument(span),
                    );
                }
            }
        }
    }

    async fn load(&self, addr: String, shard: String, generation: u64) {
        let r = async {
            let ch = crate::tls::endpoint(&addr)?
                .connect_timeout(Duration::from_secs(5))
                .timeout(LOAD_TIMEOUT)
                .connect()
                .await?;
            let mut req = tonic::Request::new(LoadShardRequest {
                shard_id: shard.clone(),
                manifest_json: self.0.manifest.json.clone(),
                ..Default::default()
            });
            self.0.tokens.attach(Class::Admin, &mut req);
            let out =
                WorkerClient::with_interceptor(ch, llama_cluster_shared::telemetry::inject_grpc)
                    .load_shard(req)
                    .await?
                    .into_inner();
            anyhow::Ok(out.state)
        }
        .await;
        match r {
            Ok(state) => info!("[PLACEMENT] {addr}: shard {shard} {state}"),
            Err(e)
                if e.downcast_ref::<tonic::Status>()
                    .is_some_and(|s| s.code() == tonic::Code::ResourceExhausted) =>
            {
                warn!(
                    "[PLACEMENT] {addr}: refused shard {shard}: {e:#}; it gets another shard if one fits, not this one for {REFUSED_FOR:?}"
                );
                self.0
                    .refused
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((addr.clone(), shard.clone()), Instant::now() + REFUSED_FOR);
            }
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
        // Only this load's entry: a newer LoadShard to the same worker stays.
        let mut pending = self.0.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.get(&addr).is_some_and(|(_, _, g)| *g == generation) {
            pending.remove(&addr);
        }
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
