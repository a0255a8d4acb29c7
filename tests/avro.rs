//! Issue 4's integration tests: Avro on the wire with a Confluent-compatible
//! Schema Registry (the test double in `common::registry`), against a real
//! broker and real baton processes.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use baton::codec::avro::schemas;
use baton::event::{SourceCoordinates, ToolEvent, ToolStatus};
use baton::sample::{self, SampleRecord};
use common::avro_events::{Version, avro_bytes, millis};
use common::registry::SchemaRegistry;
use common::{Baton, BatonOptions, Broker, HANDOVER_TOPICS, Reader, reference_of};

const PARTITIONS: i32 = 3;
const REPO: &str = env!("CARGO_MANIFEST_DIR");
const INPUT: &str = "mcp.events.all";
const SUBJECT: &str = "mcp.events.all-value";

/// Whole workflows for `contexts` contexts, interleaved, decoded from the
/// sample JSON into events.
fn sample_events(contexts: usize, seed: u64) -> Vec<ToolEvent> {
    sample::vision_research_traffic(contexts, 0.0, seed)
        .iter()
        .enumerate()
        .map(|(i, record)| {
            let source = SourceCoordinates {
                topic: INPUT.into(),
                partition: 0,
                offset: i as i64,
            };
            let mut event =
                baton::codec::decode_event(Some(&record.value), &source, &Default::default())
                    .expect("sample events decode");
            // Avro carries time as epoch millis; give every event one.
            event.occurred_at = Some(format!("2026-11-24T10:00:{:02}Z", i % 60));
            event
        })
        .collect()
}

/// What a producer on `version` can say about `event`.
fn as_written(event: &ToolEvent, version: Version) -> ToolEvent {
    let mut seen = event.clone();
    if version == Version::V1 {
        seen.usage = None;
        seen.error = None;
        seen.status = if event.result.get("isError") == Some(&serde_json::json!(true)) {
            ToolStatus::Error
        } else {
            ToolStatus::Ok
        };
    }
    seen
}

fn record(event: &ToolEvent, value: Vec<u8>) -> SampleRecord {
    SampleRecord {
        key: Some(event.context_id.clone().into_bytes()),
        value,
    }
}

fn avro_handovers(records: &[common::Record]) -> Vec<(String, serde_json::Value)> {
    common::handover_records(records)
        .into_iter()
        .map(|record| {
            let value = common::avro_events::handover_json(&record.value);
            let id = value["handover_id"].as_str().expect("id").to_string();
            (id, value)
        })
        .collect()
}

fn assert_handovers_match(
    broker: &Broker,
    handovers: &[(String, serde_json::Value)],
    expected: &common::Reference,
) {
    let unique: std::collections::BTreeMap<_, _> = handovers.iter().cloned().collect();
    assert_eq!(unique.len(), expected.handovers.len(), "handover count");
    for (id, handover) in &expected.handovers {
        assert_eq!(unique.get(id), Some(handover), "handover {id}");
    }
    if broker.hides_aborted {
        assert_eq!(handovers.len(), unique.len(), "duplicate handovers");
    }
}

fn registry_args(registry: &SchemaRegistry, auto_register: bool) -> Vec<String> {
    let mut args = vec!["--schema-registry-url".to_string(), registry.url()];
    if auto_register {
        args.push("--auto-register-schemas".into());
    }
    args
}

fn output_reader(broker: &Broker) -> Reader {
    let mut topics: Vec<&str> = HANDOVER_TOPICS.to_vec();
    topics.push("mcp.events.dlq");
    Reader::new(broker, &topics)
}

fn baton_schemas(registry: &SchemaRegistry, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_baton"))
        .arg("schemas")
        .args(args)
        .args(["--schema-registry-url", &registry.url()])
        .arg("--topology")
        .arg(Path::new(REPO).join("topology"))
        .output()
        .expect("baton schemas runs")
}

#[test]
fn v1_and_v2_producers_interleave_on_one_topic_and_poison_is_classified() {
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    let registry = SchemaRegistry::start();
    let v1 = registry.register(SUBJECT, schemas::TOOL_COMPLETED_V1);
    let v2 = registry.register(SUBJECT, schemas::TOOL_COMPLETED_V2);

    // Producers upgrade at different times: per context, a coin decides
    // each event's version, and some still write JSON to the same topic.
    let events = sample_events(150, 7);
    let mut rng = fastrand::Rng::with_seed(11);
    let mut records = Vec::new();
    let mut expected_events = Vec::new();
    for event in &events {
        match rng.u8(..3) {
            0 => {
                records.push(record(event, avro_bytes(event, Version::V1, v1)));
                expected_events.push(Some(as_written(event, Version::V1)));
            }
            1 => {
                records.push(record(event, avro_bytes(event, Version::V2, v2)));
                expected_events.push(Some(as_written(event, Version::V2)));
            }
            _ => {
                let mut json = serde_json::to_value(event).expect("json");
                json["occurred_at"] = serde_json::json!(event.occurred_at);
                records.push(record(event, json.to_string().into_bytes()));
                expected_events.push(Some(event.clone()));
            }
        }
    }
    // Poison: an id the registry never issued, and bytes that are not a
    // ToolCompleted under a real id.
    let unknown_id = SampleRecord {
        key: Some(b"poison-unknown".to_vec()),
        value: [vec![0, 0, 0, 0x27, 0x0f], b"whatever".to_vec()].concat(),
    };
    let mut truncated = avro_bytes(&events[0], Version::V2, v2);
    truncated.truncate(12);
    let truncated = SampleRecord {
        key: Some(b"poison-truncated".to_vec()),
        value: truncated,
    };
    records.push(unknown_id.clone());
    records.push(truncated.clone());
    expected_events.push(None);
    expected_events.push(None);
    broker.produce(INPUT, &records);

    let baton = Baton::start(&broker, {
        let mut options = BatonOptions::new("avro-a");
        options.extra_args = registry_args(&registry, true);
        options
    });
    let expected = reference_of(&expected_events);
    let mut reader = output_reader(&broker);
    reader.wait_until(
        "every handover and dead letter",
        Duration::from_secs(90),
        |r| {
            let handovers: std::collections::BTreeSet<_> =
                avro_handovers(r).into_iter().map(|(id, _)| id).collect();
            handovers.len() >= expected.handovers.len()
                && r.iter()
                    .filter(|record| record.topic == "mcp.events.dlq")
                    .count()
                    >= 2
        },
    );
    reader.poll_to_end();
    assert_handovers_match(&broker, &avro_handovers(&reader.records), &expected);

    let dead = reader.topic("mcp.events.dlq");
    let classes: std::collections::BTreeMap<Vec<u8>, (String, Vec<u8>)> = dead
        .iter()
        .map(|r| {
            (
                r.key.clone().unwrap_or_default(),
                (r.headers["baton.error.class"].clone(), r.value.clone()),
            )
        })
        .collect();
    assert_eq!(classes.len(), 2, "two dead letters: {classes:?}");
    assert_eq!(
        classes[&b"poison-unknown".to_vec()],
        ("unknown_schema".to_string(), unknown_id.value),
        "unknown schema id: class and untouched bytes"
    );
    assert_eq!(
        classes[&b"poison-truncated".to_vec()],
        ("malformed_avro".to_string(), truncated.value),
        "truncated datum: class and untouched bytes"
    );
    // The writer schemas were looked up once each, not per record.
    assert!(
        registry.id_lookups() <= 3 * 3,
        "schema lookups are cached: {}",
        registry.id_lookups()
    );
    drop(baton);
}

#[test]
fn schemas_check_accepts_compatible_evolution_and_refuses_an_incompatible_v3() {
    let registry = SchemaRegistry::start();
    let repo_schemas = Path::new(REPO).join("schemas");

    let registered = baton_schemas(
        &registry,
        &["register", "--dir", repo_schemas.to_str().expect("utf-8")],
    );
    assert!(registered.status.success(), "register: {registered:?}");
    let listing = String::from_utf8_lossy(&registered.stdout);
    assert!(
        listing.contains("ToolCompleted.v1.avsc -> mcp.events.all-value"),
        "{listing}"
    );
    assert!(
        listing.contains("HandoverEvent.avsc -> mcp.handover.researcher-value"),
        "{listing}"
    );

    let checked = baton_schemas(
        &registry,
        &["check", "--dir", repo_schemas.to_str().expect("utf-8")],
    );
    let report = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.status.success(),
        "check of the shipped schemas: {report}"
    );
    assert!(
        report.contains("OK    ToolCompleted.v2.avsc -> mcp.events.all-value"),
        "{report}"
    );

    // v3 turns `latency_ms` into a required field without a default: data
    // written by v1/v2 producers could no longer be read.
    let dir = tempfile::tempdir().expect("dir");
    let v3 = schemas::TOOL_COMPLETED_V2.replace(
        r#"{"name": "latency_ms", "type": ["null", "long"], "default": null, "doc": "How long the call took."}"#,
        r#"{"name": "latency_ms", "type": "long", "doc": "How long the call took."}"#,
    );
    assert_ne!(v3, schemas::TOOL_COMPLETED_V2, "the v3 edit applies");
    std::fs::write(dir.path().join("ToolCompleted.v3.avsc"), v3).expect("write v3");
    let refused = baton_schemas(
        &registry,
        &["check", "--dir", dir.path().to_str().expect("utf-8")],
    );
    let report = String::from_utf8_lossy(&refused.stdout);
    assert_eq!(
        refused.status.code(),
        Some(1),
        "incompatible v3 exits 1: {report}"
    );
    assert!(
        report.contains("FAIL  ToolCompleted.v3.avsc -> mcp.events.all-value"),
        "{report}"
    );
    assert!(
        report.contains("latency_ms"),
        "the reason names the field: {report}"
    );
    assert!(report.contains("BACKWARD"), "the level is named: {report}");

    // An unreachable registry is an error (2), not a verdict.
    registry.stop();
    let unreachable = baton_schemas(
        &registry,
        &["check", "--dir", repo_schemas.to_str().expect("utf-8")],
    );
    assert_eq!(unreachable.status.code(), Some(2), "{unreachable:?}");
}

#[test]
fn a_missing_subject_without_auto_registration_is_a_clear_start_up_error() {
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    let registry = SchemaRegistry::start();
    let mut baton = Baton::start(&broker, {
        let mut options = BatonOptions::new("avro-missing");
        options.extra_args = registry_args(&registry, false);
        options
    });
    let status = baton
        .wait_for_exit(Duration::from_secs(30))
        .expect("baton exits");
    assert!(!status.success());
    let log = baton.log();
    assert!(
        log.contains("subject `mcp.handover.")
            && log.contains("--auto-register-schemas")
            && !log.contains("panicked"),
        "{log}"
    );
}

/// Runs v1 records, then cuts baton off from the registry with `interrupt`
/// while v2 records (a writer schema it has never seen) arrive, holds that
/// for `hold`, lets it back in with `restore`, and checks that the partition
/// paused, nothing was dead-lettered, and the output equals the reference.
fn registry_interruption(
    name: &str,
    credentials: Option<(&str, &str)>,
    interrupt: impl FnOnce(&SchemaRegistry),
    hold: Duration,
    restore: impl FnOnce(&SchemaRegistry),
) {
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    let registry = SchemaRegistry::start();
    let v1 = registry.register(SUBJECT, schemas::TOOL_COMPLETED_V1);
    let v2 = registry.register(SUBJECT, schemas::TOOL_COMPLETED_V2);
    registry.require_basic_auth(credentials);
    let events = sample_events(120, 21);
    let (before, after) = events.split_at(events.len() / 2);

    let baton = Baton::start(&broker, {
        let mut options = BatonOptions::new(name);
        options.extra_args = registry_args(&registry, true);
        if let Some((user, password)) = credentials {
            options.extra_args.extend([
                "--schema-registry-username".into(),
                user.into(),
                "--schema-registry-password".into(),
                password.into(),
            ]);
        }
        options
    });
    // Phase 1: v1 records; baton caches the v1 writer schema.
    let phase1: Vec<SampleRecord> = before
        .iter()
        .map(|e| record(e, avro_bytes(e, Version::V1, v1)))
        .collect();
    broker.produce(INPUT, &phase1);
    let mut expected_events: Vec<Option<ToolEvent>> = before
        .iter()
        .map(|e| Some(as_written(e, Version::V1)))
        .collect();
    let expected = reference_of(&expected_events);
    let mut reader = output_reader(&broker);
    reader.wait_until("phase 1 handovers", Duration::from_secs(60), |r| {
        dedup_count(r) >= expected.handovers.len()
    });

    // Phase 2: baton loses the registry, then v2 records arrive whose writer
    // schema it has never seen.
    interrupt(&registry);
    let phase2: Vec<SampleRecord> = after
        .iter()
        .map(|e| record(e, avro_bytes(e, Version::V2, v2)))
        .collect();
    broker.produce(INPUT, &phase2);
    expected_events.extend(after.iter().map(|e| Some(as_written(e, Version::V2))));
    common::wait_for("a paused partition", Duration::from_secs(30), || {
        metric(&baton, "baton_partitions_paused") >= 1.0
    });
    let interruption_started = std::time::Instant::now();
    common::wait_for("retries while cut off", Duration::from_secs(30), || {
        metric(
            &baton,
            "baton_transient_errors_total{dependency=\"schema_registry\"}",
        ) >= 3.0
    });
    while interruption_started.elapsed() < hold {
        reader.poll_available();
        assert!(
            reader.topic("mcp.events.dlq").is_empty(),
            "no dead letters while cut off from the registry"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    restore(&registry);

    let expected = reference_of(&expected_events);
    reader.wait_until(
        "all handovers after the registry is back",
        Duration::from_secs(60),
        |r| dedup_count(r) >= expected.handovers.len(),
    );
    reader.poll_to_end();
    assert_handovers_match(&broker, &avro_handovers(&reader.records), &expected);
    assert!(
        reader.topic("mcp.events.dlq").is_empty(),
        "no dead letters at all"
    );
    common::wait_for("the partition resumed", Duration::from_secs(10), || {
        metric(&baton, "baton_partitions_paused") == 0.0
    });
    let log = baton.log();
    assert!(
        log.contains("schema registry unavailable; partition paused"),
        "{log}"
    );
    assert!(log.contains("partition resumed"), "{log}");
}

#[test]
fn a_registry_outage_pauses_and_resumes_without_dead_letters() {
    registry_interruption(
        "avro-outage",
        None,
        SchemaRegistry::stop,
        Duration::from_secs(20),
        SchemaRegistry::resume,
    );
}

/// A revoked key (401) is baton's problem, not the record's: it pauses like
/// an outage instead of dead-lettering every record as an unknown schema.
#[test]
fn refused_credentials_pause_like_an_outage_without_dead_letters() {
    registry_interruption(
        "avro-revoked",
        Some(("baton", "key-1")),
        |registry| registry.require_basic_auth(Some(("baton", "key-2"))),
        Duration::from_secs(5),
        |registry| registry.require_basic_auth(Some(("baton", "key-1"))),
    );
}

#[test]
fn confluent_python_clients_interoperate() {
    let Some(python) = common::interop_python() else {
        panic!("confluent-kafka[avro] is not installed: run scripts/test.sh, which installs it");
    };
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    let registry = SchemaRegistry::start();
    let events = sample_events(60, 3);
    let script = Path::new(REPO).join("tests/interop/confluent_avro.py");

    // Confluent's AvroSerializer writes the events (and registers v2 itself).
    let mut producer = Command::new(&python)
        .arg(&script)
        .args([
            "produce",
            "--bootstrap",
            &broker.bootstrap,
            "--registry",
            &registry.url(),
        ])
        .args(["--topic", INPUT])
        .arg("--schema")
        .arg(Path::new(REPO).join("schemas/ToolCompleted.v2.avsc"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python producer starts");
    {
        let mut stdin = producer.stdin.take().expect("stdin");
        for event in &events {
            let line = serde_json::json!({
                "event_id": event.event_id,
                "context_id": event.context_id,
                "event": event.event,
                "server_id": event.server_id,
                "tool": event.tool,
                "arguments": event.arguments.to_string(),
                "result": event.result.to_string(),
                "token_budget": event.token_budget,
                "workflow": event.workflow,
                "correlation_id": event.correlation_id,
                "occurred_at": millis(event.occurred_at.as_deref().expect("time")),
                "status": "ok",
                "error": null,
                "latency_ms": 12,
                "usage": event.usage.map(|u| serde_json::json!({"input_tokens": u.input_tokens, "output_tokens": u.output_tokens})),
            });
            writeln!(stdin, "{line}").expect("write event");
        }
    }
    let produced = producer.wait_with_output().expect("producer finishes");
    assert!(produced.status.success(), "python producer: {produced:?}");

    let baton = Baton::start(&broker, {
        let mut options = BatonOptions::new("avro-interop");
        options.extra_args = registry_args(&registry, true);
        options
    });
    let expected = reference_of(&events.iter().cloned().map(Some).collect::<Vec<_>>());
    let mut reader = output_reader(&broker);
    reader.wait_until("every handover", Duration::from_secs(60), |r| {
        dedup_count(r) >= expected.handovers.len()
    });
    reader.poll_to_end();
    assert_handovers_match(&broker, &avro_handovers(&reader.records), &expected);

    // Confluent's AvroDeserializer reads baton's handovers back.
    let consumed = Command::new(&python)
        .arg(&script)
        .args([
            "consume",
            "--bootstrap",
            &broker.bootstrap,
            "--registry",
            &registry.url(),
        ])
        .args(["--topics", &HANDOVER_TOPICS.join(",")])
        .args([
            "--expect",
            &reader.handovers().len().to_string(),
            "--timeout",
            "60",
        ])
        .output()
        .expect("python consumer runs");
    assert!(consumed.status.success(), "python consumer: {consumed:?}");
    let mut seen = 0;
    for line in String::from_utf8_lossy(&consumed.stdout).lines() {
        let record: serde_json::Value = serde_json::from_str(line).expect("json line");
        let mut value = record["value"].clone();
        assert!(
            value["produced_at"].as_i64().is_some_and(|t| t > 0),
            "{value}"
        );
        common::normalize_handover(&mut value);
        let object = value.as_object_mut().expect("object");
        let output = object.remove("last_tool_output").expect("last_tool_output");
        object.insert(
            "last_tool_output".into(),
            serde_json::from_str(output.as_str().expect("string")).expect("json"),
        );
        let id = value["handover_id"].as_str().expect("id").to_string();
        assert_eq!(
            expected.handovers.get(&id),
            Some(&value),
            "python read {id}"
        );
        assert_eq!(record["key"], value["context_id"], "keyed by context");
        seen += 1;
    }
    assert_eq!(seen, reader.handovers().len());
    drop(baton);
}

/// Distinct handovers among `records`.
fn dedup_count(records: &[common::Record]) -> usize {
    let ids: std::collections::BTreeSet<_> = avro_handovers(records)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    ids.len()
}

/// A sample of `/metrics` by its full series name (with labels).
fn metric(baton: &Baton, series: &str) -> f64 {
    let Some((200, body)) = baton.http_get("/metrics") else {
        return f64::NAN;
    };
    body.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|value| value.trim().parse().ok())
        })
        .unwrap_or(f64::NAN)
}
