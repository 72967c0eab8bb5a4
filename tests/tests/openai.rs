//! The OpenAI-compatible API of the coordinator, answered by a real client
//! library (the `openai` Python package) in streaming and non-streaming
//! modes, in front of a 2-stage pipeline of worker processes; bad requests
//! get OpenAI-style errors with the right 4xx status.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use llama_cluster_proto::v1::InferenceRequest;
use llama_cluster_proto::v1::inference_response::Event;
use llama_cluster_tests::{
    PipelineCluster, metric, metric_with, scrape_url, split_with_cli, start_coordinator, test_dir,
    wait_for,
};
use serde_json::Value;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The `openai` client: models, chat and completions, streamed and not,
/// and bad requests.
const CLIENT: &str = include_str!("../clients/openai_client.py");

/// The `openai` client: what common clients send beyond the basics.
const CLIENT_MORE: &str = include_str!("../clients/openai_more.py");

/// The prompt the penalties are tried on (the numbers repeat).
const PENALISED: &str = "List the numbers: one, two, one, two, one,";

/// The completion request both the pipeline and the API are asked.
fn capital_of_france() -> InferenceRequest {
    InferenceRequest {
        prompt: "The capital of France is".into(),
        max_tokens: 16,
        ..Default::default()
    }
}

/// The text of an Inference stream (chunks concatenated).
async fn text_of(
    mut stream: tonic::Streaming<llama_cluster_proto::v1::InferenceResponse>,
) -> String {
    let mut text = String::new();
    while let Some(m) = stream.message().await.unwrap() {
        if let Some(Event::Chunk(c)) = m.event {
            text.push_str(&c.text);
        }
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_client_streaming_and_not_and_bad_requests() {
    let dir = test_dir("openai");
    let manifest = split_with_cli(&dir.join("split"), 2).unwrap();
    let mut cluster = PipelineCluster::start(&dir, &manifest, 120, &[])
        .await
        .unwrap();
    let workers = cluster.grpc_addrs();
    let coord = start_coordinator(&dir, &workers, &[], &[]).unwrap();
    let base = format!("http://{}", coord.ready["http_addr"].as_str().unwrap());

    // What the pipeline itself says for the completion prompt (greedy).
    let mut client = cluster.workers[0].client().await.unwrap();
    let stream = client
        .inference(capital_of_france())
        .await
        .unwrap()
        .into_inner();
    let want = text_of(stream).await;

    // … and for the chat (both messages through the model's chat template).
    let msgs = vec![
        llama_cluster_proto::v1::ChatMessage {
            role: "system".into(),
            content: "You are brief.".into(),
        },
        llama_cluster_proto::v1::ChatMessage {
            role: "user".into(),
            content: "What is the capital of France?".into(),
        },
    ];
    let stream = client
        .inference(InferenceRequest {
            messages: msgs,
            max_tokens: 24,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let want_chat = text_of(stream).await;

    // … and with OpenAI's penalties.
    let stream = client
        .inference(InferenceRequest {
            prompt: PENALISED.into(),
            max_tokens: 24,
            frequency_penalty: 0.8,
            presence_penalty: 0.5,
            ignore_eos: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let want_penalised = text_of(stream).await;

    let r = run_client(&dir, "client.py", CLIENT, &[&base], &coord);
    println!("{}", serde_json::to_string_pretty(&r).unwrap());

    assert_eq!(r["models"], serde_json::json!(["smollm2-135m-instruct"]));
    // OpenAI's retrieve: the model listed, created when the coordinator
    // first saw it served (not 1970); an unknown one is model_not_found.
    let m = &r["retrieve"];
    assert_eq!(m["id"], "smollm2-135m-instruct", "{m}");
    assert_eq!(m["object"], "model", "{m}");
    let created = m["created"].as_u64().unwrap_or(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(created > now - 3600 && created <= now, "{m}");
    assert_eq!(m["listed_created"], m["created"], "{m}");
    assert_eq!(
        r["retrieve_missing"],
        serde_json::json!(["NotFoundError", 404, "model_not_found"])
    );
    // llama-server's health check.
    assert_eq!(r["health"], serde_json::json!([200, {"status": "ok"}]));
    let chat = &r["chat"];
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(
        chat["text"],
        want_chat.as_str(),
        "the API answers what the pipeline answers"
    );
    assert!(!want_chat.is_empty());
    let u = chat["usage"].as_array().unwrap();
    assert_eq!(
        u[0].as_u64().unwrap() + u[1].as_u64().unwrap(),
        u[2].as_u64().unwrap()
    );
    assert!(
        u[0].as_u64().unwrap() > 10,
        "system + user messages through the chat template"
    );
    // Streaming gives the same greedy answer, in several chunks, with usage.
    assert_eq!(r["chat_stream"]["text"], chat["text"]);
    assert_eq!(r["chat_stream"]["finish"], chat["finish"]);
    assert_eq!(r["chat_stream"]["usage"], chat["usage"]);
    assert!(r["chat_stream"]["chunks"].as_u64().unwrap() > 2);
    assert_eq!(r["completion"]["text"], want.as_str());
    assert_eq!(r["completion_stream"], want.as_str());
    assert_eq!(r["completion"]["finish"], "length");
    assert_eq!(r["completion"]["usage"], serde_json::json!([5, 16, 21]));

    let e = &r["errors"];
    for (case, code) in [
        ("unknown_model", 404),
        ("empty_messages", 400),
        ("max_tokens_zero", 400),
        ("max_tokens_huge", 400),
        ("malformed", 400),
        ("no_model", 400),
        ("bad_role", 400),
    ] {
        assert_eq!(e[case][0], code, "{case}: {}", e[case]);
        let msg = e[case][1]["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !msg.is_empty(),
            "{case}: readable message expected: {}",
            e[case]
        );
        assert!(e[case][1]["error"]["type"].is_string());
    }
    assert_eq!(r["client_error"], serde_json::json!(["NotFoundError", 404]));

    // The coordinator's gRPC service: one view of the cluster, one entry point.
    use llama_cluster_proto::v1::coordinator_client::CoordinatorClient;
    let ch = tonic::transport::Channel::from_shared(format!(
        "http://{}",
        coord.ready["grpc_addr"].as_str().unwrap()
    ))
    .unwrap()
    .connect()
    .await
    .unwrap();
    let mut cc = CoordinatorClient::new(ch);
    let cs = cc
        .get_cluster_status(llama_cluster_proto::v1::GetClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cs.workers.len(), 2);
    assert!(cs.workers.iter().all(|w| w.reachable));
    assert!(cs.swarm_ready, "{cs:?}");
    assert_eq!(cs.models, vec!["smollm2-135m-instruct".to_string()]);
    let stream = cc
        .inference(capital_of_france())
        .await
        .unwrap()
        .into_inner();
    let via_coordinator = text_of(stream).await;
    assert_eq!(via_coordinator, want);
    let e = cc
        .inference(InferenceRequest {
            prompt: "hi".into(),
            model: "gpt-9".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    // Readiness follows SWARM_READY: SERVING with the model served.
    let grpc_addr = coord.ready["grpc_addr"].as_str().unwrap().to_string();
    wait_for(
        "coordinator health SERVING",
        Duration::from_secs(20),
        || async { (health(&grpc_addr, "").await == Some(ServingStatus::Serving)).then_some(()) },
    )
    .await
    .unwrap();
    assert_eq!(
        health(&grpc_addr, "llamacluster.v1.Coordinator").await,
        Some(ServingStatus::Serving)
    );

    // /metrics of the coordinator moved by exactly what clients got.
    let text = scrape_url(&format!("{base}/metrics")).unwrap();
    let chat_tokens = chat["usage"][1].as_u64().unwrap();
    let m = |name: &str, labels: &[(&str, &str)]| {
        metric_with(&text, &format!("llama_cluster_coordinator_{name}"), labels)
            .unwrap_or_else(|| panic!("{name} {labels:?} missing:\n{text}"))
    };
    assert_eq!(
        m("tokens_generated_total", &[]) as u64,
        2 * chat_tokens + 2 * 16 + 16,
        "2 chats, 2 completions of 16 tokens, 1 gRPC request of 16"
    );
    type Labels<'a> = &'a [(&'a str, &'a str)];
    let want_metrics: [(&str, Labels, f64); 7] = [
        (
            "inference_requests_total",
            &[("api", "openai"), ("outcome", "ok")],
            4.0,
        ),
        (
            "inference_requests_total",
            &[("api", "grpc"), ("outcome", "ok")],
            1.0,
        ),
        ("time_to_first_token_seconds_count", &[], 5.0),
        ("requests_in_flight", &[], 0.0),
        (
            "http_responses_total",
            &[("path", "/v1/completions"), ("status", "400")],
            4.0,
        ),
        (
            "http_responses_total",
            &[("path", "/v1/completions"), ("status", "200")],
            2.0,
        ),
        (
            "http_responses_total",
            &[("path", "/v1/chat/completions"), ("status", "404")],
            2.0,
        ),
    ];
    for (name, labels, value) in want_metrics {
        assert_eq!(m(name, labels), value, "{name} {labels:?}");
    }
    assert_eq!(m("swarm_ready", &[]), 1.0);
    assert_eq!(m("workers_reachable", &[]), 2.0);

    // What clients send beyond the basics: text parts, several choices, and
    // fields the API cannot honour (refused by name, never dropped).
    let r = run_client(
        &dir,
        "client_more.py",
        CLIENT_MORE,
        &[&base, PENALISED],
        &coord,
    );
    println!("{}", serde_json::to_string_pretty(&r).unwrap());
    assert_eq!(r["parts"], chat["text"], "text parts read as the string");
    assert_eq!(r["penalised"], want_penalised.as_str());
    assert_ne!(r["penalised"], r["unpenalised"]);
    assert_eq!(r["developer"], chat["text"], "developer is system");
    let answer = want.as_str();
    assert_eq!(r["n"]["texts"], serde_json::json!([answer, answer]));
    assert_eq!(r["n"]["indexes"], serde_json::json!([0, 1]));
    assert_eq!(r["n"]["usage"], serde_json::json!([5, 32, 37]));
    assert_eq!(r["n_stream"]["texts"], serde_json::json!([answer, answer]));
    assert_eq!(r["n_stream"]["usage"], serde_json::json!([5, 32, 37]));
    assert_eq!(
        r["n_stream"]["finishes"],
        serde_json::json!(["length", "length"])
    );
    // A seed moves by the choice's index; without one, each request draws
    // its own (32 tokens at temperature 1.5 do not repeat by chance).
    assert_eq!(r["seeded"]["choices"], r["seeded"]["alone"]);
    assert_ne!(r["unseeded"][0], r["unseeded"][1], "{}", r["unseeded"]);
    // A list of prompts: one choice each, in order, their prompts counted.
    assert_eq!(r["batch"]["texts"][1], answer);
    assert_eq!(r["batch"]["prompt_tokens"], 1 + 5);
    let ids = r["ids"].as_array().unwrap();
    assert_eq!(ids.len(), 3);
    assert!(
        ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2],
        "{ids:?}"
    );
    // Log-probabilities, as the openai client reads them.
    let l = &r["chat_logprobs"];
    let toks: Vec<&str> = l["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(toks.len() as u64, l["n"].as_u64().unwrap(), "{l}");
    assert_eq!(toks.concat(), l["text"].as_str().unwrap(), "{l}");
    for (k, t) in toks.iter().enumerate() {
        assert_eq!(l["top"][k].as_array().unwrap().len(), 2, "{l}");
        assert_eq!(l["top"][k][0], *t, "greedy: the most likely token: {l}");
        assert_eq!(l["top_lp"][k][0], l["logprobs"][k], "{l}");
        assert!(l["logprobs"][k].as_f64().unwrap() <= 0.0, "{l}");
    }
    let streamed = &r["chat_logprobs_stream"];
    assert_eq!(streamed["text"], l["text"]);
    let entries: Vec<Value> = toks
        .iter()
        .zip(l["logprobs"].as_array().unwrap())
        .map(|(t, p)| serde_json::json!([t, p]))
        .collect();
    assert_eq!(streamed["entries"], Value::Array(entries), "streamed alike");
    let c = &r["completion_logprobs"];
    assert_eq!(c["tokens"].as_array().unwrap().len(), 6, "{c}");
    assert_eq!(c["offsets"][0], "The capital of France is".len(), "{c}");
    assert_eq!(c["n_top"], serde_json::json!([1, 1, 1, 1, 1, 1]), "{c}");
    let joined = spelled(&c["tokens"]);
    assert_eq!(joined, c["text"].as_str().unwrap(), "{c}");
    // A stop string: the entries spell the text that goes out, without the
    // stopping token.
    let c = &r["stop_logprobs"];
    assert_eq!(c["finish"], "stop", "{c}");
    let joined = spelled(&c["tokens"]);
    assert_eq!(joined, c["text"].as_str().unwrap(), "{c}");
    assert!(!joined.is_empty() && !joined.contains('.'), "{c}");
    for (case, param) in [
        ("logprobs", "top_logprobs"),
        ("image", "messages"),
        ("tools", "tools"),
        ("json", "response_format"),
        ("penalty", "presence_penalty"),
        ("tool_message", "messages"),
    ] {
        let e = &r["refused"][case];
        assert_eq!(e[0], 400, "{case}: {e}");
        assert_eq!(e[1]["error"]["param"], param, "{case}: {e}");
    }

    // With the second shard's worker gone the model has a ready shard but
    // not every layer: /health turns 503 once the coordinator's poll sees it.
    cluster.workers[1].kill();
    let health = || {
        let out = Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .arg(format!("{base}/health"))
            .output()
            .ok()?;
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    wait_for("/health to say 503", Duration::from_secs(60), || async {
        (health()? == "503").then_some(())
    })
    .await
    .unwrap();
}

/// The text a list of log-probability tokens spells.
fn spelled(tokens: &Value) -> String {
    tokens
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect()
}

/// Runs a Python client script (arguments: the API's base URL, …): its
/// stdout JSON.
fn run_client(
    dir: &std::path::Path,
    name: &str,
    code: &str,
    args: &[&str],
    coord: &llama_cluster_tests::NodeProc,
) -> Value {
    let script = dir.join(name);
    std::fs::write(&script, code).unwrap();
    let mut child = Command::new("python3")
        .arg(&script)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 with the openai package (scripts/setup.sh installs it)");
    let deadline = Instant::now() + Duration::from_secs(180);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the openai client {name} did not finish within 180 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "client {name} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        coord.log()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn health(grpc_addr: &str, service: &str) -> Option<ServingStatus> {
    let ch = tonic::transport::Channel::from_shared(format!("http://{grpc_addr}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    let r = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(r.into_inner().status).ok()
}

/// A coordinator whose workers cannot be reached is not ready: health
/// NOT_SERVING, metrics say no worker answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_is_not_ready_without_a_serving_cluster() {
    let dir = test_dir("coordinator-unready");
    // A port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let coord = start_coordinator(&dir, &dead_addr, &[], &[]).unwrap();
    let grpc_addr = coord.ready["grpc_addr"].as_str().unwrap().to_string();
    let base = format!("http://{}", coord.ready["http_addr"].as_str().unwrap());
    // Wait for the first poll to be counted, then check.
    let text = wait_for("the first status poll", Duration::from_secs(20), || async {
        let t = scrape_url(&format!("{base}/metrics")).ok()?;
        (metric(&t, "llama_cluster_coordinator_workers") == Some(1.0)).then_some(t)
    })
    .await
    .unwrap();
    assert_eq!(
        metric(&text, "llama_cluster_coordinator_workers_reachable"),
        Some(0.0)
    );
    assert_eq!(
        metric(&text, "llama_cluster_coordinator_swarm_ready"),
        Some(0.0)
    );
    for service in ["", "llamacluster.v1.Coordinator"] {
        assert_eq!(
            health(&grpc_addr, service).await,
            Some(ServingStatus::NotServing),
            "{service:?}"
        );
    }
    // The HTTP health check says the same, with why.
    let out = Command::new("curl")
        .args(["-s", "--max-time", "30", "-w", "\n%{http_code}"])
        .arg(format!("{base}/health"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or_default();
    assert_eq!(code, "503", "{text}");
    let body: Value = serde_json::from_str(body).unwrap_or_default();
    assert_eq!(body["error"]["type"], "unavailable_error", "{text}");
    assert_eq!(body["error"]["code"], 503, "{text}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("not SWARM_READY"),
        "{text}"
    );
}
