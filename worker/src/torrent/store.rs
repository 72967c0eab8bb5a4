//! Where torrent files live: complete files by content hash
//! (`files/<hash>`, with `meta/<hash>.json`), downloads in progress
//! (`partial/<hash>.part`, pieces re-verified on resume), and files seeded
//! from elsewhere on disk (a split directory). Nothing is served or placed
//! under its final name before it is verified.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::meta::TorrentMeta;

/// A complete, verified file that can be served.
#[derive(Debug, Clone)]
pub struct Seed {
    pub meta: TorrentMeta,
    pub path: PathBuf,
}

pub struct Store {
    root: PathBuf,
    seeds: RwLock<HashMap<String, Seed>>,
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

    pub fn seed(&self, hash: &str) -> Option<Seed> {
        self.seeds
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(hash)
            .cloned()
    }

    /// Length of piece `i` of a complete file here (no copy of its metadata).
    pub fn piece_len(&self, hash: &str, i: u32) -> Option<u64> {
        self.seeds
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(hash)
            .filter(|s| i < s.meta.n_pieces())
            .map(|s| s.meta.piece_len(i))
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
    pub fn read_piece(&self, hash: &str, i: u32) -> Result<Vec<u8>, String> {
        let mut buf = Vec::new();
        self.read_piece_into(hash, i, &mut buf)?;
        Ok(buf)
    }

    /// Appends piece `i` of file `hash` to `out` (a response frame being
    /// built, so the piece is copied once, from the page cache).
    pub fn read_piece_into(&self, hash: &str, i: u32, out: &mut Vec<u8>) -> Result<(), String> {
        let seed = self
            .seed(hash)
            .ok_or_else(|| format!("no complete file {hash} here"))?;
        if i >= seed.meta.n_pieces() {
            return Err(format!(
                "piece {i} out of range (the file has {})",
                seed.meta.n_pieces()
            ));
        }
        let len = seed.meta.piece_len(i);
        let err = |e: io::Error| format!("{}: {e}", seed.path.display());
        let mut f = File::open(&seed.path).map_err(err)?;
        f.seek(SeekFrom::Start(i as u64 * seed.meta.piece_size))
            .map_err(err)?;
        out.reserve_exact(len as usize);
        let n = f.take(len).read_to_end(out).map_err(err)?;
        if n as u64 != len {
            return Err(format!(
                "{}: piece {i} is short ({n} of {len} bytes): the file changed on disk",
                seed.path.display()
            ));
        }
        Ok(())
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
pub struct Partial {
    pub meta: TorrentMeta,
    file: Arc<File>,
    have: Vec<bool>,
    part_path: PathBuf,
}

impl Partial {
    fn open(dir: &Path, meta: &TorrentMeta) -> io::Result<Partial> {
        let part_path = dir.join(format!("{}.part", meta.file_hash));
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
        let mut have = vec![false; n];
        if existed {
            let mut buf = Vec::new();
            for (i, h) in have.iter_mut().enumerate() {
                let i = i as u32;
                buf.resize(meta.piece_len(i) as usize, 0);
                *h = file
                    .read_exact_at(&mut buf, i as u64 * meta.piece_size)
                    .is_ok()
                    && meta.check_piece(i, &buf);
            }
        }
        Ok(Partial {
            meta: meta.clone(),
            file: Arc::new(file),
            have,
            part_path,
        })
    }

    pub fn missing(&self) -> Vec<u32> {
        (0..self.have.len() as u32)
            .filter(|&i| !self.have[i as usize])
            .collect()
    }

    pub fn verified_bytes(&self) -> u64 {
        (0..self.have.len() as u32)
            .filter(|&i| self.have[i as usize])
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
        }
    }

    pub fn mark_written(&mut self, i: u32) {
        if let Some(h) = self.have.get_mut(i as usize) {
            *h = true;
        }
    }

    fn finish(self, final_path: &Path) -> io::Result<()> {
        if !self.missing().is_empty() {
            return Err(io::Error::other("download is not complete"));
        }
        self.file.sync_all()?;
        let mut hasher = blake3::Hasher::new();
        let mut f = File::open(&self.part_path)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let got = hasher.finalize().to_hex().to_string();
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
}

impl PieceWriter {
    pub fn write(&self, i: u32, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, i as u64 * self.piece_size)
    }
}
