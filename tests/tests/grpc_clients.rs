//! The gRPC servers answer the clients people already use, not only tonic:
//! grpcurl 1.8.6 (it speaks only `grpc.reflection.v1alpha`) lists and
//! describes the services, checks health and streams `Inference` by name,
//! on a worker and on the coordinator; Python's grpcio does reflection
//! (grpcio-reflection, v1alpha too), health (grpcio-health-checking) and a
//! typed streaming `Inference` through stubs compiled from the .proto files
//! with grpcio-tools at test time. A tonic client with reflection v1 checks
//! that the newer version is still served.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use llama_cluster_proto::v1::InferenceRequest;
use llama_cluster_proto::v1::inference_response::Event;
use llama_cluster_tests::clients::{self, Output};
use llama_cluster_tests::{PipelineCluster, split_with_cli, start_coordinator, test_dir, wait_for};
use serde_json::Value;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const PROMPT: &str = "The capital of France is";
const MAX_TOKENS: u32 = 8;

/// `grpcurl -plaintext [-d data] addr args…`, bounded.
fn grpcurl(bin: &Path, addr: &str, data: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args(["-plaintext", "-max-time", "60"]);
    if let Some(d) = data {
        cmd.args(["-d", d]);
    }
    cmd.arg(addr).args(args);
    clients::run(&mut cmd, Duration::from_secs(90)).expect("grpcurl runs")
}

/// The messages grpcurl printed (one JSON object after another).
fn messages(out: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(out)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("grpcurl printed no JSON messages ({e}):\n{out}"))
}

/// Text and stats of an Inference stream as grpcurl printed it.
fn inference_text(out: &Output) -> (String, Value) {
    assert!(out.ok, "Inference through grpcurl: {}", out.all());
    let msgs = messages(&out.stdout);
    let text = msgs
        .iter()
        .filter_map(|m| m["chunk"]["text"].as_str())
        .collect::<String>();
    let stats = msgs
        .iter()
        .find(|m| m.get("stats").is_some())
        .map(|m| m["stats"].clone())
        .unwrap_or_else(|| panic!("no stats message: {}", out.stdout));
    (text, stats)
}

/// grpcurl against one server: list, describe, health, streaming Inference.
fn check_with_grpcurl(bin: &Path, addr: &str, service: &str, want: &str) {
    let list = grpcurl(bin, addr, None, &["list"]);
    assert!(list.ok, "grpcurl list on {addr}: {}", list.all());
    let services: Vec<&str> = list.stdout.lines().map(str::trim).collect();
    for s in [service, "grpc.health.v1.Health"] {
        assert!(services.contains(&s), "{s} not listed: {services:?}");
    }
    // Only what the server serves: a worker is no coordinator and back.
    for other in ["llamacluster.v1.Worker", "llamacluster.v1.Coordinator"] {
        assert!(
            other == service || !services.contains(&other),
            "{other} listed on {addr}, which does not serve it: {services:?}"
        );
    }
    let methods = grpcurl(bin, addr, None, &["list", service]);
    assert!(
        methods.stdout.contains(&format!("{service}.Inference")),
        "{}",
        methods.all()
    );
    let d = grpcurl(bin, addr, None, &["describe", service]);
    assert!(d.ok, "describe {service}: {}", d.all());
    assert!(
        d.stdout.contains("is a service")
            && d.stdout.contains(
                "rpc Inference ( .llamacluster.v1.InferenceRequest ) returns ( stream .llamacluster.v1.InferenceResponse )"
            ),
        "{}",
        d.stdout
    );
    let m = grpcurl(
        bin,
        addr,
        None,
        &["describe", "llamacluster.v1.InferenceRequest"],
    );
    assert!(
        m.stdout.contains("is a message") && m.stdout.contains("uint32 max_tokens = 3;"),
        "{}",
        m.all()
    );
    for svc in ["", service] {
        let h = grpcurl(
            bin,
            addr,
            Some(&format!(r#"{{"service":"{svc}"}}"#)),
            &["grpc.health.v1.Health/Check"],
        );
        assert!(h.ok, "health {svc:?} on {addr}: {}", h.all());
        assert_eq!(messages(&h.stdout)[0]["status"], "SERVING", "{svc:?}");
    }
    let data = format!(r#"{{"prompt":"{PROMPT}","max_tokens":{MAX_TOKENS}}}"#);
    let out = grpcurl(bin, addr, Some(&data), &[&format!("{service}/Inference")]);
    let (text, stats) = inference_text(&out);
    assert_eq!(text, want, "grpcurl {service}/Inference on {addr}");
    // grpcurl prints protobuf JSON names (camelCase).
    assert_eq!(stats["generatedTokens"], MAX_TOKENS, "{stats}");
    assert!(
        messages(&out.stdout).len() > 2,
        "streamed in several messages"
    );
}

/// The Python clients against one server.
fn check_with_python(dir: &Path, addr: &str, service: &str, want: &str) {
    let stubs = dir.join(format!(
        "stubs-{}",
        service.rsplit('.').next().unwrap_or("x")
    ));
    std::fs::create_dir_all(&stubs).unwrap();
    let out = clients::run(
        Command::new("python3")
            .arg(clients::script("grpc_clients.py"))
            .arg(clients::proto_dir())
            .arg(&stubs)
            .args([addr, service, PROMPT, &MAX_TOKENS.to_string()]),
        Duration::from_secs(120),
    )
    .expect("python3 runs");
    assert!(
        out.ok,
        "python grpcio clients (scripts/setup.sh installs them): {}",
        out.all()
    );
    let r: Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.all()));
    println!("python against {service}: {r}");
    let services: Vec<&str> = r["reflection"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(services.contains(&service), "{services:?}");
    assert!(services.contains(&"grpc.health.v1.Health"), "{services:?}");
    let inf = &r["reflection"]["methods"]["Inference"];
    assert_eq!(inf["input"], "llamacluster.v1.InferenceRequest");
    assert_eq!(inf["output"], "llamacluster.v1.InferenceResponse");
    assert!(
        inf["fields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "max_tokens"),
        "{inf}"
    );
    assert_eq!(r["health"][""], "SERVING");
    assert_eq!(r["health"][service], "SERVING");
    assert_eq!(
        r["inference"]["text"], want,
        "typed Python client on {service}"
    );
    assert_eq!(r["inference"]["stats"]["generated_tokens"], MAX_TOKENS);
    assert!(r["inference"]["chunks"].as_u64().unwrap_or(0) > 1);
    assert!(
        std::fs::read_dir(stubs.join("llamacluster/v1"))
            .map(|d| d.count() >= 4)
            .unwrap_or(false),
        "stubs generated at test time"
    );
}

/// Reflection v1 (what tonic and newer grpcurl speak) is still served.
async fn reflection_v1_lists(addr: &str) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = c
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    match stream
        .message()
        .await
        .unwrap()
        .and_then(|m| m.message_response)
    {
        Some(MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_and_python_clients_on_a_worker_and_the_coordinator() {
    let bin = clients::grpcurl().unwrap();
    let dir = test_dir("grpc-clients");
    let manifest = split_with_cli(&dir.join("split"), 2).unwrap();
    let cluster = PipelineCluster::start(&dir, &manifest, 150, &[])
        .await
        .unwrap();
    let coord = start_coordinator(&dir, &cluster.grpc_addrs(), &["--poll-ms", "300"], &[]).unwrap();
    let coord_addr = coord.ready["grpc_addr"].as_str().unwrap().to_string();
    let worker_addr = cluster.workers[0].grpc_addr.clone();

    // What the pipeline answers, asked through tonic.
    let mut stream = cluster.workers[0]
        .client()
        .await
        .unwrap()
        .inference(InferenceRequest {
            prompt: PROMPT.into(),
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

    check_with_grpcurl(&bin, &worker_addr, "llamacluster.v1.Worker", &want);

    // The coordinator is SERVING once it saw the cluster SWARM_READY
    // (asked through tonic here; grpcurl asks below).
    wait_for("coordinator SERVING", Duration::from_secs(30), || async {
        let ch = tonic::transport::Channel::from_shared(format!("http://{coord_addr}"))
            .ok()?
            .connect()
            .await
            .ok()?;
        let r = HealthClient::new(ch)
            .check(HealthCheckRequest::default())
            .await
            .ok()?;
        (r.into_inner().status == ServingStatus::Serving as i32).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", coord.log()));
    check_with_grpcurl(&bin, &coord_addr, "llamacluster.v1.Coordinator", &want);
    check_with_python(&dir, &worker_addr, "llamacluster.v1.Worker", &want);
    check_with_python(&dir, &coord_addr, "llamacluster.v1.Coordinator", &want);

    for addr in [&worker_addr, &coord_addr] {
        let names = reflection_v1_lists(addr).await;
        for s in [
            "grpc.reflection.v1.ServerReflection",
            "grpc.health.v1.Health",
        ] {
            assert!(names.iter().any(|n| n == s), "{s} on {addr}: {names:?}");
        }
        let ours = if addr == &worker_addr {
            "llamacluster.v1.Worker"
        } else {
            "llamacluster.v1.Coordinator"
        };
        let mut want: Vec<&str> = vec![
            ours,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ];
        want.sort();
        let mut got: Vec<&str> = names.iter().map(String::as_str).collect();
        got.sort();
        assert_eq!(got, want, "services listed on {addr}");
    }
}
