//! Cutting a GGUF into layer-range shards with ggml's gguf C API.
//!
//! Every shard is a GGUF that llama.cpp loads on its own: its layers' tensors
//! renumbered from 0, `<arch>.block_count` set to the range length, per-layer
//! metadata arrays sliced. Non-last shards use the "lean0" layout (vocabulary
//! of 1, a one-row `token_embd`, tokenizer `none`), so they carry no
//! full-vocabulary embedding or output head; the last shard keeps
//! `output_norm` and the output head. A separate head file keeps every
//! metadata key (tokenizer, chat template) and the full `token_embd` table:
//! drivers tokenize with it (vocab-only load) and the first stage looks up
//! token embeddings from it on the host.
//!
//! Tensor data is streamed from the source file; memory use stays small
//! whatever the model size.

use std::fs::File;
use std::path::Path;

use llama_cpp_sys_2 as sys;
use tracing::info;

use crate::arch::{self, Output, Rule, Shard};
use crate::gguf::{Out, Planned, Source, gguf_elem_size, set_name, write_file};
use crate::manifest::{FileEntry, HASH_ALGORITHM, MANIFEST_FILE, Manifest, ShardEntry, hash_file};
pub use crate::plan::SplitPlan;
use crate::{EngineError, Result};

/// Slug of a model name: lower case, runs of other characters as `-`.
pub fn slug(name: &str) -> String {
    let mut s = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
            s.push(c.to_ascii_lowercase());
        } else if !s.ends_with('-') {
            s.push('-');
        }
    }
    s.trim_matches('-').chars().take(48).collect()
}

/// Model name from the file name, without a quantisation suffix:
/// `SmolLM2-135M-Instruct.Q4_1.gguf` → `smollm2-135m-instruct`.
pub fn default_model_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let is_quant = |s: &str| {
        let s = s.to_ascii_lowercase();
        let rest = s
            .strip_prefix("bf")
            .or_else(|| s.strip_prefix('q'))
            .or_else(|| s.strip_prefix('f'))
            .or_else(|| s.strip_prefix("iq"));
        rest.is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
    };
    let base = match stem.rsplit_once(['.', '-']) {
        Some((head, tail)) if is_quant(tail) && !head.is_empty() => head.to_string(),
        _ => stem,
    };
    slug(&base)
}

/// Where a tensor of the source goes in a shard.
enum Place {
    /// Layer tensor renamed to this local name.
    Layer(String),
    /// As it is.
    Whole,
    /// Its first row only (a vocabulary of 1).
    OneRow,
    Skip,
}

/// The layer of a `blk.N.*` tensor name and its tail.
fn layer_of(name: &str) -> Result<Option<(u32, &str)>> {
    let Some(rest) = name.strip_prefix("blk.") else {
        return Ok(None);
    };
    let (n, tail) = rest
        .split_once('.')
        .ok_or_else(|| EngineError::Unsupported(format!("odd tensor name {name}")))?;
    let il = n
        .parse()
        .map_err(|_| EngineError::Unsupported(format!("odd tensor name {name}")))?;
    Ok(Some((il, tail)))
}

/// Where `name` goes in shard `s` of a model following `rule`.
fn place(name: &str, rule: &Rule, s: &Shard) -> Result<Place> {
    if let Some((il, tail)) = layer_of(name)? {
        // MTP layers (il >= trunk) are outside every range and dropped.
        return Ok(if il >= s.start && il <= s.end {
            Place::Layer(format!("blk.{}.{tail}", il - s.start))
        } else {
            Place::Skip
        });
    }
    Ok(match name {
        _ if s.is_last() => Place::Whole,
        _ if arch::EVERY_SHARD.contains(&name) => Place::Whole,
        // One row: llama.cpp needs the tensor (vocabulary of 1); the first
        // stage's lookup is done on the host from the head file. The last
        // stage keeps every row (and it is the head of tied models).
        "token_embd.weight" => Place::OneRow,
        "output.weight" if rule.output == Output::Required => Place::OneRow,
        // Head tensors (output, its bias, classifier heads) stay on the last shard.
        _ => Place::Skip,
    })
}

fn one_row(t: &mut sys::ggml_tensor) {
    t.ne[1] = 1;
    t.nb[2] = t.nb[1];
    t.nb[3] = t.nb[2];
}

/// Byte sizes: each trunk layer's tensors, and what only the last shard
/// holds beyond its layers (full embeddings, head, output norm).
fn weigh(source: &Source, names: &[String], n_layer: u32) -> Result<(Vec<u64>, u64)> {
    weigh_by(source, names, n_layer, |_, t| {
        // SAFETY: a valid tensor description.
        unsafe { sys::ggml_nbytes(t) as u64 }
    })
}

/// Elements of each trunk layer's tensors, and of the output head (an
/// `output.weight`, else the tied `token_embd.weight`): what a token costs
/// each shard to compute, whatever the weights' types.
fn weigh_compute(source: &Source, names: &[String], n_layer: u32) -> Result<(Vec<u64>, u64)> {
    let tied = !names.iter().any(|n| n == "output.weight");
    weigh_by(source, names, n_layer, |name, t| {
        let head = name == "output.weight" || (tied && name == "token_embd.weight");
        if layer_of(name).ok().flatten().is_none() && !head {
            return 0;
        }
        // SAFETY: a valid tensor description.
        unsafe { sys::ggml_nelements(t) as u64 }
    })
}

fn weigh_by(
    source: &Source,
    names: &[String],
    n_layer: u32,
    weight: impl Fn(&str, &sys::ggml_tensor) -> u64,
) -> Result<(Vec<u64>, u64)> {
    let mut layers = vec![0u64; n_layer as usize];
    let mut last = 0u64;
    for name in names {
        let t = source.tensor(name)?;
        let bytes = weight(name, &t);
        match layer_of(name)? {
            Some((il, _)) if il < n_layer => {
                layers[il as usize] = layers[il as usize].saturating_add(bytes)
            }
            Some(_) => {}
            None => last = last.saturating_add(bytes),
        }
    }
    Ok((layers, last))
}

/// Estimated KV-cache bytes per token of layers `a..=b` (f16 K and V).
fn kv_bytes_per_token(source: &Source, arch: &str, n_embd: u32, a: u32, b: u32) -> Result<u64> {
    let get = |k: &str, il: u32| source.u32_at(&format!("{arch}.{k}"), il);
    let mut total = 0u64;
    for il in a..=b {
        let per_layer = match get("attention.kv_lora_rank", il)? {
            // MLA caches the compressed KV and the RoPE part of K.
            Some(rank) => {
                u64::from(rank) + u64::from(get("rope.dimension_count", il)?.unwrap_or(0))
            }
            None => {
                let n_head = get("attention.head_count", il)?.unwrap_or(1).max(1);
                let n_kv = get("attention.head_count_kv", il)?.unwrap_or(n_head);
                let k = get("attention.key_length", il)?.unwrap_or(n_embd / n_head);
                let v = get("attention.value_length", il)?.unwrap_or(k);
                u64::from(n_kv).saturating_mul(u64::from(k) + u64::from(v))
            }
        };
        total = total.saturating_add(per_layer.saturating_mul(2));
    }
    Ok(total)
}

/// Largest `block_count` taken from a file: it sizes the per-layer tables,
/// and the byte balancing is quadratic in it (the largest models have a
/// few hundred layers).
pub const MAX_LAYERS: u32 = 4096;

/// What the splitter reads from a GGUF's header before it writes anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub architecture: String,
    /// Layers in the file, MTP layers included, and the trunk's.
    pub n_layer_all: u32,
    pub n_layer: u32,
    pub n_embd: u32,
    pub n_vocab: u32,
    /// Bytes of each trunk layer's tensors, and of what only the last shard
    /// holds (full embeddings, head, output norm).
    pub layer_bytes: Vec<u64>,
    pub last_bytes: u64,
    /// The shards' layer ranges for the plan, and each one's KV-cache bytes
    /// per token.
    pub ranges: Vec<(u32, u32)>,
    pub kv_bytes_per_token: Vec<u64>,
}

/// An open source and what was read from it.
struct Opened {
    source: Source,
    rule: &'static Rule,
    embd: sys::ggml_tensor,
    names: Vec<String>,
    header: Header,
}

fn open(src: &Path, plan: &SplitPlan) -> Result<Opened> {
    let source = Source::open(src)?;
    let arch = source
        .str_val("general.architecture")?
        .ok_or_else(|| EngineError::Unsupported("general.architecture is missing".into()))?;
    let rule = arch::rule(&arch)?;
    let n_layer_all = source
        .u32_val(&format!("{arch}.block_count"))?
        .ok_or_else(|| EngineError::Unsupported(format!("{arch}.block_count is missing")))?;
    if n_layer_all > MAX_LAYERS {
        return Err(EngineError::Unsupported(format!(
            "{arch}.block_count {n_layer_all} is beyond {MAX_LAYERS}"
        )));
    }
    let nextn = source
        .u32_val(&format!("{arch}.nextn_predict_layers"))?
        .unwrap_or(0);
    let n_layer = n_layer_all
        .checked_sub(nextn)
        .filter(|&n| n > 0)
        .ok_or_else(|| EngineError::Unsupported(format!("{nextn} MTP layers of {n_layer_all}")))?;
    let n_embd = source
        .u32_val(&format!("{arch}.embedding_length"))?
        .unwrap_or(0);
    let n_vocab = source
        .arr_len("tokenizer.ggml.tokens")?
        .ok_or_else(|| EngineError::Unsupported("the file has no tokenizer".into()))?;
    let n_vocab = u32::try_from(n_vocab)
        .map_err(|_| EngineError::Unsupported(format!("a vocabulary of {n_vocab} tokens")))?;
    let embd = source.tensor("token_embd.weight")?;
    crate::gguf::check_embedding_type(embd.type_, embd.ne[0])?;
    let names = source.tensor_names();
    let (layer_bytes, last_bytes) = weigh(&source, &names, n_layer)?;
    let ranges = match plan {
        SplitPlan::ComputeCount(_) => {
            let (layer_cost, head_cost) = weigh_compute(&source, &names, n_layer)?;
            plan.ranges_by_bytes(&layer_cost, head_cost, rule.align)?
        }
        SplitPlan::Measured { shards, sessions } if *shards > 1 => {
            plan.ranges(n_layer)?; // a count that cannot fit fails before timing
            let timing = crate::profile::Timing {
                sessions: *sessions,
                ..Default::default()
            };
            let t = crate::profile::time_layers(src, n_layer, &timing, |what| info!("{what}"))?;
            let ranges = plan.ranges_by_bytes(&t.layers, t.head, rule.align)?;
            let ms = crate::plan::shard_bytes(&ranges, &t.layers, t.head)
                .iter()
                .map(|&ns| format!("{:.2} ms", ns as f64 / 1e6))
                .collect::<Vec<_>>();
            info!(
                ?ranges,
                "measured: the shards take {} per step of {} sessions (head {:.2} ms, every stage {:.2} ms more)",
                ms.join(", "),
                sessions,
                t.head as f64 / 1e6,
                t.fixed as f64 / 1e6
            );
            ranges
        }
        _ => plan.ranges_by_bytes(&layer_bytes, last_bytes, rule.align)?,
    };
    let m = arch::Model {
        arch: &arch,
        n_layer_all,
        n_layer,
        n_vocab,
    };
    arch::check_plan(&source, &m, &ranges)?;
    let kv_bytes_per_token = ranges
        .iter()
        .map(|&(a, b)| kv_bytes_per_token(&source, &arch, n_embd, a, b))
        .collect::<Result<Vec<_>>>()?;
    Ok(Opened {
        rule,
        embd,
        names,
        header: Header {
            architecture: arch,
            n_layer_all,
            n_layer,
            n_embd,
            n_vocab,
            layer_bytes,
            last_bytes,
            ranges,
            kv_bytes_per_token,
        },
        source,
    })
}

/// Reads `src`'s header as [`split_model`] does (metadata, tensor
/// descriptions, the plan's ranges), writing nothing.
pub fn inspect(src: &Path, plan: &SplitPlan) -> Result<Header> {
    Ok(open(src, plan)?.header)
}

/// Files a split wrote, removed on drop unless cleared (the split done).
#[derive(Default)]
struct Written(Vec<std::path::PathBuf>);

impl Drop for Written {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Splits `src` into `out_dir` following `plan`; returns the manifest (also
/// written to `out_dir/manifest.json`). `name` overrides the model name.
/// Architectures without a rule in [`crate::arch`] are refused.
pub fn split_model(
    src: &Path,
    out_dir: &Path,
    plan: &SplitPlan,
    name: Option<&str>,
) -> Result<Manifest> {
    let Opened {
        source,
        rule,
        embd,
        names,
        header,
    } = open(src, plan)?;
    let Header {
        architecture: arch,
        n_layer_all,
        n_layer,
        n_embd,
        n_vocab,
        ranges,
        kv_bytes_per_token: kv,
        ..
    } = header;
    let m = arch::Model {
        arch: &arch,
        n_layer_all,
        n_layer,
        n_vocab,
    };
    let model = match name {
        Some(n) => slug(n),
        None => default_model_name(src),
    };
    if model.is_empty() {
        return Err(EngineError::InvalidInput("empty model name".into()));
    }
    std::fs::create_dir_all(out_dir)?;
    // A split that fails part-way (a full disk, say) leaves no files of its
    // own behind: a set of shards without its manifest is of no use.
    let mut written = Written::default();
    let mut src_file = File::open(src)?;
    let (src_size, src_hash) = hash_file(src)?;
    let file_name = src
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();

    // ---- head file: every key, token_embd only ----
    let head_name = format!("{model}.head.gguf");
    {
        let out = Out::copy_of(&source)?;
        // SAFETY: embd is a valid tensor description.
        unsafe { sys::gguf_add_tensor(out.0.as_ptr(), &embd) };
        write_file(
            &out,
            &[Planned {
                src_name: "token_embd.weight".into(),
                tensor: embd,
            }],
            &source,
            &mut src_file,
            &out_dir.join(&head_name),
        )?;
        written.0.push(out_dir.join(&head_name));
        info!("split: wrote {head_name} (tokenizer, chat template, token embeddings)");
    }

    let mut shards = Vec::new();
    let n_shards = ranges.len();
    for (si, &(a, b)) in ranges.iter().enumerate() {
        let s = arch::Shard {
            index: si,
            n_shards,
            start: a,
            end: b,
        };
        let stage_vocab = s.vocab(&m);
        let out = Out::copy_of(&source)?;
        out.set_u32(&format!("{arch}.block_count"), b - a + 1)?;
        out.set_u32(&format!("{arch}.vocab_size"), stage_vocab)?;
        // Per-layer arrays (one entry per layer, MTP layers included) are
        // sliced to the range, read from the source (indices in `out` move
        // as keys are replaced).
        for key in source.keys() {
            if !key.starts_with(&format!("{arch}.")) {
                continue;
            }
            if let Some((ty, n, bytes)) = source.arr_raw(&key)?
                && n == n_layer_all as usize
            {
                let es = gguf_elem_size(ty).ok_or_else(|| {
                    EngineError::Unsupported(format!("per-layer string array {key}"))
                })?;
                let slice = &bytes[a as usize * es..(b as usize + 1) * es];
                out.set_arr(&key, ty, slice, (b - a + 1) as usize)?;
            }
        }
        for edit in arch::shard_edits(&source, &m, &s)? {
            out.apply(&edit)?;
        }
        // Stages carry no tokenizer (the head file has it).
        for k in out
            .keys()
            .into_iter()
            .filter(|k| k.starts_with("tokenizer."))
        {
            out.remove(&k)?;
        }
        out.set_str("tokenizer.ggml.model", "none")?;
        out.set_u32("llama_cluster.layer_start", a)?;
        out.set_u32("llama_cluster.layer_end", b)?;
        out.set_u32("llama_cluster.n_layer_total", n_layer)?;
        let mut planned = Vec::new();
        for name in &names {
            let mut t = source.tensor(name)?;
            match place(name, rule, &s)? {
                Place::Skip => continue,
                Place::Whole => {}
                Place::OneRow => one_row(&mut t),
                Place::Layer(local) => set_name(&mut t, &local)?,
            }
            // SAFETY: t is a valid (possibly reshaped) tensor description.
            unsafe { sys::gguf_add_tensor(out.0.as_ptr(), &t) };
            planned.push(Planned {
                src_name: name.clone(),
                tensor: t,
            });
        }
        let tensor_bytes = planned
            .iter()
            // SAFETY: valid tensor descriptions.
            .map(|p| unsafe { sys::ggml_nbytes(&p.tensor) } as u64)
            .sum();
        let file = format!("{model}.L{a}-{b}.gguf");
        let path = out_dir.join(&file);
        write_file(&out, &planned, &source, &mut src_file, &path)?;
        written.0.push(path.clone());
        let (size, hash) = hash_file(&path)?;
        info!(
            "split: wrote {file} (layers {a}-{b}, vocab {stage_vocab}, {} tensors, {} MB)",
            planned.len(),
            size / 1_000_000
        );
        shards.push(ShardEntry {
            id: format!("{model}-L{a}-{b}"),
            index: si as u32,
            layer_start: a,
            layer_end: b,
            tensor_bytes,
            kv_bytes_per_token: kv[si],
            file: FileEntry {
                file,
                size,
                hash,
                pieces_hash: String::new(),
            },
        });
    }
    let (head_size, head_hash) = hash_file(&out_dir.join(&head_name))?;
    let manifest = Manifest {
        format: 1,
        model,
        architecture: arch.clone(),
        n_layer,
        n_embd,
        n_vocab,
        hash_algorithm: HASH_ALGORITHM.into(),
        source: FileEntry {
            file: file_name,
            size: src_size,
            hash: src_hash,
            pieces_hash: String::new(),
        },
        head: FileEntry {
            file: head_name,
            size: head_size,
            hash: head_hash,
            pieces_hash: String::new(),
        },
        shards,
    };
    manifest.save(&out_dir.join(MANIFEST_FILE))?;
    written.0.clear();
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_drop_the_quantisation() {
        assert_eq!(
            default_model_name(Path::new("/m/SmolLM2-135M-Instruct.Q4_1.gguf")),
            "smollm2-135m-instruct"
        );
        assert_eq!(
            default_model_name(Path::new("llama-3-8b-q4_k_m.gguf")),
            "llama-3-8b"
        );
        assert_eq!(default_model_name(Path::new("tiny.F16.gguf")), "tiny");
        assert_eq!(default_model_name(Path::new("plain.gguf")), "plain");
    }

    #[test]
    fn slugs() {
        assert_eq!(slug("SmolLM2 135M Instruct"), "smollm2-135m-instruct");
        assert_eq!(slug("  a/b  "), "a-b");
    }
}
