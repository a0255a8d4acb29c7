//! Issue 14's operations checks. The log budget: at the default level a pod
//! writes about its lifecycle, never per record; 10,000 records, poison and
//! failed calls among them, cost fewer than 100 lines, and every line of the
//! JSON format is one JSON object whose partition-loop lines carry the task's
//! span (partition and topics). The same run measures what the StatefulSet's
//! termination grace and probes are sized on: how long a SIGTERM takes, and
//! how long a pod with an empty disk takes to restore and be ready. Then, with
//! no broker: every metric is in the README's catalogue and read by a panel or
//! an alert, and every alert has its runbook section.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use baton::sample;
use common::{Baton, BatonOptions, Broker};
use serde_json::Value;

const RECORDS: usize = 10_000;
const MAX_LINES: usize = 100;
/// docker/k8s/statefulset.yaml gives a pod this long between SIGTERM and
/// SIGKILL, its preStop pause included.
const TERMINATION_GRACE: Duration = Duration::from_secs(30);
const PRE_STOP: Duration = Duration::from_secs(5);

#[test]
fn ten_thousand_records_write_fewer_than_a_hundred_log_lines() {
    let broker = Broker::start();
    broker.create_baton_topics(3);
    let mut options = BatonOptions::new("logs-a");
    options.extra_args = vec!["--log-format".into(), "json".into()];
    let pod = Baton::start(&broker, options);
    common::wait_for("ready", Duration::from_secs(60), || pod.is_ready());

    // Whole workflows with 1% poison and 5% failed screenshots (each a dead
    // letter); cut to exactly RECORDS.
    let mut traffic = sample::vision_research_traffic_with_failures(RECORDS / 4, 1.0, 5.0, 1414);
    assert!(traffic.len() >= RECORDS, "{} records", traffic.len());
    traffic.truncate(RECORDS);
    broker.produce("mcp.events.all", &traffic);
    let series = "baton_records_consumed_total{topic=\"mcp.events.all\"}";
    common::wait_for("every record consumed", Duration::from_secs(120), || {
        pod.metric(series) >= RECORDS as f64
    });
    assert!(
        pod.metric("baton_dlq_records_total{class=\"tool_failed\"}") > 0.0,
        "failed calls were dead-lettered (per-record events happened)"
    );
    // The commit of the last records, then read the log.
    common::wait_for("committed", Duration::from_secs(30), || {
        pod.metric("baton_consumer_lag_records{topic=\"mcp.events.all\",partition=\"0\"}") == 0.0
    });

    let log = pod.log();
    let lines: Vec<&str> = log.lines().filter(|line| !line.trim().is_empty()).collect();
    eprintln!("{} records, {} log lines", RECORDS, lines.len());
    assert!(
        lines.len() < MAX_LINES,
        "{} log lines for {RECORDS} records (limit {MAX_LINES}):\n{log}",
        lines.len()
    );
    let mut in_task = 0;
    for line in &lines {
        let parsed: Value = serde_json::from_str(line)
            .unwrap_or_else(|err| panic!("not one JSON object ({err}): {line}"));
        assert!(parsed["level"].is_string(), "no level: {line}");
        if parsed["fields"]["message"] == "store restored" {
            // The partition loop's span names its partition and topics.
            let span = &parsed["span"];
            assert_eq!(span["name"], "task", "{line}");
            assert!(span["partition"].is_number(), "{line}");
            assert!(
                span["topics"]
                    .as_str()
                    .is_some_and(|topics| topics.contains("mcp.events.all")),
                "{line}"
            );
            in_task += 1;
        }
    }
    assert_eq!(
        in_task, 3,
        "one restore line per partition, in its task's span"
    );

    // SIGTERM: commit, leave the group, flush the stores.
    let mut pod = pod;
    let stopping = Instant::now();
    let status = pod
        .terminate(TERMINATION_GRACE)
        .expect("stops within the grace period");
    let shutdown = stopping.elapsed();
    assert!(status.success(), "clean exit: {status:?}");
    eprintln!("shutdown after SIGTERM: {:.2} s", shutdown.as_secs_f64());
    assert!(
        shutdown + PRE_STOP < TERMINATION_GRACE,
        "shutdown {shutdown:?} plus the preStop pause must fit the grace period"
    );

    // A pod on an empty disk (a rescheduled pod): restore every partition
    // from the changelog, then ready.
    let starting = Instant::now();
    let fresh = Baton::start(&broker, BatonOptions::new("logs-a"));
    common::wait_for(
        "ready after a full restore",
        Duration::from_secs(120),
        || fresh.is_ready(),
    );
    eprintln!(
        "start to ready with a full restore ({} contexts' changelog): {:.2} s",
        RECORDS / 4,
        starting.elapsed().as_secs_f64()
    );
    assert!(fresh.metric("baton_state_restore_records_total{outcome=\"applied\"}") > 0.0);
}

/// Metric names registered in src/metrics.rs (the first string literal of
/// each definition that starts with `baton_`).
fn registered_metrics() -> Vec<String> {
    let source = std::fs::read_to_string(Path::new(common::REPO).join("src/metrics.rs"))
        .expect("src/metrics.rs");
    let mut names: Vec<String> = source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|literal| {
            literal.starts_with("baton_")
                && literal
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn every_metric_is_catalogued_and_read_by_a_panel_or_an_alert() {
    let names = registered_metrics();
    assert!(names.len() >= 60, "found {} metrics", names.len());
    let readme =
        std::fs::read_to_string(Path::new(common::REPO).join("README.md")).expect("README");
    let mut readers =
        std::fs::read_to_string(Path::new(common::REPO).join("docker/prometheus/alerts.yml"))
            .expect("alerts");
    for entry in std::fs::read_dir(Path::new(common::REPO).join("grafana/dashboards")).expect("dir")
    {
        let path = entry.expect("entry").path();
        readers.push_str(&std::fs::read_to_string(path).expect("dashboard"));
    }
    let mut problems = Vec::new();
    for name in &names {
        let row = format!("| `{name}` |");
        if !readme.lines().any(|line| line.starts_with(&row)) {
            problems.push(format!("{name}: no row in the README's metrics catalogue"));
        }
        // The example agents' metrics are served by the agents themselves
        // (src/agent, `--metrics-addr`), which the shipped Prometheus config
        // does not scrape; tests/agents.rs reads them.
        if !name.starts_with("baton_agent_") && !readers.contains(name.as_str()) {
            problems.push(format!("{name}: no dashboard panel or alert reads it"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_alert_has_a_summary_a_description_and_its_runbook_section() {
    let rules =
        std::fs::read_to_string(Path::new(common::REPO).join("docker/prometheus/alerts.yml"))
            .expect("alerts");
    let runbook =
        std::fs::read_to_string(Path::new(common::REPO).join("docs/runbook.md")).expect("runbook");
    let tests =
        std::fs::read_to_string(Path::new(common::REPO).join("docker/prometheus/alerts.test.yml"))
            .expect("alert tests");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 10, "{alerts:?}");
    for part in ["summary: ", "description: ", "runbook_url: "] {
        let count = rules
            .lines()
            .filter(|line| line.trim().starts_with(part))
            .count();
        assert_eq!(count, alerts.len(), "every alert has a {part}");
    }
    for alert in &alerts {
        let anchor = format!("docs/runbook.md#{}", alert.to_ascii_lowercase());
        assert!(
            rules.contains(&anchor),
            "{alert}: runbook_url must point at {anchor}"
        );
        assert!(
            runbook.lines().any(|line| line == format!("## {alert}")),
            "{alert}: no `## {alert}` section in docs/runbook.md"
        );
        // Fires somewhere and stays silent somewhere in the unit tests.
        let evaluations: Vec<&str> = tests
            .split("      - eval_time: ")
            .filter(|block| block.contains(&format!("alertname: {alert}\n")))
            .collect();
        assert!(
            evaluations
                .iter()
                .any(|block| block.contains("exp_alerts: []")),
            "{alert}: no test where it does not fire"
        );
        assert!(
            evaluations
                .iter()
                .any(|block| block.contains("exp_labels:")),
            "{alert}: no test where it fires"
        );
    }
}
