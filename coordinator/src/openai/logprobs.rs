//! Log-probabilities in OpenAI's two shapes: a chat choice's
//! `{"content": [{token, logprob, bytes, top_logprobs}]}`, and a legacy
//! completion's `{tokens, token_logprobs, top_logprobs, text_offset}`.

use llama_cluster_proto::v1::TokenLogprob;
use serde_json::{Map, Value, json};

/// A chat choice's (or chunk's) `logprobs` for `tokens`.
pub fn chat(tokens: &[TokenLogprob]) -> Value {
    let entry =
        |t: &TokenLogprob| json!({"token": t.token, "logprob": t.logprob, "bytes": t.bytes});
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(t);
            e["top_logprobs"] = t.top.iter().map(entry).collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// A legacy completion's `logprobs`, built as its tokens arrive;
/// `text_offset` counts characters from the start of the prompt, as
/// OpenAI's does (a character split over tokens counts once).
#[derive(Debug, Default)]
pub struct Completion {
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<Value>,
    /// Characters before the next token.
    offset: usize,
    /// Bytes of a character not complete yet.
    partial: Vec<u8>,
}

impl Completion {
    /// For a completion of `prompt`.
    pub fn after(prompt: &str) -> Completion {
        Completion {
            offset: prompt.chars().count(),
            ..Default::default()
        }
    }

    pub fn push(&mut self, tokens: &[TokenLogprob]) {
        for t in tokens {
            self.tokens.push(json!(t.token));
            self.token_logprobs.push(json!(t.logprob));
            // Tokens that render alike (special ones, halves of a
            // character) keep the likelier one's value.
            let mut top = Map::new();
            for a in &t.top {
                top.entry(a.token.clone()).or_insert(json!(a.logprob));
            }
            // The sampled token is always there, as with OpenAI (so up to
            // logprobs + 1 entries).
            if !t.top.is_empty() {
                top.entry(t.token.clone()).or_insert(json!(t.logprob));
            }
            self.top_logprobs.push(Value::Object(top));
            self.text_offset.push(json!(self.offset));
            self.partial.extend_from_slice(&t.bytes);
            let (chars, rest) = match std::str::from_utf8(&self.partial) {
                Ok(s) => (s.chars().count(), 0),
                Err(e) if e.error_len().is_none() => {
                    let done = &self.partial[..e.valid_up_to()];
                    let n = String::from_utf8_lossy(done).chars().count();
                    (n, self.partial.len() - e.valid_up_to())
                }
                Err(_) => (String::from_utf8_lossy(&self.partial).chars().count(), 0),
            };
            self.offset += chars;
            self.partial.drain(..self.partial.len() - rest);
        }
    }

    /// What was pushed since the last call (a streamed chunk's).
    pub fn take(&mut self) -> Value {
        let v = self.json();
        self.tokens.clear();
        self.token_logprobs.clear();
        self.top_logprobs.clear();
        self.text_offset.clear();
        v
    }

    pub fn json(&self) -> Value {
        json!({"tokens": self.tokens, "token_logprobs": self.token_logprobs,
               "top_logprobs": self.top_logprobs, "text_offset": self.text_offset})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(token: &str, logprob: f32, top: Vec<TokenLogprob>) -> TokenLogprob {
        TokenLogprob {
            token_id: 0,
            token: token.into(),
            bytes: token.as_bytes().to_vec(),
            logprob,
            top,
        }
    }

    #[test]
    fn both_shapes() {
        let toks = [
            t(
                " Paris",
                -0.5,
                vec![t(" Paris", -0.5, vec![]), t(" Lyon", -2.0, vec![])],
            ),
            t(".", -0.25, vec![t(".", -0.25, vec![])]),
        ];
        let c = chat(&toks);
        assert_eq!(c["content"][0]["token"], " Paris");
        assert_eq!(c["content"][0]["top_logprobs"][1]["token"], " Lyon");
        assert_eq!(c["content"][1]["bytes"], json!([46]));
        let mut l = Completion::after("The capital is");
        l.push(&toks[..1]);
        let first = l.take();
        assert_eq!(first["text_offset"], json!([14]));
        assert_eq!(first["top_logprobs"][0][" Lyon"], json!(-2.0));
        l.push(&toks[1..]);
        assert_eq!(l.json()["text_offset"], json!([20]));
        assert_eq!(l.json()["tokens"], json!(["."]));
        // A sampled token outside the top is listed too.
        let mut l = Completion::after("");
        l.push(&[t(" Nice", -3.0, vec![t(" Paris", -0.5, vec![])])]);
        assert_eq!(
            l.json()["top_logprobs"][0],
            json!({" Paris": -0.5, " Nice": -3.0})
        );
        // "é" split over two tokens counts as one character.
        let mut l = Completion::after("");
        let half = |b: u8| TokenLogprob {
            bytes: vec![b],
            token: "\u{fffd}".into(),
            ..Default::default()
        };
        l.push(&[half(0xC3), half(0xA9), t("!", -1.0, vec![])]);
        assert_eq!(l.json()["text_offset"], json!([0, 0, 1]));
    }
}
