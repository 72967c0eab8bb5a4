//! Stage sessions on the real model: bounded, evicted when idle, positions
//! checked, inputs validated — errors, never panics.

use std::path::PathBuf;
use std::time::Duration;

use llama_cluster_engine::manifest::Manifest;
use llama_cluster_engine::split::{SplitPlan, split_model};
use llama_cluster_engine::stage::{ForwardRequest, StageEngine, StageInput, StageSpec};
use llama_cluster_engine::{EngineError, EngineSettings};

fn model_path() -> PathBuf {
    let p = llama_cluster_engine::default_model_path();
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

fn req(session: u64, pos0: u32, input: StageInput) -> ForwardRequest {
    ForwardRequest {
        session,
        pos0,
        input,
        sampling: None,
        history: vec![],
        want_logits: false,
        sample: false,
        span: tracing::Span::none(),
        depth: 1,
    }
}

#[test]
fn sessions_are_bounded_checked_and_evicted() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!(
        "../target/test-runs/sessions-{}",
        std::process::id()
    ));
    let m = split_model(&model_path(), &dir, &SplitPlan::Count(2), None).unwrap();
    let mpath = dir.join("manifest.json");
    let settings = EngineSettings {
        threads: 1,
        n_ctx: 64,
        n_batch: 32,
        n_ubatch: 32,
    };
    let first = StageEngine::start(StageSpec {
        shard_path: Manifest::path_of(&mpath, &m.shards[0].file.file),
        head_path: Some(Manifest::path_of(&mpath, &m.head.file)),
        is_first: true,
        is_last: false,
        settings,
        max_sessions: 2,
        idle_timeout: Duration::from_millis(400),
        kv_budget_bytes: 0,
    })
    .unwrap();
    assert_eq!(first.info().n_embd, 576);
    let out = first
        .forward_blocking(req(1, 0, StageInput::Tokens(vec![1, 2, 3])))
        .unwrap();
    assert_eq!(out.hidden.len(), 3 * 576, "one hidden row per token");
    first
        .forward_blocking(req(2, 0, StageInput::Tokens(vec![1])))
        .unwrap();
    assert_eq!(first.active_sessions(), 2);
    // A third session is refused while two are open.
    let e = first
        .forward_blocking(req(3, 0, StageInput::Tokens(vec![1])))
        .unwrap_err();
    assert!(matches!(e, EngineError::Busy(_)), "{e}");
    // Positions must follow on.
    let e = first
        .forward_blocking(req(1, 7, StageInput::Tokens(vec![4])))
        .unwrap_err();
    assert!(matches!(e, EngineError::Session(_)), "{e}");
    first
        .forward_blocking(req(1, 3, StageInput::Tokens(vec![4])))
        .unwrap();
    // Bad inputs are errors.
    let e = first
        .forward_blocking(req(1, 4, StageInput::Tokens(vec![1_000_000])))
        .unwrap_err();
    assert!(matches!(e, EngineError::InvalidInput(_)), "{e}");
    let e = first
        .forward_blocking(req(4, 0, StageInput::Hidden(vec![0.0; 576])))
        .unwrap_err();
    assert!(matches!(e, EngineError::InvalidInput(_)), "{e}");
    // More tokens than n_batch in one step is an error, not a llama.cpp abort.
    let e = first
        .forward_blocking(req(5, 0, StageInput::Tokens(vec![1; 40])))
        .unwrap_err();
    assert!(e.to_string().contains("n_batch"), "{e}");
    // The context is bounded.
    let e = first
        .forward_blocking(req(2, 1, StageInput::Tokens(vec![5; 70])))
        .unwrap_err();
    assert!(
        e.to_string().contains("context")
            || e.to_string().contains("batch")
            || matches!(e, EngineError::InvalidInput(_)),
        "{e}"
    );
    // Closing frees a slot; idle sessions are evicted.
    first.close(2);
    first
        .forward_blocking(req(3, 0, StageInput::Tokens(vec![1])))
        .unwrap();
    std::thread::sleep(Duration::from_millis(900));
    assert_eq!(first.active_sessions(), 0, "idle sessions evicted");
    let e = first
        .forward_blocking(req(1, 4, StageInput::Tokens(vec![4])))
        .unwrap_err();
    assert!(
        matches!(e, EngineError::Session(_)),
        "evicted session is gone: {e}"
    );

    // The last stage takes hidden states only and samples.
    let last = StageEngine::start(StageSpec {
        shard_path: Manifest::path_of(&mpath, &m.shards[1].file.file),
        head_path: None,
        is_first: false,
        is_last: true,
        settings,
        max_sessions: 1,
        idle_timeout: Duration::from_secs(60),
        kv_budget_bytes: 0,
    })
    .unwrap();
    let e = last
        .forward_blocking(req(9, 0, StageInput::Tokens(vec![1])))
        .unwrap_err();
    assert!(matches!(e, EngineError::InvalidInput(_)), "{e}");
    let mut r = req(9, 0, StageInput::Hidden(out.hidden.clone()));
    r.sample = true;
    r.want_logits = true;
    let o = last.forward_blocking(r).unwrap();
    assert!(o.token.is_some());
    assert_eq!(o.logits.unwrap().len(), 49152);
    let e = last
        .forward_blocking(req(9, 3, StageInput::Hidden(vec![0.5; 577])))
        .unwrap_err();
    assert!(matches!(e, EngineError::InvalidInput(_)), "{e}");
    drop(first);
    drop(last);
    let _ = std::fs::remove_dir_all(&dir);
}
