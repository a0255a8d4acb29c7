use std::path::{Path, PathBuf};

use super::*;

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn shipped() -> Topology {
    Topology::load(&repo_path("topology/vision-research.toml"))
        .expect("the shipped topology is valid")
}

/// The problems of an invalid test topology, with the origin stripped so the
/// assertions read like the file's keys.
fn problems_of(file: &str) -> Vec<String> {
    let path = repo_path("tests/topologies").join(file);
    let error = Topology::load(&path).expect_err("the topology is invalid");
    let origin = path.display().to_string();
    let problems: Vec<String> = error
        .problems()
        .iter()
        .map(|problem| {
            assert_eq!(problem.origin, origin, "every problem names its file");
            format!("{}: {}", problem.key, problem.message)
        })
        .collect();
    let rendered = error.to_string();
    assert_eq!(
        rendered.lines().count(),
        problems.len(),
        "one problem per line:\n{rendered}"
    );
    problems
}

#[test]
fn loads_the_shipped_vision_research_contract() {
    let topology = shipped();
    let workflow = topology
        .workflow("vision-research")
        .expect("vision-research");
    assert_eq!(workflow.initial, "VisionAnalyzing");
    assert_eq!(workflow.budget.default_tokens, 20_000);
    assert_eq!(workflow.retry.max_attempts, 3);
    assert_eq!(
        workflow.terminal,
        ["Completed", "BudgetExhausted", "Failed"]
    );

    let first = workflow
        .match_trigger("VisionAnalyzing", "tool.vision_analyze.completed")
        .expect("first");
    assert_eq!(first.transition.to, "ResearcherQueued");
    assert_eq!(
        first.transition.handovers,
        [target(
            "researcher",
            "enrich_reasoning",
            "mcp.handover.researcher"
        )]
    );
    let second = workflow
        .match_trigger("ResearcherQueued", "tool.research_enrich.completed")
        .expect("second");
    assert_eq!(second.transition.to, "DownstreamQueued");
    assert_eq!(
        second.transition.handovers,
        [
            HandoverTarget {
                tool: Some("valuation_estimate".into()),
                ..target("valuation", "estimate_value", "mcp.handover.valuation")
            },
            HandoverTarget {
                tool: Some("browser_take_screenshot".into()),
                ..target("playwright", "capture_evidence", "mcp.handover.playwright")
            },
        ]
    );
    let join = workflow
        .match_trigger("DownstreamQueued", "tool.valuation_estimate.completed")
        .expect("join");
    assert!(join.transition.is_join());
    assert_eq!(join.transition.to, "Completed");
    assert_eq!(
        join.transition.handovers,
        [target("reporter", "summarize", "mcp.handover.reporter")]
    );

    let stand_in = workflow
        .match_trigger("DownstreamQueued", "tool.fetch_page.completed")
        .expect("stand-in");
    assert_eq!(stand_in.trigger, "tool.browser_take_screenshot.completed");
    assert_eq!(stand_in.index, join.index);
    assert_eq!(
        workflow.retry.alternates[0].target(),
        target("fetcher", "fetch_page", "mcp.handover.fetcher")
    );
    let plan_b = workflow.retry.plan_b.as_ref().expect("plan B");
    assert_eq!(plan_b.state, "PlanB");
    assert_eq!(
        plan_b.handover,
        target(
            "researcher",
            "plan_b_manual_review",
            "mcp.handover.researcher"
        )
    );
}

fn target(agent: &str, intent: &str, topic: &str) -> HandoverTarget {
    HandoverTarget {
        agent: agent.into(),
        intent: intent.into(),
        topic: topic.into(),
        tool: None,
    }
}

#[test]
fn mentions_triggers_and_stand_ins_only() {
    let topology = shipped();
    assert!(topology.mentions("tool.vision_analyze.completed"));
    assert!(topology.mentions("tool.browser_take_screenshot.completed"));
    assert!(topology.mentions("tool.fetch_page.completed"));
    assert!(!topology.mentions("tool.calendar_lookup.completed"));
    assert_eq!(
        topology
            .starting_with("tool.vision_analyze.completed")
            .map(|w| w.name.as_str()),
        Some("vision-research")
    );
    assert!(
        topology
            .starting_with("tool.research_enrich.completed")
            .is_none()
    );
}

#[test]
fn output_topics_cover_handovers_alternates_and_plan_b() {
    let topics: Vec<String> = shipped().output_topics().into_iter().collect();
    assert_eq!(
        topics,
        [
            "mcp.handover.fetcher",
            "mcp.handover.playwright",
            "mcp.handover.reporter",
            "mcp.handover.researcher",
            "mcp.handover.valuation",
        ]
    );
}

#[test]
fn loads_a_directory_ignoring_other_files() {
    let topology = Topology::load(&repo_path("topology")).expect("topology/ is valid");
    let names: Vec<&str> = topology.workflows().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["research-with-approval", "vision-research"]);
}

#[test]
fn loads_several_files_from_a_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    for file in [
        "topology/vision-research.toml",
        "tests/topologies/no-fallback.toml",
    ] {
        let source = repo_path(file);
        let name = source.file_name().expect("file name");
        std::fs::copy(&source, dir.path().join(name)).expect("copy");
    }
    let topology = Topology::load(dir.path()).expect("both are valid together");
    let names: Vec<&str> = topology.workflows().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["linear-review", "vision-research"]);
    assert!(
        topology
            .workflow("linear-review")
            .expect("linear")
            .retry
            .plan_b
            .is_none()
    );
}

#[test]
fn a_bad_duration_names_its_file_and_key() {
    let problems = problems_of("invalid-timeout.toml");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].starts_with("line "), "{problems:?}");
    assert!(
        problems[0].contains("`two minutes` is not a duration"),
        "{problems:?}"
    );
    let path = repo_path("tests/topologies/invalid-timeout.toml");
    let rendered = Topology::load(&path).expect_err("invalid").to_string();
    assert!(rendered.contains("invalid-timeout.toml"), "{rendered}");
    assert!(rendered.contains("timeout"), "{rendered}");
}

#[test]
fn timeouts_and_approval_gates_are_validated() {
    let problems = problems_of("invalid-timers.toml");
    let expect = |needle: &str| {
        assert!(
            problems.iter().any(|p| p.contains(needle)),
            "no problem mentions `{needle}`: {problems:?}"
        );
    };
    expect("state.ResearcherQueued.timeout: an approval gate needs a timeout");
    expect("state.ResearcherQueued.on_timeout: an approval gate needs");
    expect(
        "state.ResearcherQueued: an approval gate needs a transition from `ResearcherQueued` on `approval.granted`",
    );
    expect("state.DownstreamQueued.heartbeat_timeout: 5m is longer than the state's timeout (1m)");
    expect("state.DownstreamQueued.on_timeout: only an approval gate");
    expect("state.Completed: `Completed` is terminal");
    expect("state.ResearcherQueued2: unknown state `ResearcherQueued2`");
}

#[test]
fn an_empty_directory_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("README.md"), "not a workflow").expect("write");
    let error = Topology::load(dir.path()).expect_err("empty");
    assert!(matches!(error, TopologyError::Empty { .. }), "{error}");
}

#[test]
fn a_missing_path_is_a_read_error() {
    let error = Topology::load(&repo_path("tests/topologies/absent.toml")).expect_err("absent");
    assert!(matches!(error, TopologyError::Read { .. }), "{error}");
    assert!(error.to_string().contains("absent.toml"));
}

#[test]
fn the_same_workflow_twice_is_an_error() {
    let definition = shipped()
        .workflow("vision-research")
        .cloned()
        .expect("definition");
    let mut twin = definition.clone();
    twin.origin = Some(PathBuf::from("elsewhere.toml"));
    let error = Topology::from_definitions(vec![definition, twin]).expect_err("twice");
    let problems: Vec<String> = error.problems().iter().map(Problem::to_string).collect();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0]
            .starts_with("elsewhere.toml: name: workflow `vision-research` is also defined in")
    );
}

#[test]
fn two_workflows_starting_on_the_same_event_are_ambiguous() {
    let original = shipped()
        .workflow("vision-research")
        .cloned()
        .expect("definition");
    let mut copy = original.clone();
    copy.name = "vision-copy".into();
    copy.origin = None;
    let error = Topology::from_definitions(vec![original, copy]).expect_err("ambiguous");
    let problems: Vec<String> = error.problems().iter().map(Problem::to_string).collect();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with(
            "workflow `vision-copy`: initial: `tool.vision_analyze.completed` also starts workflow `vision-research`"
        ),
        "{problems:?}"
    );
}

#[test]
fn reports_unknown_states_and_what_they_make_unreachable() {
    assert_eq!(
        problems_of("invalid-unknown-state.toml"),
        [
            "transitions[1].to: unknown state `Don` (declare it in `states`)",
            "states[2]: `Done` is unreachable: no chain of transitions leads to it from `Drafting` or a policy state",
        ]
    );
}

#[test]
fn reports_unreachable_states() {
    assert_eq!(
        problems_of("invalid-unreachable.toml"),
        [
            "states[3]: `Archived` is unreachable: no chain of transitions leads to it from `Drafting` or a policy state"
        ]
    );
}

#[test]
fn reports_duplicate_triggers() {
    assert_eq!(
        problems_of("invalid-duplicate-trigger.toml"),
        [
            "transitions[2].on[0]: duplicate trigger `tool.draft_write.completed` from state `Drafting` (also transitions[0])"
        ]
    );
}

#[test]
fn reports_empty_and_illegal_topics() {
    assert_eq!(
        problems_of("invalid-empty-topic.toml"),
        [
            "transitions[0].handovers[0].topic: missing or empty",
            "transitions[1].handovers[0].topic: `mcp handover archivist` is not a legal Kafka topic name",
        ]
    );
}

#[test]
fn reports_a_missing_topic_with_its_line() {
    let problems = problems_of("invalid-missing-topic.toml");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].starts_with("line 20, column"), "{problems:?}");
    assert!(
        problems[0].contains("missing field `topic`"),
        "{problems:?}"
    );
}

#[test]
fn reports_a_join_listing_an_event_twice() {
    assert_eq!(
        problems_of("invalid-join-twice.toml"),
        [
            "transitions[1].on[1]: join can never complete: `tool.review_check.completed` is listed twice"
        ]
    );
}

#[test]
fn reports_a_join_shadowed_by_a_single_trigger() {
    assert_eq!(
        problems_of("invalid-join-shadowed.toml"),
        [
            "transitions[2].on[0]: `tool.lint_check.completed` from `Reviewing` is also part of the join in \
             transitions[1], which could then never complete"
        ]
    );
}

#[test]
fn reports_an_alternate_for_a_tool_nobody_waits_for() {
    assert_eq!(
        problems_of("invalid-alternate.toml"),
        ["retry.alternates[0].tool: no transition waits for `tool.spellcheck.completed`"]
    );
}

#[test]
fn reports_zero_max_attempts() {
    assert_eq!(
        problems_of("invalid-max-attempts.toml"),
        ["retry.max_attempts: must be at least 1: 0 attempts would never dispatch a step"]
    );
}

#[test]
fn reports_transitions_out_of_terminal_states() {
    assert_eq!(
        problems_of("invalid-terminal-exit.toml"),
        ["transitions[2].from[0]: `Done` is terminal: terminal states absorb every event"]
    );
}

#[test]
fn reports_an_undeclared_initial_state() {
    assert_eq!(
        problems_of("invalid-initial.toml"),
        ["initial: unknown state `Start` (declare it in `states`)"]
    );
}

#[test]
fn rejects_unknown_keys() {
    let problems = problems_of("invalid-unknown-key.toml");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("line 13, column 1: unknown field `retries`"),
        "{problems:?}"
    );
}

#[test]
fn a_stand_in_that_is_also_a_trigger_is_ambiguous() {
    let mut definition = shipped()
        .workflow("vision-research")
        .cloned()
        .expect("definition");
    definition.origin = None;
    definition.transitions[2]
        .on
        .push("tool.fetch_page.completed".into());
    let error = Topology::from_definitions(vec![definition]).expect_err("ambiguous");
    let problems: Vec<String> = error.problems().iter().map(Problem::to_string).collect();
    assert_eq!(
        problems,
        [
            "workflow `vision-research`: transitions[2].on[2]: `tool.fetch_page.completed` would count for both \
             `tool.browser_take_screenshot.completed` and `tool.fetch_page.completed`"
        ]
    );
}

#[test]
fn policy_states_must_be_terminal_and_every_problem_is_reported() {
    let mut definition = shipped()
        .workflow("vision-research")
        .cloned()
        .expect("definition");
    definition.origin = None;
    definition.terminal.retain(|state| state != "Failed");
    definition.retry.max_attempts = 0;
    definition.transitions[0].handovers[0].intent = String::new();
    let error = Topology::from_definitions(vec![definition]).expect_err("invalid");
    assert_eq!(
        error.to_string(),
        "workflow `vision-research`: retry.failed_state: `Failed` must be listed in `terminal`: nothing may follow it\n\
         workflow `vision-research`: retry.max_attempts: must be at least 1: 0 attempts would never dispatch a step\n\
         workflow `vision-research`: transitions[0].handovers[0].intent: missing or empty"
    );
}

#[test]
fn the_shipped_file_round_trips_through_serde() {
    let definition = shipped()
        .workflow("vision-research")
        .cloned()
        .expect("definition");
    let text = toml::to_string(&definition).expect("serialise");
    let mut back: WorkflowDefinition = toml::from_str(&text).expect("parse");
    back.origin = definition.origin.clone();
    assert_eq!(back, definition);
}
