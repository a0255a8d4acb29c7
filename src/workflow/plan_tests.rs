//! The plan around the step: memory and snapshots, dead letters with their
//! headers, and every bound on a context.

use serde_json::json;

use super::plan::{DEFAULT_MAX_MEMORY_BYTES, SnapshotPolicy};
use super::tests::{command, downstream, event, failed_downstream, topology};
use super::*;
use crate::control::ControlAction;
use crate::dlq::{ErrorClass, headers};
use crate::event::{SourceCoordinates, ToolEvent, ToolStatus};
use crate::memory::{Memory, MemoryKind, MemoryUpsert};

const VISION: &str = "tool.vision_analyze.completed";
const SCREENSHOT: &str = "tool.browser_take_screenshot.completed";
const VALUATION: &str = "tool.valuation_estimate.completed";

fn source() -> SourceCoordinates {
    SourceCoordinates {
        topic: "mcp.events.all".into(),
        partition: 0,
        offset: 7,
    }
}

fn plan(
    state: Option<&WorkflowState>,
    memory: &Memory,
    event: &ToolEvent,
    policy: &Policy,
) -> Effects {
    let source = source();
    step(
        Context { state, memory },
        event,
        Input {
            source: &source,
            timestamp_ms: 100,
            key: Some(b"c-42"),
            value: Some(b"{\"the\":\"bytes\"}"),
        },
        &topology(),
        policy,
        100,
    )
}

#[test]
fn a_handover_freezes_a_snapshot_and_names_its_version() {
    let memory = Memory::new("c-42");
    let effects = plan(None, &memory, &event("e1", VISION, 10), &Policy::default());
    assert_eq!(effects.outcome, Outcome::Applied);
    let write = effects.memory.expect("memory written");
    assert_eq!(write.live.tool_outputs.len(), 1);
    let frozen = write.frozen.expect("a snapshot for the handover");
    assert_eq!(frozen, 1);
    let snapshot = write.live.snapshot(frozen).expect("live");
    assert_eq!(snapshot.tool_outputs.len(), 1);
    assert_eq!(effects.handovers.len(), 1);
    let planned = &effects.handovers[0];
    assert_eq!(planned.snapshot, Some(1));
    assert_eq!(planned.handover.context_id, "c-42");
    assert_eq!(planned.handover.last_tool_output, json!({"ok": true}));
    assert_eq!(effects.state.expect("state").version, 1);
    assert!(effects.dead_letter.is_none());
}

#[test]
fn snapshots_off_freeze_nothing_and_old_snapshots_are_pruned() {
    let mut policy = Policy {
        snapshots: None,
        ..Policy::default()
    };
    let memory = Memory::new("c-42");
    let effects = plan(None, &memory, &event("e1", VISION, 10), &policy);
    assert_eq!(effects.handovers[0].snapshot, None);
    assert!(effects.memory.expect("memory").frozen.is_none());

    policy.snapshots = Some(SnapshotPolicy {
        retention_ms: 1_000_000,
        max_per_context: 1,
    });
    let mut memory = Memory::new("c-42");
    memory.freeze(50);
    let effects = plan(None, &memory, &event("e1", VISION, 10), &policy);
    let write = effects.memory.expect("memory");
    assert_eq!(write.frozen, Some(2));
    assert_eq!(write.pruned, vec![1], "one snapshot kept per context");
}

#[test]
fn a_tool_failure_is_dead_lettered_with_every_header() {
    let start = downstream(&topology());
    let mut failed = event("j1", SCREENSHOT, 10);
    failed.status = ToolStatus::Error;
    failed.error = Some("timeout".into());
    let effects = plan(
        Some(&start),
        &Memory::new("c-42"),
        &failed,
        &Policy::default(),
    );
    assert_eq!(effects.outcome, Outcome::ToolFailed);
    let letter = effects.dead_letter.expect("a dead letter");
    assert_eq!(letter.class, ErrorClass::ToolFailed);
    assert_eq!(
        letter.reason,
        format!("tool call `{SCREENSHOT}` failed: timeout")
    );
    let names: Vec<&str> = letter.headers.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        names,
        vec![
            headers::WORKFLOW,
            headers::STEP,
            headers::ATTEMPTS,
            headers::FAILED_EVENT,
            headers::LOCKED_BY
        ]
    );
    assert!(effects.state.expect("state").failure.is_some());
    assert_eq!(
        effects.memory.expect("memory").live.tool_outputs.len(),
        1,
        "a failed call's output is remembered too"
    );
}

#[test]
fn held_records_are_bounded_by_count_and_bytes() {
    let failed = failed_downstream(&topology());
    let later = event("v1", VALUATION, 10);
    let policy = Policy {
        max_held_records: 2,
        ..Policy::default()
    };
    let mut state = failed;
    for _ in 0..2 {
        let effects = plan(Some(&state), &Memory::new("c-42"), &later, &policy);
        assert_eq!(effects.outcome, Outcome::Held);
        let next = effects.state.expect("held in state");
        assert_eq!(next.version, state.version + 1);
        assert_eq!(next.held.last().map(|h| h.offset), Some(7));
        assert_eq!(
            next.held.last().and_then(|h| h.value.clone()),
            Some(b"{\"the\":\"bytes\"}".to_vec())
        );
        state = next;
    }
    let effects = plan(Some(&state), &Memory::new("c-42"), &later, &policy);
    assert_eq!(
        effects.outcome,
        Outcome::DeadLettered(ErrorClass::HeldOverflow)
    );
    assert!(effects.state.is_none(), "the state is unchanged");
    let reason = effects.dead_letter.expect("letter").reason;
    assert!(reason.contains("already holds 2 record(s)"), "{reason}");

    let by_bytes = Policy {
        max_held_bytes: 10,
        ..Policy::default()
    };
    let effects = plan(
        Some(&failed_downstream(&topology())),
        &Memory::new("c-42"),
        &later,
        &by_bytes,
    );
    assert_eq!(
        effects.outcome,
        Outcome::DeadLettered(ErrorClass::HeldOverflow)
    );
}

#[test]
fn memory_drops_its_oldest_tool_outputs_then_dead_letters() {
    let big = |id: &str, name: &str, bytes: usize| {
        let mut event = event(id, name, 1);
        event.result = json!({"text": "x".repeat(bytes)});
        event
    };
    let policy = Policy {
        max_memory_bytes: 3_000,
        ..Policy::default()
    };
    let first = plan(
        None,
        &Memory::new("c-42"),
        &big("e1", VISION, 1_800),
        &policy,
    );
    let state = first.state.expect("state");
    let memory = first.memory.expect("memory").live;
    let research = big("e2", "tool.research_enrich.completed", 1_800);
    let second = plan(Some(&state), &memory, &research, &policy);
    let live = second.memory.expect("memory").live;
    assert_eq!(live.tool_outputs.len(), 1, "the oldest output went first");
    assert_eq!(live.tool_outputs[0].event_id, "e2");
    assert!(live.encoded_len() <= 3_000);

    let huge = plan(
        None,
        &Memory::new("c-42"),
        &big("e1", VISION, 5_000),
        &policy,
    );
    assert_eq!(
        huge.outcome,
        Outcome::DeadLettered(ErrorClass::MemoryOverflow)
    );
    assert!(huge.state.is_none() && huge.memory.is_none());
    const {
        assert!(
            DEFAULT_MAX_MEMORY_BYTES < 1_000_000,
            "memory fits a changelog record"
        )
    };
}

#[test]
fn context_ids_are_bounded_and_free_of_control_characters() {
    let policy = Policy {
        max_context_id_bytes: 8,
        ..Policy::default()
    };
    let memory = Memory::new("x");
    let mut long = event("e1", VISION, 1);
    long.context_id = "c".repeat(9);
    let effects = plan(None, &memory, &long, &policy);
    assert_eq!(
        effects.outcome,
        Outcome::DeadLettered(ErrorClass::InvalidContextId)
    );
    let mut nul = event("e1", VISION, 1);
    nul.context_id = "c\u{0}snap".into();
    let effects = plan(None, &memory, &nul, &Policy::default());
    assert_eq!(
        effects.outcome,
        Outcome::DeadLettered(ErrorClass::InvalidContextId)
    );

    let upsert = MemoryUpsert {
        context_id: "c\nx".into(),
        kind: MemoryKind::Fact,
        content: "fact".into(),
        importance: 0.5,
        key: None,
    };
    let effects = remember(&memory, &upsert, &Policy::default(), 1);
    assert_eq!(
        effects.outcome,
        Outcome::DeadLettered(ErrorClass::InvalidContextId)
    );
}

#[test]
fn a_command_releases_held_records_and_hands_over_with_the_last_output() {
    let topology = topology();
    let failed = failed_downstream(&topology);
    let held = plan(
        Some(&failed),
        &Memory::new("c-42"),
        &event("v1", VALUATION, 10),
        &Policy::default(),
    )
    .state
    .expect("held");
    let mut memory = Memory::new("c-42");
    memory.record_tool_output(crate::memory::ToolOutput {
        event_id: "j1".into(),
        tool: "browser_take_screenshot".into(),
        output: crate::memory::RawJson::from_value(&json!({"shot": 1})),
        at: 30,
        since: 0,
    });
    let effects = apply_command(
        Context {
            state: Some(&held),
            memory: &memory,
        },
        &command(ControlAction::Retry, 2),
        &topology,
        &Policy::default(),
        40,
    );
    assert_eq!(effects.outcome, Outcome::CommandApplied);
    assert_eq!(effects.release.len(), 1);
    assert_eq!(effects.handovers.len(), 1);
    assert_eq!(
        effects.handovers[0].handover.last_tool_output,
        json!({"shot": 1})
    );
    assert_eq!(effects.handovers[0].snapshot, Some(1));
    assert!(effects.state.expect("state").held.is_empty());
}

#[test]
fn a_memory_upsert_is_bounded_too() {
    let upsert = MemoryUpsert {
        context_id: "c-42".into(),
        kind: MemoryKind::Fact,
        content: "y".repeat(4_000),
        importance: 0.5,
        key: None,
    };
    let policy = Policy {
        max_memory_bytes: 2_000,
        ..Policy::default()
    };
    let effects = remember(&Memory::new("c-42"), &upsert, &policy, 1);
    assert_eq!(
        effects.outcome,
        Outcome::DeadLettered(ErrorClass::MemoryOverflow)
    );
    let effects = remember(&Memory::new("c-42"), &upsert, &Policy::default(), 1);
    assert_eq!(effects.outcome, Outcome::Remembered);
    assert_eq!(effects.memory.expect("memory").live.entries.len(), 1);
}
