//! Loading and unloading this worker's shard (LOAD_SHARD / gRPC LoadShard)
//! from a split manifest on local disk, and announcing its state.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use llama_cluster_engine::manifest::{FileEntry, Manifest, hash_file};
use llama_cluster_engine::stage::{StageEngine, StageSpec};
use llama_cluster_engine::vocab::Vocab;
use llama_cluster_shared::dht_keys::{ShardRecord, ShardState};
use tracing::{Instrument, info, warn};

use super::{LoadedShard, ModelInfo, Pipeline};
use crate::torrent::{TorrentError, disk_space};

/// Errors of the control paths, mapped to gRPC codes by the callers.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    Cancelled(String),
}

/// What a load produced.
#[derive(Debug, Clone)]
pub struct LoadOutcome {
    pub shard_id: String,
    pub model: String,
    pub layer_start: u32,
    pub layer_end: u32,
    pub state: ShardState,
    pub load_ms: f64,
}

impl Pipeline {
    fn manifest_path(&self, given: Option<&str>) -> Result<PathBuf, PipelineError> {
        match given.filter(|s| !s.is_empty()) {
            Some(p) => Ok(PathBuf::from(p)),
            None => self.0.cfg.manifest.clone().ok_or_else(|| {
                PipelineError::InvalidArgument(
                    "no manifest given and none configured (--manifest)".into(),
                )
            }),
        }
    }

    /// Local path of a file of a manifest: next to the manifest when it is
    /// there with the right size, else in the file store, else fetched from
    /// the swarm (verified piece by piece and as a whole).
    pub async fn local_file(
        &self,
        manifest_path: &Path,
        entry: &FileEntry,
    ) -> Result<PathBuf, PipelineError> {
        let beside = Manifest::path_of(manifest_path, &entry.file);
        if std::fs::metadata(&beside).map(|m| m.len()).ok() == Some(entry.size) {
            // Only the file the manifest names: its hash is checked too.
            let (path, want) = (beside.clone(), entry.hash.clone());
            let ok =
                tokio::task::spawn_blocking(move || hash_file(&path).is_ok_and(|(_, h)| h == want))
                    .await
                    .unwrap_or(false);
            if ok {
                return Ok(beside);
            }
            warn!(
                "[SHARD] {} beside the manifest does not match its hash; fetching it",
                entry.file
            );
        }
        info!(
            "[SHARD] {} is not on this disk; fetching it from the swarm",
            entry.file
        );
        self.0
            .torrents
            .fetch_pinned(&entry.hash, &entry.pieces_hash)
            .await
            .map_err(|e| match e {
                TorrentError::NoProvider(_) => PipelineError::NotFound(format!(
                    "{} is not on this worker's disk and no peer provides it ({e})",
                    entry.file
                )),
                other => PipelineError::Unavailable(format!("fetching {}: {other}", entry.file)),
            })
    }

    /// Refuses a load whose files still to fetch do not fit on the cache's
    /// disk beside the space kept free (`min_free_disk_mb`).
    fn check_disk(
        &self,
        mpath: &Path,
        m: &Manifest,
        entry: &llama_cluster_engine::manifest::ShardEntry,
    ) -> Result<(), PipelineError> {
        let store = self.0.torrents.store();
        let files = std::iter::once(&entry.file).chain((entry.index == 0).then_some(&m.head));
        let missing: Vec<&FileEntry> = files
            .filter(|f| {
                let beside = Manifest::path_of(mpath, &f.file);
                std::fs::metadata(&beside).map(|b| b.len()).ok() != Some(f.size)
                    && store.seed(&f.hash).is_none()
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let need = missing
            .iter()
            .map(|f| {
                f.size
                    .saturating_sub(disk_space::partial_bytes(store.root(), &f.hash))
            })
            .sum();
        let free = disk_space::available(store.root()).map_err(|e| {
            PipelineError::Internal(format!("free space of {}: {e}", store.root().display()))
        })?;
        disk_space::check(need, free, self.0.cfg.min_free_disk).map_err(|e| {
            let names: Vec<&str> = missing.iter().map(|f| f.file.as_str()).collect();
            let msg = format!(
                "shard {} cannot be fetched into {}: {e} (to fetch: {})",
                entry.id,
                store.root().display(),
                names.join(", ")
            );
            warn!("[SHARD] {msg}");
            PipelineError::ResourceExhausted(msg)
        })
    }

    /// Keeps a manifest sent by the coordinator (JSON) in the cache and
    /// returns its path; its files are fetched through the swarm on load.
    pub fn adopt_manifest(&self, json: &str) -> Result<PathBuf, PipelineError> {
        let m: Manifest = serde_json::from_str(json)
            .map_err(|e| PipelineError::InvalidArgument(format!("manifest_json: {e}")))?;
        m.check()
            .map_err(|e| PipelineError::InvalidArgument(format!("manifest_json: {e}")))?;
        // Named by the content hash only: nothing from the sender in a path.
        let id = blake3::hash(json.as_bytes()).to_hex();
        let dir = self
            .0
            .torrents
            .store()
            .root()
            .join("manifests")
            .join(&id[..32]);
        let path = dir.join("manifest.json");
        if !path.is_file() {
            let tmp = dir.join("manifest.json.tmp");
            std::fs::create_dir_all(&dir)
                .and_then(|_| std::fs::write(&tmp, json))
                .and_then(|_| std::fs::rename(&tmp, &path))
                .map_err(|e| {
                    PipelineError::Internal(format!(
                        "keeping the manifest in {}: {e}",
                        dir.display()
                    ))
                })?;
        }
        Ok(path)
    }

    /// Loads `shard_id` of the manifest sent inline (`manifest_json`), else
    /// of the manifest at `manifest` on this disk, else of the configured one.
    pub async fn load_shard_from(
        &self,
        shard_id: &str,
        manifest: &str,
        manifest_json: &str,
    ) -> Result<LoadOutcome, PipelineError> {
        let path = if manifest_json.is_empty() {
            manifest.to_string()
        } else {
            self.adopt_manifest(manifest_json)?.display().to_string()
        };
        // The load runs to its end (ready or failed) even when the caller
        // goes away: a dropped request must not leave the shard "loading".
        let me = self.clone();
        let shard_id = shard_id.to_string();
        tokio::spawn(async move { me.load_shard(&shard_id, Some(&path)).await }.in_current_span())
            .await
            .map_err(|e| PipelineError::Internal(format!("shard load task: {e}")))?
    }

    /// Seeds every file of the configured manifest that is on this disk.
    pub async fn seed_manifest_files(&self) {
        let Some(mpath) = self.0.cfg.manifest.clone() else {
            return;
        };
        let m = match Manifest::load(&mpath) {
            Ok(m) => m,
            Err(e) => {
                warn!("[TORRENT] {e}");
                return;
            }
        };
        let files = std::iter::once(&m.head).chain(m.shards.iter().map(|s| &s.file));
        for f in files {
            let path = Manifest::path_of(&mpath, &f.file);
            if self.0.torrents.store().seed(&f.hash).is_some() || !path.is_file() {
                continue;
            }
            if let Err(e) = self
                .0
                .torrents
                .seed_file(path, f.file.clone(), Some(f.hash.clone()))
                .await
            {
                warn!("[TORRENT] {e}");
            }
        }
    }

    fn set_record(&self, rec: Option<ShardRecord>) {
        self.0.state.write(|s| s.local_shard = rec);
        self.0.net.publish();
    }

    /// The model this worker can drive: manifest and tokenizer (cached).
    pub async fn model_info(&self) -> Result<Arc<ModelInfo>, PipelineError> {
        if let Some(m) = self
            .0
            .model
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Ok(m);
        }
        let path = self
            .loaded()
            .map(|l| l.manifest_path.clone())
            .or_else(|| self.0.cfg.manifest.clone())
            .ok_or_else(|| {
                PipelineError::Unavailable(
                    "this worker has no model manifest (--manifest); send the request to a worker that has one".into(),
                )
            })?;
        let info = tokio::task::spawn_blocking(move || -> Result<_, PipelineError> {
            let manifest =
                Manifest::load(&path).map_err(|e| PipelineError::Unavailable(e.to_string()))?;
            Ok((manifest, path))
        })
        .await
        .map_err(|e| PipelineError::Internal(e.to_string()))??;
        let (manifest, path) = info;
        // The head (tokenizer) comes through the swarm when it is not here.
        let head = self.local_file(&path, &manifest.head).await?;
        let info = tokio::task::spawn_blocking(move || -> Result<ModelInfo, PipelineError> {
            let vocab =
                Vocab::load(&head).map_err(|e| PipelineError::Unavailable(e.to_string()))?;
            Ok(ModelInfo {
                manifest,
                manifest_path: path,
                vocab,
            })
        })
        .await
        .map_err(|e| PipelineError::Internal(e.to_string()))??;
        let info = Arc::new(info);
        // Kept only if the manifest did not change meanwhile (a new shard).
        let current = self
            .loaded()
            .map(|l| l.manifest_path.clone())
            .or_else(|| self.0.cfg.manifest.clone());
        if current.as_ref() == Some(&info.manifest_path) {
            *self.0.model.lock().unwrap_or_else(|e| e.into_inner()) = Some(info.clone());
        }
        Ok(info)
    }

    /// Loads `shard_id` of the manifest (given or configured); replaces any
    /// shard loaded before.
    pub async fn load_shard(
        &self,
        shard_id: &str,
        manifest: Option<&str>,
    ) -> Result<LoadOutcome, PipelineError> {
        let _guard = self.0.load_lock.lock().await;
        let mpath = self.manifest_path(manifest)?;
        let m = Manifest::load(&mpath).map_err(|e| PipelineError::NotFound(e.to_string()))?;
        let entry = m
            .shard(shard_id)
            .ok_or_else(|| {
                PipelineError::NotFound(format!(
                    "manifest {} has no shard {shard_id:?}; it has: {}",
                    mpath.display(),
                    m.shards
                        .iter()
                        .map(|s| s.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?
            .clone();
        let record = |state| ShardRecord {
            shard_id: entry.id.clone(),
            peer_id: self.0.me.clone(),
            addrs: vec![],
            model: m.model.clone(),
            layer_start: entry.layer_start,
            layer_end: entry.layer_end,
            state,
            updated_at: llama_cluster_shared::unix_now_ms(),
            load: 0,
            max_sessions: 0,
        };
        // Before anything changes: a shard that cannot be fetched leaves the
        // one served now in place.
        self.check_disk(&mpath, &m, &entry)?;
        // Unload first: one shard per worker.
        *self.0.loaded.write().unwrap_or_else(|e| e.into_inner()) = None;
        self.set_record(Some(record(ShardState::Loading)));
        let files = async {
            let shard = self.local_file(&mpath, &entry.file).await?;
            // The first stage looks token embeddings up in the head file.
            let head = if entry.index == 0 {
                Some(self.local_file(&mpath, &m.head).await?)
            } else {
                None
            };
            Ok::<_, PipelineError>((shard, head))
        };
        let (shard_path, head_path) = match files.await {
            Ok(f) => f,
            Err(e) => {
                warn!("[SHARD] {} cannot be loaded: {e}", entry.id);
                self.set_record(Some(record(ShardState::Failed)));
                return Err(e);
            }
        };
        info!(
            "[SHARD] loading {} (layers {}-{}) of {}",
            entry.id, entry.layer_start, entry.layer_end, m.model
        );
        let t0 = Instant::now();
        let spec = StageSpec {
            shard_path: shard_path.clone(),
            head_path,
            is_first: entry.index == 0,
            is_last: entry.index as usize + 1 == m.shards.len(),
            settings: self.0.cfg.engine,
            max_sessions: self.0.cfg.max_sessions,
            idle_timeout: self.0.cfg.session_lease,
            kv_budget_bytes: self.kv_budget(entry.file.size),
        };
        let expected = entry.file.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<StageEngine, ShardLoadError> {
            verify(&shard_path, expected.size, &expected.hash)?;
            Ok(StageEngine::start(spec)?)
        })
        .await
        .map_err(|e| PipelineError::Internal(e.to_string()))?;
        let engine = match result {
            Ok(e) => e,
            Err(msg) => {
                warn!("[SHARD] loading {} failed: {msg}", entry.id);
                self.set_record(Some(record(ShardState::Failed)));
                return Err(PipelineError::Internal(format!(
                    "loading {} failed: {msg}",
                    entry.id
                )));
            }
        };
        let load_ms = t0.elapsed().as_secs_f64() * 1000.0;
        // A new manifest: the model this worker drives may have changed.
        {
            let mut cached = self.0.model.lock().unwrap_or_else(|e| e.into_inner());
            if cached.as_ref().is_some_and(|c| c.manifest_path != mpath) {
                *cached = None;
            }
        }
        *self.0.loaded.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(LoadedShard {
            model: m.model.clone(),
            model_layers: m.n_layer,
            entry: entry.clone(),
            manifest_path: mpath,
            engine,
        }));
        self.set_record(Some(record(ShardState::Ready)));
        info!("[SHARD] {} ready in {load_ms:.0} ms", entry.id);
        Ok(LoadOutcome {
            shard_id: entry.id,
            model: m.model,
            layer_start: entry.layer_start,
            layer_end: entry.layer_end,
            state: ShardState::Ready,
            load_ms,
        })
    }

    /// Unloads the current shard (its sessions end); the record goes back to
    /// `announced`.
    pub async fn unload_shard(&self) -> Result<LoadOutcome, PipelineError> {
        let _guard = self.0.load_lock.lock().await;
        let old = self
            .0
            .loaded
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(old) = old else {
            return Err(PipelineError::InvalidArgument("no shard is loaded".into()));
        };
        let entry = old.entry.clone();
        let model = old.model.clone();
        // The engine thread stops when the last reference goes.
        tokio::task::spawn_blocking(move || drop(old)).await.ok();
        self.set_record(Some(ShardRecord {
            shard_id: entry.id.clone(),
            peer_id: self.0.me.clone(),
            addrs: vec![],
            model: model.clone(),
            layer_start: entry.layer_start,
            layer_end: entry.layer_end,
            state: ShardState::Announced,
            updated_at: llama_cluster_shared::unix_now_ms(),
            load: 0,
            max_sessions: 0,
        }));
        info!("[SHARD] unloaded {}", entry.id);
        Ok(LoadOutcome {
            shard_id: entry.id,
            model,
            layer_start: entry.layer_start,
            layer_end: entry.layer_end,
            state: ShardState::Announced,
            load_ms: 0.0,
        })
    }
}

/// Checks size and content hash of a shard file before it is loaded.
impl Pipeline {
    /// Memory left for KV caches once a shard of `shard_bytes` is loaded
    /// (0: the worker's memory is unknown, not checked).
    fn kv_budget(&self, shard_bytes: u64) -> u64 {
        let total = self.0.state.read(|s| s.resources.memory_budget_bytes);
        if total == 0 {
            0
        } else {
            total.saturating_sub(shard_bytes).max(1)
        }
    }
}

/// Why a shard file did not become a stage.
#[derive(Debug, thiserror::Error)]
enum ShardLoadError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: llama_cluster_engine::EngineError,
    },
    #[error(
        "{} does not match the manifest (size {got_size} vs {size}, blake3 {got_hash} vs {hash})",
        path.display()
    )]
    Mismatch {
        path: PathBuf,
        size: u64,
        got_size: u64,
        hash: String,
        got_hash: String,
    },
    #[error(transparent)]
    Engine(#[from] llama_cluster_engine::EngineError),
}

fn verify(path: &Path, size: u64, hash: &str) -> Result<(), ShardLoadError> {
    let (got_size, got_hash) = hash_file(path).map_err(|source| ShardLoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if got_size != size || got_hash != hash {
        return Err(ShardLoadError::Mismatch {
            path: path.to_path_buf(),
            size,
            got_size,
            hash: hash.to_string(),
            got_hash,
        });
    }
    Ok(())
}
