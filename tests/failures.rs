//! Failures a running pod must recover from exactly: its RocksDB writes
//! failing mid-run (the test fault switch `BATON_TEST_FAULTS_DIR`). The
//! task reopens its partition (stores closed, restored from the changelog,
//! inputs seeked to the committed offsets) and the outcome still equals the
//! reference model.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use baton::sample;
use common::{Baton, BatonOptions, Broker, HANDOVER_TOPICS, Reader, dedup_handovers, reference};
use serde_json::{Value, json};

const PARTITIONS: i32 = 3;

fn handovers_reader(broker: &Broker) -> Reader {
    let mut topics: Vec<&str> = HANDOVER_TOPICS.to_vec();
    topics.push("mcp.events.dlq");
    Reader::new(broker, &topics)
}

/// The fields a reference comparison covers (time and dedup memory aside).
fn essentials(value: &Value) -> Value {
    json!({
        "workflow": value["workflow"], "state": value["state"], "locked_by": value["locked_by"],
        "attempts": value["attempts"], "token_budget": value["token_budget"],
        "tokens_used": value["tokens_used"], "version": value["version"],
    })
}

fn state_of(pod: &Baton, context: &str) -> Option<Value> {
    match pod.http_get(&format!("/contexts/{context}")) {
        Some((200, body)) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}

/// Waits until every context's state on `pod` equals the reference.
fn assert_states_match(pod: &Baton, expected: &HashMap<String, Value>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mismatches: Vec<(String, Option<Value>, Value)> = expected
            .iter()
            .filter_map(|(context, want)| {
                let got = state_of(pod, context).map(|got| essentials(&got));
                (got.as_ref() != Some(want)).then(|| (context.clone(), got, want.clone()))
            })
            .take(5)
            .collect();
        if mismatches.is_empty() {
            return;
        }
        if std::time::Instant::now() > deadline {
            for (context, got, want) in &mismatches {
                eprintln!("{context}: got {got:?}\n  want {want}");
            }
            panic!("final states differ from the reference");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The value of one metric series on the pod, 0 when absent.
fn metric(pod: &Baton, series: &str) -> f64 {
    pod.http_get("/metrics")
        .and_then(|(_, body)| {
            body.lines()
                .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

#[test]
fn state_writes_failing_mid_run_reopen_the_partition_and_stay_exact() {
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    let inputs = sample::vision_research_traffic(300, 0.0, 23);
    let expected = reference(&inputs);
    let total = expected.handovers.len();
    let faults = tempfile::tempdir().expect("fault dir");
    let switch = faults.path().join(baton::state::faults::FAIL_STATE_WRITES);
    let pod = Baton::start(
        &broker,
        BatonOptions {
            env: vec![(
                baton::state::faults::DIR_VAR.to_string(),
                faults.path().display().to_string(),
            )],
            ..BatonOptions::new("pod-faults")
        },
    );
    let mut reader = handovers_reader(&broker);

    let (first, rest) = inputs.split_at(inputs.len() / 3);
    let (second, third) = rest.split_at(rest.len() / 2);
    broker.produce("mcp.events.all", first);
    reader.wait_until("a tenth of the handovers", Duration::from_secs(120), |r| {
        common::unique_handover_count(r) >= total / 10
    });

    // RocksDB writes start failing while traffic flows.
    std::fs::write(&switch, b"").expect("fault switch on");
    broker.produce("mcp.events.all", second);
    let reopens = "baton_partition_reopens_total{reason=\"state_write\"}";
    common::wait_for(
        "a partition reopened after a failed state write",
        Duration::from_secs(120),
        || metric(&pod, reopens) >= 1.0,
    );
    std::fs::remove_file(&switch).expect("fault switch off");
    broker.produce("mcp.events.all", third);

    reader.wait_until("every handover", Duration::from_secs(240), |r| {
        common::unique_handover_count(r) >= total
    });
    reader.poll_to_end();
    let handovers = reader.handovers();
    let (unique, duplicates) = dedup_handovers(&handovers);
    assert_eq!(unique, expected.handovers, "handovers equal the reference");
    if broker.hides_aborted {
        assert_eq!(duplicates, 0);
    } else {
        eprintln!("duplicates (aborted records this broker shows): {duplicates}");
    }
    assert!(reader.topic("mcp.events.dlq").is_empty(), "no dead letters");
    let states: HashMap<String, Value> = expected
        .states
        .iter()
        .map(|(context, state)| {
            (
                context.clone(),
                essentials(&serde_json::to_value(state).expect("json")),
            )
        })
        .collect();
    assert_states_match(&pod, &states);

    let log = pod.log();
    assert!(
        log.contains("cannot write committed state locally; reopening the stores"),
        "the failed write is logged"
    );
    assert!(
        log.contains("reopening the partition") && log.contains("state_write"),
        "the reopen is logged"
    );
    assert!(
        log.contains("partition reopened"),
        "the partition came back"
    );
}
