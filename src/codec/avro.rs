//! Avro in the Confluent wire format: magic byte 0, the writer schema's id
//! (4 bytes, big-endian), then the datum.
//!
//! A record is always decoded with the schema it was written with, looked up
//! by id, and then resolved into baton's reader schema (the newest
//! `ToolCompleted`). Decoding with "the latest" schema instead would misread
//! every record written before a change.

use std::io::Cursor;
use std::sync::LazyLock;

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::ResolvedSchema;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use serde_json::Value as Json;

use super::DecodeError;
use crate::dlq::ErrorClass;
use crate::event::{SourceCoordinates, ToolEvent, ToolStatus, Usage};
use crate::handover::Handover;
use crate::registry::Avsc;
use crate::workflow::StatusUpdate;

/// The first byte of every record in the Confluent wire format.
pub const MAGIC_BYTE: u8 = 0;

/// baton's own schemas, compiled in so the binary never reads `schemas/` at run time.
pub mod schemas {
    pub const TOOL_COMPLETED_V1: &str = include_str!("../../schemas/ToolCompleted.v1.avsc");
    pub const TOOL_COMPLETED_V2: &str = include_str!("../../schemas/ToolCompleted.v2.avsc");
    pub const HANDOVER_EVENT: &str = include_str!("../../schemas/HandoverEvent.avsc");
    pub const STATUS_UPDATE: &str = include_str!("../../schemas/StatusUpdate.avsc");
    pub const CONTROL_COMMAND: &str = include_str!("../../schemas/ControlCommand.avsc");
    pub const AGENT_HEARTBEAT: &str = include_str!("../../schemas/AgentHeartbeat.avsc");
}

fn compiled(text: &str) -> Avsc {
    match Avsc::parse(text) {
        Ok(schema) => schema,
        // The files are part of the build and covered by a unit test.
        Err(err) => panic!("a schema compiled into baton does not parse: {err}"),
    }
}

/// The reader schema every `ToolCompleted` resolves into.
pub static TOOL_COMPLETED: LazyLock<Avsc> = LazyLock::new(|| compiled(schemas::TOOL_COMPLETED_V2));
/// The schema of handover records.
pub static HANDOVER_EVENT: LazyLock<Avsc> = LazyLock::new(|| compiled(schemas::HANDOVER_EVENT));
/// The schema of live-feed records.
pub static STATUS_UPDATE: LazyLock<Avsc> = LazyLock::new(|| compiled(schemas::STATUS_UPDATE));

/// Splits a wire-format record into its schema id and datum.
pub fn split_frame(bytes: &[u8]) -> Result<(u32, &[u8]), DecodeError> {
    match bytes {
        [MAGIC_BYTE, a, b, c, d, datum @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), datum)),
        [MAGIC_BYTE, ..] => Err(DecodeError::poison(
            ErrorClass::MalformedAvro,
            format!(
                "{} bytes: too short for the Confluent wire format header",
                bytes.len()
            ),
        )),
        _ => Err(DecodeError::poison(
            ErrorClass::MalformedAvro,
            "not in the Confluent wire format (the first byte is not the magic byte 0)",
        )),
    }
}

/// Prepends the wire-format header for `schema_id`.
pub fn frame(schema_id: u32, datum_len: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(5 + datum_len);
    bytes.push(MAGIC_BYTE);
    bytes.extend_from_slice(&schema_id.to_be_bytes());
    bytes
}

/// Decodes `ToolCompleted` data written with one writer schema.
///
/// Building it resolves the writer schema's names once; decoding then reads
/// the datum with the writer's schema and resolves the value into baton's
/// reader schema (whose names are resolved once per process). Bytes that do
/// not follow the writer schema are `malformed_avro`; a writer schema that
/// cannot be resolved into the reader's (a producer made an incompatible
/// change) is `incompatible_schema`. Neither guesses.
pub struct WriterDecoder<'s> {
    schema_id: u32,
    reader: GenericDatumReader<'s>,
    /// The writer schema is `dev.baton.AgentHeartbeat`, read as it is
    /// rather than resolved into `ToolCompleted`.
    heartbeat: bool,
}

/// The full name of the heartbeat record (`schemas/AgentHeartbeat.avsc`).
const HEARTBEAT_RECORD: &str = "dev.baton.AgentHeartbeat";

static READER_NAMES: LazyLock<Result<ResolvedSchema<'static>, String>> = LazyLock::new(|| {
    ResolvedSchema::try_from(&TOOL_COMPLETED.parsed).map_err(|err| err.to_string())
});

impl<'s> WriterDecoder<'s> {
    pub fn new(schema_id: u32, writer: &'s Schema) -> Result<WriterDecoder<'s>, DecodeError> {
        let reader = GenericDatumReader::builder(writer).build().map_err(|err| {
            DecodeError::poison(
                ErrorClass::IncompatibleSchema,
                format!("writer schema {schema_id} cannot be used: {err}"),
            )
        })?;
        let heartbeat = matches!(writer, Schema::Record(record) if record.name.fullname(None) == HEARTBEAT_RECORD);
        Ok(WriterDecoder {
            schema_id,
            reader,
            heartbeat,
        })
    }

    /// `max_json_depth` bounds the JSON documents `arguments` and `result`
    /// carry as strings, as it bounds JSON input.
    pub fn decode(
        &self,
        datum: &[u8],
        source: &SourceCoordinates,
        max_json_depth: usize,
    ) -> Result<ToolEvent, DecodeError> {
        let schema_id = self.schema_id;
        let mut cursor = Cursor::new(datum);
        let written = self.reader.read_value(&mut cursor).map_err(|err| {
            DecodeError::poison(
                ErrorClass::MalformedAvro,
                format!("does not decode with writer schema {schema_id}: {err}"),
            )
        })?;
        let consumed = cursor.position() as usize;
        if consumed != datum.len() {
            return Err(DecodeError::poison(
                ErrorClass::MalformedAvro,
                format!(
                    "{} trailing bytes after the datum written with schema {schema_id}",
                    datum.len() - consumed
                ),
            ));
        }
        if self.heartbeat {
            return heartbeat_event(written, source);
        }
        let names = READER_NAMES
            .as_ref()
            .map_err(|err| DecodeError::poison(ErrorClass::IncompatibleSchema, err.clone()))?;
        let resolved = written
            .resolve_with_names(&TOOL_COMPLETED.parsed, names.get_names())
            .map_err(|err| {
                DecodeError::poison(
                    ErrorClass::IncompatibleSchema,
                    format!(
                        "writer schema {schema_id} does not resolve into dev.baton.ToolCompleted: {err}"
                    ),
                )
            })?;
        let Value::Record(fields) = resolved else {
            return Err(DecodeError::poison(
                ErrorClass::IncompatibleSchema,
                format!("writer schema {schema_id} is not a record"),
            ));
        };
        tool_event(fields, source, max_json_depth)
    }
}

/// Why a writer schema is refused before anything is decoded with it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SchemaShape {
    Recursive(String),
    TooDeep,
}

/// Refuses, as `unsupported_schema`, a writer schema that names itself
/// (directly or through others) or nests deeper than `max_depth`:
/// apache-avro reads a datum recursively, so such a schema lets one record
/// overflow the stack, and the pod would crash on it again after every
/// restart. Linear in the schema's size: each named record is measured once.
pub fn check_writer_schema(
    schema_id: u32,
    writer: &Schema,
    max_depth: usize,
) -> Result<(), DecodeError> {
    let mut records = std::collections::HashMap::new();
    collect_records(writer, &mut records);
    let mut measured = std::collections::HashMap::new();
    let mut open = Vec::new();
    let refused = |why: String| {
        DecodeError::poison(
            ErrorClass::UnsupportedSchema,
            format!("writer schema {schema_id} is not supported: {why}"),
        )
    };
    match height(writer, &records, &mut measured, &mut open, max_depth) {
        Ok(height) if height <= max_depth => Ok(()),
        Ok(_) | Err(SchemaShape::TooDeep) => Err(refused(format!(
            "it nests deeper than {max_depth} levels (--max-schema-depth)"
        ))),
        Err(SchemaShape::Recursive(name)) => {
            Err(refused(format!("record `{name}` contains itself")))
        }
    }
}

fn collect_records<'s>(
    schema: &'s Schema,
    records: &mut std::collections::HashMap<apache_avro::schema::Name, &'s Schema>,
) {
    match schema {
        Schema::Record(record) if records.insert(record.name.clone(), schema).is_none() => {
            for field in &record.fields {
                collect_records(&field.schema, records);
            }
        }
        Schema::Array(array) => collect_records(&array.items, records),
        Schema::Map(map) => collect_records(&map.types, records),
        Schema::Union(union) => {
            for variant in union.variants() {
                collect_records(variant, records);
            }
        }
        _ => {}
    }
}

/// Levels of nesting below and including `schema`. `open` holds the records
/// being measured: meeting one of them again is recursion. The walk stops
/// as soon as it passes `limit`, so it never goes deeper than that.
fn height(
    schema: &Schema,
    records: &std::collections::HashMap<apache_avro::schema::Name, &Schema>,
    measured: &mut std::collections::HashMap<apache_avro::schema::Name, usize>,
    open: &mut Vec<apache_avro::schema::Name>,
    limit: usize,
) -> Result<usize, SchemaShape> {
    if open.len() > limit {
        return Err(SchemaShape::TooDeep);
    }
    let children = |schemas: &mut dyn Iterator<Item = &Schema>,
                    measured: &mut std::collections::HashMap<_, _>,
                    open: &mut Vec<_>|
     -> Result<usize, SchemaShape> {
        let mut deepest = 0;
        for child in schemas {
            deepest = deepest.max(height(child, records, measured, open, limit)?);
            if deepest >= limit {
                return Err(SchemaShape::TooDeep);
            }
        }
        Ok(deepest + 1)
    };
    let name = match schema {
        Schema::Record(record) => &record.name,
        Schema::Ref { name } => name,
        Schema::Array(array) => {
            return children(&mut std::iter::once(&*array.items), measured, open);
        }
        Schema::Map(map) => return children(&mut std::iter::once(&*map.types), measured, open),
        Schema::Union(union) => return children(&mut union.variants().iter(), measured, open),
        _ => return Ok(1),
    };
    if open.contains(name) {
        return Err(SchemaShape::Recursive(name.fullname(None)));
    }
    if let Some(known) = measured.get(name) {
        return Ok(*known);
    }
    let Some(Schema::Record(record)) = records.get(name).copied() else {
        // An unknown reference: building the reader refuses it.
        return Ok(1);
    };
    open.push(name.clone());
    let measured_height = children(
        &mut record.fields.iter().map(|field| &field.schema),
        measured,
        open,
    );
    open.pop();
    let measured_height = measured_height?;
    measured.insert(name.clone(), measured_height);
    Ok(measured_height)
}

/// Decodes one datum written with `writer`; see [`WriterDecoder`], which a
/// caller decoding many records should keep instead.
pub fn decode_tool_completed(
    schema_id: u32,
    writer: &Schema,
    datum: &[u8],
    source: &SourceCoordinates,
) -> Result<ToolEvent, DecodeError> {
    check_writer_schema(schema_id, writer, super::DEFAULT_MAX_SCHEMA_DEPTH)?;
    WriterDecoder::new(schema_id, writer)?.decode(datum, source, super::DEFAULT_MAX_JSON_DEPTH)
}

/// An `AgentHeartbeat` datum as the event every format decodes into.
fn heartbeat_event(written: Value, source: &SourceCoordinates) -> Result<ToolEvent, DecodeError> {
    let Value::Record(fields) = written else {
        return Err(DecodeError::poison(
            ErrorClass::MalformedAvro,
            "an AgentHeartbeat datum that is not a record",
        ));
    };
    let mut event = ToolEvent {
        event: crate::topology::HEARTBEAT_EVENT.to_owned(),
        ..ToolEvent::default()
    };
    for (name, value) in fields {
        let value = unwrap_union(value);
        match name.as_str() {
            "context_id" => event.context_id = string(value).unwrap_or_default(),
            "agent" => event.agent = string(value),
            "progress" => event.progress = string(value),
            "event_id" => event.event_id = string(value).unwrap_or_default(),
            "occurred_at" => event.occurred_at = long(&value).and_then(rfc3339_from_millis),
            _ => {}
        }
    }
    if event.context_id.is_empty() {
        return Err(DecodeError::poison(
            ErrorClass::MissingContextId,
            "the heartbeat has an empty `context_id`",
        ));
    }
    if event.event_id.is_empty() {
        event.event_id = source.derived_event_id();
    }
    Ok(event)
}

/// Reads the resolved fields by name; resolution guarantees every reader
/// field is present, with its default where the writer had none.
fn tool_event(
    fields: Vec<(String, Value)>,
    source: &SourceCoordinates,
    max_json_depth: usize,
) -> Result<ToolEvent, DecodeError> {
    let mut event = ToolEvent::default();
    for (name, value) in fields {
        let value = unwrap_union(value);
        match name.as_str() {
            "event_id" => event.event_id = string(value).unwrap_or_default(),
            "context_id" => event.context_id = string(value).unwrap_or_default(),
            "event" => event.event = string(value).unwrap_or_default(),
            "server_id" => event.server_id = string(value),
            "tool" => event.tool = string(value),
            "arguments" => event.arguments = embedded_json(value, max_json_depth),
            "result" => event.result = embedded_json(value, max_json_depth),
            "token_budget" => event.token_budget = long(&value).map(|n| n.max(0) as u64),
            "workflow" => event.workflow = string(value),
            "correlation_id" => event.correlation_id = string(value),
            "occurred_at" => event.occurred_at = long(&value).and_then(rfc3339_from_millis),
            "status" => {
                if matches!(&value, Value::Enum(_, symbol) if symbol == "error") {
                    event.status = ToolStatus::Error;
                }
            }
            "error" => event.error = string(value),
            "usage" => event.usage = usage(value),
            _ => {}
        }
    }
    if event.context_id.is_empty() {
        return Err(DecodeError::poison(
            ErrorClass::MissingContextId,
            "event has an empty `context_id`",
        ));
    }
    if event.event.is_empty() {
        return Err(DecodeError::poison(
            ErrorClass::UnrecognizedFormat,
            "event has an empty `event` name",
        ));
    }
    if event.event_id.is_empty() {
        event.event_id = source.derived_event_id();
    }
    // A v1 producer cannot say `status`; MCP's `isError` still can.
    if event.result.get("isError").and_then(Json::as_bool) == Some(true) {
        event.status = ToolStatus::Error;
    }
    Ok(event)
}

fn unwrap_union(value: Value) -> Value {
    match value {
        Value::Union(_, inner) => *inner,
        other => other,
    }
}

fn string(value: Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text),
        Value::Enum(_, symbol) => Some(symbol),
        _ => None,
    }
}

fn long(value: &Value) -> Option<i64> {
    match value {
        Value::Long(n) | Value::TimestampMillis(n) | Value::LocalTimestampMillis(n) => Some(*n),
        Value::Int(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// `arguments` and `result` carry JSON documents as strings. A tool whose
/// output is plain text is kept as a JSON string rather than rejected, and so
/// is one nesting deeper than JSON input may: as text it cannot be deeper
/// than what stored state and snapshots read back.
fn embedded_json(value: Value, max_depth: usize) -> Json {
    match value {
        Value::String(text) if super::json_depth(text.as_bytes(), max_depth) > max_depth => {
            Json::String(text)
        }
        Value::String(text) => serde_json::from_str(&text).unwrap_or(Json::String(text)),
        _ => Json::Null,
    }
}

fn usage(value: Value) -> Option<Usage> {
    let Value::Record(fields) = value else {
        return None;
    };
    let mut usage = Usage::default();
    for (name, value) in fields {
        let tokens = long(&value).unwrap_or(0).max(0) as u64;
        match name.as_str() {
            "input_tokens" => usage.input_tokens = tokens,
            "output_tokens" => usage.output_tokens = tokens,
            _ => {}
        }
    }
    Some(usage)
}

fn rfc3339_from_millis(millis: i64) -> Option<String> {
    let nanos = i128::from(millis) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()?
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

fn millis_from_rfc3339(text: &str) -> i64 {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map(|at| (at.unix_timestamp_nanos() / 1_000_000) as i64)
        .unwrap_or(0)
}

/// Encodes a handover as a `HandoverEvent` in the wire format.
pub fn encode_handover(schema_id: u32, handover: &Handover) -> Result<Vec<u8>, String> {
    let optional_string = |value: &Option<String>| match value {
        Some(text) => Value::Union(1, Box::new(Value::String(text.clone()))),
        None => Value::Union(0, Box::new(Value::Null)),
    };
    let status_index = HANDOVER_STATUS_SYMBOLS
        .iter()
        .position(|symbol| *symbol == handover.status.as_str())
        .unwrap_or(0) as u32;
    let record = Value::Record(vec![
        (
            "handover_id".into(),
            Value::String(handover.handover_id.clone()),
        ),
        (
            "context_id".into(),
            Value::String(handover.context_id.clone()),
        ),
        ("intent".into(), Value::String(handover.intent.clone())),
        ("agent".into(), Value::String(handover.agent.clone())),
        ("workflow".into(), Value::String(handover.workflow.clone())),
        (
            "status".into(),
            Value::Enum(status_index, handover.status.as_str().to_string()),
        ),
        (
            "last_tool_output".into(),
            Value::String(handover.last_tool_output.to_string()),
        ),
        (
            "memory_snapshot_url".into(),
            optional_string(&handover.memory_snapshot_url),
        ),
        (
            "token_budget".into(),
            match handover.token_budget {
                Some(tokens) => {
                    Value::Union(1, Box::new(Value::Long(tokens.min(i64::MAX as u64) as i64)))
                }
                None => Value::Union(0, Box::new(Value::Null)),
            },
        ),
        (
            "correlation_id".into(),
            optional_string(&handover.correlation_id),
        ),
        (
            "causation_id".into(),
            Value::String(handover.causation_id.clone()),
        ),
        (
            "produced_at".into(),
            Value::TimestampMillis(millis_from_rfc3339(&handover.produced_at)),
        ),
        (
            "attempt".into(),
            Value::Int(i32::try_from(handover.attempt).unwrap_or(i32::MAX)),
        ),
        (
            "deadline_at".into(),
            match &handover.deadline_at {
                Some(at) => {
                    Value::Union(1, Box::new(Value::TimestampMillis(millis_from_rfc3339(at))))
                }
                None => Value::Union(0, Box::new(Value::Null)),
            },
        ),
    ]);
    let last_tool_output_len = match &record {
        Value::Record(fields) => match &fields[6].1 {
            Value::String(text) => text.len(),
            _ => 0,
        },
        _ => 0,
    };
    let mut bytes = frame(schema_id, 256 + last_tool_output_len);
    HANDOVER_WRITER
        .as_ref()
        .map_err(|err| format!("HandoverEvent writer: {err}"))?
        .write_value_ref(&mut bytes, &record)
        .map_err(|err| err.to_string())?;
    Ok(bytes)
}

/// Decodes a `HandoverEvent` datum written with `writer` (what baton writes
/// when a registry is configured), for agents: fields are taken by name, so
/// any compatible version of the schema reads. The error says what is wrong.
pub fn decode_handover(schema_id: u32, writer: &Schema, datum: &[u8]) -> Result<Handover, String> {
    check_writer_schema(schema_id, writer, super::DEFAULT_MAX_SCHEMA_DEPTH)
        .map_err(|err| err.to_string())?;
    let reader = GenericDatumReader::builder(writer)
        .build()
        .map_err(|err| format!("writer schema {schema_id} cannot be used: {err}"))?;
    let written = reader
        .read_value(&mut Cursor::new(datum))
        .map_err(|err| format!("does not decode with writer schema {schema_id}: {err}"))?;
    let Value::Record(fields) = written else {
        return Err(format!("writer schema {schema_id} is not a record"));
    };
    let mut object = serde_json::Map::new();
    for (name, value) in fields {
        let value = unwrap_union(value);
        let json = match (name.as_str(), value) {
            ("last_tool_output", Value::String(text)) => serde_json::from_str(&text)
                .map_err(|err| format!("`last_tool_output` is not JSON: {err}"))?,
            ("produced_at" | "deadline_at", value) => match long(&value) {
                Some(millis) => rfc3339_from_millis(millis).map_or(Json::Null, Json::String),
                None => Json::Null,
            },
            (_, Value::String(text) | Value::Enum(_, text)) => Json::String(text),
            (_, Value::Long(n)) => Json::from(n),
            (_, Value::Int(n)) => Json::from(n),
            _ => Json::Null,
        };
        object.insert(name, json);
    }
    serde_json::from_value(Json::Object(object)).map_err(|err| format!("not a handover: {err}"))
}

/// Encodes a tool event as a `ToolCompleted` (v2) record in the wire format,
/// as an agent writes its result when a registry is configured. The record
/// is built field by field in the schema's order (a unit test decodes it
/// back through [`decode_tool_completed`]).
pub fn encode_tool_completed(
    schema_id: u32,
    event: &ToolEvent,
    latency_ms: Option<u64>,
) -> Result<Vec<u8>, String> {
    let optional_string = |value: &Option<String>| match value {
        Some(text) => Value::Union(1, Box::new(Value::String(text.clone()))),
        None => Value::Union(0, Box::new(Value::Null)),
    };
    let optional_long = |value: Option<u64>| match value {
        Some(n) => Value::Union(1, Box::new(Value::Long(n.min(i64::MAX as u64) as i64))),
        None => Value::Union(0, Box::new(Value::Null)),
    };
    let occurred_at = event
        .occurred_at
        .as_deref()
        .map(millis_from_rfc3339)
        .unwrap_or(0);
    let (status_index, status) = match event.status {
        ToolStatus::Ok => (0, "ok"),
        ToolStatus::Error => (1, "error"),
    };
    let arguments = event.arguments.to_string();
    let result = event.result.to_string();
    let size = 256 + arguments.len() + result.len();
    let usage = match event.usage {
        Some(usage) => Value::Union(
            1,
            Box::new(Value::Record(vec![
                (
                    "input_tokens".into(),
                    Value::Long(usage.input_tokens.min(i64::MAX as u64) as i64),
                ),
                (
                    "output_tokens".into(),
                    Value::Long(usage.output_tokens.min(i64::MAX as u64) as i64),
                ),
            ])),
        ),
        None => Value::Union(0, Box::new(Value::Null)),
    };
    let record = Value::Record(vec![
        ("event_id".into(), Value::String(event.event_id.clone())),
        ("context_id".into(), Value::String(event.context_id.clone())),
        ("event".into(), Value::String(event.event.clone())),
        ("server_id".into(), optional_string(&event.server_id)),
        ("tool".into(), optional_string(&event.tool)),
        ("arguments".into(), Value::String(arguments)),
        ("result".into(), Value::String(result)),
        ("token_budget".into(), optional_long(event.token_budget)),
        ("workflow".into(), optional_string(&event.workflow)),
        (
            "correlation_id".into(),
            optional_string(&event.correlation_id),
        ),
        ("occurred_at".into(), Value::TimestampMillis(occurred_at)),
        ("status".into(), Value::Enum(status_index, status.into())),
        ("error".into(), optional_string(&event.error)),
        ("latency_ms".into(), optional_long(latency_ms)),
        ("usage".into(), usage),
    ]);
    let mut bytes = frame(schema_id, size);
    TOOL_COMPLETED_WRITER
        .as_ref()
        .map_err(|err| format!("ToolCompleted writer: {err}"))?
        .write_value_ref(&mut bytes, &record)
        .map_err(|err| err.to_string())?;
    Ok(bytes)
}

static TOOL_COMPLETED_WRITER: LazyLock<Result<GenericDatumWriter<'static>, apache_avro::Error>> =
    LazyLock::new(|| {
        GenericDatumWriter::builder(&TOOL_COMPLETED.parsed)
            .validate(false)
            .build()
    });

/// Built once: building a writer resolves the schema's names, which cost
/// more than encoding a record. The record is built field by field from the
/// schema above (a unit test decodes it back), so per-record validation,
/// another full walk of the value, is skipped.
static HANDOVER_WRITER: LazyLock<Result<GenericDatumWriter<'static>, apache_avro::Error>> =
    LazyLock::new(|| {
        GenericDatumWriter::builder(&HANDOVER_EVENT.parsed)
            .validate(false)
            .build()
    });

static STATUS_WRITER: LazyLock<Result<GenericDatumWriter<'static>, apache_avro::Error>> =
    LazyLock::new(|| {
        GenericDatumWriter::builder(&STATUS_UPDATE.parsed)
            .validate(false)
            .build()
    });

/// The symbols of `ContextStatus` in `StatusUpdate.avsc`, in order.
const CONTEXT_STATUS_SYMBOLS: [&str; 8] = [
    "queued",
    "waiting",
    "completed",
    "plan_b",
    "budget_exhausted",
    "failed",
    "retrying",
    "cancelled",
];

/// Encodes a live-feed update as a `StatusUpdate` in the wire format.
pub fn encode_status(schema_id: u32, update: &StatusUpdate) -> Result<Vec<u8>, String> {
    let optional_string = |value: &Option<String>| match value {
        Some(text) => Value::Union(1, Box::new(Value::String(text.clone()))),
        None => Value::Union(0, Box::new(Value::Null)),
    };
    let status = update.status.as_str();
    let status_index = CONTEXT_STATUS_SYMBOLS
        .iter()
        .position(|symbol| *symbol == status)
        .unwrap_or(0) as u32;
    let record = Value::Record(vec![
        (
            "context_id".into(),
            Value::String(update.context_id.clone()),
        ),
        ("workflow".into(), Value::String(update.workflow.clone())),
        ("from".into(), optional_string(&update.from)),
        ("to".into(), Value::String(update.to.clone())),
        ("agent".into(), optional_string(&update.agent)),
        (
            "status".into(),
            Value::Enum(status_index, status.to_string()),
        ),
        ("message".into(), Value::String(update.message.clone())),
        (
            "tokens_left".into(),
            Value::Long(update.tokens_left.min(i64::MAX as u64) as i64),
        ),
        (
            "token_budget".into(),
            Value::Union(
                1,
                Box::new(Value::Long(update.token_budget.min(i64::MAX as u64) as i64)),
            ),
        ),
        ("at".into(), Value::TimestampMillis(update.at)),
    ]);
    let mut bytes = frame(schema_id, 128 + update.message.len());
    STATUS_WRITER
        .as_ref()
        .map_err(|err| format!("StatusUpdate writer: {err}"))?
        .write_value_ref(&mut bytes, &record)
        .map_err(|err| err.to_string())?;
    Ok(bytes)
}

/// A `StatusUpdate` datum (written by baton, with its own schema) as the
/// JSON the live feed sends.
pub fn decode_status_json(datum: &[u8]) -> Option<Json> {
    let value = GenericDatumReader::builder(&STATUS_UPDATE.parsed)
        .build()
        .and_then(|reader| reader.read_value(&mut Cursor::new(datum)))
        .ok()?;
    let Value::Record(fields) = value else {
        return None;
    };
    let mut object = serde_json::Map::new();
    for (name, value) in fields {
        let json = match unwrap_union(value) {
            Value::String(text) | Value::Enum(_, text) => Json::String(text),
            Value::Long(n) | Value::TimestampMillis(n) => Json::from(n),
            Value::Null => Json::Null,
            _ => continue,
        };
        object.insert(name, json);
    }
    Some(Json::Object(object))
}

/// The symbols of `HandoverStatus` in `HandoverEvent.avsc`, in order.
const HANDOVER_STATUS_SYMBOLS: [&str; 7] = [
    "queued",
    "retrying",
    "fallback",
    "plan_b",
    "budget_exhausted",
    "failed",
    "cancelled",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handover::HandoverStatus;

    fn source() -> SourceCoordinates {
        SourceCoordinates {
            topic: "mcp.events.all".into(),
            partition: 0,
            offset: 7,
        }
    }

    fn write(schema: &Schema, fields: Vec<(&str, Value)>) -> Vec<u8> {
        let record = Value::Record(
            fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        );
        let writer = GenericDatumWriter::builder(schema).build().expect("writer");
        writer.write_value_to_vec(record).expect("valid record")
    }

    #[test]
    fn an_encoded_handover_decodes_back_for_agents() {
        let handover = Handover {
            handover_id: "h-9".into(),
            context_id: "ctx-9".into(),
            intent: "enrich_reasoning".into(),
            agent: "researcher".into(),
            workflow: "vision-research".into(),
            status: HandoverStatus::Retrying,
            last_tool_output: serde_json::json!({"caption": "a bicycle"}),
            memory_snapshot_url: Some("http://pod/contexts/ctx-9/snapshots/2?exp=1&sig=00".into()),
            token_budget: Some(1200),
            correlation_id: None,
            causation_id: "e-1".into(),
            produced_at: "2026-12-02T05:00:00.5Z".into(),
            attempt: 2,
            deadline_at: Some("2026-12-02T05:01:00Z".into()),
        };
        let bytes = encode_handover(3, &handover).expect("encodes");
        let (id, datum) = split_frame(&bytes).expect("framed");
        let decoded = decode_handover(id, &HANDOVER_EVENT.parsed, datum).expect("decodes");
        assert_eq!(decoded, handover);
        assert!(decode_handover(id, &HANDOVER_EVENT.parsed, &datum[..datum.len() / 2]).is_err());
    }

    #[test]
    fn an_encoded_tool_completed_decodes_back_to_the_same_event() {
        let event = ToolEvent {
            event_id: "h-1.research_enrich".into(),
            context_id: "ctx-7".into(),
            event: "tool.research_enrich.completed".into(),
            server_id: Some("researcher".into()),
            tool: Some("research_enrich".into()),
            arguments: serde_json::json!({"intent": "enrich_reasoning"}),
            result: serde_json::json!({"summary": "a red bicycle"}),
            usage: Some(Usage {
                input_tokens: 120,
                output_tokens: 40,
            }),
            occurred_at: Some("2026-12-02T05:00:00.250Z".into()),
            correlation_id: Some("corr-1".into()),
            status: ToolStatus::Error,
            error: Some("model unavailable".into()),
            ..ToolEvent::default()
        };
        let bytes = encode_tool_completed(5, &event, Some(812)).expect("encodes");
        let (id, datum) = split_frame(&bytes).expect("framed");
        assert_eq!(id, 5);
        let decoded =
            decode_tool_completed(id, &TOOL_COMPLETED.parsed, datum, &source()).expect("decodes");
        assert_eq!(decoded.event_id, event.event_id);
        assert_eq!(decoded.context_id, event.context_id);
        assert_eq!(decoded.result, event.result);
        assert_eq!(decoded.arguments, event.arguments);
        assert_eq!(decoded.usage, event.usage);
        assert_eq!(decoded.status, ToolStatus::Error);
        assert_eq!(decoded.error, event.error);
        assert_eq!(decoded.correlation_id, event.correlation_id);
        assert_eq!(
            decoded.occurred_at.as_deref(),
            Some("2026-12-02T05:00:00.25Z")
        );
    }

    fn v1_record() -> Vec<(&'static str, Value)> {
        let none = || Value::Union(0, Box::new(Value::Null));
        vec![
            ("event_id", Value::String("e-1".into())),
            ("context_id", Value::String("ctx-1".into())),
            (
                "event",
                Value::String("tool.vision_analyze.completed".into()),
            ),
            ("server_id", none()),
            ("tool", none()),
            ("arguments", Value::String(r#"{"image":"a.png"}"#.into())),
            ("result", Value::String(r#"{"labels":["cat"]}"#.into())),
            ("token_budget", Value::Union(1, Box::new(Value::Long(5000)))),
            ("workflow", none()),
            ("correlation_id", none()),
            ("occurred_at", Value::TimestampMillis(1_700_000_000_000)),
        ]
    }

    #[test]
    fn compiled_schemas_parse_and_v2_reads_v1() {
        let v1 = compiled(schemas::TOOL_COMPLETED_V1);
        for text in [
            schemas::TOOL_COMPLETED_V2,
            schemas::HANDOVER_EVENT,
            schemas::STATUS_UPDATE,
            schemas::CONTROL_COMMAND,
            schemas::AGENT_HEARTBEAT,
        ] {
            compiled(text);
        }
        apache_avro::schema_compatibility::SchemaCompatibility::can_read(
            &v1.parsed,
            &TOOL_COMPLETED.parsed,
        )
        .expect("v2 reads v1");
    }

    #[test]
    fn a_heartbeat_is_read_with_its_own_schema() {
        let schema = compiled(schemas::AGENT_HEARTBEAT);
        let datum = write(
            &schema.parsed,
            vec![
                ("context_id", Value::String("ctx-1".into())),
                ("agent", Value::String("researcher".into())),
                (
                    "progress",
                    Value::Union(1, Box::new(Value::String("3 of 10 sources".into()))),
                ),
                ("event_id", Value::Union(0, Box::new(Value::Null))),
                ("occurred_at", Value::Union(0, Box::new(Value::Null))),
            ],
        );
        let event = decode_tool_completed(9, &schema.parsed, &datum, &source()).expect("decodes");
        assert_eq!(event.event, crate::topology::HEARTBEAT_EVENT);
        assert_eq!(event.context_id, "ctx-1");
        assert_eq!(event.agent.as_deref(), Some("researcher"));
        assert_eq!(event.progress.as_deref(), Some("3 of 10 sources"));
        assert_eq!(event.event_id, source().derived_event_id());
        assert_eq!(event.usage, None);
        let empty = write(
            &schema.parsed,
            vec![
                ("context_id", Value::String(String::new())),
                ("agent", Value::String("researcher".into())),
                ("progress", Value::Union(0, Box::new(Value::Null))),
                ("event_id", Value::Union(0, Box::new(Value::Null))),
                ("occurred_at", Value::Union(0, Box::new(Value::Null))),
            ],
        );
        assert!(decode_tool_completed(9, &schema.parsed, &empty, &source()).is_err());
    }

    #[test]
    fn a_v1_record_resolves_with_v2_defaults() {
        let v1 = compiled(schemas::TOOL_COMPLETED_V1);
        let datum = write(&v1.parsed, v1_record());
        let event = decode_tool_completed(1, &v1.parsed, &datum, &source()).expect("decodes");
        assert_eq!(event.context_id, "ctx-1");
        assert_eq!(event.status, ToolStatus::Ok);
        assert_eq!(event.usage, None);
        assert_eq!(event.token_budget, Some(5000));
        assert_eq!(event.result, serde_json::json!({"labels": ["cat"]}));
        assert_eq!(event.occurred_at.as_deref(), Some("2023-11-14T22:13:20Z"));
    }

    #[test]
    fn a_v2_error_record_is_a_failed_call() {
        let mut fields = v1_record();
        fields.push(("status", Value::Enum(1, "error".into())));
        fields.push((
            "error",
            Value::Union(1, Box::new(Value::String("timeout".into()))),
        ));
        fields.push(("latency_ms", Value::Union(1, Box::new(Value::Long(30)))));
        fields.push((
            "usage",
            Value::Union(
                1,
                Box::new(Value::Record(vec![
                    ("input_tokens".into(), Value::Long(10)),
                    ("output_tokens".into(), Value::Long(5)),
                ])),
            ),
        ));
        let datum = write(&TOOL_COMPLETED.parsed, fields);
        let event =
            decode_tool_completed(2, &TOOL_COMPLETED.parsed, &datum, &source()).expect("decodes");
        assert_eq!(event.status, ToolStatus::Error);
        assert_eq!(event.error.as_deref(), Some("timeout"));
        assert_eq!(event.usage.map(|u| u.total()), Some(15));
    }

    #[test]
    fn bad_bytes_and_bad_schemas_are_poison_with_their_class() {
        let class = |result: Result<ToolEvent, DecodeError>| match result {
            Err(DecodeError::Poison { class, .. }) => class,
            other => panic!("expected poison, got {other:?}"),
        };
        let v2 = &TOOL_COMPLETED.parsed;
        assert_eq!(
            class(decode_tool_completed(1, v2, &[0xff; 3], &source())),
            ErrorClass::MalformedAvro
        );
        let mut datum = write(v2, {
            let mut fields = v1_record();
            fields.push(("status", Value::Enum(0, "ok".into())));
            fields.push(("error", Value::Union(0, Box::new(Value::Null))));
            fields.push(("latency_ms", Value::Union(0, Box::new(Value::Null))));
            fields.push(("usage", Value::Union(0, Box::new(Value::Null))));
            fields
        });
        datum.push(0);
        assert_eq!(
            class(decode_tool_completed(1, v2, &datum, &source())),
            ErrorClass::MalformedAvro
        );
        // A writer that dropped a field the reader requires.
        let other = Schema::parse_str(
            r#"{"type":"record","name":"ToolCompleted","namespace":"dev.baton","fields":[{"name":"context_id","type":"string"}]}"#,
        )
        .expect("parses");
        let datum = write(&other, vec![("context_id", Value::String("c".into()))]);
        assert_eq!(
            class(decode_tool_completed(9, &other, &datum, &source())),
            ErrorClass::IncompatibleSchema
        );
        // A hostile length prefix asks for far more than the record holds.
        let hostile = [0x80, 0x80, 0x80, 0x80, 0x08];
        assert_eq!(
            class(decode_tool_completed(1, v2, &hostile, &source())),
            ErrorClass::MalformedAvro
        );
    }

    #[test]
    fn frames_round_trip_and_short_frames_are_poison() {
        let mut bytes = frame(258, 1);
        bytes.push(42);
        assert_eq!(split_frame(&bytes).expect("frame"), (258, &[42u8][..]));
        assert!(split_frame(&[0, 1]).is_err());
        assert!(split_frame(b"{}").is_err());
    }

    #[test]
    fn status_updates_encode_against_their_schema() {
        let update = StatusUpdate {
            context_id: "ctx".into(),
            workflow: "vision-research".into(),
            from: None,
            to: "ResearchQueued".into(),
            agent: Some("researcher".into()),
            status: crate::workflow::ContextStatus::Queued,
            message: "Researcher is thinking...".into(),
            tokens_left: 900,
            token_budget: 1000,
            at: 5,
        };
        let bytes = encode_status(3, &update).expect("encodes");
        let (id, datum) = split_frame(&bytes).expect("framed");
        assert_eq!(id, 3);
        let value = GenericDatumReader::builder(&STATUS_UPDATE.parsed)
            .build()
            .and_then(|reader| reader.read_value(&mut Cursor::new(datum)))
            .expect("decodes");
        let Value::Record(fields) = value else {
            panic!("record")
        };
        assert!(fields.contains(&("status".into(), Value::Enum(0, "queued".into()))));
        assert!(fields.contains(&(
            "token_budget".into(),
            Value::Union(1, Box::new(Value::Long(1000)))
        )));
    }

    #[test]
    fn handovers_encode_against_their_schema() {
        let handover = Handover {
            handover_id: "h".into(),
            context_id: "ctx".into(),
            intent: "enrich_reasoning".into(),
            agent: "researcher".into(),
            workflow: "vision-research".into(),
            status: HandoverStatus::PlanB,
            last_tool_output: serde_json::json!({"ok": true}),
            memory_snapshot_url: None,
            token_budget: Some(42),
            correlation_id: Some("corr".into()),
            causation_id: "e-1".into(),
            produced_at: "2026-11-24T10:00:00Z".into(),
            attempt: 2,
            deadline_at: Some("2026-11-24T10:02:00Z".into()),
        };
        let bytes = encode_handover(7, &handover).expect("encodes");
        let (id, datum) = split_frame(&bytes).expect("framed");
        assert_eq!(id, 7);
        let schema = &HANDOVER_EVENT.parsed;
        let value = GenericDatumReader::builder(schema)
            .build()
            .and_then(|reader| reader.read_value(&mut Cursor::new(datum)))
            .expect("decodes");
        let Value::Record(fields) = value else {
            panic!("record")
        };
        assert!(fields.contains(&("status".into(), Value::Enum(3, "plan_b".into()))));
        assert!(fields.contains(&(
            "produced_at".into(),
            Value::TimestampMillis(1_795_514_400_000)
        )));
    }

    #[test]
    fn recursive_or_too_deep_writer_schemas_are_unsupported_before_any_decoding() {
        let unsupported = |text: &str, limit: usize| {
            let schema = Schema::parse_str(text).expect("parses");
            match check_writer_schema(7, &schema, limit) {
                Err(DecodeError::Poison { class, reason }) => {
                    assert_eq!(class, ErrorClass::UnsupportedSchema, "{reason}");
                    reason
                }
                other => panic!("expected unsupported_schema, got {other:?}"),
            }
        };
        let linked_list = r#"{"type":"record","name":"Node","namespace":"x","fields":[
            {"name":"value","type":"string"},
            {"name":"next","type":["null","Node"]}]}"#;
        assert!(unsupported(linked_list, 32).contains("`x.Node` contains itself"));
        let mutual = r#"{"type":"record","name":"A","fields":[
            {"name":"b","type":{"type":"record","name":"B","fields":[
                {"name":"a","type":{"type":"array","items":"A"}}]}}]}"#;
        assert!(unsupported(mutual, 32).contains("contains itself"));
        let mut deep = r#""string""#.to_string();
        for _ in 0..10 {
            deep = format!(r#"{{"type":"array","items":{deep}}}"#);
        }
        assert!(unsupported(&deep, 5).contains("deeper than 5"));
        let schema = Schema::parse_str(&deep).expect("parses");
        assert!(check_writer_schema(7, &schema, 32).is_ok());
        // A named type used twice side by side is not recursion.
        let reused = r#"{"type":"record","name":"Pair","fields":[
            {"name":"left","type":{"type":"record","name":"Leaf","fields":[{"name":"v","type":"int"}]}},
            {"name":"right","type":"Leaf"}]}"#;
        let schema = Schema::parse_str(reused).expect("parses");
        assert!(check_writer_schema(7, &schema, 32).is_ok());
        assert!(check_writer_schema(7, &TOOL_COMPLETED.parsed, 8).is_ok());
    }

    #[test]
    fn reused_types_are_measured_once_not_once_per_use() {
        // 40 levels, each using the level below twice: a walk that expanded
        // every use would visit 2^40 nodes.
        let mut fields =
            String::from(r#"{"type":"record","name":"L0","fields":[{"name":"v","type":"int"}]}"#);
        for level in 1..40 {
            fields = format!(
                r#"{{"type":"record","name":"L{level}","fields":[{{"name":"a","type":{fields}}},{{"name":"b","type":"L{}"}}]}}"#,
                level - 1
            );
        }
        let schema = Schema::parse_str(&fields).expect("parses");
        let started = std::time::Instant::now();
        assert!(check_writer_schema(7, &schema, 64).is_ok());
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert!(check_writer_schema(7, &schema, 20).is_err());
    }
}
