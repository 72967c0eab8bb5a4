//! The fuzz targets' saved inputs, replayed on stable through the same
//! decoders (`llama_cluster_tests::fuzz_cases`): every input under
//! `fuzz/regressions/<target>/` (crashes found and fixed since, and
//! hand-made inputs at the limits of length fields) is refused or accepted
//! without a panic, the ones named `*.refused` are refused, and every seed
//! under `fuzz/seeds/<target>/` (valid inputs, the fuzzers' starting
//! corpus) is accepted. `write_seeds` (ignored) writes the seeds again.

use std::path::{Path, PathBuf};

use llama_cluster_tests::fuzz_cases::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    v.retain(|p| p.is_file());
    v.sort();
    v
}

#[test]
fn saved_fuzz_inputs_are_refused_or_accepted_without_panic() {
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (name, decode) in TARGETS {
        let seeds = inputs(&fuzz_dir().join("seeds").join(name));
        assert!(!seeds.is_empty(), "no seeds for {name}");
        let regressions = inputs(&fuzz_dir().join("regressions").join(name));
        for (path, is_seed) in seeds
            .iter()
            .map(|p| (p, true))
            .chain(regressions.iter().map(|p| (p, false)))
        {
            let data = std::fs::read(path).unwrap();
            replayed += 1;
            let outcome = std::panic::catch_unwind(|| decode(&data));
            let refused_expected = path.extension().is_some_and(|e| e == "refused");
            match outcome {
                Err(_) => failures.push(format!("{name}: {} panics", path.display())),
                Ok(false) if is_seed => {
                    failures.push(format!("{name}: seed {} is refused", path.display()))
                }
                Ok(true) if refused_expected => {
                    failures.push(format!("{name}: {} is accepted", path.display()))
                }
                Ok(_) => {}
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    println!("{replayed} inputs replayed");
}

/// Writes the seeds of the targets whose inputs are made by the code
/// (`cargo test --test fuzz_regressions -- --ignored write_seeds`); the
/// GGUF seed comes from `fuzz/make_gguf_seed.py`.
#[test]
#[ignore]
fn write_seeds() {
    use llama_cluster_engine::manifest::{FileEntry, Manifest, ShardEntry};
    use llama_cluster_engine::sampling::SamplingParams;
    use llama_cluster_shared::protocol::{Command, CommandKind, CommandResponse, JsonMessage};
    use llama_worker::net::frame::*;
    use llama_worker::torrent::meta::TorrentMeta;
    use llama_worker::torrent::protocol::{TorrentRequest, TorrentResponse};

    let put = |target: &str, name: &str, data: &[u8]| {
        let dir = fuzz_dir().join("seeds").join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    };
    let status = Command::new(
        CommandKind::GetStatus,
        "peer-a",
        "r1",
        serde_json::json!({}),
    );
    put(
        "json_command",
        "get-status.json",
        &serde_json::to_vec(&status).unwrap(),
    );
    let load = Command::new(
        CommandKind::LoadShard,
        "peer-a",
        "r2",
        serde_json::json!({"shard_id": "m-L0-9", "unload": false}),
    );
    put(
        "json_command",
        "load-shard.json",
        &serde_json::to_vec(&load).unwrap(),
    );
    let msg = JsonMessage {
        from: "peer-a".into(),
        message: "hello".into(),
        timestamp: 1,
    };
    put(
        "json_command",
        "message.json",
        &serde_json::to_vec(&msg).unwrap(),
    );
    let ok = CommandResponse::ok(&status, "peer-b", serde_json::json!({"ok": true}));
    put(
        "json_command",
        "response.json",
        &serde_json::to_vec(&ok).unwrap(),
    );

    let hop = |p: &str| Hop {
        peer: p.into(),
        shard_id: format!("m-{p}"),
        layer_start: 0,
        layer_end: 9,
    };
    let req = |payload| ActivationRequest {
        kind: FrameKind::Forward,
        session: 7,
        pos0: 3,
        want_logits: true,
        sample: true,
        budget_ms: 1000,
        trace: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        driver: "peer-d".into(),
        depth: 2,
        route: vec![hop("a"), hop("b")],
        sampling: Some(SamplingParams {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            repeat_penalty: 1.1,
            penalty_last_n: 64,
            seed: 42,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            logprobs: Some(2),
        }),
        history: vec![1, 2, 3],
        payload,
    };
    put(
        "activation_frame",
        "tokens.bin",
        &req(Payload::Tokens(vec![5, 6])).encode(),
    );
    for (name, f16) in [("hidden-f32.bin", false), ("hidden-f16.bin", true)] {
        let data = (0..8).map(|i| i as f32 * 0.25).collect();
        let p = Payload::Hidden {
            n_tokens: 2,
            n_embd: 4,
            data,
            f16,
        };
        put("activation_frame", name, &req(p).encode());
    }
    let resp = ActivationResponse {
        error: None,
        token: Some(9),
        logits: vec![0.5, -1.0],
        hops: vec![HopStats {
            peer: "a".into(),
            shard_id: "m-a".into(),
            compute_us: 10,
            bytes_in: 64,
            open_sessions: 1,
            max_sessions: 4,
            batched: 1,
        }],
        logprobs: Some(llama_cluster_engine::sampling::TokenLogprobs {
            token: 9,
            logprob: -0.5,
            top: vec![(9, -0.5), (3, -1.25)],
        }),
    };
    put("activation_frame", "response.bin", &resp.encode());
    put(
        "activation_frame",
        "error.bin",
        &ActivationResponse::error_at(codes::BUSY, "busy", "peer-a").encode(),
    );

    let h = "ab".repeat(32);
    put(
        "torrent",
        "meta-request.bin",
        &TorrentRequest::Meta {
            file_hash: h.clone(),
        }
        .encode(),
    );
    put(
        "torrent",
        "piece-request.bin",
        &TorrentRequest::Piece {
            file_hash: h,
            index: 2,
        }
        .encode(),
    );
    put(
        "torrent",
        "piece-response.bin",
        &TorrentResponse::Piece {
            index: 1,
            data: bytes::Bytes::from_static(b"piece"),
        }
        .encode(),
    );
    let dir = llama_cluster_tests::test_dir("fuzz-seeds");
    let file = dir.join("three-bytes");
    std::fs::write(&file, b"abc").unwrap();
    let meta = TorrentMeta::from_file(&file, "three-bytes").unwrap();
    put("torrent", "meta.json", &meta.encode());

    let entry = |f: &str| FileEntry {
        file: f.into(),
        size: 10,
        hash: "cd".repeat(32),
        pieces_hash: String::new(),
    };
    let shard = |i: u32, a: u32, b: u32| ShardEntry {
        id: format!("m-L{a}-{b}"),
        index: i,
        layer_start: a,
        layer_end: b,
        tensor_bytes: 1000,
        kv_bytes_per_token: 64,
        file: entry(&format!("m.L{a}-{b}.gguf")),
    };
    let m = Manifest {
        format: 1,
        model: "m".into(),
        architecture: "llama".into(),
        n_layer: 30,
        n_embd: 576,
        n_vocab: 49152,
        hash_algorithm: "blake3".into(),
        source: entry("m.gguf"),
        head: entry("m.head.gguf"),
        shards: vec![shard(0, 0, 14), shard(1, 15, 29)],
    };
    put(
        "manifest",
        "two-shards.json",
        &serde_json::to_vec(&m).unwrap(),
    );
}
