//! The whole plan for one input: [`Effects`].
//!
//! The shell loads a context (its workflow state and its memory), hands it
//! here with the input, and gets back everything that must happen: the new
//! state and memory (with the snapshot it freezes and the snapshots it
//! prunes), the handovers with their ids, the live-feed updates, the dead
//! letter with every header, and the held records to release. The shell only
//! encodes, sizes and sends; a test oracle is a fold over these functions.
//!
//! The rules of the workflow itself (transitions, joins, budgets, failures)
//! live in [`super::step`]; this module adds what surrounds a step: the
//! bounds on a context, its memory, and the records it holds.

use serde_json::Value;

use super::state::{HeldRecord, WorkflowState};
use super::step::{
    CommandOutcome, HeartbeatOutcome, StatusUpdate, StepOutcome, TimerOutcome, answer_command,
    fire_timer, heartbeat, transition,
};
use super::timers::{self, Arrival, Timer, TimerKind};
use crate::control::ControlCommand;
use crate::dlq::{ErrorClass, headers};
use crate::event::{SourceCoordinates, ToolEvent};
use crate::handover::{Handover, HandoverDraft};
use crate::memory::{Memory, MemoryUpsert, RawJson, ToolOutput};
use crate::topology::{HEARTBEAT_EVENT, Topology};

/// The bounds and settings the plan obeys; each is a flag of `baton run`.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Set when handovers carry memory snapshots.
    pub snapshots: Option<SnapshotPolicy>,
    /// Records a context may hold while the healer decides on its failure;
    /// past it, a record is dead-lettered as `held_overflow`.
    pub max_held_records: usize,
    /// The bytes (keys and values) those held records may take.
    pub max_held_bytes: usize,
    /// The encoded size a context's live memory may reach. Past it the
    /// oldest tool outputs go first (the newest stays); an input that still
    /// does not fit is dead-lettered as `memory_overflow`.
    pub max_memory_bytes: usize,
    /// The longest `context_id` accepted, in bytes.
    pub max_context_id_bytes: usize,
}

/// How long frozen snapshots live, and how many a context keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotPolicy {
    pub retention_ms: i64,
    pub max_per_context: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            snapshots: Some(SnapshotPolicy {
                retention_ms: 24 * 3600 * 1000,
                max_per_context: 16,
            }),
            max_held_records: DEFAULT_MAX_HELD_RECORDS,
            max_held_bytes: DEFAULT_MAX_HELD_BYTES,
            max_memory_bytes: DEFAULT_MAX_MEMORY_BYTES,
            max_context_id_bytes: DEFAULT_MAX_CONTEXT_ID_BYTES,
        }
    }
}

/// Defaults for the bounds: a held record is stored hex-encoded in the
/// workflow state, so 256 KiB held stays well inside a 1 MB changelog record.
pub const DEFAULT_MAX_HELD_RECORDS: usize = 100;
pub const DEFAULT_MAX_HELD_BYTES: usize = 256 * 1024;
pub const DEFAULT_MAX_MEMORY_BYTES: usize = 512 * 1024;
pub const DEFAULT_MAX_CONTEXT_ID_BYTES: usize = 1024;

/// A context as the shell loaded it. `memory` is empty for a context that
/// never wrote any.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub state: Option<&'a WorkflowState>,
    pub memory: &'a Memory,
}

/// The input record: where it came from (its identity: derived ids and dead
/// letters point there) and its bytes, which a held record keeps.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub source: &'a SourceCoordinates,
    pub timestamp_ms: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
}

/// What became of an input, for metrics and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The step applied: state and memory change, handovers may go out.
    Applied,
    /// The `event_id` was applied before.
    Duplicate,
    /// No workflow mentions the event.
    Unrouted,
    /// The context waits on the healer; the record is held in its state.
    Held,
    /// The tool call failed: recorded, and dead-lettered for the healer.
    ToolFailed,
    /// The input is set aside as a dead letter of this class; nothing else
    /// changes.
    DeadLettered(ErrorClass),
    /// A `memory.upserted` record joined the context's memory.
    Remembered,
    /// A healer command applied.
    CommandApplied,
    /// A healer command that was applied already, or answers nothing pending.
    CommandIgnored { duplicate: bool, reason: String },
    /// The event answers a step the context has left: counted, skipped.
    Stale,
    /// An `agent.heartbeat`, from the agent holding the context or not.
    Heartbeat { accepted: bool },
    /// A due timer fired.
    TimerFired(TimerKind),
    /// A timer the context no longer holds came due: its index entry goes.
    TimerStale,
}

/// Everything one input causes. Empty fields mean "nothing of this kind".
#[derive(Debug, Clone, PartialEq)]
pub struct Effects {
    pub outcome: Outcome,
    /// The context's new workflow state.
    pub state: Option<WorkflowState>,
    pub memory: Option<MemoryWrite>,
    pub handovers: Vec<PlannedHandover>,
    pub status_updates: Vec<StatusUpdate>,
    /// The input itself goes to the DLQ with this class, reason and headers.
    pub dead_letter: Option<DeadLetterPlan>,
    /// Records the context held, to be stepped next, in this order, as if
    /// they arrived now.
    pub release: Vec<HeldRecord>,
    /// Records the context held, to be parked (a cancelled context's).
    pub park: Vec<HeldRecord>,
    /// How the partition's timer index changes.
    pub timers: TimerChanges,
}

/// Timers to add to the partition's index and timers to remove from it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TimerChanges {
    pub set: Vec<Timer>,
    pub deleted: Vec<Timer>,
}

impl TimerChanges {
    fn between(before: Option<&WorkflowState>, after: Option<&WorkflowState>) -> TimerChanges {
        let none: &[Timer] = &[];
        let before = before.map_or(none, |state| state.timers.as_slice());
        let Some(after) = after else {
            return TimerChanges::default();
        };
        let (set, deleted) = timers::changes(before, &after.timers);
        TimerChanges { set, deleted }
    }
}

/// A context's memory after the input, with the snapshots it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryWrite {
    pub live: Memory,
    /// The version of the snapshot frozen for this input's handovers.
    pub frozen: Option<u64>,
    /// Snapshot versions pruned by this input, oldest first.
    pub pruned: Vec<u64>,
}

/// A handover, complete but for what only the shell knows: the signed URL of
/// `snapshot` (its version) and the wall-clock `produced_at`.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedHandover {
    pub topic: String,
    pub handover: Handover,
    pub snapshot: Option<u64>,
}

/// Why the input goes to the DLQ, with the headers that tell the healer
/// what to do. The shell adds the bytes, coordinates and time.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterPlan {
    pub class: ErrorClass,
    pub reason: String,
    pub headers: Vec<(&'static str, String)>,
}

impl Effects {
    fn only(outcome: Outcome) -> Effects {
        Effects {
            outcome,
            state: None,
            memory: None,
            handovers: Vec::new(),
            status_updates: Vec::new(),
            dead_letter: None,
            release: Vec::new(),
            park: Vec::new(),
            timers: TimerChanges::default(),
        }
    }

    /// The input is dead-lettered and nothing else happens.
    pub fn dead_letter(class: ErrorClass, reason: String) -> Effects {
        Effects {
            dead_letter: Some(DeadLetterPlan {
                class,
                reason,
                headers: Vec::new(),
            }),
            ..Effects::only(Outcome::DeadLettered(class))
        }
    }
}

/// Applies a tool event (or a heartbeat, or an approval) to its context.
pub fn step(
    context: Context<'_>,
    event: &ToolEvent,
    input: Input<'_>,
    topology: &Topology,
    policy: &Policy,
    now_ms: i64,
) -> Effects {
    if let Err(reason) = check_context_id(&event.context_id, policy) {
        return Effects::dead_letter(ErrorClass::InvalidContextId, reason);
    }
    if event.event == HEARTBEAT_EVENT {
        return beat(context, event, topology, now_ms);
    }
    // A timed-out call's answer wins while its step is still current: the
    // failure it left pending is moot, and the records held meanwhile go on.
    let late = context
        .state
        .and_then(|current| late_answer(current, event, topology));
    let base = late
        .as_ref()
        .map_or(context.state, |(cleared, _)| Some(cleared));
    let mut effects = match transition(base, event, topology, now_ms) {
        StepOutcome::Applied {
            mut state,
            handovers: drafts,
            status_updates,
        } => {
            reconcile_after(
                topology,
                base,
                &mut state,
                &drafts,
                Some(&event.event),
                now_ms,
            );
            let mut memory = context.memory.clone();
            let mut pruned = match record_output(&mut memory, event, now_ms, policy) {
                Ok(pruned) => pruned,
                Err(reason) => return Effects::dead_letter(ErrorClass::MemoryOverflow, reason),
            };
            let frozen = if drafts.is_empty() {
                None
            } else {
                freeze(&mut memory, policy, now_ms, &mut pruned)
            };
            let handovers = drafts
                .iter()
                .map(|draft| PlannedHandover {
                    topic: draft.topic.clone(),
                    handover: stamped(
                        Handover::from_draft(draft, event, None, String::new()),
                        &state,
                    ),
                    snapshot: frozen,
                })
                .collect();
            Effects {
                state: Some(state),
                memory: Some(MemoryWrite {
                    live: memory,
                    frozen,
                    pruned,
                }),
                handovers,
                status_updates,
                release: late.map(|(_, held)| held).unwrap_or_default(),
                ..Effects::only(Outcome::Applied)
            }
        }
        StepOutcome::Duplicate => Effects::only(Outcome::Duplicate),
        StepOutcome::Unrouted => Effects::only(Outcome::Unrouted),
        StepOutcome::Stale { .. } => Effects::only(Outcome::Stale),
        StepOutcome::Invalid { reason } => {
            Effects::dead_letter(ErrorClass::InvalidTransition, reason)
        }
        StepOutcome::ToolFailed {
            mut state,
            failure,
            status_updates,
        } => {
            reconcile_after(topology, base, &mut state, &[], Some(&event.event), now_ms);
            let mut memory = context.memory.clone();
            let pruned = match record_output(&mut memory, event, now_ms, policy) {
                Ok(pruned) => pruned,
                Err(reason) => return Effects::dead_letter(ErrorClass::MemoryOverflow, reason),
            };
            let headers = failure_headers(&state, &failure);
            let detail = event
                .error
                .as_deref()
                .map(|error| format!(": {error}"))
                .unwrap_or_default();
            Effects {
                state: Some(state),
                memory: Some(MemoryWrite {
                    live: memory,
                    frozen: None,
                    pruned,
                }),
                status_updates,
                dead_letter: Some(DeadLetterPlan {
                    class: ErrorClass::ToolFailed,
                    reason: format!("tool call `{}` failed{detail}", failure.event),
                    headers,
                }),
                ..Effects::only(Outcome::ToolFailed)
            }
        }
        StepOutcome::Hold => match context.state {
            Some(current) => hold(current, input, policy),
            // `transition` holds only for a context with a pending failure.
            None => Effects::dead_letter(
                ErrorClass::InvalidTransition,
                format!("context `{}` has no state to hold in", event.context_id),
            ),
        },
    };
    effects.timers = TimerChanges::between(context.state, effects.state.as_ref());
    effects
}

/// The headers a failed (or timed-out) call's dead letter carries for the
/// healer: workflow, step, attempts, the failed event and who held it.
fn failure_headers(
    state: &WorkflowState,
    failure: &super::state::PendingFailure,
) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        (headers::WORKFLOW, state.workflow.clone()),
        (headers::STEP, failure.step.clone()),
        (headers::ATTEMPTS, failure.attempt.to_string()),
        (headers::FAILED_EVENT, failure.event.clone()),
    ];
    if let Some(agent) = &failure.locked_by {
        headers.push((headers::LOCKED_BY, agent.clone()));
    }
    headers
}

/// `current` without its timed-out failure, and the records it held, when
/// `event` is the answer of the call that timed out and its step is still
/// the current one.
fn late_answer(
    current: &WorkflowState,
    event: &ToolEvent,
    topology: &Topology,
) -> Option<(WorkflowState, Vec<HeldRecord>)> {
    let failure = current
        .failure
        .as_ref()
        .filter(|failure| failure.timed_out)?;
    let definition = topology.workflow(&current.workflow)?;
    let matched = definition.match_trigger(&current.state, &event.event)?;
    let answers = failure.step == current.state
        && (failure.event.is_empty()
            || failure.event == event.event
            || failure.event == matched.trigger
            || definition.satisfies(&event.event, &failure.event));
    if !answers || current.has_seen(&event.event_id) {
        return None;
    }
    let mut cleared = current.clone();
    cleared.failure = None;
    let held = std::mem::take(&mut cleared.held);
    Some((cleared, held))
}

/// Sets and deletes the context's timers after a step (see [`timers`]).
fn reconcile_after(
    topology: &Topology,
    before: Option<&WorkflowState>,
    after: &mut WorkflowState,
    drafts: &[HandoverDraft],
    arrived: Option<&str>,
    now_ms: i64,
) {
    let Some(definition) = topology.workflow(&after.workflow) else {
        return;
    };
    let from = before.map_or(definition.initial.as_str(), |state| state.state.as_str());
    let trigger = arrived.and_then(|event| {
        definition
            .match_trigger(from, event)
            .map(|matched| matched.trigger.to_owned())
    });
    let arrival = arrived.map(|event| Arrival {
        event,
        trigger: trigger.as_deref().unwrap_or(event),
    });
    timers::reconcile(definition, before, after, drafts, arrival, now_ms);
}

/// A handover with what only the context's state after the step knows:
/// which dispatch it is, and when the agent's time is up.
fn stamped(mut handover: Handover, state: &WorkflowState) -> Handover {
    handover.attempt = state.attempts;
    handover.deadline_at = timers::deadline_for(state, &handover.agent).and_then(rfc3339_of_ms);
    handover
}

/// Epoch milliseconds as RFC 3339 text (no clock is read).
pub fn rfc3339_of_ms(ms: i64) -> Option<String> {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()?;
    at.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// An `agent.heartbeat`: the holder's heartbeat timer starts again and its
/// progress reaches the live feed; anyone else's is counted and skipped.
fn beat(context: Context<'_>, event: &ToolEvent, topology: &Topology, now_ms: i64) -> Effects {
    match heartbeat(context.state, event, topology, now_ms) {
        HeartbeatOutcome::Accepted {
            state,
            status_update,
        } => {
            let timers = TimerChanges::between(context.state, state.as_ref());
            Effects {
                state,
                status_updates: vec![status_update],
                timers,
                ..Effects::only(Outcome::Heartbeat { accepted: true })
            }
        }
        HeartbeatOutcome::Ignored { .. } => Effects::only(Outcome::Heartbeat { accepted: false }),
    }
}

/// Fires a due `timer` on its context. Its time is the timer's due time,
/// so repeating a firing (after an abort) plans the same outputs; the shell
/// passes the firing's own coordinates as `input`.
pub fn fire(context: Context<'_>, timer: &Timer, topology: &Topology, policy: &Policy) -> Effects {
    let at = timer.due_at;
    let mut effects = match fire_timer(context.state, timer, topology) {
        TimerOutcome::Stale => Effects {
            timers: TimerChanges {
                set: Vec::new(),
                deleted: vec![timer.clone()],
            },
            ..Effects::only(Outcome::TimerStale)
        },
        TimerOutcome::Postponed { state } => Effects {
            state: Some(state),
            ..Effects::only(Outcome::TimerFired(timer.kind))
        },
        TimerOutcome::TimedOut {
            state,
            failure,
            status_updates,
        } => {
            let class = ErrorClass::StepTimedOut;
            let what = if timer.kind == TimerKind::Heartbeat {
                "sent no heartbeat within its heartbeat_timeout"
            } else {
                "did not complete within its timeout"
            };
            let reason = format!(
                "`{}` {what} in `{}` (attempt {}), due at {}",
                failure.locked_by.as_deref().unwrap_or("the agent"),
                failure.step,
                failure.attempt,
                rfc3339_of_ms(at).unwrap_or_else(|| at.to_string())
            );
            let headers = failure_headers(&state, &failure);
            Effects {
                state: Some(state),
                status_updates,
                dead_letter: Some(DeadLetterPlan {
                    class,
                    reason,
                    headers,
                }),
                ..Effects::only(Outcome::TimerFired(timer.kind))
            }
        }
        TimerOutcome::Applied {
            mut state,
            handovers: drafts,
            status_updates,
            release,
        } => {
            state.timers.retain(|held| held != timer);
            reconcile_after(topology, context.state, &mut state, &drafts, None, at);
            let causation_id = timer.firing_id(&state.context_id);
            let mut effects = dispatching(
                context.memory,
                state,
                &drafts,
                status_updates,
                &causation_id,
                policy,
                at,
                Outcome::TimerFired(timer.kind),
            );
            effects.release = release;
            effects
        }
    };
    if effects.state.is_some() {
        effects.timers = TimerChanges::between(context.state, effects.state.as_ref());
    }
    effects
}

/// The effects of a step caused by something other than a tool event (a
/// healer command, a timer): the handovers name `causation_id` and carry
/// the context's newest tool output, with a snapshot frozen for them.
#[allow(clippy::too_many_arguments)]
fn dispatching(
    memory: &Memory,
    state: WorkflowState,
    drafts: &[HandoverDraft],
    status_updates: Vec<StatusUpdate>,
    causation_id: &str,
    policy: &Policy,
    now_ms: i64,
    outcome: Outcome,
) -> Effects {
    let mut memory = memory.clone();
    let mut pruned = Vec::new();
    let frozen = if drafts.is_empty() || policy.snapshots.is_none() {
        None
    } else {
        freeze(&mut memory, policy, now_ms, &mut pruned)
    };
    let last_output = memory.last_tool_output().unwrap_or(Value::Null);
    let handovers = drafts
        .iter()
        .map(|draft| PlannedHandover {
            topic: draft.topic.clone(),
            handover: stamped(
                Handover::for_command(
                    draft,
                    &state.context_id,
                    causation_id,
                    last_output.clone(),
                    None,
                    String::new(),
                ),
                &state,
            ),
            snapshot: frozen,
        })
        .collect();
    let memory = frozen.is_some().then_some(MemoryWrite {
        live: memory,
        frozen,
        pruned,
    });
    Effects {
        state: Some(state),
        memory,
        handovers,
        status_updates,
        ..Effects::only(outcome)
    }
}

/// Keeps the input in the context's state until the healer answers, within
/// the held-record bounds.
fn hold(current: &WorkflowState, input: Input<'_>, policy: &Policy) -> Effects {
    let held_bytes: usize = current.held.iter().map(HeldRecord::size).sum();
    let size = input.key.map_or(0, <[u8]>::len) + input.value.map_or(0, <[u8]>::len);
    if current.held.len() >= policy.max_held_records
        || held_bytes.saturating_add(size) > policy.max_held_bytes
    {
        let step = current
            .failure
            .as_ref()
            .map_or(current.state.as_str(), |failure| failure.step.as_str());
        return Effects::dead_letter(
            ErrorClass::HeldOverflow,
            format!(
                "context `{}` already holds {} record(s) ({held_bytes} bytes) while the healer decides on its failed step `{step}`; this one ({size} bytes) would pass the bound of {} records / {} bytes (--max-held-records, --max-held-bytes)",
                current.context_id,
                current.held.len(),
                policy.max_held_records,
                policy.max_held_bytes
            ),
        );
    }
    let mut next = current.clone();
    next.held.push(HeldRecord {
        topic: input.source.topic.clone(),
        partition: input.source.partition,
        offset: input.source.offset,
        timestamp_ms: input.timestamp_ms,
        key: input.key.map(<[u8]>::to_vec),
        value: input.value.map(<[u8]>::to_vec),
    });
    next.version = next.version.saturating_add(1);
    Effects {
        state: Some(next),
        ..Effects::only(Outcome::Held)
    }
}

/// Applies a healer command to its context. The records it releases are in
/// [`Effects::release`], for the shell to step next.
pub fn apply_command(
    context: Context<'_>,
    command: &ControlCommand,
    topology: &Topology,
    policy: &Policy,
    now_ms: i64,
) -> Effects {
    if let Err(reason) = check_context_id(&command.context_id, policy) {
        return Effects::dead_letter(ErrorClass::InvalidContextId, reason);
    }
    match answer_command(context.state, command, topology, now_ms) {
        CommandOutcome::Ignored { duplicate, reason } => {
            Effects::only(Outcome::CommandIgnored { duplicate, reason })
        }
        CommandOutcome::Applied {
            mut state,
            handovers: drafts,
            status_updates,
            release,
            park,
            causation_id,
        } => {
            reconcile_after(topology, context.state, &mut state, &drafts, None, now_ms);
            let mut effects = dispatching(
                context.memory,
                state,
                &drafts,
                status_updates,
                &causation_id,
                policy,
                now_ms,
                Outcome::CommandApplied,
            );
            effects.release = release;
            effects.park = park;
            effects.timers = TimerChanges::between(context.state, effects.state.as_ref());
            effects
        }
    }
}

/// Adds a `memory.upserted` record to its context's memory.
pub fn remember(memory: &Memory, upsert: &MemoryUpsert, policy: &Policy, now_ms: i64) -> Effects {
    if let Err(reason) = check_context_id(&upsert.context_id, policy) {
        return Effects::dead_letter(ErrorClass::InvalidContextId, reason);
    }
    let mut memory = memory.clone();
    memory.upsert(upsert, now_ms);
    let pruned = match bound_memory(&mut memory, policy.max_memory_bytes) {
        Ok(pruned) => pruned,
        Err(reason) => return Effects::dead_letter(ErrorClass::MemoryOverflow, reason),
    };
    Effects {
        memory: Some(MemoryWrite {
            live: memory,
            frozen: None,
            pruned,
        }),
        ..Effects::only(Outcome::Remembered)
    }
}

/// A `context_id` is a store key and part of every id derived from it: at
/// most `max_context_id_bytes`, and no control characters (a NUL would let
/// it collide with another context's snapshot keys).
pub fn check_context_id(context_id: &str, policy: &Policy) -> Result<(), String> {
    if context_id.len() > policy.max_context_id_bytes {
        return Err(format!(
            "context_id is {} bytes, more than the {} allowed (--max-context-id-bytes)",
            context_id.len(),
            policy.max_context_id_bytes
        ));
    }
    if let Some(at) = context_id.chars().position(char::is_control) {
        return Err(format!(
            "context_id {:?} holds a control character at position {at}",
            crate::dlq::cut_text(context_id, 120)
        ));
    }
    Ok(())
}

fn record_output(
    memory: &mut Memory,
    event: &ToolEvent,
    now_ms: i64,
    policy: &Policy,
) -> Result<Vec<u64>, String> {
    memory.record_tool_output(ToolOutput {
        event_id: event.event_id.clone(),
        tool: event.tool_name().unwrap_or_default().to_string(),
        output: RawJson::from_value(&event.result),
        at: now_ms,
        since: 0,
    });
    bound_memory(memory, policy.max_memory_bytes)
}

/// Makes the memory's encoding (live memory and what its snapshots hold)
/// fit `max_bytes`: first the oldest snapshots that hold items the live
/// memory has let go of are pruned early (their URLs answer 410 Gone), then
/// the oldest tool outputs are dropped, never the newest. An error if it
/// still does not fit. Returns the pruned snapshot versions. Checked before
/// a freeze, which adds only a version number.
fn bound_memory(memory: &mut Memory, max_bytes: usize) -> Result<Vec<u64>, String> {
    let mut pruned = Vec::new();
    let mut size = memory.encoded_len();
    while size > max_bytes {
        if let Some(version) = memory
            .keeps_history()
            .then(|| memory.prune_oldest_snapshot())
            .flatten()
        {
            pruned.push(version);
        } else if memory.tool_outputs.len() > 1 {
            memory.drop_oldest_tool_output();
        } else {
            return Err(format!(
                "context `{}` memory would take {size} bytes, more than the {max_bytes} allowed (--max-memory-bytes), even with only its newest tool output",
                crate::dlq::cut_text(&memory.context_id, 120)
            ));
        }
        size = memory.encoded_len();
    }
    Ok(pruned)
}

/// Freezes the memory as the next snapshot and prunes old ones, when
/// snapshots are on; returns the frozen version.
fn freeze(memory: &mut Memory, policy: &Policy, now_ms: i64, pruned: &mut Vec<u64>) -> Option<u64> {
    let snapshots = policy.snapshots?;
    let version = memory.freeze(now_ms);
    pruned.extend(memory.prune(now_ms, snapshots.retention_ms, snapshots.max_per_context));
    Some(version)
}
