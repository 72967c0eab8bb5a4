//! Sharded inference end to end: the default model split into 3 shards, each
//! run by its own `llama-worker` process on 127.0.0.x, the stages talking over
//! libp2p. Greedy output must be token-identical to the unsplit model run in
//! this process through llama-cpp-2 with the same settings, and the prompt's
//! last-token logits equal within 1e-4 (0 in practice). Bad requests and
//! failing stages come back as gRPC statuses within bounded time. (Sampling
//! beyond greedy, penalties and log-probabilities: `sampling.rs`.)

use std::time::{Duration, Instant};

use llama_cluster_engine::chain::max_abs_diff;
use llama_cluster_proto::v1::{InferenceRequest, LoadShardRequest};
use llama_cluster_tests::{
    Answer, NodeProc, PipelineCluster, baseline, infer, split_with_cli, test_dir, wait_for,
};
use serde_json::{Value, json};

const TOLERANCE: f32 = 1e-4;
const N_GEN: u32 = 32;

/// A short request of `max_tokens` tokens.
fn hi(max_tokens: u32) -> InferenceRequest {
    InferenceRequest {
        prompt: "hi".into(),
        max_tokens,
        ..Default::default()
    }
}

fn greedy(prompt: &str, chat: bool) -> InferenceRequest {
    InferenceRequest {
        prompt: prompt.into(),
        max_tokens: N_GEN,
        chat,
        return_prompt_logits: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_worker_processes_match_single_node_llama_cpp() {
    let dir = test_dir("pipeline3");
    let manifest = split_with_cli(&dir.join("split"), 3).unwrap();
    let cluster = PipelineCluster::start(&dir, &manifest, 20, &[])
        .await
        .unwrap();

    let base = baseline();
    let chat_prompt = "Write a haiku about rivers.";
    let chat_text =
        "<|im_start|>user\nWrite a haiku about rivers.<|im_end|>\n<|im_start|>assistant\n";
    let long = "Rivers, mountains and old roads shape how people live. ".repeat(50); // > n_batch tokens
    let cases: Vec<(&str, bool, String)> = vec![
        (
            "The capital of France is",
            false,
            "The capital of France is".into(),
        ),
        (&long, false, long.clone()),
        (chat_prompt, true, chat_text.into()),
    ];
    for (i, (prompt, chat, raw)) in cases.iter().enumerate() {
        let want = base.greedy(&base.tokenize(raw), N_GEN as usize).unwrap();
        // Any worker can drive: rotate the driver.
        let driver = &cluster.workers[i % cluster.workers.len()];
        let got = infer(driver, greedy(prompt, *chat))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", driver.log()));
        let stats = got.stats.clone().expect("final stats");
        let diff = max_abs_diff(&stats.prompt_logits, &want.prompt_logits);
        println!(
            "driver {}: prompt {} tokens, {} generated, logits max|diff| {diff:e}, ttft {:.1} ms, {:.1} tok/s, {} B/token/hop, route {:?}",
            driver.name,
            stats.prompt_tokens,
            stats.generated_tokens,
            stats.time_to_first_token_ms,
            stats.tokens_per_second,
            stats.bytes_per_token_per_hop,
            stats.route
        );
        assert!(diff <= TOLERANCE, "logits differ by {diff}");
        // Identical tokens; the pipeline stops early only at end-of-generation.
        assert!(!got.tokens.is_empty());
        assert_eq!(
            got.tokens[..],
            want.tokens[..got.tokens.len()],
            "prompt {i}: tokens differ"
        );
        if got.tokens.len() < N_GEN as usize {
            assert!(
                base.is_eog(want.tokens[got.tokens.len()]),
                "stopped early without end-of-generation"
            );
            assert_eq!(stats.finish_reason, "stop");
        } else {
            assert_eq!(stats.finish_reason, "length");
        }
        let want_text: Vec<u8> = want.tokens[..got.tokens.len()]
            .iter()
            .flat_map(|&t| base.piece(t))
            .collect();
        assert_eq!(got.text, String::from_utf8_lossy(&want_text));
        assert_eq!(stats.route.len(), 3, "{:?}", stats.route);
        for (hop, id) in stats.route.iter().zip(&cluster.shard_ids) {
            assert!(hop.starts_with(&format!("{id}@")), "{hop}");
        }
        assert_eq!(stats.generated_tokens as usize, got.tokens.len());
        assert!(
            stats.bytes_per_token_per_hop >= 576 * 4,
            "one f32 hidden state per hop per token"
        );
    }

    // Frames travel on streams that stay open: a stage opens a handful of
    // streams (connections replaced at start-up cost a few) for all the
    // frames it sends.
    let mut frames_total = 0.0;
    for w in &cluster.workers {
        let m = llama_cluster_tests::scrape(w).unwrap();
        let frames =
            llama_cluster_tests::metric(&m, "llama_cluster_activation_frames_sent_total").unwrap();
        let opened =
            llama_cluster_tests::metric(&m, "llama_cluster_activation_streams_opened_total")
                .unwrap();
        println!(
            "{}: {frames} activation frames sent on {opened} streams",
            w.name
        );
        assert!(
            opened <= 8.0,
            "{}: {opened} streams for {frames} frames",
            w.name
        );
        frames_total += frames;
    }
    assert!(
        frames_total >= (2 * N_GEN) as f64,
        "{frames_total} frames for {} requests",
        cases.len()
    );

    // Concurrent sessions through the same stages (as many as a stage
    // allows), driven from every worker at once: each is token-identical to
    // the single-node run. Frames of the sessions share the stages' streams.
    let raw = "The capital of France is";
    let want = base.greedy(&base.tokenize(raw), N_GEN as usize).unwrap();
    let answers = futures::future::join_all((0..4).map(|i| {
        let driver = &cluster.workers[i % cluster.workers.len()];
        async move { infer(driver, greedy(raw, false)).await }
    }))
    .await;
    for (i, a) in answers.into_iter().enumerate() {
        let a = a.unwrap_or_else(|e| panic!("concurrent request {i}: {e}"));
        assert!(!a.tokens.is_empty());
        assert_eq!(
            a.tokens[..],
            want.tokens[..a.tokens.len()],
            "concurrent request {i}"
        );
    }

    // Prometheus metrics: the driver counted exactly the tokens it streamed.
    let driver = &cluster.workers[0];
    let before = llama_cluster_tests::scrape(driver).unwrap();
    let n_before =
        llama_cluster_tests::metric(&before, "llama_cluster_tokens_generated_total").unwrap_or(0.0);
    let got = infer(driver, greedy("The capital of France is", false))
        .await
        .unwrap();
    let after = llama_cluster_tests::scrape(driver).unwrap();
    let n_after =
        llama_cluster_tests::metric(&after, "llama_cluster_tokens_generated_total").unwrap();
    assert_eq!(n_after - n_before, got.tokens.len() as f64, "{after}");
    for name in [
        "llama_cluster_time_to_first_token_seconds_count",
        "llama_cluster_token_latency_seconds_count",
        "llama_cluster_stage_forward_seconds_count",
        "llama_cluster_inference_requests_total",
        "llama_cluster_active_sessions",
        "llama_cluster_dht_shard_records",
    ] {
        assert!(
            llama_cluster_tests::metric(&after, name).is_some(),
            "{name} missing:\n{after}"
        );
    }
    assert!(llama_cluster_tests::metric(&after, "llama_cluster_peers_connected").is_some());
    assert_eq!(
        llama_cluster_tests::metric(&after, "llama_cluster_stage_queue_depth"),
        Some(0.0),
        "nothing waits on the stage once the request is done"
    );
    // libp2p's own metrics on the same page, which ends once.
    for name in [
        "libp2p_bandwidth_bytes_total",
        "libp2p_swarm_connections_established_total",
        "libp2p_identify_received_total",
    ] {
        assert!(
            llama_cluster_tests::metric(&after, name).is_some(),
            "{name} missing:\n{after}"
        );
    }
    assert_eq!(after.matches("# EOF").count(), 1);
    assert!(after.trim_end().ends_with("# EOF"));
    let middle = llama_cluster_tests::scrape(&cluster.workers[1]).unwrap();
    assert!(
        llama_cluster_tests::metric(&middle, "llama_cluster_hop_bytes_in_total").unwrap() > 0.0,
        "{middle}"
    );

    // The P2P INFERENCE command gives the same answer as gRPC.
    let addr = cluster.workers[1].addr("tcp").parse().unwrap();
    let mut client = llama_worker::client::JsonClient::connect(&addr, Duration::from_secs(60))
        .await
        .unwrap();
    let body = json!({"command": "INFERENCE", "request_id": "p2p-1", "params": {"prompt": "The capital of France is", "max_tokens": 16}});
    let r: Value = serde_json::from_slice(
        &client
            .request(serde_json::to_vec(&body).unwrap())
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(r["ok"], true, "{r}");
    let want = base
        .greedy(&base.tokenize("The capital of France is"), 16)
        .unwrap();
    let ids: Vec<i32> = r["result"]["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap() as i32)
        .collect();
    assert_eq!(ids, want.tokens);

    // Seeded sampling repeats itself; stop strings cut the text.
    let sampled = InferenceRequest {
        prompt: "Once upon a time".into(),
        max_tokens: 24,
        temperature: 0.9,
        top_k: 40,
        top_p: 0.95,
        repeat_penalty: 1.1,
        seed: 7,
        ..Default::default()
    };
    let a = infer(&cluster.workers[0], sampled.clone()).await.unwrap();
    let b = infer(&cluster.workers[0], sampled).await.unwrap();
    assert_eq!(a.tokens, b.tokens, "same seed, same tokens");
    let stopped = infer(
        &cluster.workers[0],
        InferenceRequest {
            prompt: "The capital of France is".into(),
            max_tokens: 32,
            stop: vec!["States".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(stopped.text.ends_with("The United "), "{:?}", stopped.text);
    assert_eq!(stopped.stats.unwrap().finish_reason, "stop");
}

/// The error of a call that must fail.
#[track_caller]
fn code(r: Result<Answer, tonic::Status>) -> tonic::Status {
    match r {
        Ok(a) => panic!("expected an error, got {:?}", a.text),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_and_failing_stages_get_grpc_errors() {
    let dir = test_dir("pipeline-errors");
    let manifest = split_with_cli(&dir.join("split"), 3).unwrap();
    let cluster = PipelineCluster::start(
        &dir,
        &manifest,
        30,
        &[
            "--stage-timeout-secs",
            "4",
            "--max-sessions",
            "1",
            "--max-queued",
            "0",
        ],
    )
    .await
    .unwrap();
    let driver = &cluster.workers[0];

    // Bad requests: (request, code, a word the message must contain).
    let bad = [
        (
            InferenceRequest {
                prompt: "  ".into(),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "empty",
        ),
        (
            InferenceRequest {
                prompt: "The quick brown fox jumps over the lazy dog. ".repeat(400),
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "context",
        ),
        (
            InferenceRequest {
                prompt: "hi".into(),
                model: "gpt-9".into(),
                ..Default::default()
            },
            tonic::Code::NotFound,
            "",
        ),
        (
            InferenceRequest {
                prompt: "hi".into(),
                max_tokens: 1_000_000,
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "",
        ),
        (
            InferenceRequest {
                prompt: "hi".into(),
                temperature: -1.0,
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "",
        ),
    ];
    for (req, want, word) in bad {
        let e = code(infer(driver, req).await);
        assert_eq!(e.code(), want, "{e:?}");
        assert!(e.message().contains(word), "{}", e.message());
    }

    // Sessions are bounded: a second request while one runs waits in the
    // queue; with no room in the queue (max_queued 0) it is refused.
    let long = InferenceRequest {
        prompt: "The capital of France is".into(),
        max_tokens: 400,
        ..Default::default()
    };
    let mut first_client = driver.client().await.unwrap();
    let mut first = first_client.inference(long).await.unwrap().into_inner();
    let _ = first.message().await.unwrap(); // generation is under way
    let e = code(
        infer(
            &cluster.workers[1],
            InferenceRequest {
                prompt: "hi".into(),
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_queued 0"), "{}", e.message());
    drop(first);
    drop(first_client);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // No route: unload the middle shard, then load it back.
    let health_in = |w: &NodeProc, service: &'static str| {
        let addr = w.grpc_addr.clone();
        async move {
            let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .ok()?
                .connect()
                .await
                .ok()?;
            let r = tonic_health::pb::health_client::HealthClient::new(ch)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .ok()?;
            Some(r.into_inner().status)
        }
    };
    let health_of = |w: &NodeProc| health_in(w, "llamacluster.v1.Worker");
    use tonic_health::pb::health_check_response::ServingStatus;
    assert_eq!(
        health_of(&cluster.workers[1]).await,
        Some(ServingStatus::Serving as i32),
        "loaded: SERVING"
    );
    let mut mid = cluster.workers[1].client().await.unwrap();
    let r = mid
        .load_shard(LoadShardRequest {
            unload: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, "announced");
    wait_for(
        "NOT_SERVING after unload",
        Duration::from_secs(10),
        || async {
            (health_of(&cluster.workers[1]).await == Some(ServingStatus::NotServing as i32))
                .then_some(())
        },
    )
    .await
    .unwrap();
    // Not ready, yet alive: the liveness service stays SERVING.
    assert_eq!(
        health_in(&cluster.workers[1], "liveness").await,
        Some(ServingStatus::Serving as i32)
    );
    let t0 = Instant::now();
    let e = loop {
        match infer(driver, hi(2)).await {
            Err(e) if e.code() == tonic::Code::Unavailable && e.message().contains("no route") => {
                break e;
            }
            other => {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "still routed: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // The missing shard's range (split --shards balances bytes).
    let m: Value = serde_json::from_slice(&std::fs::read(&cluster.manifest).unwrap()).unwrap();
    let range = format!(
        "layers {}-{}",
        m["shards"][1]["layer_start"], m["shards"][1]["layer_end"]
    );
    assert!(e.message().contains(&range), "{}", e.message());
    let r = mid
        .load_shard(LoadShardRequest {
            shard_id: cluster.shard_ids[1].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let start = m["shards"][1]["layer_start"].as_u64().unwrap_or_default();
    let end = m["shards"][1]["layer_end"].as_u64().unwrap_or_default();
    assert_eq!(
        (r.state.as_str(), r.layer_start as u64, r.layer_end as u64),
        ("ready", start, end)
    );
    // Routed at once: a driver whose view of the shards lags behind (the
    // new record may not have reached it yet) looks the records up in the
    // DHT before it answers "no route".
    let ok = infer(driver, hi(2))
        .await
        .unwrap_or_else(|e| panic!("right after the reload: {e:?}"));
    assert!(!ok.tokens.is_empty());
    let e = mid
        .load_shard(LoadShardRequest {
            shard_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let mid_after_bad_load = cluster.workers[1].status().await.unwrap();
    assert!(
        mid_after_bad_load
            .shards
            .iter()
            .any(|s| s.state == "ready" && s.availability == "LOCAL")
    );
    cluster.wait_ready_from(&cluster.workers[0]).await.unwrap();
    wait_for("SWARM_READY again", Duration::from_secs(30), || async {
        driver.status().await.ok()?.swarm_ready.then_some(())
    })
    .await
    .unwrap();
    let ok = infer(driver, hi(4)).await.unwrap();
    assert!(!ok.tokens.is_empty());

    // A stage that stops answering: after the step budget the driver fails
    // it over; with no other replica of its range the request fails with
    // UNAVAILABLE naming the range, within the budget and the lookup.
    let last_pid = cluster.workers[2].child.id().to_string();
    let stop = std::process::Command::new("kill")
        .args(["-STOP", &last_pid])
        .status()
        .unwrap();
    assert!(stop.success());
    let t0 = Instant::now();
    let e = code(infer(driver, hi(4)).await);
    let took = t0.elapsed();
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &last_pid])
        .status();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    let last_range = format!(
        "layers {}-{}",
        m["shards"][2]["layer_start"], m["shards"][2]["layer_end"]
    );
    assert!(e.message().contains(&last_range), "{}", e.message());
    assert!(took < Duration::from_secs(15), "took {took:?}");

    // A stage that dies: the driver reports it within the step budget (a
    // dead QUIC peer is silent, so this may be a deadline rather than a
    // closed connection), or, once the loss is known, finds no route.
    let pid = cluster.workers[2].child.id().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status();
    let t0 = Instant::now();
    let e = code(infer(driver, hi(4)).await);
    assert!(
        matches!(
            e.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
        ),
        "{e:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(15));
    // The driver itself keeps serving.
    assert_eq!(driver.status().await.unwrap().peer_id, driver.peer_id);
}
