//! Torrent metadata: a file cut into pieces, every piece and the whole file
//! identified by BLAKE3 (the hash the split manifest uses), the metadata
//! itself addressed by the hash of its canonical encoding.
//!
//! A piece's hash is its node in the file's BLAKE3 tree (its chaining value,
//! see [`super::tree_hash`]), so the piece hashes add up to the file's hash:
//! piece hashes are checked against the file hash they are asked by before
//! any piece is fetched, and each piece is hashed once, both to verify it
//! and to build the whole-file hash. The size is not covered by that check
//! (the tree's shape is the same for every size within the last piece): a
//! wrong size shows against the manifest's pin (`pieces_hash` covers it), or
//! at the last piece ([`TorrentMeta::proves_wrong_size`]).

use std::io::Read;
use std::path::Path;

use blake3::hazmat::ChainingValue;
use serde::{Deserialize, Serialize};

use super::tree_hash;

/// Smallest piece size (1 MiB); larger files get larger pieces so that a
/// file has at most [`MAX_PIECES`] pieces.
pub const MIN_PIECE: u64 = 1 << 20;
/// Largest piece size accepted from anyone.
pub const MAX_PIECE: u64 = 16 << 20;
pub const MAX_PIECES: u64 = 8192;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TorrentMeta {
    pub name: String,
    pub size: u64,
    pub piece_size: u64,
    /// Hex BLAKE3 chaining value of each piece as a subtree of the file's
    /// tree, in order (the file's hash when the file is one piece).
    pub pieces: Vec<String>,
    /// Hex BLAKE3 of the whole file: the file's identity.
    pub file_hash: String,
}

/// Piece size for a file of `size` bytes.
pub fn piece_size_for(size: u64) -> u64 {
    let mut p = MIN_PIECE;
    while size.div_ceil(p) > MAX_PIECES && p < MAX_PIECE {
        p *= 2;
    }
    p
}

fn is_hex_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl TorrentMeta {
    /// Hashes a file in one streaming pass: its pieces, and the whole-file
    /// hash merged from them.
    pub fn from_file(path: &Path, name: &str) -> std::io::Result<TorrentMeta> {
        let size = std::fs::metadata(path)?.len();
        let piece_size = piece_size_for(size);
        let mut f = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
        let mut values = Vec::with_capacity(size.div_ceil(piece_size) as usize);
        let mut buf = vec![0u8; piece_size as usize];
        let mut left = size;
        while left > 0 {
            let n = left.min(piece_size) as usize;
            f.read_exact(&mut buf[..n])?;
            values.push(tree_hash::piece_value(
                &buf[..n],
                values.len() as u32,
                piece_size,
                size,
            ));
            left -= n as u64;
        }
        let file_hash = tree_hash::root(&values, piece_size, size)
            .ok_or_else(|| std::io::Error::other("the file changed while it was hashed"))?;
        Ok(TorrentMeta {
            name: name.to_string(),
            size,
            piece_size,
            pieces: values.iter().map(hex).collect(),
            file_hash: file_hash.to_hex().to_string(),
        })
    }

    pub fn n_pieces(&self) -> u32 {
        self.pieces.len() as u32
    }

    /// Length of piece `i`.
    pub fn piece_len(&self, i: u32) -> u64 {
        let start = i as u64 * self.piece_size;
        self.size.saturating_sub(start).min(self.piece_size)
    }

    /// Canonical encoding (JSON with fields in declaration order).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The metadata's own address.
    pub fn meta_hash(&self) -> String {
        blake3::hash(&self.encode()).to_hex().to_string()
    }

    /// Hex BLAKE3 over the piece size and the piece hashes: what a manifest
    /// pins (`pieces_hash`), independent of the name a seeder uses.
    pub fn pieces_hash(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(&self.size.to_le_bytes());
        h.update(&self.piece_size.to_le_bytes());
        for p in &self.pieces {
            h.update(p.as_bytes());
        }
        h.finalize().to_hex().to_string()
    }

    /// Checks that the description is self-consistent and within limits.
    pub fn validate(&self) -> Result<(), MetaError> {
        if !is_hex_hash(&self.file_hash) {
            return Err(MetaError::FileHash);
        }
        if !(MIN_PIECE..=MAX_PIECE).contains(&self.piece_size) || !self.piece_size.is_power_of_two()
        {
            return Err(MetaError::PieceSize(self.piece_size));
        }
        if self.pieces.len() as u64 != self.size.div_ceil(self.piece_size) {
            return Err(MetaError::PieceCount {
                pieces: self.pieces.len(),
                size: self.size,
                piece_size: self.piece_size,
            });
        }
        if self.pieces.len() as u64 > MAX_PIECES * 16 {
            return Err(MetaError::TooManyPieces);
        }
        if let Some(bad) = self.pieces.iter().find(|p| !is_hex_hash(p)) {
            return Err(MetaError::PieceHash(bad.clone()));
        }
        if self.name.is_empty()
            || self.name.contains('/')
            || self.name.contains('\\')
            || self.name.starts_with('.')
        {
            return Err(MetaError::Name(self.name.clone()));
        }
        let values: Option<Vec<ChainingValue>> = self.pieces.iter().map(|p| unhex(p)).collect();
        let adds_up = values
            .and_then(|v| tree_hash::root(&v, self.piece_size, self.size))
            .is_some_and(|root| root.to_hex().as_str() == self.file_hash);
        if !adds_up {
            return Err(MetaError::DoesNotAddUp);
        }
        Ok(())
    }

    /// Piece `i`'s part of the whole-file hash when `data` is piece `i`
    /// (one BLAKE3 pass over it), else `None`.
    pub fn check_piece(&self, i: u32, data: &[u8]) -> Option<ChainingValue> {
        if data.len() as u64 != self.piece_len(i) {
            return None;
        }
        self.hashes_to(i, data, self.size)
    }

    /// `data`'s value as piece `i` of a file of `size` bytes, when that is
    /// the piece hash the metadata gives.
    fn hashes_to(&self, i: u32, data: &[u8], size: u64) -> Option<ChainingValue> {
        let want = self.pieces.get(i as usize)?;
        let value = tree_hash::piece_value(data, i, self.piece_size, size);
        (hex(&value) == *want).then_some(value)
    }

    /// Whether `data`, received as the last piece, proves this metadata's
    /// size wrong: its length is not the one the size gives, yet it is the
    /// file's own last piece (it hashes to the piece hash at its length).
    /// The piece hashes cannot carry such a lie; only the size can.
    pub fn proves_wrong_size(&self, i: u32, data: &[u8]) -> bool {
        let last = self.n_pieces().saturating_sub(1);
        if i != last || data.len() as u64 == self.piece_len(i) {
            return false;
        }
        if data.is_empty() || data.len() as u64 > self.piece_size {
            return false;
        }
        // The true size, had the metadata said it.
        let size = i as u64 * self.piece_size + data.len() as u64;
        self.hashes_to(i, data, size).is_some()
    }
}

/// Why [`TorrentMeta::validate`] refuses metadata whose piece hashes are not
/// the pieces of its file.
pub const PIECES_DO_NOT_ADD_UP: &str = "its piece hashes do not add up to the file's hash";

/// Why a torrent description is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("file hash is not a BLAKE3 hex digest")]
    FileHash,
    #[error("piece size {0} out of range")]
    PieceSize(u64),
    #[error("{pieces} piece hashes for {size} bytes in pieces of {piece_size}")]
    PieceCount {
        pieces: usize,
        size: u64,
        piece_size: u64,
    },
    #[error("too many pieces")]
    TooManyPieces,
    #[error("piece hash {0:?} is not a BLAKE3 hex digest")]
    PieceHash(String),
    #[error("file name {0:?} is not a plain name")]
    Name(String),
    #[error("{PIECES_DO_NOT_ADD_UP}")]
    DoesNotAddUp,
}

/// Lowercase hex of a piece hash.
pub fn hex(value: &ChainingValue) -> String {
    blake3::Hash::from_bytes(*value).to_hex().to_string()
}

fn unhex(s: &str) -> Option<ChainingValue> {
    blake3::Hash::from_hex(s).ok().map(|h| *h.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_of_a_file_checks_out() {
        let dir = std::env::temp_dir().join(format!("llama-meta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.bin");
        let data: Vec<u8> = (0..(2 * MIN_PIECE + 123))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let m = TorrentMeta::from_file(&path, "f.bin").unwrap();
        assert_eq!(m.n_pieces(), 3);
        assert_eq!(m.piece_len(2), 123);
        assert_eq!(m.file_hash, blake3::hash(&data).to_hex().to_string());
        m.validate().unwrap();
        let whole = |i: u32| {
            let at = (i as u64 * MIN_PIECE) as usize;
            &data[at..at + m.piece_len(i) as usize]
        };
        for i in 0..3 {
            assert!(m.check_piece(i, whole(i)).is_some(), "piece {i}");
        }
        // The right bytes at the wrong index, a truncated piece, no such piece.
        assert!(m.check_piece(1, whole(0)).is_none());
        assert!(m.check_piece(2, &whole(2)[..100]).is_none());
        assert!(m.check_piece(9, &data[..10]).is_none());
        let back: TorrentMeta = serde_json::from_slice(&m.encode()).unwrap();
        assert_eq!(back.meta_hash(), m.meta_hash());
        let mut bad = m.clone();
        bad.pieces.pop();
        assert!(bad.validate().is_err());
        let mut bad = m.clone();
        bad.name = "../etc/passwd".into();
        assert!(bad.validate().is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn metadata_whose_piece_hashes_are_not_its_files_pieces_is_invalid() {
        let dir = std::env::temp_dir().join(format!("llama-meta-lie-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.bin");
        let mut data: Vec<u8> = (0..(3 * MIN_PIECE)).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let m = TorrentMeta::from_file(&path, "f.bin").unwrap();
        m.validate().unwrap();
        // Piece hashes in another order.
        let mut swapped = m.clone();
        swapped.pieces.swap(0, 1);
        assert_eq!(swapped.validate(), Err(MetaError::DoesNotAddUp));
        // One piece hash describing other bytes (what a lying seeder sends).
        data[5] ^= 0xff;
        let mut lying = m.clone();
        lying.pieces[0] = hex(&tree_hash::piece_value(
            &data[..MIN_PIECE as usize],
            0,
            m.piece_size,
            m.size,
        ));
        assert_eq!(lying.validate(), Err(MetaError::DoesNotAddUp));
        // The same pieces claimed for another file hash.
        let mut other = m.clone();
        other.file_hash = blake3::hash(b"other").to_hex().to_string();
        assert_eq!(other.validate(), Err(MetaError::DoesNotAddUp));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_last_piece_of_another_length_proves_a_wrong_size() {
        let dir = std::env::temp_dir().join(format!("llama-meta-size-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for len in [MIN_PIECE + 1000, 3 * MIN_PIECE - 7, 5000] {
            let path = dir.join("f.bin");
            let data: Vec<u8> = (0..len).map(|i| (i % 239) as u8).collect();
            std::fs::write(&path, &data).unwrap();
            let m = TorrentMeta::from_file(&path, "f.bin").unwrap();
            let last = m.n_pieces() - 1;
            let tail = &data[(last as u64 * m.piece_size) as usize..];
            assert!(!m.proves_wrong_size(last, tail), "the true size");
            // The same piece hashes with a size one byte short: valid, and
            // the file's true last piece shows it.
            let mut short = m.clone();
            short.size -= 1;
            short.validate().unwrap();
            assert!(short.check_piece(last, tail).is_none());
            assert!(short.proves_wrong_size(last, tail), "{len} bytes");
            // Other bytes of the same length prove nothing.
            let mut other = tail.to_vec();
            other[0] ^= 1;
            assert!(!short.proves_wrong_size(last, &other));
            if last > 0 {
                assert!(!short.proves_wrong_size(0, &data[..10]));
            }
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn piece_sizes_grow_for_big_files() {
        assert_eq!(piece_size_for(100), MIN_PIECE);
        assert_eq!(piece_size_for(8 << 30), 1 << 20);
        assert_eq!(piece_size_for(32 << 30), 4 << 20);
        assert_eq!(piece_size_for(1 << 40), MAX_PIECE);
    }
}
