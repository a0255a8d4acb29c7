//! Dead letters: the fixed set of poison classes and the record that carries a
//! poison input, byte for byte, to `mcp.events.dlq` with its reason attached.

use std::fmt;

use rdkafka::message::{Header, OwnedHeaders};

use crate::event::SourceCoordinates;

/// The default dead-letter topic.
pub const DEFAULT_DLQ_TOPIC: &str = "mcp.events.dlq";

/// Where records nobody can heal are parked for a person: `{dlq}.parked`.
pub fn parked_topic(dlq_topic: &str) -> String {
    format!("{dlq_topic}.parked")
}

/// Header names on dead letters. Constants, because operators grep for them.
pub mod headers {
    pub const ERROR_CLASS: &str = "baton.error.class";
    pub const ERROR_REASON: &str = "baton.error.reason";
    pub const SOURCE_TOPIC: &str = "baton.source.topic";
    pub const SOURCE_PARTITION: &str = "baton.source.partition";
    pub const SOURCE_OFFSET: &str = "baton.source.offset";
    pub const FAILED_AT: &str = "baton.failed.at";
    /// On `tool_failed`: the context's workflow, the state (step) the failed
    /// call belongs to, the step's dispatch count when it failed, and the
    /// event name of the failed call.
    pub const WORKFLOW: &str = "baton.workflow";
    pub const STEP: &str = "baton.step";
    pub const ATTEMPTS: &str = "baton.attempts";
    pub const FAILED_EVENT: &str = "baton.failed.event";
    /// The agent that held the context when the call failed, if any.
    pub const LOCKED_BY: &str = "baton.locked.by";
    /// On parked records: why the healer gave up, and when.
    pub const PARKED_REASON: &str = "baton.parked.reason";
    pub const PARKED_AT: &str = "baton.parked.at";
    /// On records `baton dlq replay` republished: the DLQ coordinates
    /// (`topic/partition/offset`) it came from, when, and the replay's id.
    pub const REPLAY_OF: &str = "baton.replay.of";
    pub const REPLAYED_AT: &str = "baton.replayed.at";
    pub const REPLAY_ID: &str = "baton.replay.id";
}

/// Why a record could not be used. The set is fixed so dashboards and the
/// healer can rely on it; the snake_case name is what goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorClass {
    /// The bytes are not JSON.
    MalformedJson,
    /// Valid JSON, but neither the legacy nor the canonical event form.
    UnrecognizedFormat,
    /// The event names no `context_id` (nor its alias `conversationId`).
    MissingContextId,
    /// The record is larger than the configured limit.
    RecordTooLarge,
    /// Avro whose writer schema id the registry does not know.
    UnknownSchema,
    /// Bytes that claim to be Avro but do not decode.
    MalformedAvro,
    /// Avro whose writer schema cannot be resolved into baton's reader schema:
    /// the producer made an incompatible change.
    IncompatibleSchema,
    /// An event the context's current workflow state does not allow.
    InvalidTransition,
    /// The tool call itself failed; the healer may retry it.
    ToolFailed,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 9] = [
        ErrorClass::MalformedJson,
        ErrorClass::UnrecognizedFormat,
        ErrorClass::MissingContextId,
        ErrorClass::RecordTooLarge,
        ErrorClass::UnknownSchema,
        ErrorClass::MalformedAvro,
        ErrorClass::IncompatibleSchema,
        ErrorClass::InvalidTransition,
        ErrorClass::ToolFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::MalformedJson => "malformed_json",
            ErrorClass::UnrecognizedFormat => "unrecognized_format",
            ErrorClass::MissingContextId => "missing_context_id",
            ErrorClass::RecordTooLarge => "record_too_large",
            ErrorClass::UnknownSchema => "unknown_schema",
            ErrorClass::MalformedAvro => "malformed_avro",
            ErrorClass::IncompatibleSchema => "incompatible_schema",
            ErrorClass::InvalidTransition => "invalid_transition",
            ErrorClass::ToolFailed => "tool_failed",
        }
    }

    pub fn parse(name: &str) -> Option<ErrorClass> {
        ErrorClass::ALL
            .into_iter()
            .find(|class| class.as_str() == name)
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record that goes to the DLQ: the original key and value, untouched, plus
/// the reason and the coordinates of the input it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub class: ErrorClass,
    pub reason: String,
    pub source: SourceCoordinates,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// RFC 3339 time at which baton gave up on the record.
    pub failed_at: String,
    /// Extra headers a stage wants to carry (the healer's attempt count, say).
    pub extra_headers: Vec<(&'static str, String)>,
}

impl DeadLetter {
    pub fn headers(&self) -> OwnedHeaders {
        let partition = self.source.partition.to_string();
        let offset = self.source.offset.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(6 + self.extra_headers.len())
            .insert(header(headers::ERROR_CLASS, self.class.as_str()))
            .insert(header(headers::ERROR_REASON, &self.reason))
            .insert(header(headers::SOURCE_TOPIC, &self.source.topic))
            .insert(header(headers::SOURCE_PARTITION, &partition))
            .insert(header(headers::SOURCE_OFFSET, &offset))
            .insert(header(headers::FAILED_AT, &self.failed_at));
        for (name, value) in &self.extra_headers {
            headers = headers.insert(header(name, value));
        }
        headers
    }
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    #[test]
    fn class_names_round_trip() {
        for class in ErrorClass::ALL {
            assert_eq!(ErrorClass::parse(class.as_str()), Some(class));
        }
        assert_eq!(ErrorClass::parse("nope"), None);
    }

    #[test]
    fn dead_letter_carries_every_header() {
        let letter = DeadLetter {
            class: ErrorClass::MalformedJson,
            reason: "expected value at line 1 column 1".into(),
            source: SourceCoordinates {
                topic: "mcp.events.all".into(),
                partition: 2,
                offset: 17,
            },
            key: Some(b"c-1".to_vec()),
            value: Some(b"not json".to_vec()),
            failed_at: "2026-11-24T00:00:00Z".into(),
            extra_headers: vec![],
        };
        let headers = letter.headers();
        let found: Vec<(String, String)> = headers
            .iter()
            .map(|h| {
                (
                    h.key.to_string(),
                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                )
            })
            .collect();
        assert_eq!(
            found,
            vec![
                ("baton.error.class".into(), "malformed_json".into()),
                (
                    "baton.error.reason".into(),
                    "expected value at line 1 column 1".into()
                ),
                ("baton.source.topic".into(), "mcp.events.all".into()),
                ("baton.source.partition".into(), "2".into()),
                ("baton.source.offset".into(), "17".into()),
                ("baton.failed.at".into(), "2026-11-24T00:00:00Z".into()),
            ]
        );
    }
}
