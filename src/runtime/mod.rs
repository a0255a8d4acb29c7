//! The running pod: start-up checks, the consumer group, the coordinator
//! thread that owns the transaction loop, and one task per partition.

mod engine;
mod holds;
mod lag;
mod lifecycle;
mod output;
pub mod processor;
mod refusals;
mod tally;
mod task;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::Consumer;
use rdkafka::metadata::Metadata;
use thiserror::Error;

pub use engine::CommitOutcome;
use engine::{BatonConsumer, Engine, EngineError, RebalanceHook};

use crate::codec::{InputDecoder, OutputEncoder, avro};
use crate::config::RunConfig;
use crate::http::{HttpState, Surface};
use crate::kafka::{self, ClientRole, ConnectError, KafkaSettings};
use crate::members::{self, Membership};
use crate::registry::{Avsc, Registry};
use crate::shutdown::Shutdown;
use crate::snapshot_url::UrlSigner;
use crate::state;
use crate::topology::Topology;

#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{0}")]
    MissingTopics(String),
    #[error("input topics are not co-partitioned: {0}")]
    NotCoPartitioned(String),
    #[error("cannot create topic {topic}: {cause}")]
    CreateTopic { topic: String, cause: String },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot create the consumer: {0}")]
    Consumer(String),
    #[error("cannot subscribe to {topics:?}: {cause}")]
    Subscribe { topics: Vec<String>, cause: String },
    #[error("schema registry: {0}")]
    Registry(String),
    #[error("memory snapshots: {0}")]
    Snapshots(String),
    #[error("the coordinator thread failed: {0}")]
    Coordinator(String),
}

/// What every task of the pod shares.
pub struct Pipeline {
    pub topology: Arc<Topology>,
    pub kafka: KafkaSettings,
    pub application_id: String,
    pub state_dir: PathBuf,
    pub dlq_topic: String,
    /// `{app}-context-changelog`: the context store's changelog.
    pub changelog: String,
    pub decoder: InputDecoder,
    pub output: OutputEncoder,
    /// None when the live feed is off: status updates are planned, not sent.
    pub status_topic: Option<String>,
    pub memory_topic: String,
    pub control_topic: String,
    /// `{app}-events-repartition`: input not keyed by its `context_id` is
    /// forwarded here, keyed by it, before any state is touched.
    pub repartition_topic: String,
    /// `{app}-timers`: never written. Each transaction that fires timers
    /// commits an offset on partition N of it, the partition's timer
    /// sequence, so a restore can tell a committed firing's changelog
    /// records from an aborted one's, as it does for inputs.
    pub timers_topic: String,
    /// Where a cancelled context's held records are parked.
    pub parked_topic: String,
    /// Timers fired per task per round (`--max-timers-per-round`); the
    /// rest fire in the next round.
    pub max_timers_per_round: usize,
    /// How often a task looks for due timers, whether or not input arrives.
    pub timer_interval: std::time::Duration,
    /// The transactional producer's effective `message.max.bytes`: every
    /// record is sized against it before it is sent.
    pub max_message_bytes: usize,
    /// Bounds and snapshot settings the pure plan obeys.
    pub policy: crate::workflow::Policy,
    /// Set when handovers carry signed memory snapshot URLs.
    pub snapshots: Option<SnapshotSettings>,
    /// The RocksDB memory budget every partition store shares.
    pub store_memory: state::StoreMemory,
    /// Open store partitions, readable by the HTTP surface.
    pub stores: Arc<state::OpenStores>,
    /// Committed offsets and fetch-side high watermarks, for the lag gauges.
    pub lag: Arc<lag::ConsumerLag>,
}

/// How snapshot URLs are signed (how long snapshots live is the plan's
/// [`crate::workflow::Policy`]).
pub struct SnapshotSettings {
    pub signer: UrlSigner,
}

/// What `/readyz` reports: joined the group, and no partition restoring.
#[derive(Default)]
pub struct Readiness {
    joined: AtomicBool,
    partitions: Mutex<BTreeMap<i32, bool>>,
}

impl Readiness {
    pub fn set_joined(&self, joined: bool) {
        self.joined.store(joined, Ordering::Relaxed);
    }

    fn partitions(&self) -> std::sync::MutexGuard<'_, BTreeMap<i32, bool>> {
        self.partitions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn partition_restoring(&self, partition: i32) {
        self.partitions().insert(partition, false);
    }

    pub fn partition_ready(&self, partition: i32) {
        self.partitions().insert(partition, true);
    }

    pub fn partition_released(&self, partition: i32) {
        self.partitions().remove(&partition);
        // Its overdue timers are its new owner's to report now.
        let _ = crate::metrics::METRICS
            .contexts_overdue
            .remove_label_values(&[&partition.to_string()]);
    }

    /// Ready: in the group, and every assigned partition restored.
    pub fn is_ready(&self) -> bool {
        self.joined.load(Ordering::Relaxed) && self.partitions().values().all(|ready| *ready)
    }

    /// Partition numbers this pod owns, with whether each is restored.
    pub fn owned(&self) -> BTreeMap<i32, bool> {
        self.partitions().clone()
    }
}

/// How often librdkafka reports its statistics, the lag gauges' source: a
/// scrape interval's worth, and parsing them costs well under a millisecond.
const STATISTICS_INTERVAL_MS: &str = "2000";

/// Runs the pod until `shutdown` fires. On shutdown the open transaction is
/// committed, stores are flushed and the group is left.
pub async fn run(
    config: RunConfig,
    topology: Arc<Topology>,
    http: Arc<HttpState>,
    shutdown: Shutdown,
) -> Result<(), RunError> {
    let readiness = Arc::clone(&http.readiness);
    let settings = config.kafka.clone();
    let deadline = config.startup_timeout;
    let metadata =
        tokio::task::spawn_blocking(move || kafka::fetch_metadata_with_retry(&settings, deadline))
            .await
            .map_err(|err| RunError::Coordinator(err.to_string()))??;

    let changelog = state::changelog_topic(&config.application_id, processor::CONTEXT_STORE);
    let members_topic = members::members_topic(&config.application_id);
    let repartition_topic = repartition_topic(&config.application_id);
    let partitions = check_topics(&config, &topology, &metadata)?;
    match metadata
        .topics()
        .iter()
        .find(|t| t.name() == repartition_topic)
    {
        None => {
            create_topics(
                &config.kafka,
                &[(repartition_topic.clone(), partitions, false)],
            )
            .await?
        }
        Some(found) if found.partitions().len() as i32 != partitions => {
            return Err(RunError::NotCoPartitioned(format!(
                "{repartition_topic} has {} partitions, the inputs {partitions}",
                found.partitions().len()
            )));
        }
        Some(_) => {}
    }
    let timers_topic = timers_topic(&config.application_id);
    for (topic, count) in [
        (&changelog, partitions),
        (&members_topic, 1),
        (&timers_topic, partitions),
    ] {
        if !metadata.topics().iter().any(|t| t.name() == topic.as_str()) {
            create_compacted_topic(&config.kafka, topic, count).await?;
        }
    }
    let signer = match &config.snapshots {
        Some(snapshots) => Some(
            UrlSigner::new(
                &snapshots.secret,
                snapshots.previous_secret.as_deref(),
                &snapshots.public_url,
                snapshots.expiry,
            )
            .map_err(RunError::Snapshots)?,
        ),
        None => None,
    };

    // A hostile length prefix must not allocate more than a record can hold.
    apache_avro::util::max_allocation_bytes(config.limits.max_record_bytes);
    let registry = match &config.schema_registry {
        Some(registry_config) => Some(Arc::new(
            Registry::connect(registry_config.clone())
                .map_err(|err| RunError::Registry(err.to_string()))?,
        )),
        None => None,
    };
    let output = match &registry {
        Some(registry) => {
            let mut topics: Vec<(String, &Avsc)> = topology
                .output_topics()
                .into_iter()
                .map(|topic| (topic, &*avro::HANDOVER_EVENT))
                .collect();
            topics.push((config.status_topic.clone(), &*avro::STATUS_UPDATE));
            let mut schema_ids = resolve_output_schemas(registry, &topics, deadline).await?;
            let status_schema_id = schema_ids
                .remove(&config.status_topic)
                .ok_or_else(|| RunError::Registry("no schema id for the status topic".into()))?;
            OutputEncoder::Avro {
                schema_ids,
                status_schema_id,
            }
        }
        None => OutputEncoder::Json,
    };
    let decoder = InputDecoder::new(config.limits, config.input_formats.clone(), registry);
    let producer_config = config
        .kafka
        .transactional_producer_config(&config.transactional_id());
    let max_message_bytes =
        kafka::max_message_bytes(&producer_config).map_err(RunError::Consumer)?;
    let policy = crate::workflow::Policy {
        snapshots: config.snapshots.as_ref().map(|snapshots| {
            crate::workflow::plan::SnapshotPolicy {
                retention_ms: snapshots.retention.as_millis().min(i64::MAX as u128) as i64,
                max_per_context: snapshots.max_per_context,
            }
        }),
        max_held_records: config.context_limits.max_held_records,
        max_held_bytes: config.context_limits.max_held_bytes,
        max_memory_bytes: config.context_limits.max_memory_bytes,
        max_context_id_bytes: config.context_limits.max_context_id_bytes,
    };

    tally::announce(&topology);
    let consumer_lag = Arc::new(lag::ConsumerLag::default());
    let pipeline = Arc::new(Pipeline {
        topology,
        kafka: config.kafka.clone(),
        application_id: config.application_id.clone(),
        state_dir: config.state_dir.clone(),
        dlq_topic: config.dlq_topic.clone(),
        changelog,
        decoder,
        output,
        status_topic: config.live_feed.then(|| config.status_topic.clone()),
        memory_topic: config.memory_topic.clone(),
        control_topic: config.control_topic.clone(),
        repartition_topic: repartition_topic.clone(),
        timers_topic,
        parked_topic: crate::dlq::parked_topic(&config.dlq_topic),
        max_timers_per_round: config.max_timers_per_round,
        timer_interval: config
            .commit_interval
            .min(std::time::Duration::from_secs(1)),
        max_message_bytes,
        policy,
        snapshots: signer.clone().map(|signer| SnapshotSettings { signer }),
        store_memory: state::StoreMemory::new(config.state_memory_bytes),
        stores: Arc::clone(&http.stores),
        lag: Arc::clone(&consumer_lag),
    });

    let membership = Arc::new(
        Membership::new(
            &config.application_id,
            &config.instance_id,
            &config.advertised_url,
            Arc::clone(&readiness),
        )
        .signed_with(config.membership_secret.expose().as_bytes()),
    );
    {
        let membership = Arc::clone(&membership);
        let kafka = config.kafka.clone();
        let shutdown = shutdown.clone();
        std::thread::Builder::new()
            .name("baton-members".into())
            .spawn(move || members::run(membership, kafka, shutdown))
            .map_err(|err| RunError::Coordinator(err.to_string()))?;
    }
    let _ = http.surface.set(Surface {
        membership,
        partitions,
        kafka: config.kafka.clone(),
        status_topic: config.live_feed.then(|| config.status_topic.clone()),
        dlq_topic: config.dlq_topic.clone(),
        parked_topic: crate::dlq::parked_topic(&config.dlq_topic),
        signer,
        sse_heartbeat: config.sse_heartbeat,
    });

    let transactional_id = config.transactional_id();
    let runtime = tokio::runtime::Handle::current();
    let engine_readiness = Arc::clone(&readiness);
    let timeouts = engine::TransactionTimeouts {
        call: config.transaction_call_timeout,
        recovery: config.transaction_recovery_timeout,
    };
    let engine = tokio::task::spawn_blocking(move || {
        Engine::new(
            pipeline,
            producer_config,
            transactional_id,
            timeouts,
            runtime,
            engine_readiness,
        )
    })
    .await
    .map_err(|err| RunError::Coordinator(err.to_string()))??;
    let engine = Arc::new(Mutex::new(engine));

    // The memory and control topics are co-partitioned input: partition N's
    // memory and healer commands live with partition N's workflows, in the
    // same task.
    let mut subscription = config.input_topics.clone();
    subscription.push(config.memory_topic.clone());
    subscription.push(config.control_topic.clone());
    subscription.push(repartition_topic);
    let strategy = if subscription.len() > 1 {
        // Range assigns partition N of every topic to the same member, which
        // co-partitioned state needs; cooperative-sticky does not promise it.
        "range"
    } else {
        "cooperative-sticky"
    };
    let mut consumer_config = config.kafka.eos_consumer_config(config.group_id());
    consumer_config.set("partition.assignment.strategy", strategy);
    // The fetch-side high watermarks the lag gauges need (BROKER.md gap 3).
    consumer_config.set("statistics.interval.ms", STATISTICS_INTERVAL_MS);
    // Tasks fire timers by the wall clock only once their inputs are read
    // to the end (task.rs, `InputClock`).
    consumer_config.set("enable.partition.eof", "true");
    let consumer: BatonConsumer = consumer_config
        .create_with_context(RebalanceHook::new(Arc::clone(&engine), consumer_lag))
        .map_err(|err| RunError::Consumer(err.to_string()))?;
    let consumer = Arc::new(consumer);
    engine::lock(&engine).attach_consumer(&consumer);
    engine::lock(&engine).start();
    let topics: Vec<&str> = subscription.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|err| RunError::Subscribe {
            topics: subscription.clone(),
            cause: err.to_string(),
        })?;
    tracing::info!(
        transactional_id = %config.transactional_id(),
        group = config.group_id(),
        inputs = ?config.input_topics,
        "baton is running"
    );

    let interval = config.commit_interval;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("baton-coordinator".into())
        .spawn(move || {
            let result = coordinate(engine, consumer, shutdown, interval);
            let _ = done_tx.send(result);
        })
        .map_err(|err| RunError::Coordinator(err.to_string()))?;
    done_rx
        .await
        .map_err(|_| RunError::Coordinator("the coordinator thread panicked".into()))?
}

/// Finds (or, with auto-registration, registers) the schema id of each
/// output topic's schema under its subject. An unreachable registry is
/// retried until `deadline`; a missing subject fails at once.
async fn resolve_output_schemas(
    registry: &Registry,
    topics: &[(String, &Avsc)],
    deadline: Duration,
) -> Result<HashMap<String, u32>, RunError> {
    let strategy = registry.config.subject_strategy;
    let started = std::time::Instant::now();
    let mut by_subject: HashMap<String, u32> = HashMap::new();
    let mut ids = HashMap::new();
    for (topic, schema) in topics {
        let topic = topic.clone();
        let schema: &Avsc = schema;
        let subject = strategy.subject(&topic, &schema.full_name());
        if let Some(id) = by_subject.get(&subject) {
            ids.insert(topic, *id);
            continue;
        }
        let mut backoff = Duration::from_millis(100);
        let id = loop {
            let attempt = if registry.config.auto_register {
                registry.register(&subject, schema).await.map(Some)
            } else {
                registry.find(&subject, schema).await
            };
            match attempt {
                Ok(Some(id)) => break id,
                Ok(None) => {
                    return Err(RunError::Registry(format!(
                        "subject `{subject}` has no version equal to baton's {}; register it with \
                         `baton schemas register` or start with --auto-register-schemas",
                        schema.full_name()
                    )));
                }
                Err(err) if err.is_transient() && started.elapsed() < deadline => {
                    tracing::warn!(%subject, cause = %err, "schema registry unavailable at start-up; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(err) => {
                    return Err(RunError::Registry(format!(
                        "cannot resolve subject `{subject}`: {err}"
                    )));
                }
            }
        };
        tracing::info!(%subject, schema_id = id, "output schema resolved");
        by_subject.insert(subject, id);
        ids.insert(topic, id);
    }
    Ok(ids)
}

/// The coordinator thread: polls the consumer (which runs the rebalance
/// callbacks here) and commits every interval. Transactional calls block, so
/// this thread has its own small runtime and never stalls the task workers.
fn coordinate(
    engine: Arc<Mutex<Engine>>,
    consumer: Arc<BatonConsumer>,
    shutdown: Shutdown,
    interval: Duration,
) -> Result<(), RunError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|err| RunError::Coordinator(err.to_string()))?;
    runtime.block_on(async {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                _ = ticker.tick() => {
                    let mut engine = engine::lock(&engine);
                    engine.commit();
                    if let Some(err) = engine.take_broken() {
                        engine.stop_all();
                        return Err(RunError::Engine(err));
                    }
                }
                message = consumer.recv() => match message {
                    // Every assigned partition has its own queue; a record
                    // here means a queue was split too late. Rewinding it is
                    // safer than dropping it.
                    Ok(message) => {
                        use rdkafka::Message;
                        tracing::error!(topic = message.topic(), partition = message.partition(), offset = message.offset(), "record on the main queue; rewinding");
                        let _ = consumer.seek(message.topic(), message.partition(), rdkafka::Offset::Offset(message.offset()), Duration::from_secs(5));
                    }
                    // Ends of partitions belong to the tasks' queues; one here
                    // came before its queue was split, and the task's seek at
                    // start reports it again on the queue.
                    Err(rdkafka::error::KafkaError::PartitionEOF(partition)) => {
                        tracing::debug!(partition, "partition end on the main queue");
                    }
                    Err(err) => tracing::warn!(cause = %err, "consumer error"),
                },
            }
        }
        // Finish the open transaction, then leave the group.
        let outcome = engine::lock(&engine).commit();
        tracing::info!(?outcome, "final commit before shutdown");
        engine::lock(&engine).stop_all();
        consumer.unsubscribe();
        Ok(())
    })?;
    drop(consumer);
    tracing::info!("left the consumer group");
    Ok(())
}

/// Where input not keyed by its `context_id` is forwarded, keyed by it
/// (Kafka Streams' `{application.id}-...-repartition`).
pub fn repartition_topic(application_id: &str) -> String {
    format!("{application_id}-events-repartition")
}

/// The topic whose committed offsets are the partitions' timer sequences.
pub fn timers_topic(application_id: &str) -> String {
    format!("{application_id}-timers")
}

/// Checks that every topic baton reads or writes exists, and that the
/// inputs share one partition count. Returns that count.
fn check_topics(
    config: &RunConfig,
    topology: &Topology,
    metadata: &Metadata,
) -> Result<i32, RunError> {
    let existing: BTreeMap<&str, usize> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name(), t.partitions().len()))
        .collect();
    let mut missing = Vec::new();
    for topic in &config.input_topics {
        if !existing.contains_key(topic.as_str()) {
            missing.push(format!("input topic `{topic}`"));
        }
    }
    if !existing.contains_key(config.memory_topic.as_str()) {
        missing.push(format!("memory topic `{}`", config.memory_topic));
    }
    if !existing.contains_key(config.control_topic.as_str()) {
        missing.push(format!("control topic `{}`", config.control_topic));
    }
    if config.live_feed && !existing.contains_key(config.status_topic.as_str()) {
        missing.push(format!("status topic `{}`", config.status_topic));
    }
    if !existing.contains_key(config.dlq_topic.as_str()) {
        missing.push(format!("dead-letter topic `{}`", config.dlq_topic));
    }
    for topic in topology.output_topics() {
        if !existing.contains_key(topic.as_str()) {
            missing.push(format!("handover topic `{topic}`"));
        }
    }
    if !missing.is_empty() {
        return Err(RunError::MissingTopics(format!(
            "missing topics: {} (create them, e.g. with `baton topics create`)",
            missing.join(", ")
        )));
    }
    let inputs: Vec<&String> = config
        .input_topics
        .iter()
        .chain([&config.memory_topic, &config.control_topic])
        .collect();
    let counts: BTreeSet<usize> = inputs
        .iter()
        .filter_map(|t| existing.get(t.as_str()).copied())
        .collect();
    if counts.len() > 1 {
        let detail: Vec<String> = inputs
            .iter()
            .map(|t| format!("{t}={}", existing.get(t.as_str()).copied().unwrap_or(0)))
            .collect();
        return Err(RunError::NotCoPartitioned(detail.join(", ")));
    }
    Ok(counts.into_iter().next().unwrap_or(1) as i32)
}

/// Creates a compacted topic (a changelog) with `partitions` partitions.
pub async fn create_compacted_topic(
    settings: &KafkaSettings,
    topic: &str,
    partitions: i32,
) -> Result<(), RunError> {
    create_topics(settings, &[(topic.to_string(), partitions, true)]).await
}

/// Creates topics, treating "already exists" as success.
pub async fn create_topics(
    settings: &KafkaSettings,
    topics: &[(String, i32, bool)],
) -> Result<(), RunError> {
    let admin: AdminClient<DefaultClientContext> = settings
        .client_config(ClientRole::Admin)
        .create()
        .map_err(|err| RunError::CreateTopic {
            topic: "*".into(),
            cause: err.to_string(),
        })?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions, compacted)| {
            let topic = NewTopic::new(name, *partitions, TopicReplication::Fixed(-1));
            if *compacted {
                topic.set("cleanup.policy", "compact")
            } else {
                topic
            }
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(|err| RunError::CreateTopic {
            topic: "*".into(),
            cause: err.to_string(),
        })?;
    for result in results {
        match result {
            Ok(_) => {}
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(RunError::CreateTopic {
                    topic,
                    cause: code.to_string(),
                });
            }
        }
    }
    Ok(())
}
