//! A partition's lifecycle, in one place: open (restore the stores from the
//! changelog while still answering the engine), reopen, and the seeks that
//! go with them.
//!
//! Reopen is the one recovery path. After a commit whose outcome is unknown,
//! a rebuilt producer, a failed post-commit RocksDB write, a missed barrier
//! or repeated state read errors, the task closes its stores, seeks its
//! inputs to the group's committed offsets and restores the stores from the
//! changelog. Restore skips changelog records whose source offset is at or
//! past the committed input offset, so the result is exact whatever the
//! broker did with the last transaction.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::engine::RebalanceHook;
use super::processor::{CONTEXT_STORE, PartitionProcessor};
use super::task::{Control, ReopenReason, TaskProgress, TopicPartition};
use super::{Pipeline, Readiness};
use crate::metrics::METRICS;
use crate::state::restore::{self, RestoreRequest};
use crate::state::{self, PartitionStore};
use crate::transactor::{Generation, Transactor};

/// Attempts to read the committed offsets (and to seek) before a reopen
/// gives up and holds the partition unprocessed until it is released.
const SEEK_ATTEMPTS: u32 = 10;
const SEEK_BACKOFF_FIRST: Duration = Duration::from_millis(50);
const SEEK_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Attempts to open (restore) a partition's stores, and the backoff between
/// them (about three minutes in all), before it is held unprocessed until
/// it is released.
const OPEN_ATTEMPTS: u32 = 12;
const OPEN_BACKOFF_FIRST: Duration = Duration::from_millis(500);
const OPEN_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long one committed-offsets request or seek may take.
const BROKER_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What a task's lifecycle needs, whatever state the task is in.
pub(super) struct Lifecycle {
    pub partition: i32,
    pub tps: Vec<TopicPartition>,
    pub consumer: Arc<StreamConsumer<RebalanceHook>>,
    pub pipeline: Arc<Pipeline>,
    pub readiness: Arc<Readiness>,
    pub control: mpsc::UnboundedReceiver<Control>,
    /// The generation this task may send in.
    pub generation: Generation,
    pub transactor: Arc<Transactor>,
}

impl Lifecycle {
    /// The index of `tp` among the task's inputs (its queues' order).
    pub fn input_index(&self, tp: &TopicPartition) -> Option<usize> {
        self.tps.iter().position(|input| input == tp)
    }

    /// Opens and restores the partition's stores. While restoring, barriers
    /// get an empty report and outcomes only move the generation on; a stop
    /// ends the restore. `None` when stopped (or the engine went away).
    ///
    /// An open that fails (a full disk, an unreadable store directory) is
    /// tried again with backoff, [`OPEN_ATTEMPTS`] times in all, while the
    /// partition stays assigned: without it the partition would sit
    /// assigned and unprocessed until the next rebalance, which a quiet
    /// group may never have. Past the bound it is held unprocessed until
    /// released, as before, and says so.
    pub async fn open(&mut self) -> Option<PartitionProcessor> {
        let mut backoff = OPEN_BACKOFF_FIRST;
        for attempt in 1..=OPEN_ATTEMPTS {
            let err = match self.try_open().await {
                Ok(opened) => return opened,
                Err(err) => err,
            };
            if attempt == OPEN_ATTEMPTS {
                tracing::error!(partition = self.partition, attempts = attempt, cause = %err, "cannot restore the stores; the partition stays unprocessed until it is released");
                return self.wait_for_stop().await;
            }
            METRICS
                .partition_reopens
                .with_label_values(&[ReopenReason::StateOpen.label()])
                .inc();
            tracing::warn!(partition = self.partition, attempt, retry_in_ms = backoff.as_millis() as u64, cause = %err, "cannot restore the stores; trying again");
            if !self.pause(backoff).await {
                return None;
            }
            backoff = (backoff * 2).min(OPEN_BACKOFF_MAX);
        }
        None
    }

    /// One attempt at [`Lifecycle::open`]: `Ok(None)` when stopped meanwhile.
    async fn try_open(&mut self) -> Result<Option<PartitionProcessor>, String> {
        self.readiness.partition_restoring(self.partition);
        let cancel = restore::cancel_flag();
        // The restore borrows its own handles, so `self` stays free to
        // answer the engine meanwhile.
        let (pipeline, consumer, tps) = (
            Arc::clone(&self.pipeline),
            Arc::clone(&self.consumer),
            self.tps.clone(),
        );
        let opening = PartitionProcessor::open(
            &pipeline,
            self.partition,
            &tps,
            &consumer,
            Arc::clone(&cancel),
        );
        tokio::pin!(opening);
        let opened = loop {
            tokio::select! {
                biased;
                command = self.control.recv() => match command {
                    Some(Control::Barrier { reply }) => {
                        let _ = reply.send(TaskProgress::idle(self.partition));
                        match self.control.recv().await {
                            Some(Control::Stop { reply }) => {
                                cancel.store(true, Ordering::Relaxed);
                                close_if_opened((&mut opening).await).await;
                                let _ = reply.send(());
                                return Ok(None);
                            }
                            Some(command) => self.follow(&command),
                            None => {
                                cancel.store(true, Ordering::Relaxed);
                                close_if_opened((&mut opening).await).await;
                                return Ok(None);
                            }
                        }
                    }
                    Some(Control::Stop { reply }) => {
                        cancel.store(true, Ordering::Relaxed);
                        close_if_opened((&mut opening).await).await;
                        let _ = reply.send(());
                        return Ok(None);
                    }
                    Some(command) => self.follow(&command),
                    None => {
                        cancel.store(true, Ordering::Relaxed);
                        close_if_opened((&mut opening).await).await;
                        return Ok(None);
                    }
                },
                opened = &mut opening => break opened,
            }
        };
        let processor = opened?;
        self.readiness.partition_ready(self.partition);
        Ok(Some(processor))
    }

    /// Waits `delay`, answering the engine meanwhile; `false` when told to
    /// stop (or the engine went away).
    async fn pause(&mut self, delay: Duration) -> bool {
        self.answering(tokio::time::sleep(delay)).await.is_some()
    }

    /// Awaits `work` while answering the engine: barriers get an empty
    /// report (nothing is processed meanwhile) and outcomes only move the
    /// generation on. `None` when told to stop (or the engine went away): a
    /// pod shutting down must not wait for a retry loop to run its course.
    async fn answering<T>(&mut self, work: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                command = self.control.recv() => match command {
                    Some(Control::Barrier { reply }) => {
                        let _ = reply.send(TaskProgress::idle(self.partition));
                    }
                    Some(Control::Stop { reply }) => {
                        let _ = reply.send(());
                        return None;
                    }
                    Some(command) => self.follow(&command),
                    None => return None,
                },
                done = &mut work => return Some(done),
            }
        }
    }

    /// A transaction outcome while not processing: only its generation
    /// matters (this task had nothing in it).
    fn follow(&mut self, command: &Control) {
        match command {
            Control::Committed { next, .. }
            | Control::Aborted { next, .. }
            | Control::Reopen { next, .. } => self.generation = *next,
            Control::Barrier { .. } | Control::Stop { .. } => {}
        }
    }

    /// Closes the stores, seeks the inputs to the group's committed offsets
    /// and opens (restores) the stores again. `None` when stopped meanwhile
    /// (the caller releases the partition).
    pub async fn reopen(
        &mut self,
        processor: PartitionProcessor,
        reason: ReopenReason,
    ) -> Option<PartitionProcessor> {
        METRICS
            .partition_reopens
            .with_label_values(&[reason.label()])
            .inc();
        tracing::warn!(
            partition = self.partition,
            reason = reason.label(),
            "reopening the partition: closing its stores, seeking to the committed offsets and restoring from the changelog"
        );
        let mut processor = processor;
        processor.on_abort();
        processor.close().await;
        match self.seek_to_committed().await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(err) => {
                tracing::error!(partition = self.partition, cause = %err, "cannot seek to the committed offsets; the partition stays unprocessed");
                self.readiness.partition_restoring(self.partition);
                return self.wait_for_stop().await;
            }
        }
        let reopened = self.open().await;
        if reopened.is_some() {
            tracing::info!(
                partition = self.partition,
                reason = reason.label(),
                "partition reopened"
            );
        }
        reopened
    }

    /// Seeks every input of the task to the group's committed offset (the
    /// start of the partition where none is committed, as
    /// `auto.offset.reset=earliest` would). Bounded retries, answering the
    /// engine throughout: `Ok(false)` when told to stop meanwhile.
    pub async fn seek_to_committed(&mut self) -> Result<bool, String> {
        let mut backoff = SEEK_BACKOFF_FIRST;
        let mut attempt = 1;
        loop {
            let consumer = Arc::clone(&self.consumer);
            let tps = self.tps.clone();
            let span = tracing::Span::current();
            let seeking = tokio::task::spawn_blocking(move || {
                let _span = span.enter();
                seek_blocking(&consumer, &tps)
            });
            let Some(result) = self.answering(seeking).await else {
                return Ok(false);
            };
            match result.map_err(|err| err.to_string()).and_then(|r| r) {
                Ok(()) => return Ok(true),
                Err(err) if attempt < SEEK_ATTEMPTS => {
                    tracing::warn!(attempt, cause = %err, "seek to the committed offsets failed; retrying");
                    if !self.pause(backoff).await {
                        return Ok(false);
                    }
                    backoff = (backoff * 2).min(SEEK_BACKOFF_MAX);
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// A partition that cannot be restored must not be processed; hold it
    /// (uncommitted, so nothing is lost) until the engine releases it.
    pub async fn wait_for_stop(&mut self) -> Option<PartitionProcessor> {
        self.answering(std::future::pending::<()>()).await;
        None
    }
}

/// Closes stores that finished opening after the task was told to stop.
async fn close_if_opened(opened: Result<PartitionProcessor, String>) {
    if let Ok(processor) = opened {
        processor.close().await;
    }
}

/// Reads the committed offsets and seeks to them. Blocking.
fn seek_blocking(
    consumer: &StreamConsumer<RebalanceHook>,
    tps: &[TopicPartition],
) -> Result<(), String> {
    let committed = committed_offsets(consumer, tps)?;
    for tp in tps {
        let offset = committed
            .get(&(tp.topic().to_string(), tp.partition()))
            .map_or(Offset::Beginning, |at| Offset::Offset(*at));
        consumer
            .seek(tp.topic(), tp.partition(), offset, BROKER_CALL_TIMEOUT)
            .map_err(|err| format!("cannot seek {tp} to {offset:?}: {err}"))?;
        tracing::info!(
            topic = tp.topic(),
            partition = tp.partition(),
            ?offset,
            "seeked to the committed offset"
        );
    }
    Ok(())
}

/// The group's committed offsets for `tps`, from the broker. Blocking.
///
/// librdkafka's `rd_kafka_committed()` sends OffsetFetch with
/// `require_stable` set whenever the consumer is `read_committed` (it sets
/// `require_stable_offsets = isolation.level == read_committed`), and baton's
/// consumers always are: offsets of a transaction still completing are
/// waited for (UNSTABLE_OFFSET_COMMIT is retried), never read half-done.
pub(super) fn committed_offsets(
    consumer: &StreamConsumer<RebalanceHook>,
    tps: &[TopicPartition],
) -> Result<HashMap<(String, i32), i64>, String> {
    let mut request = TopicPartitionList::new();
    for tp in tps {
        request.add_partition(tp.topic(), tp.partition());
    }
    let committed = consumer
        .committed_offsets(request, BROKER_CALL_TIMEOUT)
        .map_err(|err| format!("cannot read committed offsets: {err}"))?;
    Ok(committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(offset) => Some(((e.topic().to_string(), e.partition()), offset)),
            _ => None,
        })
        .collect())
}

/// Opens and restores the context store of one partition. Blocking.
/// Returns the store and the partition's committed timer sequence.
pub(super) fn open_and_restore(
    pipeline: &Pipeline,
    partition: i32,
    inputs: &[TopicPartition],
    consumer: &StreamConsumer<RebalanceHook>,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<(PartitionStore, i64), String> {
    // Timer firings are judged like inputs: by the offset their
    // transaction committed on the timers topic.
    let mut judged = inputs.to_vec();
    judged.push(TopicPartition::new(&pipeline.timers_topic, partition));
    let committed = committed_offsets(consumer, &judged)?;
    let timer_sequence = committed
        .get(&(pipeline.timers_topic.clone(), partition))
        .copied()
        .unwrap_or(0);
    let path = state::store_path(
        &pipeline.state_dir,
        &pipeline.application_id,
        CONTEXT_STORE,
        partition,
    );
    let opened =
        PartitionStore::open(&path, &pipeline.store_memory).map_err(|err| err.to_string())?;
    let report = restore::restore(
        opened.db(),
        &RestoreRequest {
            kafka: &pipeline.kafka,
            changelog_topic: &pipeline.changelog,
            partition,
            committed: &committed,
            version_of: state::record::version_of,
            timers_of: state::record::timers_of,
            cancel,
        },
    )
    .map_err(|err| err.to_string())?;
    tracing::info!(
        partition,
        store = CONTEXT_STORE,
        read = report.read,
        applied = report.applied,
        skipped_uncommitted = report.skipped_uncommitted,
        skipped_stale = report.skipped_stale,
        elapsed_ms = report.elapsed.as_millis() as u64,
        "store restored"
    );
    Ok((opened, timer_sequence))
}
