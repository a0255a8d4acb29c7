//! Human and diagram views of a topology, for `baton topology describe`.
//!
//! Both are deterministic (workflows by name, states and transitions in file
//! order) so golden files can pin them down.

use std::fmt::Write;

use super::{HandoverTarget, OnTimeout, Topology, Transition, WorkflowDefinition};

/// A plain-text account of every workflow: states, transitions, handovers
/// and the budget and retry policy.
pub fn text(topology: &Topology) -> String {
    let mut out = String::new();
    for (index, definition) in topology.workflows().enumerate() {
        if index > 0 {
            out.push('\n');
        }
        workflow_text(definition, &mut out);
    }
    out
}

fn workflow_text(definition: &WorkflowDefinition, out: &mut String) {
    // Writing to a String cannot fail, hence the ignored results.
    let _ = writeln!(out, "workflow {}", definition.name);
    if let Some(description) = &definition.description {
        let _ = writeln!(out, "  {description}");
    }
    let _ = writeln!(out, "  initial state: {}", definition.initial);
    if let Some(deadline) = definition.deadline {
        let _ = writeln!(
            out,
            "  deadline: {deadline} from the first event; past it -> {}",
            definition
                .retry
                .plan_b
                .as_ref()
                .map_or(definition.retry.failed_state.as_str(), |plan_b| plan_b
                    .state
                    .as_str())
        );
    }
    let _ = writeln!(out, "  terminal states: {}", definition.terminal.join(", "));
    let _ = writeln!(
        out,
        "  token budget: {} by default; when it runs out -> {}",
        definition.budget.default_tokens, definition.budget.exhausted_state
    );
    let _ = writeln!(
        out,
        "  retry: at most {} attempts per step; when the healer gives up -> {}",
        definition.retry.max_attempts, definition.retry.failed_state
    );
    let _ = writeln!(out, "  states:");
    for state in &definition.states {
        let mut roles: Vec<String> = state_roles(definition, state)
            .into_iter()
            .map(str::to_owned)
            .collect();
        roles.extend(timeout_roles(definition, state));
        if roles.is_empty() {
            let _ = writeln!(out, "    {state}");
        } else {
            let _ = writeln!(out, "    {state} ({})", roles.join(", "));
        }
    }
    let _ = writeln!(out, "  transitions:");
    for (index, transition) in definition.transitions.iter().enumerate() {
        let _ = write!(
            out,
            "    [{index}] {} -> {}",
            transition.from.join(" | "),
            transition.to
        );
        match &transition.locked_by {
            Some(agent) => {
                let _ = writeln!(out, ", locked by {agent}");
            }
            None => out.push('\n'),
        }
        let triggers = triggers_label(definition, transition, ", ");
        if transition.is_join() {
            let _ = writeln!(out, "        on all of, in any order: {triggers}");
        } else {
            let _ = writeln!(out, "        on {triggers}");
        }
        for target in &transition.handovers {
            let _ = writeln!(out, "        handover {}", target_text(target));
        }
    }
    if !definition.retry.alternates.is_empty() {
        let _ = writeln!(out, "  alternates:");
        for alternate in &definition.retry.alternates {
            let limit = alternate
                .timeout
                .map(|timeout| format!(" (timeout {timeout})"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "    for {}: handover {}; {} stands in for {}{limit}",
                alternate.tool,
                target_text(&alternate.target()),
                alternate.completion_event,
                alternate.original_event()
            );
        }
    }
    if let Some(plan_b) = &definition.retry.plan_b {
        let _ = writeln!(
            out,
            "  plan B: -> {}, handover {}",
            plan_b.state,
            target_text(&plan_b.handover)
        );
    }
}

/// What a state is for, beyond being an ordinary step.
fn state_roles(definition: &WorkflowDefinition, state: &str) -> Vec<&'static str> {
    let mut roles = Vec::new();
    if definition.initial == state {
        roles.push("initial");
    }
    if definition.is_terminal(state) {
        roles.push("terminal");
    }
    if definition
        .retry
        .plan_b
        .as_ref()
        .is_some_and(|plan_b| plan_b.state == state)
    {
        roles.push("plan B");
    }
    if definition.budget.exhausted_state == state {
        roles.push("budget exhausted");
    }
    if definition.retry.failed_state == state {
        roles.push("failed");
    }
    roles
}

/// A state's timeouts and approval gate, as `describe` shows them.
fn timeout_roles(definition: &WorkflowDefinition, state: &str) -> Vec<String> {
    let Some(settings) = definition.settings(state) else {
        return Vec::new();
    };
    let mut roles = Vec::new();
    if definition.is_approval_gate(state) {
        let answer = match settings.on_timeout {
            Some(OnTimeout::Approve) => "approve",
            Some(OnTimeout::PlanB) => "plan B",
            _ => "deny",
        };
        roles.push("approval gate".to_owned());
        if let Some(timeout) = settings.timeout {
            roles.push(format!("{answer} after {timeout}"));
        }
    } else if let Some(timeout) = settings.timeout {
        roles.push(format!("timeout {timeout}"));
    }
    if let Some(heartbeat) = settings.heartbeat_timeout {
        roles.push(format!("heartbeat every {heartbeat}"));
    }
    roles
}

fn target_text(target: &HandoverTarget) -> String {
    format!("{}: {} -> {}", target.agent, target.intent, target.topic)
}

/// The triggers, each with the alternates' events that stand in for it.
fn triggers_label(
    definition: &WorkflowDefinition,
    transition: &Transition,
    separator: &str,
) -> String {
    transition
        .on
        .iter()
        .map(|trigger| {
            let stand_ins: Vec<&str> = definition
                .retry
                .alternates
                .iter()
                .filter(|alternate| alternate.original_event() == *trigger)
                .map(|alternate| alternate.completion_event.as_str())
                .collect();
            if stand_ins.is_empty() {
                trigger.clone()
            } else {
                format!("{trigger} (or {})", stand_ins.join(" or "))
            }
        })
        .collect::<Vec<_>>()
        .join(separator)
}

/// A Mermaid `stateDiagram-v2`, one composite state per workflow. State ids
/// are prefixed with the workflow so two workflows may share state names.
pub fn mermaid(topology: &Topology) -> String {
    let mut out = String::from("stateDiagram-v2\n");
    for definition in topology.workflows() {
        workflow_mermaid(definition, &mut out);
    }
    out
}

fn workflow_mermaid(definition: &WorkflowDefinition, out: &mut String) {
    let workflow_id = mermaid_id(&definition.name);
    let id = |state: &str| format!("{workflow_id}__{}", mermaid_id(state));
    let _ = writeln!(out, "    state {workflow_id} {{");
    for state in &definition.states {
        let roles = timeout_roles(definition, state);
        let label = if roles.is_empty() {
            state.clone()
        } else {
            format!("{state} ({})", roles.join(", "))
        };
        let _ = writeln!(
            out,
            "        state \"{}\" as {}",
            mermaid_text(&label),
            id(state)
        );
    }
    let _ = writeln!(out, "        [*] --> {}", id(&definition.initial));
    for transition in &definition.transitions {
        let mut label = triggers_label(definition, transition, " + ");
        if transition.is_join() {
            label.push_str(", any order");
        }
        let agents: Vec<&str> = transition
            .handovers
            .iter()
            .map(|target| target.agent.as_str())
            .collect();
        if !agents.is_empty() {
            let _ = write!(label, " / {}", agents.join(", "));
        }
        for from in &transition.from {
            let _ = writeln!(
                out,
                "        {} --> {} : {}",
                id(from),
                id(&transition.to),
                mermaid_text(&label)
            );
        }
    }
    for state in &definition.terminal {
        let _ = writeln!(out, "        {} --> [*]", id(state));
    }
    if let Some(plan_b) = &definition.retry.plan_b {
        let _ = writeln!(
            out,
            "        {} : plan B, handover to {} ({})",
            id(&plan_b.state),
            mermaid_text(&plan_b.handover.agent),
            mermaid_text(&plan_b.handover.intent)
        );
    }
    if let Some(deadline) = definition.deadline {
        let _ = writeln!(
            out,
            "        {} : workflow deadline {deadline}",
            id(&definition.initial)
        );
    }
    let _ = writeln!(
        out,
        "        {} : token budget exhausted",
        id(&definition.budget.exhausted_state)
    );
    let _ = writeln!(
        out,
        "        {} : healer gave up after {} attempts",
        id(&definition.retry.failed_state),
        definition.retry.max_attempts
    );
    let _ = writeln!(out, "    }}");
}

/// Mermaid ids allow letters, digits and underscores only.
fn mermaid_id(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Labels must not contain what Mermaid parses: quotes, colons, semicolons,
/// and line breaks.
fn mermaid_text(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '"' | ':' | ';' | '\n' | '\r' => ' ',
            other => other,
        })
        .collect()
}
