//! Round trips and refusals of the activation frames.

use super::*;
use llama_cluster_engine::sampling::TokenLogprobs;

fn sample_request(payload: Payload) -> ActivationRequest {
    ActivationRequest {
        kind: FrameKind::Forward,
        session: 0xdead_beef_0000_0001,
        pos0: 17,
        want_logits: true,
        sample: true,
        budget_ms: 30_000,
        trace: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        driver: "12D3KooWdriver".into(),
        depth: 2,
        route: vec![Hop {
            peer: "12D3KooW".into(),
            shard_id: "m-L0-9".into(),
            layer_start: 0,
            layer_end: 9,
        }],
        sampling: Some(SamplingParams {
            temperature: 0.7,
            seed: 9,
            ..Default::default()
        }),
        history: vec![1, 2, 3],
        payload,
    }
}

#[test]
fn requests_round_trip() {
    for p in [
        Payload::None,
        Payload::Tokens(vec![5, 6, 7]),
        Payload::Hidden {
            n_tokens: 2,
            n_embd: 3,
            data: vec![1.5, -2.0, 0.0, 1e-7, 3.25, -0.5],
            f16: false,
        },
    ] {
        let r = sample_request(p);
        assert_eq!(ActivationRequest::decode(&r.encode()).unwrap(), r);
    }
    let r = sample_request(Payload::Hidden {
        n_tokens: 1,
        n_embd: 2,
        data: vec![1.5, -2.0],
        f16: true,
    });
    let back = ActivationRequest::decode(&r.encode()).unwrap();
    assert_eq!(back, r, "values exactly representable in f16 survive");
    // The frequency and presence penalties travel with flag 2.
    let mut r = sample_request(Payload::None);
    if let Some(s) = r.sampling.as_mut() {
        s.frequency_penalty = 0.5;
        s.presence_penalty = -0.25;
        s.logprobs = Some(0);
    }
    assert_eq!(ActivationRequest::decode(&r.encode()).unwrap(), r);
}

/// A request frame written by workers before the frequency and presence
/// penalties (sampling flag 1; the fuzz seed of that time).
const FLAG_1_FRAME: &[u8] = include_bytes!("testdata/flag1-tokens.bin");

/// One written with the penalties, before log-probabilities (flag 2).
const FLAG_2_FRAME: &[u8] = include_bytes!("testdata/flag2-tokens.bin");

#[test]
fn frames_of_workers_before_the_penalties_decode_and_are_written_alike() {
    let r = ActivationRequest::decode(FLAG_1_FRAME).unwrap();
    let s = r.sampling.clone().unwrap();
    assert_eq!((s.seed, s.repeat_penalty), (42, 1.1));
    assert_eq!((s.frequency_penalty, s.presence_penalty), (0.0, 0.0));
    assert_eq!(r.encode(), FLAG_1_FRAME, "no penalties: the old frame");
    let r = ActivationRequest::decode(FLAG_2_FRAME).unwrap();
    let s = r.sampling.clone().unwrap();
    assert_eq!((s.frequency_penalty, s.presence_penalty), (0.5, 0.25));
    assert_eq!(s.logprobs, None);
    assert_eq!(r.encode(), FLAG_2_FRAME, "no log-probabilities: flag 2");
}

#[test]
fn f32_payload_is_raw_bytes() {
    let data: Vec<f32> = (0..576).map(|i| i as f32 * 0.01).collect();
    let r = sample_request(Payload::Hidden {
        n_tokens: 1,
        n_embd: 576,
        data,
        f16: false,
    });
    let bytes = r.encode();
    let overhead = bytes.len() - 576 * 4;
    assert!(overhead < 200, "header is {overhead} bytes");
}

#[test]
fn garbage_is_rejected_not_panicking() {
    assert!(ActivationRequest::decode(b"").is_err());
    assert!(ActivationRequest::decode(b"LCA1").is_err());
    assert!(ActivationRequest::decode(b"XXXX\x01").is_err());
    let mut good = sample_request(Payload::Tokens(vec![1])).encode();
    good.push(0);
    assert!(ActivationRequest::decode(&good).is_err(), "trailing bytes");
    let mut lie = sample_request(Payload::Hidden {
        n_tokens: 1,
        n_embd: 2,
        data: vec![1.0, 2.0],
        f16: false,
    })
    .encode();
    lie.truncate(lie.len() - 4);
    assert!(
        ActivationRequest::decode(&lie).is_err(),
        "short hidden state"
    );
    for cut in 0..40 {
        let b = sample_request(Payload::Tokens(vec![1, 2])).encode();
        let _ = ActivationRequest::decode(&b[..cut.min(b.len())]);
    }
}

#[test]
fn responses_round_trip() {
    let r = ActivationResponse {
        error: None,
        token: Some(42),
        logits: vec![0.5, -1.0],
        hops: vec![HopStats {
            peer: "p".into(),
            shard_id: "s".into(),
            compute_us: 1234,
            bytes_in: 2304,
            open_sessions: 3,
            max_sessions: 8,
            batched: 2,
        }],
        logprobs: None,
    };
    assert_eq!(ActivationResponse::decode(&r.encode()).unwrap(), r);
    // Log-probabilities: a section after the hops, only when present.
    let with = ActivationResponse {
        logprobs: Some(TokenLogprobs {
            token: 42,
            logprob: -0.25,
            top: vec![(42, -0.25), (7, -1.5)],
        }),
        ..r.clone()
    };
    let bytes = with.encode();
    assert_eq!(bytes.len(), r.encode().len() + 4 + 4 + 1 + 2 * 8);
    assert_eq!(ActivationResponse::decode(&bytes).unwrap(), with);
    assert!(ActivationResponse::decode(&bytes[..bytes.len() - 3]).is_err());
    let e = ActivationResponse::error(codes::ROUTE, "route mismatch");
    assert_eq!(ActivationResponse::decode(&e.encode()).unwrap(), e);
    let e = ActivationResponse::error_at(codes::UNAVAILABLE, "gone", "12D3KooWpeer");
    assert_eq!(ActivationResponse::decode(&e.encode()).unwrap(), e);
}
