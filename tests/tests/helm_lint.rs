//! The Helm chart checked by real Helm: `helm lint` by Helm v4's Go library
//! (helm-sdkpy, in the Python 3.12 venv of scripts/tools.sh) passes with no
//! warning or error; and the same lint fails on a copy of the chart with a
//! value the schema refuses or a template that does not render. (The
//! value-reference checks stay in helm.rs.) The chart rendered by Helm's
//! Go library, with and without the Secrets of tokens, cluster key and TLS,
//! gives objects kubernetes-validate accepts, each Secret mounted where the
//! node's `*_FILE` variable points.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use llama_cluster_tests::clients::{self, Output};
use llama_cluster_tests::test_dir;
use serde_json::{Value, json};

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../helm/llama-cluster")
}

fn lint(chart: &Path) -> Output {
    clients::run(
        Command::new(clients::helm_python())
            .arg(clients::script("helm_lint.py"))
            .arg(chart),
        Duration::from_secs(120),
    )
    .expect("the helm-sdkpy venv (scripts/setup.sh makes it)")
}

/// A copy of the chart in `dir`.
fn copy_chart(dir: &Path) -> PathBuf {
    let to = dir.join("llama-cluster");
    let from = chart();
    for sub in ["", "templates"] {
        std::fs::create_dir_all(to.join(sub)).unwrap();
        for e in std::fs::read_dir(from.join(sub)).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), to.join(sub).join(e.file_name())).unwrap();
            }
        }
    }
    to
}

#[test]
fn helm_lint_passes_without_warnings_and_catches_broken_charts() {
    let out = lint(&chart());
    println!("{}", out.all());
    assert!(out.ok, "helm lint: {}", out.all());
    assert!(
        out.stdout.contains("1 chart(s)")
            && out.stdout.contains(" 0 warning(s) or error(s), 0 error(s)"),
        "{}",
        out.all()
    );
    assert!(!out.stdout.contains("WARNING") && !out.stdout.contains("ERROR"));

    let dir = test_dir("helm-lint");
    // A value values.schema.json refuses.
    let bad_value = copy_chart(&dir.join("value"));
    let values = std::fs::read_to_string(bad_value.join("values.yaml")).unwrap();
    assert!(values.contains("replicas: 3"));
    std::fs::write(
        bad_value.join("values.yaml"),
        values.replace("replicas: 3", "replicas: 0"),
    )
    .unwrap();
    let out = lint(&bad_value);
    assert!(!out.ok, "{}", out.all());
    assert!(out.stdout.contains("ERROR values.yaml"), "{}", out.all());

    // A template that does not render.
    let bad_template = copy_chart(&dir.join("template"));
    std::fs::write(
        bad_template.join("templates/broken.yaml"),
        "x: {{ .Values.workers.replicas | noSuchFunction }}\n",
    )
    .unwrap();
    let out = lint(&bad_template);
    assert!(!out.ok, "{}", out.all());
    assert!(out.stdout.contains("ERROR templates/"), "{}", out.all());
}

/// The chart rendered by Helm's Go library with `values` (JSON), every
/// object checked by kubernetes-validate: (ok, objects, problems).
fn render(chart: &Path, values: Option<&serde_json::Value>) -> (bool, Vec<Value>, String) {
    let mut cmd = Command::new(clients::helm_python());
    cmd.arg(clients::script("helm_render.py")).arg(chart);
    if let Some(v) = values {
        cmd.arg(v.to_string());
    }
    let out = clients::run(&mut cmd, Duration::from_secs(120)).expect("the helm venv");
    let v: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("helm_render.py printed no JSON ({e}): {}", out.all()));
    let objects = v["objects"].as_array().cloned().unwrap_or_default();
    (out.ok, objects, v["problems"].to_string())
}

/// The pod spec of the object of `kind` whose name ends with `suffix`.
fn pod<'a>(objects: &'a [Value], kind: &str, suffix: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(suffix))
        })
        .map(|o| &o["spec"]["template"]["spec"])
        .unwrap_or_else(|| panic!("no {kind} *{suffix}"))
}

/// The file an environment variable names, checked to be a key of the
/// Secret `secret` mounted in the container: (path, key).
fn secret_file(spec: &Value, env: &str, secret: &str) -> Option<(String, String)> {
    let c = &spec["containers"][0];
    let value = c["env"].as_array()?.iter().find(|e| e["name"] == env)?["value"]
        .as_str()?
        .to_string();
    let volume = spec["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["secret"]["secretName"] == secret)?;
    let name = volume["name"].as_str()?;
    let mount = c["volumeMounts"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == name)?;
    let dir = mount["mountPath"].as_str()?;
    let key = value.strip_prefix(dir)?.strip_prefix('/')?.to_string();
    if let Some(items) = volume["secret"]["items"].as_array() {
        assert!(
            items.iter().any(|i| i["key"] == key && i["path"] == key),
            "{env}: key {key} not projected: {volume}"
        );
    }
    assert_eq!(mount["readOnly"], true, "{mount}");
    Some((value, key))
}

/// The coordinator's `--allowed-origins` argument.
fn origins(objects: &[Value]) -> String {
    let cmd = &pod(objects, "Deployment", "-coordinator")["containers"][0]["command"];
    let args: Vec<&str> = cmd
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let at = args
        .iter()
        .position(|a| *a == "--allowed-origins")
        .unwrap_or_else(|| panic!("no --allowed-origins: {cmd}"));
    args.get(at + 1).map(|s| s.to_string()).unwrap_or_default()
}

#[test]
fn the_chart_mounts_the_secrets_and_renders_valid_objects() {
    // Without secrets: valid objects, no secret volume, gRPC probes.
    let (ok, objects, problems) = render(&chart(), None);
    assert!(ok, "{problems}");
    assert_eq!(objects.len(), 8, "{problems}");
    let text = serde_json::to_string(&objects).unwrap();
    assert!(
        !text.contains("\"secret\"") && !text.contains("_FILE"),
        "{text}"
    );
    let workers = pod(&objects, "StatefulSet", "-worker");
    assert!(workers["containers"][0]["readinessProbe"]["grpc"].is_object());
    assert_eq!(origins(&objects), "*", "any origin by default");

    let values = serde_json::json!({
        "coordinator": {"allowedOrigins": "https://chat.example.org"},
        "auth": {"adminTokenSecret": "llama-admin", "apiTokenSecret": "llama-api"},
        "clusterKey": {"secretName": "llama-key"},
        "tls": {"secretName": "llama-tls"},
    });
    let (ok, objects, problems) = render(&chart(), Some(&values));
    assert!(ok, "{problems}");
    assert_eq!(origins(&objects), "https://chat.example.org");
    let nodes = [
        ("StatefulSet", "-worker", true),
        ("Deployment", "-bootstrap", true),
        ("Deployment", "-coordinator", false),
    ];
    for (kind, suffix, swarm_member) in nodes {
        let spec = pod(&objects, kind, suffix);
        let f = |env, secret| secret_file(spec, env, secret);
        let what = format!("{kind} *{suffix}");
        for (env, secret, key) in [
            ("LLAMA_CLUSTER_ADMIN_TOKEN_FILE", "llama-admin", "token"),
            ("LLAMA_CLUSTER_API_TOKEN_FILE", "llama-api", "token"),
            ("LLAMA_CLUSTER_TLS_CERT_FILE", "llama-tls", "tls.crt"),
            ("LLAMA_CLUSTER_TLS_KEY_FILE", "llama-tls", "tls.key"),
        ] {
            let (_, k) = f(env, secret).unwrap_or_else(|| panic!("{what}: {env}"));
            assert_eq!(k, key, "{what}: {env}");
        }
        let key = f("LLAMA_CLUSTER_KEY_FILE", "llama-key");
        let ca = f("LLAMA_CLUSTER_TLS_CA_FILE", "llama-tls");
        if swarm_member {
            assert_eq!(key.map(|k| k.1).as_deref(), Some("key"), "{what}");
            assert!(ca.is_none(), "{what}");
        } else {
            assert!(key.is_none(), "{what}: the coordinator is no swarm member");
            assert_eq!(ca.map(|k| k.1).as_deref(), Some("ca.crt"), "{what}");
            let env = spec["containers"][0]["env"].to_string();
            assert!(
                env.contains(
                    r#""LLAMA_CLUSTER_TLS_SERVER_NAME","value":"demo-llama-cluster-workers""#
                ),
                "{env}"
            );
        }
        // Kubelet's gRPC probes speak no TLS: a worker or the bootstrap is
        // ready when its port answers; the coordinator when its /health
        // over HTTPS says the cluster is (tls.rs calls it as kubelet does).
        let probe = &spec["containers"][0]["readinessProbe"];
        assert!(probe["grpc"].is_null(), "{what}: {probe}");
        if swarm_member {
            assert!(probe["tcpSocket"].is_object(), "{what}: {probe}");
        } else {
            let get = &probe["httpGet"];
            assert_eq!(
                (&get["path"], &get["port"], &get["scheme"]),
                (&json!("/health"), &json!("http"), &json!("HTTPS")),
                "{what}: {probe}"
            );
        }
    }

    // A Secret name Kubernetes refuses is refused by the schema.
    let bad = serde_json::json!({"tls": {"secretName": "Not_A_Name"}});
    let (ok, _, problems) = render(&chart(), Some(&bad));
    assert!(!ok && problems.contains("tls/secretName"), "{problems}");
    // And an object Kubernetes refuses (a mount without its path) is found.
    let dir = test_dir("helm-render");
    let broken = copy_chart(&dir);
    let workers = std::fs::read_to_string(broken.join("templates/workers.yaml")).unwrap();
    std::fs::write(
        broken.join("templates/workers.yaml"),
        workers.replace("mountPath: /data}", "mountPth: /data}"),
    )
    .unwrap();
    let (ok, _, problems) = render(&broken, None);
    assert!(!ok && problems.contains("mountPath"), "{problems}");
}
