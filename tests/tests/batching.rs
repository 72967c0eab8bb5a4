//! Continuous batching at a stage (#15): on each stage process of a
//! 2-stage pipeline, concurrent greedy sessions (driven by both workers in
//! turn, as the coordinator spreads them) run in far fewer `llama_decode`
//! calls than steps (the workers' metrics), in two waves (no call runs
//! more than half of them, so that while one stage computes a wave the
//! other computes the other), each wave a run of consecutive sequence ids
//! that llama.cpp computes as one micro-batch, and each session's tokens
//! equal its tokens when it runs alone.

use llama_cluster_proto::v1::InferenceRequest;
use llama_cluster_proto::v1::inference_response::Event;
use llama_cluster_tests::{NodeProc, PipelineCluster, metric, scrape, split_with_cli, test_dir};

/// Greedy tokens of `req` on `w`.
async fn tokens_of(w: &NodeProc, req: InferenceRequest) -> Vec<i32> {
    let mut c = w.client().await.unwrap();
    let mut s = c.inference(req).await.unwrap().into_inner();
    let mut tokens = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        if let Some(Event::Chunk(ch)) = m.event {
            tokens.extend(ch.token_ids);
        }
    }
    tokens
}

fn prompt(i: usize) -> InferenceRequest {
    InferenceRequest {
        prompt: format!("Write a short story about robot number {i}."),
        max_tokens: 40,
        ignore_eos: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_batches_its_sessions_and_each_text_equals_its_text_alone() {
    let dir = test_dir("batching");
    let manifest = split_with_cli(&dir.join("split"), 2).unwrap();
    let cluster = PipelineCluster::start(&dir, &manifest, 160, &["--max-sessions", "8"])
        .await
        .unwrap();
    let driver = &cluster.workers[0];
    const N: usize = 8;
    let mut alone = Vec::new();
    for i in 0..N {
        alone.push(tokens_of(driver, prompt(i)).await);
    }
    let counts = |w: &NodeProc| {
        let m = scrape(w).unwrap();
        [
            "llama_cluster_stage_steps_total",
            "llama_cluster_stage_decode_calls",
            "llama_cluster_stage_micro_batches",
        ]
        .map(|k| metric(&m, k).unwrap_or(0.0))
    };
    let before: Vec<[f64; 3]> = cluster.workers.iter().map(counts).collect();
    // The sessions' steps come back to the first stage from two drivers,
    // one a hop further away: their waves must still be runs of ids.
    let together =
        futures::future::join_all((0..N).map(|i| tokens_of(&cluster.workers[i % 2], prompt(i))))
            .await;
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.len(), 40);
        assert_eq!(
            a, t,
            "session {i}: its tokens with {N} sessions at once differ"
        );
    }
    for (w, [s0, c0, u0]) in cluster.workers.iter().zip(before) {
        let [s1, c1, u1] = counts(w);
        let (steps, calls, micro) = (s1 - s0, c1 - c0, u1 - u0);
        let most =
            metric(&scrape(w).unwrap(), "llama_cluster_stage_decode_batch_max").unwrap_or(0.0);
        eprintln!(
            "{}: {steps} steps in {calls} llama_decode calls ({micro} micro-batches), at most {most} in one",
            w.name
        );
        // A wave of scattered sequence ids would be cut into a micro-batch
        // per run of ids, costing nearly what its steps cost one by one.
        assert!(
            micro <= 1.2 * calls,
            "{}: {micro} micro-batches for {calls} llama_decode calls: waves are not runs of consecutive sequence ids",
            w.name
        );
        // 2 stages: 2 waves of N/2 sessions take turns.
        assert!(
            (2.0..=(N / 2) as f64).contains(&most),
            "{}: {most} steps in one call: not {} waves of at most {}",
            w.name,
            2,
            N / 2
        );
        assert!(steps >= (N * 40) as f64, "{}: {steps} steps", w.name);
        assert!(
            calls < 0.6 * steps,
            "{}: {calls} llama_decode calls for {steps} steps: not batched",
            w.name
        );
    }
}
