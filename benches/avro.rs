//! Avro decode and encode throughput, per core, for a realistic record.
//!
//! `cargo bench --bench avro` (BATON_BENCH_RECORDS to change the count).
//! One thread, so the figures are records/s per core. The record is a
//! ToolCompleted whose `result` is about 1 KB of JSON; the baseline, in the
//! same run, is baton's JSON codec on the same event. Decoding includes
//! turning the embedded `arguments`/`result` JSON into values, as baton does,
//! with the per-writer-schema decoder baton keeps for each schema id.

use std::hint::black_box;
use std::time::Instant;

use apache_avro::Schema;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use baton::codec::avro::{self, schemas};
use baton::codec::{DecodeLimits, decode_event};
use baton::event::SourceCoordinates;
use baton::handover::{Handover, HandoverStatus};

fn main() {
    let count: usize = std::env::var("BATON_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let result = serde_json::json!({
        "summary": "Mid-century teak sofa, three seats, original upholstery, light wear on the arms. ".repeat(6),
        "sources": (0..6).map(|i| serde_json::json!({"url": format!("https://example.test/listing/{i}"), "price": 800 + i * 50})).collect::<Vec<_>>(),
        "confidence": 0.93,
    })
    .to_string();
    let arguments = r#"{"query":"mid-century sofa value","max_results":6}"#;
    let source = SourceCoordinates {
        topic: "mcp.events.all".into(),
        partition: 0,
        offset: 1,
    };

    let v1 = Schema::parse_str(schemas::TOOL_COMPLETED_V1).expect("v1");
    let v2 = Schema::parse_str(schemas::TOOL_COMPLETED_V2).expect("v2");
    let none = || Value::Union(0, Box::new(Value::Null));
    let some = |v: Value| Value::Union(1, Box::new(v));
    let mut fields = vec![
        ("event_id", Value::String("ctx-42-research".into())),
        ("context_id", Value::String("ctx-42".into())),
        (
            "event",
            Value::String("tool.research_enrich.completed".into()),
        ),
        ("server_id", some(Value::String("srv-research".into()))),
        ("tool", some(Value::String("research_enrich".into()))),
        ("arguments", Value::String(arguments.into())),
        ("result", Value::String(result.clone())),
        ("token_budget", some(Value::Long(20_000))),
        ("workflow", none()),
        ("correlation_id", some(Value::String("ctx-42-r1".into()))),
        ("occurred_at", Value::TimestampMillis(1_795_514_400_000)),
    ];
    let v1_datum = datum(&v1, &fields);
    fields.extend([
        ("status", Value::Enum(0, "ok".into())),
        ("error", none()),
        ("latency_ms", some(Value::Long(87))),
        (
            "usage",
            some(Value::Record(vec![
                ("input_tokens".into(), Value::Long(312)),
                ("output_tokens".into(), Value::Long(145)),
            ])),
        ),
    ]);
    let v2_datum = datum(&v2, &fields);
    let json = serde_json::json!({
        "event_id": "ctx-42-research", "context_id": "ctx-42", "event": "tool.research_enrich.completed",
        "server_id": "srv-research", "tool": "research_enrich",
        "arguments": serde_json::from_str::<serde_json::Value>(arguments).expect("json"),
        "result": serde_json::from_str::<serde_json::Value>(&result).expect("json"),
        "token_budget": 20000, "correlation_id": "ctx-42-r1", "occurred_at": "2026-11-24T10:00:00Z",
        "status": "ok", "usage": {"input_tokens": 312, "output_tokens": 145},
    })
    .to_string()
    .into_bytes();
    println!(
        "record sizes: avro v2 {} B, avro v1 {} B, json {} B; {count} records per figure, 1 thread",
        v2_datum.len() + 5,
        v1_datum.len() + 5,
        json.len()
    );

    let limits = DecodeLimits::default();
    let v2_decoder = avro::WriterDecoder::new(2, &v2).expect("v2 decoder");
    let v1_decoder = avro::WriterDecoder::new(1, &v1).expect("v1 decoder");
    let json_decode = rate(count, || {
        black_box(decode_event(Some(&json), &source, &limits).expect("json decodes"));
    });
    let v2_decode = rate(count, || {
        black_box(
            v2_decoder
                .decode(&v2_datum, &source, baton::codec::DEFAULT_MAX_JSON_DEPTH)
                .expect("v2 decodes"),
        );
    });
    let v1_decode = rate(count, || {
        black_box(
            v1_decoder
                .decode(&v1_datum, &source, baton::codec::DEFAULT_MAX_JSON_DEPTH)
                .expect("v1 decodes"),
        );
    });

    let event = decode_event(Some(&json), &source, &limits).expect("json decodes");
    let handover = Handover {
        handover_id: "5f1d3c0e9a7b4d2e8c6f0a1b2c3d4e5f".into(),
        context_id: event.context_id.clone(),
        intent: "estimate_value".into(),
        agent: "valuation".into(),
        workflow: "vision-research".into(),
        status: HandoverStatus::Queued,
        last_tool_output: event.result.clone(),
        memory_snapshot_url: None,
        token_budget: Some(19_543),
        correlation_id: event.correlation_id.clone(),
        causation_id: event.event_id.clone(),
        produced_at: "2026-11-24T10:00:00.123Z".into(),
        attempt: 1,
        deadline_at: Some("2026-11-24T10:01:00.123Z".into()),
    };
    let json_encode = rate(count, || {
        black_box(serde_json::to_vec(&handover).expect("json encodes"));
    });
    let avro_encode = rate(count, || {
        black_box(avro::encode_handover(7, &handover).expect("avro encodes"));
    });

    println!("decode ToolCompleted (records/s per core):");
    println!("  json (baseline)       {json_decode:>10.0}");
    println!(
        "  avro v2 -> v2         {v2_decode:>10.0}   ratio {:.2}",
        v2_decode / json_decode
    );
    println!(
        "  avro v1 -> v2 (resolved) {v1_decode:>7.0}   ratio {:.2}",
        v1_decode / json_decode
    );
    println!("encode HandoverEvent (records/s per core):");
    println!("  json (baseline)       {json_encode:>10.0}");
    println!(
        "  avro                  {avro_encode:>10.0}   ratio {:.2}",
        avro_encode / json_encode
    );
}

fn datum(schema: &Schema, fields: &[(&str, Value)]) -> Vec<u8> {
    let record = Value::Record(
        fields
            .iter()
            .map(|(name, value)| (name.to_string(), value.clone()))
            .collect(),
    );
    GenericDatumWriter::builder(schema)
        .build()
        .expect("writer")
        .write_value_to_vec(record)
        .expect("valid record")
}

/// Records per second: the best of five runs, since a shared machine only
/// ever makes a run slower.
fn rate(count: usize, mut once: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..count {
                once();
            }
            count as f64 / started.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max)
}
