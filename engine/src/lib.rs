//! llama-cluster's inference engine on llama.cpp:
//!
//! - [`split`]: cut a GGUF into layer-range shard files plus a head file and a manifest;
//! - [`ffi`]: the small safe wrapper over `llama-cpp-sys-2` that runs one stage
//!   (embedding-input batches, the eval callback that captures hidden states);
//! - [`stage`]: a loaded shard on its own thread, with bounded, expiring sessions
//!   whose steps are batched into one `llama_decode` ([`batched`]);
//! - [`sampling`]: sampler chains (llama.cpp's samplers) used by the last stage;
//! - [`vocab`]: tokenizer, chat template and streaming detokenizer from the head file;
//! - [`baseline`]: the unsplit model through llama-cpp-2, the reference for equality tests.

pub mod arch;
pub mod baseline;
pub mod batched;
pub mod chain;
pub mod ffi;
mod gguf;
pub mod manifest;
pub mod plan;
pub mod profile;
pub mod sampling;
pub mod split;
pub mod stage;
pub mod vocab;

use std::sync::OnceLock;

use llama_cpp_2::llama_backend::LlamaBackend;

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Load(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("busy: {0}")]
    Busy(String),
    #[error("session error: {0}")]
    Session(String),
    #[error("llama.cpp failed: {0}")]
    Llama(String),
    /// The error's text is in the message (no source: `{:#}` printed it
    /// twice).
    #[error("I/O error: {0}")]
    Io(std::io::Error),
    /// Writing an output file failed (the partial file is removed).
    #[error("writing {}: {error}", path.display())]
    Write {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("engine thread stopped")]
    Stopped,
}

impl From<std::io::Error> for EngineError {
    fn from(e: std::io::Error) -> Self {
        EngineError::Io(e)
    }
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// Settings that must be equal in every stage and in the single-node
/// baseline for bit-identical results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EngineSettings {
    /// Context length (tokens) of one session.
    pub n_ctx: u32,
    /// Largest batch given to one `llama_decode`; prompts are fed in chunks of this size.
    pub n_batch: u32,
    /// Physical batch size; must match across stages and baseline.
    pub n_ubatch: u32,
    /// CPU threads for llama.cpp.
    pub threads: i32,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            n_ctx: 2048,
            n_batch: 512,
            n_ubatch: 512,
            threads: std::thread::available_parallelism()
                .map(|n| n.get() as i32)
                .unwrap_or(2),
        }
    }
}

/// File name of the default model (SmolLM2-135M-Instruct, Q4_1).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The cache directory: `$LLAMA_CLUSTER_CACHE`, else `~/.cache/llama-cluster`.
pub fn cache_root() -> std::path::PathBuf {
    std::env::var_os("LLAMA_CLUSTER_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| std::path::PathBuf::from(h).join(".cache/llama-cluster"))
        })
        .unwrap_or_else(|| std::env::temp_dir().join("llama-cluster"))
}

/// Where the default model is (`$LLAMA_CLUSTER_MODEL`, else the cache, where
/// `scripts/fetch-model.sh` puts it). The file may not exist yet.
pub fn default_model_path() -> std::path::PathBuf {
    match std::env::var_os("LLAMA_CLUSTER_MODEL") {
        Some(p) => std::path::PathBuf::from(p),
        None => cache_root().join("models").join(DEFAULT_MODEL_FILE),
    }
}

static BACKEND: OnceLock<std::result::Result<LlamaBackend, llama_cpp_2::LlamaCppError>> =
    OnceLock::new();

/// Initialises llama.cpp once per process (logs go to `tracing` at debug level).
pub fn backend() -> Result<&'static LlamaBackend> {
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(
                llama_cpp_2::LogOptions::default()
                    .with_logs_enabled(std::env::var("LLAMA_CLUSTER_LLAMA_LOGS").is_ok()),
            );
            LlamaBackend::init()
        })
        .as_ref()
        .map_err(|e| EngineError::Load(format!("llama.cpp backend: {e}")))
}
