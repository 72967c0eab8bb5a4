//! Where torrent files live: complete files by content hash
//! (`files/<hash>`, with `meta/<hash>.json`), downloads in progress
//! (`partial/<hash>.part`, pieces re-verified on resume), and files seeded
//! from elsewhere on disk (a split directory). Nothing is served or placed
//! under its final name before it is verified; a download in progress
//! shared with other downloaders ([`Store::share`]) serves only the pieces
//! it verified.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use blake3::hazmat::ChainingValue;

use super::bitfield::Bitfield;
use super::meta::TorrentMeta;
use super::tree_hash;

/// Written bytes of a download flushed to disk as it goes, about this many
/// at a time: the sync before the final rename then has little left to do.
const SYNC_EVERY: u64 = 16 << 20;

/// A complete, verified file that can be served.
#[derive(Debug, Clone)]
pub struct Seed {
    pub meta: TorrentMeta,
    pub path: PathBuf,
}

/// Why a piece could not be read for a peer.
#[derive(Debug, thiserror::Error)]
pub enum PieceReadError {
    #[error("no complete file {hash} or verified piece {index} here")]
    NotHere { hash: String, index: u32 },
    #[error("reading piece {index} of a download in progress: {source}")]
    InProgress { index: u32, source: io::Error },
    #[error("piece {index} out of range (the file has {pieces})")]
    OutOfRange { index: u32, pieces: u32 },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{}: piece {index} is short ({got} of {len} bytes): the file changed on disk",
        path.display()
    )]
    Short {
        path: PathBuf,
        index: u32,
        got: usize,
        len: u64,
    },
}

/// Where a piece that was read comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceSource {
    Complete,
    /// A download in progress (the piece is verified).
    Partial,
}

/// A download in progress whose verified pieces are served: its metadata,
/// its open `.part` file (reads keep working across the final rename) and
/// which pieces are verified and written.
#[derive(Clone)]
struct SharedPartial {
    meta: Arc<TorrentMeta>,
    file: Arc<File>,
    have: Arc<RwLock<Bitfield>>,
}

pub struct Store {
    root: PathBuf,
    seeds: RwLock<HashMap<String, Seed>>,
    partials: RwLock<HashMap<String, SharedPartial>>,
}

impl Store {
    /// Opens (creating) the store and indexes its complete files.
    pub fn open(root: &Path) -> io::Result<Store> {
        for d in ["files", "partial", "meta"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        let store = Store {
            root: root.to_path_buf(),
            seeds: RwLock::new(HashMap::new()),
            partials: RwLock::new(HashMap::new()),
        };
        for entry in std::fs::read_dir(root.join("meta"))? {
            let path = entry?.path();
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let Ok(meta) = serde_json::from_slice::<TorrentMeta>(&bytes) else {
                continue;
            };
            let file = store.final_path(&meta.file_hash);
            if meta.validate().is_ok()
                && std::fs::metadata(&file).map(|m| m.len()).ok() == Some(meta.size)
            {
                store.add_seed(meta, file);
            }
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn final_path(&self, hash: &str) -> PathBuf {
        self.root.join("files").join(hash)
    }

    pub fn add_seed(&self, meta: TorrentMeta, path: PathBuf) {
        self.seeds
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(meta.file_hash.clone(), Seed { meta, path });
    }

    /// Whether the complete file `hash` is here.
    pub fn has_seed(&self, hash: &str) -> bool {
        self.seeds
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(hash)
    }

    pub fn seed(&self, hash: &str) -> Option<Seed> {
        self.seeds
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(hash)
            .cloned()
    }

    /// Length of piece `i` of file `hash` when it can be served: from a
    /// complete file, or verified in a shared download (no copy of its
    /// metadata).
    pub fn piece_len(&self, hash: &str, i: u32) -> Option<u64> {
        let complete = self
            .seeds
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(hash)
            .filter(|s| i < s.meta.n_pieces())
            .map(|s| s.meta.piece_len(i));
        complete.or_else(|| {
            self.shared(hash)
                .filter(|p| p.have.read().unwrap_or_else(|e| e.into_inner()).has(i))
                .map(|p| p.meta.piece_len(i))
        })
    }

    fn shared(&self, hash: &str) -> Option<SharedPartial> {
        self.partials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(hash)
            .cloned()
    }

    /// Serves the verified pieces of download `p` from now on (until
    /// [`Store::unshare`]).
    pub fn share(&self, p: &Partial) {
        self.partials
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                p.meta.file_hash.clone(),
                SharedPartial {
                    meta: Arc::new(p.meta.clone()),
                    file: p.file.clone(),
                    have: p.have_bits.clone(),
                },
            );
    }

    /// Stops serving the download of `hash` (it ended, finished or not).
    pub fn unshare(&self, hash: &str) {
        self.partials
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(hash);
    }

    /// The metadata of a shared download in progress.
    pub fn shared_meta(&self, hash: &str) -> Option<TorrentMeta> {
        self.shared(hash).map(|p| (*p.meta).clone())
    }

    /// Which pieces of `hash` this node can serve: all of a complete file,
    /// the verified ones of a shared download, else `None`.
    pub fn bitfield(&self, hash: &str) -> Option<Bitfield> {
        if let Some(s) = self.seed(hash) {
            return Some(Bitfield::full(s.meta.n_pieces()));
        }
        self.shared(hash)
            .map(|p| p.have.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    pub fn catalog(&self) -> Vec<TorrentMeta> {
        let mut v: Vec<TorrentMeta> = self
            .seeds
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|s| s.meta.clone())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Reads piece `i` of a seeded file (blocking).
    pub fn read_piece(&self, hash: &str, i: u32) -> Result<Vec<u8>, PieceReadError> {
        let mut buf = Vec::new();
        self.read_piece_into(hash, i, &mut buf)?;
        Ok(buf)
    }

    /// Appends piece `i` of file `hash` to `out` (a response frame being
    /// built, so the piece is copied once, from the page cache): from the
    /// complete file, else from a shared download that verified it.
    pub fn read_piece_into(
        &self,
        hash: &str,
        i: u32,
        out: &mut Vec<u8>,
    ) -> Result<PieceSource, PieceReadError> {
        let Some(seed) = self.seed(hash) else {
            let p = self
                .shared(hash)
                .filter(|p| p.have.read().unwrap_or_else(|e| e.into_inner()).has(i))
                .ok_or_else(|| PieceReadError::NotHere {
                    hash: hash.to_string(),
                    index: i,
                })?;
            let len = p.meta.piece_len(i) as usize;
            let at = out.len();
            out.resize(at + len, 0);
            p.file
                .read_exact_at(&mut out[at..], i as u64 * p.meta.piece_size)
                .map_err(|source| PieceReadError::InProgress { index: i, source })?;
            return Ok(PieceSource::Partial);
        };
        if i >= seed.meta.n_pieces() {
            return Err(PieceReadError::OutOfRange {
                index: i,
                pieces: seed.meta.n_pieces(),
            });
        }
        let len = seed.meta.piece_len(i);
        let err = |source: io::Error| PieceReadError::Io {
            path: seed.path.clone(),
            source,
        };
        let mut f = File::open(&seed.path).map_err(err)?;
        f.seek(SeekFrom::Start(i as u64 * seed.meta.piece_size))
            .map_err(err)?;
        out.reserve_exact(len as usize);
        let n = f.take(len).read_to_end(out).map_err(err)?;
        if n as u64 != len {
            return Err(PieceReadError::Short {
                path: seed.path.clone(),
                index: i,
                got: n,
                len,
            });
        }
        Ok(PieceSource::Complete)
    }

    /// Opens (or resumes) the download of `meta`.
    pub fn partial(&self, meta: &TorrentMeta) -> io::Result<Partial> {
        Partial::open(&self.root.join("partial"), meta)
    }

    /// Moves a finished download to its final name, atomically, and indexes it.
    pub fn complete(&self, partial: Partial) -> io::Result<PathBuf> {
        let meta = partial.meta.clone();
        let final_path = self.final_path(&meta.file_hash);
        partial.finish(&final_path)?;
        let meta_path = self
            .root
            .join("meta")
            .join(format!("{}.json", meta.file_hash));
        let tmp = meta_path.with_extension("json.part");
        std::fs::write(&tmp, meta.encode())?;
        std::fs::rename(&tmp, &meta_path)?;
        self.add_seed(meta, final_path.clone());
        Ok(final_path)
    }
}

/// A download in progress. Which pieces are done is read from the data
/// itself: on open every piece is checked against its hash, so a download
/// killed at any point resumes from exactly the pieces that reached the disk.
/// Each piece done keeps its part of the whole-file hash ([`tree_hash`]).
pub struct Partial {
    pub meta: TorrentMeta,
    file: Arc<File>,
    have: Vec<Option<ChainingValue>>,
    /// The pieces of `have`, as served to other downloaders.
    have_bits: Arc<RwLock<Bitfield>>,
    part_path: PathBuf,
    unsynced: Arc<AtomicU64>,
    syncing: Arc<AtomicBool>,
}

impl Partial {
    fn open(dir: &Path, meta: &TorrentMeta) -> io::Result<Partial> {
        // Named by the pieces too: writes of an attempt with other metadata
        // for the same file (a peer's lying piece hashes) that were still
        // running when it ended cannot land in this one, whose pieces are
        // trusted once verified (the whole-file hash is merged from them).
        let part_path = dir.join(format!(
            "{}-{}.part",
            meta.file_hash,
            &meta.pieces_hash()[..16]
        ));
        let existed = part_path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part_path)?;
        if file.metadata()?.len() != meta.size {
            file.set_len(meta.size)?;
        }
        let n = meta.n_pieces() as usize;
        let mut have = vec![None; n];
        if existed {
            let mut buf = Vec::new();
            for (i, h) in have.iter_mut().enumerate() {
                let i = i as u32;
                buf.resize(meta.piece_len(i) as usize, 0);
                if file
                    .read_exact_at(&mut buf, i as u64 * meta.piece_size)
                    .is_ok()
                {
                    *h = meta.check_piece(i, &buf);
                }
            }
        }
        let mut bits = Bitfield::empty(n as u32);
        for (i, h) in have.iter().enumerate() {
            if h.is_some() {
                bits.set(i as u32);
            }
        }
        Ok(Partial {
            meta: meta.clone(),
            file: Arc::new(file),
            have,
            have_bits: Arc::new(RwLock::new(bits)),
            part_path,
            unsynced: Arc::default(),
            syncing: Arc::default(),
        })
    }

    pub fn missing(&self) -> Vec<u32> {
        (0..self.have.len() as u32)
            .filter(|&i| self.have[i as usize].is_none())
            .collect()
    }

    /// The pieces verified so far.
    pub fn bitfield(&self) -> Bitfield {
        self.have_bits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn verified_bytes(&self) -> u64 {
        (0..self.have.len() as u32)
            .filter(|&i| self.have[i as usize].is_some())
            .map(|i| self.meta.piece_len(i))
            .sum()
    }

    /// A handle that writes pieces from another thread (verification and
    /// writing run off the async runtime); [`Partial::mark_written`] records
    /// each piece once its write returned.
    pub fn writer(&self) -> PieceWriter {
        PieceWriter {
            file: self.file.clone(),
            piece_size: self.meta.piece_size,
            unsynced: self.unsynced.clone(),
            syncing: self.syncing.clone(),
        }
    }

    /// Records piece `i` as verified and written, with its part of the
    /// whole-file hash (`value`, from [`TorrentMeta::check_piece`]).
    pub fn mark_written(&mut self, i: u32, value: ChainingValue) {
        if let Some(h) = self.have.get_mut(i as usize) {
            *h = Some(value);
            self.have_bits
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .set(i);
        }
    }

    fn finish(self, final_path: &Path) -> io::Result<()> {
        let values: Option<Vec<ChainingValue>> = self.have.iter().copied().collect();
        let Some(values) = values else {
            return Err(io::Error::other("download is not complete"));
        };
        self.file.sync_all()?;
        // Merged from the pieces' values: the file is not read again.
        let got = match tree_hash::root(&values, self.meta.piece_size, self.meta.size) {
            Some(h) => h.to_hex().to_string(),
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "pieces do not fit the file's size",
                ));
            }
        };
        if got != self.meta.file_hash {
            let _ = std::fs::remove_file(&self.part_path);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "whole-file hash {got} does not match {}",
                    self.meta.file_hash
                ),
            ));
        }
        std::fs::rename(&self.part_path, final_path)
    }
}

/// Writes pieces of one download; see [`Partial::writer`].
#[derive(Clone)]
pub struct PieceWriter {
    file: Arc<File>,
    piece_size: u64,
    unsynced: Arc<AtomicU64>,
    syncing: Arc<AtomicBool>,
}

impl PieceWriter {
    /// Writes piece `i`; every `SYNC_EVERY` bytes or so, the writer that
    /// crosses the mark (one at a time) also flushes the file to disk, so
    /// a full or failing disk stops the download early and the last sync
    /// is short.
    pub fn write(&self, i: u32, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, i as u64 * self.piece_size)?;
        let pending =
            self.unsynced.fetch_add(data.len() as u64, Ordering::AcqRel) + data.len() as u64;
        if pending >= SYNC_EVERY && !self.syncing.swap(true, Ordering::AcqRel) {
            self.unsynced.store(0, Ordering::Release);
            let r = self.file.sync_data();
            self.syncing.store(false, Ordering::Release);
            r?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::torrent::meta::MIN_PIECE;

    /// A store in a fresh directory and the metadata of a file of
    /// 3.5 pieces (written to the store's root).
    fn setup(name: &str) -> (PathBuf, Store, Vec<u8>, TorrentMeta) {
        let dir = std::env::temp_dir().join(format!("llama-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        let data: Vec<u8> = (0..(3 * MIN_PIECE + MIN_PIECE / 2))
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        let src = dir.join("src.bin");
        std::fs::write(&src, &data).unwrap();
        let meta = TorrentMeta::from_file(&src, "f.bin").unwrap();
        (dir, store, data, meta)
    }

    fn piece<'a>(data: &'a [u8], meta: &TorrentMeta, i: u32) -> &'a [u8] {
        let at = (i as u64 * meta.piece_size) as usize;
        &data[at..at + meta.piece_len(i) as usize]
    }

    /// Piece `i`'s part of the file hash, from its bytes in `data`.
    fn value(meta: &TorrentMeta, data: &[u8], i: u32) -> blake3::hazmat::ChainingValue {
        tree_hash::piece_value(piece(data, meta, i), i, meta.piece_size, meta.size)
    }

    #[test]
    fn a_download_resumes_and_completes_under_its_final_name_with_the_files_hash() {
        let (dir, store, data, meta) = setup("resume");
        let mut p = store.partial(&meta).unwrap();
        assert_eq!(p.missing(), vec![0, 1, 2, 3]);
        let w = p.writer();
        for i in [3, 1] {
            w.write(i, piece(&data, &meta, i)).unwrap();
            p.mark_written(i, value(&meta, &data, i));
        }
        drop((w, p));
        // Reopened: the pieces on disk are found again by their hashes.
        let mut p = store.partial(&meta).unwrap();
        assert_eq!(p.missing(), vec![0, 2]);
        assert_eq!(p.verified_bytes(), meta.piece_size + meta.piece_len(3));
        let w = p.writer();
        for i in [2, 0] {
            w.write(i, piece(&data, &meta, i)).unwrap();
            p.mark_written(i, value(&meta, &data, i));
        }
        drop(w);
        let path = store.complete(p).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert!(store.seed(&meta.file_hash).is_some());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn pieces_that_match_their_hashes_but_not_the_files_hash_are_never_placed() {
        // Metadata whose piece hashes describe other bytes than its file hash.
        let (dir, store, mut data, mut meta) = setup("lying");
        data[10] ^= 0xff;
        meta.pieces[0] = crate::torrent::meta::hex(&tree_hash::piece_value(
            piece(&data, &meta, 0),
            0,
            meta.piece_size,
            meta.size,
        ));
        let mut p = store.partial(&meta).unwrap();
        let w = p.writer();
        for i in 0..meta.n_pieces() {
            assert!(meta.check_piece(i, piece(&data, &meta, i)).is_some());
            w.write(i, piece(&data, &meta, i)).unwrap();
            p.mark_written(i, value(&meta, &data, i));
        }
        drop(w);
        let err = store.complete(p).unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
        assert!(!store.final_path(&meta.file_hash).exists());
        assert!(store.seed(&meta.file_hash).is_none());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_shared_download_serves_only_its_verified_pieces_until_it_is_complete() {
        let (dir, store, data, meta) = setup("shared");
        let mut p = store.partial(&meta).unwrap();
        store.share(&p);
        let h = meta.file_hash.clone();
        let mut out = Vec::new();
        assert!(store.read_piece_into(&h, 1, &mut out).is_err());
        assert_eq!(store.piece_len(&h, 1), None);
        p.writer().write(1, piece(&data, &meta, 1)).unwrap();
        // Written but not yet recorded as verified: still not served.
        assert!(store.read_piece_into(&h, 1, &mut out).is_err());
        p.mark_written(1, value(&meta, &data, 1));
        assert_eq!(store.bitfield(&h).unwrap().ones().collect::<Vec<_>>(), [1]);
        assert_eq!(store.shared_meta(&h), Some(meta.clone()));
        assert_eq!(
            store.read_piece_into(&h, 1, &mut out).ok(),
            Some(PieceSource::Partial)
        );
        assert_eq!(out, piece(&data, &meta, 1));
        let w = p.writer();
        for i in [0, 2, 3] {
            w.write(i, piece(&data, &meta, i)).unwrap();
            p.mark_written(i, value(&meta, &data, i));
        }
        drop(w);
        store.complete(p).unwrap();
        store.unshare(&h);
        out.clear();
        assert_eq!(
            store.read_piece_into(&h, 3, &mut out).ok(),
            Some(PieceSource::Complete)
        );
        assert_eq!(out, piece(&data, &meta, 3));
        assert!(store.bitfield(&h).unwrap().is_complete());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_incomplete_download_is_not_finished() {
        let (dir, store, data, meta) = setup("incomplete");
        let mut p = store.partial(&meta).unwrap();
        p.writer().write(0, piece(&data, &meta, 0)).unwrap();
        p.mark_written(0, value(&meta, &data, 0));
        let err = store.complete(p).unwrap_err().to_string();
        assert!(err.contains("not complete"), "{err}");
        assert!(!store.final_path(&meta.file_hash).exists());
        let _ = std::fs::remove_dir_all(dir);
    }
}
