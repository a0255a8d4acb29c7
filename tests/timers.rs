//! Issue 12's integration tests: durable timers against a real broker, real
//! pods and a real `baton heal`. A silent agent is timed out and healed, a
//! heartbeat extends a step, approvals are answered or time out, a
//! cancellation parks what a context held, and timers fire exactly once
//! across kills and a rebalance.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use baton::sample::SampleRecord;
use common::{Baton, BatonOptions, Broker, Healer, Reader, Record, dedup_handovers, state_of};
use serde_json::{Value, json};

const INPUT: &str = "mcp.events.all";
const DLQ: &str = "mcp.events.dlq";
const PARKED: &str = "mcp.events.dlq.parked";
const CONTROL: &str = "mcp.orchestration.control";
const STATUS: &str = "mcp.orchestration.status";

/// Both shipped workflows with their timeouts cut to seconds, fast healer
/// backoffs, and whatever else `extra` replaces.
fn fast_timers(extra: &[(&str, &str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("topology dir");
    let replacements: [(&str, &str, &str); 10] = [
        (
            "vision-research.toml",
            "timeout = \"2m\"",
            "timeout = \"2s\"",
        ),
        (
            "vision-research.toml",
            "timeout = \"1m\"",
            "timeout = \"2s\"",
        ),
        (
            "vision-research.toml",
            "initial_backoff_ms = 1000",
            "initial_backoff_ms = 100",
        ),
        (
            "vision-research.toml",
            "max_backoff_ms = 30000",
            "max_backoff_ms = 400",
        ),
        (
            "research-with-approval.toml",
            "timeout = \"5m\"",
            "timeout = \"12s\"",
        ),
        (
            "research-with-approval.toml",
            "heartbeat_timeout = \"30s\"",
            "heartbeat_timeout = \"2s\"",
        ),
        (
            "research-with-approval.toml",
            "timeout = \"1h\"",
            "timeout = \"6s\"",
        ),
        (
            "research-with-approval.toml",
            "timeout = \"1m\"",
            "timeout = \"1h\"",
        ),
        (
            "research-with-approval.toml",
            "initial_backoff_ms = 1000",
            "initial_backoff_ms = 100",
        ),
        (
            "research-with-approval.toml",
            "max_backoff_ms = 30000",
            "max_backoff_ms = 400",
        ),
    ];
    for file in ["vision-research.toml", "research-with-approval.toml"] {
        let mut text = std::fs::read_to_string(Path::new(common::REPO).join("topology").join(file))
            .expect("shipped topology");
        for (target, from, to) in replacements.iter().chain(extra) {
            if *target == file {
                assert!(text.contains(from), "{file} has `{from}`");
                text = text.replace(from, to);
            }
        }
        std::fs::write(dir.path().join(file), text).expect("write topology");
    }
    dir
}

fn record(context: &str, value: Value) -> SampleRecord {
    SampleRecord {
        key: Some(context.as_bytes().to_vec()),
        value: value.to_string().into_bytes(),
    }
}

fn tool(context: &str, id: &str, tool: &str) -> SampleRecord {
    record(
        context,
        json!({
            "event_id": format!("{context}-{id}"), "context_id": context,
            "event": format!("tool.{tool}.completed"), "tool": tool,
            "result": {"by": tool, "call": id},
            "usage": {"input_tokens": 10, "output_tokens": 5},
        }),
    )
}

fn heartbeat(context: &str, agent: &str, progress: &str) -> SampleRecord {
    record(
        context,
        json!({"event": "agent.heartbeat", "context_id": context, "agent": agent, "progress": progress}),
    )
}

fn approval(context: &str, answer: &str, approver: &str) -> SampleRecord {
    record(
        context,
        json!({
            "event_id": format!("{context}-{answer}"), "event": format!("approval.{answer}"),
            "context_id": context, "approver": approver, "reason": "looks right",
        }),
    )
}

fn reader(broker: &Broker) -> Reader {
    let mut topics: Vec<&str> = common::HANDOVER_TOPICS.to_vec();
    topics.extend([DLQ, PARKED, STATUS]);
    Reader::new(broker, &topics)
}

/// The handovers of `context`, deduplicated by id, as (agent, status,
/// attempt), in the order their first copies were read.
fn handovers_of(reader: &Reader, context: &str) -> Vec<(String, String, u64)> {
    let mut seen = BTreeSet::new();
    reader
        .handovers()
        .into_iter()
        .map(Record::json)
        .filter(|h| h["context_id"] == context)
        .filter(|h| seen.insert(h["handover_id"].as_str().unwrap_or_default().to_owned()))
        .map(|h| {
            (
                h["agent"].as_str().unwrap_or_default().to_owned(),
                h["status"].as_str().unwrap_or_default().to_owned(),
                h["attempt"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

/// Dead letters of `context` with `class`, distinct by what they report
/// (step and attempt): a broker that shows aborted records may show a
/// firing's letter twice.
fn letters(reader: &Reader, topic: &str, context: &str, class: &str) -> BTreeSet<(String, String)> {
    reader
        .topic(topic)
        .into_iter()
        .filter(|r| r.key.as_deref() == Some(context.as_bytes()))
        .filter(|r| r.headers.get("baton.error.class").map(String::as_str) == Some(class))
        .map(|r| {
            (
                r.headers.get("baton.step").cloned().unwrap_or_default(),
                r.headers.get("baton.attempts").cloned().unwrap_or_default(),
            )
        })
        .collect()
}

fn has_handover(reader: &[Record], context: &str, agent: &str, status: &str, attempt: u64) -> bool {
    common::handover_records(reader).into_iter().any(|r| {
        let h = r.json();
        h["context_id"] == context
            && h["agent"] == agent
            && h["status"] == status
            && h["attempt"] == attempt
    })
}

fn state(pods: &[&Baton], context: &str) -> Value {
    state_of(pods, context).unwrap_or(Value::Null)
}

fn wait_for_state(pods: &[&Baton], context: &str, wanted: &str) -> Value {
    common::wait_for(
        &format!("{context} in {wanted}"),
        Duration::from_secs(60),
        || state(pods, context)["state"] == wanted,
    );
    state(pods, context)
}

/// The reference for the silent researcher: the pure core folded over the
/// vision event, the researcher's timer firing, the healer's decision and
/// command, and the three answers. Returns its handovers, as the pod's read
/// back and normalized, and the final state's essentials.
fn silent_researcher_reference(topology: &Path) -> (BTreeMap<String, Value>, Value) {
    use baton::codec::{DecodeLimits, decode_event};
    use baton::control::ControlCommand;
    use baton::event::SourceCoordinates;
    use baton::healer::{DeadLetterView, Decision, decide};
    use baton::memory::Memory;
    use baton::workflow::timers::TimerKind;
    use baton::workflow::{self, Context, Effects, Input, Policy, WorkflowState};
    let topology = baton::topology::Topology::load(topology).expect("topology");
    let policy = Policy::default();
    let source = SourceCoordinates {
        topic: INPUT.into(),
        partition: 0,
        offset: 0,
    };
    let mut state: Option<WorkflowState> = None;
    let mut memory = Memory::new("ctx-silent");
    let mut handovers = BTreeMap::new();
    let mut fold = |effects: Effects, state: &mut Option<WorkflowState>, memory: &mut Memory| {
        for planned in &effects.handovers {
            let mut value = serde_json::to_value(&planned.handover).expect("json");
            value["memory_snapshot_url"] = match planned.snapshot {
                Some(version) => json!(format!("/contexts/ctx%2Dsilent/snapshots/{version}")),
                None => Value::Null,
            };
            if let Some(object) = value.as_object_mut() {
                object.remove("produced_at");
                object.remove("deadline_at");
            }
            handovers.insert(planned.handover.handover_id.clone(), value);
        }
        if let Some(next) = effects.state.clone() {
            *state = Some(next);
        }
        if let Some(write) = &effects.memory {
            *memory = write.live.clone();
        }
        effects
    };
    let step = |record: &SampleRecord, state: &Option<WorkflowState>, memory: &Memory, now: i64| {
        let event =
            decode_event(Some(&record.value), &source, &DecodeLimits::default()).expect("event");
        workflow::step(
            Context {
                state: state.as_ref(),
                memory,
            },
            &event,
            Input {
                source: &source,
                timestamp_ms: now,
                key: None,
                value: None,
            },
            &topology,
            &policy,
            now,
        )
    };
    let effects = step(
        &tool("ctx-silent", "vision", "vision_analyze"),
        &state,
        &memory,
        0,
    );
    fold(effects, &mut state, &mut memory);
    let timer = state
        .as_ref()
        .and_then(|s| s.timers.iter().find(|t| t.kind == TimerKind::Step).cloned())
        .expect("the researcher's timer");
    let fired = workflow::fire(
        Context {
            state: state.as_ref(),
            memory: &memory,
        },
        &timer,
        &topology,
        &policy,
    );
    let letter = fired.dead_letter.clone().expect("a timeout's letter");
    fold(fired, &mut state, &mut memory);
    let header = |name: &str| {
        letter
            .headers
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.clone())
    };
    let view = DeadLetterView {
        class: Some("step_timed_out".into()),
        reason: Some(letter.reason.clone()),
        context_id: Some("ctx-silent".into()),
        workflow: header("baton.workflow"),
        step: header("baton.step"),
        attempts: header("baton.attempts").and_then(|a| a.parse().ok()),
        failed_event: header("baton.failed.event"),
        locked_by: header("baton.locked.by"),
    };
    let Decision::Command {
        action,
        step: failed_step,
        attempt,
        ..
    } = decide(&topology, &view)
    else {
        panic!("the healer retries");
    };
    let command = ControlCommand {
        command_id: "dlq/0/0".into(),
        context_id: "ctx-silent".into(),
        action,
        step: failed_step,
        attempt,
        dlq_topic: DLQ.into(),
        dlq_partition: 0,
        dlq_offset: 0,
        not_before: None,
        reason: None,
    };
    let commanded = workflow::apply_command(
        Context {
            state: state.as_ref(),
            memory: &memory,
        },
        &command,
        &topology,
        &policy,
        1,
    );
    fold(commanded, &mut state, &mut memory);
    for (now, (id, name)) in [
        ("research", "research_enrich"),
        ("valuation", "valuation_estimate"),
        ("shot", "browser_take_screenshot"),
    ]
    .into_iter()
    .enumerate()
    {
        let effects = step(
            &tool("ctx-silent", id, name),
            &state,
            &memory,
            2 + now as i64,
        );
        fold(effects, &mut state, &mut memory);
    }
    let state = serde_json::to_value(state.expect("a state")).expect("json");
    (handovers, common::essentials(&state))
}

#[test]
fn a_silent_researcher_is_timed_out_retried_then_answers_and_the_workflow_completes() {
    let broker = Broker::start();
    broker.create_baton_topics(3);
    let topology = fast_timers(&[]);
    let mut options = BatonOptions::new("pod-t1");
    options.topology = topology.path().to_path_buf();
    let pod = Baton::start(&broker, options);
    let _healer = Healer::start(&broker, "healer-t1", topology.path());
    let mut reader = reader(&broker);

    broker.produce(INPUT, &[tool("ctx-silent", "vision", "vision_analyze")]);
    // Nobody answers the researcher: its 2 s run out, the healer retries.
    reader.wait_until(
        "the retry after the timeout",
        Duration::from_secs(60),
        |r| has_handover(r, "ctx-silent", "researcher", "retrying", 2),
    );
    assert_eq!(
        letters(&reader, DLQ, "ctx-silent", "step_timed_out"),
        BTreeSet::from([("ResearcherQueued".to_owned(), "1".to_owned())])
    );
    let timed_out = reader
        .topic(DLQ)
        .into_iter()
        .find(|r| r.headers.get("baton.error.class").map(String::as_str) == Some("step_timed_out"))
        .expect("the timeout's letter");
    assert_eq!(timed_out.headers["baton.workflow"], "vision-research");
    assert_eq!(timed_out.headers["baton.locked.by"], "researcher");
    assert_eq!(
        timed_out.headers["baton.failed.event"],
        "tool.research_enrich.completed"
    );
    // The retry answers; the rest of the workflow follows.
    broker.produce(
        INPUT,
        &[
            tool("ctx-silent", "research", "research_enrich"),
            tool("ctx-silent", "valuation", "valuation_estimate"),
            tool("ctx-silent", "shot", "browser_take_screenshot"),
        ],
    );
    let done = wait_for_state(&[&pod], "ctx-silent", "Completed");
    assert_eq!(
        done["timers"],
        Value::Null,
        "a terminal context holds no timers"
    );
    reader.wait_until("the reporter's handover", Duration::from_secs(30), |r| {
        has_handover(r, "ctx-silent", "reporter", "queued", 1)
    });
    reader.poll_to_end();
    assert_eq!(
        handovers_of(&reader, "ctx-silent"),
        [
            ("researcher".to_owned(), "queued".to_owned(), 1),
            ("researcher".to_owned(), "retrying".to_owned(), 2),
            ("valuation".to_owned(), "queued".to_owned(), 1),
            ("playwright".to_owned(), "queued".to_owned(), 1),
            ("reporter".to_owned(), "queued".to_owned(), 1),
        ]
    );
    let (unique, _) = dedup_handovers(&reader.handovers());
    assert_eq!(unique.len(), 5, "one handover per dispatch");
    // Exactly the reference model's, timers included.
    let (reference, final_state) = silent_researcher_reference(topology.path());
    assert_eq!(unique, reference);
    assert_eq!(common::essentials(&done), final_state);
    assert!(pod.metric("baton_timers_fired_total{kind=\"step\"}") >= 1.0);
    assert_eq!(pod.metric("baton_events_stale_total"), 0.0);
}

#[test]
fn timers_fire_on_a_partition_that_receives_no_input_at_all() {
    let broker = Broker::start();
    broker.create_baton_topics(6);
    let topology = fast_timers(&[]);
    let mut options = BatonOptions::new("pod-t2");
    options.topology = topology.path().to_path_buf();
    let pod = Baton::start(&broker, options);
    let mut reader = reader(&broker);
    broker.produce(INPUT, &[tool("ctx-alone", "vision", "vision_analyze")]);
    reader.wait_until("the researcher's handover", Duration::from_secs(60), |r| {
        has_handover(r, "ctx-alone", "researcher", "queued", 1)
    });
    let consumed = pod.metric("baton_records_consumed_total{topic=\"mcp.events.all\"}");
    // No healer and no further input anywhere: only the wall clock moves.
    reader.wait_until("the timeout's dead letter", Duration::from_secs(30), |r| {
        r.iter().any(|r| {
            r.topic == DLQ
                && r.headers.get("baton.error.class").map(String::as_str) == Some("step_timed_out")
        })
    });
    assert_eq!(
        pod.metric("baton_records_consumed_total{topic=\"mcp.events.all\"}"),
        consumed,
        "nothing was consumed while the timer fired"
    );
    let after = wait_for_state(&[&pod], "ctx-alone", "ResearcherQueued");
    assert_eq!(after["locked_by"], Value::Null);
    assert_eq!(after["failure"]["timed_out"], true);
    assert!(pod.metric("baton_timer_lateness_seconds_count") >= 1.0);
}

/// The researcher answers while the pod is down, and the pod comes back
/// after the researcher's timer came due. The answer waits in Kafka: it,
/// not the wall clock, decides. A task fires by the wall clock only once
/// its inputs are read to their end; before that fix the first round after
/// the start fired the timer before the answer was fetched.
#[test]
fn an_answer_waiting_when_a_pod_comes_back_cancels_the_timer_it_outlived() {
    let broker = Broker::start();
    broker.create_baton_topics(3);
    // 4 s: room for the kill and the answer inside the researcher's time.
    let topology = fast_timers(&[(
        "vision-research.toml",
        "timeout = \"2s\"",
        "timeout = \"4s\"",
    )]);
    let mut options = BatonOptions::new("pod-t8");
    options.topology = topology.path().to_path_buf();
    let mut pod = Baton::start(&broker, options);
    let mut reader = reader(&broker);

    broker.produce(INPUT, &[tool("ctx-outlived", "vision", "vision_analyze")]);
    reader.wait_until("the researcher's handover", Duration::from_secs(60), |r| {
        has_handover(r, "ctx-outlived", "researcher", "queued", 1)
    });
    let handed_over = Instant::now();
    pod.kill();
    // The answer, timestamped well inside the researcher's 4 s.
    broker.produce(
        INPUT,
        &[tool("ctx-outlived", "research", "research_enrich")],
    );
    // The condition is the wall clock itself: the timer must be overdue
    // before the pod comes back.
    common::wait_for(
        "the researcher's timer to come due",
        Duration::from_secs(10),
        || handed_over.elapsed() > Duration::from_secs(5),
    );
    let pod = pod.restart(&broker);
    wait_for_state(&[&pod], "ctx-outlived", "DownstreamQueued");
    reader.wait_until("the downstream handovers", Duration::from_secs(30), |r| {
        has_handover(r, "ctx-outlived", "valuation", "queued", 1)
            && has_handover(r, "ctx-outlived", "playwright", "queued", 1)
    });
    reader.poll_to_end();
    assert_eq!(
        letters(&reader, DLQ, "ctx-outlived", "step_timed_out"),
        BTreeSet::new(),
        "the answer came before the timer's due time, so the timer never fires"
    );
    assert_eq!(
        handovers_of(&reader, "ctx-outlived"),
        [
            ("researcher".to_owned(), "queued".to_owned(), 1),
            ("valuation".to_owned(), "queued".to_owned(), 1),
            ("playwright".to_owned(), "queued".to_owned(), 1),
        ]
    );
    assert_eq!(pod.metric("baton_timers_fired_total{kind=\"step\"}"), 0.0);
}

#[test]
fn a_silent_playwright_falls_back_to_the_fetcher_and_a_silent_fetcher_to_plan_b() {
    let broker = Broker::start();
    broker.create_baton_topics(3);
    let topology = fast_timers(&[]);
    let mut options = BatonOptions::new("pod-t3");
    options.topology = topology.path().to_path_buf();
    let pod = Baton::start(&broker, options);
    let _healer = Healer::start(&broker, "healer-t3", topology.path());
    let mut reader = reader(&broker);
    broker.produce(
        INPUT,
        &[
            tool("ctx-shot", "vision", "vision_analyze"),
            tool("ctx-shot", "research", "research_enrich"),
            tool("ctx-shot", "valuation", "valuation_estimate"),
        ],
    );
    // Playwright never answers: 3 attempts, then the fetcher, which never
    // answers either (3 attempts of its own), then PlanB.
    let planned = wait_for_state(&[&pod], "ctx-shot", "PlanB");
    assert_eq!(planned["locked_by"], "researcher");
    // The healer's plan-B command starts the attempt after the fetcher's 3.
    reader.wait_until("the plan B handover", Duration::from_secs(30), |r| {
        has_handover(r, "ctx-shot", "researcher", "plan_b", 7)
    });
    reader.poll_to_end();
    let dispatches: Vec<(String, String, u64)> = handovers_of(&reader, "ctx-shot")
        .into_iter()
        .filter(|(agent, _, _)| agent != "researcher" && agent != "valuation")
        .collect();
    assert_eq!(
        dispatches,
        [
            ("playwright".to_owned(), "queued".to_owned(), 1),
            ("playwright".to_owned(), "retrying".to_owned(), 2),
            ("playwright".to_owned(), "retrying".to_owned(), 3),
            ("fetcher".to_owned(), "fallback".to_owned(), 4),
            ("fetcher".to_owned(), "retrying".to_owned(), 5),
            ("fetcher".to_owned(), "retrying".to_owned(), 6),
        ]
    );
    let timeouts = letters(&reader, DLQ, "ctx-shot", "step_timed_out");
    assert_eq!(timeouts.len(), 6, "one timeout per dispatch: {timeouts:?}");
    // The valuation arrived before the timeouts: it stays recorded.
    assert_eq!(planned["join_arrived"], json!([]), "PlanB clears the join");
}

#[test]
fn heartbeats_extend_a_step_and_a_silent_holder_is_timed_out_at_its_heartbeat_timeout() {
    let broker = Broker::start();
    broker.create_baton_topics(3);
    let topology = fast_timers(&[]);
    let mut options = BatonOptions::new("pod-t4");
    options.topology = topology.path().to_path_buf();
    let pod = Baton::start(&broker, options);
    let mut reader = reader(&broker);
    // The researcher starts beating as soon as it is handed the context
    // (a heartbeat processed right after the handover's input).
    broker.produce(
        INPUT,
        &[
            tool("ctx-beat", "doc", "document_ingest"),
            heartbeat("ctx-beat", "researcher", "starting"),
        ],
    );
    // Heartbeats every 300 ms for 5 s: well past the 2 s heartbeat timeout.
    let started = Instant::now();
    let mut beats = 0;
    let mut last = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        beats += 1;
        // A stranger's heartbeat alongside is ignored.
        broker.produce(
            INPUT,
            &[
                heartbeat("ctx-beat", "researcher", &format!("step {beats}")),
                heartbeat("ctx-beat", "valuation", "not mine"),
            ],
        );
        assert!(
            last.elapsed() < Duration::from_millis(1500),
            "the test's own beat was late"
        );
        last = Instant::now();
        std::thread::sleep(Duration::from_millis(300));
    }
    common::wait_for("every heartbeat counted", Duration::from_secs(30), || {
        pod.metric("baton_heartbeats_total{outcome=\"accepted\"}") >= f64::from(beats + 1)
            && pod.metric("baton_heartbeats_total{outcome=\"ignored\"}") >= f64::from(beats)
    });
    reader.wait_until("the researcher's handover", Duration::from_secs(30), |r| {
        has_handover(r, "ctx-beat", "researcher", "queued", 1)
    });
    assert!(
        letters(&reader, DLQ, "ctx-beat", "step_timed_out").is_empty(),
        "a beating holder is not timed out"
    );
    let progress = reader
        .topic(STATUS)
        .into_iter()
        .map(Record::json)
        .any(|update| {
            update["context_id"] == "ctx-beat"
                && update["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("step 3"))
        });
    assert!(progress, "the heartbeat's progress reaches the live feed");
    // Silence: timed out at the heartbeat timeout, not the 12 s step timeout.
    let silent_from = Instant::now();
    reader.wait_until(
        "the missed heartbeat's letter",
        Duration::from_secs(30),
        |r| {
            r.iter().any(|r| {
                r.topic == DLQ
                    && r.key.as_deref() == Some(b"ctx-beat".as_slice())
                    && r.headers.get("baton.error.class").map(String::as_str)
                        == Some("step_timed_out")
            })
        },
    );
    assert!(
        silent_from.elapsed() < Duration::from_secs(7),
        "timed out after {:?}, past the heartbeat timeout",
        silent_from.elapsed()
    );
    assert!(pod.metric("baton_timers_fired_total{kind=\"heartbeat\"}") >= 1.0);
}

#[test]
fn approvals_are_granted_denied_or_answered_by_their_timeout() {
    let broker = Broker::start();
    broker.create_baton_topics(3);
    let topology = fast_timers(&[]);
    let mut options = BatonOptions::new("pod-t5");
    options.topology = topology.path().to_path_buf();
    let pod = Baton::start(&broker, options);
    // The gates' 6 s count from the research's record time: the pod must
    // be in the group before they start, or a backlog eats them.
    common::wait_for("the pod ready", Duration::from_secs(60), || {
        pod.http_get("/readyz")
            .is_some_and(|(status, _)| status == 200)
    });
    let mut reader = reader(&broker);
    let contexts = ["ctx-granted", "ctx-denied", "ctx-nobody"];
    for context in contexts {
        broker.produce(
            INPUT,
            &[
                tool(context, "doc", "document_ingest"),
                tool(context, "research", "research_enrich"),
            ],
        );
    }
    for context in contexts {
        wait_for_state(&[&pod], context, "AwaitingApproval");
    }
    broker.produce(
        INPUT,
        &[
            approval("ctx-granted", "granted", "ana"),
            approval("ctx-denied", "denied", "bo"),
        ],
    );
    let granted = wait_for_state(&[&pod], "ctx-granted", "ValuationQueued");
    assert_eq!(granted["locked_by"], "valuation");
    wait_for_state(&[&pod], "ctx-denied", "Rejected");
    // Nobody answers the third within its 6 s: denied by the timeout.
    wait_for_state(&[&pod], "ctx-nobody", "Rejected");
    assert!(pod.metric("baton_timers_fired_total{kind=\"approval\"}") >= 1.0);
    reader.wait_until("the valuation handover", Duration::from_secs(30), |r| {
        has_handover(r, "ctx-granted", "valuation", "queued", 1)
    });
    reader.poll_to_end();
    let waiting: BTreeSet<String> = reader
        .topic(STATUS)
        .into_iter()
        .map(Record::json)
        .filter(|u| u["message"] == "Waiting for approval")
        .map(|u| u["context_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        waiting.len(),
        3,
        "the live feed says so for each: {waiting:?}"
    );
    assert!(
        handovers_of(&reader, "ctx-denied")
            .iter()
            .all(|(agent, _, _)| agent == "researcher")
    );
    assert!(
        handovers_of(&reader, "ctx-nobody")
            .iter()
            .all(|(agent, _, _)| agent == "researcher")
    );
    assert!(reader.topic(DLQ).is_empty(), "nothing is dead-lettered");
}

#[test]
fn a_cancellation_parks_the_held_records_and_tells_the_agents() {
    let broker = Broker::start();
    broker.create_baton_topics(3);
    let topology = fast_timers(&[]);
    let mut options = BatonOptions::new("pod-t6");
    options.topology = topology.path().to_path_buf();
    let pod = Baton::start(&broker, options);
    let mut reader = reader(&broker);
    let mut failed_shot = tool("ctx-cancel", "shot", "browser_take_screenshot");
    let mut value: Value = serde_json::from_slice(&failed_shot.value).expect("json");
    value["status"] = json!("error");
    value["error"] = json!("browser crashed");
    failed_shot.value = value.to_string().into_bytes();
    // No healer: the failure stays pending, and the valuation is held.
    broker.produce(
        INPUT,
        &[
            tool("ctx-cancel", "vision", "vision_analyze"),
            tool("ctx-cancel", "research", "research_enrich"),
            failed_shot,
            tool("ctx-cancel", "valuation", "valuation_estimate"),
        ],
    );
    common::wait_for("the valuation held", Duration::from_secs(60), || {
        state(&[&pod], "ctx-cancel")["held"]
            .as_array()
            .is_some_and(|held| held.len() == 1)
    });
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args([
            "context",
            "cancel",
            "ctx-cancel",
            "--reason",
            "customer left",
        ])
        .args(["--bootstrap-servers", &broker.bootstrap])
        .args(["--control-topic", CONTROL])
        .env_remove("BATON_BOOTSTRAP_SERVERS")
        .status()
        .expect("baton context cancel runs");
    assert!(status.success());
    let cancelled = wait_for_state(&[&pod], "ctx-cancel", "Cancelled");
    assert_eq!(cancelled["held"], Value::Null);
    assert_eq!(cancelled["timers"], Value::Null);
    assert_eq!(cancelled["failure"], Value::Null);
    reader.wait_until("the parked valuation", Duration::from_secs(30), |r| {
        r.iter()
            .any(|r| r.topic == PARKED && r.key.as_deref() == Some(b"ctx-cancel".as_slice()))
    });
    reader.poll_to_end();
    let parked = reader.topic(PARKED);
    let parked: Vec<&&Record> = parked
        .iter()
        .filter(|r| r.key.as_deref() == Some(b"ctx-cancel".as_slice()))
        .collect();
    assert!(!parked.is_empty());
    assert!(
        parked
            .iter()
            .all(|r| r.headers["baton.error.class"] == "context_cancelled")
    );
    assert_eq!(
        parked[0].json()["event_id"],
        "ctx-cancel-valuation",
        "parked as it arrived"
    );
    assert!(
        handovers_of(&reader, "ctx-cancel").contains(&(
            "valuation".to_owned(),
            "cancelled".to_owned(),
            1
        )),
        "the agent still working is told to stop"
    );
    // Late completions for the cancelled context are stale.
    broker.produce(
        INPUT,
        &[tool("ctx-cancel", "shot-late", "browser_take_screenshot")],
    );
    common::wait_for(
        "the late completion counted",
        Duration::from_secs(30),
        || pod.metric("baton_events_stale_total") >= 1.0,
    );
    // The list says where it stands.
    let list = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args([
            "context",
            "list",
            "--state",
            "Cancelled",
            "--format",
            "json",
        ])
        .args(["--pod-url", &format!("http://127.0.0.1:{}", pod.http_port)])
        .env("BATON_HTTP_AUTH_TOKEN", common::HTTP_TOKEN)
        .output()
        .expect("baton context list runs");
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let listed: Vec<Value> = serde_json::from_slice(&list.stdout).expect("json list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["context_id"], "ctx-cancel");
}

/// A page of `/api/contexts`; a 503 (a partition moving, a peer not yet
/// known) is retried, as its `Retry-After` says.
fn page_of(pod: &Baton, path: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match pod.http_get(path) {
            Some((200, body)) => return serde_json::from_str(&body).expect("a page"),
            Some((503, body)) if Instant::now() < deadline => {
                eprintln!("{path}: 503 {body}; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
            other => panic!("{path}: {other:?}"),
        }
    }
}

#[test]
fn the_context_list_pages_through_every_pod_and_finds_the_stalled() {
    let broker = Broker::start();
    broker.create_baton_topics(4);
    // Timeouts far away, except the researcher's, with no healer: a timed-out
    // researcher's context is not stalled (its timer fired); one whose timer
    // cannot fire would be. Here: 30 contexts waiting in ResearcherQueued.
    let topology = fast_timers(&[(
        "vision-research.toml",
        "timeout = \"2s\"",
        "timeout = \"1h\"",
    )]);
    let mut first = BatonOptions::new("pod-l1");
    first.topology = topology.path().to_path_buf();
    let mut second = BatonOptions::new("pod-l2");
    second.topology = topology.path().to_path_buf();
    let pod1 = Baton::start(&broker, first);
    let pod2 = Baton::start(&broker, second);
    let inputs: Vec<SampleRecord> = (0..30)
        .map(|i| tool(&format!("ctx-list-{i:02}"), "vision", "vision_analyze"))
        .collect();
    broker.produce(INPUT, &inputs);
    common::wait_for("every context bound", Duration::from_secs(60), || {
        (0..30).all(|i| {
            state(&[&pod1, &pod2], &format!("ctx-list-{i:02}"))["state"] == "ResearcherQueued"
        })
    });
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..10 {
        let path = match &after {
            Some(after) => format!("/api/contexts?state=ResearcherQueued&limit=7&after={after}"),
            None => "/api/contexts?state=ResearcherQueued&limit=7".to_owned(),
        };
        let page = page_of(&pod1, &path);
        let contexts = page["contexts"].as_array().expect("contexts");
        assert!(contexts.len() <= 7, "a page is bounded");
        all.extend(
            contexts
                .iter()
                .map(|c| c["context_id"].as_str().unwrap_or_default().to_owned()),
        );
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..30).map(|i| format!("ctx-list-{i:02}")).collect();
    assert_eq!(
        all, expected,
        "every context once, in order, from both pods"
    );
    let stalled = page_of(&pod2, "/api/contexts?stalled=true");
    assert_eq!(stalled["contexts"], json!([]), "nothing is past due");
    let (status, _) = pod2.http_get("/api/contexts?limit=0").expect("an answer");
    assert_eq!(status, 400);
}

#[test]
fn five_thousand_contexts_time_out_exactly_once_across_kills_and_a_rebalance() {
    const CONTEXTS: usize = 5_000;
    let broker = Broker::start();
    broker.create_baton_topics(4);
    // The researcher has 3 s and never answers: every context times out on
    // attempts 1, 2 and 3, and the healer then moves it to PlanB. Whatever
    // the load, that is the reference: each timer fires once, each firing
    // causes one dead letter and one handover.
    let topology = fast_timers(&[(
        "vision-research.toml",
        "timeout = \"2s\"",
        "timeout = \"3s\"",
    )]);
    let options = |id: &'static str| {
        let mut options = BatonOptions::new(id);
        options.topology = topology.path().to_path_buf();
        options
    };
    let mut pod1 = Baton::start(&broker, options("pod-k1"));
    let _healer = Healer::start(&broker, "healer-k", topology.path());
    let contexts: Vec<String> = (0..CONTEXTS).map(|i| format!("ctx-k-{i:04}")).collect();
    let visions: Vec<SampleRecord> = contexts
        .iter()
        .map(|context| tool(context, "vision", "vision_analyze"))
        .collect();
    broker.produce(INPUT, &visions);
    let mut reader = reader(&broker);
    // SIGKILL the pod while the first timers come due, restart it under its
    // own id; a second pod joins (a rebalance); SIGKILL the first again.
    common::wait_for("the first timeouts", Duration::from_secs(60), || {
        pod1.metric("baton_timers_fired_total{kind=\"step\"}") > 0.0
    });
    pod1.kill();
    pod1 = pod1.restart(&broker);
    let pod2 = Baton::start(&broker, options("pod-k2"));
    common::wait_for("the second pod serving", Duration::from_secs(60), || {
        pod2.metric("baton_timers_fired_total{kind=\"step\"}") > 0.0
    });
    pod1.kill();
    pod1 = pod1.restart(&broker);
    common::wait_for("every context in PlanB", Duration::from_secs(240), || {
        contexts
            .iter()
            .step_by(50)
            .all(|context| state(&[&pod1, &pod2], context)["state"] == "PlanB")
    });
    reader.wait_until(
        "every plan B handover",
        Duration::from_secs(120),
        |records| {
            let planned: BTreeSet<&[u8]> = common::handover_records(records)
                .into_iter()
                .filter(|r| r.json()["status"] == "plan_b")
                .filter_map(|r| r.key.as_deref())
                .collect();
            planned.len() == CONTEXTS
        },
    );
    reader.poll_to_end();
    let (unique, duplicates) = dedup_handovers(&reader.handovers());
    let mut per_context: BTreeMap<String, Vec<(String, String, u64)>> = BTreeMap::new();
    for handover in unique.values() {
        per_context
            .entry(
                handover["context_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
            .or_default()
            .push((
                handover["agent"].as_str().unwrap_or_default().to_owned(),
                handover["status"].as_str().unwrap_or_default().to_owned(),
                handover["attempt"].as_u64().unwrap_or_default(),
            ));
    }
    assert_eq!(per_context.len(), CONTEXTS);
    let reference = [
        ("researcher".to_owned(), "plan_b".to_owned(), 4),
        ("researcher".to_owned(), "queued".to_owned(), 1),
        ("researcher".to_owned(), "retrying".to_owned(), 2),
        ("researcher".to_owned(), "retrying".to_owned(), 3),
    ];
    for (context, mut dispatched) in per_context {
        dispatched.sort();
        assert_eq!(dispatched, reference, "{context}");
    }
    // One timeout per dispatch, and no other dead letter.
    let mut timeouts: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for letter in reader.topic(DLQ) {
        assert_eq!(letter.headers["baton.error.class"], "step_timed_out");
        timeouts
            .entry(String::from_utf8_lossy(letter.key.as_deref().unwrap_or_default()).into_owned())
            .or_default()
            .insert(
                letter
                    .headers
                    .get("baton.attempts")
                    .cloned()
                    .unwrap_or_default(),
            );
    }
    assert_eq!(timeouts.len(), CONTEXTS, "every context timed out");
    let attempts: BTreeSet<String> = ["1", "2", "3"].map(String::from).into();
    assert!(timeouts.values().all(|seen| *seen == attempts));
    // Final states: PlanB, unlocked but for the plan B agent, nothing
    // pending, and no context left overdue.
    for context in contexts.iter().step_by(41) {
        let state = state(&[&pod1, &pod2], context);
        assert_eq!(state["state"], "PlanB", "{context}");
        assert_eq!(state["failure"], Value::Null, "{context}");
        assert_eq!(state["locked_by"], "researcher", "{context}");
    }
    let stalled = page_of(&pod2, "/api/contexts?stalled=true");
    assert_eq!(stalled["contexts"], json!([]), "no context is left overdue");
    eprintln!("duplicates seen (aborted records this broker shows): {duplicates}");
}
