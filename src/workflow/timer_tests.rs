//! Timers in the pure core: which a step sets and deletes, what a firing
//! does, late answers, stale completions, heartbeats, approvals and
//! cancellation.

use std::path::Path;

use serde_json::json;

use super::tests::event;
use super::timers::{Timer, TimerKind};
use super::*;
use crate::control::{ControlAction, ControlCommand};
use crate::dlq::{ErrorClass, headers};
use crate::event::{SourceCoordinates, ToolEvent};
use crate::handover::HandoverStatus;
use crate::memory::Memory;
use crate::topology::Topology;

const VISION: &str = "tool.vision_analyze.completed";
const RESEARCH: &str = "tool.research_enrich.completed";
const VALUATION: &str = "tool.valuation_estimate.completed";
const SCREENSHOT: &str = "tool.browser_take_screenshot.completed";
const DOCUMENT: &str = "tool.document_ingest.completed";

const MINUTE: i64 = 60_000;

fn topology() -> Topology {
    Topology::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("topology"))
        .expect("shipped topologies")
}

fn source() -> SourceCoordinates {
    SourceCoordinates {
        topic: "mcp.events.all".into(),
        partition: 0,
        offset: 7,
    }
}

/// One step of `event` at `now`, over `state` and `memory`.
fn at(
    state: Option<&WorkflowState>,
    memory: &Memory,
    event: &ToolEvent,
    topology: &Topology,
    now: i64,
) -> Effects {
    let source = source();
    step(
        Context { state, memory },
        event,
        Input {
            source: &source,
            timestamp_ms: now,
            key: Some(b"c-42"),
            value: Some(b"{}"),
        },
        topology,
        &Policy::default(),
        now,
    )
}

/// Folds `events` (each at its time) from nothing; the state after.
fn fold(events: &[(ToolEvent, i64)], topology: &Topology) -> (WorkflowState, Memory) {
    let mut state: Option<WorkflowState> = None;
    let mut memory = Memory::new("c-42");
    for (event, now) in events {
        let effects = at(state.as_ref(), &memory, event, topology, *now);
        state = effects.state.or(state);
        if let Some(write) = effects.memory {
            memory = write.live;
        }
    }
    (state.expect("bound"), memory)
}

fn timer(state: &WorkflowState, kind: TimerKind, agent: Option<&str>) -> Timer {
    state
        .timers
        .iter()
        .find(|timer| timer.kind == kind && timer.agent.as_deref() == agent)
        .cloned()
        .unwrap_or_else(|| panic!("no {kind:?} timer for {agent:?} in {:?}", state.timers))
}

fn fire_at(state: &WorkflowState, memory: &Memory, timer: &Timer, topology: &Topology) -> Effects {
    fire(
        Context {
            state: Some(state),
            memory,
        },
        timer,
        topology,
        &Policy::default(),
    )
}

fn command(action: ControlAction, step: &str, attempt: u32, id: &str) -> ControlCommand {
    ControlCommand {
        command_id: id.into(),
        context_id: "c-42".into(),
        action,
        step: step.into(),
        attempt,
        dlq_topic: "mcp.events.dlq".into(),
        dlq_partition: 0,
        dlq_offset: 1,
        not_before: None,
        reason: None,
    }
}

#[test]
fn a_handover_starts_its_agents_timer_and_binding_starts_the_deadline() {
    let topology = topology();
    let effects = at(
        None,
        &Memory::new("c-42"),
        &event("e1", VISION, 10),
        &topology,
        1_000,
    );
    let state = effects.state.expect("bound");
    let step = timer(&state, TimerKind::Step, Some("researcher"));
    assert_eq!(step.due_at, 1_000 + 2 * MINUTE);
    assert_eq!(step.step, "ResearcherQueued");
    assert_eq!(step.event.as_deref(), Some(RESEARCH));
    assert_eq!(step.attempt, 1);
    assert_eq!(
        timer(&state, TimerKind::Deadline, None).due_at,
        1_000 + 15 * MINUTE
    );
    assert_eq!(effects.timers.set.len(), 2);
    assert!(effects.timers.deleted.is_empty());
    let handover = &effects.handovers[0].handover;
    assert_eq!(handover.attempt, 1);
    assert_eq!(
        handover.deadline_at.as_deref(),
        plan::rfc3339_of_ms(1_000 + 2 * MINUTE).as_deref()
    );
}

#[test]
fn completing_a_step_ends_its_timer_and_a_join_arrival_ends_only_its_agents() {
    let topology = topology();
    let (first, memory) = fold(&[(event("e1", VISION, 10), 1_000)], &topology);
    let effects = at(
        Some(&first),
        &memory,
        &event("e2", RESEARCH, 10),
        &topology,
        5_000,
    );
    let state = effects.state.expect("moved");
    assert_eq!(state.state, "DownstreamQueued");
    let agents: Vec<_> = state
        .timers
        .iter()
        .filter(|t| t.kind == TimerKind::Step)
        .map(|t| {
            (
                t.agent.clone().unwrap_or_default(),
                t.due_at,
                t.event.clone(),
            )
        })
        .collect();
    assert_eq!(
        agents,
        [
            ("playwright".into(), 5_000 + MINUTE, Some(SCREENSHOT.into())),
            ("valuation".into(), 5_000 + MINUTE, Some(VALUATION.into())),
        ]
    );
    assert_eq!(effects.timers.deleted.len(), 1, "the researcher's timer");
    let memory = effects.memory.expect("memory").live;
    let joined = at(
        Some(&state),
        &memory,
        &event("e3", VALUATION, 10),
        &topology,
        6_000,
    );
    let waiting = joined.state.expect("join arrival");
    assert_eq!(waiting.state, "DownstreamQueued");
    assert!(
        waiting
            .timers
            .iter()
            .all(|t| t.agent.as_deref() != Some("valuation"))
    );
    timer(&waiting, TimerKind::Step, Some("playwright"));
    timer(&waiting, TimerKind::Deadline, None);
}

#[test]
fn a_terminal_state_ends_every_timer() {
    let topology = topology();
    let (state, _) = fold(
        &[
            (event("e1", VISION, 10), 1_000),
            (event("e2", RESEARCH, 10), 2_000),
            (event("e3", VALUATION, 10), 3_000),
            (event("e4", SCREENSHOT, 10), 4_000),
        ],
        &topology,
    );
    assert_eq!(state.state, "Completed");
    assert!(state.timers.is_empty());
}

#[test]
fn a_step_timeout_is_dead_lettered_and_healed_like_a_failed_call() {
    let topology = topology();
    let (state, memory) = fold(&[(event("e1", VISION, 10), 1_000)], &topology);
    let due = timer(&state, TimerKind::Step, Some("researcher"));
    let effects = fire_at(&state, &memory, &due, &topology);
    assert_eq!(effects.outcome, Outcome::TimerFired(TimerKind::Step));
    let letter = effects.dead_letter.expect("dead-lettered");
    assert_eq!(letter.class, ErrorClass::StepTimedOut);
    let header = |name: &str| {
        letter
            .headers
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.as_str())
    };
    assert_eq!(header(headers::WORKFLOW), Some("vision-research"));
    assert_eq!(header(headers::STEP), Some("ResearcherQueued"));
    assert_eq!(header(headers::ATTEMPTS), Some("1"));
    assert_eq!(header(headers::FAILED_EVENT), Some(RESEARCH));
    assert_eq!(header(headers::LOCKED_BY), Some("researcher"));
    let next = effects.state.expect("failure recorded");
    assert_eq!(next.locked_by, None);
    let failure = next.failure.as_ref().expect("pending");
    assert!(failure.timed_out);
    assert!(!next.timers.contains(&due));
    assert_eq!(effects.timers.deleted, vec![due.clone()]);
    assert_eq!(effects.status_updates[0].status, ContextStatus::Retrying);

    // The healer's policy applies unchanged: a retry to the same agent.
    let letter_view = crate::healer::DeadLetterView {
        class: Some("step_timed_out".into()),
        reason: None,
        context_id: Some("c-42".into()),
        workflow: header(headers::WORKFLOW).map(str::to_owned),
        step: header(headers::STEP).map(str::to_owned),
        attempts: Some(1),
        failed_event: header(headers::FAILED_EVENT).map(str::to_owned),
        locked_by: header(headers::LOCKED_BY).map(str::to_owned),
    };
    match crate::healer::decide(&topology, &letter_view) {
        crate::healer::Decision::Command {
            action, attempt, ..
        } => {
            assert_eq!(action, ControlAction::Retry);
            assert_eq!(attempt, 2);
        }
        other => panic!("expected a retry, got {other:?}"),
    }
    let retried = apply_command(
        Context {
            state: Some(&next),
            memory: &memory,
        },
        &command(ControlAction::Retry, "ResearcherQueued", 2, "dlq/0/1"),
        &topology,
        &Policy::default(),
        70_000,
    );
    let handover = &retried.handovers[0].handover;
    assert_eq!(handover.agent, "researcher");
    assert_eq!(handover.status, HandoverStatus::Retrying);
    assert_eq!(handover.attempt, 2);
    let again = timer(
        &retried.state.expect("retried"),
        TimerKind::Step,
        Some("researcher"),
    );
    assert_eq!((again.attempt, again.due_at), (2, 70_000 + 2 * MINUTE));
}

#[test]
fn a_late_answer_wins_while_its_step_is_current_and_a_second_one_is_stale() {
    let topology = topology();
    let (state, memory) = fold(&[(event("e1", VISION, 10), 1_000)], &topology);
    let due = timer(&state, TimerKind::Step, Some("researcher"));
    let timed_out = fire_at(&state, &memory, &due, &topology)
        .state
        .expect("timed out");
    // The researcher answers after all: accepted, the failure is moot.
    let late = at(
        Some(&timed_out),
        &memory,
        &event("e2", RESEARCH, 10),
        &topology,
        200_000,
    );
    assert_eq!(late.outcome, Outcome::Applied);
    let moved = late.state.expect("moved");
    assert_eq!(moved.state, "DownstreamQueued");
    assert!(moved.failure.is_none());
    // The healer's command for the timeout now answers nothing.
    let ignored = apply_command(
        Context {
            state: Some(&moved),
            memory: &memory,
        },
        &command(ControlAction::Retry, "ResearcherQueued", 2, "dlq/0/1"),
        &topology,
        &Policy::default(),
        201_000,
    );
    assert!(matches!(ignored.outcome, Outcome::CommandIgnored { .. }));
    // A retry's answer for the step the context has left: stale, skipped.
    let second = at(
        Some(&moved),
        &memory,
        &event("e2-retry", RESEARCH, 10),
        &topology,
        202_000,
    );
    assert_eq!(second.outcome, Outcome::Stale);
    assert!(second.dead_letter.is_none() && second.state.is_none());
}

#[test]
fn completions_after_a_terminal_state_are_stale_and_never_events_nobody_waits_for() {
    let topology = topology();
    let mut small = event("e1", VISION, 10);
    small.token_budget = Some(50);
    let (state, memory) = fold(
        &[(small, 1_000), (event("e2", RESEARCH, 60), 2_000)],
        &topology,
    );
    assert_eq!(state.state, "BudgetExhausted");
    for (id, name) in [("e3", VALUATION), ("e4", SCREENSHOT)] {
        let effects = at(
            Some(&state),
            &memory,
            &event(id, name, 10),
            &topology,
            3_000,
        );
        assert_eq!(effects.outcome, Outcome::Stale, "{name}");
        assert!(effects.dead_letter.is_none());
    }
    // A research result for a context that never started stays invalid.
    let never = at(
        None,
        &Memory::new("c-42"),
        &event("x", RESEARCH, 1),
        &topology,
        1,
    );
    assert_eq!(
        never.dead_letter.map(|letter| letter.class),
        Some(ErrorClass::InvalidTransition)
    );
}

#[test]
fn a_timer_the_context_no_longer_holds_changes_nothing() {
    let topology = topology();
    let (state, memory) = fold(&[(event("e1", VISION, 10), 1_000)], &topology);
    let mut gone = timer(&state, TimerKind::Step, Some("researcher"));
    gone.due_at += 1;
    let effects = fire_at(&state, &memory, &gone, &topology);
    assert_eq!(effects.outcome, Outcome::TimerStale);
    assert!(effects.state.is_none() && effects.dead_letter.is_none());
    assert_eq!(effects.timers.deleted, vec![gone]);
}

#[test]
fn the_deadline_moves_the_context_to_plan_b_with_a_final_handover() {
    let topology = topology();
    let (state, memory) = fold(&[(event("e1", VISION, 10), 1_000)], &topology);
    let deadline = timer(&state, TimerKind::Deadline, None);
    let effects = fire_at(&state, &memory, &deadline, &topology);
    assert_eq!(effects.outcome, Outcome::TimerFired(TimerKind::Deadline));
    let next = effects.state.expect("moved");
    assert_eq!(next.state, "PlanB");
    assert!(!next.timers.contains(&deadline));
    assert_eq!(effects.handovers.len(), 1);
    assert_eq!(effects.handovers[0].handover.status, HandoverStatus::PlanB);
    assert_eq!(effects.status_updates[0].status, ContextStatus::PlanB);
    // Repeating the firing (after an abort) plans the same handover id.
    let again = fire_at(&state, &memory, &deadline, &topology);
    assert_eq!(
        again.handovers[0].handover.handover_id,
        effects.handovers[0].handover.handover_id
    );
}

fn heartbeat_from(agent: &str, id: &str, progress: &str) -> ToolEvent {
    let mut beat = event(id, crate::topology::HEARTBEAT_EVENT, 0);
    beat.usage = None;
    beat.agent = Some(agent.into());
    beat.progress = Some(progress.into());
    beat
}

#[test]
fn a_heartbeat_from_the_holder_extends_its_step_and_others_are_ignored() {
    let topology = topology();
    let (state, memory) = fold(&[(event("d1", DOCUMENT, 10), 1_000)], &topology);
    let before = timer(&state, TimerKind::Heartbeat, Some("researcher"));
    assert_eq!(before.due_at, 1_000 + 30_000);
    let beat = at(
        Some(&state),
        &memory,
        &heartbeat_from("researcher", "h1", "read 3 of 10 sources"),
        &topology,
        20_000,
    );
    assert_eq!(beat.outcome, Outcome::Heartbeat { accepted: true });
    let extended = beat.state.expect("timer moved");
    assert_eq!(
        timer(&extended, TimerKind::Heartbeat, Some("researcher")).due_at,
        20_000 + 30_000
    );
    assert_eq!(
        extended.tokens_used, state.tokens_used,
        "a heartbeat spends nothing"
    );
    assert!(
        beat.status_updates[0]
            .message
            .contains("read 3 of 10 sources")
    );
    let stranger = at(
        Some(&extended),
        &memory,
        &heartbeat_from("valuation", "h2", "hi"),
        &topology,
        21_000,
    );
    assert_eq!(stranger.outcome, Outcome::Heartbeat { accepted: false });
    assert!(stranger.state.is_none() && stranger.status_updates.is_empty());
    // Silence past the heartbeat timeout times the call out.
    let missed = timer(&extended, TimerKind::Heartbeat, Some("researcher"));
    let effects = fire_at(&extended, &memory, &missed, &topology);
    assert_eq!(effects.outcome, Outcome::TimerFired(TimerKind::Heartbeat));
    assert_eq!(
        effects.dead_letter.map(|letter| letter.class),
        Some(ErrorClass::StepTimedOut)
    );
}

fn approval(answer: &str, id: &str) -> ToolEvent {
    let mut event = event(id, answer, 0);
    event.usage = None;
    event.result = json!({"approver": "ana", "reason": null});
    event
}

#[test]
fn an_approval_gate_is_granted_denied_or_answered_by_its_timeout() {
    let topology = topology();
    let (waiting, memory) = fold(
        &[
            (event("d1", DOCUMENT, 10), 1_000),
            (event("d2", RESEARCH, 10), 2_000),
        ],
        &topology,
    );
    assert_eq!(waiting.state, "AwaitingApproval");
    let gate = timer(&waiting, TimerKind::Approval, None);
    assert_eq!(gate.due_at, 2_000 + 60 * MINUTE);

    let granted = at(
        Some(&waiting),
        &memory,
        &approval("approval.granted", "a1"),
        &topology,
        3_000,
    );
    let next = granted.state.expect("granted");
    assert_eq!(next.state, "ValuationQueued");
    assert_eq!(next.tokens_used, waiting.tokens_used);
    assert!(!next.timers.iter().any(|t| t.kind == TimerKind::Approval));
    assert_eq!(granted.handovers[0].handover.agent, "valuation");

    let denied = at(
        Some(&waiting),
        &memory,
        &approval("approval.denied", "a2"),
        &topology,
        3_000,
    );
    assert_eq!(denied.state.expect("denied").state, "Rejected");

    let timed_out = fire_at(&waiting, &memory, &gate, &topology);
    assert_eq!(timed_out.outcome, Outcome::TimerFired(TimerKind::Approval));
    assert_eq!(timed_out.state.expect("answered").state, "Rejected");
}

#[test]
fn entering_an_approval_gate_says_waiting_for_approval() {
    let topology = topology();
    let (researching, memory) = fold(&[(event("d1", DOCUMENT, 10), 1_000)], &topology);
    let effects = at(
        Some(&researching),
        &memory,
        &event("d2", RESEARCH, 10),
        &topology,
        2_000,
    );
    let update = &effects.status_updates[0];
    assert_eq!(update.status, ContextStatus::Waiting);
    assert_eq!(update.message, "Waiting for approval");
}

#[test]
fn a_cancellation_ends_timers_tells_the_holders_and_parks_what_was_held() {
    let topology = topology();
    let (state, memory) = fold(
        &[
            (event("e1", VISION, 10), 1_000),
            (event("e2", RESEARCH, 10), 2_000),
        ],
        &topology,
    );
    // A screenshot failed: the valuation that arrives meanwhile is held.
    let mut failed = event("e3", SCREENSHOT, 10);
    failed.status = crate::event::ToolStatus::Error;
    let after_failure = at(Some(&state), &memory, &failed, &topology, 3_000)
        .state
        .expect("failure");
    let held = at(
        Some(&after_failure),
        &memory,
        &event("e4", VALUATION, 10),
        &topology,
        4_000,
    )
    .state
    .expect("held");
    assert_eq!(held.held.len(), 1);
    let cancel =
        ControlCommand::cancel("c-42", "cancel/c-42/1".into(), Some("customer left".into()));
    let effects = apply_command(
        Context {
            state: Some(&held),
            memory: &memory,
        },
        &cancel,
        &topology,
        &Policy::default(),
        5_000,
    );
    assert_eq!(effects.outcome, Outcome::CommandApplied);
    let cancelled = effects.state.expect("cancelled");
    assert_eq!(cancelled.state, crate::topology::CANCELLED_STATE);
    assert!(cancelled.timers.is_empty() && cancelled.held.is_empty());
    assert_eq!(effects.park.len(), 1);
    assert!(effects.release.is_empty());
    let told: Vec<_> = effects
        .handovers
        .iter()
        .map(|planned| (planned.handover.agent.as_str(), planned.handover.status))
        .collect();
    assert_eq!(told, [("valuation", HandoverStatus::Cancelled)]);
    assert_eq!(effects.status_updates[0].status, ContextStatus::Cancelled);
    assert!(effects.status_updates[0].message.contains("customer left"));
    // Cancelling again changes nothing.
    let again = apply_command(
        Context {
            state: Some(&cancelled),
            memory: &memory,
        },
        &cancel,
        &topology,
        &Policy::default(),
        6_000,
    );
    assert!(matches!(again.outcome, Outcome::CommandIgnored { .. }));
}
