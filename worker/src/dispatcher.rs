//! The one command dispatcher behind both the P2P `/json-message/1.0` path
//! and the gRPC service.

use llama_cluster_shared::protocol::{
    Command, CommandKind, CommandResponse, ErrorCode, Incoming, JsonMessage, ParseError,
    parse_incoming,
};
use llama_cluster_shared::unix_now;
use serde_json::json;
use tracing::{debug, info, warn};

use crate::network::json_codec::JsonRequest;
use crate::state::SharedState;

#[derive(Debug, Clone)]
pub struct Dispatcher {
    state: SharedState,
    max_message_bytes: usize,
}

impl Dispatcher {
    pub fn new(state: SharedState, max_message_bytes: usize) -> Self {
        Dispatcher {
            state,
            max_message_bytes,
        }
    }

    fn me(&self) -> String {
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

    /// Runs one command.
    #[tracing::instrument(name = "command", skip_all, fields(command = %cmd.command, request_id = %cmd.request_id, from = %cmd.from))]
    pub async fn dispatch(&self, cmd: Command) -> CommandResponse {
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
            CommandKind::GetStatus => match serde_json::to_value(self.state.snapshot()) {
                Ok(v) => CommandResponse::ok(&cmd, &me, v),
                Err(e) => CommandResponse::error(
                    &cmd.request_id,
                    &cmd.command,
                    &me,
                    ErrorCode::Internal,
                    e.to_string(),
                ),
            },
            CommandKind::LoadShard
            | CommandKind::Inference
            | CommandKind::SyncTorrents
            | CommandKind::SwarmReady => CommandResponse::error(
                &cmd.request_id,
                &cmd.command,
                &me,
                ErrorCode::NotImplemented,
                format!("{} is not implemented yet in this version", kind.as_str()),
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
        Dispatcher::new(
            SharedState::new(PeerId::random(), "c", Role::Worker, true),
            1024,
        )
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
            br#"{"command":"INFERENCE","from":"x","request_id":"9"}"#,
        )
        .await;
        assert_eq!(ni["error"]["code"], "not_implemented");
        let bad = ask(&d, b"\x00\xffgarbage").await;
        assert_eq!(bad["error"]["code"], "malformed_json");
        let big: Value =
            serde_json::from_slice(&d.handle_p2p("t", JsonRequest::TooLarge(5000)).await).unwrap();
        assert_eq!(big["error"]["code"], "too_large");
        let wrong = ask(&d, br#"{"command":"GET_STATUS","to":"someone-else"}"#).await;
        assert_eq!(wrong["error"]["code"], "wrong_recipient");
    }
}
