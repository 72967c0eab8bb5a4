//! The decoders that read bytes from the network or from disk, each called
//! as the node calls it: the fuzz targets in `fuzz/` run these, and
//! `tests/tests/fuzz_regressions.rs` replays the saved inputs
//! (`fuzz/regressions/<target>/`) through them on stable. Each returns
//! whether the input was accepted; malformed input must be refused, never
//! panic, and no length field may allocate beyond the input's size.

use llama_cluster_engine::manifest::Manifest;
use llama_cluster_engine::split::{self, SplitPlan};
use llama_cluster_shared::protocol::{CommandResponse, Incoming, parse_incoming};
use llama_worker::net::frame::{ActivationRequest, ActivationResponse};
use llama_worker::torrent::meta::TorrentMeta;
use llama_worker::torrent::protocol::{MAX_META, TorrentRequest, TorrentResponse};

/// A decoder under fuzzing: whether it accepted the input.
pub type Decoder = fn(&[u8]) -> bool;

/// The fuzz targets, by name (the directory names under `fuzz/regressions/`).
pub const TARGETS: &[(&str, Decoder)] = &[
    ("json_command", json_command),
    ("activation_frame", activation_frame),
    ("torrent", torrent),
    ("manifest", manifest),
    ("gguf_header", gguf_header),
];

/// `/json-message/1.0`: a request body as the dispatcher parses it (with
/// its command's params as JSON), and a response body as a sender reads it.
pub fn json_command(data: &[u8]) -> bool {
    let request = match parse_incoming(
        data,
        llama_cluster_shared::config::DEFAULT_MAX_MESSAGE_BYTES,
    ) {
        Ok(Incoming::Command(c)) => {
            let _ = serde_json::to_vec(&c.params);
            true
        }
        Ok(Incoming::Message(_)) => true,
        Err(e) => {
            let _ = e.code();
            false
        }
    };
    let response = serde_json::from_slice::<CommandResponse>(data).is_ok();
    request || response
}

/// `/llama-cluster/activation/1.0`: a request frame and a response frame;
/// what decodes encodes to bytes that decode and encode to the same bytes.
pub fn activation_frame(data: &[u8]) -> bool {
    let req = ActivationRequest::decode(data).ok();
    if let Some(r) = &req {
        let once = r.encode();
        let again = ActivationRequest::decode(&once).expect("an encoded request decodes");
        assert_eq!(
            again.encode(),
            once,
            "a request re-encodes to the same bytes"
        );
    }
    let resp = ActivationResponse::decode(data).ok();
    if let Some(r) = &resp {
        let once = r.encode();
        let again = ActivationResponse::decode(&once).expect("an encoded response decodes");
        assert_eq!(
            again.encode(),
            once,
            "a response re-encodes to the same bytes"
        );
    }
    req.is_some() || resp.is_some()
}

/// `/llama-cluster/torrent/1.0`: a request, a response, and a metadata
/// document as a leecher checks it.
pub fn torrent(data: &[u8]) -> bool {
    let req = TorrentRequest::decode(data).is_ok();
    let resp = TorrentResponse::decode(data.to_vec()).is_ok();
    let meta = data.len() <= MAX_META
        && serde_json::from_slice::<TorrentMeta>(data).is_ok_and(|m| {
            let ok = m.validate().is_ok();
            if ok {
                for i in 0..m.n_pieces() {
                    let _ = m.piece_len(i);
                }
                let _ = m.check_piece(m.n_pieces().saturating_sub(1), &data[..data.len().min(64)]);
            }
            ok
        });
    req || resp || meta
}

/// A split manifest as a worker adopts one from LoadShard (`manifest_json`)
/// or reads one from disk, with the figures placement takes from it.
pub fn manifest(data: &[u8]) -> bool {
    let Ok(m) = serde_json::from_slice::<Manifest>(data) else {
        return false;
    };
    if m.check().is_err() {
        return false;
    }
    for s in &m.shards {
        let _ = (s.n_layers(), s.memory_bytes(2048), s.memory_bytes(u32::MAX));
    }
    true
}

/// A GGUF file's header as the splitter reads it (metadata, tensor
/// descriptions, the byte-balanced ranges of a 2-shard plan), through
/// ggml's gguf reader; the bytes go to a file of this process first.
pub fn gguf_header(data: &[u8]) -> bool {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(llama_cluster_engine::ffi::silence_ggml_logs);
    let path = std::env::temp_dir().join(format!("llama-cluster-fuzz-{}.gguf", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return false;
    }
    let ok = split::inspect(&path, &SplitPlan::Count(2)).is_ok();
    let _ = std::fs::remove_file(&path);
    ok
}
