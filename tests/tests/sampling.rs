//! The last stage's sampling beyond greedy, over 2 worker processes against
//! the unsplit model in this process: OpenAI's frequency and presence
//! penalties (the logits with the formula applied by hand), and each
//! token's log-probabilities (the log-softmax of the logits at its step).

use llama_cluster_proto::v1::InferenceRequest;
use llama_cluster_tests::{PipelineCluster, baseline, infer, split_with_cli, test_dir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn penalties_and_logprobs_match_the_unsplit_model() {
    let dir = test_dir("sampling");
    let manifest = split_with_cli(&dir.join("split"), 2).unwrap();
    let cluster = PipelineCluster::start(&dir, &manifest, 236, &[])
        .await
        .unwrap();
    let base = baseline();

    // The frequency and presence penalties equal the unsplit model's logits
    // with OpenAI's formula applied by hand over the last 64 tokens (the
    // prompt's included; 80 tokens go past the window).
    let (freq, presence) = (0.8f32, 0.5f32);
    let prompt = "List the numbers: one, two, one, two, one,";
    let want = base
        .greedy_with(&base.tokenize(prompt), 80, |seen, logits| {
            let window = &seen[seen.len().saturating_sub(64)..];
            let mut count = std::collections::HashMap::<i32, f32>::new();
            for &t in window {
                *count.entry(t).or_default() += 1.0;
            }
            for (&t, &c) in &count {
                logits[t as usize] -= c * freq + presence;
            }
        })
        .unwrap();
    let plain = base.greedy(&base.tokenize(prompt), 80).unwrap();
    assert_ne!(want.tokens, plain.tokens, "the penalties change this text");
    let penalised = infer(
        &cluster.workers[0],
        InferenceRequest {
            prompt: prompt.into(),
            max_tokens: 80,
            frequency_penalty: freq,
            presence_penalty: presence,
            ignore_eos: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(penalised.tokens, want.tokens);

    // Log-probabilities: each token's, and the 3 most likely at its step,
    // are the log-softmax of the unsplit model's logits there.
    let mut want_lp: Vec<(f32, Vec<(i32, f32)>)> = vec![];
    let plain = base
        .greedy_with(
            &base.tokenize("The capital of France is"),
            12,
            |_, logits| {
                let max = logits.iter().copied().fold(f32::MIN, f32::max);
                let lse = max + logits.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
                let mut ranked: Vec<(i32, f32)> = logits
                    .iter()
                    .enumerate()
                    .map(|(t, &x)| (t as i32, x - lse))
                    .collect();
                ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
                ranked.truncate(3);
                want_lp.push((ranked[0].1, ranked));
            },
        )
        .unwrap();
    let got = infer(
        &cluster.workers[0],
        InferenceRequest {
            prompt: "The capital of France is".into(),
            max_tokens: 12,
            ignore_eos: true,
            logprobs: true,
            top_logprobs: 3,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(got.tokens, plain.tokens);
    assert_eq!(got.logprobs.len(), got.tokens.len());
    for ((l, (lp, top)), id) in got.logprobs.iter().zip(&want_lp).zip(&got.tokens) {
        assert_eq!(l.token_id, *id);
        assert!((l.logprob - lp).abs() < 1e-3, "{l:?} vs {lp}");
        assert_eq!(l.top.len(), 3, "{l:?}");
        for (a, (t, want)) in l.top.iter().zip(top) {
            assert!((a.logprob - want).abs() < 1e-3, "{a:?} vs {t} {want}");
        }
        assert_eq!(l.top[0].token_id, *id, "greedy picks the most likely");
        assert!(!l.token.is_empty() || l.bytes.is_empty());
    }
}
