//! The example agents (`examples/agents`) against the real broker, a baton
//! pod and the healer: every context reaches an end, every handover that
//! asks for work is answered exactly once, and an agent killed mid-work and
//! restarted still answers each handover once.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Baton, BatonOptions, Broker, Healer, REPO, Reader, Record};
use serde_json::Value;

/// The example binary, built next to this test by `cargo test`/`nextest`
/// (cargo builds examples with the test targets).
pub fn agents_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let debug = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/debug/deps/..");
    let binary = debug.join("examples").join("agents");
    assert!(
        binary.exists(),
        "{} is missing: `cargo build --examples` (cargo test builds it)",
        binary.display()
    );
    binary
}

/// One example agent process, SIGKILLed on drop.
struct Agent {
    child: Option<Child>,
    role: String,
    args: Vec<String>,
    log: PathBuf,
}

impl Agent {
    fn start(broker: &Broker, role: &str, args: &[&str]) -> Agent {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let log = std::env::temp_dir().join(format!(
            "baton-agent-{}-{role}-{}.log",
            std::process::id(),
            common::free_port()
        ));
        let mut agent = Agent {
            child: None,
            role: role.to_owned(),
            args,
            log,
        };
        agent.spawn(broker);
        agent
    }

    fn spawn(&mut self, broker: &Broker) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new(agents_binary())
            .arg(&self.role)
            .args(["--bootstrap-servers", &broker.bootstrap])
            .args(["--kafka-prop", "consumer.session.timeout.ms=6000"])
            .args(["--kafka-prop", "consumer.heartbeat.interval.ms=500"])
            .args(&self.args)
            .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
            .env_remove("BATON_BOOTSTRAP_SERVERS")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("the agent starts");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn restart(&mut self, broker: &Broker) {
        self.kill();
        self.spawn(broker);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.role, self.log());
        }
    }
}

fn json(record: &Record) -> Option<Value> {
    serde_json::from_slice(&record.value).ok()
}

/// Tool-completed events that answer a handover, by `handover_id`: each
/// record's JSON.
fn answers(records: &[Record]) -> BTreeMap<String, Vec<Value>> {
    let mut by_handover: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for record in records.iter().filter(|r| r.topic == "mcp.events.all") {
        if let Some(value) = json(record)
            && let Some(id) = value["handover_id"].as_str()
        {
            by_handover.entry(id.to_owned()).or_default().push(value);
        }
    }
    by_handover
}

/// Handovers that ask for work (not a PlanB review), deduplicated by id.
fn work_handovers(records: &[Record], topic_prefix: &str) -> BTreeMap<String, Value> {
    records
        .iter()
        .filter(|r| r.topic.starts_with(topic_prefix))
        .filter_map(json)
        .filter(|h| {
            matches!(
                h["status"].as_str(),
                Some("queued" | "retrying" | "fallback")
            ) && h["intent"] != "plan_b_manual_review"
        })
        .filter_map(|h| {
            h["handover_id"]
                .as_str()
                .map(|id| (id.to_owned(), h.clone()))
        })
        .collect()
}

fn state(pod: &Baton, context: &str) -> Option<String> {
    common::state_of(&[pod], context).and_then(|s| s["state"].as_str().map(str::to_owned))
}

const ENDS: [&str; 4] = ["Completed", "PlanB", "BudgetExhausted", "Failed"];

#[test]
fn the_example_agents_drive_every_context_of_the_workflow_to_an_end() {
    let broker = Broker::start();
    broker.create_baton_topics(3);
    let topology = Path::new(REPO).join("topology");
    let pod = Baton::start(&broker, BatonOptions::new("agents-pod-0"));
    common::wait_for("the pod is ready", Duration::from_secs(60), || {
        pod.is_ready()
    });
    let _healer = Healer::start(&broker, "agents-healer", &topology);
    let fast = [
        "--work-ms",
        "50",
        "--heartbeat-interval-ms",
        "20",
        "--retry-backoff-ms",
        "50",
    ];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        fast.iter().copied().chain(extra.iter().copied()).collect()
    };
    let _researcher = Agent::start(&broker, "researcher", &with(&[]));
    let _valuation = Agent::start(&broker, "valuation", &with(&[]));
    let _playwright = Agent::start(&broker, "playwright", &with(&["--failure-percent", "40"]));
    let _fetcher = Agent::start(&broker, "fetcher", &with(&["--failure-percent", "50"]));
    let _reporter = Agent::start(&broker, "reporter", &with(&[]));
    let contexts = 24;
    let mut source = Agent::start(
        &broker,
        "vision-source",
        &[
            "--contexts",
            "24",
            "--rate",
            "50",
            "--context-prefix",
            "run1",
            "--small-budget-percent",
            "20",
        ],
    );

    let ids: Vec<String> = (0..contexts).map(|n| format!("run1-{n}")).collect();
    let ended = |pod: &Baton| {
        ids.iter()
            .filter(|id| state(pod, id).is_some_and(|s| ENDS.contains(&s.as_str())))
            .count()
    };
    // For people: the dashboard while the agents work (README.md shows it;
    // BATON_UPDATE_SCREENSHOT=1 writes it to docs/dashboard-demo.png).
    if let Some(chromium) = common::browser::chromium() {
        common::wait_for(
            "a third of the contexts ended",
            Duration::from_secs(150),
            || ended(&pod) >= contexts / 3,
        );
        let url = format!(
            "http://127.0.0.1:{}/#token={}",
            pod.http_port,
            common::HTTP_TOKEN
        );
        let png = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-demo.png");
        common::browser::screenshot(&chromium, &url, Duration::from_secs(3), (1440, 900), &png);
        let bytes = std::fs::read(&png).expect("the screenshot");
        assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
        if std::env::var_os("BATON_UPDATE_SCREENSHOT").is_some() {
            std::fs::copy(&png, Path::new(REPO).join("docs/dashboard-demo.png")).expect("copy");
        }
        eprintln!("dashboard screenshot: {}", png.display());
    } else {
        eprintln!("no chromium: the dashboard screenshot is skipped");
    }
    common::wait_for(
        "every context at an end state",
        Duration::from_secs(150),
        || {
            ids.iter()
                .all(|id| state(&pod, id).is_some_and(|s| ENDS.contains(&s.as_str())))
        },
    );
    source.kill();
    let mut ends: BTreeMap<String, usize> = BTreeMap::new();
    for id in &ids {
        *ends.entry(state(&pod, id).expect("state")).or_default() += 1;
    }
    eprintln!("end states: {ends:?}");
    assert!(ends.get("Completed").copied().unwrap_or(0) > 0, "{ends:?}");
    assert!(
        ends.get("BudgetExhausted").copied().unwrap_or(0) > 0,
        "some contexts have a budget smaller than research costs: {ends:?}"
    );

    // Every handover that asked for work was answered exactly once, by an
    // event whose id derives from the handover's.
    let mut reader = Reader::new(
        &broker,
        &[
            "mcp.events.all",
            "mcp.memory",
            "mcp.handover.researcher",
            "mcp.handover.valuation",
            "mcp.handover.playwright",
            "mcp.handover.fetcher",
            "mcp.handover.reporter",
        ],
    );
    let asked = work_handovers(&reader_records(&mut reader), "mcp.handover.");
    let answered = answers(&reader.records);
    for (id, handover) in &asked {
        let Some(answers) = answered.get(id) else {
            panic!("handover {id} was never answered: {handover}");
        };
        assert_eq!(answers.len(), 1, "handover {id} answered {answers:?}");
        let tool = answers[0]["tool"].as_str().expect("tool");
        assert_eq!(answers[0]["event_id"], format!("{id}.{tool}"));
        assert!(answers[0]["usage"]["output_tokens"].as_u64().is_some());
    }
    assert!(answered.keys().all(|id| asked.contains_key(id)));
    // Snapshots were fetched: no research call failed.
    let research: Vec<&Value> = answered
        .values()
        .flatten()
        .filter(|a| a["tool"] == "research_enrich")
        .collect();
    assert!(!research.is_empty());
    assert!(research.iter().all(|a| a["status"] == "ok"), "{research:?}");
    // Failed screenshots were answered with status=error, and healed.
    assert!(
        answered
            .values()
            .flatten()
            .any(|a| a["tool"] == "browser_take_screenshot" && a["status"] == "error"),
        "40% of screenshots fail"
    );
    // The researcher wrote what it learned to memory; the agents heartbeat.
    let memories = reader
        .topic("mcp.memory")
        .iter()
        .filter_map(|r| json(r))
        .filter(|m| m["key"] == "research_summary")
        .count();
    assert_eq!(memories, research.len());
    assert!(pod.metric("baton_heartbeats_total{outcome=\"accepted\"}") > 0.0);
}

fn reader_records(reader: &mut Reader) -> Vec<Record> {
    reader.poll_to_end();
    reader.records.clone()
}

#[test]
fn an_agent_killed_mid_work_and_restarted_answers_each_handover_once() {
    let broker = Broker::start();
    broker.create_baton_topics(2);
    let pod = Baton::start(&broker, BatonOptions::new("agents-kill-pod"));
    common::wait_for("the pod is ready", Duration::from_secs(60), || {
        pod.is_ready()
    });
    let dir = tempfile::tempdir().expect("dir");
    let dedup_file = dir.path().join("researcher.seen");
    let metrics_port = common::free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut researcher = Agent::start(
        &broker,
        "researcher",
        &[
            "--work-ms",
            "1500",
            "--heartbeat-interval-ms",
            "200",
            "--dedup-file",
            dedup_file.to_str().expect("utf-8"),
            "--metrics-addr",
            &metrics_addr,
        ],
    );
    let contexts = 6;
    let _source = Agent::start(
        &broker,
        "vision-source",
        &[
            "--contexts",
            "6",
            "--rate",
            "50",
            "--context-prefix",
            "kill",
            "--small-budget-percent",
            "0",
        ],
    );
    let mut reader = Reader::new(&broker, &["mcp.events.all", "mcp.handover.researcher"]);
    let heartbeats_of = |records: &[Record]| -> BTreeSet<String> {
        records
            .iter()
            .filter_map(json)
            .filter(|e| e["event"] == "agent.heartbeat" && e["agent"] == "researcher")
            .filter_map(|e| e["context_id"].as_str().map(str::to_owned))
            .collect()
    };
    // Twice: wait until the researcher is working on a context it has not
    // answered, kill it there, start it again.
    let mut killed_on = Vec::new();
    for _ in 0..2 {
        reader.wait_until(
            "the researcher working on an unanswered context",
            Duration::from_secs(60),
            |records| {
                let done: BTreeSet<String> = answers(records)
                    .values()
                    .flatten()
                    .filter_map(|a| a["context_id"].as_str().map(str::to_owned))
                    .collect();
                heartbeats_of(records)
                    .iter()
                    .any(|c| !done.contains(c) && !killed_on.contains(c))
            },
        );
        let done: BTreeSet<String> = answers(&reader.records)
            .values()
            .flatten()
            .filter_map(|a| a["context_id"].as_str().map(str::to_owned))
            .collect();
        let working = heartbeats_of(&reader.records)
            .into_iter()
            .find(|c| !done.contains(c) && !killed_on.contains(c))
            .expect("a context in progress");
        researcher.kill();
        killed_on.push(working);
        researcher.restart(&broker);
    }
    reader.wait_until(
        "every context researched",
        Duration::from_secs(120),
        |records| {
            let contexts_answered: BTreeSet<String> = answers(records)
                .values()
                .flatten()
                .filter_map(|a| a["context_id"].as_str().map(str::to_owned))
                .collect();
            contexts_answered.len() >= contexts
        },
    );
    reader.poll_to_end();
    let asked = work_handovers(&reader.records, "mcp.handover.researcher");
    let answered = answers(&reader.records);
    assert_eq!(asked.len(), contexts, "one research handover per context");
    for (id, answers) in &answered {
        assert!(asked.contains_key(id));
        assert_eq!(
            answers.len(),
            1,
            "handover {id} answered more than once (killed on {killed_on:?}): {answers:?}"
        );
    }
    for context in &killed_on {
        assert!(
            answered
                .values()
                .flatten()
                .any(|a| a["context_id"] == context.as_str()),
            "the context {context} the agent was killed on was answered after the restart"
        );
    }

    // A copy of an answered handover, sent again: the restarted agent's
    // persisted filter skips it.
    let first = reader
        .topic("mcp.handover.researcher")
        .into_iter()
        .find(|r| {
            json(r).is_some_and(|h| {
                h["handover_id"]
                    .as_str()
                    .is_some_and(|id| answered.contains_key(id))
            })
        })
        .cloned()
        .expect("an answered handover");
    broker.produce_raw(
        "mcp.handover.researcher",
        &[common::RawRecord {
            partition: None,
            key: first.key.clone(),
            value: first.value.clone(),
            headers: vec![],
        }],
    );
    let duplicate = "baton_agent_handovers_total{agent=\"researcher\",outcome=\"duplicate\"}";
    common::wait_for(
        "the copy skipped as a duplicate",
        Duration::from_secs(30),
        || scrape(metrics_port, duplicate) >= 1.0,
    );
    reader.poll_available();
    let again = answers(&reader.records);
    assert!(again.values().all(|a| a.len() == 1), "no second answer");
}

/// One series from the agent's `--metrics-addr`, 0 when absent.
fn scrape(port: u16, series: &str) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return 0.0;
    };
    let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n");
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

#[test]
fn a_canonical_event_whose_occurred_at_is_epoch_milliseconds_is_handed_over() {
    let broker = Broker::start();
    broker.create_baton_topics(1);
    let pod = Baton::start(&broker, BatonOptions::new("agents-epoch-pod"));
    common::wait_for("the pod is ready", Duration::from_secs(60), || {
        pod.is_ready()
    });
    // What a JavaScript producer writes: `occurred_at: Date.now()`.
    let event = serde_json::json!({
        "event_id": "e-epoch-1", "context_id": "ctx-epoch", "event": "tool.vision_analyze.completed",
        "tool": "vision_analyze", "arguments": {}, "result": {"caption": "a bicycle"},
        "usage": {"input_tokens": 3, "output_tokens": 4}, "occurred_at": 1_764_651_600_250_i64,
    });
    broker.produce_raw(
        "mcp.events.all",
        &[common::RawRecord {
            partition: None,
            key: Some(b"ctx-epoch".to_vec()),
            value: event.to_string().into_bytes(),
            headers: vec![],
        }],
    );
    let mut reader = Reader::new(&broker, &["mcp.handover.researcher", "mcp.events.dlq"]);
    reader.wait_until(
        "the researcher's handover",
        Duration::from_secs(30),
        |records| records.iter().any(|r| r.topic == "mcp.handover.researcher"),
    );
    reader.poll_to_end();
    assert!(
        reader.topic("mcp.events.dlq").is_empty(),
        "nothing dead-lettered"
    );
    assert_eq!(
        state(&pod, "ctx-epoch").as_deref(),
        Some("ResearcherQueued")
    );
}

/// Node and npm, if installed (scripts/prereqs.sh installs them with apt).
fn node_and_npm() -> Option<(PathBuf, PathBuf)> {
    let find = |name: &str| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.is_file())
        })
    };
    Some((find("node")?, find("npm")?))
}

/// A `node` process, SIGKILLed on drop (its log is printed if the test fails).
struct NodeAgent {
    child: Child,
    log: PathBuf,
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- typescript researcher log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

#[test]
fn the_typescript_researcher_completes_50_contexts() {
    let Some((node, npm)) = node_and_npm() else {
        eprintln!(
            "SKIPPED: node and npm are not installed (scripts/prereqs.sh installs them: apt-get install nodejs npm)"
        );
        return;
    };
    let dir = Path::new(REPO).join("examples/typescript/researcher");
    for step in [
        &["ci", "--no-audit", "--no-fund", "--loglevel=error"][..],
        &["run", "build"],
    ] {
        let status = Command::new(&npm)
            .args(step)
            .current_dir(&dir)
            .status()
            .expect("npm runs");
        assert!(status.success(), "npm {step:?} in {}", dir.display());
    }
    let broker = Broker::start();
    broker.create_baton_topics(3);
    let pod = Baton::start(&broker, BatonOptions::new("agents-ts-pod"));
    common::wait_for("the pod is ready", Duration::from_secs(60), || {
        pod.is_ready()
    });
    let log = std::env::temp_dir().join(format!(
        "baton-agent-ts-{}-{}.log",
        std::process::id(),
        common::free_port()
    ));
    let log_file = std::fs::File::create(&log).expect("log");
    let child = Command::new(&node)
        .arg(dir.join("dist/researcher.js"))
        .args(["--bootstrap-servers", &broker.bootstrap])
        .args(["--work-ms", "10", "--heartbeat-interval-ms", "50"])
        .env("KAFKAJS_NO_PARTITIONER_WARNING", "1")
        .stdout(log_file.try_clone().expect("log"))
        .stderr(log_file)
        .spawn()
        .expect("node starts");
    let _researcher = NodeAgent { child, log };
    let contexts = 50;
    let _source = Agent::start(
        &broker,
        "vision-source",
        &[
            "--contexts",
            "50",
            "--rate",
            "100",
            "--context-prefix",
            "ts",
            "--small-budget-percent",
            "0",
        ],
    );
    let mut reader = Reader::new(
        &broker,
        &[
            "mcp.events.all",
            "mcp.memory",
            "mcp.handover.researcher",
            "mcp.events.dlq",
        ],
    );
    let researched = |records: &[Record]| -> BTreeSet<String> {
        answers(records)
            .values()
            .flatten()
            .filter(|a| a["tool"] == "research_enrich")
            .filter_map(|a| a["context_id"].as_str().map(str::to_owned))
            .collect()
    };
    reader.wait_until(
        "50 contexts researched by the TypeScript agent",
        Duration::from_secs(120),
        |records| researched(records).len() >= contexts,
    );
    let ids: Vec<String> = (0..contexts).map(|n| format!("ts-{n}")).collect();
    common::wait_for(
        "every context past the research step",
        Duration::from_secs(60),
        || {
            ids.iter()
                .all(|id| state(&pod, id).as_deref() == Some("DownstreamQueued"))
        },
    );
    reader.poll_to_end();
    let asked = work_handovers(&reader.records, "mcp.handover.researcher");
    let answered = answers(&reader.records);
    assert_eq!(asked.len(), contexts);
    for (id, answers) in &answered {
        assert!(asked.contains_key(id), "answers only handovers: {id}");
        assert_eq!(answers.len(), 1, "handover {id} answered {answers:?}");
        let answer = &answers[0];
        assert_eq!(answer["status"], "ok");
        assert_eq!(answer["result"]["written_in"], "typescript");
        assert!(
            answer["occurred_at"].is_u64(),
            "Date.now(), as JavaScript writes it: {answer}"
        );
        assert!(answer["usage"]["input_tokens"].as_u64().unwrap_or(0) > 0);
    }
    assert!(
        reader.topic("mcp.events.dlq").is_empty(),
        "epoch-millisecond times are accepted: nothing dead-lettered"
    );
    let memories = reader
        .topic("mcp.memory")
        .iter()
        .filter_map(|r| json(r))
        .filter(|m| m["key"] == "research_summary")
        .count();
    assert_eq!(memories, contexts);
    assert!(pod.metric("baton_heartbeats_total{outcome=\"accepted\"}") > 0.0);
}
