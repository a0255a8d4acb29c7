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
