use std::path::Path;

use serde_json::{Value, json};

use super::*;
use crate::control::{ControlAction, ControlCommand};
use crate::event::{ToolEvent, ToolStatus, Usage};
use crate::handover::{HandoverDraft, HandoverStatus};
use crate::topology::Topology;

pub(super) fn topology() -> Topology {
    Topology::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("topology/vision-research.toml"))
        .expect("shipped topology")
}

fn with_linear_review() -> Topology {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut definitions: Vec<_> = topology().workflows().cloned().collect();
    let linear =
        Topology::load(&root.join("tests/topologies/no-fallback.toml")).expect("no-fallback");
    definitions.extend(linear.workflows().cloned());
    Topology::from_definitions(definitions).expect("both together")
}

pub(super) fn event(id: &str, name: &str, tokens: u64) -> ToolEvent {
    ToolEvent {
        event_id: id.into(),
        context_id: "c-42".into(),
        event: name.into(),
        server_id: None,
        tool: None,
        arguments: Value::Null,
        result: json!({"ok": true}),
        usage: Some(Usage {
            input_tokens: tokens,
            output_tokens: 0,
        }),
        token_budget: None,
        occurred_at: None,
        correlation_id: None,
        workflow: None,
        status: ToolStatus::Ok,
        error: None,
        agent: None,
        progress: None,
    }
}

const VISION: &str = "tool.vision_analyze.completed";
const RESEARCH: &str = "tool.research_enrich.completed";
const VALUATION: &str = "tool.valuation_estimate.completed";
const SCREENSHOT: &str = "tool.browser_take_screenshot.completed";
const FETCH_PAGE: &str = "tool.fetch_page.completed";

struct Applied {
    state: WorkflowState,
    handovers: Vec<HandoverDraft>,
    status_updates: Vec<StatusUpdate>,
}

fn applied(outcome: StepOutcome) -> Applied {
    match outcome {
        StepOutcome::Applied {
            state,
            handovers,
            status_updates,
        } => Applied {
            state,
            handovers,
            status_updates,
        },
        other => panic!("expected Applied, got {other:?}"),
    }
}

fn invalid_reason(outcome: StepOutcome) -> String {
    match outcome {
        StepOutcome::Invalid { reason } => reason,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn stale_reason(outcome: StepOutcome) -> String {
    match outcome {
        StepOutcome::Stale { reason } => reason,
        other => panic!("expected Stale, got {other:?}"),
    }
}

fn queued(agent: &str, intent: &str, tokens_left: u64) -> HandoverDraft {
    HandoverDraft {
        topic: format!("mcp.handover.{agent}"),
        agent: agent.into(),
        intent: intent.into(),
        workflow: "vision-research".into(),
        status: HandoverStatus::Queued,
        token_budget: Some(tokens_left),
    }
}

/// Runs the first two steps: the context ends in `DownstreamQueued`.
pub(super) fn downstream(topology: &Topology) -> WorkflowState {
    let first = applied(transition(None, &event("e1", VISION, 1000), topology, 10));
    applied(transition(
        Some(&first.state),
        &event("e2", RESEARCH, 2000),
        topology,
        20,
    ))
    .state
}

#[test]
fn binds_on_the_initial_event_with_the_default_budget() {
    let topology = topology();
    let step = applied(transition(
        None,
        &event("e1", VISION, 1000),
        &topology,
        1_700_000_000_000,
    ));
    assert_eq!(step.state.workflow, "vision-research");
    assert_eq!(step.state.state, "ResearcherQueued");
    assert_eq!(step.state.locked_by.as_deref(), Some("researcher"));
    assert_eq!(step.state.attempts, 1);
    assert_eq!(step.state.token_budget, 20_000);
    assert_eq!(step.state.tokens_used, 1000);
    assert_eq!(step.state.version, 1);
    assert_eq!(step.state.updated_at, 1_700_000_000_000);
    assert_eq!(
        step.handovers,
        [queued("researcher", "enrich_reasoning", 19_000)]
    );
    assert_eq!(
        step.status_updates,
        [StatusUpdate {
            context_id: "c-42".into(),
            workflow: "vision-research".into(),
            from: None,
            to: "ResearcherQueued".into(),
            agent: Some("researcher".into()),
            status: ContextStatus::Queued,
            message: "Researcher is thinking...".into(),
            tokens_left: 19_000,
            token_budget: 20_000,
            at: 1_700_000_000_000,
        }]
    );
}

#[test]
fn binds_with_the_budget_and_workflow_the_event_names() {
    let topology = topology();
    let mut first = event("e1", VISION, 100);
    first.token_budget = Some(500);
    first.workflow = Some("vision-research".into());
    let step = applied(transition(None, &first, &topology, 0));
    assert_eq!(step.state.token_budget, 500);
    assert_eq!(step.handovers[0].token_budget, Some(400));

    let mut unknown = event("e1", VISION, 100);
    unknown.workflow = Some("vision-search".into());
    let reason = invalid_reason(super::transition(None, &unknown, &topology, 0));
    assert!(reason.contains("workflow `vision-search`"), "{reason}");
}

#[test]
fn an_event_that_starts_nothing_is_invalid_for_an_unknown_context() {
    let topology = topology();
    let reason = invalid_reason(transition(None, &event("e1", RESEARCH, 10), &topology, 0));
    assert_eq!(
        reason,
        "context `c-42` is bound to no workflow, and `tool.research_enrich.completed` starts none"
    );
    let mut named = event("e1", RESEARCH, 10);
    named.workflow = Some("vision-research".into());
    let reason = invalid_reason(transition(None, &named, &topology, 0));
    assert!(
        reason.contains("does not start workflow `vision-research`"),
        "{reason}"
    );
}

#[test]
fn unmentioned_events_are_unrouted_bound_or_not() {
    let topology = topology();
    let noise = event("n1", "tool.calendar_lookup.completed", 10);
    assert_eq!(
        transition(None, &noise, &topology, 0),
        StepOutcome::Unrouted
    );
    let mut named_noise = noise.clone();
    named_noise.workflow = Some("vision-research".into());
    assert_eq!(
        transition(None, &named_noise, &topology, 0),
        StepOutcome::Unrouted
    );
    let bound = applied(transition(None, &event("e1", VISION, 10), &topology, 0)).state;
    assert_eq!(
        transition(Some(&bound), &noise, &topology, 0),
        StepOutcome::Unrouted
    );
}

#[test]
fn fans_out_to_valuation_and_playwright() {
    let topology = topology();
    let first = applied(transition(None, &event("e1", VISION, 1000), &topology, 10));
    let second = applied(transition(
        Some(&first.state),
        &event("e2", RESEARCH, 2000),
        &topology,
        20,
    ));
    assert_eq!(second.state.state, "DownstreamQueued");
    assert_eq!(second.state.locked_by.as_deref(), Some("valuation"));
    assert_eq!(second.state.version, 2);
    assert_eq!(
        second.handovers,
        [
            queued("valuation", "estimate_value", 17_000),
            queued("playwright", "capture_evidence", 17_000),
        ]
    );
    assert_eq!(
        second.status_updates[0].message,
        "Valuation and Playwright are thinking..."
    );
    assert_eq!(
        second.status_updates[0].from.as_deref(),
        Some("ResearcherQueued")
    );
}

#[test]
fn the_join_completes_in_either_order() {
    let topology = topology();
    for order in [[VALUATION, SCREENSHOT], [SCREENSHOT, VALUATION]] {
        let start = downstream(&topology);
        let arrival = applied(transition(
            Some(&start),
            &event("j1", order[0], 500),
            &topology,
            30,
        ));
        assert_eq!(arrival.state.state, "DownstreamQueued");
        assert!(arrival.handovers.is_empty());
        assert_eq!(arrival.state.attempts, start.attempts);
        assert_eq!(arrival.state.version, 3);
        assert_eq!(arrival.state.tokens_used, 3500);
        assert_eq!(arrival.status_updates[0].status, ContextStatus::Waiting);
        let missing = order[1]
            .trim_start_matches("tool.")
            .trim_end_matches(".completed");
        assert_eq!(
            arrival.status_updates[0].message,
            format!("Waiting for {missing}")
        );

        let done = applied(transition(
            Some(&arrival.state),
            &event("j2", order[1], 500),
            &topology,
            40,
        ));
        assert_eq!(done.state.state, "Completed");
        assert_eq!(done.state.locked_by.as_deref(), Some("reporter"));
        assert!(done.state.join_arrived.is_empty());
        assert_eq!(done.state.tokens_used, 4000);
        assert_eq!(done.state.version, 4);
        assert_eq!(done.handovers, [queued("reporter", "summarize", 16_000)]);
        assert_eq!(done.status_updates[0].status, ContextStatus::Completed);
        assert_eq!(done.status_updates[0].message, "Completed");
    }
}

#[test]
fn fetch_page_stands_in_for_the_screenshot() {
    let topology = topology();
    let start = downstream(&topology);
    let fetched = applied(transition(
        Some(&start),
        &event("j1", FETCH_PAGE, 300),
        &topology,
        30,
    ));
    assert!(fetched.state.join_arrived.contains(SCREENSHOT));
    // The screenshot's own late answer: the fetcher's came first and won.
    let late_screenshot = stale_reason(transition(
        Some(&fetched.state),
        &event("j2", SCREENSHOT, 1),
        &topology,
        40,
    ));
    assert!(
        late_screenshot.contains("arrives a second time"),
        "{late_screenshot}"
    );
    let done = applied(transition(
        Some(&fetched.state),
        &event("j3", VALUATION, 300),
        &topology,
        50,
    ));
    assert_eq!(done.state.state, "Completed");
    assert_eq!(done.handovers.len(), 1);
}

#[test]
fn a_second_arrival_of_a_join_event_is_stale() {
    let topology = topology();
    let start = downstream(&topology);
    let first = applied(transition(
        Some(&start),
        &event("j1", VALUATION, 300),
        &topology,
        30,
    ));
    // The first completion of a call wins, whichever attempt sent it.
    let reason = stale_reason(transition(
        Some(&first.state),
        &event("j2", VALUATION, 300),
        &topology,
        40,
    ));
    assert_eq!(
        reason,
        "`tool.valuation_estimate.completed` (event_id `j2`) arrives a second time for the join in state \
         `DownstreamQueued` of workflow `vision-research`"
    );
}

#[test]
fn events_for_a_step_left_behind_are_stale_and_events_for_a_step_ahead_invalid() {
    let topology = topology();
    let start = downstream(&topology);
    // The context has left the step a vision event answers.
    let reason = stale_reason(transition(
        Some(&start),
        &event("x", VISION, 1),
        &topology,
        30,
    ));
    assert_eq!(
        reason,
        "`tool.vision_analyze.completed` is not allowed in state `DownstreamQueued` of workflow \
         `vision-research` (it waits for tool.valuation_estimate.completed, tool.browser_take_screenshot.completed)"
    );
    // A screenshot while the researcher still works: no state the context
    // has been in waits for it.
    let researching = applied(transition(None, &event("e1", VISION, 10), &topology, 10)).state;
    let reason = invalid_reason(transition(
        Some(&researching),
        &event("y", SCREENSHOT, 1),
        &topology,
        20,
    ));
    assert!(
        reason.contains("not allowed in state `ResearcherQueued`"),
        "{reason}"
    );
}

#[test]
fn duplicates_change_nothing_and_emit_nothing() {
    let topology = topology();
    let first = applied(transition(None, &event("e1", VISION, 1000), &topology, 10));
    assert_eq!(
        transition(
            Some(&first.state),
            &event("e1", VISION, 1000),
            &topology,
            11
        ),
        StepOutcome::Duplicate
    );
    // The id decides, not the event: a replay under the same id is a duplicate too.
    assert_eq!(
        transition(Some(&first.state), &event("e1", RESEARCH, 1), &topology, 11),
        StepOutcome::Duplicate
    );
}

#[test]
fn terminal_states_absorb() {
    let topology = topology();
    let start = downstream(&topology);
    let half = applied(transition(
        Some(&start),
        &event("j1", VALUATION, 1),
        &topology,
        30,
    ))
    .state;
    let done = applied(transition(
        Some(&half),
        &event("j2", SCREENSHOT, 1),
        &topology,
        40,
    ))
    .state;
    // Counted and skipped, never dead-lettered.
    let reason = stale_reason(transition(
        Some(&done),
        &event("late", VALUATION, 1),
        &topology,
        50,
    ));
    assert!(reason.contains("terminal state `Completed`"), "{reason}");
    assert_eq!(
        transition(Some(&done), &event("j2", SCREENSHOT, 1), &topology, 50),
        StepOutcome::Duplicate
    );
}

#[test]
fn a_failed_tool_call_records_the_failure_and_stays_on_the_step() {
    let topology = topology();
    let start = downstream(&topology);
    let mut failed = event("j1", SCREENSHOT, 10);
    failed.status = ToolStatus::Error;
    failed.error = Some("timeout".into());
    let StepOutcome::ToolFailed {
        state,
        failure,
        status_updates,
    } = transition(Some(&start), &failed, &topology, 30)
    else {
        panic!("a tool failure")
    };
    assert_eq!(state.state, "DownstreamQueued");
    assert_eq!(state.locked_by, None, "the lock is released");
    assert_eq!(state.attempts, 1);
    assert_eq!(
        state.tokens_used,
        start.tokens_used + 10,
        "its tokens were spent"
    );
    assert_eq!(state.version, start.version + 1);
    assert!(state.join_arrived.is_empty(), "a failure is no arrival");
    assert_eq!(
        failure,
        PendingFailure {
            step: "DownstreamQueued".into(),
            event: SCREENSHOT.into(),
            event_id: "j1".into(),
            attempt: 1,
            timed_out: false,
            locked_by: Some("valuation".into()),
            at: 30,
        }
    );
    assert_eq!(state.failure.as_ref(), Some(&failure));
    assert_eq!(status_updates[0].status, ContextStatus::Retrying);
    assert_eq!(
        status_updates[0].message,
        "browser_take_screenshot failed (attempt 1 of 3): timeout"
    );
    // A failed call for a step the context has left is stale.
    let mut stray = event("x1", VISION, 10);
    stray.status = ToolStatus::Error;
    let reason = stale_reason(transition(Some(&start), &stray, &topology, 30));
    assert!(
        reason.contains("not allowed in state `DownstreamQueued`"),
        "{reason}"
    );
}

pub(super) fn failed_downstream(topology: &Topology) -> WorkflowState {
    let mut failed = event("j1", SCREENSHOT, 10);
    failed.status = ToolStatus::Error;
    match transition(Some(&downstream(topology)), &failed, topology, 30) {
        StepOutcome::ToolFailed { state, .. } => state,
        other => panic!("a tool failure, not {other:?}"),
    }
}

pub(super) fn command(action: ControlAction, attempt: u32) -> ControlCommand {
    ControlCommand {
        command_id: format!("mcp.events.dlq/0/{attempt}"),
        context_id: "c-42".into(),
        action,
        step: "DownstreamQueued".into(),
        attempt,
        dlq_topic: "mcp.events.dlq".into(),
        dlq_partition: 0,
        dlq_offset: i64::from(attempt),
        not_before: None,
        reason: None,
    }
}

fn applied_command(
    outcome: CommandOutcome,
) -> (
    WorkflowState,
    Vec<HandoverDraft>,
    Vec<StatusUpdate>,
    Vec<HeldRecord>,
) {
    match outcome {
        CommandOutcome::Applied {
            state,
            handovers,
            status_updates,
            release,
            ..
        } => (state, handovers, status_updates, release),
        other => panic!("expected Applied, got {other:?}"),
    }
}

#[test]
fn later_events_are_held_while_a_failure_is_pending() {
    let topology = topology();
    let failed = failed_downstream(&topology);
    assert_eq!(
        transition(Some(&failed), &event("v1", VALUATION, 10), &topology, 40),
        StepOutcome::Hold
    );
    // Duplicates and unrelated events are not held.
    assert_eq!(
        transition(Some(&failed), &event("j1", SCREENSHOT, 10), &topology, 40),
        StepOutcome::Duplicate
    );
    assert_eq!(
        transition(
            Some(&failed),
            &event("u1", "tool.unrelated.completed", 10),
            &topology,
            40
        ),
        StepOutcome::Unrouted
    );
}

#[test]
fn a_retry_hands_the_step_back_to_the_tool_s_agent_and_releases_held_records() {
    let topology = topology();
    let mut failed = failed_downstream(&topology);
    let held = HeldRecord {
        topic: "mcp.events.all".into(),
        partition: 0,
        offset: 7,
        timestamp_ms: 40,
        key: Some(b"c-42".to_vec()),
        value: Some(b"{}".to_vec()),
    };
    failed.held.push(held.clone());
    let (state, handovers, updates, release) = applied_command(answer_command(
        Some(&failed),
        &command(ControlAction::Retry, 2),
        &topology,
        50,
    ));
    assert_eq!(state.attempts, 2);
    assert_eq!(state.failure, None);
    assert!(state.held.is_empty());
    assert_eq!(release, [held]);
    assert_eq!(state.locked_by.as_deref(), Some("playwright"));
    assert_eq!(state.state, "DownstreamQueued");
    assert_eq!(handovers.len(), 1);
    assert_eq!(handovers[0].agent, "playwright");
    assert_eq!(handovers[0].status, HandoverStatus::Retrying);
    assert_eq!(
        updates[0].message,
        "Playwright is retrying browser_take_screenshot (attempt 2 of 3)"
    );
    // Delivered twice: no effect the second time.
    let again = answer_command(
        Some(&state),
        &command(ControlAction::Retry, 2),
        &topology,
        60,
    );
    assert!(
        matches!(
            again,
            CommandOutcome::Ignored {
                duplicate: true,
                ..
            }
        ),
        "{again:?}"
    );
    // A command for an attempt that is not pending is stale.
    let stale = answer_command(
        Some(&failed),
        &command(ControlAction::Retry, 5),
        &topology,
        60,
    );
    assert!(
        matches!(
            stale,
            CommandOutcome::Ignored {
                duplicate: false,
                ..
            }
        ),
        "{stale:?}"
    );
}

#[test]
fn alternate_plan_b_and_fail_route_the_workflow() {
    let topology = topology();
    let failed = failed_downstream(&topology);
    let (state, handovers, _, _) = applied_command(answer_command(
        Some(&failed),
        &command(ControlAction::Alternate, 2),
        &topology,
        50,
    ));
    assert_eq!(handovers[0].agent, "fetcher");
    assert_eq!(handovers[0].intent, "fetch_page");
    assert_eq!(handovers[0].status, HandoverStatus::Fallback);
    assert_eq!(state.locked_by.as_deref(), Some("fetcher"));

    let (state, handovers, updates, _) = applied_command(answer_command(
        Some(&failed),
        &command(ControlAction::PlanB, 2),
        &topology,
        50,
    ));
    assert_eq!(state.state, "PlanB");
    assert_eq!(handovers[0].agent, "researcher");
    assert_eq!(handovers[0].intent, "plan_b_manual_review");
    assert_eq!(handovers[0].status, HandoverStatus::PlanB);
    assert_eq!(updates[0].status, ContextStatus::PlanB);

    let (state, handovers, updates, _) = applied_command(answer_command(
        Some(&failed),
        &command(ControlAction::Fail, 2),
        &topology,
        50,
    ));
    assert_eq!(state.state, "Failed");
    assert_eq!(state.locked_by, None);
    assert!(handovers.is_empty());
    assert_eq!(updates[0].status, ContextStatus::Failed);
}

#[test]
fn state_with_a_pending_failure_and_held_bytes_round_trips() {
    let topology = topology();
    let mut failed = failed_downstream(&topology);
    failed.held.push(HeldRecord {
        topic: "mcp.events.all".into(),
        partition: 1,
        offset: 9,
        timestamp_ms: 40,
        key: None,
        value: Some(vec![0, 1, 2, 255]),
    });
    assert_eq!(
        WorkflowState::decode(&failed.encode()).expect("decodes"),
        failed
    );
}

#[test]
fn a_context_stays_in_its_workflow() {
    let topology = with_linear_review();
    let bound = applied(transition(None, &event("e1", VISION, 10), &topology, 0)).state;
    let mut other = event("e2", RESEARCH, 10);
    other.workflow = Some("linear-review".into());
    let reason = invalid_reason(transition(Some(&bound), &other, &topology, 0));
    assert!(reason.contains("bound to `vision-research`"), "{reason}");
    let foreign = event("e3", "tool.review_check.completed", 10);
    let reason = invalid_reason(transition(Some(&bound), &foreign, &topology, 0));
    assert!(
        reason.contains("not allowed in state `ResearcherQueued`"),
        "{reason}"
    );
}

#[test]
fn a_transition_without_handovers_dispatches_nothing() {
    let topology = with_linear_review();
    let drafted = applied(transition(
        None,
        &event("e1", "tool.draft_write.completed", 10),
        &topology,
        0,
    ));
    assert_eq!(drafted.state.workflow, "linear-review");
    assert_eq!(drafted.state.token_budget, 5000);
    let done = applied(transition(
        Some(&drafted.state),
        &event("e2", "tool.review_check.completed", 10),
        &topology,
        1,
    ));
    assert_eq!(done.state.state, "Done");
    assert_eq!(done.state.attempts, 0);
    assert_eq!(done.state.locked_by, None);
    assert!(done.handovers.is_empty());
    assert_eq!(done.status_updates[0].status, ContextStatus::Completed);
}

#[test]
fn exhausting_the_budget_on_a_transition_stops_the_workflow() {
    let topology = topology();
    let mut first = event("e1", VISION, 1000);
    first.token_budget = Some(2500);
    let first = applied(transition(None, &first, &topology, 10));
    let out = applied(transition(
        Some(&first.state),
        &event("e2", RESEARCH, 1600),
        &topology,
        20,
    ));
    assert_eq!(out.state.state, "BudgetExhausted");
    assert_eq!(out.state.locked_by, None);
    assert_eq!(out.state.tokens_used, 2600);
    assert_eq!(out.state.tokens_left(), 0);
    assert_eq!(out.state.attempts, 1);
    assert_eq!(
        out.handovers,
        [HandoverDraft {
            status: HandoverStatus::BudgetExhausted,
            ..queued("valuation", "estimate_value", 0)
        }]
    );
    let update = &out.status_updates[0];
    assert_eq!(update.status, ContextStatus::BudgetExhausted);
    assert_eq!(
        update.message,
        "Token budget exhausted: 2600 of 2500 tokens used"
    );
    assert_eq!(update.tokens_left, 0);

    // The valuation already under way when the budget ran out: stale.
    let reason = stale_reason(transition(
        Some(&out.state),
        &event("j1", VALUATION, 0),
        &topology,
        30,
    ));
    assert!(
        reason.contains("terminal state `BudgetExhausted`"),
        "{reason}"
    );
}

#[test]
fn exhausting_the_budget_on_a_join_arrival_tells_the_join_target() {
    let topology = topology();
    let start = downstream(&topology);
    let out = applied(transition(
        Some(&start),
        &event("j1", SCREENSHOT, 17_000),
        &topology,
        30,
    ));
    assert_eq!(out.state.state, "BudgetExhausted");
    assert!(out.state.join_arrived.is_empty());
    assert_eq!(
        out.handovers,
        [HandoverDraft {
            status: HandoverStatus::BudgetExhausted,
            ..queued("reporter", "summarize", 0)
        }]
    );
}

#[test]
fn missing_usage_is_estimated_with_the_tokenizer() {
    let topology = topology();
    let mut first = event("e1", VISION, 0);
    first.usage = None;
    first.result = json!("hello world");
    let out = applied(transition(None, &first, &topology, 0));
    assert_eq!(out.state.tokens_used, 2);
    assert_eq!(out.handovers[0].token_budget, Some(19_998));
}

#[test]
fn a_zero_budget_is_exhausted_by_the_first_event() {
    let topology = topology();
    let mut first = event("e1", VISION, 0);
    first.token_budget = Some(0);
    let out = applied(transition(None, &first, &topology, 0));
    assert_eq!(out.state.state, "BudgetExhausted");
    assert_eq!(out.state.attempts, 0);
    assert_eq!(out.status_updates[0].from, None);
    assert_eq!(out.handovers[0].status, HandoverStatus::BudgetExhausted);
}

#[test]
fn recent_event_ids_are_bounded() {
    let topology = topology();
    let mut state = applied(transition(None, &event("e1", VISION, 0), &topology, 0)).state;
    for index in 0..100 {
        state.remember(&format!("id-{index}"));
    }
    assert_eq!(state.recent_event_ids.len(), RECENT_EVENT_IDS);
    assert!(!state.has_seen("id-0"));
    assert!(state.has_seen("id-99"));
}

#[test]
fn state_round_trips_through_its_encoding() {
    let topology = topology();
    let start = downstream(&topology);
    let half = applied(transition(
        Some(&start),
        &event("j1", VALUATION, 1),
        &topology,
        30,
    ))
    .state;
    let bytes = half.encode();
    assert!(
        bytes.starts_with(br#"{"v":1,"#),
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    assert_eq!(WorkflowState::decode(&bytes).expect("decode"), half);
}

/// Bytes exactly as baton's first state encoding wrote them. If this test
/// breaks, a deployed baton could no longer read its own RocksDB stores and
/// changelogs: add a decoder for the old layout instead of editing this.
const STATE_V1: &[u8] = br#"{"v":1,"context_id":"c-42","workflow":"vision-research","state":"DownstreamQueued","locked_by":"valuation","attempts":1,"token_budget":20000,"tokens_used":3001,"version":3,"updated_at":1700000000030,"join_arrived":["tool.valuation_estimate.completed"],"recent_event_ids":["e1","e2","j1"]}"#;

#[test]
fn decodes_version_1_bytes() {
    let state = WorkflowState::decode(STATE_V1).expect("v1 decodes");
    assert_eq!(state.context_id, "c-42");
    assert_eq!(state.state, "DownstreamQueued");
    assert_eq!(state.locked_by.as_deref(), Some("valuation"));
    assert_eq!(state.tokens_left(), 16_999);
    assert_eq!(state.version, 3);
    assert_eq!(state.updated_at, 1_700_000_000_030);
    assert!(state.join_arrived.contains(VALUATION));
    assert!(state.has_seen("j1"));
    // And the step continues from it.
    let done = applied(transition(
        Some(&state),
        &event("j2", SCREENSHOT, 1),
        &topology(),
        40,
    ));
    assert_eq!(done.state.state, "Completed");
}

#[test]
fn rejects_unversioned_and_future_state() {
    assert!(matches!(
        WorkflowState::decode(br#"{"context_id":"c"}"#),
        Err(StateDecodeError::MissingVersion)
    ));
    assert!(matches!(
        WorkflowState::decode(br#"{"v":99}"#),
        Err(StateDecodeError::UnsupportedVersion { found: 99 })
    ));
    assert!(matches!(
        WorkflowState::decode(b"not json"),
        Err(StateDecodeError::Malformed(_))
    ));
    assert!(matches!(
        WorkflowState::decode(br#"{"v":1}"#),
        Err(StateDecodeError::Malformed(_))
    ));
}
