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

use std::ffi::{CStr, CString, c_char};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::ptr::{NonNull, null_mut};

use llama_cpp_sys_2 as sys;
use tracing::info;

use crate::manifest::{FileEntry, HASH_ALGORITHM, MANIFEST_FILE, Manifest, ShardEntry, hash_file};
use crate::{EngineError, Result};

/// Architectures whose layer split has been verified token-identical.
pub const VERIFIED_ARCHITECTURES: &[&str] = &["llama"];

/// How to cut the layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitPlan {
    /// This many shards of (nearly) equal layer counts.
    Count(u32),
    /// Explicit inclusive ranges, covering every layer in order.
    Ranges(Vec<(u32, u32)>),
}

impl SplitPlan {
    /// The ranges for a model of `n_layer` layers.
    pub fn ranges(&self, n_layer: u32) -> Result<Vec<(u32, u32)>> {
        let ranges = match self {
            SplitPlan::Count(0) => {
                return Err(EngineError::InvalidInput(
                    "shard count must be at least 1".into(),
                ));
            }
            SplitPlan::Count(n) if *n > n_layer => {
                return Err(EngineError::InvalidInput(format!(
                    "cannot cut {n_layer} layers into {n} shards"
                )));
            }
            SplitPlan::Count(n) => {
                let (base, extra) = (n_layer / n, n_layer % n);
                let mut start = 0;
                (0..*n)
                    .map(|i| {
                        let len = base + u32::from(i < extra);
                        let r = (start, start + len - 1);
                        start += len;
                        r
                    })
                    .collect()
            }
            SplitPlan::Ranges(r) => r.clone(),
        };
        let mut next = 0;
        for &(a, b) in &ranges {
            if a != next || b < a {
                return Err(EngineError::InvalidInput(format!(
                    "layer ranges must cover 0-{} in order without gaps; got {a}-{b} where {next}-… was expected",
                    n_layer.saturating_sub(1)
                )));
            }
            next = b + 1;
        }
        if next != n_layer {
            return Err(EngineError::InvalidInput(format!(
                "layer ranges end at {} but the model has layers 0-{}",
                next.saturating_sub(1),
                n_layer - 1
            )));
        }
        Ok(ranges)
    }
}

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| EngineError::InvalidInput(format!("NUL byte in {s:?}")))
}

/// An open source GGUF (metadata and tensor descriptions, no tensor data).
struct Source {
    g: NonNull<sys::gguf_context>,
    meta: NonNull<sys::ggml_context>,
}

impl Drop for Source {
    fn drop(&mut self) {
        // SAFETY: both were returned by gguf_init_from_file and are freed once.
        unsafe {
            sys::gguf_free(self.g.as_ptr());
            sys::ggml_free(self.meta.as_ptr());
        }
    }
}

/// A gguf context being built for one output file.
struct Out(NonNull<sys::gguf_context>);

impl Drop for Out {
    fn drop(&mut self) {
        // SAFETY: returned by gguf_init_empty, freed once.
        unsafe { sys::gguf_free(self.0.as_ptr()) }
    }
}

impl Source {
    fn open(path: &Path) -> Result<Source> {
        let p = cstr(&path.to_string_lossy())?;
        let mut meta: *mut sys::ggml_context = null_mut();
        let params = sys::gguf_init_params {
            no_alloc: true,
            ctx: &mut meta,
        };
        // SAFETY: valid C string and params; returns null on failure.
        let g = unsafe { sys::gguf_init_from_file(p.as_ptr(), params) };
        match (NonNull::new(g), NonNull::new(meta)) {
            (Some(g), Some(meta)) => Ok(Source { g, meta }),
            (g, m) => {
                // SAFETY: free whatever was allocated.
                unsafe {
                    if let Some(g) = g {
                        sys::gguf_free(g.as_ptr());
                    }
                    if let Some(m) = m {
                        sys::ggml_free(m.as_ptr());
                    }
                }
                Err(EngineError::Load(format!(
                    "{} is not a readable GGUF file",
                    path.display()
                )))
            }
        }
    }

    fn key_id(&self, key: &str) -> Result<Option<i64>> {
        let k = cstr(key)?;
        // SAFETY: valid context and C string.
        let id = unsafe { sys::gguf_find_key(self.g.as_ptr(), k.as_ptr()) };
        Ok((id >= 0).then_some(id))
    }

    fn str_val(&self, key: &str) -> Result<Option<String>> {
        let Some(id) = self.key_id(key)? else {
            return Ok(None);
        };
        // SAFETY: id is valid; check type before reading.
        unsafe {
            if sys::gguf_get_kv_type(self.g.as_ptr(), id) != sys::GGUF_TYPE_STRING {
                return Ok(None);
            }
            let s = sys::gguf_get_val_str(self.g.as_ptr(), id);
            Ok(Some(CStr::from_ptr(s).to_string_lossy().into_owned()))
        }
    }

    fn u32_val(&self, key: &str) -> Result<Option<u32>> {
        let Some(id) = self.key_id(key)? else {
            return Ok(None);
        };
        // SAFETY: id is valid; check type before reading.
        unsafe {
            if sys::gguf_get_kv_type(self.g.as_ptr(), id) != sys::GGUF_TYPE_UINT32 {
                return Ok(None);
            }
            Ok(Some(sys::gguf_get_val_u32(self.g.as_ptr(), id)))
        }
    }

    fn arr_len(&self, key: &str) -> Result<Option<usize>> {
        let Some(id) = self.key_id(key)? else {
            return Ok(None);
        };
        // SAFETY: id is valid; check type before reading.
        unsafe {
            if sys::gguf_get_kv_type(self.g.as_ptr(), id) != sys::GGUF_TYPE_ARRAY {
                return Ok(None);
            }
            Ok(Some(sys::gguf_get_arr_n(self.g.as_ptr(), id)))
        }
    }

    fn tensor_names(&self) -> Vec<String> {
        // SAFETY: indices below gguf_get_n_tensors are valid.
        unsafe {
            (0..sys::gguf_get_n_tensors(self.g.as_ptr()))
                .map(|i| {
                    CStr::from_ptr(sys::gguf_get_tensor_name(self.g.as_ptr(), i))
                        .to_string_lossy()
                        .into_owned()
                })
                .collect()
        }
    }

    /// Shallow copy of a tensor's description (no data).
    fn tensor(&self, name: &str) -> Result<sys::ggml_tensor> {
        let n = cstr(name)?;
        // SAFETY: the meta context holds every tensor of the file.
        let t = unsafe { sys::ggml_get_tensor(self.meta.as_ptr(), n.as_ptr()) };
        if t.is_null() {
            return Err(EngineError::Load(format!("tensor {name} missing")));
        }
        // SAFETY: t points to a valid tensor struct.
        Ok(unsafe { std::ptr::read(t) })
    }

    /// Absolute file offset of a tensor's data.
    fn data_offset(&self, name: &str) -> Result<u64> {
        let n = cstr(name)?;
        // SAFETY: valid context and name.
        unsafe {
            let id = sys::gguf_find_tensor(self.g.as_ptr(), n.as_ptr());
            if id < 0 {
                return Err(EngineError::Load(format!("tensor {name} missing")));
            }
            Ok((sys::gguf_get_data_offset(self.g.as_ptr())
                + sys::gguf_get_tensor_offset(self.g.as_ptr(), id)) as u64)
        }
    }
}

fn set_name(t: &mut sys::ggml_tensor, name: &str) -> Result<()> {
    let b = name.as_bytes();
    if b.len() >= t.name.len() {
        return Err(EngineError::InvalidInput(format!(
            "tensor name {name} too long"
        )));
    }
    t.name.iter_mut().for_each(|c| *c = 0);
    for (dst, src) in t.name.iter_mut().zip(b) {
        *dst = *src as c_char;
    }
    Ok(())
}

/// Byte size of one element of a gguf array of `ty` (None for strings/nested).
fn gguf_elem_size(ty: sys::gguf_type) -> Option<usize> {
    Some(match ty {
        sys::GGUF_TYPE_UINT8 | sys::GGUF_TYPE_INT8 | sys::GGUF_TYPE_BOOL => 1,
        sys::GGUF_TYPE_UINT16 | sys::GGUF_TYPE_INT16 => 2,
        sys::GGUF_TYPE_UINT32 | sys::GGUF_TYPE_INT32 | sys::GGUF_TYPE_FLOAT32 => 4,
        sys::GGUF_TYPE_UINT64 | sys::GGUF_TYPE_INT64 | sys::GGUF_TYPE_FLOAT64 => 8,
        _ => return None,
    })
}

/// One tensor of an output file: where its bytes come from.
struct Planned {
    src_name: String,
    tensor: sys::ggml_tensor,
}

/// Writes one output GGUF: metadata through the C API, tensor data streamed
/// from `src_file`, into `path` (through a temporary name, renamed at the end).
fn write_file(
    out: &Out,
    tensors: &[Planned],
    src: &Source,
    src_file: &mut File,
    path: &Path,
) -> Result<()> {
    let tmp = path.with_extension("gguf.part");
    let p = cstr(&tmp.to_string_lossy())?;
    // SAFETY: valid context and path.
    if !unsafe { sys::gguf_write_to_file(out.0.as_ptr(), p.as_ptr(), true) } {
        return Err(EngineError::Load(format!("cannot write {}", tmp.display())));
    }
    let meta_len = std::fs::metadata(&tmp)?.len();
    let f = OpenOptions::new().append(true).open(&tmp)?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let mut written: u64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    for (i, t) in tensors.iter().enumerate() {
        // SAFETY: tensors were added in this order; ids are valid.
        let (offset, nbytes) = unsafe {
            (
                sys::gguf_get_tensor_offset(out.0.as_ptr(), i as i64) as u64,
                sys::ggml_nbytes(&t.tensor) as u64,
            )
        };
        if offset < written {
            return Err(EngineError::Load("tensor offsets out of order".into()));
        }
        w.write_all(&vec![0u8; (offset - written) as usize])?;
        written = offset;
        src_file.seek(SeekFrom::Start(src.data_offset(&t.src_name)?))?;
        let mut left = nbytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            src_file.read_exact(&mut buf[..n])?;
            w.write_all(&buf[..n])?;
            left -= n as u64;
        }
        written += nbytes;
    }
    // SAFETY: valid context.
    let align = unsafe { sys::gguf_get_alignment(out.0.as_ptr()) } as u64;
    let pad = (align - written % align) % align;
    w.write_all(&vec![0u8; pad as usize])?;
    w.flush()?;
    w.get_ref().sync_all()?;
    drop(w);
    if std::fs::metadata(&tmp)?.len() < meta_len {
        return Err(EngineError::Load(format!(
            "{} came out short",
            tmp.display()
        )));
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

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

/// Splits `src` into `out_dir` following `plan`; returns the manifest (also
/// written to `out_dir/manifest.json`). `name` overrides the model name.
pub fn split_model(
    src: &Path,
    out_dir: &Path,
    plan: &SplitPlan,
    name: Option<&str>,
) -> Result<Manifest> {
    let source = Source::open(src)?;
    let arch = source
        .str_val("general.architecture")?
        .ok_or_else(|| EngineError::Unsupported("general.architecture is missing".into()))?;
    if !VERIFIED_ARCHITECTURES.contains(&arch.as_str()) {
        return Err(EngineError::Unsupported(format!(
            "architecture {arch:?} has not been verified for layer splitting (verified: {})",
            VERIFIED_ARCHITECTURES.join(", ")
        )));
    }
    let n_layer = source
        .u32_val(&format!("{arch}.block_count"))?
        .ok_or_else(|| EngineError::Unsupported(format!("{arch}.block_count is missing")))?;
    let n_embd = source
        .u32_val(&format!("{arch}.embedding_length"))?
        .unwrap_or(0);
    let n_vocab = source
        .arr_len("tokenizer.ggml.tokens")?
        .ok_or_else(|| EngineError::Unsupported("the file has no tokenizer".into()))?
        as u32;
    let ranges = plan.ranges(n_layer)?;
    let model = match name {
        Some(n) => slug(n),
        None => default_model_name(src),
    };
    if model.is_empty() {
        return Err(EngineError::InvalidInput("empty model name".into()));
    }
    std::fs::create_dir_all(out_dir)?;
    let mut src_file = File::open(src)?;
    let names = source.tensor_names();
    let (src_size, src_hash) = hash_file(src)?;
    let file_name = src
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();

    // ---- head file: every key, token_embd only ----
    let head_name = format!("{model}.head.gguf");
    {
        // SAFETY: fresh context, keys copied from a valid source.
        let out = Out(NonNull::new(unsafe { sys::gguf_init_empty() })
            .ok_or(EngineError::Llama("gguf_init_empty".into()))?);
        unsafe {
            sys::gguf_set_kv(out.0.as_ptr(), source.g.as_ptr());
            sys::gguf_remove_key(out.0.as_ptr(), cstr("general.alignment")?.as_ptr());
        }
        let t = source.tensor("token_embd.weight")?;
        // SAFETY: t is a valid tensor description.
        unsafe { sys::gguf_add_tensor(out.0.as_ptr(), &t) };
        write_file(
            &out,
            &[Planned {
                src_name: "token_embd.weight".into(),
                tensor: t,
            }],
            &source,
            &mut src_file,
            &out_dir.join(&head_name),
        )?;
        info!("split: wrote {head_name} (tokenizer, chat template, token embeddings)");
    }

    let mut shards = Vec::new();
    let n_shards = ranges.len();
    for (si, &(a, b)) in ranges.iter().enumerate() {
        let last = si + 1 == n_shards;
        let stage_vocab = if last { n_vocab } else { 1 };
        // SAFETY: fresh context; all keys/values written are valid C data.
        let out = Out(NonNull::new(unsafe { sys::gguf_init_empty() })
            .ok_or(EngineError::Llama("gguf_init_empty".into()))?);
        let d = out.0.as_ptr();
        unsafe {
            sys::gguf_set_kv(d, source.g.as_ptr());
            sys::gguf_remove_key(d, cstr("general.alignment")?.as_ptr());
            sys::gguf_set_val_u32(d, cstr(&format!("{arch}.block_count"))?.as_ptr(), b - a + 1);
            sys::gguf_set_val_u32(
                d,
                cstr(&format!("{arch}.vocab_size"))?.as_ptr(),
                stage_vocab,
            );
            // Per-layer arrays (one entry per layer) are sliced to the range.
            let n_kv = sys::gguf_get_n_kv(d);
            let mut per_layer = vec![];
            for i in 0..n_kv {
                let key = CStr::from_ptr(sys::gguf_get_key(d, i))
                    .to_string_lossy()
                    .into_owned();
                if key.starts_with(&format!("{arch}."))
                    && sys::gguf_get_kv_type(d, i) == sys::GGUF_TYPE_ARRAY
                    && sys::gguf_get_arr_n(d, i) == n_layer as usize
                {
                    per_layer.push((key, i));
                }
            }
            for (key, i) in per_layer {
                let ty = sys::gguf_get_arr_type(d, i);
                let Some(es) = gguf_elem_size(ty) else {
                    return Err(EngineError::Unsupported(format!(
                        "per-layer string array {key}"
                    )));
                };
                let data = sys::gguf_get_arr_data(d, i) as *const u8;
                let slice = std::slice::from_raw_parts(
                    data.add(a as usize * es),
                    (b - a + 1) as usize * es,
                )
                .to_vec();
                sys::gguf_set_arr_data(
                    d,
                    cstr(&key)?.as_ptr(),
                    ty,
                    slice.as_ptr().cast(),
                    (b - a + 1) as usize,
                );
            }
            // Stages carry no tokenizer (the head file has it).
            let tok_keys: Vec<String> = (0..sys::gguf_get_n_kv(d))
                .map(|i| {
                    CStr::from_ptr(sys::gguf_get_key(d, i))
                        .to_string_lossy()
                        .into_owned()
                })
                .filter(|k| k.starts_with("tokenizer."))
                .collect();
            for k in tok_keys {
                sys::gguf_remove_key(d, cstr(&k)?.as_ptr());
            }
            sys::gguf_set_val_str(
                d,
                cstr("tokenizer.ggml.model")?.as_ptr(),
                cstr("none")?.as_ptr(),
            );
            sys::gguf_set_val_u32(d, cstr("llama_cluster.layer_start")?.as_ptr(), a);
            sys::gguf_set_val_u32(d, cstr("llama_cluster.layer_end")?.as_ptr(), b);
            sys::gguf_set_val_u32(d, cstr("llama_cluster.n_layer_total")?.as_ptr(), n_layer);
        }
        let mut planned = Vec::new();
        for name in &names {
            let mut t = source.tensor(name)?;
            if let Some(rest) = name.strip_prefix("blk.") {
                let Some((n, tail)) = rest.split_once('.') else {
                    continue;
                };
                let il: u32 = n
                    .parse()
                    .map_err(|_| EngineError::Unsupported(format!("odd tensor name {name}")))?;
                if il < a || il > b {
                    continue;
                }
                set_name(&mut t, &format!("blk.{}.{tail}", il - a))?;
            } else if name == "token_embd.weight" && !last {
                // One row: llama.cpp needs the tensor (vocabulary of 1); the
                // first stage's lookup is done on the host from the head file.
                // The last stage keeps every row: llama.cpp checks its shape
                // against the vocabulary (and it is the head of tied models).
                t.ne[1] = 1;
                t.nb[2] = t.nb[1];
                t.nb[3] = t.nb[2];
            } else if name == "output.weight" && !last {
                continue;
            }
            // SAFETY: t is a valid (possibly reshaped) tensor description.
            unsafe { sys::gguf_add_tensor(d, &t) };
            planned.push(Planned {
                src_name: name.clone(),
                tensor: t,
            });
        }
        let file = format!("{model}.L{a}-{b}.gguf");
        let path = out_dir.join(&file);
        write_file(&out, &planned, &source, &mut src_file, &path)?;
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
        architecture: arch,
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
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_plans_cover_all_layers() {
        assert_eq!(
            SplitPlan::Count(3).ranges(30).unwrap(),
            vec![(0, 9), (10, 19), (20, 29)]
        );
        assert_eq!(
            SplitPlan::Count(4).ranges(30).unwrap(),
            vec![(0, 7), (8, 15), (16, 22), (23, 29)]
        );
        assert_eq!(SplitPlan::Count(1).ranges(30).unwrap(), vec![(0, 29)]);
        assert!(SplitPlan::Count(0).ranges(30).is_err());
        assert!(SplitPlan::Count(31).ranges(30).is_err());
    }

    #[test]
    fn explicit_ranges_are_checked() {
        assert!(
            SplitPlan::Ranges(vec![(0, 14), (15, 29)])
                .ranges(30)
                .is_ok()
        );
        assert!(
            SplitPlan::Ranges(vec![(0, 14), (16, 29)])
                .ranges(30)
                .is_err()
        );
        assert!(SplitPlan::Ranges(vec![(0, 14)]).ranges(30).is_err());
        assert!(SplitPlan::Ranges(vec![(0, 30)]).ranges(30).is_err());
        assert!(SplitPlan::Ranges(vec![(1, 29)]).ranges(30).is_err());
    }

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
