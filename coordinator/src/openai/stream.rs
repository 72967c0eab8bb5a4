//! A streamed answer: server-sent events, one per text chunk of any
//! choice (tagged with its index), a last one per choice with its finish
//! reason, then `[DONE]`. With one choice the usage rides on that last
//! chunk; with several it follows in a chunk of its own with no choices, as
//! OpenAI sends it.

use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use llama_cluster_proto::v1::inference_response::Event;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::{Head, finish_reason};

/// One choice's gRPC answer, counted in the coordinator's metrics.
pub type Answer = crate::metrics::Metered<crate::drivers::Answers>;

type ReceiverSse = tokio_stream::wrappers::ReceiverStream<Result<SseEvent, Infallible>>;

impl Head {
    /// One chunk: `delta` of choice `index` (none: a usage-only chunk).
    fn chunk(&self, index: Option<usize>, delta: Value, finish: Value, usage: Value) -> SseEvent {
        let object = if self.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let choices = match index {
            None => json!([]),
            Some(i) if self.chat => {
                json!([{"index": i, "delta": delta, "finish_reason": finish, "logprobs": null}])
            }
            Some(i) => {
                json!([{"index": i, "text": delta.get("content").cloned().unwrap_or(json!("")),
                               "finish_reason": finish, "logprobs": null}])
            }
        };
        let mut v = json!({"id": self.id, "object": object, "created": self.created,
                           "model": self.model, "choices": choices});
        if !usage.is_null() {
            v["usage"] = usage;
        }
        SseEvent::default().data(v.to_string())
    }
}

/// Streams `streams` (one per choice) as server-sent events.
pub fn respond(head: Head, streams: Vec<Answer>) -> Response {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let n = streams.len();
    tokio::spawn(
        async move {
            if head.chat {
                for i in 0..n {
                    let role = json!({"role": "assistant", "content": ""});
                    if tx
                        .send(Ok(head.chunk(Some(i), role, Value::Null, Value::Null)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            let mut all = futures::stream::select_all(
                streams
                    .into_iter()
                    .enumerate()
                    .map(|(i, s)| s.map(move |m| (i, m))),
            );
            let (mut prompt_tokens, mut completion_tokens) = (0u32, 0u32);
            let mut failed = false;
            while let Some((i, m)) = all.next().await {
                let event = match m {
                    Ok(m) => match m.event {
                        Some(Event::Chunk(c)) if !c.text.is_empty() => {
                            head.chunk(Some(i), json!({"content": c.text}), Value::Null, Value::Null)
                        }
                        Some(Event::Stats(s)) => {
                            prompt_tokens = s.prompt_tokens;
                            completion_tokens += s.generated_tokens;
                            let usage = if n == 1 {
                                usage_of(prompt_tokens, completion_tokens)
                            } else {
                                Value::Null
                            };
                            let finish = json!(finish_reason(&s.finish_reason));
                            head.chunk(Some(i), json!({}), finish, usage)
                        }
                        _ => continue,
                    },
                    Err(s) => {
                        let err = json!({"error": {"message": s.message(), "type": "server_error", "param": null, "code": null}});
                        let _ = tx.send(Ok(SseEvent::default().data(err.to_string()))).await;
                        failed = true;
                        break;
                    }
                };
                if tx.send(Ok(event)).await.is_err() {
                    return; // client went away: dropping the streams stops generation
                }
            }
            if n > 1 && !failed {
                let usage = usage_of(prompt_tokens, completion_tokens);
                let _ = tx
                    .send(Ok(head.chunk(None, Value::Null, Value::Null, usage)))
                    .await;
            }
            let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
        }
        .in_current_span(),
    );
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx) as ReceiverSse)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn usage_of(prompt_tokens: u32, completion_tokens: u32) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens})
}
