//! Timers: the deadlines a context waits on, kept in its state.
//!
//! Silence is noticed the way events are: every deadline is a [`Timer`] in
//! the context's [`WorkflowState`], written with it in the same transaction
//! and changelog record. The task keeps an index of them by due time and
//! fires the due ones by wall clock (see `runtime::timers`); what a firing
//! does is decided here and in [`super::plan::fire`], as purely as a step.
//!
//! Which timers a context holds follows from its state, so they are set and
//! deleted in one place, [`reconcile`], after every step:
//! - a workflow `deadline` is set when the context binds;
//! - a state's `timeout` and `heartbeat_timeout` start for each agent a
//!   handover dispatches in that state (an alternate may have its own);
//! - an approval gate's `timeout` starts when the context enters it;
//! - a completion (or failure) ends the timers of the agent that sent it;
//! - leaving a state ends its timers, and a terminal state ends them all.

use serde::{Deserialize, Serialize};

use super::state::WorkflowState;
use crate::handover::{HandoverDraft, HandoverStatus};
use crate::topology::{Timeout, WorkflowDefinition, tool_completed_event};

/// What a timer times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimerKind {
    /// Start-to-close of one agent's call.
    Step,
    /// The gap since the agent's last heartbeat.
    Heartbeat,
    /// The whole workflow, from its first event.
    Deadline,
    /// An approval gate nobody answered.
    Approval,
}

impl TimerKind {
    pub const ALL: [TimerKind; 4] = [
        TimerKind::Step,
        TimerKind::Heartbeat,
        TimerKind::Deadline,
        TimerKind::Approval,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TimerKind::Step => "step",
            TimerKind::Heartbeat => "heartbeat",
            TimerKind::Deadline => "deadline",
            TimerKind::Approval => "approval",
        }
    }
}

/// One deadline of one context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timer {
    pub kind: TimerKind,
    /// Milliseconds since the epoch at which it is due.
    pub due_at: i64,
    /// The state it belongs to; empty for the workflow deadline.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub step: String,
    /// The agent whose call it times (step and heartbeat timers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The event that agent's call completes with, when the workflow says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// The dispatch it times (the context's `attempts` then).
    #[serde(default)]
    pub attempt: u32,
}

impl Timer {
    /// Unique within a context: the index and a firing name a timer by it.
    pub fn key(&self) -> String {
        match self.kind {
            TimerKind::Deadline => "deadline".to_owned(),
            TimerKind::Approval => format!("approval/{}", self.step),
            kind => format!(
                "{}/{}/{}",
                kind.as_str(),
                self.step,
                self.agent.as_deref().unwrap_or_default()
            ),
        }
    }

    /// The id a firing gives what it causes (a dead letter, a handover): a
    /// function of the timer's identity, not of when it came due, so a
    /// firing repeated after an abort, or postponed, yields the same ids.
    pub fn firing_id(&self, context_id: &str) -> String {
        format!("timer:{context_id}:{}:{}", self.key(), self.attempt)
    }

    fn is_step_call(&self) -> bool {
        matches!(self.kind, TimerKind::Step | TimerKind::Heartbeat)
    }
}

/// What arrived for the step, ending the call of whoever sent it: the
/// event's own name and the trigger it counts as.
#[derive(Debug, Clone, Copy)]
pub struct Arrival<'a> {
    pub event: &'a str,
    pub trigger: &'a str,
}

/// Brings `after.timers` in line with the step that led from `before` to
/// `after`: see the module documentation. `dispatched` are the handovers
/// the step sends; `now_ms` is the step's time.
pub fn reconcile(
    definition: &WorkflowDefinition,
    before: Option<&WorkflowState>,
    after: &mut WorkflowState,
    dispatched: &[HandoverDraft],
    arrival: Option<Arrival<'_>>,
    now_ms: i64,
) {
    if definition.is_terminal(&after.state) {
        after.timers.clear();
        return;
    }
    if before.is_none()
        && let Some(deadline) = definition.deadline
    {
        after.timers.push(Timer {
            kind: TimerKind::Deadline,
            due_at: now_ms.saturating_add(deadline.as_millis()),
            step: String::new(),
            agent: None,
            event: None,
            attempt: 0,
        });
    }
    let entered = before.is_none_or(|before| before.state != after.state);
    if entered {
        after
            .timers
            .retain(|timer| timer.kind == TimerKind::Deadline);
        if let Some(settings) = definition.settings(&after.state)
            && definition.is_approval_gate(&after.state)
            && let Some(timeout) = settings.timeout
        {
            after.timers.push(Timer {
                kind: TimerKind::Approval,
                due_at: now_ms.saturating_add(timeout.as_millis()),
                step: after.state.clone(),
                agent: None,
                event: None,
                attempt: 0,
            });
        }
    }
    if let Some(arrival) = arrival {
        after.timers.retain(|timer| {
            !(timer.is_step_call()
                && timer
                    .event
                    .as_deref()
                    .is_some_and(|event| event == arrival.event || event == arrival.trigger))
        });
    }
    for draft in dispatched
        .iter()
        .filter(|draft| asks_for_work(draft.status))
    {
        let state = after.state.clone();
        after.timers.retain(|timer| {
            !(timer.is_step_call()
                && timer.step == state
                && timer.agent.as_deref() == Some(draft.agent.as_str()))
        });
        let (timeout, heartbeat) = timeouts_of(definition, &state, draft);
        let event = expected_event(definition, &state, draft);
        for (kind, limit) in [
            (TimerKind::Step, timeout),
            (TimerKind::Heartbeat, heartbeat),
        ] {
            if let Some(limit) = limit {
                after.timers.push(Timer {
                    kind,
                    due_at: now_ms.saturating_add(limit.as_millis()),
                    step: state.clone(),
                    agent: Some(draft.agent.clone()),
                    event: event.clone(),
                    attempt: after.attempts,
                });
            }
        }
    }
    sort(&mut after.timers);
}

/// Timers in key order, so equal sets encode to equal bytes.
pub fn sort(timers: &mut [Timer]) {
    timers.sort_by_cached_key(Timer::key);
}

/// A handover that asks its agent to work (and so starts its timers).
fn asks_for_work(status: HandoverStatus) -> bool {
    matches!(
        status,
        HandoverStatus::Queued
            | HandoverStatus::Retrying
            | HandoverStatus::Fallback
            | HandoverStatus::PlanB
    )
}

/// The timeouts of a call dispatched in `state`: an alternate's own, else
/// the state's.
fn timeouts_of(
    definition: &WorkflowDefinition,
    state: &str,
    draft: &HandoverDraft,
) -> (Option<Timeout>, Option<Timeout>) {
    // An approval gate's timeout is the approval's, not an agent's.
    if definition.is_approval_gate(state) {
        return (None, None);
    }
    let settings = definition.settings(state);
    let state_timeout = settings.and_then(|s| s.timeout);
    let state_heartbeat = settings.and_then(|s| s.heartbeat_timeout);
    match alternate_of(definition, draft) {
        Some(alternate) => (
            alternate.timeout.or(state_timeout),
            alternate.heartbeat_timeout.or(state_heartbeat),
        ),
        None => (state_timeout, state_heartbeat),
    }
}

fn alternate_of<'a>(
    definition: &'a WorkflowDefinition,
    draft: &HandoverDraft,
) -> Option<&'a crate::topology::Alternate> {
    definition
        .retry
        .alternates
        .iter()
        .find(|alternate| alternate.agent == draft.agent && alternate.topic == draft.topic)
}

/// The event the dispatched agent's call completes with: an alternate's
/// own completion event; the tool its handover target declares; or the
/// one trigger that leaves `state`.
pub fn expected_event(
    definition: &WorkflowDefinition,
    state: &str,
    draft: &HandoverDraft,
) -> Option<String> {
    if let Some(alternate) = alternate_of(definition, draft) {
        return Some(alternate.completion_event.clone());
    }
    let declared = definition
        .transitions
        .iter()
        .filter(|transition| transition.to == state)
        .flat_map(|transition| transition.handovers.iter())
        .find(|target| target.agent == draft.agent && target.intent == draft.intent)
        .and_then(|target| target.tool.as_deref());
    if let Some(tool) = declared {
        return Some(tool_completed_event(tool));
    }
    match definition.triggers_from(state).as_slice() {
        [only] => Some((*only).to_owned()),
        _ => None,
    }
}

/// When the dispatched agent's time is up: its own start-to-close timer,
/// or the workflow's deadline, whichever comes first.
pub fn deadline_for(state: &WorkflowState, agent: &str) -> Option<i64> {
    state
        .timers
        .iter()
        .filter(|timer| {
            timer.kind == TimerKind::Deadline
                || (timer.kind == TimerKind::Step
                    && timer.step == state.state
                    && timer.agent.as_deref() == Some(agent))
        })
        .map(|timer| timer.due_at)
        .min()
}

/// The agents working on the context's current step: those with a timer
/// running in it, and the one that holds the lock.
pub fn holders(state: &WorkflowState) -> Vec<&str> {
    let mut agents: Vec<&str> = state
        .timers
        .iter()
        .filter(|timer| timer.is_step_call() && timer.step == state.state)
        .filter_map(|timer| timer.agent.as_deref())
        .chain(state.locked_by.as_deref())
        .collect();
    agents.sort_unstable();
    agents.dedup();
    agents
}

/// What changed between two timer sets: the timers to add to the index
/// and those to remove from it (a moved timer is both).
pub fn changes(before: &[Timer], after: &[Timer]) -> (Vec<Timer>, Vec<Timer>) {
    let same = |a: &Timer, b: &Timer| a.key() == b.key() && a.due_at == b.due_at;
    let set = after
        .iter()
        .filter(|timer| !before.iter().any(|old| same(old, timer)))
        .cloned()
        .collect();
    let deleted = before
        .iter()
        .filter(|timer| !after.iter().any(|new| same(new, timer)))
        .cloned()
        .collect();
    (set, deleted)
}
