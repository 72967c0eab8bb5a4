//! Shard files travelling through the swarm, BitTorrent-style.
//!
//! - [`meta`]: content addressing (BLAKE3 pieces and whole file);
//! - [`store`]: complete files, resumable partial downloads, seeds;
//! - [`protocol`]: the binary piece protocol;
//! - [`tree_hash`]: the whole-file hash merged from the pieces' hashes;
//! - [`upload_limit`]: the upload rate limit, over all uploads;
//! - [`bitfield`]: which pieces of a file a peer holds;
//! - [`swarm_state`]: who else is fetching a file, and their news;
//! - [`picker`]: which piece to ask which peer for, and how many at once;
//! - `download`: a file's metadata, then its pieces (`transfer`; news
//!   swapped with the other peers in `exchange`), with one tracing span per
//!   peer (`spans`);
//! - `serve`: answering other peers (metadata, pieces of complete files and
//!   verified pieces of downloads in progress, bitfields, "have" news);
//! - this module: announcing files as DHT providers, the catalog and
//!   progress of downloads.

pub mod bitfield;
pub mod disk_space;
mod download;
mod exchange;
pub mod meta;
pub mod picker;
pub mod protocol;
mod serve;
mod spans;
pub mod store;
pub mod swarm_state;
mod transfer;
pub mod tree_hash;
pub mod upload_limit;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tracing::{Instrument, debug, info, warn};

use crate::net::{FrameProto, NetHandle};
use crate::state::SharedState;
use meta::TorrentMeta;
use protocol::{TorrentRequest, TorrentResponse};
use store::Store;
use swarm_state::SwarmState;
use upload_limit::UploadLimit;

/// The node's cache directory (`cache_dir`, else `$LLAMA_CLUSTER_CACHE`,
/// else `~/.cache/llama-cluster`, else a directory under /tmp).
pub fn cache_dir(cfg: &llama_cluster_shared::config::NodeConfig) -> PathBuf {
    if !cfg.cache_dir.is_empty() {
        return PathBuf::from(&cfg.cache_dir);
    }
    llama_cluster_engine::cache_root()
}

/// Why asking a peer for metadata, a bitfield or a piece got no answer
/// (the peer is in the error: [`AskError::peer`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum AskError {
    #[error(transparent)]
    Net(#[from] crate::network::error::NetError),
    #[error("{peer} sent an undecodable answer: {source}")]
    Undecodable {
        peer: PeerId,
        source: protocol::ProtocolError,
    },
}

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum TorrentError {
    #[error("no peer provides file {0}")]
    NoProvider(String),
    #[error("{0}")]
    Failed(String),
    #[error("storage error: {0}")]
    Io(#[from] std::io::Error),
    /// The metadata `from` sent was proven wrong by the file's own data.
    #[error("{why}")]
    WrongMeta { from: PeerId, why: String },
}

/// Test hooks (never on in production): serve corrupted pieces, serve
/// slowly, answer busy.
#[derive(Debug, Clone, Default)]
pub struct TestHooks {
    pub corrupt_pieces: bool,
    /// Corrupt the pieces served from a download in progress (a lying
    /// partial seeder; `LLAMA_CLUSTER_TEST_CORRUPT_UPLOADS`).
    pub corrupt_partial_uploads: bool,
    /// Metadata whose piece hashes match the corrupted pieces.
    pub lying_meta: bool,
    /// Metadata whose size is one byte short (the pieces stay right).
    pub wrong_size_meta: bool,
    pub piece_delay: Duration,
    /// Piece requests still to be answered busy.
    pub busy_pieces: Arc<std::sync::atomic::AtomicU32>,
}

/// Progress of one download, shown by GetStatus.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DownloadProgress {
    pub file_hash: String,
    pub name: String,
    pub total_bytes: u64,
    pub verified_bytes: u64,
    /// Bytes received by this process for this file (a restart resets it).
    pub fetched_bytes: u64,
    pub pieces_done: u32,
    pub pieces_total: u32,
    pub peers: u32,
    pub bad_pieces: u32,
    /// Bytes received from peers holding the whole file.
    pub from_seeders_bytes: u64,
    /// Bytes received from peers still downloading it.
    pub from_partial_bytes: u64,
    /// Peers dropped for sending bad pieces.
    pub bad_peers: Vec<String>,
    pub done: bool,
}

/// One file of the merged catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    pub file_hash: String,
    pub name: String,
    pub size: u64,
    pub providers: Vec<String>,
    pub local: bool,
}

struct Inner {
    store: Store,
    net: NetHandle,
    state: SharedState,
    me: PeerId,
    hooks: TestHooks,
    upload_limit: Option<UploadLimit>,
    /// Announce files as their provider (off for a one-shot `fetch`).
    announce: bool,
    /// Serve the verified pieces of downloads in progress.
    partial_seeding: bool,
    swarm: SwarmState,
    progress: Mutex<HashMap<String, DownloadProgress>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Peers whose metadata a file's own data proved wrong: not asked again.
    distrusted: Mutex<HashSet<PeerId>>,
}

#[derive(Clone)]
pub struct Torrents(Arc<Inner>);

impl Torrents {
    pub fn new(
        store: Store,
        net: NetHandle,
        state: SharedState,
        hooks: TestHooks,
        upload_limit: Option<UploadLimit>,
        announce: bool,
        partial_seeding: bool,
    ) -> Self {
        let me = state.peer_id();
        if let Some(l) = &upload_limit {
            info!("[TORRENT] uploads limited to {} MB/s", l.mb_per_sec());
        }
        Torrents(Arc::new(Inner {
            store,
            net,
            state,
            me,
            hooks,
            upload_limit,
            announce,
            partial_seeding,
            swarm: SwarmState::default(),
            progress: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            distrusted: Mutex::new(HashSet::new()),
        }))
    }

    pub fn store(&self) -> &Store {
        &self.0.store
    }

    /// Seeds and downloads, for GetStatus.
    pub fn status(&self) -> Vec<llama_cluster_shared::status::TorrentStatus> {
        use llama_cluster_shared::status::TorrentStatus;
        let progress = self.progress();
        let mut out: Vec<TorrentStatus> = self
            .0
            .store
            .catalog()
            .into_iter()
            .map(|m| {
                let p = progress.iter().find(|p| p.file_hash == m.file_hash);
                TorrentStatus {
                    file_hash: m.file_hash.clone(),
                    name: m.name.clone(),
                    size: m.size,
                    state: "seeding".into(),
                    verified_bytes: m.size,
                    fetched_bytes: p.map(|p| p.fetched_bytes).unwrap_or(0),
                    pieces_done: m.n_pieces(),
                    pieces_total: m.n_pieces(),
                    peers: p.map(|p| p.peers).unwrap_or(0),
                    bad_pieces: p.map(|p| p.bad_pieces).unwrap_or(0),
                    bytes_from_seeders: p.map(|p| p.from_seeders_bytes).unwrap_or(0),
                    bytes_from_partial: p.map(|p| p.from_partial_bytes).unwrap_or(0),
                    bad_peers: p.map(|p| p.bad_peers.clone()).unwrap_or_default(),
                }
            })
            .collect();
        for p in progress.into_iter().filter(|p| !p.done) {
            if out.iter().all(|t| t.file_hash != p.file_hash) {
                out.push(TorrentStatus {
                    file_hash: p.file_hash,
                    name: p.name,
                    size: p.total_bytes,
                    state: "downloading".into(),
                    verified_bytes: p.verified_bytes,
                    fetched_bytes: p.fetched_bytes,
                    pieces_done: p.pieces_done,
                    pieces_total: p.pieces_total,
                    peers: p.peers,
                    bad_pieces: p.bad_pieces,
                    bytes_from_seeders: p.from_seeders_bytes,
                    bytes_from_partial: p.from_partial_bytes,
                    bad_peers: p.bad_peers,
                });
            }
        }
        out
    }

    /// Downloads in progress or finished by this process.
    pub fn progress(&self) -> Vec<DownloadProgress> {
        let mut v: Vec<_> = self
            .0
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn set_progress(&self, p: &DownloadProgress) {
        self.0
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p.file_hash.clone(), p.clone());
    }

    /// Seeds a complete file that is already on disk (hashing it) and
    /// announces it. `expected` is the hash it must have, when known.
    pub async fn seed_file(
        &self,
        path: PathBuf,
        name: String,
        expected: Option<String>,
    ) -> Result<TorrentMeta, TorrentError> {
        let p = path.clone();
        let meta = tokio::task::spawn_blocking(move || TorrentMeta::from_file(&p, &name))
            .await
            .map_err(|e| TorrentError::Failed(e.to_string()))??;
        if let Some(h) = expected
            && h != meta.file_hash
        {
            return Err(TorrentError::Failed(format!(
                "{} has hash {}, the manifest says {h}; not seeding it",
                path.display(),
                meta.file_hash
            )));
        }
        self.0.store.add_seed(meta.clone(), path);
        self.0.net.provide(meta.file_hash.clone());
        info!(
            "[TORRENT] seeding {} ({} bytes, {} pieces)",
            meta.name,
            meta.size,
            meta.n_pieces()
        );
        Ok(meta)
    }

    /// Announces every complete file of the store (at start).
    pub fn announce_all(&self) {
        if !self.0.announce {
            return;
        }
        for m in self.0.store.catalog() {
            self.0.net.provide(m.file_hash);
        }
    }
}
