//! Counts the records in the DLQ and the parked topic, by class, by reading
//! them. Offsets cannot give the count: every transaction commit writes a
//! control marker that takes an offset too, so `high - low` overcounts by
//! one per transaction that touched a partition. A read_committed reader
//! sees exactly the records that were dead-lettered.
//!
//! The reader starts on the first overview request (pods nobody looks at
//! never read the DLQ), reads both topics from the beginning once, then
//! follows them. Memory stays small: it keeps counts, not records.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

use crate::dlq::headers;
use crate::kafka::{ClientRole, KafkaSettings};
use crate::shutdown::Shutdown;

/// How often the reader checks whether it has caught up and whether the
/// topics grew partitions.
const CHECK_EVERY: Duration = Duration::from_secs(1);
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct DlqTally {
    started: AtomicBool,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default, Clone)]
struct Counts {
    /// Records per topic, per `x-baton-error-class`.
    by_topic: BTreeMap<String, BTreeMap<String, u64>>,
    /// Every partition has been read up to the end it had when the reader
    /// opened (or last grew).
    caught_up: bool,
    error: Option<String>,
}

impl DlqTally {
    /// Starts the reader once; later calls do nothing.
    pub fn start(self: &Arc<Self>, kafka: KafkaSettings, topics: [String; 2], shutdown: Shutdown) {
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let tally = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let outcome = tokio::select! {
                    _ = shutdown.wait() => return,
                    outcome = tally.follow(&kafka, &topics) => outcome,
                };
                if let Err(err) = outcome {
                    tracing::warn!(cause = %err, "cannot count the DLQ; retrying");
                    tally.update(|counts| counts.error = Some(err));
                }
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tokio::time::sleep(RETRY_AFTER_ERROR) => {}
                }
            }
        });
    }

    /// `{"records", "parked", "by_class", "complete"}` for `dlq` and `parked` topics.
    pub fn json(&self, dlq_topic: &str, parked_topic: &str) -> serde_json::Value {
        let counts = self
            .counts
            .lock()
            .map(|counts| counts.clone())
            .unwrap_or_default();
        let total = |topic: &str| -> u64 {
            counts
                .by_topic
                .get(topic)
                .map_or(0, |classes| classes.values().sum())
        };
        json!({
            "records": total(dlq_topic),
            "parked": total(parked_topic),
            "by_class": counts.by_topic.get(dlq_topic).cloned().unwrap_or_default(),
            "parked_by_class": counts.by_topic.get(parked_topic).cloned().unwrap_or_default(),
            "complete": counts.caught_up,
            "error": counts.error,
        })
    }

    fn update(&self, change: impl FnOnce(&mut Counts)) {
        if let Ok(mut counts) = self.counts.lock() {
            change(&mut counts);
        }
    }

    /// Reads both topics from where this reader left off, forever; returns
    /// only on an error (the caller retries with a fresh reader and fresh counts).
    async fn follow(&self, kafka: &KafkaSettings, topics: &[String; 2]) -> Result<(), String> {
        let mut config = kafka.client_config(ClientRole::Consumer);
        config
            .set("group.id", "baton-dlq-tally")
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("queued.max.messages.kbytes", "4096");
        let consumer: StreamConsumer = config
            .create()
            .map_err(|err| format!("cannot create the DLQ reader: {err}"))?;
        let consumer = Arc::new(consumer);
        // A new reader starts from scratch: its counts replace the old ones.
        self.update(|counts| *counts = Counts::default());
        let mut assigned = BTreeSet::new();
        let mut ends = BTreeMap::new();
        let mut checks = tokio::time::interval(CHECK_EVERY);
        loop {
            tokio::select! {
                _ = checks.tick() => {
                    let reader = Arc::clone(&consumer);
                    let topics = topics.clone();
                    let known = assigned.clone();
                    let grown = tokio::task::spawn_blocking(move || new_partitions(&reader, &topics, &known))
                        .await
                        .map_err(|err| err.to_string())??;
                    if !grown.is_empty() {
                        let mut list = TopicPartitionList::new();
                        for (topic, partition, end) in &grown {
                            list.add_partition_offset(topic, *partition, Offset::Beginning)
                                .map_err(|err| err.to_string())?;
                            assigned.insert((topic.clone(), *partition));
                            if let Some(end) = end {
                                ends.insert((topic.clone(), *partition), *end);
                            }
                        }
                        consumer
                            .incremental_assign(&list)
                            .map_err(|err| format!("cannot assign the DLQ topics: {err}"))?;
                    }
                    let caught_up = caught_up(&consumer, &mut ends);
                    self.update(|counts| {
                        counts.caught_up = caught_up;
                        counts.error = None;
                    });
                }
                received = consumer.recv() => {
                    let message = received.map_err(|err| format!("reading the DLQ: {err}"))?;
                    let class = message
                        .headers()
                        .and_then(|headers| {
                            headers
                                .iter()
                                .find(|header| header.key == headers::ERROR_CLASS)
                                .and_then(|header| header.value)
                                .map(|value| String::from_utf8_lossy(value).into_owned())
                        })
                        .unwrap_or_else(|| "unknown".to_string());
                    let topic = message.topic().to_string();
                    self.update(|counts| {
                        *counts.by_topic.entry(topic).or_default().entry(class).or_default() += 1;
                    });
                }
            }
        }
    }
}

/// Partitions of `topics` not yet in `known`, with their current end offset
/// (None when empty).
/// A topic that does not exist yet is skipped (it is looked for again next time).
fn new_partitions(
    consumer: &StreamConsumer,
    topics: &[String; 2],
    known: &BTreeSet<(String, i32)>,
) -> Result<Vec<(String, i32, Option<i64>)>, String> {
    let timeout = Duration::from_secs(5);
    let mut grown = Vec::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(|err| format!("cannot read {topic} metadata: {err}"))?;
        let partitions = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()));
        for partition in partitions {
            if known.contains(&(topic.clone(), partition)) {
                continue;
            }
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, timeout)
                .map_err(|err| format!("cannot read {topic}-{partition} offsets: {err}"))?;
            // An empty partition is read up to its end already.
            let end = if high > low { Some(high) } else { None };
            grown.push((topic.clone(), partition, end));
        }
    }
    Ok(grown)
}

/// Whether the reader's position has reached, on every partition, the end
/// that partition had when it was assigned. Reached partitions are forgotten.
fn caught_up(consumer: &StreamConsumer, ends: &mut BTreeMap<(String, i32), i64>) -> bool {
    if let Ok(position) = consumer.position() {
        for element in position.elements() {
            let reached = match element.offset() {
                Offset::Offset(at) => ends
                    .get(&(element.topic().to_string(), element.partition()))
                    .is_some_and(|end| at >= *end),
                _ => false,
            };
            if reached {
                ends.remove(&(element.topic().to_string(), element.partition()));
            }
        }
    }
    ends.is_empty()
}
