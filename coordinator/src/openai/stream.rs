//! A streamed answer: server-sent events, one per text chunk of any
//! choice (tagged with its index), a last one per choice with its finish
//! reason, then `[DONE]`. With `stream_options.include_usage` the usage
//! follows in a chunk of its own with no choices, as OpenAI sends it;
//! without, a single choice's finish chunk carries it (as before).

use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use llama_cluster_proto::v1::inference_response::Event;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::{Head, Usage, finish_reason};

/// The messages of all runs of one request, tagged with their choice index.
pub type Answers = futures::stream::BoxStream<
    'static,
    (
        usize,
        Result<llama_cluster_proto::v1::InferenceResponse, tonic::Status>,
    ),
>;

type ReceiverSse = tokio_stream::wrappers::ReceiverStream<Result<SseEvent, Infallible>>;

impl Head {
    /// One chunk: `delta` of choice `index` (none: a usage-only chunk),
    /// with the log-probabilities of its tokens.
    fn chunk(
        &self,
        index: Option<usize>,
        delta: Value,
        finish: Value,
        usage: Value,
        logprobs: Value,
    ) -> SseEvent {
        let object = if self.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let choices = match index {
            None => json!([]),
            Some(i) if self.chat => {
                json!([{"index": i, "delta": delta, "finish_reason": finish, "logprobs": logprobs}])
            }
            Some(i) => {
                json!([{"index": i, "text": delta.get("content").cloned().unwrap_or(json!("")),
                               "finish_reason": finish, "logprobs": logprobs}])
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

/// Streams `answers` (of `n_runs` choices) as server-sent events; the
/// usage in a last chunk of its own with `include_usage`, else on the
/// finish chunk of a single choice.
pub fn respond(head: Head, mut answers: Answers, n_runs: usize, include_usage: bool) -> Response {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(
        async move {
            if head.chat {
                for i in 0..n_runs {
                    let role = json!({"role": "assistant", "content": ""});
                    if tx
                        .send(Ok(head.chunk(Some(i), role, Value::Null, Value::Null, Value::Null)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            let mut usage = Usage::default();
            let mut failed = false;
            let mut offsets: Vec<_> = (0..n_runs).map(|i| head.completion_logprobs(i)).collect();
            while let Some((i, m)) = answers.next().await {
                let event = match m {
                    Ok(m) => match m.event {
                        Some(Event::Chunk(c)) if !c.text.is_empty() || !c.logprobs.is_empty() => {
                            let lp = if !head.logprobs {
                                Value::Null
                            } else if head.chat {
                                super::logprobs::chat(&c.logprobs)
                            } else {
                                offsets[i].push(&c.logprobs);
                                offsets[i].take()
                            };
                            head.chunk(Some(i), json!({"content": c.text}), Value::Null, Value::Null, lp)
                        }
                        Some(Event::Stats(s)) => {
                            usage.add(&head, i, &s);
                            let on_finish = if n_runs == 1 && !include_usage {
                                usage.json()
                            } else {
                                Value::Null
                            };
                            let finish = json!(finish_reason(&s.finish_reason));
                            head.chunk(Some(i), json!({}), finish, on_finish, Value::Null)
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
                    return; // client went away: dropping the runs stops generation
                }
            }
            if include_usage && !failed {
                let _ = tx
                    .send(Ok(head.chunk(None, Value::Null, Value::Null, usage.json(), Value::Null)))
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
