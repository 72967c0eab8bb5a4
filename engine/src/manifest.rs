//! The split manifest: which files make up a split model and what each holds.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{EngineError, Result};

/// File name of the manifest inside a split directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Content hash used everywhere in llama-cluster (hex BLAKE3).
pub const HASH_ALGORITHM: &str = "blake3";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub file: String,
    pub size: u64,
    /// Hex BLAKE3 of the file's bytes.
    pub hash: String,
    /// Pins the file's torrent metadata: hex BLAKE3 over its piece size and
    /// piece hashes (written by `llama-worker split`; empty: not pinned).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pieces_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub id: String,
    pub index: u32,
    pub layer_start: u32,
    pub layer_end: u32,
    /// Bytes of the shard's tensors (what llama.cpp loads).
    #[serde(default)]
    pub tensor_bytes: u64,
    /// Estimated KV-cache bytes per token of context (f16 K and V).
    #[serde(default)]
    pub kv_bytes_per_token: u64,
    #[serde(flatten)]
    pub file: FileEntry,
}

impl ShardEntry {
    pub fn n_layers(&self) -> u32 {
        (self.layer_end.saturating_sub(self.layer_start)).saturating_add(1)
    }

    /// Memory the shard needs for a context of `n_ctx` tokens: its tensors
    /// plus its KV cache (the file size when the manifest predates these
    /// figures).
    pub fn memory_bytes(&self, n_ctx: u32) -> u64 {
        let tensors = if self.tensor_bytes > 0 {
            self.tensor_bytes
        } else {
            self.file.size
        };
        tensors.saturating_add(self.kv_bytes_per_token.saturating_mul(n_ctx as u64))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Model name requests use.
    pub model: String,
    pub architecture: String,
    pub n_layer: u32,
    pub n_embd: u32,
    pub n_vocab: u32,
    pub hash_algorithm: String,
    /// The unsplit file this came from.
    pub source: FileEntry,
    /// Tokenizer, chat template and token embedding table (vocab-only GGUF).
    pub head: FileEntry,
    /// Layer-range shards, in pipeline order.
    pub shards: Vec<ShardEntry>,
}

impl Manifest {
    /// Reads and checks a manifest file.
    pub fn load(path: &Path) -> Result<Manifest> {
        let bytes = std::fs::read(path).map_err(|e| {
            EngineError::Load(format!("cannot read manifest {}: {e}", path.display()))
        })?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
            EngineError::Load(format!("manifest {} is not valid: {e}", path.display()))
        })?;
        m.check()?;
        Ok(m)
    }

    /// Writes the manifest to `path` (pretty JSON, atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| EngineError::Load(e.to_string()))?;
        let tmp = path.with_extension("json.part");
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Checks that the shards cover layers 0..n_layer contiguously.
    pub fn check(&self) -> Result<()> {
        // File names are plain names next to the manifest: never a path.
        let plain = |f: &str| {
            !f.is_empty()
                && !f.starts_with('.')
                && !f.contains(['/', '\\', '\0'])
                && Path::new(f).is_relative()
        };
        let files = std::iter::once(&self.head).chain(self.shards.iter().map(|s| &s.file));
        for f in files {
            if !plain(&f.file) {
                return Err(EngineError::Load(format!(
                    "manifest of {}: file name {:?} is not a plain file name",
                    self.model, f.file
                )));
            }
            if f.hash.len() != 64 || !f.hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(EngineError::Load(format!(
                    "manifest of {}: {} has no BLAKE3 hash",
                    self.model, f.file
                )));
            }
        }
        let mut next = 0;
        for s in &self.shards {
            if s.layer_start != next || s.layer_end < s.layer_start {
                return Err(EngineError::Load(format!(
                    "manifest of {}: shard {} covers layers {}-{}, expected a range starting at {next}",
                    self.model, s.id, s.layer_start, s.layer_end
                )));
            }
            next = s.layer_end.checked_add(1).ok_or_else(|| {
                EngineError::Load(format!(
                    "manifest of {}: shard {} ends at layer {}",
                    self.model, s.id, s.layer_end
                ))
            })?;
        }
        if next != self.n_layer {
            return Err(EngineError::Load(format!(
                "manifest of {}: shards cover {next} of {} layers",
                self.model, self.n_layer
            )));
        }
        Ok(())
    }

    pub fn shard(&self, id: &str) -> Option<&ShardEntry> {
        self.shards.iter().find(|s| s.id == id)
    }

    /// Path of a file of this manifest, next to the manifest file.
    pub fn path_of(manifest_path: &Path, file: &str) -> PathBuf {
        manifest_path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(file)
    }
}

/// Hex BLAKE3 of a file, streamed.
pub fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut hasher = blake3::Hasher::new();
    let f = std::fs::File::open(path)?;
    hasher.update_reader(f)?;
    let size = std::fs::metadata(path)?.len();
    Ok((size, hasher.finalize().to_hex().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(file: &str) -> FileEntry {
        FileEntry {
            file: file.into(),
            size: 1,
            hash: "a".repeat(64),
            pieces_hash: String::new(),
        }
    }

    fn manifest(head: &str) -> Manifest {
        Manifest {
            format: 1,
            model: "m".into(),
            architecture: "llama".into(),
            n_layer: 2,
            n_embd: 8,
            n_vocab: 10,
            hash_algorithm: HASH_ALGORITHM.into(),
            source: entry("m.gguf"),
            head: entry(head),
            shards: vec![ShardEntry {
                id: "m-L0-1".into(),
                index: 0,
                layer_start: 0,
                layer_end: 1,
                tensor_bytes: 0,
                kv_bytes_per_token: 0,
                file: entry("m.L0-1.gguf"),
            }],
        }
    }

    #[test]
    fn file_names_must_be_plain_names() {
        assert!(manifest("m.head.gguf").check().is_ok());
        for bad in ["../x", "/etc/passwd", "a/b", ".hidden", "", "a\\b"] {
            assert!(manifest(bad).check().is_err(), "{bad:?} accepted");
        }
        let mut m = manifest("m.head.gguf");
        m.shards[0].file.hash = "zz".into();
        assert!(m.check().is_err());
    }
}
