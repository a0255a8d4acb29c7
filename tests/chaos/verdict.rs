//! The verdict: what the run wrote, deduplicated, against the reference
//! model, as counts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use baton::dlq::headers;
use serde_json::Value;

use crate::common::avro_events::handover_json;
use crate::common::{self, Baton, Broker, Reader, Record};
use crate::model::{Expected, Letter};

pub const DLQ: &str = "mcp.events.dlq";
pub const PARKED: &str = "mcp.events.dlq.parked";

/// Counts of one comparison.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub expected: usize,
    pub found: usize,
    pub missing: usize,
    pub unexpected: usize,
    pub differing: usize,
    /// Copies beyond the first (records of aborted transactions, on a
    /// broker that shows them).
    pub duplicates: usize,
}

impl Tally {
    pub fn exact(&self) -> bool {
        self.missing == 0 && self.unexpected == 0 && self.differing == 0
    }

    pub fn line(&self) -> String {
        format!(
            "expected {}, found {}, missing {}, unexpected {}, differing {}, duplicate copies {}",
            self.expected,
            self.found,
            self.missing,
            self.unexpected,
            self.differing,
            self.duplicates
        )
    }
}

/// Everything the verdict found.
#[derive(Debug, Default)]
pub struct Findings {
    pub handovers: Tally,
    pub letters: Tally,
    pub parked: Tally,
    pub states: Tally,
    /// Contexts whose full record (version included) was compared.
    pub records_compared: usize,
    pub records_differing: usize,
    /// Past the time budget of the whole-record comparison.
    pub records_not_compared: usize,
    pub overdue: usize,
    /// Contexts waiting on an agent at the end, where the model says they
    /// should not be.
    pub left_waiting: usize,
    pub step_timers: Tally,
    pub approval_timers: Tally,
    /// A few differences, for the log.
    pub examples: Vec<String>,
}

impl Findings {
    pub fn pass(&self) -> bool {
        self.handovers.exact()
            && self.letters.exact()
            && self.parked.exact()
            && self.states.exact()
            && self.records_differing == 0
            && self.records_not_compared == 0
            && self.overdue == 0
            && self.left_waiting == 0
            && self.step_timers.exact()
            && self.approval_timers.exact()
    }
}

/// Keeps a few differences of each kind for the log.
fn example(examples: &mut Vec<String>, kind: &str, text: String) {
    if examples.iter().filter(|e| e.starts_with(kind)).count() < 4 {
        examples.push(text);
    }
}

/// A dead letter's identity: the input it came from, or for a timeout
/// (which has no input) the context and attempt it timed out.
fn letter_of(record: &Record) -> (Letter, String) {
    let header = |name: &str| record.headers.get(name).cloned();
    let class = header(headers::ERROR_CLASS).unwrap_or_default();
    let context = record
        .key
        .as_deref()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .unwrap_or_default();
    let attempts = (class == "step_timed_out")
        .then(|| header(headers::ATTEMPTS).and_then(|a| a.parse().ok()))
        .flatten();
    let identity = match attempts {
        Some(attempt) => format!("timeout/{context}/{attempt}"),
        None => format!(
            "{}/{}/{}",
            header(headers::SOURCE_TOPIC).unwrap_or_default(),
            header(headers::SOURCE_PARTITION).unwrap_or_default(),
            header(headers::SOURCE_OFFSET).unwrap_or_default()
        ),
    };
    (
        Letter {
            context,
            class,
            attempts,
        },
        identity,
    )
}

/// Compares multisets of letters after deduplication by identity.
fn compare_letters(records: &[&Record], expected: &[Letter], examples: &mut Vec<String>) -> Tally {
    let mut seen: BTreeMap<String, Letter> = BTreeMap::new();
    let mut duplicates = 0;
    for record in records {
        let (letter, identity) = letter_of(record);
        if seen.insert(identity, letter).is_some() {
            duplicates += 1;
        }
    }
    let mut want: BTreeMap<&Letter, usize> = BTreeMap::new();
    for letter in expected {
        *want.entry(letter).or_default() += 1;
    }
    let mut got: BTreeMap<&Letter, usize> = BTreeMap::new();
    for letter in seen.values() {
        *got.entry(letter).or_default() += 1;
    }
    let mut tally = Tally {
        expected: expected.len(),
        found: seen.len(),
        duplicates,
        ..Tally::default()
    };
    for (letter, n) in &want {
        let m = got.get(letter).copied().unwrap_or(0);
        if m < *n {
            tally.missing += n - m;
            example(
                examples,
                "missing",
                format!("missing letter {letter:?} ({m} of {n})"),
            );
        }
    }
    for (letter, m) in &got {
        let n = want.get(letter).copied().unwrap_or(0);
        if *m > n {
            tally.unexpected += m - n;
            example(
                examples,
                "unexpected",
                format!("unexpected letter {letter:?} ({m}, expected {n})"),
            );
        }
    }
    tally
}

fn compare_handovers(records: &[Record], expected: &Expected, examples: &mut Vec<String>) -> Tally {
    let mut unique: BTreeMap<String, Value> = BTreeMap::new();
    let mut tally = Tally {
        expected: expected.handovers.len(),
        ..Tally::default()
    };
    for record in common::handover_records(records) {
        let value = handover_json(&record.value);
        let id = value["handover_id"].as_str().unwrap_or_default().to_owned();
        match unique.get(&id) {
            Some(first) if *first != value => {
                tally.differing += 1;
                example(
                    examples,
                    "handover",
                    format!("handover {id} has two different copies"),
                );
            }
            Some(_) => tally.duplicates += 1,
            None => {
                unique.insert(id, value);
            }
        }
    }
    tally.found = unique.len();
    for (id, want) in &expected.handovers {
        match unique.get(id) {
            None => {
                tally.missing += 1;
                example(examples, "missing", format!("missing handover {want}"));
            }
            Some(got) if got != want => {
                tally.differing += 1;
                example(
                    examples,
                    "handover",
                    format!("handover differs:\n  got  {got}\n  want {want}"),
                );
            }
            Some(_) => {}
        }
    }
    tally.unexpected = unique
        .iter()
        .filter(|(id, value)| {
            let extra = !expected.handovers.contains_key(*id);
            if extra {
                example(
                    examples,
                    "unexpected",
                    format!("unexpected handover {value}"),
                );
            }
            extra
        })
        .count();
    tally
}

/// Every context the pods list, through any running pod, paged.
fn listed_contexts(pods: &[&Baton]) -> Option<Vec<Value>> {
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let path = match &after {
            Some(cursor) => format!(
                "/api/contexts?limit=1000&after={}",
                percent_encoding::utf8_percent_encode(cursor, percent_encoding::NON_ALPHANUMERIC)
            ),
            None => "/api/contexts?limit=1000".to_owned(),
        };
        let page = pods.iter().find_map(|pod| match pod.http_get(&path) {
            Some((200, body)) => serde_json::from_str::<Value>(&body).ok(),
            _ => None,
        });
        let Some(page) = page else {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(500));
            continue;
        };
        if let Some(contexts) = page["contexts"].as_array() {
            all.extend(contexts.iter().cloned());
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return Some(all),
        }
    }
}

fn summary_of(state: &baton::workflow::WorkflowState) -> Value {
    serde_json::json!({
        "workflow": state.workflow, "state": state.state, "locked_by": state.locked_by,
        "attempts": state.attempts, "token_budget": state.token_budget,
        "tokens_left": state.tokens_left(), "overdue": false,
    })
}

fn listed_summary(value: &Value) -> Value {
    serde_json::json!({
        "workflow": value["workflow"], "state": value["state"], "locked_by": value["locked_by"],
        "attempts": value["attempts"], "token_budget": value["token_budget"],
        "tokens_left": value["tokens_left"], "overdue": value["overdue"],
    })
}

/// Whether every context the model knows is listed in its expected state.
pub fn states_settled(pods: &[&Baton], expected: &Expected) -> bool {
    let Some(listed) = listed_contexts(pods) else {
        return false;
    };
    let by_id: HashMap<&str, &Value> = listed
        .iter()
        .filter_map(|c| Some((c["context_id"].as_str()?, c)))
        .collect();
    expected.states.iter().all(|(context, state)| {
        by_id
            .get(context.as_str())
            .is_some_and(|got| listed_summary(got) == summary_of(state))
    })
}

/// Reads every output and compares it with the model. `full_records`:
/// compare every context's whole record (version included) through
/// `/contexts/{id}`; otherwise one in ten.
pub fn judge(
    broker: &Broker,
    pods: &[&Baton],
    expected: &Expected,
    terminal: &BTreeSet<String>,
    full_records: bool,
) -> Findings {
    let mut topics: Vec<&str> = common::HANDOVER_TOPICS.to_vec();
    topics.extend([DLQ, PARKED]);
    let mut reader = Reader::new(broker, &topics);
    reader.poll_to_end();
    let mut findings = Findings::default();
    let mut examples = Vec::new();
    findings.handovers = compare_handovers(&reader.records, expected, &mut examples);
    findings.letters = compare_letters(&reader.topic(DLQ), &expected.letters, &mut examples);
    findings.parked = compare_letters(&reader.topic(PARKED), &expected.parked, &mut examples);

    // Timers: one letter per expected step timeout (after deduplication),
    // one approval gate closed by its timer per silent approver.
    let timeouts: Vec<Letter> = expected
        .letters
        .iter()
        .filter(|l| l.class == "step_timed_out")
        .cloned()
        .collect();
    let found_timeouts: Vec<&Record> = reader
        .topic(DLQ)
        .into_iter()
        .filter(|r| {
            r.headers.get(headers::ERROR_CLASS).map(String::as_str) == Some("step_timed_out")
        })
        .collect();
    let mut ignore = Vec::new();
    findings.step_timers = compare_letters(&found_timeouts, &timeouts, &mut ignore);

    let listed = listed_contexts(pods).unwrap_or_default();
    let by_id: HashMap<String, &Value> = listed
        .iter()
        .filter_map(|c| Some((c["context_id"].as_str()?.to_owned(), c)))
        .collect();
    findings.overdue = listed
        .iter()
        .filter(|c| c["overdue"] == Value::Bool(true))
        .count();
    let mut states = Tally {
        expected: expected.states.len(),
        found: by_id.len(),
        ..Tally::default()
    };
    let mut approvals = Tally::default();
    for (context, state) in &expected.states {
        let rejected_by_timer = expected.approval_timed_out.contains(context);
        if rejected_by_timer {
            approvals.expected += 1;
        }
        match by_id.get(context) {
            None => {
                states.missing += 1;
                example(
                    &mut examples,
                    "no",
                    format!("no state listed for {context}"),
                );
            }
            Some(got) => {
                let got = listed_summary(got);
                let want = summary_of(state);
                if got != want {
                    states.differing += 1;
                    example(
                        &mut examples,
                        "state",
                        format!("state of {context}:\n  got  {got}\n  want {want}"),
                    );
                } else if rejected_by_timer {
                    approvals.found += 1;
                }
                if !terminal.contains(&state.state) && state.state != "PlanB" {
                    findings.left_waiting += 1;
                }
            }
        }
    }
    approvals.missing = approvals.expected - approvals.found;
    states.unexpected = by_id
        .keys()
        .filter(|id| !expected.states.contains_key(*id))
        .count();
    findings.states = states;
    findings.approval_timers = approvals;

    // Whole records, version included, within a time budget: a context
    // nobody can answer for costs a request timeout per pod.
    let budget = Instant::now() + Duration::from_secs(90);
    for (i, (context, state)) in expected.states.iter().enumerate() {
        if !full_records && i % 10 != 0 {
            continue;
        }
        if Instant::now() > budget {
            findings.records_not_compared += 1;
            continue;
        }
        findings.records_compared += 1;
        let got = common::state_of(pods, context).map(|v| common::essentials(&v));
        let want = common::essentials(&serde_json::to_value(state).expect("json"));
        if got.as_ref() != Some(&want) {
            findings.records_differing += 1;
            example(
                &mut examples,
                "record",
                format!("record of {context}:\n  got  {got:?}\n  want {want}"),
            );
        }
    }
    findings.examples = examples;
    findings
}

/// Follows the outputs while the run drains: unique handovers and letters
/// so far, read incrementally.
pub struct Progress {
    reader: Reader,
    read: usize,
    handovers: BTreeSet<String>,
    letters: BTreeSet<String>,
    parked: BTreeSet<String>,
}

impl Progress {
    pub fn new(broker: &Broker) -> Progress {
        let mut topics: Vec<&str> = common::HANDOVER_TOPICS.to_vec();
        topics.extend([DLQ, PARKED]);
        Progress {
            reader: Reader::new(broker, &topics),
            read: 0,
            handovers: BTreeSet::new(),
            letters: BTreeSet::new(),
            parked: BTreeSet::new(),
        }
    }

    /// (unique handovers, dead letters, parked) so far.
    pub fn poll(&mut self) -> (usize, usize, usize) {
        self.reader.poll_available();
        for record in &self.reader.records[self.read..] {
            if record.topic.starts_with("mcp.handover.") {
                if let Some(id) = handover_json(&record.value)["handover_id"].as_str() {
                    self.handovers.insert(id.to_owned());
                }
            } else if record.topic == DLQ {
                self.letters.insert(letter_of(record).1);
            } else if record.topic == PARKED {
                self.parked.insert(letter_of(record).1);
            }
        }
        self.read = self.reader.records.len();
        (self.handovers.len(), self.letters.len(), self.parked.len())
    }

    /// Whether every output the model expects is there (by count).
    pub fn complete(&mut self, expected: &Expected) -> bool {
        let (handovers, letters, parked) = self.poll();
        handovers >= expected.handovers.len()
            && letters >= expected.letters.len()
            && parked >= expected.parked.len()
    }
}
