//! Restore speed: 1,000,000 changelog records into a fresh RocksDB store.
//!
//! `cargo bench --bench restore` (BATON_BENCH_RECORDS to change the size).
//! The baseline, measured in the same run on the same partition, is a plain
//! read of the changelog to its end, applying nothing.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use baton::event::SourceCoordinates;
use baton::kafka::KafkaSettings;
use baton::memory::{Memory, RawJson, ToolOutput};
use baton::state::restore::{RestoreRequest, restore};
use baton::state::{PartitionStore, changelog_headers};
use baton::workflow::WorkflowState;
use common::Broker;

const CHANGELOG: &str = "bench-context-changelog";
const CONTEXTS: usize = 100_000;

fn main() {
    let count: usize = std::env::var("BATON_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let broker = Broker::start();
    broker.create_topics(&[(CHANGELOG, 1)]);

    let producer: ThreadedProducer<DefaultProducerContext> = broker
        .client_config()
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let started = Instant::now();
    let mut value_bytes = 0;
    for i in 0..count {
        let context = format!("ctx-{}", i % CONTEXTS);
        let version = (i / CONTEXTS) as u64 + 1;
        let state = serde_json::json!({
            "v": 1, "context_id": context, "workflow": "vision-research", "state": "DownstreamQueued",
            "locked_by": "valuation", "attempts": 1, "token_budget": 20000, "tokens_used": 1200 + version,
            "version": version, "updated_at": 1_764_000_000_000i64, "join_arrived": ["tool.valuation_estimate.completed"],
            "recent_event_ids": [format!("{context}-vision"), format!("{context}-research")],
        })
        .to_string();
        // A context record as the pods write it: the state and a memory
        // holding the vision step's tool output.
        let workflow = WorkflowState::decode(state.as_bytes()).expect("a valid state");
        let mut memory = Memory::new(&context);
        memory.record_tool_output(ToolOutput {
            event_id: format!("{context}-vision"),
            tool: "vision_analyze".into(),
            output: RawJson::from_value(
                &serde_json::json!({"labels": ["bicycle", "red"], "text": "x".repeat(400)}),
            ),
            at: 1_764_000_000_000,
            since: 0,
        });
        memory.freeze(1_764_000_000_000);
        let state = String::from_utf8(baton::state::record::encode(Some(&workflow), &memory))
            .expect("JSON is UTF-8");
        let version = baton::state::record::version(Some(&workflow), &memory);
        value_bytes += state.len();
        let record_headers = changelog_headers(
            &SourceCoordinates {
                topic: "mcp.events.all".into(),
                partition: 0,
                offset: i as i64,
            },
            version,
        );
        let mut record = BaseRecord::<str, str>::to(CHANGELOG)
            .key(context.as_str())
            .payload(state.as_str())
            .partition(0)
            .headers(record_headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, returned)) => {
                    std::thread::sleep(Duration::from_millis(1));
                    record = returned;
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120)).expect("flush");
    eprintln!(
        "wrote {count} changelog records (~{} bytes each) in {:?}",
        value_bytes / count.max(1),
        started.elapsed()
    );

    // Baseline: read the partition to its end, applying nothing.
    let consumer: BaseConsumer = broker
        .client_config()
        .set("group.id", "bench-raw")
        .set("enable.partition.eof", "true")
        .set("fetch.max.bytes", "52428800")
        .set("max.partition.fetch.bytes", "10485760")
        .set("fetch.wait.max.ms", "50")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(CHANGELOG, 0, Offset::Beginning)
        .expect("assign");
    consumer.assign(&assignment).expect("assign");
    let started = Instant::now();
    let mut raw_read = 0;
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(_)) => raw_read += 1,
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
            _ => {}
        }
    }
    let raw_elapsed = started.elapsed();
    drop(consumer);

    let dir = tempfile::tempdir().expect("dir");
    let store = PartitionStore::open(
        dir.path(),
        &baton::state::StoreMemory::new(baton::state::DEFAULT_STATE_MEMORY_BYTES),
    )
    .expect("store");
    let committed: HashMap<(String, i32), i64> =
        [(("mcp.events.all".to_string(), 0), count as i64)].into();
    let settings = KafkaSettings {
        bootstrap_servers: broker.bootstrap.clone(),
        properties: vec![],
    };
    let cancel = AtomicBool::new(false);
    let report = restore(
        store.db(),
        &RestoreRequest {
            kafka: &settings,
            changelog_topic: CHANGELOG,
            partition: 0,
            committed: &committed,
            version_of: baton::state::record::version_of,
            timers_of: baton::state::record::timers_of,
            cancel: &cancel,
        },
    )
    .expect("restore");
    assert_eq!(report.read as usize, count);

    let raw_rate = raw_read as f64 / raw_elapsed.as_secs_f64();
    let restore_rate = report.read as f64 / report.elapsed.as_secs_f64();
    println!("changelog records:        {count} ({CONTEXTS} contexts)");
    println!("raw read to end:          {raw_rate:>10.0} records/s ({raw_elapsed:?})");
    println!(
        "restore into RocksDB:     {restore_rate:>10.0} records/s ({:?}, applied {}, stale {})",
        report.elapsed, report.applied, report.skipped_stale
    );
    println!(
        "ratio restore / raw read: {:>10.2}",
        restore_rate / raw_rate
    );
}
