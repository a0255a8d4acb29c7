//! Tool events as Avro producers write them (the Confluent wire format),
//! for the Avro tests and the benchmark.

use apache_avro::Schema;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use baton::codec::avro::schemas;
use baton::event::{ToolEvent, ToolStatus};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Version {
    V1,
    V2,
}

pub fn millis(rfc3339: &str) -> i64 {
    let at = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .expect("rfc3339");
    (at.unix_timestamp_nanos() / 1_000_000) as i64
}

fn optional(value: Option<Value>) -> Value {
    match value {
        Some(value) => Value::Union(1, Box::new(value)),
        None => Value::Union(0, Box::new(Value::Null)),
    }
}

/// `event` as a ToolCompleted record of `version`, in the wire format.
pub fn avro_bytes(event: &ToolEvent, version: Version, schema_id: u32) -> Vec<u8> {
    let text = match version {
        Version::V1 => schemas::TOOL_COMPLETED_V1,
        Version::V2 => schemas::TOOL_COMPLETED_V2,
    };
    let schema = Schema::parse_str(text).expect("schema");
    let string = |s: &Option<String>| optional(s.clone().map(Value::String));
    let mut fields = vec![
        ("event_id", Value::String(event.event_id.clone())),
        ("context_id", Value::String(event.context_id.clone())),
        ("event", Value::String(event.event.clone())),
        ("server_id", string(&event.server_id)),
        ("tool", string(&event.tool)),
        ("arguments", Value::String(event.arguments.to_string())),
        ("result", Value::String(event.result.to_string())),
        (
            "token_budget",
            optional(event.token_budget.map(|n| Value::Long(n as i64))),
        ),
        ("workflow", string(&event.workflow)),
        ("correlation_id", string(&event.correlation_id)),
        (
            "occurred_at",
            Value::TimestampMillis(millis(event.occurred_at.as_deref().expect("time"))),
        ),
    ];
    if version == Version::V2 {
        let status = match event.status {
            ToolStatus::Ok => Value::Enum(0, "ok".into()),
            ToolStatus::Error => Value::Enum(1, "error".into()),
        };
        fields.push(("status", status));
        fields.push(("error", string(&event.error)));
        fields.push(("latency_ms", optional(Some(Value::Long(12)))));
        fields.push((
            "usage",
            optional(event.usage.map(|usage| {
                Value::Record(vec![
                    (
                        "input_tokens".into(),
                        Value::Long(usage.input_tokens as i64),
                    ),
                    (
                        "output_tokens".into(),
                        Value::Long(usage.output_tokens as i64),
                    ),
                ])
            })),
        ));
    }
    let record = Value::Record(
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    );
    let writer = GenericDatumWriter::builder(&schema)
        .build()
        .expect("writer");
    let mut bytes = vec![0];
    bytes.extend_from_slice(&schema_id.to_be_bytes());
    writer
        .write_value(&mut bytes, record)
        .expect("valid record");
    bytes
}

/// A handover record read back with baton's schema, in the JSON shape the
/// reference uses (normalized as [`super::normalize_handover`] does).
pub fn handover_json(value: &[u8]) -> serde_json::Value {
    let mut value = handover_fields(value);
    super::normalize_handover(&mut value);
    value
}

/// A handover record's fields as JSON, as written (`produced_at` and
/// `deadline_at` left out: they are wall-clock time).
pub fn handover_fields(value: &[u8]) -> serde_json::Value {
    use baton::codec::avro as wire;
    let (_, datum) = wire::split_frame(value).expect("wire format");
    let schema = &wire::HANDOVER_EVENT.parsed;
    let decoded = apache_avro::reader::datum::GenericDatumReader::builder(schema)
        .build()
        .and_then(|reader| reader.read_value(&mut std::io::Cursor::new(datum)))
        .expect("handover decodes with HandoverEvent");
    let Value::Record(fields) = decoded else {
        panic!("handover is a record")
    };
    let mut object = serde_json::Map::new();
    for (name, value) in fields {
        let value = match value {
            Value::Union(_, inner) => *inner,
            other => other,
        };
        let json = match (name.as_str(), value) {
            ("produced_at", _) | ("deadline_at", _) => continue,
            ("last_tool_output", Value::String(text)) => {
                serde_json::from_str(&text).expect("last_tool_output is JSON")
            }
            (_, Value::String(text)) | (_, Value::Enum(_, text)) => serde_json::json!(text),
            (_, Value::Long(n)) => serde_json::json!(n),
            (_, Value::Int(n)) => serde_json::json!(n),
            (_, Value::Null) => serde_json::Value::Null,
            (field, other) => panic!("unexpected {field}: {other:?}"),
        };
        object.insert(name, json);
    }
    serde_json::Value::Object(object)
}
