//! Workflow definitions: the data in `topology/*.toml` that says which events
//! move a context from state to state, whom each step hands over to, and what
//! happens when a budget or the retries run out.
//!
//! Workflows are data so that adding one is a reviewed TOML file, not a
//! release. Everything is validated when it is loaded, so the pure step in
//! [`crate::workflow`] can trust a [`Topology`] and never meets an unknown
//! state or an ambiguous trigger at run time.

pub mod describe;
mod validate;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

/// One workflow, as written in a `topology/*.toml` file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowDefinition {
    /// The name a context binds to and an event's `workflow` field asks for.
    pub name: String,
    /// One human sentence for `baton topology describe`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Where a freshly bound context starts.
    pub initial: String,
    /// Every state, declared, so a typo in a transition is an error rather
    /// than a new state nobody can leave.
    pub states: Vec<String>,
    /// States that absorb every further event.
    pub terminal: Vec<String>,
    pub budget: BudgetPolicy,
    pub retry: RetryPolicy,
    pub transitions: Vec<Transition>,
    /// How long a context may take from its first event to a terminal
    /// state; past it the context moves to PlanB, or else to the failed
    /// state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Timeout>,
    /// Per-state settings, `[state.NAME]` in TOML: timeouts and approvals.
    #[serde(default, rename = "state", skip_serializing_if = "BTreeMap::is_empty")]
    pub state_settings: BTreeMap<String, StateSettings>,
    /// The file it came from, so every problem can name it.
    #[serde(skip)]
    pub origin: Option<PathBuf>,
}

/// A duration written as operators write them: `"30s"`, `"2m"`, `"1h 30m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timeout(pub std::time::Duration);

impl Timeout {
    /// Whole milliseconds, saturating: timers count in epoch milliseconds.
    pub fn as_millis(self) -> i64 {
        i64::try_from(self.0.as_millis()).unwrap_or(i64::MAX)
    }
}

impl fmt::Display for Timeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for Timeout {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Timeout, D::Error> {
        let text = String::deserialize(deserializer)?;
        let duration = humantime::parse_duration(&text).map_err(|err| {
            serde::de::Error::custom(format!(
                "`{text}` is not a duration ({err}); write e.g. \"30s\", \"2m\" or \"1h 30m\""
            ))
        })?;
        if duration.is_zero() {
            return Err(serde::de::Error::custom(format!(
                "`{text}` is zero; a timeout must be longer than that"
            )));
        }
        Ok(Timeout(duration))
    }
}

/// What a state waits for besides its transitions' events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Await {
    /// `approval.granted` or `approval.denied` from a person.
    Approval,
}

/// What an approval that nobody gives turns into at its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// As if `approval.denied` arrived.
    Deny,
    /// As if `approval.granted` arrived.
    Approve,
    /// The workflow moves to its PlanB route.
    PlanB,
}

/// `[state.NAME]`: how long the agents working in a state may take, and
/// whether it is an approval gate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSettings {
    /// Start-to-close: how long an agent handed the context in this state
    /// may take to complete, counted from the handover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Timeout>,
    /// The agent must send `agent.heartbeat` at least this often.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_timeout: Option<Timeout>,
    /// `await = "approval"` makes the state an approval gate.
    #[serde(default, rename = "await", skip_serializing_if = "Option::is_none")]
    pub awaits: Option<Await>,
    /// An approval gate's answer when `timeout` passes with none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_timeout: Option<OnTimeout>,
}

/// The event an agent sends while it works, to show it is alive.
pub const HEARTBEAT_EVENT: &str = "agent.heartbeat";
/// The events that answer an approval gate.
pub const APPROVAL_GRANTED: &str = "approval.granted";
pub const APPROVAL_DENIED: &str = "approval.denied";
/// The terminal state every workflow has for an operator's cancellation;
/// a workflow may declare it, and must not use it otherwise.
pub const CANCELLED_STATE: &str = "Cancelled";

/// Token accounting for a context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetPolicy {
    /// The budget of a context whose first event names none.
    pub default_tokens: u64,
    /// The terminal state a context moves to when its budget runs out.
    pub exhausted_state: String,
}

/// What the DLQ healer may do when a step fails. The step itself only reads
/// the alternates (their completion events stand in for the original).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Dispatches of one step before the healer gives up on it.
    pub max_attempts: u32,
    /// The terminal state of a workflow the healer parks.
    pub failed_state: String,
    /// The healer's delay before retry `n` (n >= 1) is
    /// `initial_backoff_ms * 2^(n-1)`, capped at `max_backoff_ms`.
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alternates: Vec<Alternate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_b: Option<PlanB>,
}

fn default_initial_backoff_ms() -> u64 {
    1_000
}

fn default_max_backoff_ms() -> u64 {
    60_000
}

impl RetryPolicy {
    /// How long the healer waits before dispatching attempt `attempt`
    /// (the first retry is attempt 2).
    pub fn backoff_ms(&self, attempt: u32) -> u64 {
        let doublings = attempt.saturating_sub(2).min(62);
        self.initial_backoff_ms
            .saturating_mul(1u64 << doublings)
            .min(self.max_backoff_ms)
    }

    /// The alternate that replaces `tool`, if any.
    pub fn alternate_for_tool(&self, tool: &str) -> Option<&Alternate> {
        self.alternates
            .iter()
            .find(|alternate| alternate.tool == tool)
    }

    /// The alternate whose own completion event `event` is, if any.
    pub fn alternate_completing_with(&self, event: &str) -> Option<&Alternate> {
        self.alternates
            .iter()
            .find(|alternate| alternate.completion_event == event)
    }
}

/// Another agent that can do a failing tool's job; its completion event
/// counts as the original tool's completion wherever a transition waits for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alternate {
    /// The tool it replaces, as in `tool.{tool}.completed`.
    pub tool: String,
    pub agent: String,
    pub intent: String,
    pub topic: String,
    /// The event the alternate's work ends with, e.g. `tool.fetch_page.completed`.
    pub completion_event: String,
    /// The alternate's own start-to-close and heartbeat timeouts; by default
    /// those of the state it works in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Timeout>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_timeout: Option<Timeout>,
}

impl Alternate {
    /// The event this alternate stands in for.
    pub fn original_event(&self) -> String {
        tool_completed_event(&self.tool)
    }

    pub fn target(&self) -> HandoverTarget {
        HandoverTarget {
            agent: self.agent.clone(),
            intent: self.intent.clone(),
            topic: self.topic.clone(),
            tool: None,
        }
    }
}

/// The route of last resort before failing: a state and whom to tell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanB {
    pub state: String,
    pub handover: HandoverTarget,
}

/// Whom a handover goes to, what it asks and on which topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoverTarget {
    pub agent: String,
    pub intent: String,
    pub topic: String,
    /// The tool this agent is expected to complete with. A retry of that
    /// tool goes back to this target; needed only where a state is entered
    /// with several handovers (see [`WorkflowDefinition::retry_target`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
}

/// A move from one of `from` to `to` once every event in `on` has arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transition {
    /// The states it may fire from; a string or a list in TOML.
    #[serde(deserialize_with = "one_or_many")]
    pub from: Vec<String>,
    /// Its trigger events; several make a join that fires once all have
    /// arrived, in any order. A string or a list in TOML.
    #[serde(deserialize_with = "one_or_many")]
    pub on: Vec<String>,
    pub to: String,
    /// The agent that holds the context after this transition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_by: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handovers: Vec<HandoverTarget>,
}

impl Transition {
    pub fn is_join(&self) -> bool {
        self.on.len() > 1
    }
}

/// A transition an event fires (or contributes to, for a join), and the
/// trigger it counts as: the alternate's event counts as the original's.
#[derive(Debug, Clone, Copy)]
pub struct TriggerMatch<'a> {
    pub index: usize,
    pub transition: &'a Transition,
    pub trigger: &'a str,
}

impl WorkflowDefinition {
    pub fn is_terminal(&self, state: &str) -> bool {
        state == CANCELLED_STATE || self.terminal.iter().any(|terminal| terminal == state)
    }

    /// The settings of `state`; defaults (no timeouts) where none are set.
    pub fn settings(&self, state: &str) -> Option<&StateSettings> {
        self.state_settings.get(state)
    }

    /// Whether `state` is an approval gate.
    pub fn is_approval_gate(&self, state: &str) -> bool {
        self.settings(state)
            .is_some_and(|settings| settings.awaits == Some(Await::Approval))
    }

    /// Whether a context in `current` can no longer be waiting for
    /// `event`: the event belongs to a transition from a state the context
    /// has left (the current state is reachable from it), or to a join
    /// trigger of the current state that already arrived. Such a completion
    /// is stale (a late answer, or a second attempt's), not invalid.
    pub fn is_left_behind(&self, current: &str, event: &str, arrived: &BTreeSet<String>) -> bool {
        if self.is_terminal(current) {
            return self.mentions(event);
        }
        self.transitions.iter().any(|transition| {
            transition
                .on
                .iter()
                .any(|trigger| self.satisfies(event, trigger))
                && transition.from.iter().any(|from| {
                    if from == current {
                        transition.on.iter().any(|trigger| {
                            self.satisfies(event, trigger) && arrived.contains(trigger)
                        })
                    } else {
                        self.reachable(from, current)
                    }
                })
        })
    }

    /// Whether a context in `from` can get to `to`: through transitions,
    /// or the routes that any non-terminal state has (PlanB, failing,
    /// the budget running out, cancellation).
    pub fn reachable(&self, from: &str, to: &str) -> bool {
        if from == to {
            return true;
        }
        if !self.is_terminal(from)
            && (to == self.retry.failed_state
                || to == self.budget.exhausted_state
                || to == CANCELLED_STATE
                || self
                    .retry
                    .plan_b
                    .as_ref()
                    .is_some_and(|plan_b| plan_b.state == to))
        {
            return true;
        }
        let mut seen: BTreeSet<&str> = BTreeSet::from([from]);
        let mut frontier = vec![from];
        while let Some(state) = frontier.pop() {
            let mut next: Vec<&str> = self
                .transitions
                .iter()
                .filter(|transition| transition.from.iter().any(|f| f == state))
                .map(|transition| transition.to.as_str())
                .collect();
            if !self.is_terminal(state)
                && let Some(plan_b) = &self.retry.plan_b
            {
                next.push(plan_b.state.as_str());
            }
            for candidate in next {
                if candidate == to {
                    return true;
                }
                if seen.insert(candidate) {
                    frontier.push(candidate);
                }
            }
        }
        false
    }

    /// The transition from `state` that `event` belongs to. Validation makes
    /// this unique: no event triggers two transitions from the same state.
    pub fn match_trigger(&self, state: &str, event: &str) -> Option<TriggerMatch<'_>> {
        self.transitions
            .iter()
            .enumerate()
            .filter(|(_, transition)| transition.from.iter().any(|from| from == state))
            .find_map(|(index, transition)| {
                transition
                    .on
                    .iter()
                    .find(|trigger| self.satisfies(event, trigger))
                    .map(|trigger| TriggerMatch {
                        index,
                        transition,
                        trigger,
                    })
            })
    }

    /// Whether `event` counts as `trigger`: it is the trigger, or the
    /// completion event of an alternate for the trigger's tool.
    pub fn satisfies(&self, event: &str, trigger: &str) -> bool {
        event == trigger
            || self.retry.alternates.iter().any(|alternate| {
                alternate.completion_event == event && alternate.original_event() == trigger
            })
    }

    /// Whether `event` can bind a fresh context to this workflow.
    pub fn starts_with(&self, event: &str) -> bool {
        self.match_trigger(&self.initial, event).is_some()
    }

    /// Every trigger that moves a context out of `state`, for error messages.
    pub fn triggers_from(&self, state: &str) -> Vec<&str> {
        self.transitions
            .iter()
            .filter(|transition| transition.from.iter().any(|from| from == state))
            .flat_map(|transition| transition.on.iter().map(String::as_str))
            .collect()
    }

    /// Whether this workflow uses `event` as a trigger or a stand-in.
    pub fn mentions(&self, event: &str) -> bool {
        self.transitions
            .iter()
            .any(|transition| transition.on.iter().any(|trigger| trigger == event))
            || self
                .retry
                .alternates
                .iter()
                .any(|alternate| alternate.completion_event == event)
    }

    /// Every topic this workflow may write a handover to.
    pub fn output_topics(&self) -> impl Iterator<Item = &str> {
        let transitions = self.transitions.iter().flat_map(|transition| {
            transition
                .handovers
                .iter()
                .map(|target| target.topic.as_str())
        });
        let alternates = self
            .retry
            .alternates
            .iter()
            .map(|alternate| alternate.topic.as_str());
        let plan_b = self
            .retry
            .plan_b
            .iter()
            .map(|plan_b| plan_b.handover.topic.as_str());
        transitions.chain(alternates).chain(plan_b)
    }

    /// Whom a retry of the failed call `failed_event` in `state` goes to:
    /// the alternate, when the failed call was the alternate's own; else,
    /// among the handovers of the transitions into `state`, the one that
    /// declares the failed tool, the only one, or the one to `locked_by`.
    /// `None` when nobody dispatched the step (the initial state) or the
    /// target is ambiguous: then retrying is not possible.
    pub fn retry_target(
        &self,
        state: &str,
        failed_event: &str,
        locked_by: Option<&str>,
    ) -> Option<HandoverTarget> {
        if let Some(alternate) = self.retry.alternate_completing_with(failed_event) {
            return Some(alternate.target());
        }
        let mut candidates: Vec<&HandoverTarget> = Vec::new();
        for target in self
            .transitions
            .iter()
            .filter(|transition| transition.to == state)
            .flat_map(|transition| transition.handovers.iter())
        {
            if !candidates.contains(&target) {
                candidates.push(target);
            }
        }
        let tool = tool_of_event(failed_event);
        if let Some(target) = candidates
            .iter()
            .find(|target| target.tool.as_deref() == Some(tool))
        {
            return Some((*target).clone());
        }
        if let [only] = candidates.as_slice() {
            return Some((*only).clone());
        }
        locked_by.and_then(|agent| {
            candidates
                .iter()
                .find(|target| target.agent == agent)
                .map(|target| (*target).clone())
        })
    }

    /// How problems name this definition: its file, else its name.
    pub fn origin_label(&self) -> String {
        match &self.origin {
            Some(path) => path.display().to_string(),
            None => format!("workflow `{}`", self.name),
        }
    }
}

/// `browser_take_screenshot` for `tool.browser_take_screenshot.completed`;
/// any other name is returned whole.
pub fn tool_of_event(event: &str) -> &str {
    event
        .strip_prefix("tool.")
        .and_then(|rest| rest.strip_suffix(".completed"))
        .unwrap_or(event)
}

/// The event name a tool's completion carries.
pub fn tool_completed_event(tool: &str) -> String {
    format!("tool.{tool}.completed")
}

/// Every workflow baton runs, by name, validated.
#[derive(Debug, Clone)]
pub struct Topology {
    workflows: BTreeMap<String, WorkflowDefinition>,
}

impl Topology {
    /// Loads one `.toml` file, or every `*.toml` file directly in a directory
    /// (sorted by name, so problems are reported in a stable order), and
    /// validates them together. Every problem in every file is reported at once.
    pub fn load(path: &Path) -> Result<Topology, TopologyError> {
        let files = definition_files(path)?;
        let mut definitions = Vec::with_capacity(files.len());
        let mut problems = Vec::new();
        for file in files {
            let text = fs::read_to_string(&file).map_err(|source| TopologyError::Read {
                path: file.clone(),
                source,
            })?;
            match parse_definition(&text, &file) {
                Ok(definition) => definitions.push(definition),
                Err(problem) => problems.push(problem),
            }
        }
        problems.extend(validate::check(&definitions));
        if problems.is_empty() {
            Ok(Topology::assemble(definitions))
        } else {
            Err(TopologyError::Invalid { problems })
        }
    }

    /// Validates definitions built in code, as tests and tools do.
    pub fn from_definitions(
        definitions: Vec<WorkflowDefinition>,
    ) -> Result<Topology, TopologyError> {
        let problems = validate::check(&definitions);
        if problems.is_empty() {
            Ok(Topology::assemble(definitions))
        } else {
            Err(TopologyError::Invalid { problems })
        }
    }

    fn assemble(definitions: Vec<WorkflowDefinition>) -> Topology {
        let workflows = definitions
            .into_iter()
            .map(|definition| (definition.name.clone(), definition))
            .collect();
        Topology { workflows }
    }

    pub fn workflow(&self, name: &str) -> Option<&WorkflowDefinition> {
        self.workflows.get(name)
    }

    /// The workflows, ordered by name.
    pub fn workflows(&self) -> impl Iterator<Item = &WorkflowDefinition> {
        self.workflows.values()
    }

    /// The workflow a fresh context binds to when its first event names none.
    /// Validation makes it unique.
    pub fn starting_with(&self, event: &str) -> Option<&WorkflowDefinition> {
        self.workflows()
            .find(|definition| definition.starts_with(event))
    }

    /// Whether some workflow uses `event_name` as a trigger or a stand-in;
    /// events no workflow mentions are counted and skipped, not dead-lettered.
    pub fn mentions(&self, event_name: &str) -> bool {
        self.workflows()
            .any(|definition| definition.mentions(event_name))
    }

    /// Every topic a handover may be written to, so the shell can check
    /// they exist before it starts.
    pub fn output_topics(&self) -> BTreeSet<String> {
        self.workflows()
            .flat_map(WorkflowDefinition::output_topics)
            .map(str::to_owned)
            .collect()
    }
}

/// One thing wrong with a definition: where, which key, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file (or, for definitions built in code, the workflow name).
    pub origin: String,
    /// The key path, e.g. `transitions[2].to`, or a line and column.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.origin, self.key, self.message)
    }
}

/// Why a topology could not be loaded.
#[derive(Debug, Error)]
pub enum TopologyError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: no workflow definitions (*.toml files) found", path.display())]
    Empty { path: PathBuf },
    /// Every problem, one per line.
    #[error("{}", render_problems(problems))]
    Invalid { problems: Vec<Problem> },
}

impl TopologyError {
    /// The validation problems, empty for I/O errors.
    pub fn problems(&self) -> &[Problem] {
        match self {
            TopologyError::Invalid { problems } => problems,
            TopologyError::Read { .. } | TopologyError::Empty { .. } => &[],
        }
    }
}

fn render_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(Problem::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The files a path stands for: itself, or the `*.toml` files directly in it.
fn definition_files(path: &Path) -> Result<Vec<PathBuf>, TopologyError> {
    let read_error = |source| TopologyError::Read {
        path: path.to_path_buf(),
        source,
    };
    let metadata = fs::metadata(path).map_err(read_error)?;
    if !metadata.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(path).map_err(read_error)? {
        let file = entry.map_err(read_error)?.path();
        if file.is_file()
            && file
                .extension()
                .is_some_and(|extension| extension == "toml")
        {
            files.push(file);
        }
    }
    if files.is_empty() {
        return Err(TopologyError::Empty {
            path: path.to_path_buf(),
        });
    }
    files.sort();
    Ok(files)
}

/// Parses one definition; a syntax error or unknown key becomes one problem
/// that names its line and column.
fn parse_definition(text: &str, file: &Path) -> Result<WorkflowDefinition, Problem> {
    match toml::from_str::<WorkflowDefinition>(text) {
        Ok(mut definition) => {
            definition.origin = Some(file.to_path_buf());
            Ok(definition)
        }
        Err(error) => Err(Problem {
            origin: file.display().to_string(),
            key: error
                .span()
                .and_then(|span| line_and_column(text, span.start))
                .unwrap_or_else(|| "document".to_owned()),
            message: error.message().trim().replace('\n', " "),
        }),
    }
}

fn line_and_column(text: &str, byte_offset: usize) -> Option<String> {
    let before = text.get(..byte_offset)?;
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(0, |tail| tail.chars().count())
        + 1;
    Some(format!("line {line}, column {column}"))
}

/// Accepts `"A"` as well as `["A", "B"]`, since most transitions have one.
fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "a string or a list of strings")]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

#[cfg(test)]
mod tests;
