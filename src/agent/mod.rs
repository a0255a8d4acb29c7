//! The agent library: what every example agent in `examples/` is built on,
//! and what a real agent written in Rust can use.
//!
//! An agent consumes its handover topic (`mcp.handover.{agent}`) in a
//! consumer group, and for each handover:
//!
//! 1. skips it if its `handover_id` was already finished ([`dedup`]), or if
//!    its status asks for no work (`budget_exhausted`, `failed`,
//!    `cancelled`);
//! 2. fetches the memory snapshot from the handover's signed
//!    `memory_snapshot_url` ([`snapshot`]);
//! 3. runs the agent's [`Worker`] on a blocking thread, sending an
//!    `agent.heartbeat` every `--heartbeat-interval-ms` while it works;
//! 4. writes, in **one Kafka transaction**, the memory entries it learned
//!    (`memory.upserted` on `mcp.memory`), its `ToolCompleted` on
//!    `mcp.events.all` (`status=error` for a failed call), and the consumer
//!    offset of the handover (`send_offsets_to_transaction` with the
//!    group's metadata, as baton's pods do).
//!
//! # Exactly once, and what it rests on
//!
//! The output and the offset commit together or not at all. An agent killed
//! while working has committed nothing: its successor in the group (or the
//! same agent restarted, whose stable `transactional.id`
//! `{group_id}-{instance_id}` fences the old producer and aborts whatever it
//! left open) reads the handover again and works it once. A handover that
//! arrives again at another offset (baton re-dispatching the same
//! deterministic `handover_id`) is caught by the bounded duplicate filter,
//! which `--dedup-file` keeps across restarts. Past both, the answer's
//! `event_id` is derived from the `handover_id`, and baton applies an
//! `event_id` once.
//!
//! # Errors
//!
//! The broker, the snapshot URL and the Schema Registry are retried with
//! capped exponential backoff ([`retry`]), logged and counted
//! (`baton_agent_retries_total{agent,dependency}`), never swallowed. At the
//! bound: a snapshot that cannot be had makes the call fail (a
//! `ToolCompleted` with `status=error`, which the healer retries with a
//! fresh URL); a broker that stays down makes the agent exit non-zero with
//! nothing committed, so the handover is worked again after a restart.
//! A handover that is not a handover (undecodable bytes) is logged, counted
//! as `unreadable` and skipped; baton's step timeout then notices the
//! silence and heals the step.
//!
//! There is no model here: see [`simulate`].

pub mod dedup;
pub mod emit;
pub mod retry;
pub mod simulate;
pub mod snapshot;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

use self::dedup::Dedup;
use self::emit::{Completion, Encoding, MemoryWrite, heartbeat_record};
use self::retry::{Attempt, Dependency, RetryPolicy};
use self::snapshot::SnapshotClient;
use crate::event::Usage;
use crate::handover::{Handover, HandoverStatus};
use crate::kafka::KafkaSettings;
use crate::metrics::AGENTS;
use crate::shutdown::Shutdown;
use crate::transactor::{TRANSACTION_TIMEOUT, Transactor};

/// The flags every agent takes (each with a `BATON_AGENT_*` variable).
/// The command-line interface is stable: scripts and test suites start the
/// example agents with it (`examples/README.md`).
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "BATON_BOOTSTRAP_SERVERS")]
    pub bootstrap_servers: String,
    /// This copy of the agent, stable across restarts: the transactional id
    /// is `{group_id}-{instance_id}`, so a restarted copy fences its
    /// predecessor.
    #[arg(long, env = "BATON_AGENT_INSTANCE_ID", default_value = "0")]
    pub instance_id: String,
    /// The consumer group (default `agent-{agent}`).
    #[arg(long, env = "BATON_AGENT_GROUP_ID")]
    pub group_id: Option<String>,
    /// The handover topic (default `mcp.handover.{agent}`).
    #[arg(long, env = "BATON_AGENT_HANDOVER_TOPIC")]
    pub handover_topic: Option<String>,
    /// Where `ToolCompleted` events and heartbeats go (baton's input).
    #[arg(
        long,
        env = "BATON_AGENT_OUTPUT_TOPIC",
        default_value = "mcp.events.all"
    )]
    pub output_topic: String,
    /// Where `memory.upserted` records go.
    #[arg(long, env = "BATON_AGENT_MEMORY_TOPIC", default_value = "mcp.memory")]
    pub memory_topic: String,
    /// A librdkafka property, `KEY=VALUE` (repeatable); `consumer.`/`producer.`
    /// prefixes target one client.
    #[arg(long = "kafka-prop", value_name = "KEY=VALUE")]
    pub kafka_props: Vec<String>,
    /// How long the simulated work on one handover takes (the model's
    /// latency, in a real agent).
    #[arg(long, env = "BATON_AGENT_WORK_MS", default_value_t = 200)]
    pub work_ms: u64,
    /// An `agent.heartbeat` this often while working.
    #[arg(
        long,
        env = "BATON_AGENT_HEARTBEAT_INTERVAL_MS",
        default_value_t = 1000
    )]
    pub heartbeat_interval_ms: u64,
    /// Finished handover ids remembered; past it the oldest is forgotten.
    #[arg(long, env = "BATON_AGENT_DEDUP_CAPACITY", default_value_t = 10_000)]
    pub dedup_capacity: usize,
    /// Keep the finished handover ids in this file across restarts.
    #[arg(long, env = "BATON_AGENT_DEDUP_FILE")]
    pub dedup_file: Option<PathBuf>,
    /// Calls to the broker, a snapshot URL or the registry, in all, before
    /// giving up (see the module docs for the policy at the bound).
    #[arg(long, env = "BATON_AGENT_RETRY_ATTEMPTS", default_value_t = 6)]
    pub retry_attempts: u32,
    /// The first pause between retries; it doubles each time...
    #[arg(long, env = "BATON_AGENT_RETRY_BACKOFF_MS", default_value_t = 100)]
    pub retry_backoff_ms: u64,
    /// ...up to this.
    #[arg(long, env = "BATON_AGENT_RETRY_MAX_BACKOFF_MS", default_value_t = 5000)]
    pub retry_max_backoff_ms: u64,
    /// One snapshot request's timeout.
    #[arg(long, env = "BATON_AGENT_SNAPSHOT_TIMEOUT_MS", default_value_t = 5000)]
    pub snapshot_timeout_ms: u64,
    /// The largest snapshot accepted; a larger one fails the call.
    #[arg(long, env = "BATON_AGENT_MAX_SNAPSHOT_BYTES", default_value_t = 1 << 20)]
    pub max_snapshot_bytes: usize,
    /// Write completions as Avro (`ToolCompleted` v2) through this
    /// Confluent-compatible registry; without it, canonical JSON.
    #[arg(long, env = "BATON_AGENT_SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: Option<String>,
    /// Serve this agent's metrics (`baton_agent_*`) on this address.
    #[arg(long, env = "BATON_AGENT_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

impl AgentArgs {
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            attempts: self.retry_attempts.max(1),
            first_backoff: Duration::from_millis(self.retry_backoff_ms),
            max_backoff: Duration::from_millis(
                self.retry_max_backoff_ms.max(self.retry_backoff_ms),
            ),
        }
    }

    /// The Kafka settings, every `--kafka-prop` checked; a bad one names its
    /// key (never its value).
    pub fn kafka_settings(&self) -> Result<KafkaSettings, String> {
        let entries: Vec<(String, String)> = self
            .kafka_props
            .iter()
            .enumerate()
            .map(|(n, entry)| (format!("--kafka-prop {}", n + 1), entry.clone()))
            .collect();
        let mut problems = Vec::new();
        let properties = crate::kafka::parse_properties(&entries, &mut problems);
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(KafkaSettings {
            bootstrap_servers: self.bootstrap_servers.clone(),
            properties,
        })
    }
}

/// What the worker is given: the handover, and the snapshot's rendered
/// memory (`None` when the handover carried no URL).
#[derive(Debug, Clone)]
pub struct Job {
    pub handover: Handover,
    pub snapshot: Option<Value>,
}

/// What the worker decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The call succeeded: `tool.{tool}.completed` with `status=ok`.
    Completed {
        result: Value,
        usage: Usage,
        memories: Vec<MemoryWrite>,
    },
    /// The call failed: the same event with `status=error`, which baton
    /// dead-letters as `tool_failed` and the healer acts on.
    Failed { error: String, usage: Usage },
    /// Nothing to report to the workflow (a PlanB review noted in memory).
    Noted { memories: Vec<MemoryWrite> },
}

/// One agent's behaviour. `work` runs on a blocking thread and may take its
/// time: the library heartbeats meanwhile.
pub trait Worker: Send + Sync + 'static {
    /// The agent's name, as the topology names it (`researcher`, ...).
    fn agent(&self) -> &str;
    /// The tool whose completion answers `handover`.
    fn tool(&self, handover: &Handover) -> String;
    fn work(&self, job: &Job) -> Outcome;
}

/// Handover statuses that ask for work; the others only inform.
fn asks_for_work(status: HandoverStatus) -> bool {
    matches!(
        status,
        HandoverStatus::Queued
            | HandoverStatus::Retrying
            | HandoverStatus::Fallback
            | HandoverStatus::PlanB
    )
}

/// Why an agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("schema registry: {0}")]
    Registry(String),
    #[error("duplicate filter file: {0}")]
    DedupFile(#[from] std::io::Error),
}

/// Runs `worker` on its handover topic until `shutdown` (SIGTERM, Ctrl-C).
/// Work in progress at shutdown is abandoned uncommitted: the group's next
/// owner of the partition works that handover.
pub async fn run<W: Worker>(
    args: AgentArgs,
    worker: W,
    shutdown: Shutdown,
) -> Result<(), AgentError> {
    let worker = Arc::new(worker);
    let agent = worker.agent().to_owned();
    let settings = args.kafka_settings().map_err(AgentError::Config)?;
    let group_id = args
        .group_id
        .clone()
        .unwrap_or_else(|| format!("agent-{agent}"));
    let handover_topic = args
        .handover_topic
        .clone()
        .unwrap_or_else(|| format!("mcp.handover.{agent}"));
    let policy = args.retry_policy();
    if let Some(addr) = args.metrics_addr {
        serve_metrics(addr, shutdown.clone())
            .await
            .map_err(|err| AgentError::Config(format!("metrics_addr {addr}: {err}")))?;
    }
    let (encoding, registry) = Encoding::connect(
        args.schema_registry_url.as_deref(),
        &args.output_topic,
        &agent,
        policy,
    )
    .await
    .map_err(AgentError::Registry)?;
    let mut dedup = match &args.dedup_file {
        Some(path) => Dedup::persisted(&agent, args.dedup_capacity, path)?,
        None => Dedup::in_memory(&agent, args.dedup_capacity),
    };
    let snapshots = SnapshotClient::new(
        Duration::from_millis(args.snapshot_timeout_ms.max(1)),
        args.max_snapshot_bytes,
    )
    .map_err(AgentError::Config)?;

    let consumer: StreamConsumer = settings
        .eos_consumer_config(&group_id)
        .create()
        .map_err(|err| AgentError::Kafka(format!("consumer: {err}")))?;
    consumer
        .subscribe(&[&handover_topic])
        .map_err(|err| AgentError::Kafka(format!("subscribe to {handover_topic}: {err}")))?;
    let heartbeats: FutureProducer = settings
        .producer_config()
        .create()
        .map_err(|err| AgentError::Kafka(format!("heartbeat producer: {err}")))?;
    let transactional_id = format!("{group_id}-{}", args.instance_id);
    let txn_config = settings.transactional_producer_config(&transactional_id);
    let txn_id = transactional_id.clone();
    let transactor = Arc::new(
        tokio::task::spawn_blocking(move || {
            Transactor::init(txn_config, &txn_id, TRANSACTION_TIMEOUT)
        })
        .await
        .map_err(|err| AgentError::Kafka(err.to_string()))?
        .map_err(|err| AgentError::Kafka(format!("init_transactions: {err}")))?,
    );
    tracing::info!(
        agent,
        group_id,
        handover_topic,
        transactional_id,
        dedup_loaded = dedup.len(),
        "agent started"
    );

    let context = Context {
        agent: agent.clone(),
        output_topic: args.output_topic.clone(),
        memory_topic: args.memory_topic.clone(),
        policy,
        encoding,
        heartbeat_interval: Duration::from_millis(args.heartbeat_interval_ms.max(10)),
        work_time: Duration::from_millis(args.work_ms),
    };
    loop {
        let message = tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            message = consumer.recv() => message,
        };
        let message = match message {
            Ok(message) => message,
            Err(err) => {
                AGENTS
                    .retries
                    .with_label_values(&[&agent, Dependency::Broker.label()])
                    .inc();
                tracing::warn!(agent, cause = %err, "consumer error; polling again");
                tokio::time::sleep(policy.first_backoff).await;
                continue;
            }
        };
        let parsed = parse_handover(&agent, policy, registry.as_deref(), &message).await?;
        let decision = decide(&message, parsed, &dedup);
        let handover = match decision {
            Decision::Work(handover) => Some(*handover),
            Decision::Skip(outcome, handover_id) => {
                AGENTS.handovers.with_label_values(&[&agent, outcome]).inc();
                tracing::debug!(agent, outcome, handover_id, "handover skipped");
                None
            }
        };
        let output = match handover {
            Some(handover) => {
                let work = work_one(
                    &context,
                    &worker,
                    &snapshots,
                    &heartbeats,
                    handover,
                    &shutdown,
                )
                .await;
                match work {
                    Some(output) => Some(output),
                    // Shut down mid-work: nothing is committed.
                    None => break,
                }
            }
            None => None,
        };
        let offsets = next_offset(&message)?;
        let Some(metadata) = consumer.group_metadata() else {
            return Err(AgentError::Kafka(
                "the consumer has no group metadata".into(),
            ));
        };
        let committed = commit(&context, &transactor, output.as_ref(), &offsets, &metadata).await;
        match committed {
            Ok(()) => {
                if let Some(output) = &output {
                    AGENTS
                        .handovers
                        .with_label_values(&[&agent, output.outcome])
                        .inc();
                    dedup.insert(&output.handover_id)?;
                    tracing::info!(agent, context_id = %output.context_id, handover_id = %output.handover_id, outcome = output.outcome, "handover answered");
                }
            }
            Err(err) => {
                if still_assigned(&consumer, &message) {
                    return Err(err);
                }
                // The partition moved to another member while we worked; it
                // reads the handover from the committed offset and answers it.
                tracing::warn!(agent, cause = %err, "partition revoked before the commit; its new owner answers the handover");
            }
        }
    }
    tracing::info!(agent, "agent stopped");
    Ok(())
}

struct Context {
    agent: String,
    output_topic: String,
    memory_topic: String,
    policy: RetryPolicy,
    encoding: Encoding,
    heartbeat_interval: Duration,
    work_time: Duration,
}

enum Decision {
    Work(Box<Handover>),
    Skip(&'static str, String),
}

/// The handover in a record: JSON, or Avro in the Confluent wire format
/// (what baton writes when a registry is configured) read with its writer's
/// schema. A registry outage is retried within the policy and then stops
/// the agent (nothing committed); bytes that are no handover are `Err`.
async fn parse_handover(
    agent: &str,
    policy: RetryPolicy,
    registry: Option<&crate::registry::Registry>,
    message: &BorrowedMessage<'_>,
) -> Result<Result<Handover, String>, AgentError> {
    let bytes = message.payload().unwrap_or_default();
    let (Some(registry), Some(&crate::codec::avro::MAGIC_BYTE)) = (registry, bytes.first()) else {
        return Ok(serde_json::from_slice(bytes).map_err(|err| err.to_string()));
    };
    let (schema_id, datum) = match crate::codec::avro::split_frame(bytes) {
        Ok(frame) => frame,
        Err(err) => return Ok(Err(err.to_string())),
    };
    let writer = retry::retry(
        policy,
        agent,
        Dependency::Registry,
        "fetch the handover's schema",
        || async {
            registry.fetch(schema_id).await.map_err(|err| {
                if err.is_transient() {
                    Attempt::Retriable(err)
                } else {
                    Attempt::Permanent(err)
                }
            })
        },
    )
    .await;
    match writer {
        Ok(crate::registry::WriterSchema::Found(schema)) => Ok(
            crate::codec::avro::decode_handover(schema_id, &schema, datum),
        ),
        Ok(crate::registry::WriterSchema::Unknown(reason)) => {
            Ok(Err(format!("unknown schema {schema_id}: {reason}")))
        }
        Err(gave_up) if gave_up.exhausted => Err(AgentError::Registry(format!(
            "schema {schema_id} after {} attempts: {}",
            gave_up.attempts, gave_up.error
        ))),
        Err(gave_up) => Ok(Err(gave_up.error.to_string())),
    }
}

fn decide(
    message: &BorrowedMessage<'_>,
    parsed: Result<Handover, String>,
    dedup: &Dedup,
) -> Decision {
    let handover = match parsed {
        Ok(handover) => handover,
        Err(cause) => {
            tracing::error!(
                topic = message.topic(),
                partition = message.partition(),
                offset = message.offset(),
                cause,
                "not a handover; skipped (baton's step timeout heals the step)"
            );
            return Decision::Skip("unreadable", String::new());
        }
    };
    if dedup.contains(&handover.handover_id) {
        return Decision::Skip("duplicate", handover.handover_id);
    }
    if !asks_for_work(handover.status) {
        return Decision::Skip("skipped", handover.handover_id);
    }
    Decision::Work(Box::new(handover))
}

/// The records one answered handover writes.
struct Output {
    handover_id: String,
    context_id: String,
    outcome: &'static str,
    completion: Option<Vec<u8>>,
    memories: Vec<Vec<u8>>,
}

async fn work_one<W: Worker>(
    context: &Context,
    worker: &Arc<W>,
    snapshots: &SnapshotClient,
    heartbeats: &FutureProducer,
    handover: Handover,
    shutdown: &Shutdown,
) -> Option<Output> {
    let started = Instant::now();
    let agent = context.agent.as_str();
    let tool = worker.tool(&handover);
    let mut beats = 0u64;
    send_heartbeat(context, heartbeats, &handover, beats, "started").await;
    let snapshot = match &handover.memory_snapshot_url {
        Some(url) => {
            let fetched = retry::retry(
                context.policy,
                agent,
                Dependency::Snapshot,
                "fetch snapshot",
                || async { snapshots.fetch(url).await.map_err(|e| e.into_attempt()) },
            )
            .await;
            match fetched {
                Ok(snapshot) => Ok(Some(snapshot)),
                Err(gave_up) => Err(gave_up.error.to_string()),
            }
        }
        None => Ok(None),
    };
    let outcome = match snapshot {
        Err(error) => Outcome::Failed {
            error,
            usage: Usage::default(),
        },
        Ok(snapshot) => {
            let job = Job {
                handover: handover.clone(),
                snapshot,
            };
            let worker = Arc::clone(worker);
            let work_time = context.work_time;
            let mut task = tokio::task::spawn_blocking(move || {
                // Stands in for the model's latency.
                std::thread::sleep(work_time);
                worker.work(&job)
            });
            let mut ticker = tokio::time::interval(context.heartbeat_interval);
            ticker.tick().await;
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.wait() => {
                        tracing::info!(agent, handover_id = %handover.handover_id, "shutting down mid-work; nothing committed");
                        return None;
                    }
                    done = &mut task => match done {
                        Ok(outcome) => break outcome,
                        Err(err) => break Outcome::Failed {
                            error: format!("the worker panicked: {err}"),
                            usage: Usage::default(),
                        },
                    },
                    _ = ticker.tick() => {
                        beats += 1;
                        let progress = format!(
                            "working on {} ({} ms)",
                            handover.intent,
                            started.elapsed().as_millis()
                        );
                        send_heartbeat(context, heartbeats, &handover, beats, &progress).await;
                    }
                }
            }
        }
    };
    let (completion, memories, label) = match outcome {
        Outcome::Completed {
            result,
            usage,
            memories,
        } => (
            Some(Completion::for_handover(
                &handover,
                &tool,
                result,
                usage,
                None,
                started.elapsed(),
            )),
            memories,
            "completed",
        ),
        Outcome::Failed { error, usage } => (
            Some(Completion::for_handover(
                &handover,
                &tool,
                Value::Null,
                usage,
                Some(error),
                started.elapsed(),
            )),
            Vec::new(),
            "failed",
        ),
        Outcome::Noted { memories } => (None, memories, "noted"),
    };
    let completion = match completion.map(|c| context.encoding.encode(&c)).transpose() {
        Ok(bytes) => bytes,
        Err(err) => {
            // Our own record and schema: an encoding failure is a bug, and
            // the call is reported failed rather than lost.
            tracing::error!(agent, cause = %err, "cannot encode the completion; reporting the call failed");
            let failed = Completion::for_handover(
                &handover,
                &tool,
                Value::Null,
                Usage::default(),
                Some(format!("unencodable completion: {err}")),
                started.elapsed(),
            );
            Some(failed.json())
        }
    };
    Some(Output {
        handover_id: handover.handover_id.clone(),
        context_id: handover.context_id.clone(),
        outcome: label,
        completion,
        memories: memories
            .iter()
            .map(|m| m.record(&handover.context_id))
            .collect(),
    })
}

/// A heartbeat is best effort within one bounded wait: a missed one costs
/// at most the step's heartbeat timeout, which heals the step.
async fn send_heartbeat(
    context: &Context,
    producer: &FutureProducer,
    handover: &Handover,
    beat: u64,
    progress: &str,
) {
    let payload = heartbeat_record(handover, beat, progress);
    let record = FutureRecord::to(&context.output_topic)
        .key(handover.context_id.as_bytes())
        .payload(&payload);
    match producer.send(record, context.heartbeat_interval).await {
        Ok(_) => AGENTS.heartbeats.with_label_values(&[&context.agent]).inc(),
        Err((err, _)) => {
            AGENTS
                .retries
                .with_label_values(&[&context.agent, Dependency::Broker.label()])
                .inc();
            tracing::warn!(agent = %context.agent, cause = %err, "heartbeat not sent");
        }
    }
}

fn next_offset(message: &BorrowedMessage<'_>) -> Result<TopicPartitionList, AgentError> {
    let mut offsets = TopicPartitionList::new();
    offsets
        .add_partition_offset(
            message.topic(),
            message.partition(),
            Offset::Offset(message.offset() + 1),
        )
        .map_err(|err| AgentError::Kafka(err.to_string()))?;
    Ok(offsets)
}

fn still_assigned(consumer: &StreamConsumer, message: &BorrowedMessage<'_>) -> bool {
    consumer.assignment().is_ok_and(|assignment| {
        assignment
            .find_partition(message.topic(), message.partition())
            .is_some()
    })
}

/// One transaction: the memory records, the completion and the offset.
/// Failures are recovered (abort, or a rebuilt producer) and the whole
/// transaction repeated, within the retry policy.
async fn commit(
    context: &Context,
    transactor: &Arc<Transactor>,
    output: Option<&Output>,
    offsets: &TopicPartitionList,
    metadata: &rdkafka::consumer::ConsumerGroupMetadata,
) -> Result<(), AgentError> {
    let attempt = || {
        let transactor = Arc::clone(transactor);
        async move {
            tokio::task::block_in_place(|| {
                let generation = transactor.begin().map_err(|e| (e.failure, e.to_string()))?;
                if let Some(output) = output {
                    for memory in &output.memories {
                        transactor
                            .send_waiting(generation, || {
                                FutureRecord::to(&context.memory_topic)
                                    .key(output.context_id.as_bytes())
                                    .payload(memory.as_slice())
                            })
                            .map_err(|e| (e.failure, e.to_string()))?;
                    }
                    if let Some(completion) = &output.completion {
                        transactor
                            .send_waiting(generation, || {
                                FutureRecord::to(&context.output_topic)
                                    .key(output.context_id.as_bytes())
                                    .payload(completion.as_slice())
                            })
                            .map_err(|e| (e.failure, e.to_string()))?;
                    }
                }
                transactor
                    .commit_with_offsets(offsets, metadata)
                    .map_err(|e| (e.failure, e.to_string()))
            })
            .map_err(|(failure, cause)| {
                if let Err(err) =
                    tokio::task::block_in_place(|| transactor.recover(failure, &cause))
                {
                    return Attempt::Permanent(format!("{cause}; recovery failed: {err}"));
                }
                Attempt::Retriable(cause)
            })
        }
    };
    retry::retry(
        context.policy,
        &context.agent,
        Dependency::Broker,
        "commit the answer and the offset",
        attempt,
    )
    .await
    .map_err(|gave_up| {
        AgentError::Kafka(format!(
            "transaction failed {} times: {}",
            gave_up.attempts, gave_up.error
        ))
    })
}

/// The whole `main` of an agent: logs to stderr (`RUST_LOG`, default
/// `info`), stops on SIGTERM or Ctrl-C, and exits 0, or 1 with the error.
pub fn main<W: Worker>(args: AgentArgs, worker: W) -> std::process::ExitCode {
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = Shutdown::new();
        shutdown.listen_for_signals();
        match run(args, worker, shutdown).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!(cause = %err, "agent failed");
                eprintln!("error: {err}");
                std::process::ExitCode::FAILURE
            }
        }
    })
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,rdkafka=warn,librdkafka=warn")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// `/metrics` for the agent: one small task, one request at a time, each
/// bounded in size and time.
async fn serve_metrics(addr: SocketAddr, shutdown: Shutdown) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.wait() => return,
                accepted = listener.accept() => accepted,
            };
            let Ok((mut stream, _)) = accepted else {
                continue;
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let body = crate::metrics::render();
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
            })
            .await;
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_work_asking_statuses_are_worked() {
        assert!(asks_for_work(HandoverStatus::Queued));
        assert!(asks_for_work(HandoverStatus::Retrying));
        assert!(asks_for_work(HandoverStatus::Fallback));
        assert!(asks_for_work(HandoverStatus::PlanB));
        assert!(!asks_for_work(HandoverStatus::BudgetExhausted));
        assert!(!asks_for_work(HandoverStatus::Failed));
        assert!(!asks_for_work(HandoverStatus::Cancelled));
    }

    #[test]
    fn a_bad_kafka_prop_is_named_by_its_key() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            agent: AgentArgs,
        }
        let cli = Cli::try_parse_from([
            "agent",
            "--bootstrap-servers",
            "127.0.0.1:9",
            "--kafka-prop",
            "no.such.property=1",
        ])
        .expect("parses");
        let err = cli.agent.kafka_settings().expect_err("refused");
        assert!(err.contains("no.such.property"), "{err}");
    }
}
