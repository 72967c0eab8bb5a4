//! Optional TLS (#18): a CA and a server certificate for 127.0.0.1 made in
//! the test (rcgen); a worker serving its gRPC over TLS, reached by tonic
//! and by grpcurl with the CA and refused to plaintext clients; a
//! coordinator that talks TLS to that worker (its CA option) and serves its
//! gRPC and its HTTPS OpenAI API with the certificate, answered to the
//! Python `openai` client given the CA (and not without it). A missing or
//! malformed certificate file stops a node at start with the option named.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use llama_cluster_proto::v1::coordinator_client::CoordinatorClient;
use llama_cluster_proto::v1::worker_client::WorkerClient;
use llama_cluster_proto::v1::{GetClusterStatusRequest, GetStatusRequest};
use llama_cluster_tests::clients;
use llama_cluster_tests::{
    NodeProc, binary, shard_ids_of, split_with_cli, start_bootstrap, start_coordinator, test_dir,
    wait_for, worker_args,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// A well-formed key that is not the certificate's.
    other_key: PathBuf,
}

/// A CA, and a certificate it signs for 127.0.0.1 and localhost.
fn make_pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "llama-cluster test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "llama-cluster test node");
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let pki = Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("node.pem"),
        key: dir.join("node.key"),
        other_key: dir.join("other.key"),
    };
    std::fs::write(&pki.ca, ca.pem()).unwrap();
    std::fs::write(&pki.cert, cert.pem()).unwrap();
    std::fs::write(&pki.key, key.serialize_pem()).unwrap();
    std::fs::write(&pki.other_key, ca_key.serialize_pem()).unwrap();
    pki
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A tonic channel to `addr` over TLS, trusting `ca` only.
async fn tls_channel(addr: &str, ca: &Path) -> anyhow::Result<Channel> {
    // tonic's TLS asks for the process's rustls provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca)?));
    Ok(Channel::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .connect()
        .await?)
}

const CLIENT: &str = r#"
import json, ssl, sys
import openai
from openai import OpenAI
host, ca = sys.argv[1], sys.argv[2]
out = {}
def ask(name, base, http_client=None):
    c = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120, http_client=http_client)
    try:
        r = c.chat.completions.create(model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=8)
        out[name] = {"ok": True, "text": r.choices[0].message.content}
    except openai.APIConnectionError as e:
        out[name] = {"ok": False, "error": repr(e.__cause__ or e)}
ask("with_ca", "https://" + host,
    openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=ca)))
ask("system_roots", "https://" + host)
ask("plaintext", "http://" + host)
# As kubelet's HTTPS readiness probe (the Helm chart's): no certificate check.
import urllib.request
with urllib.request.urlopen("https://" + host + "/health", timeout=30,
                            context=ssl._create_unverified_context()) as h:
    out["health"] = {"status": h.status, "body": json.load(h)}
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_worker_grpc_and_coordinator_https() {
    let dir = test_dir("tls");
    let pki = make_pki(&dir);
    let manifest = split_with_cli(&dir.join("split"), 1).unwrap();
    let shard = shard_ids_of(&manifest).unwrap().remove(0);
    let bootstrap = start_bootstrap(&dir).unwrap();
    let b = bootstrap.addr("quic-v1");
    let mut args = worker_args("127.0.0.205", &[&b], None);
    args.extend([
        "--manifest".into(),
        manifest.display().to_string(),
        "--shard-id".into(),
        shard.clone(),
        "--threads".into(),
        "1".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let tls_env = [
        ("LLAMA_CLUSTER_TLS_CERT_FILE", s(&pki.cert)),
        ("LLAMA_CLUSTER_TLS_KEY_FILE", s(&pki.key)),
    ];
    let worker = NodeProc::start_with_env(&dir, "worker", &args, &tls_env).unwrap();
    let addr = worker.grpc_addr.clone();

    // tonic with the CA: the worker answers, and its shard gets ready.
    let mut c = WorkerClient::new(tls_channel(&addr, &pki.ca).await.unwrap());
    wait_for("the TLS worker's shard", Duration::from_secs(60), || {
        let mut c = c.clone();
        let shard = shard.clone();
        async move {
            let st = c.get_status(GetStatusRequest {}).await.ok()?.into_inner();
            st.shards
                .iter()
                .any(|r| r.shard_id == shard && r.state == "ready")
                .then_some(())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", worker.log()));
    c.get_status(GetStatusRequest {}).await.unwrap();

    // A plaintext client gets no answer.
    let plain = async {
        let ch = Channel::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect()
            .await?;
        WorkerClient::new(ch)
            .get_status(GetStatusRequest {})
            .await?;
        anyhow::Ok(())
    }
    .await;
    assert!(plain.is_err(), "a plaintext client reached the TLS worker");

    // grpcurl: with the CA it calls (through reflection); plaintext and
    // without the CA it is refused.
    let grpcurl = clients::grpcurl().unwrap();
    let run = |flags: &[&str]| {
        let mut cmd = Command::new(&grpcurl);
        cmd.args(["-max-time", "20"]).args(flags).args([
            "-d",
            "{}",
            &addr,
            "llamacluster.v1.Worker/GetStatus",
        ]);
        clients::run(&mut cmd, Duration::from_secs(40)).unwrap()
    };
    let ok = run(&["-cacert", s(&pki.ca)]);
    assert!(ok.ok, "grpcurl -cacert: {}", ok.all());
    let v: serde_json::Value = serde_json::from_str(&ok.stdout).unwrap();
    assert_eq!(v["peerId"], worker.peer_id.as_str(), "{v}");
    let refused = run(&["-plaintext"]);
    assert!(!refused.ok, "grpcurl -plaintext reached the TLS worker");
    let unknown_ca = run(&[]);
    assert!(
        !unknown_ca.ok && unknown_ca.stderr.contains("certificate"),
        "grpcurl without the CA: {}",
        unknown_ca.all()
    );

    // The coordinator: TLS to the worker (the CA), TLS on its gRPC and HTTP.
    let coord = start_coordinator(
        &dir,
        &addr,
        &[
            "--tls-cert-file",
            s(&pki.cert),
            "--tls-key-file",
            s(&pki.key),
            "--tls-ca-file",
            s(&pki.ca),
            // Checked against every worker's certificate (dialled by IP).
            "--tls-server-name",
            "localhost",
        ],
        &[],
    )
    .unwrap();
    assert_eq!(coord.ready["tls"], true, "{}", coord.ready);
    let grpc = coord.ready["grpc_addr"].as_str().unwrap().to_string();
    let mut cc = CoordinatorClient::new(tls_channel(&grpc, &pki.ca).await.unwrap());
    let st = wait_for(
        "the coordinator to reach the TLS worker",
        Duration::from_secs(30),
        || {
            let mut cc = cc.clone();
            async move {
                let st = cc
                    .get_cluster_status(GetClusterStatusRequest {})
                    .await
                    .ok()?
                    .into_inner();
                (st.swarm_ready && st.workers.iter().any(|w| w.reachable)).then_some(st)
            }
        },
    )
    .await;
    let st = st.unwrap_or_else(|e| panic!("{e}\n{}", coord.log()));
    assert!(st.workers.iter().all(|w| w.reachable), "{:?}", st.workers);
    let _ = cc.get_cluster_status(GetClusterStatusRequest {}).await;

    let http = coord.ready["http_addr"].as_str().unwrap().to_string();
    let script = dir.join("client.py");
    std::fs::write(&script, CLIENT).unwrap();
    let out = clients::run(
        Command::new("python3")
            .arg(&script)
            .args([http.as_str(), s(&pki.ca)]),
        Duration::from_secs(150),
    )
    .unwrap();
    assert!(out.ok, "{}", out.all());
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["with_ca"]["ok"], true, "{v}\n{}", coord.log());
    assert!(!v["with_ca"]["text"].as_str().unwrap().is_empty(), "{v}");
    assert_eq!(v["system_roots"]["ok"], false, "{v}");
    assert!(
        v["system_roots"]["error"]
            .as_str()
            .unwrap()
            .contains("CERTIFICATE_VERIFY_FAILED"),
        "{v}"
    );
    assert_eq!(v["plaintext"]["ok"], false, "{v}");
    assert_eq!(v["health"]["status"], 200, "{v}");
    assert_eq!(v["health"]["body"]["status"], "ok", "{v}");
    drop(coord);
    drop(worker);
}

/// Runs `bin args` with `env`, expecting it to stop with an error at start.
fn start_error(bin: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(binary(bin));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = clients::run(&mut cmd, Duration::from_secs(30)).unwrap();
    assert!(!out.ok, "{bin} started: {}", out.all());
    assert!(!out.stderr.contains("panicked"), "{}", out.all());
    out.stderr
}

#[test]
fn bad_certificate_files_stop_a_node_at_start() {
    let dir = test_dir("tls-bad");
    let pki = make_pki(&dir);
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let worker = ["--p2p-host", "127.0.0.207", "--grpc-addr", "127.0.0.1:0"];
    let missing = dir.join("missing.pem");
    let e = start_error(
        "llama-worker",
        &worker,
        &[
            ("LLAMA_CLUSTER_TLS_CERT_FILE", s(&missing)),
            ("LLAMA_CLUSTER_TLS_KEY_FILE", s(&pki.key)),
        ],
    );
    assert!(
        e.contains("tls_cert_file") && e.contains(s(&missing)),
        "{e}"
    );
    let e = start_error(
        "llama-worker",
        &worker,
        &[
            ("LLAMA_CLUSTER_TLS_CERT_FILE", s(&junk)),
            ("LLAMA_CLUSTER_TLS_KEY_FILE", s(&pki.key)),
        ],
    );
    assert!(
        e.contains("tls_cert_file") && e.contains("no PEM certificate"),
        "{e}"
    );
    let e = start_error(
        "llama-worker",
        &worker,
        &[("LLAMA_CLUSTER_TLS_CERT_FILE", s(&pki.cert))],
    );
    assert!(e.contains("tls_key_file"), "{e}");
    let coordinator = |extra: &[&str]| {
        let mut a = vec![
            "serve",
            "--workers",
            "127.0.0.1:1",
            "--http",
            "127.0.0.1:0",
            "--grpc",
            "127.0.0.1:0",
        ];
        a.extend_from_slice(extra);
        start_error("llama-coordinator", &a, &[])
    };
    let e = coordinator(&["--tls-cert-file", s(&pki.cert), "--tls-key-file", s(&junk)]);
    assert!(
        e.contains("tls_key_file") && e.contains("no PEM private key"),
        "{e}"
    );
    let e = coordinator(&[
        "--tls-cert-file",
        s(&pki.cert),
        "--tls-key-file",
        s(&pki.other_key),
    ]);
    assert!(e.contains("do not make a TLS server"), "{e}");
    let e = coordinator(&["--tls-ca-file", s(&junk)]);
    assert!(e.contains("tls_ca_file"), "{e}");
}
