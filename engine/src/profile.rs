//! Timing each layer of a model with llama.cpp on this machine, for a cut
//! whose stages take equally long per step (`split --balance measured`).
//!
//! The whole model runs decode steps of several sessions at once, as a
//! stage's waves do. ggml's eval callback stops the graph after each
//! layer's output (`l_out-N`, the node a stage hands on), so the time
//! between two stops is that layer's; what follows the last layer (output
//! norm, head, logits) is the head's; what comes before the first node
//! (graph build, inputs) is every stage's alike and is not counted.

use std::ffi::{CStr, c_void};
use std::path::Path;
use std::time::{Duration, Instant};

use llama_cpp_sys_2 as sys;

use crate::batched::{Item, SharedContext};
use crate::ffi::{EvalCallback, LoadedModel, TokenEmbeddings};
use crate::{EngineError, EngineSettings, Result};

/// What the timed steps look like.
#[derive(Debug, Clone)]
pub struct Timing {
    /// Sessions decoded together in each step.
    pub sessions: u32,
    /// Tokens each session holds before the timed steps.
    pub context: u32,
    /// Timed steps (after one untimed warm-up step); the median counts.
    pub steps: u32,
    /// llama.cpp threads (a stage pinned to one core has 1).
    pub threads: i32,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            sessions: 4,
            context: 64,
            steps: 8,
            threads: 1,
        }
    }
}

/// Median time per step of each trunk layer and of the head, in ns.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerTimes {
    pub layers: Vec<u64>,
    pub head: u64,
    /// Before the first node (every stage pays it).
    pub fixed: u64,
}

/// The stopwatch the eval callback drives during one decode.
struct Clock {
    last: Instant,
    started: bool,
    fixed: Duration,
    layers: Vec<Duration>,
    seen: Vec<bool>,
}

/// The clock, owned through a raw pointer (the callback writes through it
/// during a decode), freed on drop.
struct OwnedClock(*mut Clock);

impl Drop for OwnedClock {
    fn drop(&mut self) {
        // SAFETY: made by Box::into_raw, freed once, after the context.
        unsafe { drop(Box::from_raw(self.0)) }
    }
}

/// The layer of an `l_out-N` node.
fn layer_out(t: *const sys::ggml_tensor) -> Option<usize> {
    // SAFETY: t is a valid tensor during the callback; its name is a
    // NUL-terminated array.
    let name = unsafe { CStr::from_ptr((*t).name.as_ptr()) };
    name.to_str().ok()?.strip_prefix("l_out-")?.parse().ok()
}

unsafe extern "C" fn clock_cb(t: *mut sys::ggml_tensor, ask: bool, ud: *mut c_void) -> bool {
    // SAFETY: ud is the Box<Clock> that time_layers owns for as long as the
    // context lives, used by nothing else during a decode.
    let c = unsafe { &mut *(ud as *mut Clock) };
    if ask {
        // The first node (to start the clock once the inputs are set), and
        // every layer's output.
        return !c.started || layer_out(t).is_some();
    }
    let now = Instant::now();
    let dt = now - c.last;
    c.last = now;
    if !c.started {
        c.started = true;
        c.fixed += dt;
    } else if let Some(il) = layer_out(t).filter(|&il| il < c.layers.len()) {
        c.layers[il] += dt;
        c.seen[il] = true;
    }
    true
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Times the first `n_layer` layers and the head of the model at `path`;
/// `progress` hears what is being done.
pub fn time_layers(
    path: &Path,
    n_layer: u32,
    t: &Timing,
    mut progress: impl FnMut(&str),
) -> Result<LayerTimes> {
    if t.sessions == 0 || t.context == 0 || t.steps == 0 {
        return Err(EngineError::InvalidInput(format!(
            "timing needs sessions, context and steps above 0: {t:?}"
        )));
    }
    progress(&format!("loading {} to time its layers", path.display()));
    let model = LoadedModel::load(path)?;
    if model.n_layer < n_layer {
        return Err(EngineError::Load(format!(
            "llama.cpp loaded {} layers of {}, {n_layer} expected",
            model.n_layer,
            path.display()
        )));
    }
    let table = TokenEmbeddings::load(path)?;
    let n = n_layer as usize;
    let clock = OwnedClock(Box::into_raw(Box::new(Clock {
        last: Instant::now(),
        started: false,
        fixed: Duration::ZERO,
        layers: vec![Duration::ZERO; n],
        seen: vec![false; n],
    })));
    let s = EngineSettings {
        n_ctx: t.context + t.steps + 1,
        n_batch: t.context.max(t.sessions),
        n_ubatch: t.context.max(t.sessions),
        threads: t.threads.max(1),
    };
    let callback = Some((clock_cb as EvalCallback, clock.0 as *mut c_void));
    // SAFETY: `clock` is declared before `ctx`, so it is freed after it,
    // and this function touches it only between decodes.
    let mut ctx =
        unsafe { SharedContext::with_eval_callback(model, &s, t.sessions, callback, None)? };
    // Distinct tokens spread over the vocabulary: what they are does not
    // change the time, only how many the caches hold.
    let token = |i: u32| ((i as u64 * 7919 + 13) % table.n_vocab as u64) as i32;
    // One session is filled; the others get copies of its cache.
    progress(&format!(
        "filling {} sessions with {} tokens",
        t.sessions, t.context
    ));
    let toks: Vec<i32> = (0..t.context).map(token).collect();
    let rows = table.embed(&toks)?;
    let item = Item {
        seq: 0,
        pos0: 0,
        rows: &rows,
    };
    ctx.decode(&[item], false)?;
    for seq in 1..t.sessions {
        ctx.copy_session(0, seq as i32)?;
    }
    let (mut layers, mut head, mut fixed) = (vec![Vec::new(); n], Vec::new(), Vec::new());
    for step in 0..=t.steps {
        if step > 0 {
            progress(&format!(
                "timing step {step}/{} of {} sessions",
                t.steps, t.sessions
            ));
        }
        let toks: Vec<i32> = (0..t.sessions).map(|s| token(s + step * 31)).collect();
        let rows = table.embed(&toks)?;
        let items: Vec<Item<'_>> = (0..t.sessions as usize)
            .map(|s| Item {
                seq: s as i32,
                pos0: t.context + step,
                rows: &rows[s * table.n_embd..(s + 1) * table.n_embd],
            })
            .collect();
        // SAFETY: no decode runs, so nothing else uses the clock.
        let c = unsafe { &mut *clock.0 };
        c.layers.fill(Duration::ZERO);
        c.started = false;
        c.fixed = Duration::ZERO;
        c.last = Instant::now();
        ctx.decode(&items, false)?;
        // SAFETY: as above, the decode is over.
        let c = unsafe { &mut *clock.0 };
        let tail = c.last.elapsed();
        if let Some(il) = c.seen.iter().position(|&s| !s) {
            return Err(EngineError::Unsupported(format!(
                "llama.cpp's graph has no node l_out-{il}: its layers cannot be timed"
            )));
        }
        if step == 0 {
            continue; // warm-up: first use of the buffers
        }
        for (v, d) in layers.iter_mut().zip(&c.layers) {
            v.push(d.as_nanos() as u64);
        }
        head.push(tail.as_nanos() as u64);
        fixed.push(c.fixed.as_nanos() as u64);
    }
    Ok(LayerTimes {
        layers: layers.into_iter().map(median).collect(),
        head: median(head),
        fixed: median(fixed),
    })
}
