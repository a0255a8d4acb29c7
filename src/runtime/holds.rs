//! Records a task holds back instead of processing: one waiting for its
//! writer schema (a Schema Registry outage pauses the partition), and one
//! whose state read failed (retried after a backoff, then the partition is
//! reopened). While a record is held, no later record of the task is taken,
//! so per-partition order holds.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;

use super::Pipeline;
use super::engine::RebalanceHook;
use super::lifecycle::Lifecycle;
use super::task::{ReopenReason, TaskFailure, TopicPartition, Work};
use crate::metrics::METRICS;
use crate::registry::RegistryError;

/// A writer-schema lookup in flight, after an optional backoff delay.
pub(super) type SchemaLookup = Pin<Box<dyn Future<Output = Result<(), RegistryError>> + Send>>;

pub(super) fn fetch_schema(pipeline: &Arc<Pipeline>, id: u32, delay: Duration) -> SchemaLookup {
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
pub(super) struct Stalled {
    pub message: OwnedMessage,
    pub tp: TopicPartition,
    pub schema_id: u32,
    failures: u32,
    /// Set while the task is paused on a registry outage.
    paused_since: Option<Instant>,
}

impl Stalled {
    pub fn new(message: OwnedMessage, schema_id: u32) -> Stalled {
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
    pub fn failed(
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
    pub fn release(&self, consumer: &StreamConsumer<RebalanceHook>, tps: &[TopicPartition]) {
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
pub(super) fn set_paused(
    consumer: &StreamConsumer<RebalanceHook>,
    tps: &[TopicPartition],
    paused: bool,
) {
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

/// Policy for state read errors: the same record is retried after a
/// doubling backoff (50 ms up to 2 s) while the partition is paused; after
/// this many consecutive failures the stores are reopened (a store that
/// cannot be read is not trusted further).
const STATE_READ_REOPEN_AFTER: u32 = 5;
const STATE_RETRY_FIRST: Duration = Duration::from_millis(50);
const STATE_RETRY_MAX: Duration = Duration::from_secs(2);

/// A record held back after a transient state read error.
pub(super) struct TransientHold {
    pub message: OwnedMessage,
    pub tp: TopicPartition,
    pub failures: u32,
    pub retry: Pin<Box<tokio::time::Sleep>>,
}

/// A state read failed for `message` (`failures` earlier times already).
/// Pauses the partition on the first failure and schedules a retry; after
/// [`STATE_READ_REOPEN_AFTER`] asks for the partition to be reopened.
pub(super) fn state_read_failed(
    message: OwnedMessage,
    failures: Option<u32>,
    dependency: &'static str,
    reason: &str,
    work: &mut Work,
    life: &Lifecycle,
) -> Option<TransientHold> {
    METRICS
        .transient_errors
        .with_label_values(&[dependency])
        .inc();
    let tp = TopicPartition::new(message.topic(), message.partition());
    let failures = match failures {
        Some(earlier) => earlier + 1,
        None => {
            METRICS.partitions_paused.inc();
            set_paused(&life.consumer, &life.tps, true);
            tracing::warn!(
                partition = life.partition,
                offset = message.offset(),
                dependency,
                cause = reason,
                "state read failed; partition paused, retrying the record with backoff"
            );
            1
        }
    };
    if failures >= STATE_READ_REOPEN_AFTER {
        tracing::error!(
            partition = life.partition,
            failures,
            cause = reason,
            "state reads keep failing; the partition will be reopened"
        );
        METRICS.partitions_paused.dec();
        set_paused(&life.consumer, &life.tps, false);
        work.pending.failure = Some(TaskFailure::Reopen(reason.to_string()));
        work.reopen = Some(ReopenReason::StateRead);
        return None;
    }
    let delay = STATE_RETRY_FIRST
        .saturating_mul(1 << (failures - 1).min(10))
        .min(STATE_RETRY_MAX);
    Some(TransientHold {
        message,
        tp,
        failures,
        retry: Box::pin(tokio::time::sleep(delay)),
    })
}

/// Ends the pause of a record that now went through.
pub(super) fn resume_after_state_errors(hold: &TransientHold, life: &Lifecycle) {
    METRICS.partitions_paused.dec();
    set_paused(&life.consumer, &life.tps, false);
    tracing::info!(
        partition = life.partition,
        failures = hold.failures,
        "state readable again; partition resumed"
    );
}
