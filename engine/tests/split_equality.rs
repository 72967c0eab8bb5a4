//! Split SmolLM2-135M into 1, 2 and 3 stages, run them in one process, and
//! compare with the unsplit model through llama-cpp-2: greedy tokens must be
//! identical and the prompt's last-token logits equal within 1e-4 (llama.cpp
//! computes the same kernels on the same inputs, so the difference is 0 in
//! practice). Swapping two middle stages must change the output.

use std::path::PathBuf;

use llama_cluster_engine::EngineSettings;
use llama_cluster_engine::baseline::Baseline;
use llama_cluster_engine::chain::{LocalChain, max_abs_diff};
use llama_cluster_engine::manifest::Manifest;
use llama_cluster_engine::split::{SplitPlan, split_model};

const TOLERANCE: f32 = 1e-4;
const N_GEN: usize = 32;

fn model_path() -> PathBuf {
    let p = llama_cluster_engine::default_model_path();
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

fn out_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-runs")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn prompts(b: &Baseline) -> Vec<Vec<i32>> {
    let long = "The history of the city goes back many centuries. ".repeat(12);
    // Longer than n_batch (512): the prompt is fed in two chunks.
    let longer = "Rivers, mountains and old roads shape how people live. ".repeat(50);
    let chat = "<|im_start|>user\nWrite a haiku about rivers.<|im_end|>\n<|im_start|>assistant\n";
    ["The capital of France is", &long, chat, &longer]
        .iter()
        .map(|p| b.tokenize(p))
        .collect()
}

#[test]
fn split_stages_match_the_unsplit_model() {
    let model = model_path();
    let settings = EngineSettings {
        threads: 2,
        ..Default::default()
    };
    let base = Baseline::load(&model, settings).unwrap();
    let prompts = prompts(&base);
    let expected: Vec<_> = prompts
        .iter()
        .map(|p| base.greedy(p, N_GEN).unwrap())
        .collect();
    let mut first_shard = Vec::new();
    for (tag, plan) in [
        ("1", SplitPlan::Count(1)),
        ("2", SplitPlan::Count(2)),
        ("3", SplitPlan::Count(3)),
        ("2 by compute", SplitPlan::ComputeCount(2)),
        (
            "2 measured",
            SplitPlan::Measured {
                shards: 2,
                sessions: 4,
            },
        ),
    ] {
        let n = match plan {
            SplitPlan::Count(n)
            | SplitPlan::ComputeCount(n)
            | SplitPlan::Measured { shards: n, .. } => n,
            SplitPlan::Ranges(ref r) => r.len() as u32,
        };
        let dir = out_dir(&format!("split{}", tag.replace(' ', "-")));
        let m = split_model(&model, &dir, &plan, None).unwrap();
        assert_eq!(m.shards.len(), n as usize);
        if n == 2 {
            first_shard.push(m.shards[0].layer_end);
        }
        assert_eq!(m.model, "smollm2-135m-instruct");
        let mpath = dir.join("manifest.json");
        let loaded = Manifest::load(&mpath).unwrap();
        assert_eq!(loaded, m);
        let order: Vec<usize> = (0..n as usize).collect();
        let mut chain = LocalChain::load(&mpath, &order, settings).unwrap();
        for (p, want) in prompts.iter().zip(&expected) {
            let got = chain.greedy(p, N_GEN).unwrap();
            let diff = max_abs_diff(&got.prompt_logits, &want.prompt_logits);
            println!(
                "{tag} stage(s), prompt of {} tokens: logits max|diff| = {diff:e}, tokens equal: {}",
                p.len(),
                got.tokens == want.tokens
            );
            assert!(diff <= TOLERANCE, "{tag} stages: logits differ by {diff}");
            assert_eq!(
                got.tokens, want.tokens,
                "{tag} stages: greedy tokens differ"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    // SmolLM2's head is its embedding table, stored with more bits per
    // weight than its Q4_1 layers: by bytes the head weighs more than by
    // compute, so balancing compute gives the first shard fewer layers.
    println!(
        "first shard ends at layer {} by bytes, {} by compute, {} measured",
        first_shard[0], first_shard[1], first_shard[2]
    );
    // Timed, the head (49152 x 576 weights) costs several layers' time on
    // the last shard, so the first shard takes more of the 30 layers.
    assert!(
        first_shard[2] >= 15,
        "measured, the first shard ends at layer {}: the head's time is not counted",
        first_shard[2]
    );
    assert!(
        first_shard[1] < first_shard[0],
        "by compute the first shard ends at {}, by bytes at {}",
        first_shard[1],
        first_shard[0]
    );
}

#[test]
fn swapped_stages_change_the_output() {
    let model = model_path();
    let settings = EngineSettings {
        threads: 2,
        ..Default::default()
    };
    let base = Baseline::load(&model, settings).unwrap();
    let prompt = base.tokenize("The capital of France is");
    let want = base.greedy(&prompt, 8).unwrap();
    let dir = out_dir("swap");
    split_model(&model, &dir, &SplitPlan::Count(4), None).unwrap();
    let mpath = dir.join("manifest.json");
    let mut right = LocalChain::load(&mpath, &[0, 1, 2, 3], settings).unwrap();
    let ok = right.greedy(&prompt, 8).unwrap();
    assert_eq!(ok.tokens, want.tokens);
    let mut wrong = LocalChain::load(&mpath, &[0, 2, 1, 3], settings).unwrap();
    let bad = wrong.greedy(&prompt, 8).unwrap();
    let diff = max_abs_diff(&bad.prompt_logits, &want.prompt_logits);
    println!("swapped middle stages: logits max|diff| = {diff}");
    assert!(
        diff > 0.5,
        "swapping stages should change the logits, diff {diff}"
    );
    assert_ne!(bad.tokens, want.tokens);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn split_refuses_bad_input() {
    let model = model_path();
    let dir = out_dir("refuse");
    let e = split_model(&model, &dir, &SplitPlan::Count(31), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("31"), "{e}");
    let e = split_model(
        &model,
        &dir,
        &SplitPlan::Ranges(vec![(0, 10), (12, 29)]),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("gaps"), "{e}");
    let not_gguf = dir.join("x.gguf");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&not_gguf, b"hello").unwrap();
    let e = split_model(&not_gguf, &dir, &SplitPlan::Count(2), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a readable GGUF"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shards_hold_their_share_of_the_layers() {
    let model = model_path();
    let dir = out_dir("sizes");
    let m = split_model(&model, &dir, &SplitPlan::Count(3), None).unwrap();
    let total = std::fs::metadata(&model).unwrap().len() as f64;
    // Non-last shards: about a third of the layer weights, no vocabulary.
    for s in &m.shards[..2] {
        let frac = s.file.size as f64 / total;
        println!("{}: {} bytes = {:.2} of the model", s.id, s.file.size, frac);
        assert!(frac < 0.34, "{} holds {frac} of the model", s.id);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
