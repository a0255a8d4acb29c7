//! The agents of a chaos run, inside the driver: the vision and document
//! sources, and a responder that consumes every agent's handover topic and
//! answers each handover as its agent would (researcher, valuation,
//! playwright, fetcher; approvers for the approval gate), skipping
//! duplicates by `handover_id`, fetching a sample of memory snapshots, and
//! sending heartbeats for the researcher of the approval workflow.
//!
//! Everything it sends is logged per context, in the order sent: one
//! producer, keyed by `context_id`, so that order is the partition's order
//! and the reference model can fold it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton::codec::{self, DecodeLimits};
use baton::event::{SourceCoordinates, ToolEvent, ToolStatus, Usage};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};

use crate::common::avro_events::{Version, avro_bytes, handover_fields};
use crate::common::{self, Broker};
use crate::model::Sent;
use crate::plan::{self, ContextPlan, Kind, Settings};

pub const INPUT: &str = "mcp.events.all";

/// What the fault thread and the agents share.
#[derive(Default)]
pub struct Shared {
    /// The researcher ignores first calls of vision-research contexts.
    pub stalling: AtomicBool,
    /// The sources have started every context.
    pub fed: AtomicBool,
    /// Stop answering and return.
    pub stop: AtomicBool,
    /// HTTP ports of the pods now running (for snapshot fetches).
    pub pod_ports: Mutex<Vec<u16>>,
    /// The first few snapshot URLs no pod served, with what each answered.
    pub snapshot_failures: Mutex<Vec<String>>,
    pub counts: Counts,
}

#[derive(Default)]
pub struct Counts {
    pub started: AtomicU64,
    pub settled: AtomicU64,
    pub answers: AtomicU64,
    pub handovers_seen: AtomicU64,
    pub duplicate_handovers_seen: AtomicU64,
    pub ignored_calls: AtomicU64,
    pub heartbeats: AtomicU64,
    pub approvals: AtomicU64,
    pub snapshots_fetched: AtomicU64,
    pub snapshots_failed: AtomicU64,
    pub snapshots_skipped: AtomicU64,
}

/// What the agents did, for the reference model and the report.
pub struct Log {
    pub inputs: BTreeMap<String, Vec<Sent>>,
    pub events_sent: usize,
    /// Seconds from an answer (or a first event) to the next handover seen:
    /// the slowest, and the 99th percentile.
    pub slowest_hop_s: f64,
    pub hop_p99_s: f64,
}

fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "2026-12-02T00:00:00Z".into())
}

struct Agents<'a> {
    settings: &'a Settings,
    plans: HashMap<String, &'a ContextPlan>,
    producer: ThreadedProducer<DefaultProducerContext>,
    schema_id: u32,
    shared: &'a Shared,
    inputs: BTreeMap<String, Vec<Sent>>,
    events_sent: usize,
    seen: HashSet<String>,
    /// Contexts whose valuation or playwright call (one of the pair) came.
    asked: HashSet<String>,
    settled: HashSet<String>,
    last_sent: HashMap<String, Instant>,
    slowest_hop_s: f64,
    hops: Vec<f64>,
    snapshots: SyncSender<String>,
    snapshot_every: u64,
}

impl Agents<'_> {
    /// Sends one record keyed by `context`, stamped with the wall clock
    /// (the model folds it at that time: timers count from it).
    fn send(&mut self, context: &str, value: Vec<u8>, event: Option<ToolEvent>) {
        let timestamp_ms = wall_clock_ms();
        let sent = match event {
            Some(event) => Sent::Event(Box::new(event), timestamp_ms),
            None => Sent::Poison,
        };
        let mut pending = BaseRecord::<[u8], [u8]>::to(INPUT)
            .key(context.as_bytes())
            .payload(&value)
            .timestamp(timestamp_ms);
        loop {
            match self.producer.send(pending) {
                Ok(()) => break,
                Err((_, returned)) => {
                    std::thread::sleep(Duration::from_millis(2));
                    pending = returned;
                }
            }
        }
        self.events_sent += 1;
        self.inputs
            .entry(context.to_owned())
            .or_default()
            .push(sent);
        self.last_sent.insert(context.to_owned(), Instant::now());
    }

    /// JSON as the pods decode it.
    fn send_json(&mut self, context: &str, value: Value) {
        let bytes = value.to_string().into_bytes();
        let event = decode_json(&bytes);
        self.send(context, bytes, Some(event));
    }

    /// A tool's completion in Avro (ToolCompleted v2, through the registry).
    fn send_tool(&mut self, plan: &ContextPlan, agent: &str, attempt: u32) {
        let Some((tool, fails, result)) = plan::answer(plan, agent, attempt) else {
            return;
        };
        let (input_tokens, output_tokens) = plan.usage[plan::usage_slot(agent)];
        let event = ToolEvent {
            event_id: format!("{}-{agent}-a{attempt}", plan.id),
            context_id: plan.id.clone(),
            event: format!("tool.{tool}.completed"),
            server_id: Some(format!("srv-{agent}")),
            tool: Some(tool.to_owned()),
            arguments: json!({"attempt": attempt}),
            result: if fails {
                json!({"isError": true, "content": [{"type": "text", "text": "navigation timeout"}]})
            } else {
                result
            },
            usage: Some(Usage {
                input_tokens,
                output_tokens,
            }),
            occurred_at: Some(now_rfc3339()),
            status: if fails {
                ToolStatus::Error
            } else {
                ToolStatus::Ok
            },
            error: fails.then(|| "navigation timeout after 30 s".to_owned()),
            ..ToolEvent::default()
        };
        let bytes = avro_bytes(&event, Version::V2, self.schema_id);
        let decoded = decode_avro(&bytes);
        self.send(&plan.id, bytes, Some(decoded));
        self.shared.counts.answers.fetch_add(1, Ordering::Relaxed);
    }

    fn start(&mut self, plan: &ContextPlan) {
        if plan.kind == Kind::Orphan {
            // A research result for a context nobody started.
            self.send_tool(plan, "researcher", 1);
            self.settle(&plan.id);
        } else {
            self.send_json(&plan.id, plan::first_event(plan));
            if plan.kind == Kind::Poisoned {
                self.send(&plan.id, plan::poison_for(plan), None);
            }
        }
        self.shared.counts.started.fetch_add(1, Ordering::Relaxed);
    }

    fn settle(&mut self, context: &str) {
        if self.settled.insert(context.to_owned()) {
            self.shared.counts.settled.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_handover(&mut self, value: &[u8]) {
        let fields = handover_fields(value);
        let text = |name: &str| fields[name].as_str().unwrap_or_default().to_owned();
        let id = text("handover_id");
        self.shared
            .counts
            .handovers_seen
            .fetch_add(1, Ordering::Relaxed);
        if !self.seen.insert(id) {
            self.shared
                .counts
                .duplicate_handovers_seen
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let context = text("context_id");
        let Some(plan) = self.plans.get(context.as_str()).copied() else {
            return;
        };
        if let Some(at) = self.last_sent.remove(&context) {
            let hop = at.elapsed().as_secs_f64();
            self.slowest_hop_s = self.slowest_hop_s.max(hop);
            self.hops.push(hop);
        }
        let agent = text("agent");
        let status = text("status");
        let attempt = fields["attempt"].as_u64().unwrap_or(1) as u32;
        if let Some(url) = fields["memory_snapshot_url"].as_str() {
            let n = self.shared.counts.handovers_seen.load(Ordering::Relaxed);
            if n.is_multiple_of(self.snapshot_every) {
                match self.snapshots.try_send(url.to_owned()) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                        self.shared
                            .counts
                            .snapshots_skipped
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        match status.as_str() {
            "queued" | "retrying" | "fallback" => {}
            // PlanB (a person reviews it), budget exhausted, failed,
            // cancelled: nobody answers.
            _ => {
                self.settle(&context);
                return;
            }
        }
        let pair = status == "queued" && text("workflow") == "vision-research";
        match agent.as_str() {
            "reporter" => self.settle(&context),
            "researcher" => self.research(plan, attempt),
            // Valuation and playwright are handed the context in one
            // transaction: both answer once both are asked, valuation first,
            // so no answer reaches the context while it waits on the healer
            // for a failed screenshot (it would be held, a state change the
            // model need not guess at).
            "valuation" | "playwright" if pair => {
                if self.asked.remove(&context) {
                    self.send_tool(plan, "valuation", attempt);
                    self.send_tool(plan, "playwright", attempt);
                } else {
                    self.asked.insert(context);
                }
            }
            "valuation" | "playwright" | "fetcher" => self.send_tool(plan, &agent, attempt),
            _ => {}
        }
    }

    fn research(&mut self, plan: &ContextPlan, attempt: u32) {
        let context = plan.id.as_str();
        if !plan.kind.approval_workflow()
            && attempt == 1
            && self.shared.stalling.load(Ordering::Relaxed)
        {
            // The researcher hangs on this call and never answers it.
            self.last_sent.remove(context);
            self.inputs
                .entry(context.to_owned())
                .or_default()
                .push(Sent::Ignored);
            self.shared
                .counts
                .ignored_calls
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        if plan.kind.approval_workflow() {
            self.send_json(
                context,
                json!({"event": "agent.heartbeat", "event_id": format!("{context}-hb-{attempt}"),
                       "context_id": context, "agent": "researcher", "progress": "reading the document"}),
            );
            self.shared
                .counts
                .heartbeats
                .fetch_add(1, Ordering::Relaxed);
        }
        self.send_tool(plan, "researcher", attempt);
        let answer = match plan.kind {
            Kind::Approved => Some("granted"),
            Kind::Denied => Some("denied"),
            _ => None,
        };
        if let Some(answer) = answer {
            self.send_json(
                context,
                json!({"event_id": format!("{context}-{answer}"), "event": format!("approval.{answer}"),
                       "context_id": context, "approver": "chaos-approver", "reason": "checked"}),
            );
            self.shared.counts.approvals.fetch_add(1, Ordering::Relaxed);
        }
        match plan.kind {
            Kind::ApprovalTimesOut => {
                self.inputs
                    .entry(context.to_owned())
                    .or_default()
                    .push(Sent::Unanswered);
                self.settle(context);
            }
            Kind::SmallBudget | Kind::Denied => self.settle(context),
            _ => {}
        }
    }
}

fn source() -> SourceCoordinates {
    SourceCoordinates {
        topic: INPUT.into(),
        partition: 0,
        offset: 0,
    }
}

fn decode_json(bytes: &[u8]) -> ToolEvent {
    codec::decode_event(Some(bytes), &source(), &DecodeLimits::default())
        .unwrap_or_else(|e| panic!("the agents' own JSON decodes: {e:?}"))
}

fn decode_avro(bytes: &[u8]) -> ToolEvent {
    let (id, datum) = baton::codec::avro::split_frame(bytes).expect("wire format");
    let schema = apache_avro::Schema::parse_str(baton::codec::avro::schemas::TOOL_COMPLETED_V2)
        .expect("schema");
    baton::codec::avro::decode_tool_completed(id, &schema, datum, &source())
        .unwrap_or_else(|e| panic!("the agents' own Avro decodes: {e:?}"))
}

/// GET `path` (a signed snapshot URL's path and query) from the pod on `port`.
fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        common::HTTP_TOKEN
    )
    .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    String::from_utf8_lossy(&response)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Fetches sampled snapshot URLs on its own thread, so a dead pod's URL
/// never slows an answer: the URL's own pod first, then any pod running
/// now (any pod answers for any context), up to 5 tries over ~10 s.
fn snapshot_fetcher(shared: Arc<Shared>, urls: std::sync::mpsc::Receiver<String>) {
    for url in urls {
        let Some(rest) = url.strip_prefix("http://") else {
            shared
                .counts
                .snapshots_failed
                .fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let path = format!("/{path}");
        let own = host
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse::<u16>().ok());
        let mut ok = false;
        let mut statuses = Vec::new();
        for round in 0..5 {
            let mut ports: Vec<u16> = own.into_iter().collect();
            ports.extend(
                shared
                    .pod_ports
                    .lock()
                    .map(|p| p.clone())
                    .unwrap_or_default(),
            );
            statuses = ports
                .iter()
                .map(|port| http_status(*port, &path))
                .collect::<Vec<_>>();
            if statuses.contains(&Some(200)) {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(500 * (round + 1)));
        }
        let counter = if ok {
            &shared.counts.snapshots_fetched
        } else {
            if let Ok(mut failures) = shared.snapshot_failures.lock()
                && failures.len() < 5
            {
                failures.push(format!("{path}: {statuses:?}"));
            }
            &shared.counts.snapshots_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs the sources and the responder until `shared.stop`; returns the log.
pub fn run(
    broker: &Broker,
    settings: &Settings,
    contexts: &[ContextPlan],
    schema_id: u32,
    shared: Arc<Shared>,
) -> Log {
    let reader: BaseConsumer = broker
        .client_config()
        .set("group.id", "chaos-agents")
        .set("client.id", "chaos-agents")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "20")
        .create()
        .expect("agents' reader");
    let mut assignment = TopicPartitionList::new();
    for topic in common::HANDOVER_TOPICS {
        for partition in 0..crate::PARTITIONS {
            assignment
                .add_partition_offset(topic, partition, Offset::Beginning)
                .expect("assign");
        }
    }
    reader.assign(&assignment).expect("assign");
    let producer: ThreadedProducer<DefaultProducerContext> = broker
        .client_config()
        .set("client.id", "chaos-agents")
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("agents' producer");
    let (snapshots, urls) = std::sync::mpsc::sync_channel(64);
    let fetcher = {
        let shared = shared.clone();
        std::thread::spawn(move || snapshot_fetcher(shared, urls))
    };
    let mut agents = Agents {
        settings,
        plans: contexts.iter().map(|c| (c.id.clone(), c)).collect(),
        producer,
        schema_id,
        shared: &shared,
        inputs: BTreeMap::new(),
        events_sent: 0,
        seen: HashSet::new(),
        asked: HashSet::new(),
        settled: HashSet::new(),
        last_sent: HashMap::new(),
        slowest_hop_s: 0.0,
        hops: Vec::new(),
        snapshots,
        snapshot_every: 25,
    };
    let began = Instant::now();
    let mut next = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        // The sources: contexts start at the set rate, at most `window` at once.
        let due = (began.elapsed().as_secs_f64() * agents.settings.starts_per_second) as usize;
        while next < contexts.len()
            && next < due
            && agents.events_started_in_flight() < agents.settings.window
        {
            agents.start(&contexts[next]);
            next += 1;
        }
        if next == contexts.len() {
            shared.fed.store(true, Ordering::Relaxed);
        }
        for _ in 0..500 {
            match reader.poll(Duration::from_millis(if next < contexts.len() {
                5
            } else {
                50
            })) {
                Some(Ok(message)) => {
                    if let Some(value) = message.payload() {
                        let value = value.to_vec();
                        agents.on_handover(&value);
                    }
                }
                Some(Err(_)) | None => break,
            }
        }
    }
    let _ = agents.producer.flush(Duration::from_secs(30));
    let Agents {
        inputs,
        events_sent,
        slowest_hop_s,
        mut hops,
        snapshots,
        ..
    } = agents;
    hops.sort_by(f64::total_cmp);
    let hop_p99_s = hops
        .get((hops.len() * 99 / 100).min(hops.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0);
    drop(snapshots);
    let _ = fetcher.join();
    Log {
        inputs,
        events_sent,
        slowest_hop_s,
        hop_p99_s,
    }
}

impl Agents<'_> {
    fn events_started_in_flight(&self) -> usize {
        let started = self.shared.counts.started.load(Ordering::Relaxed);
        let settled = self.shared.counts.settled.load(Ordering::Relaxed);
        started.saturating_sub(settled) as usize
    }
}
