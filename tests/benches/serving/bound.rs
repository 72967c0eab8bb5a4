//! The most (b) can give over (a, 1 core), from llama.cpp's own time per
//! token at the step sizes each runs, measured in the same run.
//!
//! At concurrency c, llama-server on one core decodes the c sessions in one
//! step; (b)'s two stages take turns with two blocks of c/2 sessions each
//! (so that both compute at once). A step's time is not proportional to its
//! sessions: the head (SmolLM2: a 49152 x 576 Q8_0 matrix, 30 MB, through
//! llamafile's tinyBLAS) takes about the same time per step whatever it
//! holds, so per token it costs about twice as much in a step of 4 as in
//! one of 8. With W(n) the whole model's
//! time per token in steps of n, two cores busy all the time give at most
//! 2 W(c) / W(c/2) times one core; at c = 1 the stages run one after the
//! other, and the bound is 1.

use std::collections::BTreeMap;

use llama_cluster_engine::profile::{Timing, time_layers};

/// Pins the calling thread to `core` (where (a, 1 core) runs).
fn pin(core: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays in
    // bounds for core < CPU_SETSIZE; 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// For each step size `n`, the best of two rounds taken in turn: the
/// time (ns) of one step through every layer and the head, and of the part
/// before the first layer (which every stage pays).
fn step_ns(model: &std::path::Path, n_layer: u32, sizes: &[u32]) -> BTreeMap<u32, (u64, u64)> {
    let mut best = BTreeMap::new();
    for _round in 0..2 {
        for &n in sizes {
            let t = Timing {
                sessions: n,
                steps: 5,
                ..Timing::default()
            };
            match time_layers(model, n_layer, &t, |_| {}) {
                Ok(x) => {
                    let step = x.layers.iter().sum::<u64>() + x.head;
                    let e = best.entry(n).or_insert((u64::MAX, u64::MAX));
                    *e = (e.0.min(step), e.1.min(x.fixed));
                }
                Err(e) => println!("bound: timing steps of {n} sessions failed: {e}"),
            }
        }
    }
    best
}

/// For each concurrency level: the bound on (b) ÷ (a, 1 core), with the
/// times per token it comes from. Runs on a thread pinned to core 0.
pub fn two_stage_bound(levels: &[usize]) -> Vec<Option<(f64, f64, f64)>> {
    let model = llama_cluster_engine::default_model_path();
    let levels = levels.to_vec();
    let run = std::thread::spawn(move || {
        pin(0);
        let n_layer = 30;
        let mut sizes: Vec<u32> = levels
            .iter()
            .flat_map(|&c| [c as u32, (c as u32 / 2).max(1)])
            .collect();
        sizes.sort_unstable();
        sizes.dedup();
        let times = step_ns(&model, n_layer, &sizes);
        // Time per token (ms) in steps of n, the part before the first
        // layer paid by `stages` stages.
        let per_token = |n: u32, stages: u64| {
            let &(step, fixed) = times.get(&n)?;
            Some((step + stages * fixed) as f64 / 1e6 / n as f64)
        };
        levels
            .iter()
            .map(|&c| {
                let c = c as u32;
                let w_a = per_token(c, 1)?;
                if c < 2 {
                    return Some((1.0, w_a, per_token(c, 2)?));
                }
                let w_b = per_token(c / 2, 2)?;
                Some((2.0 * w_a / w_b, w_a, w_b))
            })
            .collect()
    });
    run.join().unwrap_or_default()
}

/// Prints the bound rows: the most (b) can give over (a, 1 core) and over
/// (a, 2 cores), the times per token they come from, and how much of its
/// kernels' speed each of (a, 1 core) and (b) reaches. Arguments are tok/s
/// per level of `levels` (the concurrencies).
///
/// The bound compares the kernels' speeds, so it holds for the measured
/// ratio only if (b) reaches no more of its kernels' speed than llama-server
/// does of its own: the last row says how far each is from its kernels.
pub fn print_rows(
    levels: &[usize],
    bound: &[Option<(f64, f64, f64)>],
    a1: &[Option<f64>],
    a2: &[Option<f64>],
    b: &[Option<f64>],
) {
    super::cores("(b) / (a, 1 core) at most", bound, |x| {
        x.map_or("-".into(), |(r, _, _)| format!("{r:.2}"))
    });
    // (b) <= bound x (a, 1 core), so (b) / (a, 2 cores) <= bound x (a, 1
    // core) / (a, 2 cores).
    let bound_a2: Vec<Option<f64>> = (0..bound.len())
        .map(|i| {
            let a2 = a2[i].filter(|&t| t > 0.0)?;
            Some(bound[i]?.0 * a1[i]? / a2)
        })
        .collect();
    super::cores("(b) / (a, 2 cores) at most", &bound_a2, |x| {
        x.map_or("-".into(), |r| format!("{r:.2}"))
    });
    super::cores("  ms/token, steps of c / c/2", bound, |x| {
        x.map_or("-".into(), |(_, a, b)| format!("{a:.2}/{b:.2}"))
    });
    // The kernels' tok/s: 1000 / W(c) for (a, 1 core); for (b) two stages
    // at 1000 / W(c/2) each (c >= 2), or one after the other at c = 1.
    let share: Vec<Option<(Option<f64>, Option<f64>)>> = bound
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let (_, w_a, w_b) = (*x)?;
            let stages = if levels[i] < 2 { 1.0 } else { 2.0 };
            Some((
                a1[i].map(|t| t * w_a / 1000.0),
                b[i].map(|t| t * w_b / (1000.0 * stages)),
            ))
        })
        .collect();
    super::cores("  of its kernels' speed, (a1) / (b)", &share, |x| {
        let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
        x.map_or("-".into(), |(a, b)| format!("{}/{}", f(a), f(b)))
    });
}
