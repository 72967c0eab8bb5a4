//! The Helm chart checked by real Helm: `helm lint` by Helm v4's Go library
//! (helm-sdkpy, in the Python 3.12 venv of scripts/tools.sh) passes with no
//! warning or error; and the same lint fails on a copy of the chart with a
//! value the schema refuses or a template that does not render. (The
//! value-reference checks stay in helm.rs.)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use llama_cluster_tests::clients::{self, Output};
use llama_cluster_tests::test_dir;

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
