//! The worker swarm, end to end: real `llama-worker` processes on 127.0.0.x
//! talking libp2p (QUIC/TCP), discovered through a rendezvous bootstrap node
//! and Kademlia, inspected through their gRPC API.

use std::time::Duration;

use llama_cluster_proto::v1::{
    InferenceRequest, LoadShardRequest, RelayRequest, SyncTorrentsRequest,
};
use llama_cluster_tests::{NodeProc, sees_all, test_dir, transport_to, wait_for, worker_args};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

fn start_bootstrap(dir: &std::path::Path) -> NodeProc {
    llama_cluster_tests::start_bootstrap(dir).expect("bootstrap starts")
}

fn start_worker(
    dir: &std::path::Path,
    name: &str,
    host: &str,
    bootstrap: &[&str],
    shard: Option<(&str, &str)>,
    extra: &[&str],
) -> NodeProc {
    let mut args = worker_args(host, bootstrap, shard);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    NodeProc::start(dir, name, &args).unwrap_or_else(|e| panic!("{name} starts: {e:#}"))
}

async fn relay(from: &NodeProc, to: &NodeProc, body: Value) -> Value {
    let resp = from
        .client()
        .await
        .expect("grpc client")
        .relay(RelayRequest {
            to_peer_id: to.peer_id.clone(),
            json: body.to_string(),
            timeout_ms: 10_000,
        })
        .await
        .expect("relay succeeds")
        .into_inner();
    serde_json::from_str(&resp.json).expect("response is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_and_three_workers_discover_each_other_over_quic() {
    let dir = test_dir("discover");
    let boot = start_bootstrap(&dir);
    let b = boot.addr("quic-v1");
    let w: Vec<NodeProc> = [("s0", "0-9"), ("s1", "10-19"), ("s2", "20-29")]
        .iter()
        .enumerate()
        .map(|(i, shard)| {
            start_worker(
                &dir,
                &format!("w{i}"),
                &format!("127.0.0.{}", i + 2),
                &[&b],
                Some(*shard),
                &[],
            )
        })
        .collect();
    for (i, me) in w.iter().enumerate() {
        let others: Vec<&NodeProc> = w
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| n)
            .collect();
        wait_for(
            &format!("{} to see its peers and their shards", me.name),
            WAIT,
            || async {
                let st = me.status().await.ok()?;
                let connected = others
                    .iter()
                    .all(|o| st.peers.iter().any(|p| p.peer_id == o.peer_id));
                let shards_ok = st.shards.len() == 3
                    && st.shards.iter().all(|s| {
                        (s.peer_id == me.peer_id && s.availability == "LOCAL")
                            || (others.iter().any(|o| o.peer_id == s.peer_id)
                                && s.availability == "ONLINE")
                    });
                (connected && shards_ok).then_some(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n--- log of {}:\n{}", me.name, me.log()));
    }
    // Every worker pair ends up on QUIC (both sides support it).
    for me in &w {
        for other in w.iter().filter(|o| o.peer_id != me.peer_id) {
            wait_for("a QUIC connection", WAIT, || async {
                (transport_to(me, &other.peer_id).await.as_deref() == Some("QUIC")).then_some(())
            })
            .await
            .unwrap_or_else(|e| panic!("{e}: {} -> {}\n{}", me.name, other.name, me.log()));
        }
    }
    // The shard records carry the announced layer ranges.
    let st = w[0].status().await.unwrap();
    let s2 = st.shards.iter().find(|s| s.shard_id == "s2").unwrap();
    assert_eq!((s2.layer_start, s2.layer_end), (20, 29));
    assert_eq!(s2.peer_id, w[2].peer_id);
    assert_eq!(s2.state, "announced");
    // The bootstrap node saw the registrations; the logs carry the categories.
    assert!(
        boot.log().contains("registered in llama-cluster"),
        "{}",
        boot.log()
    );
    let log = w[1].log();
    for cat in ["[CONNECT]", "[DISCOVERY]", "[DHT]"] {
        assert!(log.contains(cat), "missing {cat} in:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_is_used_when_one_worker_disables_quic() {
    let dir = test_dir("tcp-fallback");
    let boot = start_bootstrap(&dir);
    let bq = boot.addr("quic-v1");
    let bt = boot.addr("tcp");
    let a = start_worker(
        &dir,
        "quic-worker",
        "127.0.0.5",
        &[&bq],
        Some(("a", "0-14")),
        &[],
    );
    let t = start_worker(
        &dir,
        "tcp-worker",
        "127.0.0.6",
        &[&bt],
        Some(("t", "15-29")),
        &["--no-quic"],
    );
    assert!(
        t.listen_addrs.iter().all(|a| a.contains("/tcp/")),
        "{:?}",
        t.listen_addrs
    );
    wait_for("both workers connected", WAIT, || async {
        (sees_all(&a, &[&t]).await && sees_all(&t, &[&a]).await).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", a.log(), t.log()));
    assert_eq!(transport_to(&a, &t.peer_id).await.as_deref(), Some("TCP"));
    assert_eq!(transport_to(&t, &a.peer_id).await.as_deref(), Some("TCP"));
    let st = t.status().await.unwrap();
    assert!(!st.quic_enabled);
    // No behaviour (Kademlia, request-response) opens a QUIC connection for
    // it either, though it learns the QUIC addresses of the others.
    for p in &st.peers {
        assert_eq!(p.transport, "TCP", "{p:?}\n{}", t.log());
    }
    // The QUIC worker reached the bootstrap node over QUIC.
    assert_eq!(
        transport_to(&a, &boot.peer_id).await.as_deref(),
        Some("QUIC")
    );
    // Messages flow over the TCP connection.
    let echo = relay(&a, &t, json!({"message": "over tcp"})).await;
    assert_eq!(echo["message"], "over tcp");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_and_get_status_round_trip_between_workers() {
    let dir = test_dir("roundtrip");
    let boot = start_bootstrap(&dir);
    let b = boot.addr("quic-v1");
    let a = start_worker(&dir, "a", "127.0.0.7", &[&b], Some(("ra", "0-14")), &[]);
    let c = start_worker(&dir, "c", "127.0.0.8", &[&b], Some(("rc", "15-29")), &[]);
    wait_for("a and c connected", WAIT, || async {
        sees_all(&a, &[&c]).await.then_some(())
    })
    .await
    .unwrap();

    let echo = relay(&a, &c, json!({"message": "hello from a"})).await;
    assert_eq!(echo["message"], "hello from a");
    assert_eq!(echo["from"], c.peer_id);
    assert!(echo["timestamp"].as_u64().unwrap() > 0);
    assert!(c.log().contains("[MSG] message from"), "{}", c.log());

    let st = relay(
        &a,
        &c,
        json!({"command": "GET_STATUS", "request_id": "rt-1", "params": {}}),
    )
    .await;
    assert_eq!(st["ok"], true, "{st}");
    assert_eq!(st["request_id"], "rt-1");
    assert_eq!(st["command"], "GET_STATUS");
    assert_eq!(st["result"]["peer_id"], c.peer_id);
    let shards = st["result"]["shards"].as_array().unwrap();
    assert!(
        shards
            .iter()
            .any(|s| s["shard_id"] == "rc" && s["availability"] == "LOCAL"),
        "{st}"
    );
    // Commands addressed to somebody else are refused by the recipient.
    let wrong = relay(&a, &c, json!({"command": "GET_STATUS", "to": a.peer_id})).await;
    assert_eq!(wrong["error"]["code"], "wrong_recipient");
    // SWARM_READY needs its parameters.
    let r = relay(&a, &c, json!({"command": "SWARM_READY", "params": {}})).await;
    assert_eq!(r["ok"], false);
    assert_eq!(r["error"]["code"], "invalid_params", "{r}");
    // INFERENCE and LOAD_SHARD without a model answer why.
    let r = relay(
        &a,
        &c,
        json!({"command": "INFERENCE", "params": {"prompt": "hi"}}),
    )
    .await;
    assert_eq!(r["error"]["code"], "unavailable", "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("manifest"),
        "{r}"
    );
    let r = relay(
        &a,
        &c,
        json!({"command": "LOAD_SHARD", "params": {"shard_id": "x"}}),
    )
    .await;
    assert_eq!(r["error"]["code"], "invalid_params", "{r}");
    // Relay to an unknown peer fails cleanly.
    let err = a
        .client()
        .await
        .unwrap()
        .relay(RelayRequest {
            to_peer_id: "not-a-peer".into(),
            json: "{}".into(),
            timeout_ms: 1000,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_continues_after_the_bootstrap_node_dies() {
    let dir = test_dir("no-bootstrap");
    let mut boot = start_bootstrap(&dir);
    let b = boot.addr("quic-v1");
    let w1 = start_worker(&dir, "w1", "127.0.0.9", &[&b], Some(("k1", "0-9")), &[]);
    let w2 = start_worker(&dir, "w2", "127.0.0.10", &[&b], Some(("k2", "10-19")), &[]);
    wait_for("w1 and w2 connected", WAIT, || async {
        sees_all(&w1, &[&w2]).await.then_some(())
    })
    .await
    .unwrap();
    boot.kill();
    wait_for("bootstrap gone from w1", WAIT, || async {
        let st = w1.status().await.ok()?;
        (!st.peers.iter().any(|p| p.peer_id == boot.peer_id)).then_some(())
    })
    .await
    .unwrap();
    // A new worker that knows only w1's address finds w2 through the DHT.
    let w1_addr = w1.addr("quic-v1");
    let w3 = start_worker(
        &dir,
        "w3",
        "127.0.0.11",
        &[&w1_addr],
        Some(("k3", "20-29")),
        &[],
    );
    wait_for("w3 to find w2 and w2 to see w3", WAIT, || async {
        let st = w3.status().await.ok()?;
        let knows_k2 = st
            .shards
            .iter()
            .any(|s| s.shard_id == "k2" && s.peer_id == w2.peer_id && s.availability == "ONLINE");
        (sees_all(&w3, &[&w1, &w2]).await && sees_all(&w2, &[&w3]).await && knows_k2).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n--- w3:\n{}\n--- w2:\n{}", w3.log(), w2.log()));
    // Messaging between the original workers still works.
    let echo = relay(&w1, &w2, json!({"message": "still here"})).await;
    assert_eq!(echo["message"], "still here");
    let echo = relay(&w3, &w2, json!({"message": "new here"})).await;
    assert_eq!(echo["from"], w2.peer_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_status_reflection_health_and_unimplemented_rpcs() {
    let dir = test_dir("grpc");
    let w = start_worker(
        &dir,
        "solo",
        "127.0.0.12",
        &[],
        Some(("g0", "0-29")),
        &["--cluster", "grpc-test"],
    );
    let st = w.status().await.unwrap();
    assert_eq!(st.peer_id, w.peer_id);
    assert_eq!(st.cluster, "grpc-test");
    assert!(st.quic_enabled);
    assert!(
        st.listen_addrs.iter().any(|a| a.contains("/quic-v1/")),
        "{:?}",
        st.listen_addrs
    );
    assert!(st.listen_addrs.iter().any(|a| a.contains("/tcp/")));
    assert!(st.peers.is_empty());
    assert_eq!(st.shards.len(), 1);
    assert_eq!(st.shards[0].availability, "LOCAL");
    assert_eq!((st.shards[0].layer_start, st.shards[0].layer_end), (0, 29));

    let ch = tonic::transport::Channel::from_shared(format!("http://{}", w.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // grpc.health.v1: a worker announcing a shard it has not loaded is not
    // ready to serve (the inference tests see SERVING once it is loaded).
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    for service in ["", "llamacluster.v1.Worker"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
        );
    }
    let boot = start_bootstrap(&dir);
    let bch = tonic::transport::Channel::from_shared(format!("http://{}", boot.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut boot_health = tonic_health::pb::health_client::HealthClient::new(bch);
    for service in ["", "llamacluster.v1.Worker"] {
        let r = boot_health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "a node with no shard serves"
        );
    }
    // Server reflection lists the services (what `grpcurl list` shows).
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut refl = ServerReflectionClient::new(ch.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"llamacluster.v1.Worker".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    // Without a model, Inference and LoadShard say what is missing.
    let mut c = w.client().await.unwrap();
    let e = c
        .inference(InferenceRequest {
            prompt: "hi".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert!(e.message().contains("manifest"), "{}", e.message());
    let e = c.load_shard(LoadShardRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // Nothing to sync on a lone worker with no files.
    let r = c
        .sync_torrents(SyncTorrentsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(r.entries.is_empty(), "{:?}", r.entries);
    // Still serving afterwards.
    assert_eq!(w.status().await.unwrap().peer_id, w.peer_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_unknown_and_oversized_requests_get_errors() {
    let dir = test_dir("malformed");
    let boot = start_bootstrap(&dir);
    let b = boot.addr("quic-v1");
    let a = start_worker(
        &dir,
        "a",
        "127.0.0.13",
        &[&b],
        Some(("m0", "0-14")),
        &["--max-message-bytes", "65536"],
    );
    let c = start_worker(&dir, "c", "127.0.0.14", &[&b], Some(("m1", "15-29")), &[]);
    wait_for("a and c connected", WAIT, || async {
        sees_all(&a, &[&c]).await.then_some(())
    })
    .await
    .unwrap();

    // A raw libp2p client speaking /json-message/1.0 to worker a, over TCP.
    let addr = a.addr("tcp").parse().unwrap();
    let mut client = llama_worker::client::JsonClient::connect(&addr, Duration::from_secs(10))
        .await
        .unwrap();
    let mut ask = async |body: Vec<u8>| -> Value {
        let r = client
            .request(body)
            .await
            .expect("an answer, not a dropped stream");
        serde_json::from_slice(&r).expect("JSON answer")
    };
    let r = ask(b"\xff\xfe this is not json".to_vec()).await;
    assert_eq!(r["ok"], false);
    assert_eq!(r["error"]["code"], "malformed_json", "{r}");
    let r = ask(b"[1,2,3]".to_vec()).await;
    assert_eq!(r["error"]["code"], "malformed_json", "{r}");
    let r = ask(br#"{"command": 42}"#.to_vec()).await;
    assert_eq!(r["error"]["code"], "malformed_json", "{r}");
    let r = ask(br#"{"command":"SELF_DESTRUCT","request_id":"x1"}"#.to_vec()).await;
    assert_eq!(r["error"]["code"], "unknown_command", "{r}");
    assert_eq!(r["request_id"], "x1");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("GET_STATUS")
    );
    let mut big = br#"{"message":""#.to_vec();
    big.extend(std::iter::repeat_n(b'x', 100_000));
    big.extend(br#""}"#);
    let r = ask(big).await;
    assert_eq!(r["error"]["code"], "too_large", "{r}");
    let r = ask(br#"{"command":"GET_STATUS","request_id":"after"}"#.to_vec()).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["peer_id"], a.peer_id);
    assert!(client.is_connected());
    drop(client);

    // The worker kept its other connection and still answers peers.
    wait_for("a still connected to c", WAIT, || async {
        sees_all(&a, &[&c]).await.then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", a.log()));
    let echo = relay(&c, &a, json!({"message": "ok?"})).await;
    assert_eq!(echo["message"], "ok?");
    assert!(a.log().contains("rejected request"), "{}", a.log());
}

/// Waits until `of` holds the shard record of `peer` in state `want`.
async fn sees_state(of: &NodeProc, peer: &NodeProc, want: &str, timeout: Duration) {
    let what = format!("{} to see {}'s shard {want}", of.name, peer.name);
    wait_for(&what, timeout, || async {
        let st = of.status().await.ok()?;
        st.shards
            .iter()
            .any(|s| s.peer_id == peer.peer_id && s.state == want)
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", of.log()));
}

/// A changed shard record reaches the other workers at once: the record a
/// worker puts in the DHT is stored (signed by the peer it names) and
/// learnt by the nodes it lands on. Here the safety net runs every 300 s
/// and identify's status probe every 60 s, so neither can be what tells.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_shard_record_reaches_the_other_workers_at_once() {
    let dir = test_dir("record-news");
    let manifest = llama_cluster_tests::split_with_cli(&dir.join("split"), 2).unwrap();
    let ids = llama_cluster_tests::shard_ids_of(&manifest).unwrap();
    let boot = start_bootstrap(&dir);
    let b = boot.addr("quic-v1");
    let workers: Vec<NodeProc> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut args = worker_args(&format!("127.0.0.{}", 244 + i), &[&b], None);
            if let Some(at) = args.iter().position(|a| a == "--discovery-interval-secs") {
                args[at + 1] = "300".into();
            }
            args.extend(["--manifest".into(), manifest.display().to_string()]);
            args.extend([
                "--shard-id".into(),
                id.clone(),
                "--threads".into(),
                "1".into(),
            ]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            NodeProc::start(&dir, &format!("stage{i}"), &args)
                .unwrap_or_else(|e| panic!("stage{i} starts: {e:#}"))
        })
        .collect();
    let (w0, w1) = (&workers[0], &workers[1]);
    sees_state(w0, w1, "ready", WAIT).await;
    let mut c1 = w1.client().await.unwrap();
    let r = c1
        .load_shard(LoadShardRequest {
            unload: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, "announced");
    let soon = Duration::from_secs(10);
    sees_state(w0, w1, "announced", soon).await;
    let r = c1
        .load_shard(LoadShardRequest {
            shard_id: ids[1].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, "ready");
    sees_state(w0, w1, "ready", soon).await;
    assert!(
        w0.log().contains("from DHT store"),
        "learnt from the stored record:\n{}",
        w0.log()
    );
}
