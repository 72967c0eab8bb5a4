//! Tests of the configuration loading (defaults < file < env < flags).

use super::*;
use std::io::Write;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn toml_file(body: &str) -> tempfile_lite::TempPath {
    tempfile_lite::TempPath::with_contents(body)
}

#[test]
fn defaults_are_valid() {
    let cfg = NodeConfig::load(None, &env(&[]), &[]).unwrap();
    assert_eq!(cfg, NodeConfig::default());
}

#[test]
fn precedence_is_defaults_file_env_flags() {
    let f = toml_file("cluster = \"from-file\"\np2p_port = 7000\nquic = false\n");
    let e = env(&[
        ("LLAMA_CLUSTER_CLUSTER", "from-env"),
        ("LLAMA_CLUSTER_P2P_PORT", "7001"),
        (
            "LLAMA_CLUSTER_BOOTSTRAP",
            "/ip4/127.0.0.1/tcp/1,/ip4/127.0.0.1/tcp/2",
        ),
        ("LLAMA_CLUSTER_UNRELATED_TOOL_SETTING", "x"),
    ]);
    let cfg = NodeConfig::load(Some(f.path()), &e, &[("cluster", "from-flag".into())]).unwrap();
    assert_eq!(cfg.cluster, "from-flag");
    assert_eq!(cfg.p2p_port, 7001);
    assert!(!cfg.quic, "file value kept when nothing overrides it");
    assert_eq!(
        cfg.bootstrap,
        vec!["/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/2"]
    );
    let cfg = NodeConfig::load(Some(f.path()), &env(&[]), &[]).unwrap();
    assert_eq!(cfg.cluster, "from-file");
    assert_eq!(cfg.p2p_port, 7000);
}

#[test]
fn bad_values_name_the_field() {
    let err = NodeConfig::load(None, &env(&[("LLAMA_CLUSTER_P2P_PORT", "abc")]), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("p2p_port"), "{err}");
    let f = toml_file("quic = \"maybe\"\n");
    let err = NodeConfig::load(Some(f.path()), &env(&[]), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("quic"), "{err}");
    let f = toml_file("clsuter = \"typo\"\n");
    let err = NodeConfig::load(Some(f.path()), &env(&[]), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("clsuter"), "{err}");
    let err = NodeConfig::load(None, &env(&[]), &[("grpc_addr", "nowhere".into())])
        .unwrap_err()
        .to_string();
    assert!(err.contains("grpc_addr"), "{err}");
    let err = NodeConfig::load(
        None,
        &env(&[("LLAMA_CLUSTER_TLS_CERT_FILE", "/c.pem")]),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("tls_key_file"), "{err}");
    let err = NodeConfig::load(
        None,
        &env(&[]),
        &[("shard_id", "s0".into()), ("shard_layers", "9-3".into())],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("shard_layers"), "{err}");
    let err = NodeConfig::load(None, &env(&[]), &[("cluster", "a/b".into())])
        .unwrap_err()
        .to_string();
    assert!(err.contains("cluster"), "{err}");
    let err = NodeConfig::load(
        None,
        &env(&[("LLAMA_CLUSTER_OTLP_ENDPOINT", "127.0.0.1:4317")]),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("otlp_endpoint"), "{err}");
    let cfg = NodeConfig::load(
        None,
        &env(&[("LLAMA_CLUSTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")]),
        &[("trace_decode_every", "4".into())],
    )
    .unwrap();
    assert_eq!(cfg.otlp_endpoint, "http://127.0.0.1:4317");
    assert_eq!(cfg.trace_decode_every, 4);
    for bad in ["0.5", "-1", "nan"] {
        let err = NodeConfig::load(
            None,
            &env(&[("LLAMA_CLUSTER_UPLOAD_LIMIT_MB_PER_SEC", bad)]),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("upload_limit_mb_per_sec"), "{bad}: {err}");
    }
    let cfg = NodeConfig::load(
        None,
        &env(&[("LLAMA_CLUSTER_UPLOAD_LIMIT_MB_PER_SEC", "12.5")]),
        &[],
    )
    .unwrap();
    assert_eq!(cfg.upload_limit_mb_per_sec, 12.5);
    // Without QUIC, a QUIC bootstrap address cannot be dialed.
    let quic_boot = "/ip4/127.0.0.1/udp/4001/quic-v1";
    let tcp_boot = "/ip4/127.0.0.1/tcp/4001";
    let no_quic = ("quic", "false".into());
    let err = NodeConfig::load(
        None,
        &env(&[]),
        &[no_quic.clone(), ("bootstrap", quic_boot.into())],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("bootstrap") && err.contains("QUIC"), "{err}");
    for ok in [tcp_boot.to_string(), format!("{quic_boot},{tcp_boot}")] {
        NodeConfig::load(None, &env(&[]), &[no_quic.clone(), ("bootstrap", ok)]).unwrap();
    }
    NodeConfig::load(None, &env(&[]), &[("bootstrap", quic_boot.into())]).unwrap();
}

#[test]
fn layer_ranges_parse() {
    assert_eq!(parse_layer_range("0-14"), Ok((0, 14)));
    assert_eq!(parse_layer_range("3-3"), Ok((3, 3)));
    assert!(parse_layer_range("14").is_err());
    assert!(parse_layer_range("a-2").is_err());
    assert!(parse_layer_range("5-1").is_err());
}

/// Minimal temp file helper (avoids a dev-dependency for two tests).
mod tempfile_lite {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static N: AtomicUsize = AtomicUsize::new(0);

    pub struct TempPath(PathBuf);

    impl TempPath {
        pub fn with_contents(body: &str) -> Self {
            let n = N.fetch_add(1, Ordering::SeqCst);
            let path = std::env::temp_dir().join(format!(
                "llama-cluster-config-test-{}-{n}.toml",
                std::process::id()
            ));
            let mut f = std::fs::File::create(&path).unwrap();
            f.write_all(body.as_bytes()).unwrap();
            TempPath(path)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
