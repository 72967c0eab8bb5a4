//! The JSON protocol spoken over libp2p `/json-message/1.0`.
//!
//! A request is either a plain message `{"from", "message", "timestamp"}`
//! (answered with an echo) or a structured command
//! `{"command", "from", "to", "request_id", "params"}` (answered with a
//! [`CommandResponse`]). Anything else is answered with an error response.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// libp2p protocol name of the JSON request-response protocol.
pub const JSON_PROTOCOL: &str = "/json-message/1.0";

/// Default limit of one JSON request or response, in bytes.
pub use crate::config::DEFAULT_MAX_MESSAGE_BYTES;

/// A plain chat-style message between peers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonMessage {
    pub from: String,
    pub message: String,
    #[serde(default)]
    pub timestamp: u64,
}

/// Commands every worker understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CommandKind {
    LoadShard,
    Inference,
    SyncTorrents,
    SwarmReady,
    GetStatus,
}

impl CommandKind {
    pub const ALL: [CommandKind; 5] = [
        CommandKind::LoadShard,
        CommandKind::Inference,
        CommandKind::SyncTorrents,
        CommandKind::SwarmReady,
        CommandKind::GetStatus,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::LoadShard => "LOAD_SHARD",
            CommandKind::Inference => "INFERENCE",
            CommandKind::SyncTorrents => "SYNC_TORRENTS",
            CommandKind::SwarmReady => "SWARM_READY",
            CommandKind::GetStatus => "GET_STATUS",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// A structured command. `command` stays a string so that unknown commands
/// can be answered with a precise error instead of a parse failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub command: String,
    #[serde(default)]
    pub from: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default)]
    pub request_id: String,
    #[serde(default)]
    pub params: Value,
    /// W3C `traceparent` of the sender's span (absent when tracing is off).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trace: String,
}

impl Command {
    pub fn new(kind: CommandKind, from: &str, request_id: &str, params: Value) -> Self {
        Command {
            command: kind.as_str().to_string(),
            from: from.to_string(),
            to: None,
            request_id: request_id.to_string(),
            params,
            trace: crate::telemetry::current_traceparent(),
        }
    }
}

/// Machine-readable error codes of [`ErrorBody`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    MalformedJson,
    UnknownCommand,
    NotImplemented,
    TooLarge,
    InvalidParams,
    WrongRecipient,
    Unavailable,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// The answer to a [`Command`] (and to requests that could not be parsed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResponse {
    #[serde(default)]
    pub request_id: String,
    #[serde(default)]
    pub command: String,
    pub from: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl CommandResponse {
    pub fn ok(cmd: &Command, from: &str, result: Value) -> Self {
        CommandResponse {
            request_id: cmd.request_id.clone(),
            command: cmd.command.clone(),
            from: from.to_string(),
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    pub fn error(
        request_id: &str,
        command: &str,
        from: &str,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> Self {
        CommandResponse {
            request_id: request_id.to_string(),
            command: command.to_string(),
            from: from.to_string(),
            ok: false,
            result: None,
            error: Some(ErrorBody {
                code,
                message: message.into(),
            }),
        }
    }
}

/// A parsed inbound request.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Message(JsonMessage),
    Command(Command),
}

/// Why an inbound request could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParseError {
    #[error("request of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed JSON: {0}")]
    Malformed(String),
    #[error("not a message or command: expected a \"command\" or a \"message\" field")]
    UnknownShape,
}

impl ParseError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ParseError::TooLarge { .. } => ErrorCode::TooLarge,
            ParseError::Malformed(_) | ParseError::UnknownShape => ErrorCode::MalformedJson,
        }
    }
}

/// Parses one request body.
pub fn parse_incoming(bytes: &[u8], limit: usize) -> Result<Incoming, ParseError> {
    if bytes.len() > limit {
        return Err(ParseError::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| ParseError::Malformed(e.to_string()))?;
    let Value::Object(map) = &value else {
        return Err(ParseError::UnknownShape);
    };
    if map.contains_key("command") {
        serde_json::from_value(value)
            .map(Incoming::Command)
            .map_err(|e| ParseError::Malformed(e.to_string()))
    } else if map.contains_key("message") {
        serde_json::from_value(value)
            .map(Incoming::Message)
            .map_err(|e| ParseError::Malformed(e.to_string()))
    } else {
        Err(ParseError::UnknownShape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_messages_and_commands() {
        let m = parse_incoming(br#"{"from":"a","message":"hi","timestamp":3}"#, 1024).unwrap();
        assert_eq!(
            m,
            Incoming::Message(JsonMessage {
                from: "a".into(),
                message: "hi".into(),
                timestamp: 3
            })
        );
        let c = parse_incoming(
            br#"{"command":"GET_STATUS","from":"a","request_id":"r1","params":{}}"#,
            1024,
        )
        .unwrap();
        let Incoming::Command(c) = c else {
            panic!("not a command")
        };
        assert_eq!(CommandKind::parse(&c.command), Some(CommandKind::GetStatus));
        assert_eq!(c.request_id, "r1");
        assert_eq!(c.params, json!({}));
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            parse_incoming(b"{nope", 1024),
            Err(ParseError::Malformed(_))
        ));
        assert_eq!(
            parse_incoming(b"[1,2]", 1024),
            Err(ParseError::UnknownShape)
        );
        assert_eq!(
            parse_incoming(br#"{"x":1}"#, 1024),
            Err(ParseError::UnknownShape)
        );
        assert!(matches!(
            parse_incoming(br#"{"command":5}"#, 1024),
            Err(ParseError::Malformed(_))
        ));
        assert_eq!(
            parse_incoming(&[b' '; 20], 10),
            Err(ParseError::TooLarge {
                size: 20,
                limit: 10
            })
        );
    }

    #[test]
    fn command_names_round_trip() {
        for k in CommandKind::ALL {
            assert_eq!(CommandKind::parse(k.as_str()), Some(k));
            let s = serde_json::to_string(&k).unwrap();
            assert_eq!(s, format!("\"{}\"", k.as_str()));
        }
        assert_eq!(CommandKind::parse("REBOOT"), None);
    }
}
