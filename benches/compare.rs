//! baton against its peers, in one run on one broker with the same inputs
//! and commit interval (100 ms, exactly-once):
//!
//! - `l1`: the raw rdkafka transactional passthrough (one record per input);
//! - `lk`: the same passthrough writing as many records per input as baton;
//! - `quix`: Quix Streams running the workflow's first step with RocksDB
//!   state (benches/peers/quix_first_step.py), when BATON_BENCH_QUIX_PYTHON
//!   names a Python that has quixstreams;
//! - `baton`: `baton run` on topology/.
//!
//! Each runs in its own process, so its CPU (/proc/PID/stat) and peak RSS
//! (VmHWM) are its own. Inputs are preloaded, then the peer starts: the rate
//! is events from its first input read to its last output committed. Then a
//! paced producer offers fractions of that peak and a read_committed reader
//! measures end-to-end latency (output visible minus input sent).
//!
//! Driven by scripts/bench.sh; settings from the environment:
//! BATON_BENCH_RECORDS (100000), BATON_BENCH_LOADS ("0.25,0.5,0.75"),
//! BATON_BENCH_LOAD_SECS (10), BATON_BENCH_PEERS ("l1,baton,lk,quix,loop"),
//! BATON_BENCH_POISON_EVERY (100), BATON_BENCH_FAILURE_EVERY (50),
//! BATON_BENCH_RSS_CONTEXTS (0: skip), BATON_BENCH_JSON (where to write the
//! results), BATON_BENCH_QUIX_PYTHON.
//! A benchmark, not a test: it asserts nothing about speed.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};

use baton::codec::avro::schemas;
use baton::sample::SampleRecord;
use common::avro_events::{Version, avro_bytes};
use common::registry::SchemaRegistry;
use common::{Baton, BatonOptions, Broker};
use support::{
    COMMIT_INTERVAL, FETCH_WAIT_MS, PARTITIONS, PassthroughStats, cpu_seconds_of, mixed_records,
    peak_rss_mib_of, raw_passthrough,
};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The passthrough as a child process: `compare passthrough BOOTSTRAP INPUT
/// OUTPUT EXPECTED FANOUT`. Prints one JSON line when the first EXPECTED
/// inputs are committed, then serves until killed.
fn passthrough_child(args: &[String]) {
    let [bootstrap, input, output, expected, fanout] = args else {
        panic!("passthrough BOOTSTRAP INPUT OUTPUT EXPECTED FANOUT");
    };
    let expected: usize = expected.parse().expect("EXPECTED");
    let fanout: usize = fanout.parse().expect("FANOUT");
    let mut report = |stats: PassthroughStats| {
        let rss = peak_rss_mib_of("self").unwrap_or(0.0);
        println!(
            "{}",
            json!({"elapsed_s": stats.elapsed.as_secs_f64(), "done": stats.done,
                   "cpu_s": stats.cpu_seconds, "rss_mib": rss})
        );
    };
    raw_passthrough(
        bootstrap,
        input,
        output,
        expected,
        fanout,
        Some(&mut report),
    );
}

/// Topics with explicit retention, which Quix Streams needs on this broker
/// (BROKER.md: DescribeConfigs returns only the keys that were set).
fn create_topics_with_retention(broker: &Broker, names: &[&str]) {
    let admin: AdminClient<DefaultClientContext> =
        broker.client_config().create().expect("admin client");
    let new: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| {
            NewTopic::new(name, PARTITIONS, TopicReplication::Fixed(1))
                .set("retention.ms", "604800000")
                .set("retention.bytes", "-1")
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for result in runtime
        .block_on(admin.create_topics(&new, &AdminOptions::new()))
        .expect("create topics")
    {
        if let Err((topic, code)) = result {
            assert_eq!(
                code,
                rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                "creating {topic}"
            );
        }
    }
}

/// Committed records in `topics`, counted to the fetch-side end.
fn count_records(broker: &Broker, topics: &[String]) -> usize {
    let mut total = 0;
    for topic in topics {
        let consumer: BaseConsumer = broker
            .client_config()
            .set("group.id", "bench-counter")
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", "50")
            .create()
            .expect("counter");
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
            continue;
        };
        let mut assignment = TopicPartitionList::new();
        for partition in found.partitions() {
            assignment
                .add_partition_offset(topic, partition.id(), Offset::Beginning)
                .expect("assign");
        }
        consumer.assign(&assignment).expect("assign");
        let mut at_end = std::collections::HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while at_end.len() < found.partitions().len() && Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    at_end.remove(&message.partition());
                    total += 1;
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                }
                _ => {}
            }
        }
    }
    total
}

/// One offered load: what was offered, what came out, and the latency.
/// How a peer's inputs are written: as they are (JSON), or re-encoded
/// (Avro for baton).
type Encode<'a> = &'a dyn Fn(SampleRecord) -> SampleRecord;

fn load_point(
    broker: &Broker,
    input: &str,
    outputs: &[&str],
    prefix: &str,
    rate: f64,
    secs: f64,
    encode: Encode<'_>,
) -> Value {
    let count = ((rate * secs) as usize).max(10);
    let inputs: Vec<SampleRecord> = mixed_records(prefix, count, 0, 0, 900)
        .into_iter()
        .map(encode)
        .collect();
    let epoch = Instant::now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..count).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));

    // The reader: every output partition from its current end.
    let consumer: BaseConsumer = broker
        .client_config()
        .set("group.id", "bench-latency")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "5")
        .set("fetch.min.bytes", "1")
        .create()
        .expect("latency reader");
    let mut assignment = TopicPartitionList::new();
    for topic in outputs {
        for partition in 0..PARTITIONS {
            assignment
                .add_partition_offset(topic, partition, Offset::End)
                .expect("assign");
        }
    }
    consumer.assign(&assignment).expect("assign");
    // Let the reader resolve its end offsets before anything is offered.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_millis(1500) {
        let _ = consumer.poll(Duration::from_millis(50));
    }
    let reader = {
        let sent = sent.clone();
        let stop = stop.clone();
        let prefix = format!("{prefix}-");
        std::thread::spawn(move || {
            let mut latencies: Vec<f64> = Vec::new();
            let mut seen = vec![false; sent.len()];
            let mut last_seen = 0.0;
            let mut quiet_since: Option<Instant> = None;
            loop {
                match consumer.poll(Duration::from_millis(20)) {
                    Some(Ok(message)) => {
                        let now = epoch.elapsed().as_secs_f64();
                        let context = message
                            .key()
                            .and_then(|k| std::str::from_utf8(k).ok())
                            .filter(|k| k.starts_with(&prefix))
                            .map(String::from)
                            .or_else(|| {
                                let value: Value =
                                    serde_json::from_slice(message.payload()?).ok()?;
                                value["context_id"].as_str().map(String::from)
                            });
                        let index = context
                            .as_deref()
                            .and_then(|c| c.strip_prefix(&prefix))
                            .and_then(|i| i.parse::<usize>().ok());
                        if let Some(i) = index.filter(|i| *i < seen.len() && !seen[*i]) {
                            let at = sent[i].load(Ordering::Relaxed);
                            if at > 0 {
                                seen[i] = true;
                                latencies.push(now - at as f64 / 1e9);
                                last_seen = now;
                            }
                        }
                        quiet_since = None;
                    }
                    _ => {
                        if stop.load(Ordering::Relaxed) {
                            let quiet = quiet_since.get_or_insert_with(Instant::now);
                            if latencies.len() == seen.len()
                                || quiet.elapsed() > Duration::from_secs(5)
                            {
                                break;
                            }
                        }
                    }
                }
            }
            (latencies, last_seen)
        })
    };

    // librdkafka's own default linger: one-record batches at thousands a
    // second cost the test broker more than the peers it measures.
    let producer: ThreadedProducer<DefaultProducerContext> = broker
        .client_config()
        .set("linger.ms", "5")
        .set("partitioner", "murmur2_random")
        .create()
        .expect("paced producer");
    let start = epoch.elapsed().as_secs_f64();
    for (i, record) in inputs.iter().enumerate() {
        let due = start + i as f64 / rate;
        let now = epoch.elapsed().as_secs_f64();
        if due > now {
            std::thread::sleep(Duration::from_secs_f64(due - now));
        }
        sent[i].store(epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let mut base = BaseRecord::<[u8], [u8]>::to(input).payload(&record.value);
        if let Some(key) = &record.key {
            base = base.key(key);
        }
        let mut pending = base;
        loop {
            match producer.send(pending) {
                Ok(()) => break,
                Err((_, returned)) => {
                    std::thread::sleep(Duration::from_millis(1));
                    pending = returned;
                }
            }
        }
    }
    let offered_secs = epoch.elapsed().as_secs_f64() - start;
    producer.flush(Duration::from_secs(30)).expect("flush");
    // The reader ends when everything has come out, or after 5 s of quiet.
    let deadline = Instant::now() + Duration::from_secs(60);
    stop.store(true, Ordering::Relaxed);
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (mut latencies, last_seen) = reader.join().expect("reader");
    latencies.sort_by(f64::total_cmp);
    let quantile = |q: f64| quantile_ms(&latencies, q);
    let achieved = if last_seen > start {
        latencies.len() as f64 / (last_seen - start)
    } else {
        0.0
    };
    json!({
        "offered_per_s": count as f64 / offered_secs,
        "achieved_per_s": achieved,
        "sent": count, "seen": latencies.len(),
        "p50_ms": quantile(0.50), "p99_ms": quantile(0.99),
    })
}

struct Settings {
    records: usize,
    loads: Vec<f64>,
    load_secs: f64,
    poison_every: usize,
    failure_every: usize,
}

fn loads_for(
    broker: &Broker,
    settings: &Settings,
    peer: &str,
    input: &str,
    outputs: &[&str],
    peak: f64,
    encode: Encode<'_>,
) -> Vec<Value> {
    settings
        .loads
        .iter()
        .enumerate()
        .map(|(n, fraction)| {
            let rate = peak * fraction;
            eprintln!("{peer}: offering {rate:.0} events/s ({fraction} of peak)");
            let mut point = load_point(
                broker,
                input,
                outputs,
                &format!("{peer}-lat{n}"),
                rate,
                settings.load_secs,
                encode,
            );
            point["fraction"] = json!(fraction);
            eprintln!("{peer}: {point}");
            point
        })
        .collect()
}

/// A passthrough child writing `fanout` records per input.
fn run_passthrough(broker: &Broker, settings: &Settings, peer: &str, fanout: usize) -> Value {
    let input = format!("{peer}.input");
    let output = format!("{peer}.output");
    broker.create_topics(&[(input.as_str(), PARTITIONS), (output.as_str(), PARTITIONS)]);
    broker.produce(
        &input,
        &mixed_records(
            peer,
            settings.records,
            settings.poison_every,
            settings.failure_every,
            900,
        ),
    );
    let mut child = die_with_parent(&mut Command::new(
        std::env::current_exe().expect("own path"),
    ))
    .args([
        "passthrough",
        broker.bootstrap.as_str(),
        input.as_str(),
        output.as_str(),
        settings.records.to_string().as_str(),
        fanout.to_string().as_str(),
    ])
    .stdout(Stdio::piped())
    .spawn()
    .expect("passthrough child");
    let guard = KillOnDrop(&mut child);
    let mut line = String::new();
    {
        use std::io::BufRead;
        let stdout = guard.0.stdout.take().expect("stdout");
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("passthrough report");
    }
    let stats: Value = serde_json::from_str(&line).expect("passthrough JSON");
    let elapsed = stats["elapsed_s"].as_f64().unwrap_or(f64::NAN);
    let done = stats["done"].as_f64().unwrap_or(0.0);
    let rate = done / elapsed;
    eprintln!("{peer}: {rate:.0} events/s ({stats})");
    let loads = loads_for(broker, settings, peer, &input, &[&output], rate, &|r| r);
    json!({
        "events_per_s": rate, "records_per_input": fanout as f64,
        "cpu_us_per_event": stats["cpu_s"].as_f64().unwrap_or(f64::NAN) / done * 1e6,
        "rss_mib": stats["rss_mib"], "loads": loads,
    })
}

/// Kills the child when this process dies, whatever the reason.
fn die_with_parent(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    command
}

struct KillOnDrop<'a>(&'a mut Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A JSON sample event as a ToolCompleted v2 Avro record; anything that is
/// not a tool event (the poison) stays as it is.
fn as_avro(record: SampleRecord, schema_id: u32) -> SampleRecord {
    let source = baton::event::SourceCoordinates {
        topic: "mcp.events.all".into(),
        partition: 0,
        offset: 0,
    };
    match baton::codec::decode_event(Some(&record.value), &source, &Default::default()) {
        Ok(mut event) => {
            // Avro carries time as epoch millis.
            event.occurred_at = Some("2026-12-01T10:00:00Z".into());
            SampleRecord {
                key: record.key,
                value: avro_bytes(&event, Version::V2, schema_id),
            }
        }
        Err(_) => record,
    }
}

fn run_baton(broker: &Broker, settings: &Settings, rss_contexts: usize) -> Value {
    broker.create_baton_topics(PARTITIONS);
    let count = settings.records;
    // Avro through the registry double, as producers on the platform write.
    let registry = SchemaRegistry::start();
    let schema_id = registry.register("mcp.events.all-value", schemas::TOOL_COMPLETED_V2);
    let encode = move |record: SampleRecord| as_avro(record, schema_id);
    let inputs: Vec<SampleRecord> = mixed_records(
        "baton",
        count,
        settings.poison_every,
        settings.failure_every,
        900,
    )
    .into_iter()
    .map(encode)
    .collect();
    broker.produce("mcp.events.all", &inputs);
    let baton = Baton::start(broker, {
        let mut options = BatonOptions::new("bench-0");
        options.extra_args = vec![
            "--kafka-prop".into(),
            format!("consumer.fetch.wait.max.ms={FETCH_WAIT_MS}"),
            "--schema-registry-url".into(),
            registry.url(),
            "--auto-register-schemas".into(),
        ];
        options
    });
    let pid = baton.pid().to_string();
    let committed = |baton: &Baton| baton.metric("baton_transaction_records_sum") as usize;
    // Timed by records committed, from the pod's own metrics, so no reader
    // competes for the cores while it runs; CPU over the same span.
    let mut first_seen = 0;
    common::wait_for("baton's first commit", Duration::from_secs(120), || {
        first_seen = committed(&baton);
        first_seen > 0
    });
    let cpu_before = cpu_seconds_of(&pid).unwrap_or(f64::NAN);
    let started = Instant::now();
    common::wait_for("every input committed", Duration::from_secs(1800), || {
        committed(&baton) >= count
    });
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds_of(&pid).unwrap_or(f64::NAN) - cpu_before;
    let events = (count - first_seen) as f64;
    let rate = events / elapsed;
    let sent = baton.metric("baton_records_sent_total");
    let rss = peak_rss_mib_of(&pid).unwrap_or(f64::NAN);
    let records_per_input = sent / count as f64;
    eprintln!("baton: {rate:.0} events/s, {records_per_input:.2} records/input, {rss:.0} MiB");
    let loads = loads_for(
        broker,
        settings,
        "baton",
        "mcp.events.all",
        &["mcp.handover.researcher"],
        rate,
        &encode,
    );
    let mut result = json!({
        "events_per_s": rate, "records_per_input": records_per_input,
        "cpu_us_per_event": cpu / events * 1e6, "rss_mib": rss, "loads": loads,
    });
    if rss_contexts > 0 {
        // Peak RSS with many contexts: small single-event contexts on top.
        let before = committed(&baton);
        eprintln!("baton: feeding {rss_contexts} more contexts for the RSS check");
        broker.produce(
            "mcp.events.all",
            &mixed_records("rss", rss_contexts, 0, 0, 10),
        );
        common::wait_for(
            "every RSS context committed",
            Duration::from_secs(3600),
            || committed(&baton) >= before + rss_contexts,
        );
        let total = committed(&baton);
        result["rss_contexts"] = json!(total);
        result["rss_mib_contexts"] = json!(peak_rss_mib_of(&pid));
        eprintln!("baton: {result}");
    }
    result
}

fn run_quix(broker: &Broker, settings: &Settings, python: &str) -> Value {
    let (input, output) = ("quix.input", "quix.output");
    create_topics_with_retention(broker, &[input, output]);
    let count = settings.records;
    broker.produce(
        input,
        &mixed_records(
            "quix",
            count,
            settings.poison_every,
            settings.failure_every,
            900,
        ),
    );
    let dir = tempfile::tempdir().expect("quix dir");
    let stats_path = dir.path().join("stats.json");
    let app = Path::new(common::REPO).join("benches/peers/quix_first_step.py");
    let mut child = die_with_parent(&mut Command::new(python))
        .arg(&app)
        .args([
            broker.bootstrap.as_str(),
            input,
            output,
            count.to_string().as_str(),
        ])
        .arg(&stats_path)
        .arg(dir.path().join("state"))
        .stdout(Stdio::null())
        .spawn()
        .expect("quix starts");
    let guard = KillOnDrop(&mut child);
    let pid = guard.0.id().to_string();
    common::wait_for(
        "quix to process every input",
        Duration::from_secs(1800),
        || stats_path.exists(),
    );
    // The app writes the file when the last input is processed; its commit
    // follows within the commit interval.
    std::thread::sleep(COMMIT_INTERVAL * 2);
    let stats: Value =
        serde_json::from_slice(&std::fs::read(&stats_path).expect("stats")).expect("stats JSON");
    let rss = peak_rss_mib_of(&pid).unwrap_or(f64::NAN);
    let elapsed = stats["last_wall"].as_f64().unwrap_or(f64::NAN)
        - stats["first_wall"].as_f64().unwrap_or(f64::NAN);
    let cpu = stats["last_cpu"].as_f64().unwrap_or(f64::NAN)
        - stats["first_cpu"].as_f64().unwrap_or(f64::NAN);
    let rate = count as f64 / elapsed;
    // Records written: its outputs and its changelog.
    let written: Vec<String> = broker
        .topic_names()
        .into_iter()
        .filter(|t| t == output || t.starts_with("changelog__"))
        .collect();
    let records = count_records(broker, &written);
    eprintln!("quix: {rate:.0} events/s, {records} records in {written:?}, {rss:.0} MiB ({stats})");
    let loads = loads_for(broker, settings, "quix", input, &[output], rate, &|r| r);
    json!({
        "events_per_s": rate, "records_per_input": records as f64 / count as f64,
        "cpu_us_per_event": cpu / count as f64 * 1e6, "rss_mib": rss, "loads": loads,
    })
}

/// The whole vision-research workflow, closed-loop: every context starts
/// with its vision event, and a driver answers each handover as its agent
/// would, with that agent's tool event (researcher → research, valuation →
/// valuation, playwright → screenshot) until the reporter's handover ends
/// the workflow. Runs on its own broker. Rate: workflow events from the
/// first vision event sent to the last reporter handover seen.
/// The `q` quantile of sorted latencies in seconds, in milliseconds.
fn quantile_ms(sorted_secs: &[f64], q: f64) -> Option<f64> {
    if sorted_secs.is_empty() {
        return None;
    }
    let at = ((sorted_secs.len() as f64 * q).ceil() as usize).clamp(1, sorted_secs.len()) - 1;
    Some(sorted_secs[at] * 1000.0)
}

fn run_workflow_loop(settings: &Settings) -> Value {
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    let registry = SchemaRegistry::start();
    let schema_id = registry.register("mcp.events.all-value", schemas::TOOL_COMPLETED_V2);
    let contexts = (settings.records / 4).max(1);
    let mut rng = fastrand::Rng::with_seed(5);
    let answer_of = |record: &SampleRecord| -> Option<&'static str> {
        let value: Value = serde_json::from_slice(&record.value).ok()?;
        match value["event"].as_str()? {
            "tool.vision_analyze.completed" => Some("start"),
            "tool.research_enrich.completed" => Some("researcher"),
            "tool.valuation_estimate.completed" => Some("valuation"),
            "tool.browser_take_screenshot.completed" => Some("playwright"),
            _ => None,
        }
    };
    // As in the other phases: every `poison_every`-th context also gets a
    // record that is not an event at all (dead-lettered as poison), and every
    // `failure_every`-th context's screenshot fails (`status: error`, dead-
    // lettered as `tool_failed`; with no healer here, that context stops at
    // its playwright step and is not expected to finish).
    let poisoned = |i: usize| {
        settings.poison_every > 0 && i % settings.poison_every == settings.poison_every - 1
    };
    let failing = |i: usize| {
        settings.failure_every > 0 && i % settings.failure_every == settings.failure_every / 2
    };
    let fail_tool = |record: SampleRecord| -> SampleRecord {
        let Ok(mut value) = serde_json::from_slice::<Value>(&record.value) else {
            return record;
        };
        value["status"] = json!("error");
        value["error"] = json!("browser crashed");
        SampleRecord {
            key: record.key,
            value: value.to_string().into_bytes(),
        }
    };
    // Per context, the event each agent answers with, encoded once.
    let answers: Vec<BTreeMap<&'static str, SampleRecord>> = (0..contexts)
        .map(|i| {
            let mut answers: BTreeMap<&'static str, SampleRecord> =
                baton::sample::context_events(&format!("loop-{i}"), &mut rng)
                    .into_iter()
                    .filter_map(|record| {
                        let agent = answer_of(&record)?;
                        let record = if agent == "playwright" && failing(i) {
                            fail_tool(record)
                        } else {
                            record
                        };
                        Some((agent, as_avro(record, schema_id)))
                    })
                    .collect();
            if poisoned(i) {
                let poison = SampleRecord {
                    key: Some(format!("loop-{i}").into_bytes()),
                    value: format!("\u{1}not an event {i}").into_bytes(),
                };
                answers.insert("poison", poison);
            }
            answers
        })
        .collect();
    let expected_finishers = (0..contexts).filter(|i| !failing(*i)).count();
    let baton = Baton::start(&broker, {
        let mut options = BatonOptions::new("bench-loop");
        options.extra_args = vec![
            "--kafka-prop".into(),
            format!("consumer.fetch.wait.max.ms={FETCH_WAIT_MS}"),
            "--schema-registry-url".into(),
            registry.url(),
            "--auto-register-schemas".into(),
        ];
        // For experiments: more flags for the engine, split on whitespace.
        if let Ok(extra) = std::env::var("BATON_BENCH_LOOP_ARGS") {
            options
                .extra_args
                .extend(extra.split_whitespace().map(String::from));
        }
        options
    });
    let pid = baton.pid().to_string();
    let agents = ["researcher", "valuation", "playwright", "reporter"];
    let reader: BaseConsumer = broker
        .client_config()
        .set("group.id", "bench-loop-agents")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "5")
        .create()
        .expect("agent reader");
    let mut assignment = TopicPartitionList::new();
    for agent in agents {
        for partition in 0..PARTITIONS {
            assignment
                .add_partition_offset(
                    &format!("mcp.handover.{agent}"),
                    partition,
                    Offset::Beginning,
                )
                .expect("assign");
        }
    }
    reader.assign(&assignment).expect("assign");
    let producer: ThreadedProducer<DefaultProducerContext> = broker
        .client_config()
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("agent producer");
    let send = |record: &SampleRecord| {
        let mut base = BaseRecord::<[u8], [u8]>::to("mcp.events.all").payload(&record.value);
        if let Some(key) = &record.key {
            base = base.key(key);
        }
        let mut pending = base;
        while let Err((_, returned)) = producer.send(pending) {
            std::thread::sleep(Duration::from_millis(1));
            pending = returned;
        }
    };
    let cpu_before = cpu_seconds_of(&pid).unwrap_or(f64::NAN);
    let started = Instant::now();
    for context in &answers {
        if let Some(vision) = context.get("start") {
            send(vision);
        }
        if let Some(poison) = context.get("poison") {
            send(poison);
        }
    }
    // A handover may be seen twice on a broker that shows aborted records.
    let mut answered: std::collections::HashSet<(usize, &str)> = Default::default();
    let mut finished = 0;
    // Per hop: from an agent's answer sent to the next handover seen (the
    // first hop, from the burst of vision events, measures the backlog, not
    // the engine, so it is left out).
    let mut answered_at: Vec<Option<Instant>> = vec![None; contexts];
    let mut hop_secs: Vec<f64> = Vec::with_capacity(contexts * 3);
    let deadline = Instant::now() + Duration::from_secs(1800);
    while finished < expected_finishers && Instant::now() < deadline {
        let Some(Ok(message)) = reader.poll(Duration::from_millis(50)) else {
            continue;
        };
        let agent = message.topic().trim_start_matches("mcp.handover.");
        let Some(index) = message
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .and_then(|k| k.strip_prefix("loop-"))
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|i| *i < contexts)
        else {
            continue;
        };
        let Some(agent) = agents.iter().copied().find(|a| *a == agent) else {
            continue;
        };
        if !answered.insert((index, agent)) {
            continue;
        }
        if let Some(at) = answered_at[index] {
            hop_secs.push(at.elapsed().as_secs_f64());
        }
        if agent == "reporter" {
            finished += 1;
        } else if let Some(answer) = answers[index].get(agent) {
            send(answer);
            answered_at[index] = Some(Instant::now());
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    hop_secs.sort_by(f64::total_cmp);
    let cpu = cpu_seconds_of(&pid).unwrap_or(f64::NAN) - cpu_before;
    let consumed = baton.metric("baton_records_consumed_total{topic=\"mcp.events.all\"}");
    let sent = baton.metric("baton_records_sent_total");
    let events = answers.iter().map(BTreeMap::len).sum::<usize>() as f64;
    let result = json!({
        "contexts": contexts, "finished": finished, "expected_finishers": expected_finishers,
        "events": events,
        "events_per_s": events / elapsed, "workflows_per_s": finished as f64 / elapsed,
        "records_per_input": sent / consumed.max(1.0),
        "cpu_us_per_event": cpu / events * 1e6,
        "rss_mib": peak_rss_mib_of(&pid),
        "hop_p50_ms": quantile_ms(&hop_secs, 0.50), "hop_p99_ms": quantile_ms(&hop_secs, 0.99),
    });
    if let Ok(path) = std::env::var("BATON_BENCH_METRICS_DUMP") {
        // For looking into a run: the engine's own stage and commit timings.
        if let Some((_, body)) = baton.http_get("/metrics") {
            let _ = std::fs::write(path, body);
        }
    }
    eprintln!("loop: {result}");
    result
}

/// One preloaded first-step run of `count` contexts on `topology`, on its
/// own broker: events/s from the first commit to the commit of the last,
/// and the pod (still running) for what comes after.
fn first_step_run(topology: &Path, count: usize, name: &str) -> (f64, f64, Broker, Baton) {
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    broker.produce("mcp.events.all", &mixed_records(name, count, 0, 0, 200));
    let baton = Baton::start(&broker, {
        let mut options = BatonOptions::new("bench-timers");
        options.topology = topology.to_path_buf();
        options.extra_args = vec![
            "--kafka-prop".into(),
            format!("consumer.fetch.wait.max.ms={FETCH_WAIT_MS}"),
        ];
        options
    });
    let pid = baton.pid().to_string();
    let committed = |baton: &Baton| baton.metric("baton_transaction_records_sum") as usize;
    let mut first_seen = 0;
    common::wait_for("the first commit", Duration::from_secs(120), || {
        first_seen = committed(&baton);
        first_seen > 0
    });
    let cpu_before = cpu_seconds_of(&pid).unwrap_or(f64::NAN);
    let started = Instant::now();
    common::wait_for("every input committed", Duration::from_secs(1800), || {
        committed(&baton) >= count
    });
    let elapsed = started.elapsed().as_secs_f64();
    let events = (count - first_seen) as f64;
    let cpu = cpu_seconds_of(&pid).unwrap_or(f64::NAN) - cpu_before;
    (events / elapsed, cpu / events * 1e6, broker, baton)
}

/// A histogram's `q` quantile from its cumulative buckets, by linear
/// interpolation inside the bucket (as Prometheus' histogram_quantile).
fn histogram_quantile(baton: &Baton, name: &str, q: f64) -> Option<f64> {
    let (_, body) = baton.http_get("/metrics")?;
    let mut buckets: Vec<(f64, f64)> = body
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&format!("{name}_bucket{{le=\""))?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let span = count - lower.1;
            let within = if span > 0.0 {
                (rank - lower.1) / span
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * within);
        }
        lower = (le, count);
    }
    None
}

/// What timers cost: the first step with and without them, and how late
/// 100,000 step timers fire when they come due together with the pending
/// deadlines of every context.
fn run_timers(settings: &Settings) -> Value {
    let count = settings.records;
    let without = common::topology_variant(&[
        ("deadline = \"15m\"\n", ""),
        ("[state.ResearcherQueued]\ntimeout = \"2m\"", ""),
        ("[state.DownstreamQueued]\ntimeout = \"1m\"", ""),
        ("timeout = \"1m\"\n", ""),
    ]);
    let (rate_without, cpu_without, broker, baton) =
        first_step_run(without.path(), count, "untimed");
    drop((baton, broker));
    eprintln!("timers: without {rate_without:.0} events/s, {cpu_without:.1} us/event");
    // With timers: a deadline and a researcher timeout per context, the
    // timeouts due 20 s after each handover, so they fire after the inputs.
    let with = common::topology_variant(&[("timeout = \"2m\"", "timeout = \"20s\"")]);
    let (rate_with, cpu_with, _broker, baton) = first_step_run(with.path(), count, "timed");
    let pending = baton.metric("baton_timers_pending");
    eprintln!("timers: with {rate_with:.0} events/s, {cpu_with:.1} us/event, {pending} pending");
    common::wait_for("every step timer fired", Duration::from_secs(1800), || {
        baton.metric("baton_timers_fired_total{kind=\"step\"}") as usize >= count
    });
    let p50 = histogram_quantile(&baton, "baton_timer_lateness_seconds", 0.50);
    let p99 = histogram_quantile(&baton, "baton_timer_lateness_seconds", 0.99);
    let result = json!({
        "contexts": count,
        "events_per_s_without": rate_without, "events_per_s_with": rate_with,
        "cpu_us_per_event_without": cpu_without, "cpu_us_per_event_with": cpu_with,
        "cost_ratio": rate_with / rate_without,
        "timers_pending_after_inputs": pending,
        "lateness_p50_ms": p50.map(|s| s * 1000.0), "lateness_p99_ms": p99.map(|s| s * 1000.0),
    });
    eprintln!("timers: {result}");
    result
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("passthrough") {
        passthrough_child(&args[1..]);
        return;
    }
    let settings = Settings {
        records: env_or("BATON_BENCH_RECORDS", 100_000),
        loads: std::env::var("BATON_BENCH_LOADS")
            .unwrap_or_else(|_| "0.25,0.5,0.75".into())
            .split(',')
            .filter_map(|v| v.trim().parse().ok())
            .collect(),
        load_secs: env_or("BATON_BENCH_LOAD_SECS", 10.0),
        poison_every: env_or("BATON_BENCH_POISON_EVERY", 100),
        failure_every: env_or("BATON_BENCH_FAILURE_EVERY", 50),
    };
    let peers = std::env::var("BATON_BENCH_PEERS")
        .unwrap_or_else(|_| "l1,baton,lk,quix,loop,timers".into());
    let rss_contexts: usize = env_or("BATON_BENCH_RSS_CONTEXTS", 0);
    let broker = Broker::start();
    let mut results = BTreeMap::new();
    for peer in peers.split(',').map(str::trim) {
        let result = match peer {
            "l1" => run_passthrough(&broker, &settings, "l1", 1),
            "lk" => {
                let fanout = results
                    .get("baton")
                    .and_then(|b: &Value| b["records_per_input"].as_f64())
                    .map(|r| r.round().max(1.0) as usize)
                    .unwrap_or(5);
                run_passthrough(&broker, &settings, "lk", fanout)
            }
            "baton" => run_baton(&broker, &settings, rss_contexts),
            "loop" => run_workflow_loop(&settings),
            "timers" => run_timers(&settings),
            "quix" => match std::env::var("BATON_BENCH_QUIX_PYTHON") {
                Ok(python) => run_quix(&broker, &settings, &python),
                Err(_) => {
                    eprintln!("quix: skipped, BATON_BENCH_QUIX_PYTHON is not set");
                    continue;
                }
            },
            other => panic!("unknown peer {other:?} (l1, lk, baton, loop, quix, timers)"),
        };
        println!("{peer}: {result}");
        results.insert(peer.to_string(), result);
    }
    let report = json!({
        "records": settings.records, "partitions": PARTITIONS,
        "commit_interval_ms": COMMIT_INTERVAL.as_millis() as u64,
        "poison_every": settings.poison_every, "failure_every": settings.failure_every,
        "load_secs": settings.load_secs, "peers": results,
    });
    if let Ok(path) = std::env::var("BATON_BENCH_JSON") {
        std::fs::write(&path, serde_json::to_vec_pretty(&report).expect("json"))
            .expect("write results");
        eprintln!("results written to {path}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    }
}
