//! The coordinator's dashboard in a real browser: headless Chromium (driven
//! by playwright-core from node) loads `/` in front of a real 2-stage
//! cluster; once its scripts have run, the DOM has one row per worker with
//! its peer id and ready shard, a layer bar with every layer served once by
//! the worker holding it, and the chat box's streamed answer, which is what
//! the pipeline answers; the page's token count is the coordinator's own
//! metric. A screenshot is saved next to the test's logs. In front of a
//! coordinator with an API token, the chat without the key shows the 401
//! message, and with the key typed in (kept across a reload) it answers.

use std::process::Command;
use std::time::Duration;

use llama_cluster_proto::v1::inference_response::Event;
use llama_cluster_proto::v1::{ChatMessage, InferenceRequest};
use llama_cluster_tests::clients;
use llama_cluster_tests::{
    PipelineCluster, scrape_url, split_with_cli, start_coordinator, test_dir,
};
use serde_json::Value;

const QUESTION: &str = "What is the capital of France?";
const MAX_TOKENS: u32 = 24;

/// What the pipeline of `w` answers to QUESTION (greedy), with `token`.
async fn pipeline_answer(w: &llama_cluster_tests::NodeProc, token: Option<&str>) -> String {
    let mut req = tonic::Request::new(InferenceRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: QUESTION.into(),
        }],
        max_tokens: MAX_TOKENS,
        ..Default::default()
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let mut stream = w
        .client()
        .await
        .unwrap()
        .inference(req)
        .await
        .unwrap()
        .into_inner();
    let mut want = String::new();
    while let Some(m) = stream.message().await.unwrap() {
        if let Some(Event::Chunk(c)) = m.event {
            want.push_str(&c.text);
        }
    }
    assert!(!want.is_empty());
    want
}

/// `tests/clients/<script>` in node (headless Chromium through
/// playwright-core) with `args` and `env`: the JSON it printed.
fn run_node(script: &str, args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> Value {
    let mut cmd = Command::new("node");
    cmd.env("NODE_PATH", clients::node_modules())
        .arg(clients::script(script))
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = clients::run(&mut cmd, Duration::from_secs(180)).expect("node runs");
    assert!(
        out.ok,
        "the browser (scripts/setup.sh installs chromium and playwright-core): {}",
        out.all(),
    );
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", out.all()))
}

/// tests/clients/dashboard.js in headless Chromium against `base`: what the
/// page showed.
fn run_page(base: &str, dir: &std::path::Path, workers: usize, env: &[(&str, &str)]) -> Value {
    let shot = dir.join("dashboard.png");
    let profile = dir.join("chromium-profile");
    std::fs::create_dir_all(&profile).unwrap();
    let (workers, max_tokens) = (workers.to_string(), MAX_TOKENS.to_string());
    let args = [
        base.as_ref(),
        shot.as_os_str(),
        profile.as_os_str(),
        workers.as_ref(),
        QUESTION.as_ref(),
        max_tokens.as_ref(),
    ];
    run_node("dashboard.js", &args, env)
}

/// A web page of another origin: a listener on 127.0.0.1 answering every
/// request with a small HTML page (a thread of this test process). Returns
/// its port.
fn page_server() -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let body = "<!doctype html><title>a chat front end</title><p>elsewhere</p>";
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

/// tests/clients/cors.js: each page in `pages` asks `base` for a streamed
/// chat answer from the browser (with `key`); what each got.
fn run_cors(base: &str, dir: &std::path::Path, key: &str, pages: &[String]) -> Vec<Value> {
    let profile = dir.join("chromium-cors-profile");
    std::fs::create_dir_all(&profile).unwrap();
    let max_tokens = MAX_TOKENS.to_string();
    let mut args = vec![
        base.as_ref(),
        profile.as_os_str(),
        key.as_ref(),
        QUESTION.as_ref(),
        max_tokens.as_ref(),
    ];
    args.extend(pages.iter().map(std::ffi::OsStr::new));
    match run_node("cors.js", &args, &[]) {
        Value::Array(v) => v,
        other => panic!("cors.js printed {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_chat_sends_the_api_key() {
    const API: &str = "dashboard-api-key-7";
    let dir = test_dir("dashboard-key");
    let manifest = split_with_cli(&dir.join("split"), 1).unwrap();
    let env = [("LLAMA_CLUSTER_API_TOKEN", API)];
    let cluster = PipelineCluster::start_with_env(&dir, &manifest, 178, &[], &env)
        .await
        .unwrap();
    // A chat front end served from another origin, the only one allowed.
    let port = page_server();
    let allowed = format!("http://127.0.0.1:{port}");
    let coord = start_coordinator(
        &dir,
        &cluster.grpc_addrs(),
        &["--poll-ms", "300", "--allowed-origins", &allowed],
        &env,
    )
    .unwrap();
    let base = format!("http://{}", coord.ready["http_addr"].as_str().unwrap());
    let want = pipeline_answer(&cluster.workers[0], Some(API)).await;

    // From the allowed origin, the browser's fetch streams the answer; from
    // another (the same page server as localhost), the browser refuses it.
    let got = run_cors(
        &base,
        &dir,
        API,
        &[format!("{allowed}/"), format!("http://localhost:{port}/")],
    );
    println!("{got:?}");
    assert_eq!(got[0]["origin"], allowed.as_str(), "{got:?}");
    assert_eq!(got[0]["ok"], true, "{got:?}");
    assert_eq!(got[0]["status"], 200, "{got:?}");
    assert_eq!(got[0]["text"], want.as_str(), "{got:?}");
    assert_eq!(got[1]["ok"], false, "{got:?}");
    // The dashboard's JSON and the metrics are not for other origins.
    for g in &got {
        assert_eq!(g["private"], serde_json::json!([]), "{got:?}");
    }
    assert!(
        got[1]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("Failed to fetch"),
        "{got:?}"
    );

    let page = run_page(&base, &dir, 1, &[("DASHBOARD_API_KEY", API)]);
    println!("{}", serde_json::to_string_pretty(&page).unwrap());
    // Without the key: the 401, said in the page.
    let refused = &page["unauthorized"];
    assert_eq!(refused["class"], "msg error", "{refused}");
    assert_eq!(refused["status"], "401", "{refused}");
    let text = refused["text"].as_str().unwrap();
    assert!(
        text.contains("401: the coordinator needs an API key")
            && text.contains("enter it in the API key field")
            && text.contains("needs the API token"),
        "{text}"
    );
    // The browser's own note of the refused request, nothing else.
    for e in page["errors_before_reload"].as_array().unwrap() {
        assert!(e.as_str().unwrap_or_default().contains("401"), "{e}");
    }
    // The key typed once is kept, and the chat answers with it.
    assert_eq!(page["key_after_reload"], API);
    assert_eq!(page["errors"], serde_json::json!([]), "no script errors");
    assert_eq!(page["answer_class"], "msg assistant", "{}", page["answer"]);
    assert_eq!(page["answer"], want.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_workers_layers_and_streams_a_chat_answer() {
    let dir = test_dir("dashboard");
    let manifest = split_with_cli(&dir.join("split"), 2).unwrap();
    let cluster = PipelineCluster::start(&dir, &manifest, 165, &[])
        .await
        .unwrap();
    let coord = start_coordinator(&dir, &cluster.grpc_addrs(), &["--poll-ms", "300"], &[]).unwrap();
    let base = format!("http://{}", coord.ready["http_addr"].as_str().unwrap());

    // What the pipeline answers to the chat message (greedy), asked directly.
    let want = pipeline_answer(&cluster.workers[0], None).await;

    // The JSON the page reads.
    let api: Value =
        serde_json::from_str(&scrape_url(&format!("{base}/api/cluster")).unwrap()).unwrap();
    assert_eq!(api["workers"].as_array().map(Vec::len), Some(2), "{api}");
    let m: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let shards = m["shards"].as_array().unwrap();
    let n_layers = shards
        .iter()
        .filter_map(|s| s["layer_end"].as_u64())
        .max()
        .unwrap()
        + 1;
    assert_eq!(
        api["layers"].as_array().map(Vec::len),
        Some(n_layers as usize)
    );

    let shot = dir.join("dashboard.png");
    let page = run_page(&base, &dir, 2, &[]);
    println!("{}", serde_json::to_string_pretty(&page).unwrap());
    // Kept where a person can look at it after the run.
    let _ = std::fs::copy(&shot, dir.join("../dashboard-latest.png"));

    assert_eq!(page["errors"], serde_json::json!([]), "no script errors");
    assert_eq!(page["ready"], "SWARM_READY");
    assert_eq!(page["models"], "smollm2-135m-instruct");
    let rows = page["workers"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for w in &cluster.workers {
        let row = rows
            .iter()
            .find(|r| r["peer"] == w.peer_id.as_str())
            .unwrap_or_else(|| panic!("no row for {}: {rows:?}", w.peer_id));
        assert_eq!(row["addr"], w.grpc_addr.as_str());
        let cells: Vec<&str> = row["cells"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(cells[2].contains('×'), "transports: {cells:?}");
        assert!(cells[3].contains("GiB"), "memory: {cells:?}");
        assert!(cells[4].contains("layers"), "shard: {cells:?}");
        assert_eq!(cells[5], "ready");
    }
    // The layer bar: every layer served once, by the row holding its shard,
    // in that row's colour; the two shards in two colours.
    let layers = page["layers"].as_array().unwrap();
    assert_eq!(layers.len(), n_layers as usize);
    let mut colors = std::collections::BTreeSet::new();
    for (l, layer) in layers.iter().enumerate() {
        assert_eq!(layer["replicas"], 1, "layer {l}: {layer}");
        let row = layer["workers"][0].as_u64().unwrap() as usize;
        let shard_cell = rows[row]["cells"][4].as_str().unwrap_or_default();
        let s = shards
            .iter()
            .find(|s| shard_cell.starts_with(s["id"].as_str().unwrap_or("?")))
            .unwrap_or_else(|| panic!("row {row} names no shard: {shard_cell}"));
        let (a, b) = (
            s["layer_start"].as_u64().unwrap(),
            s["layer_end"].as_u64().unwrap(),
        );
        assert!(
            (a..=b).contains(&(l as u64)),
            "layer {l} drawn for {shard_cell}"
        );
        colors.insert(layer["colors"][0].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(colors.len(), 2, "{colors:?}");
    assert!(
        page["legend"]
            .as_str()
            .unwrap()
            .contains("1 replica(s) per layer")
    );
    assert_eq!(page["downloads"], "none in progress");

    // The chat box streamed the pipeline's answer through the OpenAI API.
    assert_eq!(page["answer_class"], "msg assistant", "{}", page["answer"]);
    assert_eq!(page["answer"], want.as_str());
    let status = page["chat_status"].as_str().unwrap();
    let tokens: u64 = status
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("chat status: {status}"));
    assert!(tokens > 0 && tokens <= MAX_TOKENS as u64, "{status}");
    // The coordinator's metrics: that one request, nothing in flight.
    assert_eq!(page["tokens_total"], tokens.to_string().as_str());
    assert_eq!(page["in_flight"], "0");
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "screenshot"
    );

    // By default any origin may call the API from the browser, as
    // llama-server allows: a page served elsewhere gets the answer.
    let elsewhere = format!("http://localhost:{}/", page_server());
    let got = run_cors(&base, &dir, "", &[elsewhere]);
    assert_eq!(got[0]["ok"], true, "{got:?}");
    assert_eq!(got[0]["private"], serde_json::json!([]), "{got:?}");
    assert_eq!(got[0]["text"], want.as_str(), "{got:?}");
}
