//! What a partition's committed work adds up to, for the operator's gauges
//! and counters: contexts by workflow and state, tokens debited, budgets
//! exhausted, PlanB entries, failures, end-to-end and per-agent latency.
//!
//! Everything is staged while a transaction is open and published only when
//! it commits, so an aborted transaction counts nothing and the gauges stay
//! exact. The workflow gauge starts from a count of the restored store, moves
//! by each committed change, and loses the partition's share when the
//! partition goes (on drop, whichever way the task ends).

use std::collections::HashMap;

use crate::metrics::OPS;
use crate::workflow::{ContextStatus, Effects, Outcome, WorkflowState};

/// The most latency samples one transaction keeps (inputs, and agent hops
/// apart). A transaction holds far fewer inputs (a commit interval's worth);
/// past the bound the rest of that transaction's inputs are not observed.
pub const MAX_LATENCY_SAMPLES: usize = 65_536;

/// Per-workflow counts staged in the open transaction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct WorkflowCounts {
    tokens: u64,
    budgets_exhausted: u64,
    plan_b: u64,
    failed: u64,
}

/// One partition's tally.
#[derive(Debug, Default)]
pub struct Tally {
    /// Committed contexts per (workflow, state) in this partition: its share
    /// of `baton_workflows`.
    committed: HashMap<(String, String), i64>,
    /// The open transaction's moves between states.
    moves: HashMap<(String, String), i64>,
    counts: HashMap<String, WorkflowCounts>,
    /// Timestamps (ms) of the open transaction's inputs.
    inputs: Vec<i64>,
    /// (agent, seconds it held the context) answered in the open transaction.
    hops: Vec<(String, f64)>,
}

/// Creates the series of every workflow, state and agent the topology
/// names, at zero, so dashboards and alerts see them before the first
/// change (and a rate() sees the first increment).
pub fn announce(topology: &crate::topology::Topology) {
    for workflow in topology.workflows() {
        let name = [workflow.name.as_str()];
        OPS.tokens_debited.with_label_values(&name);
        OPS.budgets_exhausted.with_label_values(&name);
        OPS.plan_b_entries.with_label_values(&name);
        OPS.workflows_failed.with_label_values(&name);
        for state in &workflow.states {
            OPS.workflows.with_label_values(&[&workflow.name, state]);
        }
        let agents = workflow
            .transitions
            .iter()
            .flat_map(|transition| {
                transition
                    .locked_by
                    .iter()
                    .chain(transition.handovers.iter().map(|target| &target.agent))
            })
            .chain(
                workflow
                    .retry
                    .plan_b
                    .iter()
                    .map(|plan_b| &plan_b.handover.agent),
            );
        for agent in agents {
            OPS.agent_hop_seconds.with_label_values(&[agent]);
            crate::metrics::METRICS
                .handovers_produced
                .with_label_values(&[agent]);
        }
    }
}

impl Tally {
    /// Starts from the restored store's count.
    pub fn restored(counts: HashMap<(String, String), i64>) -> Tally {
        for ((workflow, state), count) in &counts {
            OPS.workflows
                .with_label_values(&[workflow, state])
                .add(*count);
        }
        let mut tally = Tally::default();
        tally.committed = counts;
        tally
    }

    /// An input record was taken into the open transaction.
    pub fn input(&mut self, timestamp_ms: i64) {
        if self.inputs.len() < MAX_LATENCY_SAMPLES {
            self.inputs.push(timestamp_ms);
        }
    }

    /// A plan was applied to a context loaded as `before`; `input_ms` is the
    /// timestamp of the input (or timer) that caused it.
    pub fn applied(&mut self, before: Option<&WorkflowState>, effects: &Effects, input_ms: i64) {
        let Some(after) = effects.state.as_ref() else {
            return;
        };
        let was = before.map(|state| (state.workflow.as_str(), state.state.as_str()));
        if was != Some((after.workflow.as_str(), after.state.as_str())) {
            if let Some((workflow, state)) = was {
                *self
                    .moves
                    .entry((workflow.to_owned(), state.to_owned()))
                    .or_default() -= 1;
            }
            *self
                .moves
                .entry((after.workflow.clone(), after.state.clone()))
                .or_default() += 1;
        }
        let used_before = before.map_or(0, |state| state.tokens_used);
        let debited = after.tokens_used.saturating_sub(used_before);
        let mut counts = WorkflowCounts {
            tokens: debited,
            ..WorkflowCounts::default()
        };
        for update in &effects.status_updates {
            match update.status {
                ContextStatus::BudgetExhausted => counts.budgets_exhausted += 1,
                ContextStatus::PlanB => counts.plan_b += 1,
                ContextStatus::Failed => counts.failed += 1,
                _ => {}
            }
        }
        if counts != WorkflowCounts::default() {
            let staged = self.counts.entry(after.workflow.clone()).or_default();
            staged.tokens += counts.tokens;
            staged.budgets_exhausted += counts.budgets_exhausted;
            staged.plan_b += counts.plan_b;
            staged.failed += counts.failed;
        }
        // An answer from the agent that held the context ends its hop.
        if effects.outcome == Outcome::Applied
            && let Some(before) = before
            && let Some(agent) = before.locked_by.as_deref()
            && before.state != after.state
            && self.hops.len() < MAX_LATENCY_SAMPLES
        {
            let held_ms = input_ms.saturating_sub(before.updated_at).max(0);
            self.hops.push((agent.to_owned(), held_ms as f64 / 1000.0));
        }
    }

    /// The transaction committed at `now_ms`: publish what it staged.
    pub fn committed(&mut self, now_ms: i64) {
        for ((workflow, state), delta) in self.moves.drain() {
            if delta == 0 {
                continue;
            }
            OPS.workflows
                .with_label_values(&[&workflow, &state])
                .add(delta);
            let count = self
                .committed
                .entry((workflow.clone(), state.clone()))
                .or_default();
            *count += delta;
            if *count == 0 {
                self.committed.remove(&(workflow, state));
            }
        }
        for (workflow, counts) in self.counts.drain() {
            let labels = [workflow.as_str()];
            OPS.tokens_debited
                .with_label_values(&labels)
                .inc_by(counts.tokens);
            OPS.budgets_exhausted
                .with_label_values(&labels)
                .inc_by(counts.budgets_exhausted);
            OPS.plan_b_entries
                .with_label_values(&labels)
                .inc_by(counts.plan_b);
            OPS.workflows_failed
                .with_label_values(&labels)
                .inc_by(counts.failed);
        }
        for input_ms in self.inputs.drain(..) {
            let seconds = now_ms.saturating_sub(input_ms).max(0) as f64 / 1000.0;
            OPS.end_to_end_seconds.observe(seconds);
        }
        for (agent, seconds) in self.hops.drain(..) {
            OPS.agent_hop_seconds
                .with_label_values(&[&agent])
                .observe(seconds);
        }
    }

    /// The transaction aborted: nothing it staged happened.
    pub fn aborted(&mut self) {
        self.moves.clear();
        self.counts.clear();
        self.inputs.clear();
        self.hops.clear();
    }
}

impl Drop for Tally {
    /// The partition goes: its contexts leave this pod's gauge (its next
    /// owner counts them from its own restore).
    fn drop(&mut self) {
        for ((workflow, state), count) in self.committed.drain() {
            let gauge = OPS.workflows.with_label_values(&[&workflow, &state]);
            gauge.sub(count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::TimerChanges;

    fn state(
        workflow: &str,
        name: &str,
        tokens_used: u64,
        locked_by: Option<&str>,
    ) -> WorkflowState {
        WorkflowState {
            context_id: "c".into(),
            workflow: workflow.into(),
            state: name.into(),
            locked_by: locked_by.map(str::to_owned),
            attempts: 1,
            token_budget: 1_000,
            tokens_used,
            version: 1,
            updated_at: 1_000,
            join_arrived: Default::default(),
            recent_event_ids: Default::default(),
            failure: None,
            held: Vec::new(),
            timers: Vec::new(),
        }
    }

    fn effects(after: WorkflowState) -> Effects {
        Effects {
            outcome: Outcome::Applied,
            state: Some(after),
            memory: None,
            handovers: Vec::new(),
            status_updates: Vec::new(),
            dead_letter: None,
            release: Vec::new(),
            park: Vec::new(),
            timers: TimerChanges::default(),
        }
    }

    fn gauge(workflow: &str, state: &str) -> i64 {
        OPS.workflows.with_label_values(&[workflow, state]).get()
    }

    #[test]
    fn the_workflow_gauge_moves_only_on_commit_and_leaves_with_the_partition() {
        let wf = "tally-unit-a";
        let mut restored = HashMap::new();
        restored.insert((wf.to_owned(), "Queued".to_owned()), 3);
        let mut tally = Tally::restored(restored);
        assert_eq!(gauge(wf, "Queued"), 3);

        let before = state(wf, "Queued", 10, Some("vision"));
        tally.applied(Some(&before), &effects(state(wf, "Done", 25, None)), 3_500);
        assert_eq!(gauge(wf, "Queued"), 3, "nothing moves before the commit");
        tally.aborted();
        tally.committed(4_000);
        assert_eq!(gauge(wf, "Done"), 0, "an aborted move never counts");

        tally.applied(Some(&before), &effects(state(wf, "Done", 25, None)), 3_500);
        tally.applied(None, &effects(state(wf, "Queued", 0, None)), 3_600);
        tally.committed(4_000);
        assert_eq!(gauge(wf, "Queued"), 3);
        assert_eq!(gauge(wf, "Done"), 1);
        assert_eq!(
            OPS.tokens_debited.with_label_values(&[wf]).get(),
            15,
            "the step debited 25 - 10 tokens"
        );
        let hops = OPS.agent_hop_seconds.with_label_values(&["vision"]);
        assert!(hops.get_sample_count() >= 1);

        drop(tally);
        assert_eq!(gauge(wf, "Queued"), 0);
        assert_eq!(gauge(wf, "Done"), 0);
    }

    #[test]
    fn latency_samples_are_bounded_per_transaction() {
        let mut tally = Tally::default();
        for at in 0..(MAX_LATENCY_SAMPLES as i64 + 10) {
            tally.input(at);
        }
        assert_eq!(tally.inputs.len(), MAX_LATENCY_SAMPLES);
        tally.aborted();
        assert!(tally.inputs.is_empty());
    }
}
