//! One task per assigned input partition.
//!
//! As in Kafka Streams, a task owns partition N of every co-partitioned input
//! topic, because a context's state lives on the partition its records hash
//! to, whichever topic they arrive on. A task pulls records from its own
//! partition queues, runs each through the processor, and enqueues the
//! outputs in the pod's open transaction. Control messages from the engine
//! win every race (`biased`): at a barrier the task reports its positions and
//! waits for the transaction's outcome.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::Message;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::engine::RebalanceHook;
use super::processor::{LastChangelog, OutRecord, PartitionProcessor, Processed, Store};
use super::{Pipeline, Readiness};
use crate::metrics::METRICS;
use crate::registry::RegistryError;

/// A topic and partition, the unit of assignment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartition {
    topic: Arc<str>,
    partition: i32,
}

impl TopicPartition {
    pub fn new(topic: &str, partition: i32) -> Self {
        TopicPartition {
            topic: Arc::from(topic),
            partition,
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.topic, self.partition)
    }
}

/// Messages from the engine to a task.
pub enum Control {
    /// Finish the record in hand, report the positions, then wait.
    Barrier {
        reply: std_mpsc::Sender<TaskProgress>,
    },
    /// The transaction committed: make its state durable and go on. Carries
    /// the new producer when the old one could not begin the next one.
    Committed { producer: Option<FutureProducer> },
    /// The transaction was aborted: forget its state and rewind. Carries the
    /// new producer when the old one was rebuilt.
    Aborted { producer: Option<FutureProducer> },
    /// Release the partition.
    Stop { reply: std_mpsc::Sender<()> },
}

/// A task's positions at a barrier.
#[derive(Debug)]
pub struct TaskProgress {
    pub partition: i32,
    /// For each input partition that advanced: the offset to commit.
    pub next_offsets: Vec<(TopicPartition, i64)>,
    /// Input records processed in this transaction.
    pub records: u64,
    /// Set when an output could not be enqueued: the transaction must abort.
    pub failure: Option<String>,
}

/// What the task has done since the last commit, per input partition.
#[derive(Default)]
struct Uncommitted {
    /// First offset processed (where an abort rewinds to) and next offset.
    positions: BTreeMap<TopicPartition, (i64, i64)>,
    records: u64,
    failure: Option<String>,
    /// The last changelog write of each store: its offset becomes that
    /// store's checkpoint.
    last_changelog: LastChangelog,
}

/// Everything a task needs to run.
pub(crate) struct TaskSetup {
    pub partition: i32,
    pub queues: Vec<(TopicPartition, StreamPartitionQueue<RebalanceHook>)>,
    pub consumer: Arc<StreamConsumer<RebalanceHook>>,
    pub producer: FutureProducer,
    pub pipeline: Arc<Pipeline>,
    pub readiness: Arc<Readiness>,
    pub control: mpsc::UnboundedReceiver<Control>,
}

pub(crate) async fn run_partition_task(setup: TaskSetup) {
    let TaskSetup {
        partition,
        queues,
        consumer,
        mut producer,
        pipeline,
        readiness,
        mut control,
    } = setup;
    let tps: Vec<TopicPartition> = queues.iter().map(|(tp, _)| tp.clone()).collect();
    readiness.partition_restoring(partition);
    let mut processor = match PartitionProcessor::open(
        &pipeline,
        partition,
        &tps,
        &consumer,
        &mut control,
        &mut producer,
    )
    .await
    {
        Some(processor) => processor,
        // Stopped (or the engine went away) while restoring.
        None => {
            readiness.partition_released(partition);
            return;
        }
    };
    readiness.partition_ready(partition);

    let mut records = futures::stream::select_all(queues.iter().map(|(_, queue)| queue.stream()));
    let mut pending = Uncommitted::default();
    let mut outputs: Vec<OutRecord> = Vec::with_capacity(8);
    // An Avro record whose writer schema is being fetched. While it waits,
    // no later record of this task is taken: per-partition order holds.
    let mut stalled: Option<Stalled> = None;
    let mut lookup: Option<SchemaLookup> = None;
    loop {
        tokio::select! {
            biased;
            command = control.recv() => {
                match command {
                    Some(Control::Barrier { reply }) => {
                        let _ = reply.send(TaskProgress {
                            partition,
                            next_offsets: pending
                                .positions
                                .iter()
                                .map(|(tp, (_, next))| (tp.clone(), *next))
                                .collect(),
                            records: pending.records,
                            failure: pending.failure.take(),
                        });
                        let outcome = control.recv().await;
                        let done = std::mem::take(&mut pending);
                        match outcome {
                            Some(Control::Committed { producer: rebuilt }) => {
                                if let Some(rebuilt) = rebuilt {
                                    producer = rebuilt;
                                }
                                if let Err(err) = processor.on_commit(done.last_changelog).await {
                                    tracing::error!(partition, cause = %err, "cannot write committed state locally");
                                }
                            }
                            Some(Control::Aborted { producer: rebuilt }) => {
                                if let Some(rebuilt) = rebuilt {
                                    producer = rebuilt;
                                }
                                processor.on_abort();
                                // A held record on a rewound partition comes
                                // back with the rewind; holding it too would
                                // process it twice.
                                if let Some(held) = &stalled
                                    && done.positions.contains_key(&held.tp)
                                {
                                    if let Some(held) = stalled.take() {
                                        held.release(&consumer, &tps);
                                    }
                                    lookup = None;
                                }
                                for (tp, (first, _)) in done.positions {
                                    rewind(&consumer, &tp, first).await;
                                }
                            }
                            Some(Control::Stop { reply }) => {
                                if let Some(held) = stalled.take() {
                                    held.release(&consumer, &tps);
                                }
                                processor.on_abort();
                                drop(records);
                                processor.close().await;
                                readiness.partition_released(partition);
                                let _ = reply.send(());
                                return;
                            }
                            Some(Control::Barrier { .. }) | None => break,
                        }
                    }
                    Some(Control::Stop { reply }) => {
                        if let Some(held) = stalled.take() {
                            held.release(&consumer, &tps);
                        }
                        drop(records);
                        processor.close().await;
                        readiness.partition_released(partition);
                        let _ = reply.send(());
                        return;
                    }
                    // Outcomes only follow a barrier; anything else is stale.
                    Some(Control::Committed { .. }) | Some(Control::Aborted { .. }) => {}
                    None => break,
                }
            }
            fetched = async { match lookup.as_mut() { Some(fetch) => fetch.await, None => std::future::pending().await } }, if lookup.is_some() => {
                lookup = None;
                let Some(mut held) = stalled.take() else { continue };
                match fetched {
                    Ok(()) => {
                        held.release(&consumer, &tps);
                        outputs.clear();
                        match processor.process(&held.message, &mut outputs) {
                            Processed::Done => {
                                record_outputs(&producer, &outputs, &held.message, &mut pending).await;
                            }
                            // Fetched, yet not cached: ask again rather than guess.
                            Processed::NeedsSchema(id) => {
                                lookup = Some(fetch_schema(&pipeline, id, Duration::ZERO));
                                stalled = Some(held);
                            }
                            // Until the task pauses on it: abort and rewind.
                            Processed::Transient { reason, .. } => pending.failure = Some(reason),
                        }
                    }
                    Err(err) => {
                        let delay = held.failed(partition, &err, &consumer, &tps);
                        lookup = Some(fetch_schema(&pipeline, held.schema_id, delay));
                        stalled = Some(held);
                    }
                }
            }
            message = records.next(), if pending.failure.is_none() && stalled.is_none() => {
                let message = match message {
                    Some(Ok(message)) => message,
                    Some(Err(err)) => {
                        tracing::warn!(cause = %err, "partition queue error");
                        continue;
                    }
                    None => break,
                };
                outputs.clear();
                match processor.process(&message, &mut outputs) {
                    Processed::Done => record_outputs(&producer, &outputs, &message, &mut pending).await,
                    Processed::NeedsSchema(id) => {
                        lookup = Some(fetch_schema(&pipeline, id, Duration::ZERO));
                        stalled = Some(Stalled::new(message.detach(), id));
                    }
                    // Until the task pauses on it: abort and rewind.
                    Processed::Transient { reason, .. } => pending.failure = Some(reason),
                }
            }
        }
    }
    if let Some(held) = stalled.take() {
        held.release(&consumer, &tps);
    }
    drop(records);
    processor.close().await;
    readiness.partition_released(partition);
}

/// Enqueues one input's outputs and advances its partition's position.
async fn record_outputs<M: Message>(
    producer: &FutureProducer,
    outputs: &[OutRecord],
    message: &M,
    pending: &mut Uncommitted,
) {
    let offset = message.offset();
    match enqueue(producer, outputs, &mut pending.last_changelog).await {
        Ok(()) => {}
        Err(failure) => {
            tracing::error!(offset, cause = %failure, "cannot enqueue output; the transaction will abort");
            pending.failure = Some(failure);
        }
    }
    pending
        .positions
        .entry(TopicPartition::new(message.topic(), message.partition()))
        .and_modify(|(_, next)| *next = offset + 1)
        .or_insert((offset, offset + 1));
    pending.records += 1;
}

/// A writer-schema lookup in flight, after an optional backoff delay.
type SchemaLookup = Pin<Box<dyn Future<Output = Result<(), RegistryError>> + Send>>;

fn fetch_schema(pipeline: &Arc<Pipeline>, id: u32, delay: Duration) -> SchemaLookup {
    let registry = pipeline.decoder.registry().cloned();
    Box::pin(async move {
        tokio::time::sleep(delay).await;
        match registry {
            Some(registry) => registry.fetch(id).await.map(|_| ()),
            // Without a registry the decoder never asks for a schema.
            None => Ok(()),
        }
    })
}

/// Backoff between registry attempts while it is down: doubling, capped so
/// that a recovered registry is noticed within seconds.
const SCHEMA_RETRY_FIRST: Duration = Duration::from_millis(100);
const SCHEMA_RETRY_MAX: Duration = Duration::from_secs(5);

/// A record held back until its writer schema is known.
struct Stalled {
    message: OwnedMessage,
    tp: TopicPartition,
    schema_id: u32,
    failures: u32,
    /// Set while the task is paused on a registry outage.
    paused_since: Option<Instant>,
}

impl Stalled {
    fn new(message: OwnedMessage, schema_id: u32) -> Stalled {
        let tp = TopicPartition::new(message.topic(), message.partition());
        Stalled {
            message,
            tp,
            schema_id,
            failures: 0,
            paused_since: None,
        }
    }

    /// Records a failed lookup; the first one pauses the task's partitions.
    /// Returns how long to wait before the next attempt.
    fn failed(
        &mut self,
        partition: i32,
        err: &RegistryError,
        consumer: &StreamConsumer<RebalanceHook>,
        tps: &[TopicPartition],
    ) -> Duration {
        self.failures += 1;
        METRICS
            .transient_errors
            .with_label_values(&["schema_registry"])
            .inc();
        let delay = SCHEMA_RETRY_FIRST
            .saturating_mul(1 << self.failures.min(10))
            .min(SCHEMA_RETRY_MAX);
        if self.paused_since.is_none() {
            self.paused_since = Some(Instant::now());
            METRICS.partitions_paused.inc();
            set_paused(consumer, tps, true);
            tracing::warn!(
                partition,
                schema_id = self.schema_id,
                offset = self.message.offset(),
                cause = %err,
                "schema registry unavailable; partition paused, retrying with backoff"
            );
        } else if self.failures.is_multiple_of(10) {
            tracing::warn!(partition, schema_id = self.schema_id, failures = self.failures, cause = %err, "schema registry still unavailable");
        }
        delay
    }

    /// Ends a pause, if any.
    fn release(&self, consumer: &StreamConsumer<RebalanceHook>, tps: &[TopicPartition]) {
        if let Some(since) = self.paused_since {
            METRICS.partitions_paused.dec();
            set_paused(consumer, tps, false);
            tracing::info!(
                schema_id = self.schema_id,
                failures = self.failures,
                paused_ms = since.elapsed().as_millis() as u64,
                "schema registry reachable again; partition resumed"
            );
        }
    }
}

/// Pauses or resumes fetching for the task's partitions. The task has
/// already stopped taking records; this stops librdkafka fetching ahead.
fn set_paused(consumer: &StreamConsumer<RebalanceHook>, tps: &[TopicPartition], paused: bool) {
    let mut list = TopicPartitionList::new();
    for tp in tps {
        list.add_partition(tp.topic(), tp.partition());
    }
    let result = if paused {
        consumer.pause(&list)
    } else {
        consumer.resume(&list)
    };
    if let Err(err) = result {
        tracing::warn!(paused, cause = %err, "cannot change the fetch state of the partitions");
    }
}

/// Enqueues every output of one input in the open transaction, keeping the
/// delivery future of each store's last changelog record. A full local
/// queue is waited out; any other error fails the transaction.
async fn enqueue(
    producer: &FutureProducer,
    outputs: &[OutRecord],
    last_changelog: &mut LastChangelog,
) -> Result<(), String> {
    for out in outputs {
        let mut backoff = Duration::from_micros(200);
        loop {
            let mut record = FutureRecord::<Vec<u8>, Vec<u8>>::to(&out.topic);
            if let Some(payload) = &out.payload {
                record = record.payload(payload);
            }
            if let Some(key) = &out.key {
                record = record.key(key);
            }
            if let Some(partition) = out.partition {
                record = record.partition(partition);
            }
            if let Some(headers) = &out.headers {
                record = record.headers(headers.clone());
            }
            if let Some(timestamp) = out.timestamp {
                record = record.timestamp(timestamp);
            }
            match producer.send_result(record) {
                // Other delivery reports are not awaited: the commit flushes
                // every outstanding record and fails if one failed.
                Ok(delivery) => {
                    METRICS.records_sent.inc();
                    match out.changelog {
                        Some(Store::Workflow) => last_changelog.workflow = Some(delivery),
                        Some(Store::Memory) => last_changelog.memory = Some(delivery),
                        None => {}
                    }
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                }
                Err((err, _)) => return Err(format!("{}: {err}", out.topic)),
            }
        }
    }
    Ok(())
}

/// Seeks the partition back to `offset`. librdkafka discards whatever it had
/// already fetched past it. A failed seek must not be skipped (records would
/// be lost), so it is retried until it succeeds.
async fn rewind(consumer: &Arc<StreamConsumer<RebalanceHook>>, tp: &TopicPartition, offset: i64) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let consumer = Arc::clone(consumer);
        let topic = tp.topic().to_string();
        let partition = tp.partition();
        let result = tokio::task::spawn_blocking(move || {
            consumer.seek(
                &topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(10),
            )
        })
        .await;
        match result {
            Ok(Ok(())) => {
                tracing::info!(
                    topic = tp.topic(),
                    offset,
                    "rewound to the last committed offset"
                );
                return;
            }
            Ok(Err(err)) => tracing::warn!(offset, cause = %err, "seek failed; retrying"),
            Err(err) => tracing::warn!(offset, cause = %err, "seek task failed; retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
