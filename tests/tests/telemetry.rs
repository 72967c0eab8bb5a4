//! One Inference request through the coordinator and a 3-stage pipeline of
//! worker processes yields one OpenTelemetry trace: an in-test OTLP/gRPC
//! receiver (the collector's TraceService from `opentelemetry-proto`) gets
//! spans from the coordinator and every stage worker, all under one trace
//! id, linked parent to child across the process boundaries (gRPC metadata
//! and activation frames), with only the sampled decode steps traced.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llama_cluster_proto::v1::InferenceRequest;
use llama_cluster_proto::v1::coordinator_client::CoordinatorClient;
use llama_cluster_proto::v1::inference_response::Event;
use llama_cluster_tests::{
    NodeProc, PipelineCluster, split_with_cli, start_coordinator, test_dir, wait_for, worker_args,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;

/// One received span with the resource it came from.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    instance: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    attrs: HashMap<String, String>,
}

#[derive(Default, Clone)]
struct Receiver(Arc<Mutex<Vec<Got>>>);

fn attr_map(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                Some(AnyValue::IntValue(i)) => i.to_string(),
                Some(AnyValue::DoubleValue(d)) => d.to_string(),
                Some(AnyValue::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let res = attr_map(
                rs.resource
                    .as_ref()
                    .map(|r| r.attributes.as_slice())
                    .unwrap_or(&[]),
            );
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Got {
                        service: res.get("service.name").cloned().unwrap_or_default(),
                        instance: res.get("service.instance.id").cloned().unwrap_or_default(),
                        name: s.name.clone(),
                        trace_id: s.trace_id.clone(),
                        span_id: s.span_id.clone(),
                        parent: s.parent_span_id.clone(),
                        attrs: attr_map(&s.attributes),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts the in-test OTLP receiver; returns it and its endpoint URL.
async fn receiver() -> (Receiver, String, tokio::task::JoinHandle<()>) {
    let rx = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let svc = TraceServiceServer::new(rx.clone());
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    (rx, endpoint, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_across_coordinator_and_every_stage() {
    let dir = test_dir("telemetry");
    // The receiver.
    let (rx, endpoint, server) = receiver().await;

    // 3 stages, every second decode step traced in detail; spans sent every 200 ms.
    let manifest = split_with_cli(&dir.join("split"), 3).unwrap();
    let env = [("OTEL_BSP_SCHEDULE_DELAY", "200")];
    let cluster = PipelineCluster::start_with_env(
        &dir,
        &manifest,
        140,
        &["--otlp-endpoint", &endpoint, "--trace-decode-every", "2"],
        &env,
    )
    .await
    .unwrap();
    let workers = cluster.grpc_addrs();
    let coord = start_coordinator(&dir, &workers, &["--otlp-endpoint", &endpoint], &env).unwrap();

    // One request through the coordinator: 8 tokens, greedy.
    let grpc = coord.ready["grpc_addr"].as_str().unwrap().to_string();
    let mut client = CoordinatorClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let mut stream = client
        .inference(InferenceRequest {
            prompt: "The capital of France is".into(),
            max_tokens: 8,
            ignore_eos: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut tokens = 0;
    while let Some(m) = stream.message().await.unwrap() {
        if let Some(Event::Chunk(c)) = m.event {
            tokens += c.token_ids.len();
        }
    }
    assert_eq!(tokens, 8);

    // Decode steps run after tokens 1..7; steps 2, 4, 6 are traced.
    let peers: Vec<String> = cluster.workers.iter().map(|w| w.peer_id.clone()).collect();
    let last = peers[2].clone();
    let spans = wait_for(
        "the request's spans from the coordinator and every stage",
        Duration::from_secs(30),
        || {
            let rx = rx.clone();
            let (peers, last) = (peers.clone(), last.clone());
            async move {
                let all = rx.0.lock().unwrap().clone();
                let root = all
                    .iter()
                    .find(|s| {
                        s.service == "llama-coordinator" && s.name == "coordinator.Inference"
                    })?
                    .trace_id
                    .clone();
                let t: Vec<Got> = all.into_iter().filter(|s| s.trace_id == root).collect();
                let has =
                    |name: &str, inst: &str| t.iter().any(|s| s.name == name && s.instance == inst);
                let ok = t
                    .iter()
                    .any(|s| s.attrs.contains_key("gen_ai.operation.name"))
                    && peers.iter().all(|p| has("stage", p))
                    && t.iter().filter(|s| s.name == "decode_step").count() >= 3
                    && t.iter()
                        .filter(|s| s.name == "stage" && s.instance == last)
                        .count()
                        >= 5;
                ok.then_some(t)
            }
        },
    )
    .await
    .unwrap_or_else(|e| {
        let all = rx.0.lock().unwrap();
        let root = all
            .iter()
            .find(|s| s.name == "coordinator.Inference")
            .map(|s| s.trace_id.clone());
        let names: Vec<String> = all
            .iter()
            .filter(|s| Some(&s.trace_id) == root.as_ref())
            .map(|s| {
                format!(
                    "{}:{}:{}",
                    s.instance,
                    s.name,
                    s.attrs.get("pos").cloned().unwrap_or_default()
                )
            })
            .collect();
        panic!("{e}; received {names:?}\n{}", cluster.workers[0].log())
    });
    // Give late exports a moment, then take the final set of this trace.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let trace_id = spans[0].trace_id.clone();
    let all = rx.0.lock().unwrap().clone();
    let t: Vec<&Got> = all.iter().filter(|s| s.trace_id == trace_id).collect();

    // Every pipeline span of the run belongs to this one trace.
    for name in ["stage", "hop", "prefill", "decode_step", "route_planning"] {
        let other: Vec<_> = all
            .iter()
            .filter(|s| s.name == name && s.trace_id != trace_id)
            .collect();
        assert!(
            other.is_empty(),
            "{name} spans outside the trace: {other:?}"
        );
    }
    // Spans from the coordinator and from each of the 3 stage workers.
    let instances: HashSet<&str> = t.iter().map(|s| s.instance.as_str()).collect();
    assert!(t.iter().any(|s| s.service == "llama-coordinator"));
    for p in &peers {
        assert!(instances.contains(p.as_str()), "no span from worker {p}");
    }
    // One root; every other span's parent is in the trace.
    let by_id: HashMap<&[u8], &Got> = t.iter().map(|s| (s.span_id.as_slice(), *s)).collect();
    let roots: Vec<_> = t.iter().filter(|s| s.parent.is_empty()).collect();
    assert_eq!(roots.len(), 1, "roots: {roots:?}");
    assert_eq!(roots[0].service, "llama-coordinator");
    for s in &t {
        if !s.parent.is_empty() {
            assert!(
                by_id.contains_key(s.parent.as_slice()),
                "parent of {} on {} is not in the trace",
                s.name,
                s.instance
            );
        }
    }
    // Cross-process links: the driver's gRPC span is a child of a
    // coordinator span, each remote stage a child of the previous worker's hop.
    let parent_of = |s: &Got| by_id.get(s.parent.as_slice()).copied();
    // The request span, named by the GenAI conventions: "{operation} {model}".
    let inference = t
        .iter()
        .find(|s| s.attrs.contains_key("gen_ai.operation.name"))
        .expect("inference span");
    assert!(
        inference.name.starts_with("text_completion "),
        "{}",
        inference.name
    );
    // The coordinator picked some worker as the driver.
    assert!(
        peers.contains(&inference.instance),
        "{}",
        inference.instance
    );
    let mut up = parent_of(inference);
    let mut crossed = false;
    for _ in 0..10 {
        match up {
            Some(p) if p.service == "llama-coordinator" => {
                crossed = true;
                break;
            }
            Some(p) => up = parent_of(p),
            None => break,
        }
    }
    assert!(
        crossed,
        "the driver's spans do not lead up to the coordinator"
    );
    for (i, p) in peers.iter().enumerate().skip(1) {
        let stages: Vec<_> = t
            .iter()
            .filter(|s| s.name == "stage" && &s.instance == p)
            .collect();
        for s in &stages {
            let hop = parent_of(s).expect("stage without parent");
            assert_eq!(hop.name, "hop");
            assert_eq!(hop.instance, peers[i - 1], "stage on worker {i}");
        }
    }
    // Only the sampled decode steps: prefill at position 0 plus 3 decode steps
    // reach the last stage (the session close also starts at position 0).
    let steps = t.iter().filter(|s| s.name == "decode_step").count();
    assert_eq!(steps, 3, "decode_step spans");
    let positions: HashSet<&str> = t
        .iter()
        .filter(|s| s.name == "stage" && s.instance == last)
        .filter_map(|s| s.attrs.get("pos").map(String::as_str))
        .collect();
    assert_eq!(
        positions.len(),
        4,
        "positions at the last stage: {positions:?}"
    );
    // GenAI semantic conventions on the request span.
    assert_eq!(
        inference
            .attrs
            .get("gen_ai.usage.output_tokens")
            .map(String::as_str),
        Some("8")
    );
    assert!(inference.attrs.contains_key("gen_ai.request.model"));
    assert!(inference.attrs.contains_key("gen_ai.usage.input_tokens"));
    // llama.cpp work and sampling are spans on the stage threads: one
    // sampling per sampled step (prefill + 3 traced decode steps), under the
    // last stage's spans.
    let sampling: Vec<_> = t.iter().filter(|s| s.name == "sampling").collect();
    assert_eq!(sampling.len(), 4, "{sampling:?}");
    for s in &sampling {
        assert_eq!(s.instance, last);
        assert_eq!(parent_of(s).map(|p| p.name.as_str()), Some("stage"));
    }
    assert!(t.iter().filter(|s| s.name == "llama.decode").count() >= 3 * 4);
    // Hops carry their bytes and latency.
    let hop = t.iter().find(|s| s.name == "hop").expect("hop span");
    assert!(hop.attrs.contains_key("bytes_out") && hop.attrs.contains_key("latency_us"));

    drop(coord);
    drop(cluster);
    server.abort();
}

/// A LoadShard that fetches the shard through the swarm continues the
/// caller's trace (W3C `traceparent` in the gRPC metadata) down to the
/// download and one span per peer with its pieces and bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_download_is_traced_per_peer_under_the_callers_trace() {
    let dir = test_dir("telemetry-torrent");
    let (rx, endpoint, server) = receiver().await;
    let manifest = split_with_cli(&dir.join("split"), 3).unwrap();
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let shard = &m["shards"][1];
    let (shard_id, hash, size) = (
        shard["id"].as_str().unwrap().to_string(),
        shard["hash"].as_str().unwrap().to_string(),
        shard["size"].as_u64().unwrap(),
    );
    let boot = llama_cluster_tests::start_bootstrap(&dir).unwrap();
    let b = boot.addr("quic-v1");
    let env = [("OTEL_BSP_SCHEDULE_DELAY", "200")];
    let start = |name: &str, host: &str, manifest: &std::path::Path| {
        let mut args = worker_args(host, &[&b], None);
        args.extend([
            "--manifest".into(),
            manifest.display().to_string(),
            "--otlp-endpoint".into(),
            endpoint.clone(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        NodeProc::start_with_env(&dir, name, &args, &env).unwrap()
    };
    let seeder = start("seeder", "127.0.0.150", &manifest);
    // The leecher has the manifest but none of the files.
    let bare = dir.join("leecher-manifest");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(&manifest, bare.join("manifest.json")).unwrap();
    let leecher = start("leecher", "127.0.0.151", &bare.join("manifest.json"));
    wait_for(
        "the seeder to seed the shard",
        Duration::from_secs(60),
        || async {
            let st = seeder.status().await.ok()?;
            st.torrents
                .iter()
                .any(|t| t.file_hash == hash && t.state == "seeding")
                .then_some(())
        },
    )
    .await
    .unwrap();

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut req = tonic::Request::new(llama_cluster_proto::v1::LoadShardRequest {
        shard_id: shard_id.clone(),
        ..Default::default()
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    let r = leecher
        .client()
        .await
        .unwrap()
        .load_shard(req)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", leecher.log()))
        .into_inner();
    assert_eq!(r.state, "ready");

    let want: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let t = wait_for("the download's spans", Duration::from_secs(30), || {
        let (rx, want) = (rx.clone(), want.clone());
        async move {
            let t: Vec<Got> =
                rx.0.lock()
                    .unwrap()
                    .iter()
                    .filter(|s| s.trace_id == want)
                    .cloned()
                    .collect();
            (t.iter().any(|s| s.name == "torrent.download")
                && t.iter().any(|s| s.name == "torrent.peer")
                && t.iter().any(|s| s.name == "grpc.server"))
            .then_some(t)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", leecher.log()));
    let by_id: HashMap<&[u8], &Got> = t.iter().map(|s| (s.span_id.as_slice(), s)).collect();
    // The leecher's server span hangs under the caller's span.
    let server_span = t
        .iter()
        .find(|s| s.name == "grpc.server")
        .expect("server span");
    assert_eq!(
        server_span.parent,
        vec![0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
    );
    assert_eq!(server_span.instance, leecher.peer_id);
    let dl = t.iter().find(|s| s.name == "torrent.download").unwrap();
    assert_eq!(dl.attrs.get("file_hash"), Some(&hash));
    assert_eq!(dl.attrs.get("bytes_fetched"), Some(&size.to_string()));
    let pieces = size.div_ceil(llama_worker::torrent::meta::piece_size_for(size));
    assert_eq!(dl.attrs.get("pieces_total"), Some(&pieces.to_string()));
    // The download leads up to the server span.
    let mut up = by_id.get(dl.parent.as_slice()).copied();
    for _ in 0..10 {
        match up {
            Some(p) if p.name == "grpc.server" => break,
            Some(p) => up = by_id.get(p.parent.as_slice()).copied(),
            None => break,
        }
    }
    assert!(
        up.is_some(),
        "torrent.download does not lead to the server span"
    );
    // One peer span: the seeder, with every piece and byte.
    let peer = t.iter().find(|s| s.name == "torrent.peer").unwrap();
    assert_eq!(peer.parent, dl.span_id);
    assert_eq!(peer.attrs.get("peer"), Some(&seeder.peer_id));
    assert_eq!(peer.attrs.get("pieces"), Some(&pieces.to_string()));
    assert_eq!(peer.attrs.get("bytes"), Some(&size.to_string()));
    assert_eq!(peer.attrs.get("bad_pieces").map(String::as_str), Some("0"));
    server.abort();
}
