//! Dead letters: the fixed set of poison classes and the record that carries a
//! poison input, byte for byte, to `mcp.events.dlq` with its reason attached.

use std::fmt;

use rdkafka::message::{Header, OwnedHeaders};
use sha2::{Digest, Sha256};

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
    /// On a letter whose value was cut to fit the producer's
    /// `message.max.bytes`: `true`, the original value's size in bytes and
    /// its SHA-256 (hex). The original stays findable at its source
    /// coordinates; `baton dlq replay` refuses such a letter.
    pub const VALUE_TRUNCATED: &str = "baton.value.truncated";
    pub const VALUE_SIZE: &str = "baton.value.size";
    pub const VALUE_SHA256: &str = "baton.value.sha256";
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
    /// Avro whose writer schema is recursive or nests deeper than
    /// `--max-schema-depth`: refused before anything is decoded with it.
    UnsupportedSchema,
    /// An event whose `token_budget` is above `--max-token-budget`.
    InvalidTokenBudget,
    /// An event the context's current workflow state does not allow.
    InvalidTransition,
    /// The tool call itself failed; the healer may retry it.
    ToolFailed,
    /// The agent holding a step did not answer in time (its `timeout`, or
    /// its `heartbeat_timeout`); healed like `tool_failed`. The record is
    /// the timer's description, not an input.
    StepTimedOut,
    /// An output the input causes (a handover, a state or memory record)
    /// cannot fit the producer's `message.max.bytes`; the state is unchanged.
    OutputTooLarge,
    /// The broker refused the input's outputs even when it was sent alone.
    OutputRejected,
    /// An output could not be encoded (e.g. a value the output schema
    /// cannot hold); the state is unchanged.
    OutputUnencodable,
    /// The context already holds as many records (or bytes) as it may while
    /// it waits on the healer.
    HeldOverflow,
    /// The `context_id` is longer than allowed or holds control characters.
    InvalidContextId,
    /// The context's memory would exceed its bound even after its oldest
    /// tool outputs were dropped.
    MemoryOverflow,
    /// The context's stored state cannot be decoded (e.g. written by a newer
    /// baton); the input is set aside rather than applied to a guess.
    UnreadableState,
    /// The record was held by a context (waiting on the healer) that an
    /// operator cancelled; it is parked, never retried.
    ContextCancelled,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 20] = [
        ErrorClass::MalformedJson,
        ErrorClass::UnrecognizedFormat,
        ErrorClass::MissingContextId,
        ErrorClass::RecordTooLarge,
        ErrorClass::UnknownSchema,
        ErrorClass::MalformedAvro,
        ErrorClass::IncompatibleSchema,
        ErrorClass::UnsupportedSchema,
        ErrorClass::InvalidTokenBudget,
        ErrorClass::InvalidTransition,
        ErrorClass::ToolFailed,
        ErrorClass::StepTimedOut,
        ErrorClass::OutputTooLarge,
        ErrorClass::OutputRejected,
        ErrorClass::OutputUnencodable,
        ErrorClass::HeldOverflow,
        ErrorClass::InvalidContextId,
        ErrorClass::MemoryOverflow,
        ErrorClass::UnreadableState,
        ErrorClass::ContextCancelled,
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
            ErrorClass::UnsupportedSchema => "unsupported_schema",
            ErrorClass::InvalidTokenBudget => "invalid_token_budget",
            ErrorClass::InvalidTransition => "invalid_transition",
            ErrorClass::ToolFailed => "tool_failed",
            ErrorClass::StepTimedOut => "step_timed_out",
            ErrorClass::OutputTooLarge => "output_too_large",
            ErrorClass::OutputRejected => "output_rejected",
            ErrorClass::OutputUnencodable => "output_unencodable",
            ErrorClass::HeldOverflow => "held_overflow",
            ErrorClass::InvalidContextId => "invalid_context_id",
            ErrorClass::MemoryOverflow => "memory_overflow",
            ErrorClass::UnreadableState => "unreadable_state",
            ErrorClass::ContextCancelled => "context_cancelled",
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

/// Header values a dead letter takes from its input (the reason quotes an
/// error text, the failed event's name) are cut to these sizes: a header is
/// for a person to read, the record itself stays at its source.
pub const MAX_REASON_BYTES: usize = 4 * 1024;
pub const MAX_HEADER_VALUE_BYTES: usize = 1024;

impl DeadLetter {
    /// Every header of the letter, values cut to their bounds.
    pub fn header_list(&self) -> Vec<(&'static str, String)> {
        let mut list = Vec::with_capacity(6 + self.extra_headers.len());
        list.push((headers::ERROR_CLASS, self.class.as_str().to_owned()));
        list.push((
            headers::ERROR_REASON,
            cut_text(&self.reason, MAX_REASON_BYTES),
        ));
        list.push((headers::SOURCE_TOPIC, self.source.topic.clone()));
        list.push((headers::SOURCE_PARTITION, self.source.partition.to_string()));
        list.push((headers::SOURCE_OFFSET, self.source.offset.to_string()));
        list.push((headers::FAILED_AT, self.failed_at.clone()));
        for (name, value) in &self.extra_headers {
            list.push((name, cut_text(value, MAX_HEADER_VALUE_BYTES)));
        }
        list
    }

    pub fn headers(&self) -> OwnedHeaders {
        owned_headers(&self.header_list())
    }

    /// The letter as a record of at most `max_bytes` (see [`fit_record`]).
    pub fn fitted(&self, max_bytes: usize) -> FittedRecord {
        let headers = self
            .header_list()
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value.into_bytes()))
            .collect();
        fit_record(self.key.clone(), self.value.clone(), headers, max_bytes)
    }
}

/// A record cut to fit the producer's `message.max.bytes`.
#[derive(Debug, Clone, PartialEq)]
pub struct FittedRecord {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Whether the value (or, for a monstrous key, the key) was cut.
    pub truncated: bool,
}

impl FittedRecord {
    pub fn owned_headers(&self) -> OwnedHeaders {
        let mut owned = OwnedHeaders::new_with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            owned = owned.insert(Header {
                key: name.as_str(),
                value: Some(value.as_slice()),
            });
        }
        owned
    }

    pub fn wire_size(&self) -> usize {
        crate::kafka::record_wire_size(
            self.key.as_deref(),
            self.value.as_deref(),
            self.headers
                .iter()
                .map(|(name, value)| (name.as_str(), Some(value.as_slice()))),
        )
    }
}

/// Makes a record that must not be lost (a dead letter, a parked record) fit
/// `max_bytes`: if it does not, its headers are kept, the value is cut to
/// what fits, and `baton.value.truncated=true`, `baton.value.size` and
/// `baton.value.sha256` say what was there. The original stays readable at
/// its source coordinates, which the headers name. A key too large to leave
/// room for the headers is cut as well.
pub fn fit_record(
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    mut headers: Vec<(String, Vec<u8>)>,
    max_bytes: usize,
) -> FittedRecord {
    let mut record = FittedRecord {
        key,
        value,
        headers: Vec::new(),
        truncated: false,
    };
    // A record that was cut once keeps its first marks (the original size and hash).
    let already_cut = headers
        .iter()
        .any(|(name, _)| name == headers::VALUE_TRUNCATED);
    record.headers = std::mem::take(&mut headers);
    if record.wire_size() <= max_bytes {
        return record;
    }
    record.truncated = true;
    if !already_cut {
        let original = record.value.as_deref().unwrap_or_default();
        let digest = Sha256::digest(original);
        record
            .headers
            .push((headers::VALUE_TRUNCATED.to_owned(), b"true".to_vec()));
        record.headers.push((
            headers::VALUE_SIZE.to_owned(),
            original.len().to_string().into_bytes(),
        ));
        record.headers.push((
            headers::VALUE_SHA256.to_owned(),
            hex::encode(digest).into_bytes(),
        ));
    }
    let value = record.value.take();
    let without_value = record.wire_size();
    match value {
        Some(mut value) if without_value < max_bytes => {
            value.truncate(max_bytes - without_value);
            record.value = Some(value);
        }
        _ => {
            if let Some(key) = record.key.as_mut() {
                let without_key = without_value - key.len();
                key.truncate(max_bytes.saturating_sub(without_key));
            }
            record.value = Some(Vec::new());
        }
    }
    record
}

/// Cuts `text` to at most `max` bytes on a character boundary, saying how
/// much there was.
pub fn cut_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let note = format!("... ({} bytes)", text.len());
    let mut end = max.saturating_sub(note.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{note}", &text[..end])
}

fn owned_headers(list: &[(&str, String)]) -> OwnedHeaders {
    let mut owned = OwnedHeaders::new_with_capacity(list.len());
    for (name, value) in list {
        owned = owned.insert(header(name, value));
    }
    owned
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

    fn letter(value: Vec<u8>) -> DeadLetter {
        DeadLetter {
            class: ErrorClass::MalformedJson,
            reason: "x".repeat(100_000),
            source: SourceCoordinates {
                topic: "mcp.events.all".into(),
                partition: 0,
                offset: 9,
            },
            key: Some(b"c-1".to_vec()),
            value: Some(value),
            failed_at: "2026-11-24T00:00:00Z".into(),
            extra_headers: vec![(headers::FAILED_EVENT, "e".repeat(5_000))],
        }
    }

    fn header_value<'a>(record: &'a FittedRecord, name: &str) -> Option<&'a [u8]> {
        record
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    #[test]
    fn header_values_are_cut_to_their_bounds() {
        let list = letter(vec![]).header_list();
        let reason = &list[1].1;
        assert!(reason.len() <= MAX_REASON_BYTES, "{}", reason.len());
        assert!(reason.ends_with("(100000 bytes)"), "{reason}");
        assert!(list[6].1.len() <= MAX_HEADER_VALUE_BYTES);
    }

    #[test]
    fn a_letter_that_fits_is_untouched() {
        let record = letter(b"small".to_vec()).fitted(1_000_000);
        assert!(!record.truncated);
        assert_eq!(record.value.as_deref(), Some(&b"small"[..]));
        assert_eq!(header_value(&record, headers::VALUE_TRUNCATED), None);
    }

    #[test]
    fn an_oversized_letter_is_cut_with_its_size_and_hash() {
        let value: Vec<u8> = (0..1_040_000u32).map(|i| (i % 251) as u8).collect();
        let record = letter(value.clone()).fitted(1_000_000);
        assert!(record.truncated);
        assert!(record.wire_size() <= 1_000_000, "{}", record.wire_size());
        let kept = record.value.as_deref().expect("value");
        assert!(kept.len() > 900_000, "keeps the first part: {}", kept.len());
        assert_eq!(kept, &value[..kept.len()]);
        assert_eq!(
            header_value(&record, headers::VALUE_TRUNCATED),
            Some(&b"true"[..])
        );
        assert_eq!(
            header_value(&record, headers::VALUE_SIZE),
            Some(&b"1040000"[..])
        );
        let sha = hex::encode(Sha256::digest(&value));
        assert_eq!(
            header_value(&record, headers::VALUE_SHA256),
            Some(sha.as_bytes())
        );
        assert_eq!(
            header_value(&record, headers::SOURCE_OFFSET),
            Some(&b"9"[..])
        );
        // Fitting again (the healer parking it) keeps the original marks.
        let again = fit_record(
            record.key.clone(),
            record.value.clone(),
            record.headers.clone(),
            900_000,
        );
        assert!(again.wire_size() <= 900_000);
        assert_eq!(
            header_value(&again, headers::VALUE_SIZE),
            Some(&b"1040000"[..])
        );
        assert_eq!(
            again
                .headers
                .iter()
                .filter(|(n, _)| n == headers::VALUE_TRUNCATED)
                .count(),
            1
        );
    }

    #[test]
    fn a_monstrous_key_is_cut_too() {
        let mut letter = letter(vec![1; 10]);
        letter.key = Some(vec![b'k'; 2_000_000]);
        let record = letter.fitted(1_000_000);
        assert!(record.wire_size() <= 1_000_000);
        assert_eq!(record.value.as_deref(), Some(&[][..]));
    }
}
