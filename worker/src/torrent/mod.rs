//! Shard files travelling through the swarm, BitTorrent-style.
//!
//! - [`meta`]: content addressing (BLAKE3 pieces and whole file);
//! - [`store`]: complete files, resumable partial downloads, seeds;
//! - [`protocol`]: the binary piece protocol;
//! - [`tree_hash`]: the whole-file hash merged from the pieces' hashes;
//! - [`upload_limit`]: the seeder's upload rate limit;
//! - `download`: fetching a file from several providers at once;
//! - this module: serving pieces, announcing files as DHT providers, the
//!   catalog and progress of downloads.

mod download;
pub mod meta;
pub mod protocol;
pub mod store;
pub mod tree_hash;
pub mod upload_limit;

use std::collections::{HashMap, HashSet, VecDeque};
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
use protocol::{PIECE_HEADER, TorrentRequest, TorrentResponse};
use store::Store;
use upload_limit::UploadLimit;

/// The node's cache directory (`cache_dir`, else `$LLAMA_CLUSTER_CACHE`,
/// else `~/.cache/llama-cluster`, else a directory under /tmp).
pub fn cache_dir(cfg: &llama_cluster_shared::config::NodeConfig) -> PathBuf {
    if !cfg.cache_dir.is_empty() {
        return PathBuf::from(&cfg.cache_dir);
    }
    llama_cluster_engine::cache_root()
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

    /// Answers one inbound piece-protocol request.
    pub async fn serve(&self, from: PeerId, bytes: Vec<u8>) -> Vec<u8> {
        let resp = match TorrentRequest::decode(&bytes) {
            Err(e) => {
                warn!("[TORRENT] malformed request from {from}: {e}");
                TorrentResponse::Error(format!("malformed request: {e}"))
            }
            Ok(TorrentRequest::Meta { file_hash }) => match self.0.store.seed(&file_hash) {
                Some(s) if self.0.hooks.lying_meta => {
                    let me = self.clone();
                    let meta = tokio::task::spawn_blocking(move || {
                        let mut m = s.meta.clone();
                        for i in 0..m.n_pieces() {
                            if let Ok(mut d) = me.0.store.read_piece(&m.file_hash, i) {
                                if let Some(b) = d.first_mut() {
                                    *b ^= 0xff;
                                }
                                m.pieces[i as usize] =
                                    meta::hex(&tree_hash::piece_value(&d, i, m.piece_size, m.size));
                            }
                        }
                        m
                    })
                    .await;
                    match meta {
                        Ok(m) => TorrentResponse::Meta(m.encode()),
                        Err(e) => TorrentResponse::Error(e.to_string()),
                    }
                }
                Some(s) if self.0.hooks.wrong_size_meta => {
                    let mut m = s.meta.clone();
                    m.size = m.size.saturating_sub(1);
                    TorrentResponse::Meta(m.encode())
                }
                Some(s) => TorrentResponse::Meta(s.meta.encode()),
                None => TorrentResponse::Error(format!("no complete file {file_hash} here")),
            },
            Ok(TorrentRequest::Piece { file_hash, index }) => {
                if !self.0.hooks.piece_delay.is_zero() {
                    tokio::time::sleep(self.0.hooks.piece_delay).await;
                }
                let len = self.0.store.piece_len(&file_hash, index).unwrap_or(0) as usize;
                if self
                    .0
                    .hooks
                    .busy_pieces
                    .fetch_update(
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                        |n| n.checked_sub(1),
                    )
                    .is_ok()
                {
                    return TorrentResponse::Busy("test: busy".into()).encode();
                }
                // Under an upload limit the piece waits its turn before it is
                // read (no piece sits in memory while it waits).
                if let Some(l) = &self.0.upload_limit
                    && let Err(wait) = l.take_in_line(len).await
                {
                    debug!("[TORRENT] busy: piece {index} for {from} would wait {wait:.1?}");
                    return TorrentResponse::Busy(format!(
                        "upload limit of {} MB/s: {:.0} s of pieces in line",
                        l.mb_per_sec(),
                        wait.as_secs_f64()
                    ))
                    .encode();
                }
                // The piece is read straight into the response frame.
                let me = self.clone();
                let r = tokio::task::spawn_blocking(move || {
                    let mut frame = TorrentResponse::piece_frame(index, len);
                    me.0.store
                        .read_piece_into(&file_hash, index, &mut frame)
                        .map(|_| frame)
                })
                .await;
                match r {
                    Ok(Ok(mut frame)) => {
                        let n = frame.len() - PIECE_HEADER;
                        crate::metrics::metrics().torrent_bytes_out.inc_by(n as u64);
                        if self.0.hooks.corrupt_pieces && n > 0 {
                            frame[PIECE_HEADER] ^= 0xff;
                        }
                        return frame;
                    }
                    Ok(Err(e)) => TorrentResponse::Error(e),
                    Err(e) => TorrentResponse::Error(e.to_string()),
                }
            }
        };
        resp.encode()
    }
}
