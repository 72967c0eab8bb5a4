//! An OpenAI request body read into the pipeline's `InferenceRequest`.
//!
//! What llama-cluster serves is read (with llama-server's extensions
//! `top_k`, `repeat_penalty` and `ignore_eos`); a field it would otherwise
//! have to ignore (log-probabilities, tools, a JSON response format, …) is
//! refused with a 400 that names it,
//! so that no client gets an answer to a question it did not ask.

use llama_cluster_proto::v1::{ChatMessage, InferenceRequest};
use serde_json::{Map, Value};

/// Largest `max_tokens` accepted before asking a worker.
const MAX_TOKENS_LIMIT: u64 = 1 << 20;

/// Most alternatives of a token's log-probabilities (OpenAI's and the
/// workers' limit).
const MAX_TOP_LOGPROBS: u8 = 20;

/// Most choices one request may ask for (`n`).
pub const MAX_CHOICES: u64 = 16;

/// Most runs one request may make: prompts × `n`, each a session of its
/// own that waits in the queue like any other request.
pub const MAX_RUNS: usize = 64;

/// A request the API can serve.
#[derive(Debug)]
pub struct ApiRequest {
    /// The fields every run shares (chat: the conversation too).
    pub req: InferenceRequest,
    /// The prompts of a completion (several: a batch, OpenAI's prompt list);
    /// empty for a chat.
    pub prompts: Vec<String>,
    pub stream: bool,
    /// Choices per prompt (`n`).
    pub n: u32,
    /// `stream_options.include_usage`: the usage in a last chunk of its own.
    pub include_usage: bool,
}

impl ApiRequest {
    /// The runs, in the order of their choice index: prompt `p`'s choice
    /// `j` is index `p × n + j`, its seed the request's moved by `j`, so that
    /// sampled choices differ and each is reproducible.
    pub fn runs(&self) -> Vec<InferenceRequest> {
        let prompts: Vec<Option<&String>> = if self.prompts.is_empty() {
            vec![None]
        } else {
            self.prompts.iter().map(Some).collect()
        };
        let mut runs = Vec::with_capacity(prompts.len() * self.n as usize);
        for p in prompts {
            for j in 0..self.n {
                let mut r = self.req.clone();
                if let Some(p) = p {
                    r.prompt = p.clone();
                }
                // Workers seed with 32 bits.
                r.seed = u64::from((r.seed as u32).wrapping_add(j));
                runs.push(r);
            }
        }
        runs
    }
}

/// Why a request body cannot be served: an OpenAI `invalid_request_error`
/// (400) about `param`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BadRequest {
    pub message: String,
    pub param: &'static str,
}

fn bad(message: impl Into<String>, param: &'static str) -> BadRequest {
    BadRequest {
        message: message.into(),
        param,
    }
}

/// Reads the body of `POST /v1/chat/completions` (`chat`) or
/// `POST /v1/completions`.
pub fn parse(body: &[u8], chat: bool) -> Result<ApiRequest, BadRequest> {
    let body = match serde_json::from_slice(body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(bad("the request body must be a JSON object", "body")),
        Err(e) => return Err(bad(format!("malformed JSON: {e}"), "body")),
    };
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("model is required", "model"))?;
    let mut req = InferenceRequest {
        model: model.to_string(),
        ..Default::default()
    };
    let mut prompts = vec![];
    if chat {
        req.messages = messages(&body)?;
    } else {
        prompts = prompt(&body)?;
    }
    refuse_unserved(&body, chat)?;
    sampling(&body, &mut req)?;
    logprobs(&body, chat, &mut req)?;
    let n = match field(&body, "n") {
        None => 1,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=MAX_CHOICES).contains(n))
            .ok_or_else(|| bad(format!("n must be between 1 and {MAX_CHOICES}"), "n"))?
            as u32,
    };
    if prompts.len().max(1) * n as usize > MAX_RUNS {
        return Err(bad(
            format!(
                "{} prompts × n = {n} asks for more than {MAX_RUNS} completions in one request",
                prompts.len()
            ),
            "n",
        ));
    }
    let stream = match field(&body, "stream") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("stream must be a boolean", "stream")),
    };
    let include_usage = match field(&body, "stream_options").map(|o| o.get("include_usage")) {
        None | Some(None | Some(Value::Null)) => false,
        Some(Some(Value::Bool(b))) => *b,
        Some(Some(_)) => {
            return Err(bad(
                "stream_options.include_usage must be a boolean",
                "stream_options",
            ));
        }
    };
    Ok(ApiRequest {
        req,
        prompts,
        stream,
        n,
        include_usage,
    })
}

/// A field that is present and not null.
fn field<'a>(body: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    body.get(k).filter(|v| !v.is_null())
}

/// The prompt of a completion, or OpenAI's list of prompts (a batch).
fn prompt(body: &Map<String, Value>) -> Result<Vec<String>, BadRequest> {
    let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(String::from);
    match body.get("prompt") {
        Some(Value::String(p)) if !p.is_empty() => Ok(vec![p.clone()]),
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_number) => Err(bad(
            "prompts of token ids are not served: send the prompt as text",
            "prompt",
        )),
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .map(text)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                bad(
                    "every prompt in the list must be a non-empty string",
                    "prompt",
                )
            }),
        _ => Err(bad(
            "prompt must be a non-empty string or a list of them",
            "prompt",
        )),
    }
}

/// The conversation: string content, or a list of text parts joined by
/// newlines (as llama.cpp's server does); `developer` is OpenAI's newer
/// name for `system`.
fn messages(body: &Map<String, Value>) -> Result<Vec<ChatMessage>, BadRequest> {
    let msgs = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("messages must be a list", "messages"))?;
    if msgs.is_empty() {
        return Err(bad("messages must not be empty", "messages"));
    }
    msgs.iter()
        .map(|m| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("every message needs a string role", "messages"))?;
            let role = match role {
                "system" | "developer" => "system",
                "user" | "assistant" => role,
                "tool" | "function" => {
                    return Err(bad(
                        format!("{role} messages are not served: there is no function calling"),
                        "messages",
                    ));
                }
                other => return Err(bad(format!("unknown message role {other:?}"), "messages")),
            };
            if m.get("tool_calls")
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty())
                || m.get("function_call").is_some_and(|f| !f.is_null())
            {
                return Err(bad(
                    "messages with tool calls are not served: there is no function calling",
                    "messages",
                ));
            }
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None if role == "assistant" => String::new(),
                Some(Value::Array(parts)) => text_parts(parts)?,
                _ => {
                    return Err(bad(
                        "every message needs content: a string or a list of text parts",
                        "messages",
                    ));
                }
            };
            Ok(ChatMessage {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

fn text_parts(parts: &[Value]) -> Result<String, BadRequest> {
    let mut text = String::new();
    for p in parts {
        match p.get("type").and_then(Value::as_str) {
            Some("text") => {
                let t = p
                    .get("text")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("a text content part needs a string text", "messages"))?;
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(t);
            }
            Some(other) => {
                return Err(bad(
                    format!(
                        "content parts of type {other:?} are not served: this API takes text only"
                    ),
                    "messages",
                ));
            }
            None => return Err(bad("every content part needs a type", "messages")),
        }
    }
    Ok(text)
}

/// Refuses the fields whose meaning the API would otherwise drop.
fn refuse_unserved(body: &Map<String, Value>, chat: bool) -> Result<(), BadRequest> {
    let truthy = |k: &str| match field(body, k) {
        None | Some(Value::Bool(false)) => false,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    };
    let refused: [(&'static str, &str); 5] = [
        ("tools", "tools (function calling) are not served"),
        ("functions", "functions (function calling) are not served"),
        ("echo", "echo is not served"),
        ("suffix", "suffix (insertion) is not served"),
        ("audio", "audio output is not served"),
    ];
    for (k, why) in refused {
        if truthy(k) {
            return Err(bad(why, k));
        }
    }
    if let Some(Value::Object(biases)) = field(body, "logit_bias")
        && biases.values().any(|b| b.as_f64() != Some(0.0))
    {
        return Err(bad("logit_bias is not served", "logit_bias"));
    }
    if let Some(b) = field(body, "best_of")
        && b.as_u64() != Some(1)
        && b != body.get("n").unwrap_or(&Value::Null)
    {
        return Err(bad(
            "best_of is not served: ask for n choices instead",
            "best_of",
        ));
    }
    if let Some(f) = field(body, "response_format") {
        let kind = f.get("type").and_then(Value::as_str);
        if kind != Some("text") {
            return Err(bad(
                format!(
                    "response_format {} is not served: output is text only",
                    kind.map_or_else(|| f.to_string(), |k| format!("{k:?}"))
                ),
                "response_format",
            ));
        }
    }
    if chat
        && let Some(m) = field(body, "modalities")
        && m.as_array()
            .is_none_or(|a| a.iter().any(|x| x.as_str() != Some("text")))
    {
        return Err(bad("only text output is served", "modalities"));
    }
    Ok(())
}

/// Log-probabilities: a chat's `logprobs` (bool) and `top_logprobs`, a
/// legacy completion's `logprobs` (how many alternatives).
fn logprobs(
    body: &Map<String, Value>,
    chat: bool,
    req: &mut InferenceRequest,
) -> Result<(), BadRequest> {
    let limit = u64::from(MAX_TOP_LOGPROBS);
    let count = |k: &'static str| match field(body, k) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|n| *n <= limit)
            .map(Some)
            .ok_or_else(|| bad(format!("{k} must be an integer from 0 to {limit}"), k)),
    };
    if chat {
        req.logprobs = match field(body, "logprobs") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad("logprobs must be a boolean", "logprobs")),
        };
        let top = count("top_logprobs")?;
        if top.is_some_and(|n| n > 0) && !req.logprobs {
            return Err(bad(
                "top_logprobs needs logprobs set to true",
                "top_logprobs",
            ));
        }
        req.top_logprobs = top.unwrap_or(0) as u32;
    } else if let Some(n) = count("logprobs")? {
        req.logprobs = true;
        req.top_logprobs = n as u32;
    }
    Ok(())
}

/// Length and sampling: OpenAI's fields and llama-server's extensions.
fn sampling(body: &Map<String, Value>, req: &mut InferenceRequest) -> Result<(), BadRequest> {
    if let Some((v, param)) = field(body, "max_tokens")
        .map(|v| (v, "max_tokens"))
        .or_else(|| field(body, "max_completion_tokens").map(|v| (v, "max_completion_tokens")))
    {
        let n = v
            .as_u64()
            .ok_or_else(|| bad(format!("{param} must be a positive integer"), param))?;
        if n == 0 || n > MAX_TOKENS_LIMIT {
            return Err(bad(
                format!("{param} must be between 1 and {MAX_TOKENS_LIMIT}, got {n}"),
                param,
            ));
        }
        req.max_tokens = n as u32;
    }
    if let Some(t) = field(body, "temperature") {
        req.temperature = t
            .as_f64()
            .filter(|t| (0.0..=2.0).contains(t))
            .ok_or_else(|| bad("temperature must be between 0 and 2", "temperature"))?
            as f32;
    }
    if let Some(p) = field(body, "top_p") {
        req.top_p = p
            .as_f64()
            .filter(|p| *p > 0.0 && *p <= 1.0)
            .ok_or_else(|| bad("top_p must be in (0, 1]", "top_p"))? as f32;
    }
    if let Some(k) = field(body, "top_k") {
        req.top_k = k
            .as_u64()
            .and_then(|k| u32::try_from(k).ok())
            .ok_or_else(|| bad("top_k must be a non-negative integer (0: off)", "top_k"))?;
    }
    if let Some(p) = field(body, "repeat_penalty") {
        req.repeat_penalty = p
            .as_f64()
            .filter(|p| *p > 0.0 && *p <= 10.0)
            .ok_or_else(|| {
                bad(
                    "repeat_penalty must be in (0, 10] (1: off)",
                    "repeat_penalty",
                )
            })? as f32;
    }
    for (k, slot) in [
        ("frequency_penalty", &mut req.frequency_penalty),
        ("presence_penalty", &mut req.presence_penalty),
    ] {
        if let Some(v) = field(body, k) {
            *slot = v
                .as_f64()
                .filter(|v| (-2.0..=2.0).contains(v))
                .ok_or_else(|| bad(format!("{k} must be between -2 and 2"), k))?
                as f32;
        }
    }
    // Without a seed, one is drawn, as OpenAI and llama-server sample
    // afresh each time; a resumed request keeps it (the coordinator resends
    // the same request), so its sampled tokens stay the same.
    req.seed = match field(body, "seed") {
        Some(s) => s
            .as_u64()
            .ok_or_else(|| bad("seed must be a non-negative integer", "seed"))?,
        None => getrandom::u32().map_or(0, u64::from),
    };
    match field(body, "stop") {
        None => {}
        Some(Value::String(s)) => req.stop = vec![s.clone()],
        Some(Value::Array(a)) => {
            req.stop = a
                .iter()
                .map(|v| v.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("stop must be a string or a list of strings", "stop"))?
        }
        Some(_) => return Err(bad("stop must be a string or a list of strings", "stop")),
    }
    // llama-server's and vLLM's extension (benchmarks): generate past
    // end-of-generation tokens.
    match field(body, "ignore_eos") {
        None => {}
        Some(Value::Bool(b)) => req.ignore_eos = *b,
        Some(_) => return Err(bad("ignore_eos must be a boolean", "ignore_eos")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<ApiRequest, BadRequest> {
        parse(body.to_string().as_bytes(), true)
    }

    #[test]
    fn text_parts_are_joined_and_other_parts_refused() {
        let r = chat(serde_json::json!({"model": "m", "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null},
        ]}))
        .unwrap();
        let m: Vec<_> = r
            .req
            .messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        assert_eq!(
            m,
            [("system", "Be brief."), ("user", "a\nb"), ("assistant", "")]
        );
        let e = chat(serde_json::json!({"model": "m", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}))
        .unwrap_err();
        assert!(e.message.contains("\"image_url\""), "{e}");
    }

    #[test]
    fn fields_that_would_be_dropped_are_refused_and_their_off_values_taken() {
        let base =
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let with = |k: &str, v: Value| {
            let mut b = base.clone();
            b[k] = v;
            chat(b)
        };
        for (k, v) in [
            ("logprobs", serde_json::json!(2)),
            ("top_logprobs", serde_json::json!(2)),
            ("top_logprobs", serde_json::json!(21)),
            ("tools", serde_json::json!([{"type": "function"}])),
            ("presence_penalty", serde_json::json!(3.0)),
            ("frequency_penalty", serde_json::json!(-2.5)),
            (
                "response_format",
                serde_json::json!({"type": "json_object"}),
            ),
            ("n", serde_json::json!(0)),
            ("n", serde_json::json!(MAX_CHOICES + 1)),
        ] {
            let e = with(k, v.clone()).unwrap_err();
            assert_eq!(e.param, k, "{k}: {v}: {e}");
        }
        for (k, v) in [
            ("logprobs", Value::Bool(false)),
            ("tools", serde_json::json!([])),
            ("presence_penalty", serde_json::json!(0.5)),
            ("frequency_penalty", serde_json::json!(-1.0)),
            ("response_format", serde_json::json!({"type": "text"})),
            ("user", serde_json::json!("someone")),
            ("stream_options", serde_json::json!({"include_usage": true})),
        ] {
            with(k, v.clone()).unwrap_or_else(|e| panic!("{k}: {v}: {e}"));
        }
        let r = with("n", serde_json::json!(3)).unwrap();
        assert_eq!(r.n, 3);
    }

    #[test]
    fn llama_server_extensions_are_read_and_runs_are_prompts_times_choices() {
        let r = parse(
            br#"{"model":"m","prompt":["p","q"],"top_k":5,"repeat_penalty":1.1,"seed":7,"n":2}"#,
            false,
        )
        .unwrap();
        assert_eq!((r.req.top_k, r.req.repeat_penalty), (5, 1.1));
        let runs: Vec<_> = r.runs().into_iter().map(|x| (x.prompt, x.seed)).collect();
        let want = [("p", 7), ("p", 8), ("q", 7), ("q", 8)].map(|(p, s)| (p.to_string(), s));
        assert_eq!(runs, want);
        let e = parse(br#"{"model":"m","prompt":[1,2]}"#, false).unwrap_err();
        assert!(e.message.contains("token ids"), "{e}");
        let e = parse(br#"{"model":"m","prompt":["a", ""]}"#, false).unwrap_err();
        assert_eq!(e.param, "prompt");
        let e = parse(
            br#"{"model":"m","prompt":["a","b","c","d","e"],"n":16}"#,
            false,
        )
        .unwrap_err();
        assert_eq!(e.param, "n", "80 runs: {e}");
        // Without a seed one is drawn: two requests sample differently.
        let a = parse(br#"{"model":"m","prompt":"p","temperature":1}"#, false).unwrap();
        let b = parse(br#"{"model":"m","prompt":"p","temperature":1}"#, false).unwrap();
        assert_ne!(a.req.seed, b.req.seed);
    }

    #[test]
    fn roles_and_tool_calls_are_checked_here() {
        let msgs = |m: Value| chat(serde_json::json!({"model": "m", "messages": m}));
        for m in [
            serde_json::json!([{"role": "tool", "content": "42", "tool_call_id": "x"}]),
            serde_json::json!([{"role": "wizard", "content": "hi"}]),
            serde_json::json!([{"role": "assistant", "content": null, "tool_calls": [{"id": "x"}]}]),
        ] {
            let e = msgs(m.clone()).unwrap_err();
            assert_eq!(e.param, "messages", "{m}: {e}");
        }
        let ok = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "logit_bias": {"50256": 0}, "stream_options": {"include_usage": true}});
        let r = chat(ok).unwrap();
        assert!(r.include_usage);
        let bias = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "logit_bias": {"50256": -100}});
        assert_eq!(chat(bias).unwrap_err().param, "logit_bias");
    }
}
