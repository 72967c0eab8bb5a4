//! Bearer tokens on gRPC and the OpenAI API (#18, part 2): a 2-stage
//! cluster and a coordinator with an admin and an API token. Calls of each
//! class without a token, with a wrong one and with the right one; status,
//! health and reflection stay open; the coordinator passes the API token
//! on to its drivers; the Python `openai` client without and with
//! `api_key`.

use std::process::Command;

use llama_cluster_proto::v1::{
    GetStatusRequest, InferenceRequest, LoadShardRequest, RelayRequest, SyncTorrentsRequest,
};
use llama_cluster_tests::{PipelineCluster, split_with_cli, start_coordinator, test_dir};

const ADMIN: &str = "admin-secret-1";
const API: &str = "api-secret-2";

fn with<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

const CLIENT: &str = r#"
import json, sys
from openai import OpenAI, AuthenticationError
base, key = sys.argv[1], sys.argv[2]
out = {}
for name, k in [("without", "not-the-key"), ("with", key)]:
    c = OpenAI(base_url=base + "/v1", api_key=k, max_retries=0, timeout=120)
    try:
        r = c.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is", max_tokens=8)
        out[name] = {"status": 200, "text": r.choices[0].text}
    except AuthenticationError as e:
        out[name] = {"status": e.status_code, "message": str(e)}
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_gate_each_class_of_calls() {
    let dir = test_dir("auth");
    let manifest = split_with_cli(&dir.join("split"), 2).unwrap();
    let env = [
        ("LLAMA_CLUSTER_ADMIN_TOKEN", ADMIN),
        ("LLAMA_CLUSTER_API_TOKEN", API),
    ];
    let cluster = PipelineCluster::start_with_env(&dir, &manifest, 190, &[], &env)
        .await
        .unwrap();
    let w = &cluster.workers[1];
    let mut c = w.client().await.unwrap();
    let code = |r: Result<tonic::Status, tonic::Status>| match r {
        Ok(s) | Err(s) => s.code(),
    };
    let infer = || InferenceRequest {
        prompt: "The capital of France is".into(),
        max_tokens: 4,
        ..Default::default()
    };
    let denied = tonic::Code::Unauthenticated;

    // Inference: the API token (or the admin one).
    for (token, want_ok) in [
        (None, false),
        (Some("wrong"), false),
        (Some(API), true),
        (Some(ADMIN), true),
    ] {
        let r = c.inference(with(infer(), token)).await;
        match (r, want_ok) {
            (Ok(_), true) => {}
            (Err(e), false) => {
                assert_eq!(e.code(), denied, "{e:?}");
                assert!(e.message().contains("the API token"), "{}", e.message());
            }
            (r, _) => panic!("inference with {token:?}: {:?}", r.map(|_| ())),
        }
    }
    // Mutating calls: the admin token only.
    let load = || LoadShardRequest {
        shard_id: cluster.shard_ids[1].clone(),
        ..Default::default()
    };
    for token in [None, Some("wrong"), Some(API)] {
        let e = c.load_shard(with(load(), token)).await.unwrap_err();
        assert_eq!(e.code(), denied, "LoadShard with {token:?}: {e:?}");
        assert!(e.message().contains("the admin token"), "{}", e.message());
    }
    let r = c
        .load_shard(with(load(), Some(ADMIN)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, "ready");
    let fetch = |f| SyncTorrentsRequest { fetch_missing: f };
    assert_eq!(
        code(
            c.sync_torrents(with(fetch(true), Some(API)))
                .await
                .map(|_| tonic::Status::ok(""))
        ),
        denied
    );
    c.sync_torrents(with(fetch(true), Some(ADMIN)))
        .await
        .unwrap();
    // Reading the catalog is open.
    c.sync_torrents(with(fetch(false), None)).await.unwrap();
    let relay = || RelayRequest {
        to_peer_id: cluster.workers[0].peer_id.clone(),
        json: r#"{"message": "hi"}"#.into(),
        ..Default::default()
    };
    assert_eq!(
        code(
            c.relay(with(relay(), None))
                .await
                .map(|_| tonic::Status::ok(""))
        ),
        denied
    );
    c.relay(with(relay(), Some(ADMIN))).await.unwrap();
    // Status and health stay open, for probes.
    c.get_status(with(GetStatusRequest {}, None)).await.unwrap();
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", w.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();

    // The coordinator asks clients for the API token and passes it on.
    let workers = cluster.grpc_addrs();
    let coord = start_coordinator(&dir, &workers, &[], &env).unwrap();
    let addr = coord.ready["grpc_addr"].as_str().unwrap().to_string();
    let mut cc = llama_cluster_proto::v1::coordinator_client::CoordinatorClient::connect(format!(
        "http://{addr}"
    ))
    .await
    .unwrap();
    let e = cc.inference(with(infer(), None)).await.unwrap_err();
    assert_eq!(e.code(), denied, "{e:?}");
    cc.inference(with(infer(), Some(API))).await.unwrap();

    let base = format!("http://{}", coord.ready["http_addr"].as_str().unwrap());
    let script = dir.join("client.py");
    std::fs::write(&script, CLIENT).unwrap();
    let out = Command::new("timeout")
        .args(["120", "python3"])
        .arg(&script)
        .args([&base, API])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["without"]["status"], 401, "{v}");
    assert!(
        v["without"]["message"]
            .as_str()
            .unwrap()
            .contains("wrong token"),
        "{v}"
    );
    assert_eq!(v["with"]["status"], 200, "{v}");
    assert!(!v["with"]["text"].as_str().unwrap().is_empty(), "{v}");
}
