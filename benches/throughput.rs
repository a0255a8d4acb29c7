//! Throughput of baton against a raw exactly-once passthrough written with
//! rdkafka: same broker, same commit interval, same records, same run.
//!
//! `cargo bench --bench throughput` (BATON_BENCH_RECORDS to change the size,
//! BATON_BENCH_ARGS for extra `baton run` flags).
//! Prints both figures and their ratio. A benchmark, not a test: it asserts
//! nothing about speed.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::time::{Duration, Instant};

use common::{Baton, BatonOptions, Broker, Reader};
use support::{COMMIT_INTERVAL, PARTITIONS, raw_passthrough, records};

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

    let raw = raw_passthrough(&broker.bootstrap, "raw.input", "raw.output", count, 1, None);
    let raw_rate = raw.done as f64 / raw.elapsed.as_secs_f64();

    // Timed like the passthrough, by records committed: the pod's own
    // `baton_transaction_records_sum`, polled from /metrics, so no reader
    // competes for the cores while it runs.
    let mut options = BatonOptions::new("bench-0");
    // Extra `baton run` flags, to measure a setting (`--snapshots disabled`).
    if let Ok(extra) = std::env::var("BATON_BENCH_ARGS") {
        options.extra_args = extra.split_whitespace().map(String::from).collect();
    }
    let baton = Baton::start(&broker, options);
    let metric = |baton: &Baton, series: &str| baton.metric(series) as usize;
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
    let fan = raw_passthrough(
        &broker.bootstrap,
        "raw.input",
        "raw.output",
        count,
        fanout,
        None,
    );
    let fan_rate = fan.done as f64 / fan.elapsed.as_secs_f64();

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
