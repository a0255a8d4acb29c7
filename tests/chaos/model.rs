//! The reference model: baton's pure core (`workflow::step`, `fire`,
//! `apply_command` and the healer's `decide`) folded over each context's
//! inputs in the order its agents sent them. Nothing of the workflow is
//! rewritten here; only the shell (encoding, sending, committing) is left
//! out. A failure is answered at once with the healer's decision: the real
//! system holds the context's later records until the answer arrives and
//! then applies them in order, so the outcome is the same.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use baton::control::{ControlAction, ControlCommand};
use baton::dlq::{ErrorClass, headers};
use baton::event::{SourceCoordinates, ToolEvent};
use baton::healer::{DeadLetterView, Decision, decide};
use baton::memory::Memory;
use baton::topology::Topology;
use baton::workflow::plan::DeadLetterPlan;
use baton::workflow::timers::TimerKind;
use baton::workflow::{self, Context, Effects, Input, Policy, WorkflowState};
use serde_json::Value;

/// One input of a context, as its agents (or the lack of them) made it.
#[derive(Debug, Clone)]
pub enum Sent {
    /// A record, decoded exactly as a pod decodes its bytes, and its
    /// timestamp (epoch milliseconds).
    Event(Box<ToolEvent>, i64),
    /// A record no decoder accepts: poison.
    Poison,
    /// The agent handed this call never answered: the step's timer fires.
    Ignored,
    /// Nobody answered the approval gate: its timer fires.
    Unanswered,
}

/// A dead letter the run must write, as the verdict compares them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Letter {
    pub context: String,
    pub class: String,
    /// For a timeout (not an input): the attempt it timed out.
    pub attempts: Option<u32>,
}

/// What a correct run produces.
#[derive(Debug, Default)]
pub struct Expected {
    /// Normalized handovers by `handover_id`.
    pub handovers: BTreeMap<String, Value>,
    pub states: HashMap<String, WorkflowState>,
    /// Every dead letter of the contexts' inputs and timers.
    pub letters: Vec<Letter>,
    /// The letters the healer parks.
    pub parked: Vec<Letter>,
    /// Step timers that must fire, and approval timers.
    pub step_timeouts: usize,
    pub approval_timeouts: usize,
    /// Contexts whose approval gate only its timer closes.
    pub approval_timed_out: BTreeSet<String>,
}

struct Fold<'t> {
    topology: &'t Topology,
    policy: Policy,
    context: String,
    state: Option<WorkflowState>,
    memory: Memory,
    /// The time of the latest input (commands are applied then).
    now: i64,
}

impl Fold<'_> {
    fn absorb(&mut self, expected: &mut Expected, effects: &Effects) {
        assert!(
            effects.release.is_empty() && effects.outcome != workflow::Outcome::Held,
            "the reference answers every failure at once"
        );
        for planned in &effects.handovers {
            let mut handover = planned.handover.clone();
            handover.memory_snapshot_url = planned.snapshot.map(|version| {
                format!(
                    "/contexts/{}/snapshots/{version}",
                    percent_encoding::utf8_percent_encode(
                        &self.context,
                        percent_encoding::NON_ALPHANUMERIC
                    )
                )
            });
            let mut value = serde_json::to_value(&handover).expect("json");
            if let Some(object) = value.as_object_mut() {
                object.remove("produced_at");
                object.remove("deadline_at");
            }
            expected
                .handovers
                .insert(handover.handover_id.clone(), value);
        }
        if let Some(state) = &effects.state {
            self.state = Some(state.clone());
        }
        if let Some(write) = &effects.memory {
            self.memory = write.live.clone();
        }
    }

    fn context(&self) -> Context<'_> {
        Context {
            state: self.state.as_ref(),
            memory: &self.memory,
        }
    }

    /// A dead letter: recorded, and a failure healed as the healer decides.
    fn letter(&mut self, expected: &mut Expected, letter: &DeadLetterPlan, attempts: Option<u32>) {
        let entry = Letter {
            context: self.context.clone(),
            class: letter.class.as_str().to_owned(),
            attempts,
        };
        expected.letters.push(entry.clone());
        let healable = matches!(
            letter.class,
            ErrorClass::ToolFailed | ErrorClass::StepTimedOut
        );
        let pending = self.state.as_ref().and_then(|s| s.failure.clone());
        let (true, Some(failure)) = (healable, pending) else {
            expected.parked.push(entry);
            return;
        };
        let header = |name: &str| {
            letter
                .headers
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.clone())
        };
        let view = DeadLetterView {
            class: Some(letter.class.as_str().to_owned()),
            reason: Some(letter.reason.clone()),
            context_id: Some(self.context.clone()),
            workflow: header(headers::WORKFLOW),
            step: header(headers::STEP),
            attempts: header(headers::ATTEMPTS).and_then(|a| a.parse().ok()),
            failed_event: header(headers::FAILED_EVENT),
            locked_by: header(headers::LOCKED_BY),
        };
        let (action, attempt) = match decide(self.topology, &view) {
            Decision::Command {
                action, attempt, ..
            } => (action, attempt),
            Decision::Park { fail, .. } => {
                expected.parked.push(entry);
                (
                    ControlAction::Fail,
                    fail.map_or(failure.attempt + 1, |(_, a)| a),
                )
            }
        };
        let command = ControlCommand {
            command_id: format!("reference/{}", failure.event_id),
            context_id: self.context.clone(),
            action,
            step: failure.step.clone(),
            attempt,
            dlq_topic: "mcp.events.dlq".into(),
            dlq_partition: 0,
            dlq_offset: 0,
            not_before: None,
            reason: None,
        };
        let effects = workflow::apply_command(
            self.context(),
            &command,
            self.topology,
            &self.policy,
            self.now,
        );
        if let workflow::Outcome::CommandIgnored { reason, .. } = &effects.outcome {
            panic!(
                "{}: the reference's own command was ignored: {reason}",
                self.context
            )
        }
        self.absorb(expected, &effects);
    }

    fn event(&mut self, expected: &mut Expected, event: &ToolEvent, offset: i64, at: i64) {
        self.now = at;
        let source = SourceCoordinates {
            topic: "mcp.events.all".into(),
            partition: 0,
            offset,
        };
        let effects = workflow::step(
            self.context(),
            event,
            Input {
                source: &source,
                timestamp_ms: at,
                key: None,
                value: None,
            },
            self.topology,
            &self.policy,
            at,
        );
        self.absorb(expected, &effects);
        if let Some(letter) = &effects.dead_letter {
            self.letter(expected, letter, None);
        }
    }

    fn fire(&mut self, expected: &mut Expected, kind: TimerKind) {
        let timer = self
            .state
            .as_ref()
            .and_then(|state| state.timers.iter().find(|t| t.kind == kind).cloned())
            .unwrap_or_else(|| panic!("{}: no {kind:?} timer to fire", self.context));
        self.now = self.now.max(timer.due_at);
        let effects = workflow::fire(self.context(), &timer, self.topology, &self.policy);
        self.absorb(expected, &effects);
        if let Some(letter) = &effects.dead_letter {
            self.letter(expected, letter, Some(timer.attempt));
        }
    }
}

/// The reference over every context's inputs.
pub fn expected(topology: &Path, inputs: &BTreeMap<String, Vec<Sent>>) -> Expected {
    let topology = Topology::load(topology).expect("the chaos topology loads");
    let mut expected = Expected::default();
    for (context, sent) in inputs {
        let mut fold = Fold {
            topology: &topology,
            policy: Policy::default(),
            context: context.clone(),
            state: None,
            memory: Memory::new(context),
            now: 0,
        };
        for (offset, input) in sent.iter().enumerate() {
            match input {
                Sent::Event(event, at) => fold.event(&mut expected, event, offset as i64, *at),
                Sent::Poison => {
                    let letter = Letter {
                        context: context.clone(),
                        class: ErrorClass::MalformedJson.as_str().to_owned(),
                        attempts: None,
                    };
                    expected.letters.push(letter.clone());
                    expected.parked.push(letter);
                }
                Sent::Ignored => {
                    expected.step_timeouts += 1;
                    fold.fire(&mut expected, TimerKind::Step);
                }
                Sent::Unanswered => {
                    expected.approval_timeouts += 1;
                    expected.approval_timed_out.insert(context.clone());
                    fold.fire(&mut expected, TimerKind::Approval);
                }
            }
        }
        if let Some(state) = fold.state {
            expected.states.insert(context.clone(), state);
        }
    }
    expected
}
