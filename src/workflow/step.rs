//! The workflow's rules: `(state, event, topology, time) -> outcome`. The
//! plan around them (memory, bounds, held records, dead letters) is
//! [`super::plan`].
//!
//! The rules, in the order they are checked:
//!
//! 1. An `event_id` the context already applied is a [`StepOutcome::Duplicate`].
//! 2. An event no workflow mentions is [`StepOutcome::Unrouted`], bound or not:
//!    unrelated tool calls share the input topics and are not errors.
//! 3. An unbound context binds to the workflow its event names, or else to the
//!    one whose initial state the event leaves; its budget is the event's
//!    `token_budget`, or else the workflow default.
//! 4. A terminal state absorbs: every event is [`StepOutcome::Invalid`].
//! 5. A failed tool call never advances a workflow (see [`failed_tool`]).
//! 6. The event must trigger a transition from the current state, or stand in
//!    for a trigger through an alternate; otherwise it is invalid.
//! 7. The step debits the tokens used, bumps `version`, and then either moves
//!    to the budget-exhausted state (tokens used reached the budget), records a
//!    join arrival, or fires the transition.

use serde::{Deserialize, Serialize};

use super::state::{HeldRecord, PendingFailure, WorkflowState};
use super::timers::{Timer, TimerKind, holders};
use super::tokens::estimate_tokens;
use crate::control::{ControlAction, ControlCommand};
use crate::event::{ToolEvent, ToolStatus};
use crate::handover::{HandoverDraft, HandoverStatus};
use crate::topology::{
    APPROVAL_DENIED, APPROVAL_GRANTED, CANCELLED_STATE, HandoverTarget, OnTimeout, Topology,
    Transition, WorkflowDefinition, tool_of_event,
};

/// Where a context stands after a step, as the UI shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContextStatus {
    /// Handed over: an agent is working on it.
    Queued,
    /// Part of a join arrived; the rest has not.
    Waiting,
    /// A tool call failed; the healer decides what happens next.
    Retrying,
    /// A terminal state other than the budget and failure states.
    Completed,
    PlanB,
    BudgetExhausted,
    Failed,
    /// An operator cancelled the workflow.
    Cancelled,
}

impl ContextStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ContextStatus::Queued => "queued",
            ContextStatus::Waiting => "waiting",
            ContextStatus::Retrying => "retrying",
            ContextStatus::Completed => "completed",
            ContextStatus::PlanB => "plan_b",
            ContextStatus::BudgetExhausted => "budget_exhausted",
            ContextStatus::Failed => "failed",
            ContextStatus::Cancelled => "cancelled",
        }
    }
}

/// One state change, streamed to the UI ("Researcher is thinking...").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusUpdate {
    pub context_id: String,
    pub workflow: String,
    /// The state before the step; `None` when the step bound the context.
    pub from: Option<String>,
    pub to: String,
    /// The agent holding the context after the step.
    pub agent: Option<String>,
    pub status: ContextStatus,
    pub message: String,
    pub tokens_left: u64,
    /// The context's whole budget, so a UI can draw `tokens_left` as a bar.
    pub token_budget: u64,
    /// The input record's timestamp, in milliseconds.
    pub at: i64,
}

/// What the shell must do with one event.
// `Applied` is the common outcome, so boxing its state to shrink the rare
// ones would only add an allocation per event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    /// Write `state`, produce the handovers and status updates.
    Applied {
        state: WorkflowState,
        handovers: Vec<HandoverDraft>,
        status_updates: Vec<StatusUpdate>,
    },
    /// The `event_id` was already applied: nothing changes, nothing is emitted.
    Duplicate,
    /// No workflow mentions the event: count it and skip it.
    Unrouted,
    /// The event is impossible here: dead-letter it as `invalid_transition`;
    /// the state is unchanged.
    Invalid { reason: String },
    /// The event answers a step the context has left (a late answer, a
    /// second attempt's, or anything after a terminal state): count it and
    /// skip it; the state is unchanged.
    Stale { reason: String },
    /// The tool call failed: write `state` (the failure recorded, the lock
    /// released, the step unchanged), dead-letter the record as
    /// `tool_failed` with `failure`, and emit the status updates.
    ToolFailed {
        state: WorkflowState,
        failure: PendingFailure,
        status_updates: Vec<StatusUpdate>,
    },
    /// The context waits on the healer for an earlier failure: hold the
    /// record in its state until the healer's command is applied.
    Hold,
}

/// What the shell must do with one [`ControlCommand`].
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum CommandOutcome {
    /// Write `state`, produce the handovers and status updates, then process
    /// the `release`d records, in order, as if they arrived now.
    Applied {
        state: WorkflowState,
        handovers: Vec<HandoverDraft>,
        status_updates: Vec<StatusUpdate>,
        release: Vec<HeldRecord>,
        /// Records the context held that go to the parked topic (a
        /// cancellation's).
        park: Vec<HeldRecord>,
        /// What the handovers name as their cause: the failed call's
        /// `event_id`, the action and the attempt.
        causation_id: String,
    },
    /// Already applied, or answering a failure that is no longer pending:
    /// nothing changes. `duplicate` tells the two apart for metrics.
    Ignored { duplicate: bool, reason: String },
}

/// Applies `event` to a context's `state` (`None` for a context never seen).
/// `now_ms` is the input record's timestamp, so a replay computes the same result.
pub fn transition(
    state: Option<&WorkflowState>,
    event: &ToolEvent,
    topology: &Topology,
    now_ms: i64,
) -> StepOutcome {
    match state {
        Some(current) => step_bound(current, event, topology, now_ms),
        None => step_unbound(event, topology, now_ms),
    }
}

fn step_unbound(event: &ToolEvent, topology: &Topology, now_ms: i64) -> StepOutcome {
    if !topology.mentions(&event.event) {
        return StepOutcome::Unrouted;
    }
    let definition = match event.workflow.as_deref() {
        Some(name) => topology.workflow(name).ok_or_else(|| {
            format!(
                "`{}` asks for workflow `{name}`, which the topology does not define",
                event.event
            )
        }),
        None => topology.starting_with(&event.event).ok_or_else(|| {
            format!(
                "context `{}` is bound to no workflow, and `{}` starts none",
                event.context_id, event.event
            )
        }),
    };
    let definition = match definition {
        Ok(definition) => definition,
        Err(reason) => return invalid(reason),
    };
    let fresh = WorkflowState::bind(&event.context_id, definition, event.token_budget);
    if event.status == ToolStatus::Error {
        return fail_step(&fresh, None, definition, event, now_ms);
    }
    advance(&fresh, None, definition, event, now_ms)
}

fn step_bound(
    current: &WorkflowState,
    event: &ToolEvent,
    topology: &Topology,
    now_ms: i64,
) -> StepOutcome {
    if current.has_seen(&event.event_id) {
        return StepOutcome::Duplicate;
    }
    if !topology.mentions(&event.event) {
        return StepOutcome::Unrouted;
    }
    if current.failure.is_some() {
        return StepOutcome::Hold;
    }
    let Some(definition) = topology.workflow(&current.workflow) else {
        return invalid(format!(
            "context `{}` is bound to workflow `{}`, which the topology no longer defines",
            current.context_id, current.workflow
        ));
    };
    if let Some(asked) = event.workflow.as_deref()
        && asked != current.workflow
    {
        return invalid(format!(
            "`{}` asks for workflow `{asked}`, but context `{}` is bound to `{}`",
            event.event, current.context_id, current.workflow
        ));
    }
    if definition.is_terminal(&current.state) {
        let reason = format!(
            "context `{}` is in terminal state `{}` of workflow `{}`; terminal states absorb every event",
            current.context_id, current.state, current.workflow
        );
        return if definition.mentions(&event.event) {
            StepOutcome::Stale { reason }
        } else {
            invalid(reason)
        };
    }
    if event.status == ToolStatus::Error {
        return fail_step(current, Some(&current.state), definition, event, now_ms);
    }
    advance(current, Some(&current.state), definition, event, now_ms)
}

/// A failed tool call of the current step. It must not count as the tool's
/// completion (a failed screenshot cannot complete the join), so the state
/// stays on the step; the lock is released and the failure recorded, and the
/// shell dead-letters the record as `tool_failed` for the healer. The tokens
/// it reports were spent all the same, so they are debited; a failure that
/// uses up the budget ends the workflow like any other step would.
/// A failed call the current state does not wait for is an invalid transition.
fn fail_step(
    current: &WorkflowState,
    from: Option<&str>,
    definition: &WorkflowDefinition,
    event: &ToolEvent,
    now_ms: i64,
) -> StepOutcome {
    let Some(matched) = definition.match_trigger(&current.state, &event.event) else {
        return not_allowed_here(current, from, definition, event);
    };
    let mut next = current.clone();
    next.tokens_used = next.tokens_used.saturating_add(tokens_spent(event));
    next.version = next.version.saturating_add(1);
    next.updated_at = now_ms;
    next.remember(&event.event_id);
    if next.tokens_used >= next.token_budget {
        return exhaust(next, from, definition, matched.transition, now_ms);
    }
    let failure = PendingFailure {
        step: current.state.clone(),
        event: event.event.clone(),
        event_id: event.event_id.clone(),
        attempt: current.attempts,
        timed_out: false,
        locked_by: current.locked_by.clone(),
        at: now_ms,
    };
    next.locked_by = None;
    next.failure = Some(failure.clone());
    let detail = event
        .error
        .as_deref()
        .map(|error| format!(": {error}"))
        .unwrap_or_default();
    let message = format!(
        "{} failed (attempt {} of {}){detail}",
        tool_of_event(&event.event),
        current.attempts.max(1),
        definition.retry.max_attempts
    );
    let update = status_update(&next, from, ContextStatus::Retrying, message, now_ms);
    StepOutcome::ToolFailed {
        state: next,
        failure,
        status_updates: vec![update],
    }
}

/// Applies the healer's answer to a context's pending failure. See
/// [`CommandOutcome`]; the command's `attempt` must be the one after the
/// failed attempt, so a late or replayed command cannot act twice.
pub fn answer_command(
    state: Option<&WorkflowState>,
    command: &ControlCommand,
    topology: &Topology,
    now_ms: i64,
) -> CommandOutcome {
    let ignored = |duplicate: bool, reason: String| CommandOutcome::Ignored { duplicate, reason };
    let Some(current) = state else {
        return ignored(
            false,
            format!("context `{}` has no state", command.context_id),
        );
    };
    let command_key = command_key(&command.command_id);
    if current.has_seen(&command_key) {
        return ignored(
            true,
            format!("command `{}` was applied already", command.command_id),
        );
    }
    let Some(definition) = topology.workflow(&current.workflow) else {
        return ignored(
            false,
            format!("workflow `{}` is no longer defined", current.workflow),
        );
    };
    if command.action == ControlAction::Cancel {
        return cancel(current, definition, command, now_ms);
    }
    let Some(failure) = current.failure.as_ref() else {
        return ignored(
            false,
            format!("context `{}` has no failure pending", current.context_id),
        );
    };
    if failure.step != command.step || command.attempt != failure.attempt.saturating_add(1) {
        return ignored(
            false,
            format!(
                "command for step `{}` attempt {} does not answer the pending failure (step `{}`, attempt {})",
                command.step, command.attempt, failure.step, failure.attempt
            ),
        );
    }
    let mut next = current.clone();
    next.failure = None;
    let release = std::mem::take(&mut next.held);
    next.version = next.version.saturating_add(1);
    next.updated_at = now_ms;
    next.attempts = command.attempt;
    next.remember(&command_key);
    let from = Some(current.state.as_str());
    let tool = tool_of_event(&failure.event);

    let retry_target =
        || definition.retry_target(&failure.step, &failure.event, failure.locked_by.as_deref());
    let route = match command.action {
        ControlAction::Retry => retry_target().map(|target| {
            let message = format!(
                "{} is retrying {tool} (attempt {} of {})",
                capitalised(&target.agent),
                command.attempt,
                definition.retry.max_attempts
            );
            (
                target,
                HandoverStatus::Retrying,
                ContextStatus::Queued,
                message,
            )
        }),
        ControlAction::Alternate => definition.retry.alternate_for_tool(tool).map(|alternate| {
            let message = format!(
                "Falling back to {} for {tool}",
                capitalised(&alternate.agent)
            );
            (
                alternate.target(),
                HandoverStatus::Fallback,
                ContextStatus::Queued,
                message,
            )
        }),
        ControlAction::PlanB => definition.retry.plan_b.as_ref().map(|plan_b| {
            next.state = plan_b.state.clone();
            next.join_arrived.clear();
            let message = format!("Moved to {} after {tool} kept failing", plan_b.state);
            (
                plan_b.handover.clone(),
                HandoverStatus::PlanB,
                ContextStatus::PlanB,
                message,
            )
        }),
        ControlAction::Fail | ControlAction::Cancel => None,
    };
    let (handovers, update) = match route {
        Some((target, handover_status, status, message)) => {
            next.locked_by = Some(target.agent.clone());
            let handover = draft(definition, &target, handover_status, next.tokens_left());
            let update = status_update(&next, from, status, message, now_ms);
            (vec![handover], update)
        }
        // Asked to fail, or asked for a route this workflow does not have:
        // failing is the only move that cannot leave the context stuck.
        None => {
            next.state = definition.retry.failed_state.clone();
            next.locked_by = None;
            next.join_arrived.clear();
            let message = format!(
                "Failed: {tool} failed in {} after {} attempt(s)",
                failure.step,
                failure.attempt.max(1)
            );
            let update = status_update(&next, from, ContextStatus::Failed, message, now_ms);
            (Vec::new(), update)
        }
    };
    CommandOutcome::Applied {
        state: next,
        handovers,
        status_updates: vec![update],
        release,
        park: Vec::new(),
        causation_id: format!(
            "{}/{}/{}",
            failure.event_id,
            command.action.as_str(),
            command.attempt
        ),
    }
}

/// An operator's cancellation: the context moves to `Cancelled` (terminal)
/// whatever it waited for; the agents working on it get a `cancelled`
/// handover so they can stop, and the records it held are parked.
fn cancel(
    current: &WorkflowState,
    definition: &WorkflowDefinition,
    command: &ControlCommand,
    now_ms: i64,
) -> CommandOutcome {
    if definition.is_terminal(&current.state) {
        return CommandOutcome::Ignored {
            duplicate: current.state == CANCELLED_STATE,
            reason: format!(
                "context `{}` is already in terminal state `{}`",
                current.context_id, current.state
            ),
        };
    }
    let (mut next, handovers, park) = stop(
        current,
        definition,
        CANCELLED_STATE,
        HandoverStatus::Cancelled,
        now_ms,
    );
    next.remember(&command_key(&command.command_id));
    let message = match command.reason.as_deref() {
        Some(reason) if !reason.is_empty() => format!("Cancelled: {reason}"),
        _ => "Cancelled by an operator".to_owned(),
    };
    let update = status_update(
        &next,
        Some(&current.state),
        ContextStatus::Cancelled,
        message,
        now_ms,
    );
    CommandOutcome::Applied {
        state: next,
        handovers,
        status_updates: vec![update],
        release: Vec::new(),
        park,
        causation_id: format!("cancel/{}", command.command_id),
    }
}

/// How an applied command is remembered among the context's recent ids.
fn command_key(command_id: &str) -> String {
    format!("command:{command_id}")
}

/// Steps a bound context (`from` is `None` if it bound just now).
fn advance(
    current: &WorkflowState,
    from: Option<&str>,
    definition: &WorkflowDefinition,
    event: &ToolEvent,
    now_ms: i64,
) -> StepOutcome {
    let Some(matched) = definition.match_trigger(&current.state, &event.event) else {
        return not_allowed_here(current, from, definition, event);
    };
    let transition = matched.transition;
    let mut next = current.clone();
    if transition.is_join() {
        if current.join_arrived.contains(matched.trigger) {
            // The first completion of a call wins, whichever attempt sent
            // it: this one is a retry's (or the timed-out call's) answer.
            return StepOutcome::Stale {
                reason: format!(
                    "`{}` (event_id `{}`) arrives a second time for the join in state `{}` of workflow `{}`",
                    matched.trigger, event.event_id, current.state, definition.name
                ),
            };
        }
        next.join_arrived.insert(matched.trigger.to_owned());
    }
    next.tokens_used = next.tokens_used.saturating_add(tokens_spent(event));
    next.version = next.version.saturating_add(1);
    next.updated_at = now_ms;
    next.remember(&event.event_id);

    if next.tokens_used >= next.token_budget {
        return exhaust(next, from, definition, transition, now_ms);
    }
    let join_complete = transition
        .on
        .iter()
        .all(|trigger| next.join_arrived.contains(trigger));
    if transition.is_join() && !join_complete {
        return wait(next, from, transition, now_ms);
    }
    fire(next, from, definition, transition, now_ms)
}

/// What the step used: the reported usage, else an estimate of a tool's
/// output. A person's approval spends none.
fn tokens_spent(event: &ToolEvent) -> u64 {
    match event.usage {
        Some(usage) => usage.total(),
        None if event.event.starts_with("tool.") => estimate_tokens(&event.result),
        None => 0,
    }
}

fn fire(
    mut next: WorkflowState,
    from: Option<&str>,
    definition: &WorkflowDefinition,
    transition: &Transition,
    now_ms: i64,
) -> StepOutcome {
    next.state = transition.to.clone();
    next.locked_by = transition.locked_by.clone();
    next.join_arrived.clear();
    // A new step: dispatched once if it hands over, not at all otherwise.
    next.attempts = u32::from(!transition.handovers.is_empty());
    let tokens_left = next.tokens_left();
    let handovers = transition
        .handovers
        .iter()
        .map(|target| draft(definition, target, HandoverStatus::Queued, tokens_left))
        .collect();
    let mut status = status_of(definition, &transition.to);
    let message = match status {
        ContextStatus::Completed => "Completed".to_owned(),
        ContextStatus::Failed => "Failed".to_owned(),
        _ if definition.is_approval_gate(&transition.to) => {
            status = ContextStatus::Waiting;
            "Waiting for approval".to_owned()
        }
        _ => thinking_message(transition),
    };
    let update = status_update(&next, from, status, message, now_ms);
    StepOutcome::Applied {
        state: next,
        handovers,
        status_updates: vec![update],
    }
}

/// A join arrival that leaves others outstanding: recorded, no handover.
fn wait(
    next: WorkflowState,
    from: Option<&str>,
    transition: &Transition,
    now_ms: i64,
) -> StepOutcome {
    let missing: Vec<&str> = transition
        .on
        .iter()
        .filter(|trigger| !next.join_arrived.contains(*trigger))
        .map(|trigger| tool_of_event(trigger))
        .collect();
    let message = format!("Waiting for {}", human_list(&missing));
    // The step that dispatched the join is still running: `attempts` and
    // `locked_by` stay as they are.
    let update = status_update(&next, from, ContextStatus::Waiting, message, now_ms);
    StepOutcome::Applied {
        state: next,
        handovers: Vec::new(),
        status_updates: vec![update],
    }
}

/// The budget ran out on this step. The workflow stops: one final handover,
/// with status `budget_exhausted` and no tokens, goes to the first target of
/// the transition the event belongs to (the one it fired, or the join it
/// arrived for), so the agent that would have worked next learns why
/// nothing comes. A transition without handovers emits only the status update.
/// `attempts` is left as it was: the final handover asks for no work.
fn exhaust(
    mut next: WorkflowState,
    from: Option<&str>,
    definition: &WorkflowDefinition,
    transition: &Transition,
    now_ms: i64,
) -> StepOutcome {
    next.state = definition.budget.exhausted_state.clone();
    next.locked_by = None;
    next.join_arrived.clear();
    let handovers = transition
        .handovers
        .first()
        .map(|target| {
            draft(
                definition,
                target,
                HandoverStatus::BudgetExhausted,
                next.tokens_left(),
            )
        })
        .into_iter()
        .collect();
    let message = format!(
        "Token budget exhausted: {} of {} tokens used",
        next.tokens_used, next.token_budget
    );
    let update = status_update(&next, from, ContextStatus::BudgetExhausted, message, now_ms);
    StepOutcome::Applied {
        state: next,
        handovers,
        status_updates: vec![update],
    }
}

fn draft(
    definition: &WorkflowDefinition,
    target: &HandoverTarget,
    status: HandoverStatus,
    tokens_left: u64,
) -> HandoverDraft {
    HandoverDraft {
        topic: target.topic.clone(),
        agent: target.agent.clone(),
        intent: target.intent.clone(),
        workflow: definition.name.clone(),
        status,
        token_budget: Some(tokens_left),
    }
}

fn status_of(definition: &WorkflowDefinition, state: &str) -> ContextStatus {
    if state == CANCELLED_STATE {
        ContextStatus::Cancelled
    } else if state == definition.budget.exhausted_state {
        ContextStatus::BudgetExhausted
    } else if state == definition.retry.failed_state {
        ContextStatus::Failed
    } else if definition.is_terminal(state) {
        ContextStatus::Completed
    } else if definition
        .retry
        .plan_b
        .as_ref()
        .is_some_and(|plan_b| plan_b.state == state)
    {
        ContextStatus::PlanB
    } else {
        ContextStatus::Queued
    }
}

fn status_update(
    next: &WorkflowState,
    from: Option<&str>,
    status: ContextStatus,
    message: String,
    now_ms: i64,
) -> StatusUpdate {
    StatusUpdate {
        context_id: next.context_id.clone(),
        workflow: next.workflow.clone(),
        from: from.map(str::to_owned),
        to: next.state.clone(),
        agent: next.locked_by.clone(),
        status,
        message,
        tokens_left: next.tokens_left(),
        token_budget: next.token_budget,
        at: now_ms,
    }
}

/// "Researcher is thinking...", or "Valuation and Playwright are thinking...".
fn thinking_message(transition: &Transition) -> String {
    let mut agents: Vec<String> = Vec::new();
    for target in &transition.handovers {
        let name = capitalised(&target.agent);
        if !agents.contains(&name) {
            agents.push(name);
        }
    }
    if agents.is_empty() {
        agents.extend(transition.locked_by.as_deref().map(capitalised));
    }
    match agents.as_slice() {
        [] => format!("Moved to {}", transition.to),
        [only] => format!("{only} is thinking..."),
        several => {
            let names: Vec<&str> = several.iter().map(String::as_str).collect();
            format!("{} are thinking...", human_list(&names))
        }
    }
}

fn capitalised(name: &str) -> String {
    let mut chars = name.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// "a", "a and b", "a, b and c".
fn human_list(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [only] => (*only).to_owned(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

fn not_allowed(
    current: &WorkflowState,
    from: Option<&str>,
    definition: &WorkflowDefinition,
    event: &ToolEvent,
) -> String {
    let waits = definition.triggers_from(&current.state);
    let waits = if waits.is_empty() {
        "nothing".to_owned()
    } else {
        waits.join(", ")
    };
    match from {
        None => format!(
            "context `{}` is new, and `{}` does not start workflow `{}` (it starts on {waits})",
            current.context_id, event.event, definition.name
        ),
        Some(state) => format!(
            "`{}` is not allowed in state `{state}` of workflow `{}` (it waits for {waits})",
            event.event, definition.name
        ),
    }
}

fn invalid(reason: String) -> StepOutcome {
    StepOutcome::Invalid { reason }
}

/// An event the current state does not wait for: stale if it answers a
/// step the context has left, else invalid.
fn not_allowed_here(
    current: &WorkflowState,
    from: Option<&str>,
    definition: &WorkflowDefinition,
    event: &ToolEvent,
) -> StepOutcome {
    let reason = not_allowed(current, from, definition, event);
    if from.is_some()
        && definition.is_left_behind(&current.state, &event.event, &current.join_arrived)
    {
        StepOutcome::Stale { reason }
    } else {
        invalid(reason)
    }
}

/// What a heartbeat does.
// `Accepted` is the common outcome; boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum HeartbeatOutcome {
    /// From an agent working on the context: its heartbeat timer (if the
    /// state has one) starts again; `state` is set when it changed. The
    /// progress text goes to the live feed.
    Accepted {
        state: Option<WorkflowState>,
        status_update: StatusUpdate,
    },
    /// From an agent that does not hold the context, or for a context that
    /// is not working: counted and skipped.
    Ignored { reason: String },
}

/// An `agent.heartbeat` for `state`'s context, sent at `now_ms`.
pub fn heartbeat(
    state: Option<&WorkflowState>,
    event: &ToolEvent,
    topology: &Topology,
    now_ms: i64,
) -> HeartbeatOutcome {
    let ignored = |reason: String| HeartbeatOutcome::Ignored { reason };
    let Some(current) = state else {
        return ignored(format!("context `{}` has no state", event.context_id));
    };
    let Some(definition) = topology.workflow(&current.workflow) else {
        return ignored(format!(
            "workflow `{}` is no longer defined",
            current.workflow
        ));
    };
    let Some(agent) = event.agent.as_deref() else {
        return ignored("the heartbeat names no `agent`".to_owned());
    };
    if definition.is_terminal(&current.state) || !holders(current).contains(&agent) {
        return ignored(format!(
            "`{agent}` does not hold context `{}` (state `{}`)",
            current.context_id, current.state
        ));
    }
    let mut next = None;
    if let Some(limit) = definition
        .settings(&current.state)
        .and_then(|settings| settings.heartbeat_timeout)
    {
        let mut moved = current.clone();
        for timer in moved.timers.iter_mut().filter(|timer| {
            timer.kind == TimerKind::Heartbeat
                && timer.step == current.state
                && timer.agent.as_deref() == Some(agent)
        }) {
            timer.due_at = now_ms.saturating_add(limit.as_millis());
        }
        if moved.timers != current.timers {
            moved.version = moved.version.saturating_add(1);
            next = Some(moved);
        }
    }
    let message = match event.progress.as_deref() {
        Some(progress) if !progress.is_empty() => {
            format!("{}: {progress}", capitalised(agent))
        }
        _ => format!("{} is working...", capitalised(agent)),
    };
    let shown = next.as_ref().unwrap_or(current);
    let mut update = status_update(
        shown,
        Some(&current.state),
        status_of(definition, &current.state),
        message,
        now_ms,
    );
    update.agent = Some(agent.to_owned());
    HeartbeatOutcome::Accepted {
        state: next,
        status_update: update,
    }
}

/// What a due timer does to its context.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum TimerOutcome {
    /// The call timed out (or missed its heartbeat): handled like a failed
    /// call. Write `state`, dead-letter a `step_timed_out` record with
    /// `failure`, emit the status updates.
    TimedOut {
        state: WorkflowState,
        failure: PendingFailure,
        status_updates: Vec<StatusUpdate>,
    },
    /// The timer moved the workflow (a deadline, an approval's default):
    /// as an applied step. `release` are held records to step next.
    Applied {
        state: WorkflowState,
        handovers: Vec<HandoverDraft>,
        status_updates: Vec<StatusUpdate>,
        release: Vec<HeldRecord>,
    },
    /// Due while the context waits on the healer for another failure: fires
    /// again at `state`'s new due time.
    Postponed { state: WorkflowState },
    /// The context no longer holds this timer (it completed, moved on, or
    /// the timer already fired): nothing happens.
    Stale,
}

/// How long a timer due while the context waits on the healer is put off.
pub const POSTPONE_MS: i64 = 1_000;

/// Fires `timer` on its context. The firing's time is the timer's own due
/// time, so a firing repeated after an abort plans the same outputs.
pub fn fire_timer(
    state: Option<&WorkflowState>,
    timer: &Timer,
    topology: &Topology,
) -> TimerOutcome {
    let Some(current) = state else {
        return TimerOutcome::Stale;
    };
    if !current.timers.contains(timer) {
        return TimerOutcome::Stale;
    }
    let Some(definition) = topology.workflow(&current.workflow) else {
        return TimerOutcome::Stale;
    };
    let at = timer.due_at;
    match timer.kind {
        TimerKind::Step | TimerKind::Heartbeat => {
            if timer.step != current.state {
                return TimerOutcome::Stale;
            }
            if current.failure.is_some() {
                let mut next = current.clone();
                for due in next.timers.iter_mut().filter(|t| *t == timer) {
                    due.due_at = at.saturating_add(POSTPONE_MS);
                }
                next.version = next.version.saturating_add(1);
                return TimerOutcome::Postponed { state: next };
            }
            time_out(current, definition, timer)
        }
        TimerKind::Deadline => deadline_passed(current, definition, at),
        TimerKind::Approval => {
            let on_timeout = definition
                .settings(&timer.step)
                .and_then(|settings| settings.on_timeout)
                .unwrap_or(OnTimeout::Deny);
            if timer.step != current.state {
                return TimerOutcome::Stale;
            }
            match on_timeout {
                OnTimeout::PlanB => route_plan_b(
                    current,
                    definition,
                    at,
                    format!(
                        "Moved to PlanB: nobody answered the approval in {}",
                        timer.step
                    ),
                ),
                OnTimeout::Deny | OnTimeout::Approve => {
                    let answer = if on_timeout == OnTimeout::Deny {
                        APPROVAL_DENIED
                    } else {
                        APPROVAL_GRANTED
                    };
                    let event = ToolEvent {
                        event_id: timer.firing_id(&current.context_id),
                        context_id: current.context_id.clone(),
                        event: answer.to_owned(),
                        result: serde_json::json!({
                            "approver": "baton",
                            "reason": format!("nobody answered within the approval's timeout ({})", on_timeout_label(on_timeout)),
                        }),
                        ..ToolEvent::default()
                    };
                    match advance(current, Some(&current.state), definition, &event, at) {
                        StepOutcome::Applied {
                            state,
                            handovers,
                            status_updates,
                        } => TimerOutcome::Applied {
                            state,
                            handovers,
                            status_updates,
                            release: Vec::new(),
                        },
                        // Validation makes an approval gate wait for both answers.
                        _ => TimerOutcome::Stale,
                    }
                }
            }
        }
    }
}

fn on_timeout_label(on_timeout: OnTimeout) -> &'static str {
    match on_timeout {
        OnTimeout::Deny => "denied",
        OnTimeout::Approve => "approved",
        OnTimeout::PlanB => "plan B",
    }
}

/// A call that took too long: the lock is released, the attempt recorded,
/// and the healer decides, as for a failed call.
fn time_out(
    current: &WorkflowState,
    definition: &WorkflowDefinition,
    timer: &Timer,
) -> TimerOutcome {
    let at = timer.due_at;
    let agent = timer.agent.clone();
    let mut next = current.clone();
    next.version = next.version.saturating_add(1);
    next.updated_at = at;
    next.timers.retain(|t| {
        !(matches!(t.kind, TimerKind::Step | TimerKind::Heartbeat)
            && t.step == timer.step
            && t.agent == agent)
    });
    let failure = PendingFailure {
        step: current.state.clone(),
        event: timer.event.clone().unwrap_or_default(),
        event_id: timer.firing_id(&current.context_id),
        attempt: timer.attempt,
        timed_out: true,
        locked_by: agent.clone(),
        at,
    };
    next.locked_by = None;
    next.failure = Some(failure.clone());
    let who = agent
        .as_deref()
        .map_or_else(|| "The agent".to_owned(), capitalised);
    let what = if timer.kind == TimerKind::Heartbeat {
        "missed its heartbeat"
    } else {
        "timed out"
    };
    let message = format!(
        "{who} {what} (attempt {} of {})",
        timer.attempt.max(1),
        definition.retry.max_attempts
    );
    let update = status_update(
        &next,
        Some(&current.state),
        ContextStatus::Retrying,
        message,
        at,
    );
    TimerOutcome::TimedOut {
        state: next,
        failure,
        status_updates: vec![update],
    }
}

/// The workflow's deadline passed: PlanB if it has one (and is not there
/// yet), else the failed state, with a final handover to whoever works on it.
fn deadline_passed(
    current: &WorkflowState,
    definition: &WorkflowDefinition,
    at: i64,
) -> TimerOutcome {
    let in_plan_b = definition
        .retry
        .plan_b
        .as_ref()
        .is_some_and(|plan_b| plan_b.state == current.state);
    if definition.retry.plan_b.is_some() && !in_plan_b {
        return route_plan_b(
            current,
            definition,
            at,
            "Moved to PlanB: the workflow passed its deadline".to_owned(),
        );
    }
    let (next, handovers, release) = stop(
        current,
        definition,
        &definition.retry.failed_state,
        HandoverStatus::Failed,
        at,
    );
    let update = status_update(
        &next,
        Some(&current.state),
        ContextStatus::Failed,
        "Failed: the workflow passed its deadline".to_owned(),
        at,
    );
    TimerOutcome::Applied {
        state: next,
        handovers,
        status_updates: vec![update],
        release,
    }
}

/// Stops the workflow in the terminal state `to`, whatever it waited for:
/// no lock, no failure, no timers. Returns the new state, a final handover
/// of `status` to each agent working on it (so it can stop), and the
/// records it held.
fn stop(
    current: &WorkflowState,
    definition: &WorkflowDefinition,
    to: &str,
    status: HandoverStatus,
    at: i64,
) -> (WorkflowState, Vec<HandoverDraft>, Vec<HeldRecord>) {
    let mut next = current.clone();
    next.state = to.to_owned();
    next.locked_by = None;
    next.failure = None;
    next.join_arrived.clear();
    next.timers.clear();
    next.version = next.version.saturating_add(1);
    next.updated_at = at;
    let held = std::mem::take(&mut next.held);
    let handovers = holders(current)
        .into_iter()
        .filter_map(|agent| handover_target_for(definition, &current.state, agent))
        .map(|target| draft(definition, &target, status, next.tokens_left()))
        .collect();
    (next, handovers, held)
}

/// Moves the context to its workflow's PlanB route (a deadline, or an
/// approval nobody gave); a pending failure is moot then, and the records
/// it held are released.
fn route_plan_b(
    current: &WorkflowState,
    definition: &WorkflowDefinition,
    at: i64,
    message: String,
) -> TimerOutcome {
    let Some(plan_b) = &definition.retry.plan_b else {
        return deadline_passed(current, definition, at);
    };
    let mut next = current.clone();
    next.state = plan_b.state.clone();
    next.locked_by = Some(plan_b.handover.agent.clone());
    next.failure = None;
    next.join_arrived.clear();
    next.attempts = 1;
    next.version = next.version.saturating_add(1);
    next.updated_at = at;
    let release = std::mem::take(&mut next.held);
    let handover = draft(
        definition,
        &plan_b.handover,
        HandoverStatus::PlanB,
        next.tokens_left(),
    );
    let update = status_update(
        &next,
        Some(&current.state),
        ContextStatus::PlanB,
        message,
        at,
    );
    TimerOutcome::Applied {
        state: next,
        handovers: vec![handover],
        status_updates: vec![update],
        release,
    }
}

/// The handover target that dispatched `agent` into `state`.
fn handover_target_for(
    definition: &WorkflowDefinition,
    state: &str,
    agent: &str,
) -> Option<HandoverTarget> {
    definition
        .transitions
        .iter()
        .filter(|transition| transition.to == state)
        .flat_map(|transition| transition.handovers.iter())
        .find(|target| target.agent == agent)
        .cloned()
        .or_else(|| {
            definition
                .retry
                .alternates
                .iter()
                .find(|alternate| alternate.agent == agent)
                .map(|alternate| alternate.target())
        })
        .or_else(|| {
            definition
                .retry
                .plan_b
                .as_ref()
                .filter(|plan_b| plan_b.handover.agent == agent)
                .map(|plan_b| plan_b.handover.clone())
        })
}
