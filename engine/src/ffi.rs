//! The safe wrapper over the raw llama.cpp calls the safe crate lacks:
//! loading a shard, sleeping thread pools, the eval callback that captures
//! the hidden state after a stage's last layer, and the token embedding
//! table for host-side lookup. Contexts are in [`crate::batched`].
//!
//! Everything here is `!Send` (raw pointers): a stage lives on one thread.

use std::ffi::{CStr, CString, c_void};
use std::path::Path;
use std::ptr::NonNull;
use std::rc::Rc;

use llama_cpp_sys_2 as sys;

use crate::{EngineError, Result};

/// A model (shard) loaded by llama.cpp.
pub struct LoadedModel {
    pub(crate) ptr: NonNull<sys::llama_model>,
    pub n_embd: usize,
    pub n_vocab: usize,
    pub n_layer: u32,
}

impl LoadedModel {
    pub fn load(path: &Path) -> Result<Rc<LoadedModel>> {
        crate::backend()?;
        if !path.is_file() {
            return Err(EngineError::Load(format!(
                "model file {} does not exist",
                path.display()
            )));
        }
        let p = CString::new(path.to_string_lossy().as_bytes())
            .map_err(|_| EngineError::InvalidInput("NUL in path".into()))?;
        // SAFETY: default params and a valid path; null on failure.
        let ptr = unsafe {
            let mp = sys::llama_model_default_params();
            sys::llama_model_load_from_file(p.as_ptr(), mp)
        };
        let ptr = NonNull::new(ptr).ok_or_else(|| {
            EngineError::Load(format!("llama.cpp could not load {}", path.display()))
        })?;
        // SAFETY: ptr is a loaded model.
        let (n_embd, n_vocab, n_layer) = unsafe {
            (
                sys::llama_model_n_embd(ptr.as_ptr()) as usize,
                sys::llama_vocab_n_tokens(sys::llama_model_get_vocab(ptr.as_ptr())) as usize,
                sys::llama_model_n_layer(ptr.as_ptr()) as u32,
            )
        };
        Ok(Rc::new(LoadedModel {
            ptr,
            n_embd,
            n_vocab,
            n_layer,
        }))
    }
}

impl Drop for LoadedModel {
    fn drop(&mut self) {
        // SAFETY: loaded by llama_model_load_from_file, freed once; contexts
        // hold an Rc to the model, so none outlives it.
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) }
    }
}

/// A ggml CPU thread pool whose idle threads sleep instead of spinning:
/// several stages (processes) may share a machine's cores, and a stage that
/// waits for its neighbours must not burn the CPU they need.
pub struct ThreadPool {
    pub(crate) ptr: NonNull<sys::ggml_threadpool>,
}

impl ThreadPool {
    pub fn new(threads: i32) -> Result<Rc<ThreadPool>> {
        // SAFETY: plain parameter struct; null on failure.
        let ptr = unsafe {
            let mut p = sys::ggml_threadpool_params_default(threads.max(1));
            p.poll = 0;
            sys::ggml_threadpool_new(&mut p)
        };
        let ptr = NonNull::new(ptr)
            .ok_or_else(|| EngineError::Llama("could not create a thread pool".into()))?;
        Ok(Rc::new(ThreadPool { ptr }))
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        // SAFETY: created by ggml_threadpool_new; contexts using it hold an
        // Rc and are freed first.
        unsafe { sys::ggml_threadpool_free(self.ptr.as_ptr()) }
    }
}

/// ggml's eval callback: asked (`ask`) whether a node is wanted, then
/// called again once a wanted node is computed; `false` then stops the graph.
pub(crate) type EvalCallback =
    unsafe extern "C" fn(*mut sys::ggml_tensor, bool, *mut c_void) -> bool;

/// Where the eval callback writes the captured hidden state.
pub(crate) struct Capture {
    pub(crate) target: CString,
    pub(crate) rows: Vec<f32>,
    pub(crate) failed: bool,
}

pub(crate) unsafe extern "C" fn capture_cb(
    t: *mut sys::ggml_tensor,
    ask: bool,
    ud: *mut c_void,
) -> bool {
    // SAFETY: ud is the Box<Capture> owned by the StageContext that set this
    // callback; t is a valid tensor during the callback.
    unsafe {
        let cap = &mut *(ud as *mut Capture);
        let hit = CStr::from_ptr((*t).name.as_ptr()) == cap.target.as_c_str();
        if ask {
            return hit; // stop the scheduler only at our tensor
        }
        if hit {
            if (*t).type_ != sys::GGML_TYPE_F32 {
                cap.failed = true;
                return false;
            }
            let n = sys::ggml_nbytes(t);
            let old = cap.rows.len();
            cap.rows.resize(old + n / 4, 0.0); // one call per ubatch: append
            sys::ggml_backend_tensor_get(t, cap.rows.as_mut_ptr().add(old) as *mut c_void, 0, n);
            // Nothing after the last layer is needed from a stage that is
            // not the last (its output norm and one-row head): stop the
            // graph here, which saves a second pass of the thread pool.
            return false;
        }
        true
    }
}

/// The token embedding table, read from the head file, for host-side lookup
/// by the first stage.
pub struct TokenEmbeddings {
    raw: Vec<u8>,
    /// Dequantises one row (None: f32 rows, copied).
    to_float: Option<unsafe extern "C" fn(*const c_void, *mut f32, i64)>,
    pub n_embd: usize,
    pub n_vocab: usize,
    row_bytes: usize,
    /// Factor of the architecture's token rows (gemma3: sqrt(n_embd)).
    scale: Option<f32>,
}

impl TokenEmbeddings {
    pub fn load(head: &Path) -> Result<TokenEmbeddings> {
        let p = CString::new(head.to_string_lossy().as_bytes())
            .map_err(|_| EngineError::InvalidInput("NUL in path".into()))?;
        let name = CString::new("token_embd.weight").unwrap_or_default();
        // SAFETY: metadata-only read; all ids checked before use.
        let (off, size, typ, n_embd, n_vocab, arch) = unsafe {
            let params = sys::gguf_init_params {
                no_alloc: true,
                ctx: std::ptr::null_mut(),
            };
            let g = sys::gguf_init_from_file(p.as_ptr(), params);
            if g.is_null() {
                return Err(EngineError::Load(format!(
                    "{} is not a GGUF file",
                    head.display()
                )));
            }
            let id = sys::gguf_find_tensor(g, name.as_ptr());
            if id < 0 {
                sys::gguf_free(g);
                return Err(EngineError::Load(format!(
                    "{} has no token_embd.weight",
                    head.display()
                )));
            }
            let off = sys::gguf_get_data_offset(g) + sys::gguf_get_tensor_offset(g, id);
            let size = sys::gguf_get_tensor_size(g, id);
            let typ = sys::gguf_get_tensor_type(g, id);
            let ne = sys::gguf_get_tensor_ne(g, id);
            let (n_embd, n_vocab) = (*ne as usize, *ne.add(1) as usize);
            let key = CString::new("general.architecture").unwrap_or_default();
            let kid = sys::gguf_find_key(g, key.as_ptr());
            let arch =
                (kid >= 0 && sys::gguf_get_kv_type(g, kid) == sys::GGUF_TYPE_STRING).then(|| {
                    CStr::from_ptr(sys::gguf_get_val_str(g, kid))
                        .to_string_lossy()
                        .into_owned()
                });
            sys::gguf_free(g);
            (off, size, typ, n_embd, n_vocab, arch.unwrap_or_default())
        };
        crate::gguf::check_embedding_type(typ, n_embd as i64)?;
        let scale = crate::arch::host_embedding_scale(&arch, n_embd);
        // SAFETY: typ was checked to be a ggml type with whole-block rows
        // that is f32 or can be dequantised.
        let (to_float, row_bytes) = unsafe {
            let tr = &*sys::ggml_get_type_traits(typ);
            let f = if typ == sys::GGML_TYPE_F32 {
                None
            } else {
                Some(tr.to_float.ok_or_else(|| {
                    EngineError::Unsupported(format!("token_embd type {typ} cannot be dequantised"))
                })?)
            };
            (f, sys::ggml_row_size(typ, n_embd as i64))
        };
        if row_bytes * n_vocab != size {
            return Err(EngineError::Load(
                "token_embd size does not match its shape".into(),
            ));
        }
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(head)?;
        f.seek(SeekFrom::Start(off as u64))?;
        let mut raw = vec![0u8; size];
        f.read_exact(&mut raw)?;
        Ok(TokenEmbeddings {
            raw,
            to_float,
            n_embd,
            n_vocab,
            row_bytes,
            scale,
        })
    }

    /// Rows of the table for `tokens`, row-major `[n][n_embd]`.
    pub fn embed(&self, tokens: &[i32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; tokens.len() * self.n_embd];
        for (i, &t) in tokens.iter().enumerate() {
            if t < 0 || t as usize >= self.n_vocab {
                return Err(EngineError::InvalidInput(format!(
                    "token {t} outside the vocabulary of {}",
                    self.n_vocab
                )));
            }
            let row = &self.raw[t as usize * self.row_bytes..(t as usize + 1) * self.row_bytes];
            let dst = &mut out[i * self.n_embd..(i + 1) * self.n_embd];
            match self.to_float {
                // SAFETY: row holds exactly one row of the table's type; the
                // destination has n_embd floats.
                Some(f) => unsafe {
                    f(
                        row.as_ptr() as *const c_void,
                        dst.as_mut_ptr(),
                        self.n_embd as i64,
                    )
                },
                None => {
                    for (d, b) in dst.iter_mut().zip(row.chunks_exact(4)) {
                        *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    }
                }
            }
        }
        crate::arch::scale_embeddings(&mut out, self.scale);
        Ok(out)
    }
}

/// Drops ggml's log lines (the gguf reader reports every malformed file on
/// stderr): for tools that read many files that may be malformed, such as
/// the fuzz targets.
pub fn silence_ggml_logs() {
    unsafe extern "C" fn drop_line(
        _level: sys::ggml_log_level,
        _text: *const std::os::raw::c_char,
        _user: *mut c_void,
    ) {
    }
    // SAFETY: the callback ignores its arguments and lives forever.
    unsafe { sys::ggml_log_set(Some(drop_line), std::ptr::null_mut()) }
}
