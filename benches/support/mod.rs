//! What the throughput and comparison benchmarks share: the canonical input
//! records and the raw exactly-once passthrough that baton is measured
//! against.

#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::json;

use baton::sample::SampleRecord;

/// Every peer's consumers wait at most this long in a fetch. The test
/// broker does not answer a waiting fetch when data arrives (it holds it for
/// the whole `fetch.wait.max.ms`; librdkafka's default of 500 ms gives a
/// 200 ms median on an idle partition, 10 ms gives 3 ms), so with the
/// default every hop would add its wait to the latency. Real Kafka answers
/// at once; the same setting is given to L1, Lk, Quix and baton.
pub const FETCH_WAIT_MS: &str = "10";
pub const PARTITIONS: i32 = 6;
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// One vision event with a result of about 1 KB; `ok: false` makes it a
/// tool failure (`"status":"error"`).
pub fn vision_event(context: &str, ok: bool, filler: &str) -> SampleRecord {
    let mut value = json!({
        "event_id": format!("{context}-vision"), "context_id": context,
        "event": "tool.vision_analyze.completed", "server_id": "srv-vision", "tool": "vision_analyze",
        "arguments": {}, "result": {"labels": ["sofa"], "notes": filler},
        "usage": {"input_tokens": 100, "output_tokens": 20},
    });
    if !ok {
        value["status"] = json!("error");
        value["error"] = json!("vision_analyze timed out");
    }
    SampleRecord {
        key: Some(context.as_bytes().to_vec()),
        value: value.to_string().into_bytes(),
    }
}

/// Vision events with a result of about 1 KB, one per context.
pub fn records(count: usize) -> Vec<SampleRecord> {
    mixed_records("bench", count, 0, 0, 900)
}

/// One event per context `{prefix}-{i}`: every `poison_every`-th record is
/// not JSON at all, every `failure_every`-th (of the rest) a tool failure
/// (0: none). `filler` bytes of result make the size.
pub fn mixed_records(
    prefix: &str,
    count: usize,
    poison_every: usize,
    failure_every: usize,
    filler: usize,
) -> Vec<SampleRecord> {
    let filler = "x".repeat(filler);
    (0..count)
        .map(|i| {
            let context = format!("{prefix}-{i}");
            if poison_every > 0 && i % poison_every == poison_every - 1 {
                SampleRecord {
                    key: Some(context.into_bytes()),
                    value: format!("\u{1}not json {i} {filler}").into_bytes(),
                }
            } else {
                let ok = !(failure_every > 0 && i % failure_every == failure_every / 2);
                vision_event(&context, ok, &filler)
            }
        })
        .collect()
}

/// CPU seconds (user + system) this process has used so far.
pub fn own_cpu_seconds() -> f64 {
    cpu_seconds_of("self").unwrap_or(0.0)
}

/// CPU seconds (user + system) of `/proc/{pid}`.
pub fn cpu_seconds_of(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: the fields start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks)
}

/// Peak resident set (VmHWM) of `/proc/{pid}`, in MiB.
pub fn peak_rss_mib_of(pid: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// What a passthrough measured over its first `expected` inputs.
#[derive(Debug, Clone, Copy)]
pub struct PassthroughStats {
    /// From the first input read to the commit that covers the last one.
    pub elapsed: Duration,
    pub done: usize,
    /// Its own CPU over the same span, in seconds.
    pub cpu_seconds: f64,
}

/// Consume, produce the same bytes `fanout` times, send offsets, commit
/// every interval. Returns after `expected` inputs are committed, or, with
/// `on_done`, reports them there and goes on serving until the process is
/// killed.
pub fn raw_passthrough(
    bootstrap: &str,
    input: &str,
    output: &str,
    expected: usize,
    fanout: usize,
    mut on_done: Option<&mut dyn FnMut(PassthroughStats)>,
) -> PassthroughStats {
    let name = format!("raw-passthrough-{input}-x{fanout}");
    let mut base = ClientConfig::new();
    base.set("bootstrap.servers", bootstrap);
    let consumer: BaseConsumer = base
        .clone()
        .set("group.id", &name)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("fetch.wait.max.ms", FETCH_WAIT_MS)
        .create()
        .expect("consumer");
    let producer: BaseProducer = base
        .clone()
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
    let mut first: Option<(Instant, f64)> = None;
    let mut done = 0;
    let mut stats = None;
    let mut positions: HashMap<i32, i64> = HashMap::new();
    let mut last_commit = Instant::now();
    loop {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(10)) {
            first.get_or_insert_with(|| (Instant::now(), own_cpu_seconds()));
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
        if stats.is_none() && done >= expected {
            let (at, cpu) = first.unwrap_or_else(|| (Instant::now(), own_cpu_seconds()));
            let measured = PassthroughStats {
                elapsed: at.elapsed(),
                done,
                cpu_seconds: own_cpu_seconds() - cpu,
            };
            stats = Some(measured);
            match on_done.as_mut() {
                Some(report) => report(measured),
                None => return measured,
            }
        }
    }
}
