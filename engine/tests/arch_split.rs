//! Every accepted architecture, on a tiny random-weight model made by
//! `scripts/make-test-models.py` (cached under `<cache>/test-models/<hash of
//! the script>`): split into 2 and 3 shards at uneven boundaries, run in one
//! process, and compared with the unsplit model through llama-cpp-2. Greedy
//! tokens and the prompt's last-token logits must be equal. The boundaries
//! put sliding-window and global layers on both sides of a cut, leave global
//! RoPE tensors to later shards, and start shards at odd layers.
//!
//! Refused architectures are refused with their reason.

use std::path::PathBuf;
use std::process::Command;

use llama_cluster_engine::EngineSettings;
use llama_cluster_engine::baseline::Baseline;
use llama_cluster_engine::chain::{LocalChain, max_abs_diff};
use llama_cluster_engine::plan::shard_bytes;
use llama_cluster_engine::split::{SplitPlan, split_model};

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
const TOLERANCE: f32 = 1e-4;
const N_GEN: usize = 12;
const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../scripts/make-test-models.py"
);

/// The test model `name`, made on first use.
fn test_model(name: &str) -> PathBuf {
    let script = std::fs::read(SCRIPT).expect("scripts/make-test-models.py");
    let version = &blake3::hash(&script).to_hex()[..12];
    let dir = llama_cluster_engine::cache_root()
        .join("test-models")
        .join(version);
    let path = dir.join(format!("{name}.gguf"));
    if !path.exists() {
        let out = Command::new("python3")
            .arg(SCRIPT)
            .arg(&dir)
            .arg(name)
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "make-test-models.py {name} failed (pip install gguf==0.19.0, see scripts/setup.sh): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    path
}

fn out_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-runs")
        .join(format!("arch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn settings() -> EngineSettings {
    // Small batches: prompts cross a chunk and a ubatch boundary.
    EngineSettings {
        n_ctx: 128,
        n_batch: 32,
        n_ubatch: 32,
        threads: 2,
    }
}

/// Deterministic prompts of random tokens (past the byte tokens).
fn prompts() -> Vec<Vec<i32>> {
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (259 + x % 253) as i32
    };
    [7usize, 45]
        .iter()
        .map(|&n| std::iter::once(1).chain((1..n).map(|_| next())).collect())
        .collect()
}

/// Splits `name` at each of `splits` and checks every split against the
/// unsplit model.
fn check_equal(name: &str, splits: &[&[(u32, u32)]]) {
    // One model at a time: llama.cpp's thread pools crawl when several
    // tests share the 2 cores.
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let model = test_model(name);
    let base = Baseline::load(&model, settings()).unwrap();
    let prompts = prompts();
    let expected: Vec<_> = prompts
        .iter()
        .map(|p| base.greedy(p, N_GEN).unwrap())
        .collect();
    for ranges in splits {
        let dir = out_dir(name);
        let m = split_model(&model, &dir, &SplitPlan::Ranges(ranges.to_vec()), None).unwrap();
        assert_eq!(m.shards.len(), ranges.len());
        let order: Vec<usize> = (0..ranges.len()).collect();
        let mut chain = LocalChain::load(&dir.join("manifest.json"), &order, settings()).unwrap();
        for (p, want) in prompts.iter().zip(&expected) {
            let got = chain.greedy(p, N_GEN).unwrap();
            let diff = max_abs_diff(&got.prompt_logits, &want.prompt_logits);
            println!(
                "{name} {ranges:?}, prompt of {}: logits max|diff| = {diff:e}, tokens {:?} vs {:?}",
                p.len(),
                got.tokens,
                want.tokens
            );
            assert!(
                diff <= TOLERANCE,
                "{name} {ranges:?}: logits differ by {diff}"
            );
            assert_eq!(
                got.tokens, want.tokens,
                "{name} {ranges:?}: greedy tokens differ"
            );
        }
        drop(chain);
        let _ = std::fs::remove_dir_all(&dir);
    }
    // The output depends on the input (random tied models tend to repeat
    // one token, but their logits still tell prompts apart).
    let apart = max_abs_diff(&expected[0].prompt_logits, &expected[1].prompt_logits);
    assert!(
        apart > 0.05,
        "{name}: logits of different prompts differ by only {apart}"
    );
}

#[test]
fn llama_with_rope_freqs_and_tied_head() {
    check_equal(
        "llama31-tied",
        &[&[(0, 4), (5, 6)], &[(0, 1), (2, 2), (3, 6)]],
    );
}

#[test]
fn qwen2_untied() {
    check_equal(
        "qwen2-untied",
        &[&[(0, 3), (4, 5)], &[(0, 0), (1, 3), (4, 5)]],
    );
}

#[test]
fn qwen3_tied() {
    check_equal(
        "qwen3-tied",
        &[&[(0, 1), (2, 5)], &[(0, 2), (3, 3), (4, 5)]],
    );
}

#[test]
fn qwen2moe_one_row_output() {
    check_equal("qwen2moe", &[&[(0, 3), (4, 5)], &[(0, 0), (1, 3), (4, 5)]]);
}

#[test]
fn qwen3moe_per_layer_arrays() {
    check_equal(
        "qwen3moe-arrays",
        &[&[(0, 2), (3, 5)], &[(0, 0), (1, 4), (5, 5)]],
    );
}

#[test]
fn gemma3_sliding_window_and_scaled_embeddings() {
    // Layer 5 is the global one: it sits inside shards that start at 4 and 3.
    check_equal(
        "gemma3-swa",
        &[&[(0, 3), (4, 7)], &[(0, 2), (3, 5), (6, 7)]],
    );
}

#[test]
fn phi3_longrope_factors() {
    check_equal(
        "phi3-longrope",
        &[&[(0, 3), (4, 5)], &[(0, 0), (1, 3), (4, 5)]],
    );
}

#[test]
fn mistral3_rope_freqs() {
    check_equal(
        "mistral3-rope",
        &[&[(0, 1), (2, 5)], &[(0, 2), (3, 4), (5, 5)]],
    );
}

#[test]
fn granite_embedding_scale_only_once() {
    check_equal(
        "granite-tied",
        &[&[(0, 3), (4, 5)], &[(0, 0), (1, 3), (4, 5)]],
    );
}

#[test]
fn olmo2_sliding_window_pattern_4() {
    // Layers 3 and 7 are global.
    check_equal("olmo3-swa", &[&[(0, 4), (5, 7)], &[(0, 1), (2, 4), (5, 7)]]);
}

#[test]
fn gpt_oss_sliding_window_on_even_layers() {
    check_equal(
        "gpt-oss-swa",
        &[&[(0, 2), (3, 5)], &[(0, 0), (1, 3), (4, 5)]],
    );
}

#[test]
fn deepseek2_leading_dense_layers_and_mtp() {
    // Dense layers 0-1: the second shard starts inside them, or after them.
    check_equal(
        "deepseek2-moe-mtp",
        &[&[(0, 0), (1, 5)], &[(0, 1), (2, 3), (4, 5)]],
    );
}

#[test]
fn smollm3_aligned_to_its_no_rope_layers() {
    check_equal(
        "smollm3-nope",
        &[&[(0, 3), (4, 9)], &[(0, 3), (4, 7), (8, 9)]],
    );
    let model = test_model("smollm3-nope");
    let dir = out_dir("smollm3-unaligned");
    let e = split_model(&model, &dir, &SplitPlan::Ranges(vec![(0, 4), (5, 9)]), None)
        .expect_err("an unaligned smollm3 split")
        .to_string();
    assert!(e.contains("multiple of 4"), "{e}");
    let m = split_model(&model, &dir, &SplitPlan::Count(3), None).unwrap();
    assert!(
        m.shards.iter().all(|s| s.layer_start % 4 == 0),
        "{:?}",
        m.shards
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shard_counts_balance_bytes_with_the_head_on_the_last_shard() {
    // phi3: f32 embeddings and an f16 head, about three layers' worth.
    let model = test_model("phi3-longrope");
    let dir = out_dir("balance");
    let by_count =
        split_model(&model, &dir, &SplitPlan::Ranges(vec![(0, 2), (3, 5)]), None).unwrap();
    let m = split_model(&model, &dir, &SplitPlan::Count(2), None).unwrap();
    let bytes: Vec<u64> = m.shards.iter().map(|s| s.tensor_bytes).collect();
    let equal: Vec<u64> = by_count.shards.iter().map(|s| s.tensor_bytes).collect();
    let layers: Vec<u32> = m.shards.iter().map(|s| s.n_layers()).collect();
    println!("2 shards by bytes: layers {layers:?}, bytes {bytes:?}; by layer count: {equal:?}");
    assert!(m.shards.iter().all(|s| s.kv_bytes_per_token > 0));
    assert!(
        layers[1] < layers[0],
        "the last shard carries the head: {layers:?}"
    );
    let max = |v: &[u64]| v.iter().copied().max().unwrap_or(0);
    assert!(max(&bytes) < max(&equal), "{bytes:?} vs {equal:?}");
    // The files agree with the manifest's figures.
    for s in &m.shards {
        let size = std::fs::metadata(dir.join(&s.file.file)).unwrap().len();
        assert!(size >= s.tensor_bytes && size < s.tensor_bytes + 64 * 1024);
    }
    assert_eq!(
        shard_bytes(&[(0, 2), (3, 4), (5, 6)], &[1; 7], 1),
        vec![3, 2, 3]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn refusal(name: &str) -> String {
    let model = test_model(name);
    let dir = out_dir(name);
    let e = split_model(&model, &dir, &SplitPlan::Count(2), None)
        .expect_err(&format!("{name} was split"))
        .to_string();
    println!("{name}: {e}");
    let _ = std::fs::remove_dir_all(&dir);
    e
}

#[test]
fn refused_architectures_are_named_with_the_reason() {
    for (arch, why) in llama_cluster_engine::arch::REFUSED {
        let e = refusal(&format!("stub-{arch}"));
        assert!(e.contains(&format!("{arch:?}")), "{e}");
        assert!(e.contains(why), "{e}");
    }
    for arch in ["bert", "mamba"] {
        let e = refusal(&format!("stub-{arch}"));
        assert!(
            e.contains(&format!("{arch:?}")) && e.contains("not been checked"),
            "{e}"
        );
    }
    let e = refusal("stub-gemma3-27b");
    assert!(e.contains("27B") && e.contains("attention scale"), "{e}");
    let e = refusal("stub-llama-i32-embd");
    assert!(e.contains("token_embd") && e.contains("dequantise"), "{e}");
}
