//! What a layer split must do per model architecture, as a table.
//!
//! Each accepted `general.architecture` has a [`Rule`]: whether its graph
//! needs an `output.weight` on every shard, how llama.cpp decides which
//! layers use a sliding window (so that each shard gets an explicit,
//! sliced `sliding_window_pattern` array instead of a pattern restarted at
//! its local layer 0), whether stage 0 must scale host-side embeddings, and
//! small hooks that rewrite a shard's metadata or refuse sizes llama.cpp
//! treats by their layer count. Every other architecture is refused with the
//! reason. Facts come from the llama.cpp this crate vendors
//! (`llama-cpp-sys-2 0.1.161`, `src/models/<arch>.cpp`).
//!
//! The splitter applies the rules; nothing here touches files, so the rules
//! are unit-tested on their own.

mod rules;

pub use rules::{REFUSED, RULES};

use crate::{EngineError, Result};

/// What the rules read from the source model's metadata.
pub trait Meta {
    fn u32(&self, key: &str) -> Option<u32>;
    fn has(&self, key: &str) -> bool;
    /// Length of an array value (None: absent or not an array).
    fn arr_len(&self, key: &str) -> Option<usize>;
}

/// The source model, as the rules see it.
#[derive(Debug, Clone, Copy)]
pub struct Model<'a> {
    pub arch: &'a str,
    /// `block_count`: trunk layers plus MTP (next-token-prediction) layers.
    pub n_layer_all: u32,
    /// Trunk layers (what is split; MTP layers are dropped).
    pub n_layer: u32,
    pub n_vocab: u32,
}

/// One shard being written: trunk layers `start..=end`.
#[derive(Debug, Clone, Copy)]
pub struct Shard {
    pub index: usize,
    pub n_shards: usize,
    pub start: u32,
    pub end: u32,
}

impl Shard {
    pub fn n_layers(&self) -> u32 {
        self.end - self.start + 1
    }
    pub fn is_first(&self) -> bool {
        self.index == 0
    }
    pub fn is_last(&self) -> bool {
        self.index + 1 == self.n_shards
    }
    /// The vocabulary llama.cpp sees in this shard (lean non-last shards: 1).
    pub fn vocab(&self, m: &Model) -> u32 {
        if self.is_last() { m.n_vocab } else { 1 }
    }
}

/// A metadata change in one shard.
#[derive(Debug, Clone, PartialEq)]
pub enum Edit {
    U32(String, u32),
    Bools(String, Vec<bool>),
    Remove(String),
}

/// Whether the graph needs `output.weight` on a shard that has no head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Optional (falls back to `token_embd`): non-last shards drop it.
    Optional,
    /// Required (created without `TENSOR_NOT_REQUIRED`): non-last shards get a one-row one.
    Required,
}

/// How llama.cpp decides which layers use the sliding window
/// (`llama_model_base::load_swa_pattern`, `llama_hparams::set_swa_pattern`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swa {
    /// No sliding-window layers (or none that depend on the layer index).
    None,
    /// Sliding window when `<arch>.attention.sliding_window` > 0; the
    /// pattern is the array, else the scalar, else `pattern`.
    WithWindow { pattern: u32, dense_first: bool },
    /// Always (the window key is required).
    Always { pattern: u32, dense_first: bool },
}

/// What stage 0 must do to embeddings it looks up on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokScale {
    None,
    /// llama.cpp scales token rows only (`build_inp_embd(tok_embd, sqrtf(n_embd))`),
    /// never embedding rows: the host multiplies by `sqrt(n_embd)` in f32.
    SqrtEmbd,
}

/// Rewrites one shard's metadata (appends edits) or refuses.
pub type Hook = fn(&dyn Meta, &Model, &Shard, &mut Vec<Edit>) -> Result<()>;
/// Refuses a model, or a plan, llama.cpp would treat differently split.
pub type Check = fn(&dyn Meta, &Model, &[(u32, u32)]) -> Result<()>;

pub struct Rule {
    pub arch: &'static str,
    /// Models of the family, for messages and the README.
    pub models: &'static str,
    pub output: Output,
    pub swa: Swa,
    pub tok_scale: TokScale,
    pub hooks: &'static [Hook],
    pub check: Option<Check>,
    /// Shards must start at multiples of this (layer patterns llama.cpp
    /// counts from each shard's first layer); 1: anywhere.
    pub align: u32,
}

/// Tensors outside `blk.*` that layers read and every shard keeps: global
/// RoPE factors (Llama 3.1+ `rope_freqs`, LongRoPE long/short factors).
/// They load as optional, so a shard without them silently runs RoPE
/// unscaled. `output_norm` is required by every graph.
pub const EVERY_SHARD: &[&str] = &[
    "rope_freqs.weight",
    "rope_factors_long.weight",
    "rope_factors_short.weight",
    "output_norm.weight",
];

/// The rule of `arch`, or a refusal that names it and says why.
pub fn rule(arch: &str) -> Result<&'static Rule> {
    if let Some(r) = RULES.iter().find(|r| r.arch == arch) {
        return Ok(r);
    }
    let accepted: Vec<&str> = RULES.iter().map(|r| r.arch).collect();
    let why = REFUSED
        .iter()
        .find(|(a, _)| *a == arch)
        .map(|(_, why)| why.to_string())
        .unwrap_or_else(|| {
            "its graph has not been checked for layer splitting against llama.cpp".into()
        });
    Err(EngineError::Unsupported(format!(
        "architecture {arch:?} cannot be split: {why} (splittable: {})",
        accepted.join(", ")
    )))
}

/// Refuses what the rule's check refuses (the whole model or this plan).
pub fn check_plan(meta: &dyn Meta, m: &Model, ranges: &[(u32, u32)]) -> Result<()> {
    let r = rule(m.arch)?;
    if let Some(&(a, b)) = ranges.iter().find(|&&(a, _)| a % r.align != 0) {
        return Err(EngineError::Unsupported(format!(
            "{}: every shard must start at a multiple of {} (llama.cpp counts its layer pattern from each shard's first layer); the shard {a}-{b} does not",
            m.arch, r.align
        )));
    }
    match r.check {
        Some(c) => c(meta, m, ranges),
        None => Ok(()),
    }
}

/// The metadata edits of one shard: MTP layers dropped, the sliding-window
/// pattern written out, then the rule's hooks.
pub fn shard_edits(meta: &dyn Meta, m: &Model, s: &Shard) -> Result<Vec<Edit>> {
    let r = rule(m.arch)?;
    let mut edits = Vec::new();
    let nextn = format!("{}.nextn_predict_layers", m.arch);
    if meta.has(&nextn) {
        edits.push(Edit::U32(nextn, 0));
    }
    let window = meta.u32(&format!("{}.attention.sliding_window", m.arch));
    let swa = match r.swa {
        Swa::None => None,
        Swa::WithWindow {
            pattern,
            dense_first,
        } if window.is_some_and(|w| w > 0) => Some((pattern, dense_first)),
        Swa::WithWindow { .. } => None,
        Swa::Always {
            pattern,
            dense_first,
        } => Some((pattern, dense_first)),
    };
    if let Some((default, dense_first)) = swa {
        let key = format!("{}.attention.sliding_window_pattern", m.arch);
        match meta.arr_len(&key) {
            // An array of one entry per layer is sliced with the others.
            Some(n) if n == m.n_layer_all as usize => {}
            Some(n) => {
                return Err(EngineError::Unsupported(format!(
                    "{key} has {n} entries for {} layers",
                    m.n_layer_all
                )));
            }
            None => {
                let n_pattern = meta.u32(&key).unwrap_or(default);
                let global = swa_layers(n_pattern, dense_first, m.n_layer);
                edits.push(Edit::Bools(
                    key,
                    global[s.start as usize..=s.end as usize].to_vec(),
                ));
            }
        }
    }
    for hook in r.hooks {
        hook(meta, m, s, &mut edits)?;
    }
    Ok(edits)
}

/// Which of `n_layer` layers use the sliding window (`set_swa_pattern`).
pub fn swa_layers(n_pattern: u32, dense_first: bool, n_layer: u32) -> Vec<bool> {
    (0..n_layer)
        .map(|il| {
            n_pattern == 0
                || if dense_first {
                    il % n_pattern != 0
                } else {
                    il % n_pattern < n_pattern - 1
                }
        })
        .collect()
}

/// The factor stage 0 applies to host-side token embeddings (None: none).
pub fn host_embedding_scale(arch: &str, n_embd: usize) -> Option<f32> {
    let r = RULES.iter().find(|r| r.arch == arch)?;
    match r.tok_scale {
        TokScale::None => None,
        // llama.cpp: sqrtf(n_embd) with n_embd an int64 converted to float.
        TokScale::SqrtEmbd => Some((n_embd as f32).sqrt()),
    }
}

/// Scales looked-up embedding rows in place, as llama.cpp's `ggml_mul` by
/// the per-row token scale does (one f32 multiplication per value).
pub fn scale_embeddings(rows: &mut [f32], scale: Option<f32>) {
    if let Some(s) = scale {
        rows.iter_mut().for_each(|x| *x *= s);
    }
}

#[cfg(test)]
mod tests;
