//! Validation of workflow definitions: every problem is found, not just the
//! first, and each names its file and key so a reviewer can fix them in one go.
//!
//! Reachability is precise: a state is reachable when a chain of transitions
//! leads to it from the initial state or from a *policy state* (the PlanB
//! state, the budget-exhausted state and the failed state), because the step
//! and the healer move a context into those from anywhere.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    APPROVAL_DENIED, APPROVAL_GRANTED, Await, CANCELLED_STATE, HandoverTarget, OnTimeout, Problem,
    WorkflowDefinition,
};

/// Every problem in `definitions`, each one alone and across them.
pub(super) fn check(definitions: &[WorkflowDefinition]) -> Vec<Problem> {
    let mut problems = Vec::new();
    for definition in definitions {
        let mut report = Report {
            origin: definition.origin_label(),
            problems: &mut problems,
        };
        check_definition(definition, &mut report);
    }
    check_across(definitions, &mut problems);
    problems
}

struct Report<'a> {
    origin: String,
    problems: &'a mut Vec<Problem>,
}

impl Report<'_> {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            origin: self.origin.clone(),
            key: key.into(),
            message: message.into(),
        });
    }

    /// Reports an empty value; returns whether it was there.
    fn present(&mut self, key: impl Into<String>, value: &str) -> bool {
        if value.trim().is_empty() {
            self.push(key, "missing or empty");
            return false;
        }
        true
    }

    /// Reports a state that is empty or not declared in `states`.
    fn known_state(
        &mut self,
        key: impl Into<String>,
        state: &str,
        states: &BTreeSet<&str>,
    ) -> bool {
        let key = key.into();
        if !self.present(key.clone(), state) {
            return false;
        }
        if !states.contains(state) {
            self.push(
                key,
                format!("unknown state `{state}` (declare it in `states`)"),
            );
            return false;
        }
        true
    }

    fn topic(&mut self, key: String, topic: &str) {
        if !self.present(key.clone(), topic) {
            return;
        }
        let legal = topic.len() <= 249
            && topic != "."
            && topic != ".."
            && topic
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !legal {
            self.push(key, format!("`{topic}` is not a legal Kafka topic name"));
        }
    }

    fn target(&mut self, key: &str, target: &HandoverTarget) {
        self.present(format!("{key}.agent"), &target.agent);
        self.present(format!("{key}.intent"), &target.intent);
        self.topic(format!("{key}.topic"), &target.topic);
    }
}

fn check_definition(definition: &WorkflowDefinition, report: &mut Report<'_>) {
    report.present("name", &definition.name);
    let states = declared_states(definition, report);
    check_policy_states(definition, &states, report);
    check_transitions(definition, &states, report);
    check_triggers(definition, report);
    check_alternates(definition, report);
    check_reachability(definition, &states, report);
    check_state_settings(definition, &states, report);
}

/// `[state.NAME]` tables: a declared, non-terminal state; an approval gate
/// has a timeout, an answer for it, and transitions for both answers.
fn check_state_settings(
    definition: &WorkflowDefinition,
    states: &BTreeSet<&str>,
    report: &mut Report<'_>,
) {
    if states.contains(CANCELLED_STATE) && !definition.terminal.iter().any(|t| t == CANCELLED_STATE)
    {
        report.push(
            "states",
            format!("`{CANCELLED_STATE}` is the state an operator's cancellation moves to: if declared, it must be terminal"),
        );
    }
    for (index, transition) in definition.transitions.iter().enumerate() {
        if transition.to == CANCELLED_STATE {
            report.push(
                format!("transitions[{index}].to"),
                format!("`{CANCELLED_STATE}` is entered only by `baton context cancel`"),
            );
        }
    }
    for (state, settings) in &definition.state_settings {
        let key = format!("state.{state}");
        if !states.contains(state.as_str()) {
            report.push(
                key,
                format!("unknown state `{state}` (declare it in `states`)"),
            );
            continue;
        }
        if definition.is_terminal(state) {
            report.push(
                key,
                format!("`{state}` is terminal: nothing is awaited there"),
            );
            continue;
        }
        if let (Some(timeout), Some(heartbeat)) = (settings.timeout, settings.heartbeat_timeout)
            && heartbeat > timeout
        {
            report.push(
                format!("{key}.heartbeat_timeout"),
                format!("{heartbeat} is longer than the state's timeout ({timeout}): it could never fire"),
            );
        }
        let gate = settings.awaits == Some(Await::Approval);
        if !gate {
            if settings.on_timeout.is_some() {
                report.push(
                    format!("{key}.on_timeout"),
                    "only an approval gate (`await = \"approval\"`) answers its timeout",
                );
            }
            continue;
        }
        if settings.timeout.is_none() {
            report.push(
                format!("{key}.timeout"),
                "an approval gate needs a timeout: nobody may answer",
            );
        }
        if settings.on_timeout.is_none() {
            report.push(
                format!("{key}.on_timeout"),
                "an approval gate needs `on_timeout = \"deny\" | \"approve\" | \"plan_b\"`",
            );
        }
        if settings.on_timeout == Some(OnTimeout::PlanB) && definition.retry.plan_b.is_none() {
            report.push(
                format!("{key}.on_timeout"),
                "`plan_b` needs a `[retry.plan_b]` route",
            );
        }
        for answer in [APPROVAL_GRANTED, APPROVAL_DENIED] {
            if definition.match_trigger(state, answer).is_none() {
                report.push(
                    key.clone(),
                    format!("an approval gate needs a transition from `{state}` on `{answer}`"),
                );
            }
        }
    }
}

fn declared_states<'a>(
    definition: &'a WorkflowDefinition,
    report: &mut Report<'_>,
) -> BTreeSet<&'a str> {
    let mut states = BTreeSet::new();
    for (index, state) in definition.states.iter().enumerate() {
        let key = format!("states[{index}]");
        if report.present(key.clone(), state) && !states.insert(state.as_str()) {
            report.push(key, format!("duplicate state `{state}`"));
        }
    }
    states
}

fn check_policy_states(
    definition: &WorkflowDefinition,
    states: &BTreeSet<&str>,
    report: &mut Report<'_>,
) {
    if report.known_state("initial", &definition.initial, states) {
        if definition.is_terminal(&definition.initial) {
            report.push(
                "initial",
                format!(
                    "`{}` is terminal: no event could ever be applied",
                    definition.initial
                ),
            );
        } else if definition.triggers_from(&definition.initial).is_empty() {
            report.push(
                "initial",
                format!(
                    "no transition leaves `{}`: no context could ever bind",
                    definition.initial
                ),
            );
        }
    }
    for (index, state) in definition.terminal.iter().enumerate() {
        report.known_state(format!("terminal[{index}]"), state, states);
    }
    for (key, state) in [
        ("budget.exhausted_state", &definition.budget.exhausted_state),
        ("retry.failed_state", &definition.retry.failed_state),
    ] {
        if report.known_state(key, state, states) && !definition.is_terminal(state) {
            report.push(
                key,
                format!("`{state}` must be listed in `terminal`: nothing may follow it"),
            );
        }
    }
    if definition.retry.max_attempts == 0 {
        report.push(
            "retry.max_attempts",
            "must be at least 1: 0 attempts would never dispatch a step",
        );
    }
    if definition.retry.initial_backoff_ms == 0 {
        report.push(
            "retry.initial_backoff_ms",
            "must be at least 1: retries without a pause hammer a failing tool",
        );
    }
    if definition.retry.max_backoff_ms < definition.retry.initial_backoff_ms {
        report.push(
            "retry.max_backoff_ms",
            "must be at least `initial_backoff_ms`",
        );
    }
    if let Some(plan_b) = &definition.retry.plan_b {
        report.known_state("retry.plan_b.state", &plan_b.state, states);
        report.target("retry.plan_b.handover", &plan_b.handover);
    }
}

fn check_transitions(
    definition: &WorkflowDefinition,
    states: &BTreeSet<&str>,
    report: &mut Report<'_>,
) {
    for (index, transition) in definition.transitions.iter().enumerate() {
        let key = format!("transitions[{index}]");
        if transition.from.is_empty() {
            report.push(format!("{key}.from"), "no state to fire from");
        }
        let mut seen_from = BTreeSet::new();
        for (position, from) in transition.from.iter().enumerate() {
            let from_key = format!("{key}.from[{position}]");
            if !report.known_state(from_key.clone(), from, states) {
                continue;
            }
            if !seen_from.insert(from.as_str()) {
                report.push(from_key, format!("duplicate state `{from}`"));
            } else if definition.is_terminal(from) {
                report.push(
                    from_key,
                    format!("`{from}` is terminal: terminal states absorb every event"),
                );
            }
        }
        report.known_state(format!("{key}.to"), &transition.to, states);
        if transition.on.is_empty() {
            report.push(format!("{key}.on"), "no trigger event");
        }
        for (position, trigger) in transition.on.iter().enumerate() {
            report.present(format!("{key}.on[{position}]"), trigger);
        }
        if let Some(agent) = &transition.locked_by {
            report.present(format!("{key}.locked_by"), agent);
        }
        for (position, target) in transition.handovers.iter().enumerate() {
            report.target(&format!("{key}.handovers[{position}]"), target);
        }
    }
}

/// One event from one state must name exactly one transition and one trigger,
/// and every join must be able to complete.
fn check_triggers(definition: &WorkflowDefinition, report: &mut Report<'_>) {
    // (from state, arriving event) -> the transition that claimed it first.
    let mut claimed: BTreeMap<(&str, String), usize> = BTreeMap::new();
    for (index, transition) in definition.transitions.iter().enumerate() {
        // Arriving event -> the trigger it counts as, within this transition.
        let mut counts_as: BTreeMap<String, (usize, &str)> = BTreeMap::new();
        for (position, trigger) in transition.on.iter().enumerate() {
            let key = format!("transitions[{index}].on[{position}]");
            if transition.on[..position].contains(trigger) {
                report.push(
                    key,
                    format!("join can never complete: `{trigger}` is listed twice"),
                );
                continue;
            }
            for arriving in arriving_events(definition, trigger) {
                match counts_as.get(&arriving) {
                    Some((_, earlier)) if *earlier != trigger.as_str() => report.push(
                        key.clone(),
                        format!("`{arriving}` would count for both `{earlier}` and `{trigger}`"),
                    ),
                    _ => {
                        counts_as.insert(arriving, (position, trigger));
                    }
                }
            }
        }
        let unique_from: BTreeSet<&str> = transition.from.iter().map(String::as_str).collect();
        for from in unique_from {
            for (arriving, (position, _)) in &counts_as {
                let key = format!("transitions[{index}].on[{position}]");
                let Some(&other) = claimed.get(&(from, arriving.clone())) else {
                    claimed.insert((from, arriving.clone()), index);
                    continue;
                };
                let other_is_join = definition.transitions[other].is_join();
                let message = match (transition.is_join(), other_is_join) {
                    (true, false) => format!(
                        "join can never complete: `{arriving}` from `{from}` fires transitions[{other}] on its own"
                    ),
                    (false, true) => format!(
                        "`{arriving}` from `{from}` is also part of the join in transitions[{other}], \
                         which could then never complete"
                    ),
                    _ => format!(
                        "duplicate trigger `{arriving}` from state `{from}` (also transitions[{other}])"
                    ),
                };
                report.push(key, message);
            }
        }
    }
}

/// The events that count as `trigger`: itself and its alternates' completions.
fn arriving_events(definition: &WorkflowDefinition, trigger: &str) -> Vec<String> {
    let stand_ins = definition
        .retry
        .alternates
        .iter()
        .filter(|alternate| alternate.original_event() == trigger)
        .map(|alternate| alternate.completion_event.clone());
    std::iter::once(trigger.to_owned())
        .chain(stand_ins)
        .collect()
}

fn check_alternates(definition: &WorkflowDefinition, report: &mut Report<'_>) {
    let waited_for: BTreeSet<&str> = definition
        .transitions
        .iter()
        .flat_map(|transition| transition.on.iter().map(String::as_str))
        .collect();
    let mut tools = BTreeSet::new();
    for (index, alternate) in definition.retry.alternates.iter().enumerate() {
        let key = format!("retry.alternates[{index}]");
        report.target(
            &key,
            &HandoverTarget {
                agent: alternate.agent.clone(),
                intent: alternate.intent.clone(),
                topic: alternate.topic.clone(),
                tool: None,
            },
        );
        let completion_known = report.present(
            format!("{key}.completion_event"),
            &alternate.completion_event,
        );
        if !report.present(format!("{key}.tool"), &alternate.tool) {
            continue;
        }
        let original = alternate.original_event();
        if !tools.insert(alternate.tool.as_str()) {
            report.push(
                format!("{key}.tool"),
                format!("a second alternate for `{}`", alternate.tool),
            );
        } else if !waited_for.contains(original.as_str()) {
            report.push(
                format!("{key}.tool"),
                format!("no transition waits for `{original}`"),
            );
        }
        if completion_known && alternate.completion_event == original {
            report.push(
                format!("{key}.completion_event"),
                format!("`{original}` cannot stand in for itself"),
            );
        }
    }
}

fn check_reachability(
    definition: &WorkflowDefinition,
    states: &BTreeSet<&str>,
    report: &mut Report<'_>,
) {
    if !states.contains(definition.initial.as_str()) {
        // Already reported; every state would look unreachable.
        return;
    }
    let mut reachable: BTreeSet<&str> = [
        Some(definition.initial.as_str()),
        definition
            .retry
            .plan_b
            .as_ref()
            .map(|plan_b| plan_b.state.as_str()),
        Some(definition.budget.exhausted_state.as_str()),
        Some(definition.retry.failed_state.as_str()),
    ]
    .into_iter()
    .flatten()
    .filter(|state| states.contains(state))
    .collect();
    loop {
        let before = reachable.len();
        for transition in &definition.transitions {
            if transition
                .from
                .iter()
                .any(|from| reachable.contains(from.as_str()))
            {
                reachable.insert(transition.to.as_str());
            }
        }
        if reachable.len() == before {
            break;
        }
    }
    for (index, state) in definition.states.iter().enumerate() {
        if !state.trim().is_empty() && !reachable.contains(state.as_str()) {
            report.push(
                format!("states[{index}]"),
                format!(
                    "`{state}` is unreachable: no chain of transitions leads to it from `{}` or a policy state",
                    definition.initial
                ),
            );
        }
    }
}

/// Problems between workflows: a name defined twice, or a first event that
/// would bind a context to either of two workflows.
fn check_across(definitions: &[WorkflowDefinition], problems: &mut Vec<Problem>) {
    for (index, definition) in definitions.iter().enumerate() {
        let earlier = &definitions[..index];
        let mut report = Report {
            origin: definition.origin_label(),
            problems,
        };
        if let Some(other) = earlier.iter().find(|other| other.name == definition.name) {
            report.push(
                "name",
                format!(
                    "workflow `{}` is also defined in {}",
                    definition.name,
                    other.origin_label()
                ),
            );
            continue;
        }
        let starting_events: BTreeSet<String> = definition
            .transitions
            .iter()
            .filter(|transition| transition.from.contains(&definition.initial))
            .flat_map(|transition| transition.on.iter())
            .flat_map(|trigger| arriving_events(definition, trigger))
            .collect();
        for event in starting_events {
            if let Some(other) = earlier.iter().find(|other| other.starts_with(&event)) {
                report.push(
                    "initial",
                    format!(
                        "`{event}` also starts workflow `{}` ({}): a context whose first event names no \
                         workflow could bind to either",
                        other.name,
                        other.origin_label()
                    ),
                );
            }
        }
    }
}
