//! Properties of the step over random event sequences: duplicates, noise,
//! failed calls, joins in any order, stand-ins, huge and missing usage.

use std::collections::BTreeSet;

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use serde_json::json;

use super::tests::{event, topology};
use super::*;
use crate::event::{ToolEvent, ToolStatus, Usage};
use crate::handover::HandoverStatus;

const EVENT_NAMES: [&str; 6] = [
    "tool.vision_analyze.completed",
    "tool.research_enrich.completed",
    "tool.valuation_estimate.completed",
    "tool.browser_take_screenshot.completed",
    "tool.fetch_page.completed",
    "tool.calendar_lookup.completed",
];

fn arb_tokens() -> impl Strategy<Value = Option<u64>> {
    option::weighted(
        0.9,
        prop_oneof![
            8 => 0u64..6_000,
            1 => (u64::MAX / 2)..=u64::MAX,
        ],
    )
}

fn arb_event() -> impl Strategy<Value = ToolEvent> {
    (
        0u8..24,
        0..EVENT_NAMES.len(),
        arb_tokens(),
        prop::bool::weighted(0.1),
        option::of(0u64..30_000),
    )
        .prop_map(|(id, name, tokens, failed, budget)| {
            let mut event = event(&format!("e{id}"), EVENT_NAMES[name], 0);
            event.usage = tokens.map(|input_tokens| Usage {
                input_tokens,
                output_tokens: 0,
            });
            event.result = json!(format!("output of {}", EVENT_NAMES[name]));
            event.token_budget = budget;
            if failed {
                event.status = ToolStatus::Error;
            }
            event
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn step_keeps_its_invariants(events in vec(arb_event(), 1..48)) {
        let topology = topology();
        let definition = topology.workflow("vision-research").expect("vision-research");
        let mut state: Option<WorkflowState> = None;
        let mut applied_ids = BTreeSet::new();
        for (index, event) in events.iter().enumerate() {
            let now = 1_000 + index as i64;
            let outcome = transition(state.as_ref(), event, &topology, now);
            if applied_ids.contains(&event.event_id) {
                // Sequences are shorter than the dedup window, so every
                // applied id is still remembered.
                prop_assert_eq!(&outcome, &StepOutcome::Duplicate);
            }
            match outcome {
                StepOutcome::Applied { state: next, handovers, status_updates } => {
                    if let Some(previous) = &state {
                        prop_assert!(!definition.is_terminal(&previous.state), "terminal states absorb");
                        prop_assert_eq!(next.version, previous.version + 1);
                        prop_assert!(next.tokens_used >= previous.tokens_used);
                        prop_assert_eq!(next.token_budget, previous.token_budget);
                        if next.state == previous.state {
                            prop_assert!(next.attempts >= previous.attempts, "attempts only grow within a step");
                        }
                    }
                    prop_assert_eq!(next.updated_at, now);
                    prop_assert_eq!(next.tokens_left(), next.token_budget.saturating_sub(next.tokens_used));
                    for handover in &handovers {
                        prop_assert_eq!(handover.token_budget, Some(next.tokens_left()));
                    }
                    if next.tokens_used >= next.token_budget {
                        prop_assert_eq!(&next.state, "BudgetExhausted");
                        prop_assert!(handovers.len() <= 1);
                        prop_assert!(handovers.iter().all(|h| h.status == HandoverStatus::BudgetExhausted));
                    }
                    prop_assert_eq!(status_updates.len(), 1);
                    prop_assert_eq!(&status_updates[0].to, &next.state);
                    // Replaying what was just applied changes nothing.
                    prop_assert_eq!(transition(Some(&next), event, &topology, now + 1), StepOutcome::Duplicate);
                    // And the state survives its encoding.
                    prop_assert_eq!(&WorkflowState::decode(&next.encode()).expect("decode"), &next);
                    applied_ids.insert(event.event_id.clone());
                    state = Some(next);
                }
                StepOutcome::Duplicate => {
                    prop_assert!(state.as_ref().is_some_and(|s| s.has_seen(&event.event_id)));
                }
                StepOutcome::Unrouted => {
                    prop_assert!(!topology.mentions(&event.event));
                }
                StepOutcome::Invalid { reason } | StepOutcome::Stale { reason } => {
                    prop_assert!(!reason.is_empty());
                }
                StepOutcome::ToolFailed { state: next, failure, status_updates } => {
                    prop_assert_eq!(event.status, ToolStatus::Error);
                    if let Some(previous) = &state {
                        prop_assert_eq!(next.version, previous.version + 1);
                        prop_assert_eq!(&next.state, &previous.state, "a failure stays on its step");
                        prop_assert_eq!(failure.attempt, previous.attempts);
                    }
                    prop_assert_eq!(next.locked_by.as_ref(), None);
                    prop_assert_eq!(next.failure.as_ref(), Some(&failure));
                    prop_assert_eq!(status_updates.len(), 1);
                    prop_assert_eq!(transition(Some(&next), event, &topology, now + 1), StepOutcome::Duplicate);
                    prop_assert_eq!(&WorkflowState::decode(&next.encode()).expect("decode"), &next);
                    applied_ids.insert(event.event_id.clone());
                    // The healer answers with a retry; applying it twice does nothing.
                    let command = crate::control::ControlCommand {
                        command_id: format!("dlq/0/{index}"),
                        context_id: next.context_id.clone(),
                        action: crate::control::ControlAction::Retry,
                        step: failure.step.clone(),
                        attempt: failure.attempt + 1,
                        dlq_topic: "dlq".into(),
                        dlq_partition: 0,
                        dlq_offset: index as i64,
                        not_before: None,
                        reason: None,
                    };
                    let applied = match answer_command(Some(&next), &command, &topology, now) {
                        CommandOutcome::Applied { state: applied, release, .. } => {
                            prop_assert!(release.is_empty());
                            prop_assert_eq!(applied.failure.as_ref(), None);
                            prop_assert_eq!(applied.attempts, failure.attempt + 1);
                            applied
                        }
                        other => {
                            prop_assert!(false, "the retry applies: {:?}", other);
                            unreachable!()
                        }
                    };
                    let again = answer_command(Some(&applied), &command, &topology, now);
                    let duplicate = matches!(again, CommandOutcome::Ignored { duplicate: true, .. });
                    prop_assert!(duplicate, "a second delivery is ignored: {:?}", again);
                    state = Some(applied);
                }
                StepOutcome::Hold => {
                    prop_assert!(state.as_ref().is_some_and(|s| s.failure.is_some()));
                }
            }
        }
    }

    /// The happy path, with the join in any order and either screenshot or
    /// fetch_page, always completes with the exact token arithmetic.
    #[test]
    fn the_happy_path_completes_in_any_join_order(
        valuation_first in any::<bool>(),
        fetch_instead in any::<bool>(),
        costs in vec(0u64..3_000, 4),
    ) {
        let topology = topology();
        let evidence = if fetch_instead { "tool.fetch_page.completed" } else { "tool.browser_take_screenshot.completed" };
        let (a, b) = if valuation_first {
            ("tool.valuation_estimate.completed", evidence)
        } else {
            (evidence, "tool.valuation_estimate.completed")
        };
        let names = ["tool.vision_analyze.completed", "tool.research_enrich.completed", a, b];
        let mut state: Option<WorkflowState> = None;
        let mut handovers = Vec::new();
        for (index, (name, cost)) in names.iter().zip(&costs).enumerate() {
            match transition(state.as_ref(), &event(&format!("e{index}"), name, *cost), &topology, 0) {
                StepOutcome::Applied { state: next, handovers: emitted, .. } => {
                    handovers.extend(emitted);
                    state = Some(next);
                }
                other => prop_assert!(false, "step {} gave {:?}", index, other),
            }
        }
        let state = state.expect("applied");
        let total: u64 = costs.iter().sum();
        prop_assert_eq!(&state.state, "Completed");
        prop_assert_eq!(state.tokens_used, total);
        prop_assert_eq!(state.version, 4);
        let agents: Vec<&str> = handovers.iter().map(|h| h.agent.as_str()).collect();
        prop_assert_eq!(agents, ["researcher", "valuation", "playwright", "reporter"]);
        prop_assert_eq!(handovers[3].token_budget, Some(20_000 - total));
    }
}
