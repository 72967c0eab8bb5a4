//! The coordinator's dashboard in a real browser: headless Chromium (driven
//! by playwright-core from node) loads `/` in front of a real 2-stage
//! cluster; once its scripts have run, the DOM has one row per worker with
//! its peer id and ready shard, a layer bar with every layer served once by
//! the worker holding it, and the chat box's streamed answer, which is what
//! the pipeline answers; the page's token count is the coordinator's own
//! metric. A screenshot is saved next to the test's logs.

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
    let mut stream = cluster.workers[0]
        .client()
        .await
        .unwrap()
        .inference(InferenceRequest {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: QUESTION.into(),
            }],
            max_tokens: MAX_TOKENS,
            ..Default::default()
        })
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
    let profile = dir.join("chromium-profile");
    std::fs::create_dir_all(&profile).unwrap();
    let out = clients::run(
        Command::new("node")
            .env("NODE_PATH", clients::node_modules())
            .arg(clients::script("dashboard.js"))
            .arg(&base)
            .arg(&shot)
            .arg(&profile)
            .args(["2", QUESTION, &MAX_TOKENS.to_string()]),
        Duration::from_secs(180),
    )
    .expect("node runs");
    assert!(
        out.ok,
        "the browser (scripts/setup.sh installs chromium and playwright-core): {}\n{}",
        out.all(),
        coord.log()
    );
    let page: Value =
        serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", out.all()));
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
}
