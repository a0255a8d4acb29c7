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
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use futures::StreamExt;
use rdkafka::Message;
use rdkafka::Offset;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tokio::sync::mpsc;

use super::engine::RebalanceHook;
use super::processor::{OutRecord, PartitionProcessor};
use super::{Pipeline, Readiness};

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
    /// The last changelog write: its offset becomes the store checkpoint.
    last_changelog: Option<DeliveryFuture>,
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
                                processor.on_commit(done.last_changelog).await;
                            }
                            Some(Control::Aborted { producer: rebuilt }) => {
                                if let Some(rebuilt) = rebuilt {
                                    producer = rebuilt;
                                }
                                processor.on_abort();
                                for (tp, (first, _)) in done.positions {
                                    rewind(&consumer, &tp, first).await;
                                }
                            }
                            Some(Control::Stop { reply }) => {
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
            message = records.next(), if pending.failure.is_none() => {
                let message = match message {
                    Some(Ok(message)) => message,
                    Some(Err(err)) => {
                        tracing::warn!(cause = %err, "partition queue error");
                        continue;
                    }
                    None => break,
                };
                let tp = TopicPartition::new(message.topic(), message.partition());
                let offset = message.offset();
                outputs.clear();
                processor.process(&message, &mut outputs);
                match enqueue(&producer, &outputs).await {
                    Ok(Some(changelog)) => pending.last_changelog = Some(changelog),
                    Ok(None) => {}
                    Err(failure) => {
                        tracing::error!(offset, cause = %failure, "cannot enqueue output; the transaction will abort");
                        pending.failure = Some(failure);
                    }
                }
                pending
                    .positions
                    .entry(tp)
                    .and_modify(|(_, next)| *next = offset + 1)
                    .or_insert((offset, offset + 1));
                pending.records += 1;
            }
        }
    }
    drop(records);
    processor.close().await;
    readiness.partition_released(partition);
}

/// Enqueues every output of one input in the open transaction and returns
/// the delivery future of the last changelog record, if any. A full local
/// queue is waited out; any other error fails the transaction.
async fn enqueue(
    producer: &FutureProducer,
    outputs: &[OutRecord],
) -> Result<Option<DeliveryFuture>, String> {
    let mut last_changelog = None;
    for out in outputs {
        let mut backoff = Duration::from_micros(200);
        loop {
            let mut record = FutureRecord::to(&out.topic).payload(&out.payload);
            if let Some(key) = &out.key {
                record = record.key(key);
            }
            if let Some(partition) = out.partition {
                record = record.partition(partition);
            }
            if let Some(headers) = &out.headers {
                record = record.headers(headers.clone());
            }
            match producer.send_result(record) {
                // Other delivery reports are not awaited: the commit flushes
                // every outstanding record and fails if one failed.
                Ok(delivery) => {
                    if out.changelog {
                        last_changelog = Some(delivery);
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
    Ok(last_changelog)
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
