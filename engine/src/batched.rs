//! One llama.cpp context shared by many sessions: each session is a
//! sequence id with a KV stream of its own (`kv_unified = false`, so a
//! session attends only to its own cells, laid out from cell 0 as in a
//! context of its own), and one `llama_decode` runs the steps of several
//! sessions at once.
//!
//! Exactness: llama.cpp splits a multi-sequence batch with `split_equal`
//! (the same number of tokens of each sequence per micro-batch, sequence
//! ids in consecutive runs). Single-token steps of many sessions, sorted by
//! sequence id, keep their order and compute each row as it would alone.
//! A multi-token step (a prompt chunk) must be decoded alone: mixed with
//! other sequences, split_equal would cut it into other micro-batches than
//! a context of its own does, and attention kernels differ by micro-batch
//! size (ggml's tiled flash attention from 64 query rows).

use std::ffi::{CString, c_void};
use std::ptr::NonNull;
use std::rc::Rc;

use llama_cpp_sys_2 as sys;

use crate::ffi::{Capture, EvalCallback, LoadedModel, ThreadPool, capture_cb};
use crate::{EngineError, EngineSettings, Result};

/// One session's part of a batch.
pub struct Item<'a> {
    pub seq: i32,
    /// Position of the first row (the tokens the session's KV holds).
    pub pos0: u32,
    /// Row-major `[n][n_embd]`.
    pub rows: &'a [f32],
}

/// A context whose KV cache holds `n_seq` sessions of `n_ctx` tokens each.
pub struct SharedContext {
    ctx: NonNull<sys::llama_context>,
    capture: Option<Box<Capture>>,
    model: Rc<LoadedModel>,
    _pool: Option<Rc<ThreadPool>>,
    n_ctx: u32,
    n_batch: u32,
    n_seq: u32,
}

/// Bytes of KV cache one session of `n_ctx` tokens takes on `model`
/// (f16 keys and values, every layer of the shard).
pub fn kv_bytes_per_session(model: &LoadedModel, n_ctx: u32) -> u64 {
    // SAFETY: the model is loaded.
    let (n_head, n_head_kv) = unsafe {
        (
            sys::llama_model_n_head(model.ptr.as_ptr()).max(1) as u64,
            sys::llama_model_n_head_kv(model.ptr.as_ptr()).max(1) as u64,
        )
    };
    let n_embd_kv = model.n_embd as u64 / n_head * n_head_kv;
    // Keys and values, 2 bytes each, per token and layer.
    n_ctx as u64 * model.n_layer as u64 * n_embd_kv * 2 * 2
}

impl SharedContext {
    /// A context for `n_seq` sessions; `capture_hidden` keeps the output of
    /// the shard's last layer (`l_out-{n_layer-1}`) of every row.
    pub fn new(
        model: Rc<LoadedModel>,
        s: &EngineSettings,
        n_seq: u32,
        capture_hidden: bool,
        pool: Option<Rc<ThreadPool>>,
    ) -> Result<SharedContext> {
        let mut capture = capture_hidden.then(|| {
            Box::new(Capture {
                target: CString::new(format!("l_out-{}", model.n_layer - 1)).unwrap_or_default(),
                rows: Vec::new(),
                failed: false,
            })
        });
        let callback = capture.as_mut().map(|cap| {
            (
                capture_cb as EvalCallback,
                &mut **cap as *mut Capture as *mut c_void,
            )
        });
        // SAFETY: the callback's user data is the boxed Capture, which the
        // context keeps and drops after freeing itself (field order).
        let mut sc = unsafe { Self::with_eval_callback(model, s, n_seq, callback, pool)? };
        sc.capture = capture;
        Ok(sc)
    }

    /// A context for `n_seq` sessions whose graph runs `callback` (ggml's
    /// eval callback, with its user data) at the nodes it asks for.
    ///
    /// # Safety
    /// The user data must stay valid, and be used by nothing else during a
    /// decode, until the context is dropped.
    pub(crate) unsafe fn with_eval_callback(
        model: Rc<LoadedModel>,
        s: &EngineSettings,
        n_seq: u32,
        callback: Option<(EvalCallback, *mut c_void)>,
        pool: Option<Rc<ThreadPool>>,
    ) -> Result<SharedContext> {
        if n_seq == 0 || n_seq > 256 {
            return Err(EngineError::InvalidInput(format!(
                "{n_seq} sessions per stage: must be 1 to 256"
            )));
        }
        // SAFETY: params are plain data; the callback's user data outlives
        // the context (the caller's promise).
        let ctx = unsafe {
            let mut cp = sys::llama_context_default_params();
            cp.n_ctx = s.n_ctx.saturating_mul(n_seq);
            cp.n_batch = s.n_batch;
            cp.n_ubatch = s.n_ubatch;
            cp.n_seq_max = n_seq;
            cp.kv_unified = false;
            cp.n_threads = s.threads;
            cp.n_threads_batch = s.threads;
            cp.no_perf = true;
            if let Some((f, data)) = callback {
                cp.cb_eval = Some(f);
                cp.cb_eval_user_data = data;
            }
            sys::llama_init_from_model(model.ptr.as_ptr(), cp)
        };
        let ctx = NonNull::new(ctx).ok_or_else(|| {
            EngineError::Llama(format!(
                "could not create a context for {n_seq} sessions of {} tokens",
                s.n_ctx
            ))
        })?;
        if let Some(p) = &pool {
            // SAFETY: both pointers are live; the pool outlives the context.
            unsafe { sys::llama_attach_threadpool(ctx.as_ptr(), p.ptr.as_ptr(), p.ptr.as_ptr()) };
        }
        // SAFETY: live context.
        let n_ctx = unsafe { sys::llama_n_ctx_seq(ctx.as_ptr()) }.min(s.n_ctx);
        Ok(SharedContext {
            ctx,
            capture: None,
            model,
            _pool: pool,
            n_ctx,
            n_batch: s.n_batch,
            n_seq,
        })
    }

    /// Tokens one session may hold.
    pub fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    pub fn n_seq(&self) -> u32 {
        self.n_seq
    }

    /// Makes session `to` hold a copy of session `from`'s KV cells (a copy of
    /// its whole stream, done at the next decode).
    pub(crate) fn copy_session(&mut self, from: i32, to: i32) -> Result<()> {
        for seq in [from, to] {
            if seq < 0 || seq as u32 >= self.n_seq {
                return Err(EngineError::Session(format!(
                    "sequence {seq} outside 0..{}",
                    self.n_seq
                )));
            }
        }
        // SAFETY: live context; both ids are in range, and a whole-stream
        // copy (p0 = p1 = -1) is what llama.cpp supports across streams.
        unsafe {
            let mem = sys::llama_get_memory(self.ctx.as_ptr());
            sys::llama_memory_seq_cp(mem, from, to, -1, -1);
        }
        Ok(())
    }

    /// Empties a session's KV cells.
    pub fn clear(&mut self, seq: i32) {
        // SAFETY: live context; removing a whole sequence cannot fail.
        unsafe {
            let mem = sys::llama_get_memory(self.ctx.as_ptr());
            sys::llama_memory_seq_rm(mem, seq, -1, -1);
        }
    }

    /// Checks one item against the context's limits.
    pub fn check(&self, item: &Item<'_>) -> Result<usize> {
        let n_embd = self.model.n_embd;
        if item.rows.is_empty() || !item.rows.len().is_multiple_of(n_embd) {
            return Err(EngineError::InvalidInput(format!(
                "{} values are not a whole number of {n_embd}-wide rows",
                item.rows.len()
            )));
        }
        let n = item.rows.len() / n_embd;
        if n > self.n_batch as usize {
            return Err(EngineError::InvalidInput(format!(
                "batch of {n} tokens exceeds n_batch {} (every worker needs the same n_batch)",
                self.n_batch
            )));
        }
        if item.pos0 as usize + n > self.n_ctx as usize {
            return Err(EngineError::InvalidInput(format!(
                "context full: {} + {n} tokens exceed {}",
                item.pos0, self.n_ctx
            )));
        }
        if item.seq < 0 || item.seq as u32 >= self.n_seq {
            return Err(EngineError::Session(format!(
                "sequence {} outside 0..{}",
                item.seq, self.n_seq
            )));
        }
        Ok(n)
    }

    /// Decodes `items` (sorted by sequence id; several only when each is
    /// one row, see the module docs) in one `llama_decode`. `all_outputs`
    /// marks every row as an output (a stage that passes hidden states on),
    /// else the last row of each item (logits at [`Self::logits`] by batch
    /// index). Returns the batch index of each item's last row.
    pub fn decode(&mut self, items: &[Item<'_>], all_outputs: bool) -> Result<Vec<i32>> {
        let n_embd = self.model.n_embd;
        let mut sizes = Vec::with_capacity(items.len());
        for it in items {
            sizes.push(self.check(it)?);
        }
        let total: usize = sizes.iter().sum();
        if total == 0 {
            return Err(EngineError::InvalidInput("empty batch".into()));
        }
        if total > self.n_batch as usize {
            return Err(EngineError::InvalidInput(format!(
                "batch of {total} rows exceeds n_batch {}",
                self.n_batch
            )));
        }
        if items.len() > 1
            && (sizes.iter().any(|&n| n > 1) || items.windows(2).any(|w| w[0].seq >= w[1].seq))
        {
            return Err(EngineError::InvalidInput(
                "a batch of several sessions must be single rows in increasing sequence order"
                    .into(),
            ));
        }
        if let Some(cap) = self.capture.as_mut() {
            cap.rows.clear();
            cap.failed = false;
        }
        let mut last_index = Vec::with_capacity(items.len());
        // SAFETY: the batch is allocated for `total` rows of n_embd values,
        // fully initialised below, and freed after decode.
        let rc = unsafe {
            let mut b = sys::llama_batch_init(total as i32, n_embd as i32, 1);
            b.n_tokens = total as i32;
            let mut at = 0usize;
            for (it, &n) in items.iter().zip(&sizes) {
                std::ptr::copy_nonoverlapping(
                    it.rows.as_ptr(),
                    b.embd.add(at * n_embd),
                    n * n_embd,
                );
                for i in 0..n {
                    let j = at + i;
                    *b.pos.add(j) = it.pos0 as i32 + i as i32;
                    *b.n_seq_id.add(j) = 1;
                    **b.seq_id.add(j) = it.seq;
                    *b.logits.add(j) = (all_outputs || i + 1 == n) as i8;
                }
                at += n;
                last_index.push(at as i32 - 1);
            }
            let rc = sys::llama_decode(self.ctx.as_ptr(), b);
            sys::llama_batch_free(b);
            rc
        };
        if rc != 0 {
            return Err(EngineError::Llama(format!("llama_decode returned {rc}")));
        }
        if let Some(cap) = &self.capture {
            if cap.failed {
                return Err(EngineError::Llama("captured tensor is not f32".into()));
            }
            if cap.rows.len() != total * n_embd {
                return Err(EngineError::Llama(format!(
                    "captured {} values, expected {}",
                    cap.rows.len(),
                    total * n_embd
                )));
            }
        }
        Ok(last_index)
    }

    /// Hidden states of every row of the latest decode, in batch order.
    pub fn hidden(&self) -> &[f32] {
        self.capture
            .as_ref()
            .map(|c| c.rows.as_slice())
            .unwrap_or(&[])
    }

    /// Takes the hidden states of the latest decode out.
    pub fn take_hidden(&mut self) -> Vec<f32> {
        self.capture
            .as_mut()
            .map(|c| std::mem::take(&mut c.rows))
            .unwrap_or_default()
    }

    /// Logits of the row at batch index `i` of the latest decode.
    pub fn logits(&self, i: i32) -> Result<&[f32]> {
        // SAFETY: after a successful decode with row i marked as an output,
        // logits_ith(i) points at n_vocab floats owned by the context.
        unsafe {
            let p = sys::llama_get_logits_ith(self.ctx.as_ptr(), i);
            if p.is_null() {
                return Err(EngineError::Llama(format!("no logits for row {i}")));
            }
            Ok(std::slice::from_raw_parts(p, self.model.n_vocab))
        }
    }
}

impl Drop for SharedContext {
    fn drop(&mut self) {
        // SAFETY: created by llama_init_from_model, freed once, before the
        // Capture box (field order) and the model Rc.
        unsafe { sys::llama_free(self.ctx.as_ptr()) }
    }
}

/// One session on a context of its own (the benchmarks' floors).
pub struct SoloContext {
    ctx: SharedContext,
    last: i32,
    /// Tokens in the KV cache.
    pub n_past: u32,
}

impl SoloContext {
    pub fn new(
        model: Rc<LoadedModel>,
        s: &EngineSettings,
        capture_hidden: bool,
        pool: Option<Rc<ThreadPool>>,
    ) -> Result<SoloContext> {
        Ok(SoloContext {
            ctx: SharedContext::new(model, s, 1, capture_hidden, pool)?,
            last: 0,
            n_past: 0,
        })
    }

    /// Decodes `rows` (`[n][n_embd]`) at the next positions.
    pub fn decode(&mut self, rows: &[f32], all_outputs: bool) -> Result<()> {
        let item = Item {
            seq: 0,
            pos0: self.n_past,
            rows,
        };
        let n = self.ctx.check(&item)?;
        self.last = self.ctx.decode(&[item], all_outputs)?[0];
        self.n_past += n as u32;
        Ok(())
    }

    pub fn last_logits(&self) -> Result<&[f32]> {
        self.ctx.logits(self.last)
    }

    pub fn take_hidden(&mut self) -> Vec<f32> {
        self.ctx.take_hidden()
    }
}
