//! ggml's gguf C API, wrapped for the splitter: an open source GGUF
//! (metadata and tensor descriptions, no data), an output context, and
//! writing an output file with tensor data streamed from the source.

use std::ffi::{CStr, CString, c_char};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::ptr::{NonNull, null_mut};

use llama_cpp_sys_2 as sys;

use crate::{EngineError, Result};

pub(crate) fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| EngineError::InvalidInput(format!("NUL byte in {s:?}")))
}

/// An open source GGUF (metadata and tensor descriptions, no tensor data).
pub(crate) struct Source {
    pub(crate) g: NonNull<sys::gguf_context>,
    pub(crate) meta: NonNull<sys::ggml_context>,
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
pub(crate) struct Out(pub(crate) NonNull<sys::gguf_context>);

impl Drop for Out {
    fn drop(&mut self) {
        // SAFETY: returned by gguf_init_empty, freed once.
        unsafe { sys::gguf_free(self.0.as_ptr()) }
    }
}

impl Source {
    pub(crate) fn open(path: &Path) -> Result<Source> {
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

    pub(crate) fn key_id(&self, key: &str) -> Result<Option<i64>> {
        let k = cstr(key)?;
        // SAFETY: valid context and C string.
        let id = unsafe { sys::gguf_find_key(self.g.as_ptr(), k.as_ptr()) };
        Ok((id >= 0).then_some(id))
    }

    pub(crate) fn str_val(&self, key: &str) -> Result<Option<String>> {
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

    pub(crate) fn u32_val(&self, key: &str) -> Result<Option<u32>> {
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

    pub(crate) fn arr_len(&self, key: &str) -> Result<Option<usize>> {
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

    pub(crate) fn tensor_names(&self) -> Vec<String> {
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
    pub(crate) fn tensor(&self, name: &str) -> Result<sys::ggml_tensor> {
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
    pub(crate) fn data_offset(&self, name: &str) -> Result<u64> {
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

pub(crate) fn set_name(t: &mut sys::ggml_tensor, name: &str) -> Result<()> {
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
pub(crate) fn gguf_elem_size(ty: sys::gguf_type) -> Option<usize> {
    Some(match ty {
        sys::GGUF_TYPE_UINT8 | sys::GGUF_TYPE_INT8 | sys::GGUF_TYPE_BOOL => 1,
        sys::GGUF_TYPE_UINT16 | sys::GGUF_TYPE_INT16 => 2,
        sys::GGUF_TYPE_UINT32 | sys::GGUF_TYPE_INT32 | sys::GGUF_TYPE_FLOAT32 => 4,
        sys::GGUF_TYPE_UINT64 | sys::GGUF_TYPE_INT64 | sys::GGUF_TYPE_FLOAT64 => 8,
        _ => return None,
    })
}

/// One tensor of an output file: where its bytes come from.
pub(crate) struct Planned {
    pub(crate) src_name: String,
    pub(crate) tensor: sys::ggml_tensor,
}

/// Writes one output GGUF: metadata through the C API, tensor data streamed
/// from `src_file`, into `path` (through a temporary name, renamed at the end).
pub(crate) fn write_file(
    out: &Out,
    tensors: &[Planned],
    src: &Source,
    src_file: &mut File,
    path: &Path,
) -> Result<()> {
    let tmp = path.with_extension("gguf.part");
    let r = write_tmp(out, tensors, src, src_file, &tmp)
        .map_err(|e| match e {
            EngineError::Io(error) => EngineError::Write {
                path: tmp.clone(),
                error,
            },
            other => other,
        })
        .and_then(|()| {
            std::fs::rename(&tmp, path).map_err(|error| EngineError::Write {
                path: path.to_path_buf(),
                error,
            })
        });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// [`write_file`]'s work, into `tmp`.
fn write_tmp(
    out: &Out,
    tensors: &[Planned],
    src: &Source,
    src_file: &mut File,
    tmp: &Path,
) -> Result<()> {
    let p = cstr(&tmp.to_string_lossy())?;
    // SAFETY: valid context and path.
    if !unsafe { sys::gguf_write_to_file(out.0.as_ptr(), p.as_ptr(), true) } {
        return Err(EngineError::Load(format!("cannot write {}", tmp.display())));
    }
    let meta_len = std::fs::metadata(tmp)?.len();
    let f = OpenOptions::new().append(true).open(tmp)?;
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
    if std::fs::metadata(tmp)?.len() < meta_len {
        return Err(EngineError::Load(format!(
            "{} came out short",
            tmp.display()
        )));
    }
    Ok(())
}

impl Source {
    /// Every key of the file.
    pub(crate) fn keys(&self) -> Vec<String> {
        keys_of(self.g.as_ptr())
    }

    /// An array value: element type, length and raw bytes (None: absent or
    /// not an array; strings have no raw bytes and come back empty).
    pub(crate) fn arr_raw(&self, key: &str) -> Result<Option<(sys::gguf_type, usize, Vec<u8>)>> {
        let Some(id) = self.key_id(key)? else {
            return Ok(None);
        };
        let g = self.g.as_ptr();
        // SAFETY: id is valid; the type is checked before the data is read.
        unsafe {
            if sys::gguf_get_kv_type(g, id) != sys::GGUF_TYPE_ARRAY {
                return Ok(None);
            }
            let ty = sys::gguf_get_arr_type(g, id);
            let n = sys::gguf_get_arr_n(g, id);
            let bytes = match gguf_elem_size(ty) {
                Some(es) => {
                    let p = sys::gguf_get_arr_data(g, id) as *const u8;
                    std::slice::from_raw_parts(p, n * es).to_vec()
                }
                None => Vec::new(),
            };
            Ok(Some((ty, n, bytes)))
        }
    }

    /// A per-layer u32: entry `il` of an array of u32/i32, or the scalar.
    pub(crate) fn u32_at(&self, key: &str, il: u32) -> Result<Option<u32>> {
        match self.arr_raw(key)? {
            Some((ty, n, bytes))
                if (ty == sys::GGUF_TYPE_UINT32 || ty == sys::GGUF_TYPE_INT32)
                    && (il as usize) < n =>
            {
                let i = il as usize * 4;
                let v = bytes
                    .get(i..i + 4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(u32::from_ne_bytes);
                Ok(v)
            }
            Some(_) => Ok(None),
            None => self.u32_val(key),
        }
    }
}

impl crate::arch::Meta for Source {
    fn u32(&self, key: &str) -> Option<u32> {
        self.u32_val(key).ok().flatten()
    }
    fn has(&self, key: &str) -> bool {
        self.key_id(key).ok().flatten().is_some()
    }
    fn arr_len(&self, key: &str) -> Option<usize> {
        self.arr_len(key).ok().flatten()
    }
}

fn keys_of(g: *const sys::gguf_context) -> Vec<String> {
    // SAFETY: indices below gguf_get_n_kv are valid.
    unsafe {
        (0..sys::gguf_get_n_kv(g))
            .map(|i| {
                CStr::from_ptr(sys::gguf_get_key(g, i))
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }
}

impl Out {
    /// A new output context with every key of `src` (but its alignment).
    pub(crate) fn copy_of(src: &Source) -> Result<Out> {
        // SAFETY: fresh context; keys copied from a valid source.
        let out = Out(NonNull::new(unsafe { sys::gguf_init_empty() })
            .ok_or(EngineError::Llama("gguf_init_empty".into()))?);
        unsafe { sys::gguf_set_kv(out.0.as_ptr(), src.g.as_ptr()) };
        out.remove("general.alignment")?;
        Ok(out)
    }

    pub(crate) fn keys(&self) -> Vec<String> {
        keys_of(self.0.as_ptr())
    }

    pub(crate) fn remove(&self, key: &str) -> Result<()> {
        // SAFETY: valid context and C string; absent keys are ignored.
        unsafe { sys::gguf_remove_key(self.0.as_ptr(), cstr(key)?.as_ptr()) };
        Ok(())
    }

    pub(crate) fn set_u32(&self, key: &str, v: u32) -> Result<()> {
        // SAFETY: valid context and C string.
        unsafe { sys::gguf_set_val_u32(self.0.as_ptr(), cstr(key)?.as_ptr(), v) };
        Ok(())
    }

    pub(crate) fn set_str(&self, key: &str, v: &str) -> Result<()> {
        // SAFETY: valid context and C strings (copied by gguf).
        unsafe { sys::gguf_set_val_str(self.0.as_ptr(), cstr(key)?.as_ptr(), cstr(v)?.as_ptr()) };
        Ok(())
    }

    /// Sets an array of `n` elements of `ty` from raw bytes.
    pub(crate) fn set_arr(
        &self,
        key: &str,
        ty: sys::gguf_type,
        bytes: &[u8],
        n: usize,
    ) -> Result<()> {
        if gguf_elem_size(ty).map(|es| es * n) != Some(bytes.len()) {
            return Err(EngineError::InvalidInput(format!(
                "array {key}: bad length"
            )));
        }
        // SAFETY: bytes holds n elements of ty (checked above); gguf copies them.
        unsafe {
            sys::gguf_set_arr_data(
                self.0.as_ptr(),
                cstr(key)?.as_ptr(),
                ty,
                bytes.as_ptr().cast(),
                n,
            )
        };
        Ok(())
    }

    pub(crate) fn apply(&self, e: &crate::arch::Edit) -> Result<()> {
        use crate::arch::Edit;
        match e {
            Edit::U32(k, v) => self.set_u32(k, *v),
            Edit::Remove(k) => self.remove(k),
            Edit::Bools(k, v) => {
                let bytes: Vec<u8> = v.iter().map(|&b| u8::from(b)).collect();
                self.set_arr(k, sys::GGUF_TYPE_BOOL, &bytes, v.len())
            }
        }
    }
}

/// Refuses a token-embedding type stage 0 cannot look up on the host
/// (no dequantisation in ggml, or rows that are not whole blocks).
pub fn check_embedding_type(typ: sys::ggml_type, n_embd: i64) -> Result<()> {
    if typ >= sys::GGML_TYPE_COUNT {
        return Err(EngineError::Unsupported(format!(
            "token_embd has an unknown ggml type {typ}"
        )));
    }
    // SAFETY: typ is a valid ggml type (checked above).
    let (to_float, blck, name) = unsafe {
        let tr = &*sys::ggml_get_type_traits(typ);
        let name = if tr.type_name.is_null() {
            format!("{typ}")
        } else {
            CStr::from_ptr(tr.type_name).to_string_lossy().into_owned()
        };
        (tr.to_float.is_some(), tr.blck_size, name)
    };
    // F32 rows are copied as they are (ggml has no to_float for them).
    if (!to_float && typ != sys::GGML_TYPE_F32) || blck <= 0 {
        return Err(EngineError::Unsupported(format!(
            "token_embd is {name}, which ggml cannot dequantise for the host-side lookup"
        )));
    }
    if n_embd <= 0 || n_embd % blck != 0 {
        return Err(EngineError::Unsupported(format!(
            "token_embd rows of {n_embd} values are not whole {name} blocks of {blck}"
        )));
    }
    Ok(())
}
