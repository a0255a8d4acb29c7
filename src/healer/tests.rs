use super::*;
use crate::topology::Topology;

fn shipped() -> Topology {
    Topology::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/topology"
    )))
    .expect("the shipped topology loads")
}

fn failed(event: &str, step: &str, attempts: u32) -> DeadLetterView {
    DeadLetterView {
        class: Some("tool_failed".into()),
        reason: Some("boom".into()),
        context_id: Some("ctx-1".into()),
        workflow: Some("vision-research".into()),
        step: Some(step.into()),
        attempts: Some(attempts),
        failed_event: Some(event.into()),
        locked_by: Some("valuation".into()),
    }
}

const SCREENSHOT: &str = "tool.browser_take_screenshot.completed";
const FETCH: &str = "tool.fetch_page.completed";

fn command(action: ControlAction, attempt: u32, delay_ms: u64) -> Decision {
    Decision::Command {
        action,
        step: "DownstreamQueued".into(),
        attempt,
        delay_ms,
    }
}

#[test]
fn retries_with_backoff_then_falls_back_then_plan_b() {
    let topology = shipped();
    let decide = |event, attempts| decide(&topology, &failed(event, "DownstreamQueued", attempts));
    assert_eq!(
        decide(SCREENSHOT, 1),
        command(ControlAction::Retry, 2, 1_000)
    );
    assert_eq!(
        decide(SCREENSHOT, 2),
        command(ControlAction::Retry, 3, 2_000)
    );
    assert_eq!(
        decide(SCREENSHOT, 3),
        command(ControlAction::Alternate, 4, 0)
    );
    // The alternate gets its own attempts, then plan B.
    assert_eq!(decide(FETCH, 4), command(ControlAction::Retry, 5, 1_000));
    assert_eq!(decide(FETCH, 5), command(ControlAction::Retry, 6, 2_000));
    assert_eq!(decide(FETCH, 6), command(ControlAction::PlanB, 7, 0));
    // A tool without an alternate goes to plan B directly.
    assert_eq!(
        decide("tool.valuation_estimate.completed", 3),
        command(ControlAction::PlanB, 4, 0)
    );
}

#[test]
fn the_initial_step_cannot_be_retried_and_plan_b_is_not_re_entered() {
    let topology = shipped();
    // Nobody dispatched vision_analyze: no retry target, no alternate.
    let decision = decide(
        &topology,
        &failed("tool.vision_analyze.completed", "VisionAnalyzing", 0),
    );
    assert_eq!(
        decision,
        Decision::Command {
            action: ControlAction::PlanB,
            step: "VisionAnalyzing".into(),
            attempt: 1,
            delay_ms: 0
        }
    );
    // A failure after plan B has nowhere left to go.
    let decision = decide(&topology, &failed(FETCH, "PlanB", 7));
    match decision {
        Decision::Park { fail, .. } => assert_eq!(fail, Some(("PlanB".into(), 8))),
        other => panic!("parked, not {other:?}"),
    }
}

#[test]
fn poison_classes_and_incomplete_records_are_parked_at_once() {
    let topology = shipped();
    for class in ErrorClass::ALL {
        // A failed call and a timed-out one are healed, not parked at once.
        if matches!(class, ErrorClass::ToolFailed | ErrorClass::StepTimedOut) {
            continue;
        }
        let letter = DeadLetterView {
            class: Some(class.as_str().into()),
            reason: Some("why".into()),
            ..DeadLetterView::default()
        };
        match decide(&topology, &letter) {
            Decision::Park { reason, fail } => {
                assert!(
                    reason.contains(class.as_str()) && reason.contains("why"),
                    "{reason}"
                );
                assert_eq!(fail, None);
            }
            other => panic!("{class}: parked, not {other:?}"),
        }
    }
    let mut letter = failed(SCREENSHOT, "DownstreamQueued", 1);
    letter.workflow = Some("nope".into());
    assert!(matches!(
        decide(&topology, &letter),
        Decision::Park { fail: None, .. }
    ));
    letter.workflow = None;
    assert!(matches!(
        decide(&topology, &letter),
        Decision::Park { fail: None, .. }
    ));
    assert!(matches!(
        decide(&topology, &DeadLetterView::default()),
        Decision::Park { .. }
    ));
}

#[test]
fn a_retry_is_never_held_past_the_maximum_backoff() {
    let topology = shipped();
    let max = topology
        .workflow("vision-research")
        .expect("workflow")
        .retry
        .max_backoff_ms as i64;
    let now = 1_700_000_000_000;
    // After the record's own timestamp...
    assert_eq!(
        retry_due_cap(&topology, "DownstreamQueued", now - 1_000, now),
        now - 1_000 + max
    );
    // ...or now, when the timestamp lies ahead (it is the writer's word too).
    let year = 365 * 86_400 * 1_000;
    assert_eq!(
        retry_due_cap(&topology, "DownstreamQueued", now + year, now),
        now + max
    );
    // A step no workflow has still gets the largest maximum of them all.
    assert_eq!(retry_due_cap(&topology, "Nowhere", now, now), now + max);
}
