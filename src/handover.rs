//! The standard handover record a downstream agent receives, and its
//! deterministic id.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::event::ToolEvent;

/// Where a handover stands. An enum on the wire, never free text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum HandoverStatus {
    /// A normal step: the next agent is asked to work.
    Queued,
    /// The healer asked for the same step again.
    Retrying,
    /// The step moved to its alternate tool/agent.
    Fallback,
    /// The workflow moved to its PlanB route.
    PlanB,
    /// The token budget ran out; nothing further is dispatched.
    BudgetExhausted,
    /// The workflow reached a terminal failure.
    Failed,
    /// An operator cancelled the workflow: stop working on it.
    Cancelled,
}

impl HandoverStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HandoverStatus::Queued => "queued",
            HandoverStatus::Retrying => "retrying",
            HandoverStatus::Fallback => "fallback",
            HandoverStatus::PlanB => "plan_b",
            HandoverStatus::BudgetExhausted => "budget_exhausted",
            HandoverStatus::Failed => "failed",
            HandoverStatus::Cancelled => "cancelled",
        }
    }
}

/// What the pure workflow step decides to hand over; the shell turns it into a
/// [`Handover`] by adding ids, the snapshot URL and the time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverDraft {
    pub topic: String,
    pub agent: String,
    pub intent: String,
    pub workflow: String,
    pub status: HandoverStatus,
    /// Tokens left after this step; `None` where budgets are not tracked.
    pub token_budget: Option<u64>,
}

/// The record written to `mcp.handover.{agent}`, keyed by `context_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Handover {
    pub handover_id: String,
    pub context_id: String,
    pub intent: String,
    pub agent: String,
    pub workflow: String,
    pub status: HandoverStatus,
    pub last_tool_output: Value,
    pub memory_snapshot_url: Option<String>,
    pub token_budget: Option<u64>,
    pub correlation_id: Option<String>,
    /// The `event_id` of the input that caused this handover.
    pub causation_id: String,
    pub produced_at: String,
    /// Which dispatch of the step this is: 1 for the first call, more for
    /// the healer's retries, so an agent can tell a retry from a first call.
    #[serde(default)]
    pub attempt: u32,
    /// When the agent's time is up (RFC 3339): its step's timeout or the
    /// workflow's deadline, whichever is sooner; `None` when neither is set.
    #[serde(default)]
    pub deadline_at: Option<String>,
}

impl Handover {
    pub fn from_draft(
        draft: &HandoverDraft,
        event: &ToolEvent,
        memory_snapshot_url: Option<String>,
        produced_at: String,
    ) -> Handover {
        Handover {
            handover_id: handover_id(
                &event.context_id,
                &event.event_id,
                &draft.agent,
                &draft.intent,
                draft.status,
            ),
            context_id: event.context_id.clone(),
            intent: draft.intent.clone(),
            agent: draft.agent.clone(),
            workflow: draft.workflow.clone(),
            status: draft.status,
            last_tool_output: event.result.clone(),
            memory_snapshot_url,
            token_budget: draft.token_budget,
            correlation_id: event.correlation_id.clone(),
            causation_id: event.event_id.clone(),
            produced_at,
            attempt: 0,
            deadline_at: None,
        }
    }
}

impl Handover {
    /// A handover caused by a healer command: its cause names the failed
    /// call, the action and the attempt, and it carries the context's newest
    /// tool output.
    pub fn for_command(
        draft: &HandoverDraft,
        context_id: &str,
        causation_id: &str,
        last_tool_output: Value,
        memory_snapshot_url: Option<String>,
        produced_at: String,
    ) -> Handover {
        Handover {
            handover_id: handover_id(
                context_id,
                causation_id,
                &draft.agent,
                &draft.intent,
                draft.status,
            ),
            context_id: context_id.to_owned(),
            intent: draft.intent.clone(),
            agent: draft.agent.clone(),
            workflow: draft.workflow.clone(),
            status: draft.status,
            last_tool_output,
            memory_snapshot_url,
            token_budget: draft.token_budget,
            correlation_id: None,
            causation_id: causation_id.to_owned(),
            produced_at,
            attempt: 0,
            deadline_at: None,
        }
    }
}

/// A handover id is a function of its cause: the context, the input's
/// `event_id` and what it asks of whom. A replay of the same input yields the
/// same id, so downstream agents (and baton's own verifiers) can
/// deduplicate; two contexts whose producers reuse an `event_id` do not share
/// one.
pub fn handover_id(
    context_id: &str,
    causation_id: &str,
    agent: &str,
    intent: &str,
    status: HandoverStatus,
) -> String {
    let mut hasher = Sha256::new();
    for part in [context_id, causation_id, agent, intent, status.as_str()] {
        hasher.update(part.as_bytes());
        // A separator that cannot occur in UTF-8 text keeps ("ab","c") != ("a","bc").
        hasher.update([0xff]);
    }
    let digest = hasher.finalize();
    hex::encode(&digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handover_id_is_deterministic_and_separates_parts() {
        let id = |context: &str, event: &str, status| {
            handover_id(context, event, "researcher", "enrich_reasoning", status)
        };
        let a = id("c-1", "e-1", HandoverStatus::Queued);
        assert_eq!(a, id("c-1", "e-1", HandoverStatus::Queued));
        assert_eq!(a.len(), 32);
        assert_ne!(a, id("c-1", "e-1", HandoverStatus::Retrying));
        // Two contexts whose producers reuse an event id.
        assert_ne!(a, id("c-2", "e-1", HandoverStatus::Queued));
        assert_ne!(
            handover_id("c", "ab", "c", "i", HandoverStatus::Queued),
            handover_id("c", "a", "bc", "i", HandoverStatus::Queued)
        );
    }

    #[test]
    fn status_serialises_snake_case() {
        let json = serde_json::to_string(&HandoverStatus::PlanB).expect("json");
        assert_eq!(json, "\"plan_b\"");
        assert_eq!(HandoverStatus::BudgetExhausted.as_str(), "budget_exhausted");
    }
}
