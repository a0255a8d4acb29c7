//! The shell's promise under bad input, against a real broker: a record whose
//! outputs the broker would refuse, contexts past their bounds, and input
//! keyed by something other than its `context_id`. One bad record never
//! stalls a partition, and nothing is lost.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use baton::sample::{self, SampleRecord};
use common::{
    Baton, BatonOptions, Broker, RawRecord, Reader, assert_states_match, dedup_handovers,
    expected_states, reference,
};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde_json::json;
use sha2::{Digest, Sha256};

const PARTITIONS: i32 = 6;

fn traffic(contexts: usize, seed: u64) -> Vec<SampleRecord> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..contexts)
        .flat_map(|i| sample::context_events(&format!("ctx-{seed}-{i}"), &mut rng))
        .collect()
}

/// Dead letters by class, deduplicated by the source coordinates they carry.
fn letters_by_class(reader: &Reader) -> BTreeMap<String, Vec<common::Record>> {
    let mut unique: BTreeMap<(String, String, String), common::Record> = BTreeMap::new();
    for letter in reader.topic("mcp.events.dlq") {
        let at = (
            letter.headers["baton.source.topic"].clone(),
            letter.headers["baton.source.partition"].clone(),
            letter.headers["baton.source.offset"].clone(),
        );
        unique.insert(at, letter.clone());
    }
    let mut by_class: BTreeMap<String, Vec<common::Record>> = BTreeMap::new();
    for letter in unique.into_values() {
        by_class
            .entry(letter.headers["baton.error.class"].clone())
            .or_default()
            .push(letter);
    }
    by_class
}

fn assert_handovers_match(broker: &Broker, reader: &Reader, expected: &common::Reference) {
    let (unique, duplicates) = dedup_handovers(&reader.handovers());
    assert_eq!(unique.len(), expected.handovers.len(), "handover count");
    for (id, handover) in &expected.handovers {
        assert_eq!(unique.get(id), Some(handover), "handover {id}");
    }
    if broker.hides_aborted {
        assert_eq!(duplicates, 0, "duplicate handovers");
    } else {
        eprintln!("duplicates (aborted records this broker shows): {duplicates}");
    }
}

#[test]
fn a_megabyte_of_garbage_among_a_thousand_events_is_cut_to_fit_and_nothing_stalls() {
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    let mut inputs = traffic(250, 7);
    assert_eq!(inputs.len(), 1_000);
    let tail = inputs.split_off(400);
    broker.produce("mcp.events.all", &inputs);
    // Under --max-record-bytes (1 MiB), over message.max.bytes once headers
    // are added: a non-JSON record of 1.04 MB.
    let garbage: Vec<u8> = (0..1_040_000u32)
        .map(|i| b"\xff\x00garbage"[i as usize % 9])
        .collect();
    let producer: ThreadedProducer<DefaultProducerContext> = broker
        .client_config()
        .set("message.max.bytes", "2000000")
        .create()
        .expect("producer");
    producer
        .send(
            BaseRecord::<[u8], [u8]>::to("mcp.events.all")
                .key(b"garbage".as_slice())
                .payload(&garbage),
        )
        .map_err(|(err, _)| err)
        .expect("send the big record");
    producer.flush(Duration::from_secs(30)).expect("flush");
    broker.produce("mcp.events.all", &tail);
    inputs.extend(tail);

    let pod = Baton::start(&broker, BatonOptions::new("pod-big"));
    let expected = reference(&inputs);
    let mut reader = common::outputs_reader(&broker);
    reader.wait_until(
        "every handover and the dead letter",
        Duration::from_secs(120),
        |records| {
            records.iter().any(|r| r.topic == "mcp.events.dlq")
                && common::unique_handover_count(records) >= expected.handovers.len()
        },
    );
    reader.poll_to_end();
    assert_handovers_match(&broker, &reader, &expected);

    let by_class = letters_by_class(&reader);
    let letters = &by_class["malformed_json"];
    assert_eq!(letters.len(), 1, "one dead letter: {by_class:?}");
    let letter = &letters[0];
    assert_eq!(letter.headers["baton.value.truncated"], "true");
    assert_eq!(letter.headers["baton.value.size"], "1040000");
    assert_eq!(
        letter.headers["baton.value.sha256"],
        hex::encode(Sha256::digest(&garbage))
    );
    assert!(letter.value.len() > 900_000, "keeps the first part");
    assert_eq!(letter.value[..], garbage[..letter.value.len()]);
    assert_eq!(letter.key.as_deref(), Some(&b"garbage"[..]));
    assert_eq!(pod.metric("baton_dlq_truncated_total"), 1.0);
    assert_eq!(
        pod.metric("baton_transactions_total{outcome=\"aborted\"}"),
        0.0,
        "no transaction aborted: {}",
        pod.log()
    );
    assert_states_match(&[&pod], &expected_states(&inputs));
}

fn record(key: &str, value: serde_json::Value) -> RawRecord {
    RawRecord {
        partition: None,
        key: Some(key.as_bytes().to_vec()),
        value: serde_json::to_vec(&value).expect("json"),
        headers: vec![],
    }
}

fn canonical(context: &str, id: &str, event: &str, result: serde_json::Value) -> RawRecord {
    record(
        context,
        json!({"event_id": id, "context_id": context, "event": event, "result": result,
               "usage": {"input_tokens": 10, "output_tokens": 5}}),
    )
}

#[test]
fn contexts_past_their_bounds_are_dead_lettered_and_the_partition_flows_on() {
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    const VISION: &str = "tool.vision_analyze.completed";
    const RESEARCH: &str = "tool.research_enrich.completed";
    const SCREENSHOT: &str = "tool.browser_take_screenshot.completed";
    const VALUATION: &str = "tool.valuation_estimate.completed";
    let mut records = vec![
        // Held past its bound: no healer runs, so the failure stays pending.
        canonical("held", "h1", VISION, json!({})),
        canonical("held", "h2", RESEARCH, json!({})),
        record(
            "held",
            json!({"event_id": "h3", "context_id": "held", "event": SCREENSHOT,
                   "status": "error", "error": "e".repeat(200_000)}),
        ),
    ];
    for i in 0..4 {
        records.push(canonical(
            "held",
            &format!("h-later-{i}"),
            VALUATION,
            json!({}),
        ));
    }
    // Memory past its bound.
    records.push(canonical(
        "big-memory",
        "m1",
        VISION,
        json!({"text": "m".repeat(20_000)}),
    ));
    // A context id with a control character.
    records.push(canonical("bad\u{1}id", "b1", VISION, json!({})));
    broker.produce_raw("mcp.events.all", &records);
    let healthy = traffic(50, 11);
    broker.produce("mcp.events.all", &healthy);

    let mut options = BatonOptions::new("pod-bounds");
    options.extra_args = ["--max-held-records", "2", "--max-memory-bytes", "8192"]
        .map(String::from)
        .to_vec();
    let pod = Baton::start(&broker, options);
    let expected = reference(&healthy);
    let mut reader = common::outputs_reader(&broker);
    reader.wait_until(
        "the healthy contexts' handovers and five dead letters",
        Duration::from_secs(90),
        |records| {
            records
                .iter()
                .filter(|r| r.topic == "mcp.events.dlq")
                .count()
                >= 5
                && common::unique_handover_count(records) >= expected.handovers.len() + 3
        },
    );
    reader.poll_to_end();
    let by_class = letters_by_class(&reader);
    let classes: BTreeMap<&str, usize> = by_class
        .iter()
        .map(|(class, letters)| (class.as_str(), letters.len()))
        .collect();
    assert_eq!(
        classes,
        BTreeMap::from([
            ("held_overflow", 2),
            ("invalid_context_id", 1),
            ("memory_overflow", 1),
            ("tool_failed", 1),
        ]),
        "dead letters by class"
    );
    let failed = &by_class["tool_failed"][0];
    let reason = &failed.headers["baton.error.reason"];
    assert!(reason.len() <= 4096, "reason header cut: {}", reason.len());
    assert!(reason.ends_with("bytes)"), "{reason}");
    assert_eq!(
        failed.value.len(),
        records[2].value.len(),
        "the letter keeps the whole record"
    );
    for letter in &by_class["held_overflow"] {
        assert!(
            letter.headers["baton.error.reason"].contains("already holds 2 record(s)"),
            "{:?}",
            letter.headers
        );
    }
    // The healthy contexts, on the same partitions, flowed on.
    let healthy_ids: BTreeSet<&String> = expected.handovers.keys().collect();
    let (unique, _) = dedup_handovers(&reader.handovers());
    assert!(healthy_ids.iter().all(|id| unique.contains_key(*id)));
    let (_, held_state) = pod.http_get("/contexts/held").expect("state");
    let held: serde_json::Value = serde_json::from_str(&held_state).expect("json");
    assert_eq!(held["held"].as_array().map(Vec::len), Some(2), "{held}");
    assert_eq!(
        pod.http_get("/contexts/big-memory").map(|(s, _)| s),
        Some(404)
    );
}

#[test]
fn events_keyed_by_their_server_are_repartitioned_by_context() {
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    // 120 contexts whose four events are each keyed by the server that sent
    // them, so one context's events start out on different partitions.
    let keyed_by_server = |mut record: SampleRecord| {
        let value: serde_json::Value = serde_json::from_slice(&record.value).expect("json");
        let server = value["serverId"]
            .as_str()
            .or(value["server_id"].as_str())
            .unwrap_or("srv-unknown")
            .to_string();
        record.key = Some(server.into_bytes());
        record
    };
    let mut rng = fastrand::Rng::with_seed(13);
    let contexts: Vec<Vec<SampleRecord>> = (0..120)
        .map(|i| {
            sample::context_events(&format!("ctx-13-{i}"), &mut rng)
                .into_iter()
                .map(keyed_by_server)
                .collect()
        })
        .collect();
    // Across partitions nothing orders one context's events, as in Kafka
    // Streams before a repartition: send them in waves, each after the last
    // is handed over, so the order (and so the reference) is exact.
    let pod = Baton::start(&broker, BatonOptions::new("pod-keys"));
    let mut reader = common::outputs_reader(&broker);
    let mut inputs: Vec<SampleRecord> = Vec::new();
    for wave in 0..4 {
        let records: Vec<SampleRecord> =
            contexts.iter().map(|events| events[wave].clone()).collect();
        broker.produce("mcp.events.all", &records);
        inputs.extend(records);
        let expected = reference(&inputs).handovers.len();
        reader.wait_until(
            &format!("the handovers of wave {wave}"),
            Duration::from_secs(60),
            |records| common::unique_handover_count(records) >= expected,
        );
    }
    reader.poll_to_end();
    let expected = reference(&inputs);
    assert_handovers_match(&broker, &reader, &expected);
    assert!(reader.topic("mcp.events.dlq").is_empty(), "no dead letters");
    assert_states_match(&[&pod], &expected_states(&inputs));

    // Each context's state lives on one partition: the one its id hashes to.
    let changelog = broker.read_all("baton-test-context-changelog");
    let mut partitions: BTreeMap<String, BTreeSet<i32>> = BTreeMap::new();
    for record in &changelog {
        let key = String::from_utf8_lossy(record.key.as_deref().unwrap_or_default()).into_owned();
        partitions.entry(key).or_default().insert(record.partition);
    }
    assert_eq!(partitions.len(), 120);
    assert!(
        partitions.values().all(|set| set.len() == 1),
        "a context's state on several partitions"
    );
    let repartitioned = broker.read_all("baton-test-events-repartition");
    assert!(
        repartitioned.len() >= inputs.len(),
        "every event went through the repartition topic"
    );
    assert!(
        repartitioned
            .iter()
            .all(|r| r.headers.get("baton.source.topic").map(String::as_str)
                == Some("mcp.events.all"))
    );
    assert!(pod.metric("baton_records_repartitioned_total") >= inputs.len() as f64);
}

#[test]
fn an_output_that_cannot_fit_dead_letters_its_input_and_leaves_the_state_unchanged() {
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    const VISION: &str = "tool.vision_analyze.completed";
    // A 300 KB tool output: the input is within --max-record-bytes and the
    // memory bound, but its handover cannot fit a producer that allows
    // 200,000 bytes a record.
    let big = canonical(
        "big-output",
        "o1",
        VISION,
        json!({"text": "o".repeat(300_000)}),
    );
    broker.produce_raw("mcp.events.all", std::slice::from_ref(&big));
    let healthy = traffic(20, 17);
    broker.produce("mcp.events.all", &healthy);

    let mut options = BatonOptions::new("pod-output");
    options.extra_args = [
        "--kafka-prop",
        "producer.message.max.bytes=200000",
        "--max-memory-bytes",
        "1000000",
    ]
    .map(String::from)
    .to_vec();
    let pod = Baton::start(&broker, options);
    let expected = reference(&healthy);
    let mut reader = common::outputs_reader(&broker);
    reader.wait_until(
        "the healthy handovers and the dead letter",
        Duration::from_secs(90),
        |records| {
            records.iter().any(|r| r.topic == "mcp.events.dlq")
                && common::unique_handover_count(records) >= expected.handovers.len()
        },
    );
    reader.poll_to_end();
    assert_handovers_match(&broker, &reader, &expected);
    let by_class = letters_by_class(&reader);
    assert_eq!(by_class.len(), 1, "{:?}", by_class.keys());
    let letter = &by_class["output_too_large"][0];
    assert!(
        letter.headers["baton.error.reason"].contains("message.max.bytes (200000)"),
        "{:?}",
        letter.headers
    );
    // The letter itself had to be cut to fit.
    assert_eq!(letter.headers["baton.value.truncated"], "true");
    assert_eq!(
        letter.headers["baton.value.size"],
        big.value.len().to_string()
    );
    assert_eq!(letter.value[..], big.value[..letter.value.len()]);
    assert_eq!(
        pod.http_get("/contexts/big-output")
            .map(|(status, _)| status),
        Some(404),
        "the state is unchanged"
    );
    assert_eq!(
        pod.metric("baton_transactions_total{outcome=\"aborted\"}"),
        0.0
    );
}
