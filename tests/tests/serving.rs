//! Many users at once (#15), on real worker processes:
//!
//! - through the coordinator's OpenAI API (the `openai` Python client), 3 ×
//!   the cluster's session capacity of concurrent requests all complete,
//!   none refused; they land on both replicas of every shard and on more
//!   than one driver; a request past the queue bound gets 429 with the
//!   queue's figures, and a client that disconnects while queued frees its
//!   place; one request for 2 × the capacity of choices (`n`) completes;

use std::process::{Command, Stdio};
use std::time::Duration;

use llama_cluster_tests::{
    NodeProc, ReplicaCluster, metric, scrape, split_with_cli, start_coordinator, test_dir, wait_for,
};
use serde_json::Value;

const LOAD: &str = r#"
import json, sys, threading, time, urllib.request
from openai import OpenAI, APITimeoutError, RateLimitError
base, phase = sys.argv[1], sys.argv[2]
def client(timeout=300):
    return OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=timeout)
model = client().models.list().data[0].id
def metric(name):
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
def wait_metric(name, want, limit=60):
    t0 = time.time()
    while time.time() - t0 < limit:
        if metric(name) == want:
            return time.time() - t0
        time.sleep(0.05)
    raise SystemExit(f"{name} never reached {want} (now {metric(name)})")
def ask(i, out, max_tokens, ignore_eos=False, timeout=300):
    try:
        r = client(timeout).chat.completions.create(
            model=model, max_tokens=max_tokens, temperature=0,
            messages=[{"role": "user", "content": f"Tell me one fact about the number {i}."}],
            extra_body={"ignore_eos": ignore_eos})
        out[i] = {"status": 200, "text": r.choices[0].message.content, "tokens": r.usage.completion_tokens}
    except RateLimitError as e:
        out[i] = {"status": 429, "message": str(e)}
    except APITimeoutError:
        out[i] = {"status": "timeout"}
    except Exception as e:
        out[i] = {"status": "error", "message": f"{type(e).__name__}: {e}"}
def run(n, **kw):
    out = {}
    ts = [threading.Thread(target=ask, args=(i, out), kwargs=kw) for i in n]
    [t.start() for t in ts]
    return out, ts
res = {}
if phase == "many":
    out, ts = run(range(int(sys.argv[3])), max_tokens=12)
    [t.join() for t in ts]
    res["answers"] = out
elif phase == "choices":
    # One request for more choices than the cluster has sessions: each
    # choice queues like a request of its own while the others are read.
    try:
        r = client().chat.completions.create(
            model=model, max_tokens=160, temperature=0, n=int(sys.argv[3]),
            messages=[{"role": "user", "content": "Count to a thousand."}],
            extra_body={"ignore_eos": True})
        res["choices"] = {"status": 200, "n": len(r.choices), "tokens": r.usage.completion_tokens,
                          "distinct": len({c.message.content for c in r.choices})}
    except Exception as e:
        res["choices"] = {"status": "error", "message": f"{type(e).__name__}: {e}"}
    # More choices than the cluster runs and queues: refused before it starts.
    try:
        client().chat.completions.create(model=model, max_tokens=4, n=int(sys.argv[4]),
                                         messages=[{"role": "user", "content": "Hi"}])
        res["too_many"] = {"status": 200}
    except Exception as e:
        res["too_many"] = {"status": getattr(e, "status_code", None), "message": str(e)}
else:
    cap, bound = int(sys.argv[3]), int(sys.argv[4])
    # The cluster busy with `cap` long requests …
    busy, ts = run(range(100, 100 + cap), max_tokens=160, ignore_eos=True)
    wait_metric("llama_cluster_coordinator_requests_in_flight", cap)
    # … a client that gives up while queued leaves the queue …
    gone = {}
    t = threading.Thread(target=ask, args=(200, gone, 8), kwargs={"timeout": 1.5})
    t.start()
    wait_metric("llama_cluster_coordinator_requests_queued", 1)
    t.join()
    res["gone"] = gone[200]
    res["gone_left_after_s"] = wait_metric("llama_cluster_coordinator_requests_queued", 0, 10)
    # … the queue fills up to its bound, and one more is refused.
    queued, qs = run(range(300, 300 + bound), max_tokens=8)
    wait_metric("llama_cluster_coordinator_requests_queued", bound)
    extra = {}
    ask(400, extra, 8)
    res["refused"] = extra[400]
    [t.join() for t in ts + qs]
    res["busy"] = busy
    res["queued"] = queued
print(json.dumps(res))
"#;

fn python(dir: &std::path::Path, args: &[&str]) -> Value {
    let script = dir.join("load.py");
    std::fs::write(&script, LOAD).unwrap();
    let out = Command::new("timeout")
        .arg("300")
        .arg("python3")
        .arg(&script)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "client failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn coordinator_capacity(coord: &NodeProc) -> Option<u32> {
    let addr = coord.ready["grpc_addr"].as_str()?;
    let mut c = llama_cluster_proto::v1::coordinator_client::CoordinatorClient::connect(format!(
        "http://{addr}"
    ))
    .await
    .ok()?;
    let st = c
        .get_cluster_status(llama_cluster_proto::v1::GetClusterStatusRequest {})
        .await
        .ok()?
        .into_inner();
    Some(st.session_capacity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_users_are_queued_and_spread_over_replicas_and_drivers() {
    let dir = test_dir("serving");
    let manifest = split_with_cli(&dir.join("split"), 2).unwrap();
    let cluster = ReplicaCluster::start(&dir, &manifest, 140, 2, &["--max-sessions", "2"])
        .await
        .unwrap();
    let coord = start_coordinator(
        &dir,
        &cluster.grpc_addrs(),
        &[
            "--max-queued",
            "8",
            "--queue-timeout-secs",
            "120",
            "--poll-ms",
            "500",
        ],
        &[],
    )
    .unwrap();
    // 2 replicas × 2 sessions of each range.
    let cap = wait_for(
        "the cluster's capacity",
        Duration::from_secs(30),
        || async { coordinator_capacity(&coord).await.filter(|c| *c == 4) },
    )
    .await
    .unwrap();
    let base = format!("http://{}", coord.ready["http_addr"].as_str().unwrap());

    // 3 × the capacity at once: every request completes, none refused.
    let n = 3 * cap as usize;
    let r = python(&dir, &[&base, "many", &n.to_string()]);
    let answers = r["answers"].as_object().unwrap();
    assert_eq!(answers.len(), n);
    for (i, a) in answers {
        assert_eq!(a["status"], 200, "request {i}: {a}");
        assert!(a["tokens"].as_u64().unwrap() > 0, "request {i}: {a}");
    }
    // On both replicas of every shard, and on more than one driver.
    let mut drivers = 0;
    for w in &cluster.workers {
        let m = scrape(w).unwrap();
        let steps = metric(&m, "llama_cluster_stage_steps_total").unwrap_or(0.0);
        assert!(steps > 0.0, "{} computed no step", w.name);
        if metric(&m, "llama_cluster_inference_requests_total").unwrap_or(0.0) > 0.0 {
            drivers += 1;
        }
    }
    assert!(drivers >= 2, "requests went to {drivers} driver(s)");

    // One request with 2 × the capacity of choices, each longer than the
    // streams' buffers: all complete, greedy alike.
    let n = 2 * cap as u64;
    let too_many = (cap + 8 + 1).to_string();
    let r = python(&dir, &[&base, "choices", &n.to_string(), &too_many]);
    let c = &r["choices"];
    assert_eq!(c["status"], 200, "{c}");
    assert_eq!(
        (c["n"].as_u64(), c["tokens"].as_u64()),
        (Some(n), Some(n * 160)),
        "{c}"
    );
    assert_eq!(c["distinct"], 1, "{c}");
    let t = &r["too_many"];
    assert_eq!(t["status"], 400, "{t}");
    assert!(
        t["message"]
            .as_str()
            .unwrap()
            .contains("more than the cluster holds at once: 12"),
        "{t}"
    );

    // The queue's bound, and a client that leaves it.
    let r = python(&dir, &[&base, "bound", &cap.to_string(), "8"]);
    assert_eq!(r["gone"]["status"], "timeout", "{}", r["gone"]);
    assert!(r["gone_left_after_s"].as_f64().unwrap() < 5.0, "{r}");
    assert_eq!(r["refused"]["status"], 429, "{}", r["refused"]);
    let msg = r["refused"]["message"].as_str().unwrap();
    assert!(msg.contains("8 queued (max_queued 8)"), "{msg}");
    for group in ["busy", "queued"] {
        for (i, a) in r[group].as_object().unwrap() {
            assert_eq!(a["status"], 200, "{group} request {i}: {a}");
        }
    }
    for a in r["busy"].as_object().unwrap().values() {
        assert_eq!(a["tokens"], 160, "{a}");
    }
}
