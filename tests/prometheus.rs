//! Issue 14's proof with a real Prometheus: Debian's `prometheus` scrapes two
//! baton pods and the healer while they work through traffic with poison, tool
//! failures (retried, moved to PlanB), an exhausted budget and a restore; then
//! every query of every dashboard panel, annotation and template variable,
//! and every alert expression, is evaluated through Prometheus's HTTP API. A
//! query that is invalid or returns no series fails the test, naming the
//! dashboard and panel (or the alert). On the way, `baton_workflows` summed
//! over the pods must count every context exactly once after the kill, the
//! restore and the rebalance.
//!
//! How alert expressions are checked: an alert's condition is legitimately
//! false on a healthy system ("lag growing for 10 minutes"), so its raw
//! expression returns nothing. Each expression is split at its top-level set
//! operators (`and`, `or`, `unless`); in each operand the top-level comparison
//! gets the `bool` modifier (`x > 0` becomes `x > bool 0`), which keeps every
//! series of the comparison's left side with a value of 0 or 1. Every operand
//! must return at least one series: the metrics the alert reads exist and
//! its labels match. Prometheus's own rule health (`/api/v1/rules`) must also
//! be `ok` for every rule, so the rules it evaluates itself are valid.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use baton::sample::{self, SampleRecord};
use common::{Baton, BatonOptions, Broker, Healer};
use serde_json::{Value, json};

const PARTITIONS: i32 = 3;
const INPUT: &str = "mcp.events.all";
/// What `$__rate_interval` and `$__range` stand for: Prometheus scrapes
/// every second here, so a minute holds sixty samples.
const RATE_INTERVAL: &str = "1m";
const RANGE: &str = "15m";

/// Debian's prometheus, installed by scripts/prereqs.sh (`install_prometheus`)
/// where missing; `BATON_PROMETHEUS` names another binary.
fn prometheus_binary() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("BATON_PROMETHEUS") {
        return Some(PathBuf::from(path));
    }
    let on_path = || {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("prometheus"))
                .find(|candidate| candidate.is_file())
        })
    };
    if let Some(found) = on_path() {
        return Some(found);
    }
    let script = Path::new(common::REPO).join("scripts/prereqs.sh");
    let installed = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source '{}' && install_prometheus",
            script.display()
        ))
        .status();
    eprintln!("prometheus was missing; scripts/prereqs.sh install_prometheus: {installed:?}");
    on_path()
}

/// A Prometheus server on a loopback port, killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    /// The file the pods' targets are discovered from.
    targets: PathBuf,
    _data: tempfile::TempDir,
    log: PathBuf,
}

impl Prometheus {
    fn start(binary: &Path, pods: &[&Baton], healer: &Healer) -> Prometheus {
        let data = tempfile::tempdir().expect("prometheus dir");
        let port = common::free_port();
        let rules = Path::new(common::REPO).join("docker/prometheus/alerts.yml");
        // The pods come from a file Prometheus watches, as service discovery
        // would: a restarted pod listens on a new port.
        let targets = data.path().join("pods.json");
        write_targets(&targets, pods);
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: baton\n    file_sd_configs:\n      - files: [\"{targets}\"]\n        refresh_interval: 1s\n\
             \x20 - job_name: baton-healer\n    static_configs:\n      - targets: [\"127.0.0.1:{healer}\"]\n        labels:\n          pod: {healer_id}\n",
            rules = rules.display(),
            targets = targets.display(),
            healer = healer.http_port,
            healer_id = healer.instance_id,
        );
        let config_path = data.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let log = data.path().join("prometheus.log");
        let log_file = std::fs::File::create(&log).expect("log");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                data.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("prometheus starts");
        let prometheus = Prometheus {
            child,
            port,
            targets,
            _data: data,
            log,
        };
        common::wait_for("prometheus ready", Duration::from_secs(60), || {
            prometheus
                .get("/-/ready")
                .is_some_and(|(status, _)| status == 200)
        });
        prometheus
    }

    /// Points the `baton` job at these pods and waits until each is scraped.
    fn set_pods(&self, pods: &[&Baton]) {
        write_targets(&self.targets, pods);
        for pod in pods {
            let up = format!(
                "up{{job=\"baton\",pod=\"{}\",instance=\"127.0.0.1:{}\"}}",
                pod.instance_id, pod.http_port
            );
            common::wait_for("the new target scraped", Duration::from_secs(30), || {
                self.value(&up) == 1.0
            });
        }
    }

    /// An HTTP/1.0 GET (the answer is not chunked): (status, body).
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        let (_, body) = response.split_once("\r\n\r\n")?;
        Some((status, body.to_string()))
    }

    /// An instant query: Ok(result array) or Err(the error Prometheus gave).
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let encoded =
            percent_encoding::utf8_percent_encode(expr, percent_encoding::NON_ALPHANUMERIC);
        let (status, body) = self
            .get(&format!("/api/v1/query?query={encoded}"))
            .ok_or("no answer from prometheus")?;
        let answer: Value =
            serde_json::from_str(&body).map_err(|err| format!("HTTP {status}: {err}: {body}"))?;
        if answer["status"] != "success" {
            return Err(format!("{}: {}", answer["errorType"], answer["error"]));
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    fn value(&self, expr: &str) -> f64 {
        self.query(expr)
            .ok()
            .and_then(|result| result.first().cloned())
            .and_then(|sample| sample["value"][1].as_str().and_then(|v| v.parse().ok()))
            .unwrap_or(f64::NAN)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            eprintln!("---- prometheus log (tail) ----\n{tail}");
        }
    }
}

/// File service discovery's format: one target group per pod.
fn write_targets(path: &Path, pods: &[&Baton]) {
    let groups: Vec<Value> = pods
        .iter()
        .map(|pod| {
            json!({"targets": [format!("127.0.0.1:{}", pod.http_port)],
                   "labels": {"pod": pod.instance_id}})
        })
        .collect();
    // Written whole, then renamed: Prometheus never reads half a file.
    let partial = path.with_extension("partial");
    std::fs::write(&partial, Value::Array(groups).to_string()).expect("write targets");
    std::fs::rename(&partial, path).expect("rename targets");
}

fn tool_event(context: &str, id: &str, tool: &str, ok: bool, tokens: u64) -> SampleRecord {
    let mut value = json!({
        "event_id": format!("{context}-{id}"), "context_id": context,
        "event": format!("tool.{tool}.completed"), "server_id": format!("srv-{tool}"), "tool": tool,
        "arguments": {}, "result": {"by": tool, "call": id},
        "usage": {"input_tokens": tokens, "output_tokens": 50},
        "status": if ok { "ok" } else { "error" },
    });
    if !ok {
        value["error"] = json!(format!("{tool} timed out"));
    }
    SampleRecord {
        key: Some(context.as_bytes().to_vec()),
        value: value.to_string().into_bytes(),
    }
}

/// Contexts that exercise the healer and the budget: a screenshot that fails
/// three times, then its alternate three times (PlanB), a screenshot that
/// fails once (retried), and a vision step that spends the whole budget.
fn troubled_contexts() -> Vec<SampleRecord> {
    let mut records = Vec::new();
    for n in 0..3 {
        let plan_b = format!("prom-planb-{n}");
        for (id, tool) in [
            ("vision", "vision_analyze"),
            ("research", "research_enrich"),
            ("valuation", "valuation_estimate"),
        ] {
            records.push(tool_event(&plan_b, id, tool, true, 100));
        }
        for attempt in 0..3 {
            records.push(tool_event(
                &plan_b,
                &format!("shot{attempt}"),
                "browser_take_screenshot",
                false,
                10,
            ));
        }
        for attempt in 0..3 {
            records.push(tool_event(
                &plan_b,
                &format!("fetch{attempt}"),
                "fetch_page",
                false,
                10,
            ));
        }
        let broke = format!("prom-budget-{n}");
        records.push(tool_event(&broke, "vision", "vision_analyze", true, 100));
        records.push(tool_event(
            &broke,
            "research",
            "research_enrich",
            true,
            50_000,
        ));
    }
    records
}

/// Every query of a dashboard: (where, expression) for panels (nested rows
/// too), annotations, and template variables (as a series selector).
fn dashboard_queries(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard JSON");
    let title = dashboard["title"].as_str().unwrap_or("?").to_string();
    let mut queries = Vec::new();
    fn panels(title: &str, list: &Value, queries: &mut Vec<(String, String)>) {
        for panel in list.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    queries.push((
                        format!(
                            "dashboard `{title}`, panel `{}` ({})",
                            panel["title"].as_str().unwrap_or("?"),
                            target["refId"].as_str().unwrap_or("?")
                        ),
                        expr.to_string(),
                    ));
                }
            }
            panels(title, &panel["panels"], queries);
        }
    }
    panels(&title, &dashboard["panels"], &mut queries);
    for annotation in dashboard["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(expr) = annotation["target"]["expr"].as_str() {
            queries.push((
                format!(
                    "dashboard `{title}`, annotation `{}`",
                    annotation["name"].as_str().unwrap_or("?")
                ),
                expr.to_string(),
            ));
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] != "query" {
            continue;
        }
        let query = variable["query"]["query"]
            .as_str()
            .or(variable["query"].as_str())
            .unwrap_or_default();
        // label_values(SELECTOR, LABEL): the selector must have series
        // carrying the label.
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|rest| rest.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{title}: variable query `{query}` is not label_values()"));
        let (selector, label) = inner
            .rsplit_once(',')
            .expect("label_values(selector, label)");
        queries.push((
            format!(
                "dashboard `{title}`, variable `{}`",
                variable["name"].as_str().unwrap_or("?")
            ),
            format!("count by ({}) ({})", label.trim(), selector.trim()),
        ));
    }
    queries
}

/// Grafana's variables as a person with "All" selected sees them.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$__range", RANGE)
        .replace("$pod", ".*")
        .replace("$workflow", ".*")
}

/// Splits `expr` at its top-level (outside any parentheses, brackets or
/// braces) set operators.
fn set_operands(expr: &str) -> Vec<String> {
    let mut operands = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            _ if depth == 0 => {
                for op in [" and ", " or ", " unless "] {
                    if expr[i..].starts_with(op) {
                        operands.push(expr[start..i].trim().to_string());
                        start = i + op.len();
                        i = start - 1;
                        break;
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    operands.push(expr[start..].trim().to_string());
    operands
}

/// `x > 0` as `x > bool 0`: the top-level comparison keeps its left side's
/// series. None when the operand compares nothing at the top level.
fn with_bool(operand: &str) -> Option<String> {
    let mut depth = 0i32;
    let bytes = operand.as_bytes();
    for i in 0..bytes.len() {
        match bytes[i] {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            _ if depth == 0 => {
                for op in [" == ", " != ", " >= ", " <= ", " > ", " < "] {
                    if operand[i..].starts_with(op) {
                        let op = op.trim();
                        let (left, right) = (&operand[..i], &operand[i + op.len() + 2..]);
                        return Some(format!("{left} {op} bool {right}"));
                    }
                }
            }
            _ => {}
        }
    }
    None
}

#[test]
fn operator_helpers_split_and_rewrite_alert_expressions() {
    assert_eq!(
        set_operands("a{x=\"1 and 2\"} > 0 and sum by (pod) (rate(b[5m])) == 0"),
        vec!["a{x=\"1 and 2\"} > 0", "sum by (pod) (rate(b[5m])) == 0"]
    );
    assert_eq!(
        with_bool("sum(rate(a[5m])) / sum(rate(b[5m])) > 0.01").as_deref(),
        Some("sum(rate(a[5m])) / sum(rate(b[5m])) > bool 0.01")
    );
    assert_eq!(with_bool("max(x)"), None);
    assert_eq!(
        substitute("rate(x{pod=~\"$pod\"}[$__rate_interval])"),
        "rate(x{pod=~\".*\"}[1m])"
    );
}

#[test]
fn every_panel_and_alert_returns_series_from_a_real_prometheus() {
    let Some(binary) = prometheus_binary() else {
        eprintln!(
            "SKIPPED: no prometheus binary and scripts/prereqs.sh could not install Debian's \
             `prometheus` package (needs apt and root); set BATON_PROMETHEUS to run this test"
        );
        return;
    };
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    let topology = common::topology_variant(&[
        ("initial_backoff_ms = 1000", "initial_backoff_ms = 100"),
        ("max_backoff_ms = 30000", "max_backoff_ms = 400"),
    ]);
    let options = |id| BatonOptions {
        topology: topology.path().to_path_buf(),
        ..BatonOptions::new(id)
    };
    let a = Baton::start(&broker, options("prom-a"));
    let mut b = Baton::start(&broker, options("prom-b"));
    let healer = Healer::start(&broker, "prom-healer", topology.path());
    common::wait_for("both pods ready", Duration::from_secs(90), || {
        a.is_ready() && b.is_ready()
    });
    let prometheus = Prometheus::start(&binary, &[&a, &b], &healer);
    prometheus.set_pods(&[&a, &b]);

    // Load: whole workflows with 2% poison and 5% failed screenshots, and
    // the contexts that reach PlanB and exhaust their budget.
    let traffic = sample::vision_research_traffic_with_failures(300, 2.0, 5.0, 14);
    broker.produce(INPUT, &traffic);
    broker.produce(INPUT, &troubled_contexts());
    let consumed = || {
        prometheus
            .value("sum(baton_records_consumed_total{job=\"baton\",topic=\"mcp.events.all\"})")
    };
    let first_wave = (traffic.len() + troubled_contexts().len()) as f64;
    common::wait_for("the first wave consumed", Duration::from_secs(90), || {
        consumed() >= first_wave
    });

    // A restore: pod b is killed, a takes its partitions and restores them,
    // then b comes back (a rebalance) and restores what it owns again.
    let restores_before = a.metric("baton_state_restore_seconds_count");
    b.kill();
    common::wait_for("a restored b's partitions", Duration::from_secs(60), || {
        a.metric("baton_state_restore_seconds_count") > restores_before && a.is_ready()
    });
    let b = b.restart(&broker);
    common::wait_for("both pods ready again", Duration::from_secs(90), || {
        a.is_ready() && b.is_ready()
    });
    prometheus.set_pods(&[&a, &b]);
    // b's counters started again at zero: count the second wave on the pods.
    let series = "baton_records_consumed_total{topic=\"mcp.events.all\"}";
    let both = || a.metric(series) + b.metric(series);
    let before = both();
    let second = sample::vision_research_traffic_with_failures(100, 2.0, 5.0, 15);
    broker.produce(INPUT, &second);
    common::wait_for("the second wave consumed", Duration::from_secs(90), || {
        both() >= before + second.len() as f64
    });
    // What the dashboards need to have happened, seen through Prometheus
    // (b's counters restarted at zero: the most each series held counts).
    for (what, metric) in [
        ("a restore", "baton_state_restore_seconds_count"),
        ("a PlanB entry", "baton_plan_b_entries_total"),
        ("an exhausted budget", "baton_budgets_exhausted_total"),
        ("tokens debited", "baton_tokens_debited_total"),
        ("a parked record", "baton_parked_records_total"),
        (
            "a healer retry",
            "baton_healer_decisions_total{decision=\"retry\"}",
        ),
        (
            "an end-to-end latency",
            "baton_end_to_end_latency_seconds_count",
        ),
        ("an agent hop", "baton_agent_hop_seconds_count"),
        ("a lag sample", "baton_consumer_lag_records"),
    ] {
        let expr = format!("count(max_over_time({metric}[{RANGE}]) > 0)");
        common::wait_for(what, Duration::from_secs(60), || {
            prometheus.value(&expr) > 0.0
        });
    }
    // baton_workflows is exact across the kill, the restore and the
    // rebalance: every context that bound to a workflow counted once, by the
    // pod that owns its partition now.
    let contexts = 300 + 100 + 2 * 3;
    common::wait_for(
        "baton_workflows counts every context once",
        Duration::from_secs(30),
        || prometheus.value("sum(baton_workflows{job=\"baton\"})") == f64::from(contexts),
    );
    // Every target scraped once more after all of that.
    let settled = prometheus.value("vector(time())");
    common::wait_for("a scrape of every target", Duration::from_secs(30), || {
        prometheus.value("min(timestamp(up))") > settled + 1.0
    });

    let dashboards_dir = Path::new(common::REPO).join("grafana/dashboards");
    let mut dashboards: Vec<PathBuf> = std::fs::read_dir(&dashboards_dir)
        .expect("grafana/dashboards")
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    dashboards.sort();
    assert!(
        dashboards.len() >= 4,
        "four dashboards at least: {dashboards:?}"
    );
    let mut dead = Vec::new();
    let mut checked = 0;
    for dashboard in &dashboards {
        for (place, expr) in dashboard_queries(dashboard) {
            checked += 1;
            let expr = substitute(&expr);
            match prometheus.query(&expr) {
                Ok(result) if result.is_empty() => {
                    dead.push(format!("{place}: no series for `{expr}`"))
                }
                Ok(_) => {}
                Err(err) => dead.push(format!("{place}: invalid `{expr}`: {err}")),
            }
        }
    }

    // Every alert, as Prometheus loaded it.
    let (_, body) = prometheus.get("/api/v1/rules").expect("rules");
    let rules: Value = serde_json::from_str(&body).expect("rules JSON");
    let mut alerts = 0;
    for group in rules["data"]["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            alerts += 1;
            let name = rule["name"].as_str().unwrap_or("?");
            let query = rule["query"].as_str().unwrap_or_default();
            if rule["health"] != "ok" && rule["health"] != "unknown" {
                dead.push(format!(
                    "alert `{name}`: health {} ({})",
                    rule["health"], rule["lastError"]
                ));
            }
            for operand in set_operands(query) {
                let underlying = with_bool(&operand).unwrap_or(operand.clone());
                checked += 1;
                match prometheus.query(&underlying) {
                    Ok(result) if result.is_empty() => dead.push(format!(
                        "alert `{name}`: no series for its underlying expression `{underlying}`"
                    )),
                    Ok(_) => {}
                    Err(err) => dead.push(format!("alert `{name}`: invalid `{underlying}`: {err}")),
                }
            }
        }
    }
    eprintln!(
        "{checked} queries checked ({} dashboards, {alerts} alerts); {} dead",
        dashboards.len(),
        dead.len()
    );
    assert!(alerts >= 10, "the rule file loaded: {alerts} alerts");
    assert!(dead.is_empty(), "dead queries:\n{}", dead.join("\n"));
    // Rule health is only known once Prometheus evaluated them.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = prometheus.get("/api/v1/rules").expect("rules");
        let rules: Value = serde_json::from_str(&body).expect("rules JSON");
        let unhealthy: Vec<String> = rules["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
            .filter(|rule| rule["health"] != "ok")
            .map(|rule| format!("{}: {} {}", rule["name"], rule["health"], rule["lastError"]))
            .collect();
        if unhealthy.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rules not healthy: {unhealthy:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
