//! A stage's handling of activation frames, in process, on a real shard of
//! the default model: a frame delivered twice (a sender retrying after its
//! stream died) runs the step once, and both deliveries get its answer.

use std::time::Duration;

use libp2p::PeerId;
use llama_cluster_engine::EngineSettings;
use llama_cluster_engine::sampling::SamplingParams;
use llama_cluster_tests::{split_with_cli, test_dir};
use llama_worker::net::NetHandle;
use llama_worker::net::frame::{ActivationRequest, ActivationResponse, FrameKind, Hop, Payload};
use llama_worker::network::behaviour::Role;
use llama_worker::pipeline::{Pipeline, PipelineConfig};
use llama_worker::state::SharedState;
use llama_worker::torrent::store::Store;
use llama_worker::torrent::{TestHooks, Torrents};
use serde_json::Value;

fn frame(session: u64, pos0: u32, tokens: Vec<i32>, hop: &Hop) -> Vec<u8> {
    ActivationRequest {
        kind: FrameKind::Forward,
        session,
        pos0,
        want_logits: false,
        sample: true,
        budget_ms: 60_000,
        trace: String::new(),
        driver: String::new(),
        depth: 1,
        route: vec![hop.clone()],
        sampling: Some(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }),
        history: vec![],
        payload: Payload::Tokens(tokens),
    }
    .encode()
}

fn answer(bytes: &[u8]) -> ActivationResponse {
    let r = ActivationResponse::decode(bytes).expect("a well-formed answer");
    assert!(r.error.is_none(), "step failed: {:?}", r.error);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_delivered_twice_runs_once_and_both_get_its_answer() {
    let dir = test_dir("pipeline-steps");
    let manifest = split_with_cli(&dir.join("split"), 1).expect("split");
    let m: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let shard = &m["shards"][0];
    let me = PeerId::random();
    let state = SharedState::new(me, "steps", Role::Worker, false);
    // Nobody reads the network commands: this stage is the whole route.
    let (tx, _rx) = tokio::sync::mpsc::channel(64);
    let net = NetHandle::for_tests(tx);
    let torrents = Torrents::new(
        Store::open(&dir.join("store")).unwrap(),
        net.clone(),
        state.clone(),
        TestHooks::default(),
        None,
        false,
        false,
    );
    let cfg = PipelineConfig {
        manifest: Some(manifest.clone()),
        engine: EngineSettings {
            threads: 1,
            ..Default::default()
        },
        max_sessions: 4,
        session_idle: Duration::from_secs(300),
        session_lease: Duration::from_secs(300),
        step_timeout: Duration::from_secs(60),
        max_reroutes: 3,
        queue_timeout: Duration::from_secs(10),
        max_queued: 8,
        f16: false,
        waves: true,
        trace_decode_every: 0,
        min_free_disk: 0,
    };
    let pipeline = Pipeline::new(state, net, cfg, torrents);
    let id = shard["id"].as_str().unwrap();
    pipeline
        .load_shard(id, Some(manifest.to_str().unwrap()))
        .await
        .expect("load the shard");
    let hop = Hop {
        peer: me.to_string(),
        shard_id: id.to_string(),
        layer_start: shard["layer_start"].as_u64().unwrap() as u32,
        layer_end: shard["layer_end"].as_u64().unwrap() as u32,
    };
    let from = PeerId::random();
    let session = 0x5eed;
    // Prefill, then the step at position 5, delivered twice at once.
    let prompt = vec![1, 504, 3458, 282, 4649];
    let first = answer(
        &pipeline
            .handle_inbound(from, frame(session, 0, prompt.clone(), &hop))
            .await,
    );
    let t1 = first.token.expect("a sampled token");
    let step = frame(session, prompt.len() as u32, vec![t1], &hop);
    let (a, b) = tokio::join!(
        pipeline.handle_inbound(from, step.clone()),
        pipeline.handle_inbound(from, step.clone())
    );
    // Run twice, the second run would have found the session one position
    // further and failed with a position mismatch.
    let (a, b) = (answer(&a), answer(&b));
    assert_eq!(a.token, b.token);
    assert!(a.token.is_some());
    // Delivered again after it was answered: the same answer, not a rerun.
    let c = answer(&pipeline.handle_inbound(from, step).await);
    assert_eq!(c.token, a.token);
    // And the session goes on from the next position.
    let next = frame(
        session,
        prompt.len() as u32 + 1,
        vec![a.token.unwrap()],
        &hop,
    );
    let d = answer(&pipeline.handle_inbound(from, next).await);
    assert!(d.token.is_some());
    // A step at a position the session has left is refused.
    let stale = frame(session, 1, vec![t1], &hop);
    let e = ActivationResponse::decode(&pipeline.handle_inbound(from, stale).await).unwrap();
    assert!(
        e.error
            .as_ref()
            .is_some_and(|e| e.message.contains("position")),
        "{:?}",
        e.error
    );
}
