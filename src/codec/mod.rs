//! Turning input bytes into [`ToolEvent`]s and output records into bytes.
//!
//! Every failure is classified here, once: poison (the record itself is bad and
//! goes to the DLQ), or a schema the registry must be asked for first (which
//! the task does without blocking, pausing the partition while the registry
//! is down).

pub mod avro;
pub mod json;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use thiserror::Error;

use crate::dlq::ErrorClass;
use crate::event::{SourceCoordinates, ToolEvent};
use crate::handover::Handover;
use crate::registry::{Registry, WriterSchema};
use crate::workflow::StatusUpdate;

/// Why a record could not be decoded (yet).
#[derive(Debug, Error, Clone, PartialEq)]
pub enum DecodeError {
    /// The record is bad and will stay bad: dead-letter it.
    #[error("{class}: {reason}")]
    Poison { class: ErrorClass, reason: String },
    /// An Avro record whose writer schema is not cached: look it up (an
    /// outage pauses the partition), then decode the same record again.
    #[error("writer schema {id} must be fetched from the schema registry")]
    MissingSchema { id: u32 },
}

impl DecodeError {
    pub fn poison(class: ErrorClass, reason: impl Into<String>) -> Self {
        DecodeError::Poison {
            class,
            reason: reason.into(),
        }
    }
}

/// Limits that turn a hostile record into poison instead of an outage.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub max_record_bytes: usize,
    /// The largest `token_budget` an event may set: a budget no workflow
    /// could spend is budget enforcement turned off.
    pub max_token_budget: u64,
    /// The deepest nesting a JSON input (or JSON inside Avro) may have.
    pub max_json_depth: usize,
    /// The deepest nesting of an Avro writer schema.
    pub max_schema_depth: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_record_bytes: 1024 * 1024,
            max_token_budget: DEFAULT_MAX_TOKEN_BUDGET,
            max_json_depth: DEFAULT_MAX_JSON_DEPTH,
            max_schema_depth: DEFAULT_MAX_SCHEMA_DEPTH,
        }
    }
}

pub const DEFAULT_MAX_TOKEN_BUDGET: u64 = 100_000_000;
pub const DEFAULT_MAX_JSON_DEPTH: usize = 64;
/// The ceiling of `--max-json-depth`. An accepted input is stored inside a
/// context's record and its snapshots, a few levels deeper than it arrived,
/// and read back with serde_json's own recursion limit (128): the ceiling
/// leaves room for that wrapping, so whatever is accepted can always be
/// read back (see `accepted_depth_survives_state_and_snapshots`).
pub const MAX_JSON_DEPTH: usize = 100;
pub const DEFAULT_MAX_SCHEMA_DEPTH: usize = 32;
pub const MAX_SCHEMA_DEPTH: usize = 256;

/// The deepest nesting of arrays and objects in `bytes`, read as JSON text
/// without parsing it (strings are skipped, escapes included). Iterative and
/// O(n): it is the guard in front of a recursive parser, so it must not
/// recurse itself. Stops counting once `limit` is passed.
pub fn json_depth(bytes: &[u8], limit: usize) -> usize {
    let mut depth = 0usize;
    let mut deepest = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > deepest {
                    deepest = depth;
                    if deepest > limit {
                        return deepest;
                    }
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Poison if `bytes` nest deeper than `limit`.
pub fn check_json_depth(bytes: &[u8], limit: usize) -> Result<(), DecodeError> {
    let depth = json_depth(bytes, limit);
    if depth > limit {
        return Err(DecodeError::poison(
            ErrorClass::MalformedJson,
            format!("JSON nests deeper than the limit of {limit} levels"),
        ));
    }
    Ok(())
}

/// What an input topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputFormat {
    /// Confluent wire-format Avro only.
    Avro,
    /// JSON only (the legacy and canonical forms).
    Json,
    /// Per record: magic byte 0 is Avro, anything else JSON; a topic can
    /// carry both while its producers migrate.
    #[default]
    Auto,
}

impl InputFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            InputFormat::Avro => "avro",
            InputFormat::Json => "json",
            InputFormat::Auto => "auto",
        }
    }

    pub fn parse(name: &str) -> Option<InputFormat> {
        [InputFormat::Avro, InputFormat::Json, InputFormat::Auto]
            .into_iter()
            .find(|format| format.as_str() == name)
    }
}

/// Decodes input records by their topic's format.
#[derive(Clone)]
pub struct InputDecoder {
    pub limits: DecodeLimits,
    formats: HashMap<String, InputFormat>,
    registry: Option<Arc<Registry>>,
    /// A decoder per writer schema id, built on first use, or why none can
    /// be. Its schema is leaked to give the decoder a `'static` borrow:
    /// schema ids are immutable and never evicted, so this is the lifetime
    /// the cache would give them anyway, and it is leaked once per id (a
    /// failure is cached too), bounded by the ids producers actually use.
    writers: Arc<RwLock<HashMap<u32, WriterDecoderOutcome>>>,
}

impl std::fmt::Debug for InputDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputDecoder")
            .field("limits", &self.limits)
            .field("formats", &self.formats)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

impl InputDecoder {
    pub fn new(
        limits: DecodeLimits,
        formats: HashMap<String, InputFormat>,
        registry: Option<Arc<Registry>>,
    ) -> Self {
        InputDecoder {
            limits,
            formats,
            registry,
            writers: Arc::default(),
        }
    }

    /// JSON only, as before any registry: for tools and tests.
    pub fn json(limits: DecodeLimits) -> Self {
        InputDecoder::new(limits, HashMap::new(), None)
    }

    pub fn registry(&self) -> Option<&Arc<Registry>> {
        self.registry.as_ref()
    }

    /// A topic's format: as configured, else `auto` with a registry (one
    /// topic may carry both while producers migrate) and `json` without one
    /// (Avro could not be decoded anyway, so a leading 0 byte is bad JSON).
    pub fn format_of(&self, topic: &str) -> InputFormat {
        match self.formats.get(topic) {
            Some(format) => *format,
            None if self.registry.is_some() => InputFormat::Auto,
            None => InputFormat::Json,
        }
    }

    /// Decodes one input record's value, by its topic's format.
    pub fn decode(
        &self,
        value: Option<&[u8]>,
        source: &SourceCoordinates,
    ) -> Result<ToolEvent, DecodeError> {
        let bytes = value.unwrap_or_default();
        if bytes.len() > self.limits.max_record_bytes {
            return Err(DecodeError::poison(
                ErrorClass::RecordTooLarge,
                format!(
                    "record of {} bytes exceeds the limit of {} bytes",
                    bytes.len(),
                    self.limits.max_record_bytes
                ),
            ));
        }
        let is_avro = match self.format_of(&source.topic) {
            InputFormat::Avro => true,
            InputFormat::Json => false,
            InputFormat::Auto => bytes.first() == Some(&avro::MAGIC_BYTE),
        };
        let event = if is_avro {
            self.decode_avro(bytes, source)?
        } else {
            check_json_depth(bytes, self.limits.max_json_depth)?;
            json::decode(bytes, source)?
        };
        if let Some(budget) = event.token_budget
            && budget > self.limits.max_token_budget
        {
            return Err(DecodeError::poison(
                ErrorClass::InvalidTokenBudget,
                format!(
                    "token_budget {budget} is larger than the maximum of {} (--max-token-budget)",
                    self.limits.max_token_budget
                ),
            ));
        }
        Ok(event)
    }

    fn decode_avro(
        &self,
        bytes: &[u8],
        source: &SourceCoordinates,
    ) -> Result<ToolEvent, DecodeError> {
        let (id, datum) = avro::split_frame(bytes)?;
        let Some(registry) = &self.registry else {
            return Err(DecodeError::poison(
                ErrorClass::UnknownSchema,
                format!("Avro record (schema id {id}) but no schema registry is configured"),
            ));
        };
        match registry.cached(id) {
            Some(WriterSchema::Found(writer)) => {
                self.writer_decoder(id, &writer)?
                    .decode(datum, source, self.limits.max_json_depth)
            }
            Some(WriterSchema::Unknown(reason)) => {
                Err(DecodeError::poison(ErrorClass::UnknownSchema, reason))
            }
            None => Err(DecodeError::MissingSchema { id }),
        }
    }
}

type WriterDecoderOutcome = Result<Arc<avro::WriterDecoder<'static>>, DecodeError>;

impl InputDecoder {
    fn writer_decoder(&self, id: u32, writer: &apache_avro::Schema) -> WriterDecoderOutcome {
        if let Some(outcome) = self
            .writers
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&id)
        {
            return outcome.clone();
        }
        let mut writers = self
            .writers
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        writers
            .entry(id)
            .or_insert_with(|| {
                // Judged before anything is decoded with it: a recursive or
                // too deeply nested schema would let one datum overflow
                // apache-avro's recursive reader. Cached, like any outcome.
                avro::check_writer_schema(id, writer, self.limits.max_schema_depth)?;
                let schema: &'static apache_avro::Schema = Box::leak(Box::new(writer.clone()));
                avro::WriterDecoder::new(id, schema).map(Arc::new)
            })
            .clone()
    }
}

/// Decodes one JSON input record, checking the size limit first.
pub fn decode_event(
    value: Option<&[u8]>,
    source: &SourceCoordinates,
    limits: &DecodeLimits,
) -> Result<ToolEvent, DecodeError> {
    InputDecoder::json(*limits).decode(value, source)
}

impl OutputEncoder {
    pub fn encode_status(&self, update: &StatusUpdate) -> Result<Vec<u8>, String> {
        match self {
            OutputEncoder::Json => serde_json::to_vec(update).map_err(|err| err.to_string()),
            OutputEncoder::Avro {
                status_schema_id, ..
            } => avro::encode_status(*status_schema_id, update),
        }
    }
}

/// How handovers are written: JSON, or Avro under the schema id registered
/// for each handover topic's subject.
#[derive(Debug, Clone, Default)]
pub enum OutputEncoder {
    #[default]
    Json,
    Avro {
        /// By handover topic.
        schema_ids: HashMap<String, u32>,
        /// Of `StatusUpdate` on the live-feed topic.
        status_schema_id: u32,
    },
}

impl OutputEncoder {
    pub fn encode_handover(&self, topic: &str, handover: &Handover) -> Result<Vec<u8>, String> {
        match self {
            OutputEncoder::Json => serde_json::to_vec(handover).map_err(|err| err.to_string()),
            OutputEncoder::Avro { schema_ids, .. } => {
                let id = schema_ids
                    .get(topic)
                    .ok_or_else(|| format!("no schema id resolved for topic {topic}"))?;
                avro::encode_handover(*id, handover)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::memory::{Memory, RawJson, ToolOutput};

    fn source() -> SourceCoordinates {
        SourceCoordinates {
            topic: "mcp.events.all".into(),
            partition: 0,
            offset: 7,
        }
    }

    /// `[[[...0...]]]`, `depth` levels.
    fn nested(depth: usize) -> String {
        format!("{}0{}", "[".repeat(depth), "]".repeat(depth))
    }

    fn event_with_result(result: &str) -> Vec<u8> {
        format!(
            r#"{{"event":"tool.vision_analyze.completed","context_id":"c-1","event_id":"e-1","result":{result}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn depth_is_counted_outside_strings_only() {
        assert_eq!(json_depth(b"{}", 10), 1);
        assert_eq!(json_depth(br#"{"a":[{"b":"[[[[{{{{"}]}"#, 10), 3);
        assert_eq!(json_depth(br#"["\"[[[", [1]]"#, 10), 2);
        assert_eq!(
            json_depth(nested(1_000_000).as_bytes(), 64),
            65,
            "stops past the limit"
        );
        assert_eq!(json_depth(b"", 10), 0);
    }

    #[test]
    fn deeper_input_is_poison_and_the_deepest_accepted_survives_state_and_snapshots() {
        let limits = DecodeLimits {
            max_json_depth: MAX_JSON_DEPTH,
            ..DecodeLimits::default()
        };
        let decoder = InputDecoder::json(limits);
        // The event object itself is one level: its result may take the rest.
        let too_deep = event_with_result(&nested(MAX_JSON_DEPTH));
        match decoder.decode(Some(&too_deep), &source()) {
            Err(DecodeError::Poison { class, .. }) => assert_eq!(class, ErrorClass::MalformedJson),
            other => panic!("expected poison, got {other:?}"),
        }
        let deepest = event_with_result(&nested(MAX_JSON_DEPTH - 1));
        let event = decoder.decode(Some(&deepest), &source()).expect("accepted");
        // Where an accepted result goes: a tool output in memory, frozen in
        // a snapshot, inside the context's stored record, and rendered.
        let mut memory = Memory::new("c-1");
        memory.record_tool_output(ToolOutput {
            event_id: event.event_id.clone(),
            tool: "vision_analyze".into(),
            output: RawJson::from_value(&event.result),
            at: 1,
            since: 0,
        });
        let version = memory.freeze(1);
        let stored = crate::state::record::encode(None, &memory);
        let (_, restored) = crate::state::record::decode(&stored).expect("state reads back");
        let snapshot = restored.snapshot(version).expect("snapshot");
        let snapshot =
            crate::memory::Snapshot::decode(&snapshot.encode()).expect("snapshot reads back");
        let prompt = crate::memory::render_prompt(&snapshot, u64::MAX);
        let rendered = serde_json::to_string(&prompt).expect("renders");
        let reread: Value =
            serde_json::from_str(&rendered).expect("the rendered prompt reads back");
        assert_ne!(
            reread["tool_outputs"][0]["output"],
            Value::Null,
            "{rendered:.200}"
        );
        assert_eq!(restored.last_tool_output(), Some(event.result));
    }

    #[test]
    fn a_token_budget_above_the_maximum_is_poison() {
        let decoder = InputDecoder::json(DecodeLimits::default());
        let event = |budget: u64| {
            json!({"event": "tool.vision_analyze.completed", "context_id": "c-1", "token_budget": budget})
                .to_string()
                .into_bytes()
        };
        match decoder.decode(Some(&event(u64::MAX)), &source()) {
            Err(DecodeError::Poison { class, reason }) => {
                assert_eq!(class, ErrorClass::InvalidTokenBudget);
                assert!(reason.contains("--max-token-budget"), "{reason}");
            }
            other => panic!("expected poison, got {other:?}"),
        }
        let fits = decoder
            .decode(Some(&event(DEFAULT_MAX_TOKEN_BUDGET)), &source())
            .expect("at the maximum");
        assert_eq!(fits.token_budget, Some(DEFAULT_MAX_TOKEN_BUDGET));
    }
}
