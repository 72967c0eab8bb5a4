//! The binary activation protocol between pipeline stages
//! (`/llama-cluster/activation/1.0`): one length-prefixed frame per request
//! and per response, little-endian, raw f32 (or f16) hidden states — no JSON
//! floats on the hot path.
//!
//! Request: `LCA3`, kind, session, pos0, flags, budget_ms, trace context,
//! the driver's peer id, the stages in the whole route (depth),
//! the remaining route, sampling (at session start), prompt history, payload
//! (token ids or a `[n_tokens][n_embd]` hidden state).
//! Response: `LCR1`, status, error (with the peer at fault), sampled token,
//! optional logits, per-hop statistics (with the stage's open sessions and
//! session limit).

use std::io;

use llama_cluster_engine::sampling::{SamplingParams, TokenLogprobs};

/// Protocol name of the activation stream.
pub const ACTIVATION_PROTOCOL: &str = "/llama-cluster/activation/1.0";

/// Largest frame accepted (bytes).
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

const REQ_MAGIC: &[u8; 4] = b"LCA3";
const RESP_MAGIC: &[u8; 4] = b"LCR2";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Forward = 1,
    Close = 2,
}

/// One stage of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub peer: String,
    pub shard_id: String,
    pub layer_start: u32,
    pub layer_end: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    None,
    Tokens(Vec<i32>),
    /// `[n_tokens][n_embd]` row-major; sent as f16 when `f16` is set.
    Hidden {
        n_tokens: u32,
        n_embd: u32,
        data: Vec<f32>,
        f16: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ActivationRequest {
    pub kind: FrameKind,
    pub session: u64,
    pub pos0: u32,
    pub want_logits: bool,
    pub sample: bool,
    /// Milliseconds the whole rest of the chain may take.
    pub budget_ms: u32,
    /// W3C trace context of the caller (may be empty).
    pub trace: String,
    /// Peer id of the driver of the session: a stage frees the session
    /// when its connection to the driver closes.
    pub driver: String,
    /// Stages in the session's whole route (the driver's count; `route`
    /// holds only the rest of it): a stage runs its sessions in as many
    /// waves, so that all stages compute at once.
    pub depth: u8,
    /// This hop first, then the rest of the chain.
    pub route: Vec<Hop>,
    pub sampling: Option<SamplingParams>,
    pub history: Vec<i32>,
    pub payload: Payload,
}

/// Per-hop figures reported back along the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HopStats {
    pub peer: String,
    pub shard_id: String,
    pub compute_us: u64,
    pub bytes_in: u32,
    /// Sessions open on the stage after this step, and its session limit:
    /// live figures for route planning.
    pub open_sessions: u16,
    pub max_sessions: u16,
    /// Steps in the `llama_decode` call this step was part of.
    pub batched: u16,
}

/// Why a step failed, and the peer at fault when one is known (the stage
/// that did not answer, or that answered with the error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    pub code: u8,
    pub message: String,
    /// Peer id of the stage at fault (empty: none named).
    pub peer: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ActivationResponse {
    /// Empty when the step succeeded.
    pub error: Option<StepError>,
    pub token: Option<i32>,
    pub logits: Vec<f32>,
    pub hops: Vec<HopStats>,
    /// The sampled token's log-probabilities, when the session asked for
    /// them (a section after the hops, absent otherwise, so that a frame
    /// without them is the one of workers that predate them).
    pub logprobs: Option<TokenLogprobs>,
}

/// Error codes carried in responses.
pub mod codes {
    pub const INTERNAL: u8 = 1;
    pub const INVALID: u8 = 2;
    pub const BUSY: u8 = 3;
    pub const SESSION: u8 = 4;
    pub const ROUTE: u8 = 5;
    pub const UNAVAILABLE: u8 = 6;
    pub const TIMEOUT: u8 = 7;
}

impl ActivationResponse {
    pub fn error(code: u8, msg: impl Into<String>) -> Self {
        Self::error_at(code, msg, String::new())
    }

    /// An error that names the peer at fault.
    pub fn error_at(code: u8, msg: impl Into<String>, peer: impl Into<String>) -> Self {
        ActivationResponse {
            error: Some(StepError {
                code,
                message: msg.into(),
                peer: peer.into(),
            }),
            token: None,
            logits: vec![],
            hops: vec![],
            logprobs: None,
        }
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

#[derive(Default)]
struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v)
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn f32(&mut self, v: f32) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn str8(&mut self, s: &str) {
        let b = &s.as_bytes()[..s.len().min(255)];
        self.u8(b.len() as u8);
        self.0.extend_from_slice(b);
    }
    fn str16(&mut self, s: &str) {
        let b = &s.as_bytes()[..s.len().min(65535)];
        self.0.extend_from_slice(&(b.len() as u16).to_le_bytes());
        self.0.extend_from_slice(b);
    }
}

struct R<'a>(&'a [u8]);

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(bad(format!(
                "frame truncated: wanted {n} more bytes, {} left",
                self.0.len()
            )));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> io::Result<u16> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().map_err(|_| bad("u16"))?,
        ))
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| bad("u32"))?,
        ))
    }
    fn i32(&mut self) -> io::Result<i32> {
        Ok(i32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| bad("i32"))?,
        ))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| bad("u64"))?,
        ))
    }
    fn f32(&mut self) -> io::Result<f32> {
        Ok(f32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| bad("f32"))?,
        ))
    }
    fn str8(&mut self) -> io::Result<String> {
        let n = self.u8()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| bad("string is not UTF-8"))
    }
    fn str16(&mut self) -> io::Result<String> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| bad("string is not UTF-8"))
    }
    /// A count of items of `size` bytes each that must fit in what is left.
    fn count(&mut self, size: usize) -> io::Result<usize> {
        let n = self.u32()? as usize;
        if n.saturating_mul(size) > self.0.len() {
            return Err(bad(format!("count {n} exceeds the frame")));
        }
        Ok(n)
    }
    fn done(&self) -> io::Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(bad(format!("{} trailing bytes", self.0.len())))
        }
    }
}

impl ActivationRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = W::default();
        w.0.extend_from_slice(REQ_MAGIC);
        w.u8(self.kind as u8);
        w.u64(self.session);
        w.u32(self.pos0);
        let f16 = matches!(self.payload, Payload::Hidden { f16: true, .. });
        w.u8(u8::from(self.want_logits) | u8::from(self.sample) << 1 | u8::from(f16) << 2);
        w.u32(self.budget_ms);
        w.str16(&self.trace);
        w.str8(&self.driver);
        w.u8(self.depth);
        w.u8(self.route.len().min(255) as u8);
        for h in self.route.iter().take(255) {
            w.str8(&h.peer);
            w.str8(&h.shard_id);
            w.u32(h.layer_start);
            w.u32(h.layer_end);
        }
        // Flag 2 adds the frequency and presence penalties, flag 3 those and
        // the log-probabilities asked for; without them the frame is the one
        // of workers that predate them (flag 1).
        match &self.sampling {
            None => w.u8(0),
            Some(s) => {
                let flag = if s.logprobs.is_some() {
                    3
                } else if s.frequency_penalty != 0.0 || s.presence_penalty != 0.0 {
                    2
                } else {
                    1
                };
                w.u8(flag);
                w.f32(s.temperature);
                w.i32(s.top_k);
                w.f32(s.top_p);
                w.f32(s.repeat_penalty);
                w.i32(s.penalty_last_n);
                w.u32(s.seed);
                if flag >= 2 {
                    w.f32(s.frequency_penalty);
                    w.f32(s.presence_penalty);
                }
                if flag == 3 {
                    // The sampled token's and this many more.
                    w.u8(s.logprobs.unwrap_or(0));
                }
            }
        }
        w.u32(self.history.len() as u32);
        self.history.iter().for_each(|&t| w.i32(t));
        match &self.payload {
            Payload::None => w.u8(0),
            Payload::Tokens(t) => {
                w.u8(1);
                w.u32(t.len() as u32);
                t.iter().for_each(|&x| w.i32(x));
            }
            Payload::Hidden {
                n_tokens,
                n_embd,
                data,
                f16,
            } => {
                w.u8(2);
                w.u8(u8::from(*f16));
                w.u32(*n_tokens);
                w.u32(*n_embd);
                if *f16 {
                    for &x in data {
                        w.0.extend_from_slice(&half::f16::from_f32(x).to_le_bytes());
                    }
                } else {
                    w.0.reserve(data.len() * 4);
                    for &x in data {
                        w.f32(x);
                    }
                }
            }
        }
        w.0
    }

    pub fn decode(bytes: &[u8]) -> io::Result<Self> {
        let mut r = R(bytes);
        if r.take(4)? != REQ_MAGIC {
            return Err(bad("not an activation request (bad magic)"));
        }
        let kind = match r.u8()? {
            1 => FrameKind::Forward,
            2 => FrameKind::Close,
            k => return Err(bad(format!("unknown frame kind {k}"))),
        };
        let session = r.u64()?;
        let pos0 = r.u32()?;
        let flags = r.u8()?;
        let budget_ms = r.u32()?;
        let trace = r.str16()?;
        let driver = r.str8()?;
        let depth = r.u8()?;
        let n_hops = r.u8()? as usize;
        let mut route = Vec::with_capacity(n_hops);
        for _ in 0..n_hops {
            route.push(Hop {
                peer: r.str8()?,
                shard_id: r.str8()?,
                layer_start: r.u32()?,
                layer_end: r.u32()?,
            });
        }
        let sampling = match r.u8()? {
            0 => None,
            flag @ (1..=3) => {
                let mut s = SamplingParams {
                    temperature: r.f32()?,
                    top_k: r.i32()?,
                    top_p: r.f32()?,
                    repeat_penalty: r.f32()?,
                    penalty_last_n: r.i32()?,
                    seed: r.u32()?,
                    ..Default::default()
                };
                if flag >= 2 {
                    s.frequency_penalty = r.f32()?;
                    s.presence_penalty = r.f32()?;
                }
                if flag == 3 {
                    s.logprobs = Some(r.u8()?);
                }
                Some(s)
            }
            x => return Err(bad(format!("bad sampling flag {x}"))),
        };
        let n_hist = r.count(4)?;
        let history = (0..n_hist)
            .map(|_| r.i32())
            .collect::<io::Result<Vec<_>>>()?;
        let payload = match r.u8()? {
            0 => Payload::None,
            1 => {
                let n = r.count(4)?;
                Payload::Tokens((0..n).map(|_| r.i32()).collect::<io::Result<Vec<_>>>()?)
            }
            2 => {
                let f16 = r.u8()? == 1;
                let n_tokens = r.u32()?;
                let n_embd = r.u32()?;
                let n = (n_tokens as usize)
                    .checked_mul(n_embd as usize)
                    .ok_or_else(|| bad("hidden shape overflows"))?;
                let size = if f16 { 2 } else { 4 };
                if n.saturating_mul(size) != r.0.len() {
                    return Err(bad(format!(
                        "hidden state [{n_tokens}][{n_embd}] needs {} bytes, frame has {}",
                        n.saturating_mul(size),
                        r.0.len()
                    )));
                }
                let raw = r.take(n * size)?;
                let data = if f16 {
                    raw.chunks_exact(2)
                        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                        .collect()
                } else {
                    raw.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()
                };
                Payload::Hidden {
                    n_tokens,
                    n_embd,
                    data,
                    f16,
                }
            }
            p => return Err(bad(format!("unknown payload kind {p}"))),
        };
        r.done()?;
        Ok(ActivationRequest {
            kind,
            session,
            pos0,
            want_logits: flags & 1 != 0,
            sample: flags & 2 != 0,
            budget_ms,
            trace,
            driver,
            depth,
            route,
            sampling,
            history,
            payload,
        })
    }
}

impl ActivationResponse {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = W::default();
        w.0.extend_from_slice(RESP_MAGIC);
        match &self.error {
            None => w.u8(0),
            Some(e) => {
                w.u8(e.code);
                w.str16(&e.message);
                w.str8(&e.peer);
            }
        }
        w.i32(self.token.unwrap_or(-1));
        w.u32(self.logits.len() as u32);
        self.logits.iter().for_each(|&x| w.f32(x));
        w.u8(self.hops.len().min(255) as u8);
        for h in self.hops.iter().take(255) {
            w.str8(&h.peer);
            w.str8(&h.shard_id);
            w.u64(h.compute_us);
            w.u32(h.bytes_in);
            w.u16(h.open_sessions);
            w.u16(h.max_sessions);
            w.u16(h.batched);
        }
        if let Some(l) = &self.logprobs {
            w.i32(l.token);
            w.f32(l.logprob);
            w.u8(l.top.len().min(255) as u8);
            for &(t, lp) in l.top.iter().take(255) {
                w.i32(t);
                w.f32(lp);
            }
        }
        w.0
    }

    pub fn decode(bytes: &[u8]) -> io::Result<Self> {
        let mut r = R(bytes);
        if r.take(4)? != RESP_MAGIC {
            return Err(bad("not an activation response (bad magic)"));
        }
        let error = match r.u8()? {
            0 => None,
            code => Some(StepError {
                code,
                message: r.str16()?,
                peer: r.str8()?,
            }),
        };
        let token = Some(r.i32()?).filter(|&t| t >= 0);
        let n = r.count(4)?;
        let logits = (0..n).map(|_| r.f32()).collect::<io::Result<Vec<_>>>()?;
        let n_hops = r.u8()? as usize;
        let mut hops = Vec::with_capacity(n_hops);
        for _ in 0..n_hops {
            hops.push(HopStats {
                peer: r.str8()?,
                shard_id: r.str8()?,
                compute_us: r.u64()?,
                bytes_in: r.u32()?,
                open_sessions: r.u16()?,
                max_sessions: r.u16()?,
                batched: r.u16()?,
            });
        }
        let logprobs = if r.0.is_empty() {
            None
        } else {
            let token = r.i32()?;
            let logprob = r.f32()?;
            let n = r.u8()?;
            let top = (0..n)
                .map(|_| Ok((r.i32()?, r.f32()?)))
                .collect::<io::Result<Vec<_>>>()?;
            Some(TokenLogprobs {
                token,
                logprob,
                top,
            })
        };
        r.done()?;
        Ok(ActivationResponse {
            error,
            token,
            logits,
            hops,
            logprobs,
        })
    }
}

#[cfg(test)]
#[path = "frame_tests.rs"]
mod tests;
