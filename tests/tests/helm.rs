//! Static checks of the Helm chart in `helm/llama-cluster` (no helm binary
//! here): Chart.yaml and values.yaml parse, values.yaml validates against
//! values.schema.json, every `.Values.x` a template uses exists; and the
//! checks fail on a bad value or a dangling reference.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn check(extra: &[&Path]) -> (bool, String) {
    let out = Command::new("python3")
        .arg(root().join("tests/helm_check.py"))
        .arg(root().join("helm/llama-cluster"))
        .args(extra)
        .output()
        .expect("python3 (PyYAML and jsonschema are installed by scripts/setup.sh)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_chart_parses_validates_and_references_only_existing_values() {
    let (ok, out) = check(&[]);
    assert!(ok, "{out}");
    assert!(out.contains("0 problems"), "{out}");
    // Every template of the chart is there.
    for t in [
        "configmap.yaml",
        "bootstrap.yaml",
        "workers.yaml",
        "coordinator.yaml",
        "jaeger.yaml",
        "_helpers.tpl",
    ] {
        assert!(
            root().join("helm/llama-cluster/templates").join(t).exists(),
            "{t}"
        );
    }
    let workers =
        std::fs::read_to_string(root().join("helm/llama-cluster/templates/workers.yaml")).unwrap();
    for needle in [
        "kind: StatefulSet",
        "volumeClaimTemplates",
        "clusterIP: None",
        "kind: PodDisruptionBudget",
        "grpc: {port",
    ] {
        assert!(workers.contains(needle), "workers.yaml lacks {needle}");
    }
    // Traces reach the nodes; liveness uses the always-SERVING health service.
    let coordinator =
        std::fs::read_to_string(root().join("helm/llama-cluster/templates/coordinator.yaml"))
            .unwrap();
    for (name, t) in [
        ("workers.yaml", &workers),
        ("coordinator.yaml", &coordinator),
    ] {
        for needle in [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "llama-cluster.otlpEndpoint",
            "service: liveness",
        ] {
            assert!(t.contains(needle), "{name} lacks {needle}");
        }
    }
}

#[test]
fn the_checks_catch_bad_values_and_dangling_references() {
    let dir = root().join("target/test-runs");
    std::fs::create_dir_all(&dir).unwrap();
    let values = std::fs::read_to_string(root().join("helm/llama-cluster/values.yaml")).unwrap();
    let bad = dir.join(format!("bad-values-{}.yaml", std::process::id()));
    std::fs::write(
        &bad,
        values
            .replace("replicas: 3", "replicas: 0")
            .replace("p2pPort: 9000", "p2pPort: 70000")
            .replace("endpoint: \"\"", "endpoint: \"ftp://collector\""),
    )
    .unwrap();
    let (ok, out) = check(&[&bad]);
    assert!(!ok, "{out}");
    assert!(out.contains("workers.replicas"), "{out}");
    assert!(out.contains("p2pPort"), "{out}");
    assert!(out.contains("otel.endpoint"), "{out}");
    let good = root().join("helm/llama-cluster/values.yaml");
    let tpl = dir.join(format!("dangling-{}.yaml", std::process::id()));
    std::fs::write(&tpl, "x: {{ .Values.workers.noSuchValue }}\n").unwrap();
    let (ok, out) = check(&[&good, &tpl]);
    assert!(!ok, "{out}");
    assert!(out.contains(".Values.workers.noSuchValue"), "{out}");
    let _ = std::fs::remove_file(bad);
    let _ = std::fs::remove_file(tpl);
}
