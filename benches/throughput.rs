//! Throughput of baton against a raw exactly-once passthrough written with
//! rdkafka: same broker, same commit interval, same records, same run.
//!
//! `cargo bench --bench throughput` (BATON_BENCH_RECORDS to change the size,
//! BATON_BENCH_ARGS for extra `baton run` flags).
//! Prints both figures and their ratio. A benchmark, not a test: it asserts
//! nothing about speed.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::json;

use baton::sample::SampleRecord;
use common::{Baton, BatonOptions, Broker, Reader};

const PARTITIONS: i32 = 6;
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// Vision events with a result of about 1 KB, one per context.
fn records(count: usize) -> Vec<SampleRecord> {
    let filler = "x".repeat(900);
    (0..count)
        .map(|i| {
            let context = format!("bench-{i}");
            let value = json!({
                "event_id": format!("{context}-vision"), "context_id": context,
                "event": "tool.vision_analyze.completed", "server_id": "srv-vision", "tool": "vision_analyze",
                "arguments": {}, "result": {"labels": ["sofa"], "notes": filler},
                "usage": {"input_tokens": 100, "output_tokens": 20},
            });
            SampleRecord {
                key: Some(context.into_bytes()),
                value: value.to_string().into_bytes(),
            }
        })
        .collect()
}

/// Consume, produce the same bytes `fanout` times, send offsets, commit
/// every interval.
fn raw_passthrough(
    broker: &Broker,
    input: &str,
    output: &str,
    expected: usize,
    fanout: usize,
) -> (Duration, usize) {
    let name = format!("raw-passthrough-x{fanout}");
    let consumer: BaseConsumer = broker
        .client_config()
        .set("group.id", &name)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer");
    let producer: BaseProducer = broker
        .client_config()
        .set("transactional.id", &name)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "500000")
        .create()
        .expect("producer");
    producer
        .init_transactions(Duration::from_secs(30))
        .expect("init");
    producer.begin_transaction().expect("begin");
    consumer.subscribe(&[input]).expect("subscribe");
    let mut first: Option<Instant> = None;
    let mut done = 0;
    let mut positions: std::collections::HashMap<i32, i64> = std::collections::HashMap::new();
    let mut last_commit = Instant::now();
    while done < expected {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(10)) {
            first.get_or_insert_with(Instant::now);
            for _ in 0..fanout {
                let mut record = BaseRecord::<[u8], [u8]>::to(output)
                    .payload(message.payload().unwrap_or_default());
                if let Some(key) = message.key() {
                    record = record.key(key);
                }
                let mut pending = record;
                loop {
                    match producer.send(pending) {
                        Ok(()) => break,
                        Err((_, returned)) => {
                            producer.poll(Duration::from_millis(1));
                            pending = returned;
                        }
                    }
                }
            }
            positions.insert(message.partition(), message.offset() + 1);
            done += 1;
        }
        if last_commit.elapsed() >= COMMIT_INTERVAL || done == expected {
            if !positions.is_empty() {
                let mut offsets = TopicPartitionList::new();
                for (partition, next) in positions.drain() {
                    offsets
                        .add_partition_offset(input, partition, Offset::Offset(next))
                        .expect("offset");
                }
                let metadata = consumer.group_metadata().expect("group metadata");
                producer
                    .send_offsets_to_transaction(&offsets, &metadata, Duration::from_secs(30))
                    .expect("send offsets");
                producer
                    .commit_transaction(Duration::from_secs(30))
                    .expect("commit");
                producer.begin_transaction().expect("begin");
            }
            last_commit = Instant::now();
        }
    }
    (first.map(|f| f.elapsed()).unwrap_or_default(), done)
}

fn main() {
    let count: usize = std::env::var("BATON_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    broker.create_topics(&[("raw.input", PARTITIONS), ("raw.output", PARTITIONS)]);
    let inputs = records(count);
    let bytes: usize = inputs.iter().map(|r| r.value.len()).sum();
    eprintln!(
        "producing {count} records of ~{} bytes twice",
        bytes / count.max(1)
    );
    broker.produce("raw.input", &inputs);
    broker.produce("mcp.events.all", &inputs);

    let (raw_elapsed, raw_done) = raw_passthrough(&broker, "raw.input", "raw.output", count, 1);
    let raw_rate = raw_done as f64 / raw_elapsed.as_secs_f64();

    // Timed like the passthrough, by records committed: the pod's own
    // `baton_transaction_records_sum`, polled from /metrics, so no reader
    // competes for the cores while it runs.
    let mut options = BatonOptions::new("bench-0");
    // Extra `baton run` flags, to measure a setting (`--snapshots disabled`).
    if let Ok(extra) = std::env::var("BATON_BENCH_ARGS") {
        options.extra_args = extra.split_whitespace().map(String::from).collect();
    }
    let baton = Baton::start(&broker, options);
    let metric = |baton: &Baton, series: &str| -> usize {
        baton
            .http_get("/metrics")
            .and_then(|(_, body)| {
                body.lines()
                    .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0) as usize
    };
    let committed = |baton: &Baton| metric(baton, "baton_transaction_records_sum");
    let mut first_seen = 0;
    common::wait_for("the first commit", Duration::from_secs(60), || {
        first_seen = committed(&baton);
        first_seen > 0
    });
    let started = Instant::now();
    common::wait_for("every record committed", Duration::from_secs(600), || {
        committed(&baton) >= count
    });
    let baton_elapsed = started.elapsed();
    let baton_rate = (count - first_seen) as f64 / baton_elapsed.as_secs_f64();
    // And the handovers really are there.
    let mut reader = Reader::new(&broker, &["mcp.handover.researcher"]);
    reader.wait_until("every handover", Duration::from_secs(120), |r| {
        r.len() >= count
    });
    // Every input fans out into several records (handover, workflow and
    // memory changelogs, the memory snapshot, a status update); on a dev
    // broker the record rate is the ceiling, so measure it at that fan-out.
    let sent = metric(&baton, "baton_records_sent_total");
    drop(baton);
    let fanout = (sent as f64 / count as f64).round().max(1.0) as usize;
    let (fan_elapsed, fan_done) =
        raw_passthrough(&broker, "raw.input", "raw.output", count, fanout);
    let fan_rate = fan_done as f64 / fan_elapsed.as_secs_f64();

    println!(
        "records:                    {count} (~1 KB each, {PARTITIONS} partitions, commit every {COMMIT_INTERVAL:?})"
    );
    println!("raw EOS passthrough:        {raw_rate:>10.0} records/s");
    println!(
        "raw EOS passthrough x{fanout}:     {fan_rate:>10.0} records/s in ({:.0} out)",
        fan_rate * fanout as f64
    );
    println!(
        "baton:                      {baton_rate:>10.0} records/s in ({:.2} records out per record in)",
        sent as f64 / count as f64
    );
    println!(
        "ratio baton / passthrough:  {:>10.2}",
        baton_rate / raw_rate
    );
    println!(
        "ratio baton / passthrough x{fanout}: {:>6.2}",
        baton_rate / fan_rate
    );
}
