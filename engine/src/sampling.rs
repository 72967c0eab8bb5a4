//! Token sampling at the last stage, with llama.cpp's own samplers:
//! repetition, frequency and presence penalties, top-k, top-p, temperature,
//! seeded distribution, or greedy when the temperature is 0.

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use serde::{Deserialize, Serialize};

use crate::{EngineError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: i32,
    /// 1 disables top-p.
    pub top_p: f32,
    /// 1 disables the penalty.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub penalty_last_n: i32,
    pub seed: u32,
    /// Subtracted from a token's logit once per time it occurs in the
    /// recent tokens (OpenAI's `frequency_penalty`; 0: off).
    #[serde(default)]
    pub frequency_penalty: f32,
    /// Subtracted from the logit of every token that occurs in the recent
    /// tokens (OpenAI's `presence_penalty`; 0: off).
    #[serde(default)]
    pub presence_penalty: f32,
    /// Report each sampled token's log-probability and those of this many
    /// most likely tokens (up to [`MAX_TOP_LOGPROBS`]; `None`: off).
    #[serde(default)]
    pub logprobs: Option<u8>,
}

/// Most alternatives a sampled token's log-probabilities list (OpenAI's).
pub const MAX_TOP_LOGPROBS: u8 = 20;

/// The log-probability of a sampled token and of the most likely tokens,
/// from the model's distribution at that step (the softmax of the raw
/// logits, before any sampler, as llama-server reports them).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenLogprobs {
    pub token: i32,
    pub logprob: f32,
    /// Most likely first.
    pub top: Vec<(i32, f32)>,
}

impl TokenLogprobs {
    /// Of `token` and the `k` most likely tokens under `logits`, in one
    /// pass for the top; logits that are not finite count as impossible,
    /// and a log-probability that is not finite is reported as -9999 (as
    /// OpenAI does), never as NaN.
    pub fn of(logits: &[f32], token: i32, k: usize) -> TokenLogprobs {
        let finite = || logits.iter().copied().filter(|x| x.is_finite());
        let max = finite().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = finite().map(|x| f64::from(x - max).exp()).sum();
        let lse = f64::from(max) + sum.ln();
        let lp = |x: f32| {
            let v = (f64::from(x) - lse) as f32;
            if v.is_finite() { v } else { -9999.0 }
        };
        // The k largest, most likely first (the first index on ties).
        let mut top: Vec<(i32, f32)> = Vec::with_capacity(k + 1);
        if k > 0 {
            for (t, &x) in logits.iter().enumerate() {
                if !x.is_finite() || (top.len() == k && top[k - 1].1 >= x) {
                    continue;
                }
                let at = top.partition_point(|&(_, y)| y >= x);
                top.insert(at, (t as i32, x));
                top.truncate(k);
            }
        }
        TokenLogprobs {
            token,
            logprob: usize::try_from(token)
                .ok()
                .and_then(|t| logits.get(t))
                .map_or(-9999.0, |&x| lp(x)),
            top: top.into_iter().map(|(t, x)| (t, lp(x))).collect(),
        }
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            repeat_penalty: 1.0,
            penalty_last_n: 64,
            seed: 0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(EngineError::InvalidInput(m.to_string()));
        if !self.temperature.is_finite() || self.temperature < 0.0 || self.temperature > 100.0 {
            return bad("temperature must be between 0 and 100");
        }
        if self.top_k < 0 {
            return bad("top_k must not be negative");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !self.repeat_penalty.is_finite() || self.repeat_penalty <= 0.0 {
            return bad("repeat_penalty must be greater than 0");
        }
        if self.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return Err(EngineError::InvalidInput(format!(
                "top_logprobs must be at most {MAX_TOP_LOGPROBS}"
            )));
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(v.is_finite() && (-2.0..=2.0).contains(&v)) {
                return Err(EngineError::InvalidInput(format!(
                    "{name} must be between -2 and 2"
                )));
            }
        }
        if self.penalty_last_n < -1 {
            return bad("penalty_last_n must be -1 (whole context), 0 (off) or positive");
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Whether any of the three penalties is on.
    pub fn has_penalties(&self) -> bool {
        self.repeat_penalty != 1.0 || self.frequency_penalty != 0.0 || self.presence_penalty != 0.0
    }
}

/// A session's sampler chain (it keeps the token history for the penalty).
pub struct Sampler {
    chain: LlamaSampler,
    /// Seed of the random choice (none when greedy). Each step draws from
    /// a generator seeded by this seed and the position being sampled, so
    /// that a session rebuilt elsewhere at the same position (failover)
    /// draws the same token.
    seed: Option<u32>,
    logprobs: Option<u8>,
}

/// The seed of the draw at `pos` (splitmix64 of seed and position).
fn step_seed(seed: u32, pos: u32) -> u32 {
    let mut z = ((seed as u64) << 32 | pos as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as u32
}

impl Sampler {
    pub fn new(p: &SamplingParams, n_vocab: usize) -> Result<Sampler> {
        p.validate()?;
        let mut list = Vec::new();
        if p.has_penalties() {
            list.push(LlamaSampler::penalties(
                n_vocab as i32,
                p.penalty_last_n,
                p.repeat_penalty,
                p.frequency_penalty,
                p.presence_penalty,
            ));
        }
        if p.is_greedy() {
            list.push(LlamaSampler::greedy());
        } else {
            if p.top_k > 0 {
                list.push(LlamaSampler::top_k(p.top_k));
            }
            if p.top_p < 1.0 {
                list.push(LlamaSampler::top_p(p.top_p, 1));
            }
            list.push(LlamaSampler::temp(p.temperature));
        }
        Ok(Sampler {
            chain: LlamaSampler::chain_simple(list),
            seed: (!p.is_greedy()).then_some(p.seed),
            logprobs: p.logprobs,
        })
    }

    /// Alternatives to report with each sampled token (`None`: no
    /// log-probabilities).
    pub fn logprobs(&self) -> Option<u8> {
        self.logprobs
    }

    /// Feeds tokens that are already in the context (the prompt).
    pub fn accept_history(&mut self, tokens: &[i32]) {
        for &t in tokens {
            self.chain.accept(LlamaToken(t));
        }
    }

    /// Picks the token at position `pos` from `logits` and records it.
    pub fn sample(&mut self, logits: &[f32], pos: u32) -> Result<i32> {
        let mut arr = LlamaTokenDataArray::from_iter(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| LlamaTokenData::new(LlamaToken(i as i32), l, 0.0)),
            false,
        );
        arr.apply_sampler(&mut self.chain);
        if let Some(seed) = self.seed {
            arr.apply_sampler(&mut LlamaSampler::dist(step_seed(seed, pos)));
        }
        let t = arr
            .selected_token()
            .ok_or_else(|| EngineError::Llama("the sampler selected no token".into()))?;
        self.chain.accept(t);
        Ok(t.0)
    }
}

/// Index of the largest value (first on ties).
pub fn argmax(v: &[f32]) -> i32 {
    let mut best = 0;
    for i in 1..v.len() {
        if v[i] > v[best] {
            best = i;
        }
    }
    best as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_max_and_penalty_changes_it() {
        crate::backend().unwrap();
        let logits = [0.1, 3.0, 2.9, -1.0];
        let mut s = Sampler::new(&SamplingParams::default(), 4).unwrap();
        assert_eq!(s.sample(&logits, 0).unwrap(), 1);
        assert_eq!(argmax(&logits), 1);
        let p = SamplingParams {
            repeat_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(&p, 4).unwrap();
        s.accept_history(&[1]);
        assert_eq!(s.sample(&logits, 0).unwrap(), 2, "token 1 is penalised");
        // 3.0 - 2 × 0.06 < 2.9 (twice seen), but 3.0 - 0.06 > 2.9 (once).
        let p = SamplingParams {
            frequency_penalty: 0.06,
            ..Default::default()
        };
        let mut s = Sampler::new(&p, 4).unwrap();
        s.accept_history(&[1, 1]);
        assert_eq!(s.sample(&logits, 0).unwrap(), 2, "twice seen");
        let mut s = Sampler::new(&p, 4).unwrap();
        s.accept_history(&[1]);
        assert_eq!(s.sample(&logits, 0).unwrap(), 1, "once seen");
        let p = SamplingParams {
            presence_penalty: 0.2,
            ..Default::default()
        };
        let mut s = Sampler::new(&p, 4).unwrap();
        s.accept_history(&[1]);
        assert_eq!(s.sample(&logits, 0).unwrap(), 2, "present");
    }

    #[test]
    fn logprobs_are_the_log_softmax_of_the_logits() {
        let logits = [1.0f32, 3.0, 2.0, 0.0];
        let z: f32 = logits.iter().map(|x| x.exp()).sum();
        let l = TokenLogprobs::of(&logits, 2, 2);
        assert!((l.logprob - (2.0f32.exp() / z).ln()).abs() < 1e-6, "{l:?}");
        assert_eq!(l.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2]);
        assert!((l.top[0].1 - (3.0f32.exp() / z).ln()).abs() < 1e-6);
        assert!(TokenLogprobs::of(&logits, 0, 0).top.is_empty());
        assert_eq!(TokenLogprobs::of(&logits, 0, 9).top.len(), 4);
        // Ties keep the first index; non-finite logits count as impossible.
        let odd = [2.0f32, f32::NAN, 2.0, f32::INFINITY, 1.0];
        let l = TokenLogprobs::of(&odd, 1, 3);
        assert_eq!(l.top.iter().map(|t| t.0).collect::<Vec<_>>(), [0, 2, 4]);
        assert_eq!(l.logprob, -9999.0);
        assert!(l.top.iter().all(|t| t.1.is_finite()));
    }

    #[test]
    fn seeded_sampling_repeats() {
        crate::backend().unwrap();
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.3).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 42,
            ..Default::default()
        };
        let run = || {
            let mut s = Sampler::new(&p, 100).unwrap();
            (0..20)
                .map(|pos| s.sample(&logits, pos).unwrap())
                .collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        assert!(a.iter().any(|&t| t != a[0]), "temperature 1 varies: {a:?}");
        // A sampler made afresh at position 10 (a session rebuilt after a
        // failover) draws what the first one drew there.
        let mut late = Sampler::new(&p, 100).unwrap();
        assert_eq!(late.sample(&logits, 10).unwrap(), a[10]);
    }

    #[test]
    fn bad_params_are_refused() {
        for p in [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                top_k: -2,
                ..Default::default()
            },
            SamplingParams {
                repeat_penalty: 0.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                frequency_penalty: 2.5,
                ..Default::default()
            },
            SamplingParams {
                presence_penalty: f32::NAN,
                ..Default::default()
            },
        ] {
            assert!(p.validate().is_err(), "{p:?}");
        }
    }
}
