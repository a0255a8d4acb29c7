//! Issue 5's integration tests: dead letters that heal, against a real
//! broker, real baton pods and a real `baton heal`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use baton::sample::{self, SampleRecord};
use common::{Baton, BatonOptions, Broker, HANDOVER_TOPICS, Healer, Reader, Record};
use serde_json::json;

const PARTITIONS: i32 = 3;
const INPUT: &str = "mcp.events.all";
const DLQ: &str = "mcp.events.dlq";
const PARKED: &str = "mcp.events.dlq.parked";

/// The shipped workflow with short backoffs, so retries take milliseconds.
fn fast_topology() -> tempfile::TempDir {
    common::topology_variant(&[
        ("initial_backoff_ms = 1000", "initial_backoff_ms = 100"),
        ("max_backoff_ms = 30000", "max_backoff_ms = 400"),
    ])
}

fn tool_event(context: &str, id: &str, tool: &str, ok: bool) -> SampleRecord {
    let mut value = json!({
        "event_id": format!("{context}-{id}"), "context_id": context,
        "event": format!("tool.{tool}.completed"), "server_id": format!("srv-{tool}"), "tool": tool,
        "arguments": {}, "result": {"by": tool, "call": id},
        "usage": {"input_tokens": 100, "output_tokens": 50},
        "status": if ok { "ok" } else { "error" },
    });
    if !ok {
        value["error"] = json!(format!("{tool} timed out"));
    }
    SampleRecord {
        key: Some(context.as_bytes().to_vec()),
        value: value.to_string().into_bytes(),
    }
}

/// One context's inputs: the workflow up to the join, `screenshot_failures`
/// failed screenshots, then a good screenshot (fewer than three failures),
/// or the fetcher: `fetch_failures` failures, then a good page if fewer than three.
fn workflow(context: &str, screenshot_failures: usize, fetch_failures: usize) -> Vec<SampleRecord> {
    let mut records = vec![
        tool_event(context, "vision", "vision_analyze", true),
        tool_event(context, "research", "research_enrich", true),
        tool_event(context, "valuation", "valuation_estimate", true),
    ];
    for n in 0..screenshot_failures {
        records.push(tool_event(
            context,
            &format!("shot{n}"),
            "browser_take_screenshot",
            false,
        ));
    }
    if screenshot_failures < 3 {
        records.push(tool_event(
            context,
            "shot-ok",
            "browser_take_screenshot",
            true,
        ));
        return records;
    }
    for n in 0..fetch_failures {
        records.push(tool_event(
            context,
            &format!("fetch{n}"),
            "fetch_page",
            false,
        ));
    }
    if fetch_failures < 3 {
        records.push(tool_event(context, "fetch-ok", "fetch_page", true));
    }
    records
}

fn decode_all(records: &[SampleRecord]) -> Vec<Option<baton::event::ToolEvent>> {
    use baton::codec::{DecodeLimits, decode_event};
    use baton::event::SourceCoordinates;
    records
        .iter()
        .map(|record| {
            let source = SourceCoordinates {
                topic: INPUT.into(),
                partition: 0,
                offset: 0,
            };
            decode_event(Some(&record.value), &source, &DecodeLimits::default()).ok()
        })
        .collect()
}

fn context_state(baton: &Baton, context: &str) -> serde_json::Value {
    let (status, body) = baton
        .http_get(&format!("/contexts/{context}"))
        .unwrap_or_else(|| panic!("{context}: no answer"));
    assert_eq!(status, 200, "{context}: {body}");
    serde_json::from_str(&body).expect("state JSON")
}

/// The fields a final state is compared on (times differ: the reference
/// runs at time 0).
fn comparable(state: &serde_json::Value) -> serde_json::Value {
    json!({
        "state": state["state"], "locked_by": state["locked_by"], "attempts": state["attempts"],
        "tokens_used": state["tokens_used"], "token_budget": state["token_budget"],
        "join_arrived": state["join_arrived"], "failure": state.get("failure"),
        "held": state.get("held").cloned().unwrap_or(json!([])).as_array().map(Vec::len),
    })
}

fn reference_state(state: &baton::workflow::WorkflowState) -> serde_json::Value {
    comparable(&serde_json::to_value(state).expect("json"))
}

/// Records deduplicated by the input they stand for (a crashed writer may
/// leave a copy behind: aborted transactions stay visible on this broker).
fn by_source(records: &[&Record]) -> BTreeMap<(String, String, String), Record> {
    records
        .iter()
        .map(|record| {
            let header = |name: &str| record.headers.get(name).cloned().unwrap_or_default();
            (
                (
                    header("baton.source.topic"),
                    header("baton.source.partition"),
                    header("baton.source.offset"),
                ),
                (*record).clone(),
            )
        })
        .collect()
}

fn records_of<'r>(reader: &'r Reader, topic: &str) -> Vec<&'r Record> {
    reader.records.iter().filter(|r| r.topic == topic).collect()
}

#[test]
fn every_poison_class_is_dead_lettered_with_exact_headers_then_parked() {
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    let topology = fast_topology();
    let baton = Baton::start(&broker, {
        let mut options = BatonOptions::new("heal-poison");
        options.topology = topology.path().to_path_buf();
        options.extra_args = vec!["--max-record-bytes".into(), "2048".into()];
        options
    });
    let healer = Healer::start(&broker, "healer-poison", topology.path());
    let mut poison: Vec<(SampleRecord, &str)> = vec![
        (sample::poison_record(0), "malformed_json"),
        (sample::poison_record(1), "unrecognized_format"),
        (sample::poison_record(2), "missing_context_id"),
        (sample::poison_record(3), "unrecognized_format"),
        (
            SampleRecord {
                key: Some(b"ctx-big".to_vec()),
                value: format!(r#"{{"pad":"{}"}}"#, "x".repeat(3000)).into_bytes(),
            },
            "record_too_large",
        ),
    ];
    // Research before vision: a transition the new context does not allow.
    poison.push((
        tool_event("ctx-early", "research", "research_enrich", true),
        "invalid_transition",
    ));
    let records: Vec<SampleRecord> = poison.iter().map(|(record, _)| record.clone()).collect();
    broker.produce(INPUT, &records);

    let mut inputs = Reader::new(&broker, &[INPUT]);
    inputs.wait_until("the inputs", Duration::from_secs(30), |r| {
        r.len() >= records.len()
    });
    let mut reader = Reader::new(&broker, &[DLQ, PARKED, "mcp.orchestration.control"]);
    reader.wait_until(
        "every dead letter parked",
        Duration::from_secs(60),
        |records| {
            by_source(
                &records
                    .iter()
                    .filter(|r| r.topic == PARKED)
                    .collect::<Vec<_>>(),
            )
            .len()
                >= poison.len()
        },
    );
    reader.poll_to_end();
    let dead = by_source(&records_of(&reader, DLQ));
    let parked = by_source(&records_of(&reader, PARKED));
    assert_eq!(dead.len(), poison.len());
    for (record, class) in &poison {
        let input = inputs
            .records
            .iter()
            .find(|input| input.value == record.value)
            .expect("the input record");
        let source = (
            INPUT.to_string(),
            input.partition.to_string(),
            input.offset.to_string(),
        );
        let letter = dead
            .get(&source)
            .unwrap_or_else(|| panic!("{class}: dead-lettered"));
        assert_eq!(letter.key, record.key, "{class}: key untouched");
        assert_eq!(letter.value, record.value, "{class}: value untouched");
        assert_eq!(letter.headers["baton.error.class"], *class);
        assert!(!letter.headers["baton.error.reason"].is_empty());
        let failed_at = &letter.headers["baton.failed.at"];
        assert!(
            time::OffsetDateTime::parse(failed_at, &time::format_description::well_known::Rfc3339)
                .is_ok(),
            "{failed_at}"
        );
        let kept = parked
            .get(&source)
            .unwrap_or_else(|| panic!("{class}: parked"));
        assert_eq!((&kept.key, &kept.value), (&letter.key, &letter.value));
        for (name, value) in &letter.headers {
            assert_eq!(
                kept.headers.get(name),
                Some(value),
                "{class}: parked keeps {name}"
            );
        }
        let reason = &kept.headers["baton.parked.reason"];
        assert!(reason.contains(class), "{reason}");
        assert!(kept.headers.contains_key("baton.parked.at"));
    }
    assert!(
        records_of(&reader, "mcp.orchestration.control").is_empty(),
        "poison is parked, never retried"
    );
    common::wait_for("the park metric", Duration::from_secs(10), || {
        healer.metric("baton_healer_decisions_total{decision=\"park\"}") >= poison.len() as f64
    });
    drop(baton);
}

#[test]
fn a_failing_screenshot_is_retried_then_replaced_then_routed_to_plan_b() {
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    let topology = fast_topology();
    let baton = Baton::start(&broker, {
        let mut options = BatonOptions::new("heal-routes");
        options.topology = topology.path().to_path_buf();
        options
    });
    let _healer = Healer::start(&broker, "healer-routes", topology.path());
    let scenarios = [
        ("ctx-once", 1, 0),
        ("ctx-thrice", 3, 0),
        ("ctx-planb", 3, 3),
    ];
    let mut records = Vec::new();
    for (context, screenshots, fetches) in scenarios {
        records.extend(workflow(context, screenshots, fetches));
    }
    let expected = common::reference_with(&decode_all(&records), topology.path());
    broker.produce(INPUT, &records);

    let mut reader = Reader::new(&broker, &HANDOVER_TOPICS);
    reader.wait_until("every handover", Duration::from_secs(90), |records| {
        common::unique_handover_count(records) >= expected.handovers.len()
    });
    reader.poll_to_end();
    let (handovers, _) = common::dedup_handovers(&reader.handovers());
    assert_eq!(
        handovers.keys().collect::<BTreeSet<_>>(),
        expected.handovers.keys().collect::<BTreeSet<_>>()
    );
    for (id, handover) in &handovers {
        assert_eq!(handover, &expected.handovers[id], "handover {id}");
    }
    let statuses = |context: &str| -> Vec<(String, String)> {
        let mut seen: Vec<(String, String)> = handovers
            .values()
            .filter(|h| h["context_id"] == context)
            .map(|h| {
                (
                    h["agent"].as_str().unwrap_or_default().to_string(),
                    h["status"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        seen.sort();
        seen
    };
    assert!(statuses("ctx-once").contains(&("playwright".into(), "retrying".into())));
    assert!(statuses("ctx-thrice").contains(&("fetcher".into(), "fallback".into())));
    assert!(statuses("ctx-planb").contains(&("researcher".into(), "plan_b".into())));
    for (context, _, _) in scenarios {
        let reference = &expected.states[context];
        common::wait_for(
            &format!("{context} settles"),
            Duration::from_secs(30),
            || comparable(&context_state(&baton, context)) == reference_state(reference),
        );
    }
    let planb = context_state(&baton, "ctx-planb");
    assert_eq!(planb["state"], "PlanB");
    assert_eq!(context_state(&baton, "ctx-once")["state"], "Completed");
    assert_eq!(context_state(&baton, "ctx-thrice")["state"], "Completed");
    let plan_b_handover = handovers
        .values()
        .find(|h| h["context_id"] == "ctx-planb" && h["status"] == "plan_b")
        .expect("plan B handover");
    assert_eq!(plan_b_handover["intent"], "plan_b_manual_review");
}

#[test]
fn with_no_route_left_the_record_is_parked_and_the_workflow_fails() {
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    // No alternate and no plan B.
    let topology = common::topology_variant(&[
        ("initial_backoff_ms = 1000", "initial_backoff_ms = 100"),
        (
            "[[retry.alternates]]\ntool = \"browser_take_screenshot\"\nagent = \"fetcher\"\nintent = \"fetch_page\"\ntopic = \"mcp.handover.fetcher\"\ncompletion_event = \"tool.fetch_page.completed\"\ntimeout = \"1m\"\n",
            "",
        ),
        (
            "[retry.plan_b]\nstate = \"PlanB\"\nhandover = { agent = \"researcher\", intent = \"plan_b_manual_review\", topic = \"mcp.handover.researcher\" }\n",
            "",
        ),
        ("  \"PlanB\",\n", ""),
    ]);
    let baton = Baton::start(&broker, {
        let mut options = BatonOptions::new("heal-park");
        options.topology = topology.path().to_path_buf();
        options
    });
    let _healer = Healer::start(&broker, "healer-park", topology.path());
    let records = workflow("ctx-doomed", 3, 0);
    // Without an alternate, the fetcher's page is an event nobody expects.
    let records: Vec<SampleRecord> = records
        .into_iter()
        .filter(|r| !String::from_utf8_lossy(&r.value).contains("fetch_page"))
        .collect();
    let expected = common::reference_with(&decode_all(&records), topology.path());
    assert_eq!(expected.states["ctx-doomed"].state, "Failed");
    broker.produce(INPUT, &records);

    let mut reader = Reader::new(&broker, &[PARKED]);
    reader.wait_until("the parked failure", Duration::from_secs(60), |records| {
        !records.is_empty()
    });
    let parked = &reader.records[0];
    assert_eq!(parked.headers["baton.error.class"], "tool_failed");
    assert_eq!(parked.headers["baton.attempts"], "3");
    assert_eq!(parked.headers["baton.step"], "DownstreamQueued");
    assert!(parked.headers["baton.parked.reason"].contains("kept failing"));
    common::wait_for("the workflow fails", Duration::from_secs(30), || {
        comparable(&context_state(&baton, "ctx-doomed"))
            == reference_state(&expected.states["ctx-doomed"])
    });
    let mut handovers = Reader::new(&broker, &HANDOVER_TOPICS);
    handovers.wait_until("every handover", Duration::from_secs(30), |records| {
        common::unique_handover_count(records) >= expected.handovers.len()
    });
    handovers.poll_to_end();
    assert_eq!(
        common::dedup_handovers(&handovers.handovers()).0.len(),
        expected.handovers.len()
    );
}

#[test]
fn events_that_arrive_during_a_pending_retry_apply_after_it_in_order() {
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    // A long first backoff leaves a wide window in which the retry is pending.
    let topology =
        common::topology_variant(&[("initial_backoff_ms = 1000", "initial_backoff_ms = 4000")]);
    let baton = Baton::start(&broker, {
        let mut options = BatonOptions::new("heal-order");
        options.topology = topology.path().to_path_buf();
        options
    });
    let _healer = Healer::start(&broker, "healer-order", topology.path());
    let waiting = "ctx-waits";
    // Another context on the same partition, which must flow on meanwhile.
    let partition = baton::kafka::partition_for_key(waiting.as_bytes(), PARTITIONS);
    let neighbour = (0..)
        .map(|n| format!("ctx-next-{n}"))
        .find(|c| baton::kafka::partition_for_key(c.as_bytes(), PARTITIONS) == partition)
        .expect("a neighbour");
    let mut records = vec![
        tool_event(waiting, "vision", "vision_analyze", true),
        tool_event(waiting, "research", "research_enrich", true),
        tool_event(waiting, "shot0", "browser_take_screenshot", false),
        // These two arrive while the retry waits: held, then applied in order.
        tool_event(waiting, "valuation", "valuation_estimate", true),
        tool_event(waiting, "shot-ok", "browser_take_screenshot", true),
    ];
    records.extend(workflow(&neighbour, 0, 0));
    broker.produce(INPUT, &records);

    let mut status = Reader::new(&broker, &["mcp.orchestration.status"]);
    status.wait_until(
        "the neighbour completes",
        Duration::from_secs(60),
        |records| {
            records.iter().any(|r| {
                r.json()["context_id"] == neighbour.as_str() && r.json()["status"] == "completed"
            })
        },
    );
    let held = context_state(&baton, waiting);
    assert!(
        held["failure"].is_object(),
        "still waiting on the healer: {held}"
    );
    assert_eq!(held["held"].as_array().map(Vec::len), Some(2), "{held}");

    status.wait_until(
        "the waiting context completes",
        Duration::from_secs(60),
        |records| {
            records
                .iter()
                .any(|r| r.json()["context_id"] == waiting && r.json()["status"] == "completed")
        },
    );
    let sequence: Vec<(String, String)> = status
        .records
        .iter()
        .map(Record::json)
        .filter(|u| u["context_id"] == waiting)
        .map(|u| {
            (
                u["status"].as_str().unwrap_or_default().to_string(),
                u["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let statuses: Vec<&str> = sequence.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        statuses,
        [
            "queued",
            "queued",
            "retrying",
            "queued",
            "waiting",
            "completed"
        ],
        "{sequence:?}"
    );
    assert!(
        sequence[3].1.contains("retrying browser_take_screenshot"),
        "{sequence:?}"
    );
    assert!(
        sequence[4].1.contains("browser_take_screenshot"),
        "valuation arrived first: {sequence:?}"
    );
    // The retry was attempt 2; the join then fired and dispatched the reporter.
    let state = context_state(&baton, waiting);
    assert_eq!(
        (state["state"].as_str(), state["attempts"].as_u64()),
        (Some("Completed"), Some(1))
    );
    assert!(
        state
            .get("held")
            .is_none_or(|h| h.as_array().is_some_and(Vec::is_empty))
    );
}

#[test]
fn two_thousand_contexts_with_failures_survive_two_healer_kills_exactly() {
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    let topology = fast_topology();
    let baton = Baton::start(&broker, {
        let mut options = BatonOptions::new("heal-conserve");
        options.topology = topology.path().to_path_buf();
        options
    });
    let mut healer = Healer::start(&broker, "healer-conserve", topology.path());
    // 10% of contexts fail: 5% once, 3% three times (the fetcher finishes),
    // 2% until plan B.
    let mut records = Vec::new();
    let mut failures = 0;
    for n in 0..2000 {
        let context = format!("ctx-{n:04}");
        let (screenshots, fetches) = match n % 100 {
            0..=4 => (1, 0),
            5..=7 => (3, 0),
            8 | 9 => (3, 3),
            _ => (0, 0),
        };
        failures += screenshots + fetches;
        records.extend(workflow(&context, screenshots, fetches));
    }
    let expected = common::reference_with(&decode_all(&records), topology.path());
    assert_eq!(expected.dead_letters, failures);
    broker.produce(INPUT, &records);

    let mut dlq = Reader::new(&broker, &[DLQ]);
    for kill in 1..=2 {
        let threshold = failures * kill / 3;
        dlq.wait_until(
            &format!("{threshold} dead letters"),
            Duration::from_secs(120),
            |records| records.len() >= threshold,
        );
        healer = healer.restart(&broker);
    }
    let mut reader = Reader::new(&broker, &HANDOVER_TOPICS);
    reader.wait_until("every handover", Duration::from_secs(180), |records| {
        common::unique_handover_count(records) >= expected.handovers.len()
    });
    reader.poll_to_end();
    let (handovers, _) = common::dedup_handovers(&reader.handovers());
    assert_eq!(handovers.len(), expected.handovers.len());
    for (id, handover) in &handovers {
        let reference = expected
            .handovers
            .get(id)
            .unwrap_or_else(|| panic!("unexpected handover {handover}"));
        assert_eq!(handover, reference, "handover {id}");
    }
    dlq.poll_to_end();
    assert_eq!(
        by_source(&dlq.records.iter().collect::<Vec<_>>()).len(),
        expected.dead_letters
    );
    let mut parked = Reader::new(&broker, &[PARKED]);
    parked.poll_to_end();
    assert_eq!(
        by_source(&parked.records.iter().collect::<Vec<_>>()).len(),
        expected.parked
    );
    for (context, reference) in &expected.states {
        common::wait_for(
            &format!("{context} settles"),
            Duration::from_secs(30),
            || comparable(&context_state(&baton, context)) == reference_state(reference),
        );
    }
    drop(healer);
}
