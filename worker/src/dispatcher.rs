//! The one command dispatcher behind both the P2P `/json-message/1.0` path
//! and the gRPC service.

use llama_cluster_shared::protocol::{
    Command, CommandKind, CommandResponse, ErrorCode, Incoming, JsonMessage, ParseError,
    parse_incoming,
};
use llama_cluster_shared::unix_now;
use serde_json::json;
use tracing::{Instrument, debug, info, warn};

use crate::network::json_codec::JsonRequest;
use crate::pipeline::Pipeline;
use crate::pipeline::driver::GenerateRequest;
use crate::pipeline::host::PipelineError;
use crate::state::SharedState;
use llama_cluster_engine::sampling::SamplingParams;
use serde::Deserialize;

#[derive(Clone)]
pub struct Dispatcher {
    pub(crate) state: SharedState,
    pub(crate) pipeline: Pipeline,
    max_message_bytes: usize,
}

/// Parameters of INFERENCE (JSON).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InferenceParams {
    #[serde(default)]
    model: String,
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    max_tokens: u32,
    #[serde(default)]
    temperature: f32,
    #[serde(default)]
    top_k: Option<i32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    repeat_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: f32,
    #[serde(default)]
    presence_penalty: f32,
    #[serde(default)]
    seed: u32,
    #[serde(default)]
    stop: Vec<String>,
    #[serde(default)]
    chat: bool,
}

/// Parameters of LOAD_SHARD (JSON).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadShardParams {
    #[serde(default)]
    shard_id: String,
    #[serde(default)]
    manifest: String,
    /// The manifest itself, for a worker that has none on disk.
    #[serde(default)]
    manifest_json: String,
    #[serde(default)]
    unload: bool,
}

/// A command's params as `T` (missing params = `{}`), or the error response.
fn params<T: serde::de::DeserializeOwned>(
    cmd: &Command,
    me: &str,
) -> Result<T, Box<CommandResponse>> {
    let v = if cmd.params.is_null() {
        json!({})
    } else {
        cmd.params.clone()
    };
    serde_json::from_value(v).map_err(|e| {
        Box::new(CommandResponse::error(
            &cmd.request_id,
            &cmd.command,
            me,
            ErrorCode::InvalidParams,
            format!("params: {e}"),
        ))
    })
}

fn pipeline_error_code(e: &PipelineError) -> ErrorCode {
    match e {
        PipelineError::InvalidArgument(_) | PipelineError::NotFound(_) => ErrorCode::InvalidParams,
        PipelineError::Unavailable(_)
        | PipelineError::ResourceExhausted(_)
        | PipelineError::DeadlineExceeded(_)
        | PipelineError::Cancelled(_) => ErrorCode::Unavailable,
        PipelineError::Internal(_) => ErrorCode::Internal,
    }
}

impl Dispatcher {
    pub fn new(state: SharedState, pipeline: Pipeline, max_message_bytes: usize) -> Self {
        Dispatcher {
            state,
            pipeline,
            max_message_bytes,
        }
    }

    pub fn state(&self) -> &SharedState {
        &self.state
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    pub(crate) fn me(&self) -> String {
        self.state.peer_id().to_string()
    }

    /// Answers one raw P2P request. Always returns a response body: errors
    /// (too large, malformed, unknown) are answered, never dropped.
    pub async fn handle_p2p(&self, remote: &str, req: JsonRequest) -> Vec<u8> {
        let parsed = match req {
            JsonRequest::TooLarge(size) => Err(ParseError::TooLarge {
                size,
                limit: self.max_message_bytes,
            }),
            JsonRequest::Body(bytes) => parse_incoming(&bytes, self.max_message_bytes),
        };
        let reply = match parsed {
            Ok(Incoming::Message(msg)) => {
                info!(
                    "[MSG] message from {remote} (claims {}): {:?}",
                    msg.from,
                    truncate(&msg.message, 200)
                );
                serde_json::to_value(JsonMessage {
                    from: self.me(),
                    message: msg.message,
                    timestamp: unix_now(),
                })
            }
            Ok(Incoming::Command(cmd)) => serde_json::to_value(self.dispatch(cmd).await),
            Err(e) => {
                warn!("[MSG] rejected request from {remote}: {e}");
                serde_json::to_value(CommandResponse::error(
                    "",
                    "",
                    &self.me(),
                    e.code(),
                    e.to_string(),
                ))
            }
        };
        match reply {
            Ok(v) => serde_json::to_vec(&v).unwrap_or_default(),
            Err(e) => format!(r#"{{"ok":false,"error":{{"code":"internal","message":"{e}"}}}}"#)
                .into_bytes(),
        }
    }

    /// Runs one command, in a span that continues the sender's trace.
    pub async fn dispatch(&self, cmd: Command) -> CommandResponse {
        let span = tracing::info_span!("command", command = %cmd.command, request_id = %cmd.request_id, from = %cmd.from);
        llama_cluster_shared::telemetry::set_parent(&span, &cmd.trace);
        self.dispatch_in_span(cmd).instrument(span).await
    }

    async fn dispatch_in_span(&self, cmd: Command) -> CommandResponse {
        let me = self.me();
        if let Some(to) = cmd.to.as_deref().filter(|t| !t.is_empty() && *t != me) {
            return CommandResponse::error(
                &cmd.request_id,
                &cmd.command,
                &me,
                ErrorCode::WrongRecipient,
                format!("command addressed to {to}, this node is {me}"),
            );
        }
        let Some(kind) = CommandKind::parse(&cmd.command) else {
            warn!("[MSG] unknown command {:?} from {}", cmd.command, cmd.from);
            return CommandResponse::error(
                &cmd.request_id,
                &cmd.command,
                &me,
                ErrorCode::UnknownCommand,
                format!(
                    "unknown command {:?}; known: {}",
                    cmd.command,
                    CommandKind::ALL.map(|k| k.as_str()).join(", ")
                ),
            );
        };
        debug!("[MSG] command {} from {}", kind.as_str(), cmd.from);
        match kind {
            CommandKind::GetStatus => match serde_json::to_value(self.status()) {
                Ok(v) => CommandResponse::ok(&cmd, &me, v),
                Err(e) => CommandResponse::error(
                    &cmd.request_id,
                    &cmd.command,
                    &me,
                    ErrorCode::Internal,
                    e.to_string(),
                ),
            },
            CommandKind::Inference => self.inference(&cmd).await,
            CommandKind::LoadShard => self.load_shard(&cmd).await,
            CommandKind::SyncTorrents => self.sync_torrents_command(&cmd).await,
            CommandKind::SwarmReady => self.swarm_ready(&cmd),
        }
    }

    /// A SWARM_READY announcement from the worker that watches coverage.
    fn swarm_ready(&self, cmd: &Command) -> CommandResponse {
        let me = self.me();
        let model = cmd
            .params
            .get("model")
            .and_then(|m| m.as_str())
            .unwrap_or_default()
            .to_string();
        let Some(ready) = cmd.params.get("ready").and_then(|r| r.as_bool()) else {
            return CommandResponse::error(
                &cmd.request_id,
                &cmd.command,
                &me,
                ErrorCode::InvalidParams,
                "params.ready (bool) is required",
            );
        };
        info!(
            "[STATUS] SWARM_READY from {}: {model} {}",
            cmd.from,
            if ready { "ready" } else { "withdrawn" }
        );
        self.state
            .write(|s| s.swarm_announcement = Some((cmd.from.clone(), model, ready)));
        CommandResponse::ok(cmd, &me, json!({"ack": true}))
    }

    /// This node's status, torrents included.
    pub fn status(&self) -> llama_cluster_shared::status::NodeStatus {
        let mut st = self.state.snapshot();
        st.torrents = self.pipeline.torrents().status();
        // This worker's own stage: live session figures, not the record's.
        let (open, max) = (
            self.pipeline.active_sessions(),
            self.pipeline.max_sessions(),
        );
        for s in st
            .shards
            .iter_mut()
            .filter(|s| s.availability == llama_cluster_shared::status::Availability::Local)
        {
            s.load = open;
            s.max_sessions = max;
        }
        st
    }

    async fn sync_torrents_command(&self, cmd: &Command) -> CommandResponse {
        let me = self.me();
        let catalog_only = cmd
            .params
            .get("catalog_only")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let fetch_missing = cmd
            .params
            .get("fetch_missing")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        if catalog_only {
            let list: Vec<_> = self
                .pipeline
                .torrents()
                .store()
                .catalog()
                .into_iter()
                .map(|m| json!({"file_hash": m.file_hash, "name": m.name, "size": m.size}))
                .collect();
            return CommandResponse::ok(cmd, &me, json!({ "catalog": list }));
        }
        match self.sync_torrents(fetch_missing).await {
            Ok(entries) => CommandResponse::ok(cmd, &me, json!({ "entries": entries })),
            Err(e) => CommandResponse::error(
                &cmd.request_id,
                &cmd.command,
                &me,
                ErrorCode::Unavailable,
                e.to_string(),
            ),
        }
    }

    async fn inference(&self, cmd: &Command) -> CommandResponse {
        let me = self.me();
        let p: InferenceParams = match params(cmd, &me) {
            Ok(p) => p,
            Err(resp) => return *resp,
        };
        let defaults = SamplingParams::default();
        let req = GenerateRequest {
            model: p.model,
            prompt: p.prompt,
            chat: p.chat,
            max_tokens: p.max_tokens,
            sampling: SamplingParams {
                temperature: p.temperature,
                top_k: p.top_k.unwrap_or(defaults.top_k),
                top_p: p.top_p.unwrap_or(defaults.top_p),
                repeat_penalty: p.repeat_penalty.unwrap_or(defaults.repeat_penalty),
                penalty_last_n: defaults.penalty_last_n,
                seed: p.seed,
                frequency_penalty: p.frequency_penalty,
                presence_penalty: p.presence_penalty,
                logprobs: None,
            },
            stop: p.stop,
            return_prompt_logits: false,
            ignore_eos: false,
            messages: vec![],
            resume: vec![],
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<crate::pipeline::driver::Chunk>(64);
        let collect = tokio::spawn(async move {
            let (mut text, mut ids) = (String::new(), Vec::new());
            while let Some(c) = rx.recv().await {
                text.push_str(&c.text);
                ids.extend(c.token_ids);
            }
            (text, ids)
        });
        let result = self.pipeline.generate(req, tx).await;
        let (text, ids) = collect.await.unwrap_or_default();
        match result {
            Ok(st) => CommandResponse::ok(
                cmd,
                &me,
                json!({
                    "text": text,
                    "token_ids": ids,
                    "prompt_tokens": st.prompt_tokens,
                    "generated_tokens": st.generated_tokens,
                    "time_to_first_token_ms": st.ttft_ms,
                    "tokens_per_second": st.tokens_per_second,
                    "route": st.route,
                    "finish_reason": st.finish_reason,
                }),
            ),
            Err(e) => CommandResponse::error(
                &cmd.request_id,
                &cmd.command,
                &me,
                pipeline_error_code(&e),
                e.to_string(),
            ),
        }
    }

    async fn load_shard(&self, cmd: &Command) -> CommandResponse {
        let me = self.me();
        let p: LoadShardParams = match params(cmd, &me) {
            Ok(p) => p,
            Err(resp) => return *resp,
        };
        let r = if p.unload {
            self.pipeline.unload_shard().await
        } else if p.shard_id.is_empty() {
            Err(PipelineError::InvalidArgument(
                "shard_id is required".into(),
            ))
        } else {
            self.pipeline
                .load_shard_from(&p.shard_id, &p.manifest, &p.manifest_json)
                .await
        };
        match r {
            Ok(o) => CommandResponse::ok(
                cmd,
                &me,
                json!({
                    "shard_id": o.shard_id, "model": o.model, "layer_start": o.layer_start,
                    "layer_end": o.layer_end, "state": o.state.as_str(), "load_ms": o.load_ms,
                }),
            ),
            Err(e) => CommandResponse::error(
                &cmd.request_id,
                &cmd.command,
                &me,
                pipeline_error_code(&e),
                e.to_string(),
            ),
        }
    }

    /// Convenience for local callers (gRPC): a command with empty params.
    pub async fn run(&self, kind: CommandKind, params: serde_json::Value) -> CommandResponse {
        let request_id = format!("local-{}", unix_now());
        self.dispatch(Command::new(kind, "grpc", &request_id, params))
            .await
    }

    /// A ready-made GET_STATUS command body.
    pub fn status_probe(from: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "command": CommandKind::GetStatus.as_str(),
            "from": from,
            "request_id": format!("probe-{}", unix_now()),
            "params": {},
        }))
        .unwrap_or_default()
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::behaviour::Role;
    use libp2p::PeerId;
    use serde_json::Value;

    fn dispatcher() -> Dispatcher {
        let state = SharedState::new(PeerId::random(), "c", Role::Worker, true);
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let cfg = llama_cluster_shared::config::NodeConfig::default();
        let net = crate::net::NetHandle::for_tests(tx);
        let dir = std::env::temp_dir().join(format!("llama-dispatch-{}", std::process::id()));
        let store = crate::torrent::store::Store::open(&dir).unwrap();
        let torrents = crate::torrent::Torrents::new(
            store,
            net.clone(),
            state.clone(),
            Default::default(),
            None,
            true,
            true,
        );
        let pipeline = Pipeline::new(
            state.clone(),
            net,
            crate::pipeline::PipelineConfig::from_node(&cfg),
            torrents,
        );
        Dispatcher::new(state, pipeline, 1024)
    }

    async fn ask(d: &Dispatcher, body: &[u8]) -> Value {
        serde_json::from_slice(&d.handle_p2p("test", JsonRequest::Body(body.to_vec())).await)
            .unwrap()
    }

    #[tokio::test]
    async fn answers_every_kind_of_request() {
        let d = dispatcher();
        let echo = ask(&d, br#"{"from":"x","message":"hello","timestamp":1}"#).await;
        assert_eq!(echo["message"], "hello");
        assert_eq!(echo["from"], d.me());
        let st = ask(
            &d,
            br#"{"command":"GET_STATUS","from":"x","request_id":"7","params":{}}"#,
        )
        .await;
        assert_eq!(st["ok"], true);
        assert_eq!(st["request_id"], "7");
        assert_eq!(st["result"]["peer_id"], d.me());
        let unk = ask(&d, br#"{"command":"REBOOT","from":"x","request_id":"8"}"#).await;
        assert_eq!(unk["ok"], false);
        assert_eq!(unk["error"]["code"], "unknown_command");
        let ni = ask(
            &d,
            br#"{"command":"SWARM_READY","from":"x","request_id":"9"}"#,
        )
        .await;
        assert_eq!(ni["error"]["code"], "invalid_params");
        let sr = ask(
            &d,
            br#"{"command":"SWARM_READY","from":"x","params":{"model":"m","ready":true}}"#,
        )
        .await;
        assert_eq!(sr["ok"], true, "{sr}");
        assert_eq!(d.status().swarm_ready_by, "x");
        let empty = ask(
            &d,
            br#"{"command":"INFERENCE","request_id":"10","params":{"prompt":""}}"#,
        )
        .await;
        assert_eq!(empty["error"]["code"], "invalid_params", "{empty}");
        let typo = ask(&d, br#"{"command":"INFERENCE","params":{"promt":"hi"}}"#).await;
        assert_eq!(typo["error"]["code"], "invalid_params", "{typo}");
        let no_manifest = ask(&d, br#"{"command":"INFERENCE","params":{"prompt":"hi"}}"#).await;
        assert_eq!(no_manifest["error"]["code"], "unavailable", "{no_manifest}");
        let no_shard = ask(&d, br#"{"command":"LOAD_SHARD","params":{}}"#).await;
        assert_eq!(no_shard["error"]["code"], "invalid_params", "{no_shard}");
        let bad = ask(&d, b"\x00\xffgarbage").await;
        assert_eq!(bad["error"]["code"], "malformed_json");
        let big: Value =
            serde_json::from_slice(&d.handle_p2p("t", JsonRequest::TooLarge(5000)).await).unwrap();
        assert_eq!(big["error"]["code"], "too_large");
        let wrong = ask(&d, br#"{"command":"GET_STATUS","to":"someone-else"}"#).await;
        assert_eq!(wrong["error"]["code"], "wrong_recipient");
    }
}
