//! One task per assigned input partition.
//!
//! As in Kafka Streams, a task owns partition N of every co-partitioned input
//! topic, because a context's state lives on the partition its records hash
//! to, whichever topic they arrive on. A task pulls records from its own
//! partition queues, runs each through the processor, and sends the outputs
//! into the pod's open transaction, tagged with the transaction's
//! generation. Control messages from the engine win every race (`biased`):
//! at a barrier the task reports its positions and waits for the
//! transaction's outcome. Opening, restoring and reopening the partition
//! live in [`super::lifecycle`]; isolating a record the broker keeps
//! refusing lives in [`super::refusals`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::Message;
use rdkafka::Offset;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::FutureRecord;
use tokio::sync::mpsc;

use super::engine::{BARRIER_TIMEOUT, RebalanceHook};
use super::holds::{
    SchemaLookup, Stalled, TransientHold, fetch_schema, resume_after_state_errors,
    state_read_failed,
};
use super::lag::LagTracking;
use super::lifecycle::Lifecycle;
use super::processor::{LastChangelog, OutRecord, PartitionProcessor, Processed};
use super::refusals::{Grant, Refusals};
use super::{Pipeline, Readiness};
use crate::dlq::ErrorClass;
use crate::metrics::METRICS;
use crate::transactor::{Generation, SendError, Transactor};

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
    /// The transaction committed: make its state durable and go on in
    /// generation `next`. `solo` names the task whose next transaction is
    /// its own (every other task takes no records until the next outcome).
    Committed { next: Generation, solo: Option<i32> },
    /// The transaction was aborted: forget its state, rewind to the
    /// committed offsets and go on in generation `next`. `refused` carries
    /// the broker's words when the broker or producer caused the abort.
    Aborted {
        next: Generation,
        refused: Option<String>,
        solo: Option<i32>,
    },
    /// Reopen the partition from what the broker committed, then go on in
    /// generation `next`.
    Reopen {
        next: Generation,
        reason: ReopenReason,
    },
    /// Release the partition.
    Stop { reply: std_mpsc::Sender<()> },
}

/// Why a partition is reopened (the `baton_partition_reopens_total` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReopenReason {
    /// A commit's outcome is unknown.
    CommitUnknown,
    /// The producer was fenced or failed fatally and was rebuilt.
    ProducerRebuilt,
    /// Writing committed state to RocksDB failed.
    StateWrite,
    /// The task did not reach a barrier in time.
    MissedBarrier,
    /// Reading state kept failing.
    StateRead,
    /// Opening (restoring) the stores failed, and is tried again.
    StateOpen,
    /// Rewinding an input after an abort or a dead letter kept failing; the
    /// reopen seeks to the committed offsets afresh.
    SeekFailed,
}

impl ReopenReason {
    pub fn label(self) -> &'static str {
        match self {
            ReopenReason::CommitUnknown => "commit_unknown",
            ReopenReason::ProducerRebuilt => "producer_rebuilt",
            ReopenReason::StateWrite => "state_write",
            ReopenReason::MissedBarrier => "missed_barrier",
            ReopenReason::StateRead => "state_read",
            ReopenReason::StateOpen => "state_open",
            ReopenReason::SeekFailed => "seek_failed",
        }
    }
}

/// Why a task needs the open transaction aborted.
#[derive(Debug, Clone)]
pub enum TaskFailure {
    /// The producer refused an output (the broker's or client's words).
    Refused(String),
    /// The task must reopen its partition (its stores are suspect).
    Reopen(String),
}

impl fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskFailure::Refused(text) => write!(f, "refused: {text}"),
            TaskFailure::Reopen(text) => write!(f, "must reopen: {text}"),
        }
    }
}

/// A task's positions at a barrier.
#[derive(Debug)]
pub struct TaskProgress {
    pub partition: i32,
    /// For each input partition that advanced: the offset to commit.
    pub next_offsets: Vec<(TopicPartition, i64)>,
    /// Input records processed in this transaction.
    pub records: u64,
    /// Set when the transaction must abort.
    pub failure: Option<TaskFailure>,
    /// The task asks for a transaction of its own (see `refusals`).
    pub wants_solo: bool,
}

impl TaskProgress {
    /// The report of a task that took part in nothing.
    pub fn idle(partition: i32) -> TaskProgress {
        TaskProgress {
            partition,
            next_offsets: vec![],
            records: 0,
            failure: None,
            wants_solo: false,
        }
    }
}

/// What the task has done since the last commit, per input partition.
#[derive(Default)]
pub(super) struct Uncommitted {
    /// First offset processed (where an abort rewinds to) and next offset.
    positions: BTreeMap<TopicPartition, (i64, i64)>,
    records: u64,
    pub failure: Option<TaskFailure>,
    /// The last changelog write of each store: its offset becomes that
    /// store's checkpoint.
    last_changelog: LastChangelog,
    /// Timers fired in this transaction, at this offset of the timers topic.
    timer_sequence: Option<i64>,
}

/// Everything a task needs to run.
pub(crate) struct TaskSetup {
    pub partition: i32,
    pub queues: Vec<(TopicPartition, StreamPartitionQueue<RebalanceHook>)>,
    pub consumer: Arc<StreamConsumer<RebalanceHook>>,
    pub transactor: Arc<Transactor>,
    /// The open transaction's generation when the task starts.
    pub generation: Generation,
    pub pipeline: Arc<Pipeline>,
    pub readiness: Arc<Readiness>,
    pub control: mpsc::UnboundedReceiver<Control>,
}

/// What the loop does after a control message.
enum Next {
    Continue,
    Reopen(ReopenReason),
    Stop(Option<std_mpsc::Sender<()>>),
}

/// The task's work since the last outcome.
#[derive(Default)]
pub(super) struct Work {
    pub pending: Uncommitted,
    pub outputs: Vec<OutRecord>,
    pub refusals: Refusals,
    /// The task asked to reopen its partition at the next outcome.
    pub reopen: Option<ReopenReason>,
    /// Partitions the last abort rewound.
    rewound: Vec<TopicPartition>,
    /// How far the task's input has got, for firing timers.
    pub clock: InputClock,
}

/// Where a task's input stands in time.
#[derive(Default)]
pub(super) struct InputClock {
    /// The newest timestamp of an input record applied.
    pub stream_time_ms: i64,
    /// Stream time as of the last commit: an abort rewinds the records that
    /// moved it since, so it falls back here until they are applied again.
    committed_stream_time_ms: i64,
    /// The inputs (by queue index) read to their end: librdkafka reported
    /// the partition's end (`enable.partition.eof`) and no record came
    /// after it. A seek clears an input's mark, and librdkafka reports the
    /// end again once the fetch from the new position reaches it.
    at_end: BTreeSet<usize>,
}

impl InputClock {
    /// Up to when timers are due. By the wall clock only once every input
    /// has been read to its end: before that (a task just opened, a
    /// backlog, a rewind) a record not yet read, timestamped before a
    /// timer's due time, may be the answer that cancels it. Until then,
    /// only up to the newest input applied.
    fn cutoff_ms(&self, inputs: usize, now_ms: i64) -> i64 {
        if self.at_end.len() == inputs {
            now_ms
        } else {
            now_ms.min(self.stream_time_ms)
        }
    }

    fn took_record(&mut self, input: usize) {
        self.at_end.remove(&input);
    }

    fn reached_end(&mut self, input: usize) {
        self.at_end.insert(input);
    }

    fn committed(&mut self) {
        self.committed_stream_time_ms = self.stream_time_ms;
    }

    /// The inputs at `rewound` were sought back: their records come again.
    fn rewound(&mut self, rewound: impl IntoIterator<Item = usize>) {
        self.stream_time_ms = self.committed_stream_time_ms;
        for input in rewound {
            self.at_end.remove(&input);
        }
    }
}

impl Work {
    fn progress(&mut self, partition: i32, timers_topic: &str) -> TaskProgress {
        let timers = self
            .pending
            .timer_sequence
            .map(|sequence| (TopicPartition::new(timers_topic, partition), sequence + 1));
        TaskProgress {
            partition,
            next_offsets: self
                .pending
                .positions
                .iter()
                .map(|(tp, (_, next))| (tp.clone(), *next))
                .chain(timers)
                .collect(),
            records: self.pending.records,
            failure: self.pending.failure.take(),
            wants_solo: self.refusals.wants_solo(),
        }
    }
}

pub(crate) async fn run_partition_task(setup: TaskSetup) {
    let TaskSetup {
        partition,
        queues,
        consumer,
        transactor,
        generation,
        pipeline,
        readiness,
        control,
    } = setup;
    let tps: Vec<TopicPartition> = queues.iter().map(|(tp, _)| tp.clone()).collect();
    let _lag = LagTracking::start(&pipeline.lag, &tps);
    let mut life = Lifecycle {
        partition,
        tps,
        consumer,
        pipeline,
        readiness,
        control,
        generation,
        transactor,
    };
    let Some(mut processor) = life.open().await else {
        life.readiness.partition_released(partition);
        return;
    };
    // The partition's end is reported on its own queue only once the queue
    // is split; one reported before (on the main queue) would be missed and
    // timers would wait for input. Seeking restarts the fetch, so the end is
    // reported again, here.
    match life.seek_to_committed().await {
        Ok(true) => {}
        // Stopped while seeking: nothing was processed yet.
        Ok(false) => {
            processor.close().await;
            life.readiness.partition_released(partition);
            return;
        }
        Err(err) => {
            tracing::warn!(partition, cause = %err, "cannot seek to the committed offsets at start; due timers wait for input until the partition's end is reported");
        }
    }

    // Each record or end-of-partition comes tagged with its input's index:
    // librdkafka's end report names the partition, not the topic.
    let mut records = futures::stream::select_all(
        queues
            .iter()
            .enumerate()
            .map(|(input, (_, queue))| queue.stream().map(move |fetched| (input, fetched))),
    );
    let mut work = Work::default();
    // An Avro record whose writer schema is being fetched. While it waits,
    // no later record of this task is taken: per-partition order holds.
    let mut stalled: Option<Stalled> = None;
    let mut lookup: Option<SchemaLookup> = None;
    // A record whose state read failed, retried after a backoff.
    let mut transient: Option<TransientHold> = None;
    // Due timers fire by wall clock, whether or not input arrives.
    let mut timer_rounds = tokio::time::interval(life.pipeline.timer_interval);
    timer_rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let takes = work.pending.failure.is_none()
            && work.reopen.is_none()
            && stalled.is_none()
            && transient.is_none()
            && work.refusals.takes_records();
        let next = tokio::select! {
            biased;
            command = life.control.recv() => {
                let next = on_control(command, &mut work, &mut processor, &mut life).await;
                if matches!(next, Next::Continue) {
                    release_rewound(&mut stalled, &mut lookup, &mut transient, &mut work, &life);
                }
                next
            }
            fetched = async { match lookup.as_mut() { Some(fetch) => fetch.await, None => std::future::pending().await } }, if lookup.is_some() => {
                lookup = None;
                let Some(mut held) = stalled.take() else { continue };
                match fetched {
                    Ok(()) => {
                        held.release(&life.consumer, &life.tps);
                        let message = held.message;
                        match handle(&message, &mut work, &mut processor, &life).await {
                            Handled::Done => solo_took(&mut work, message),
                            Handled::NeedsSchema(id) => {
                                // Fetched, yet not cached: ask again rather than guess.
                                lookup = Some(fetch_schema(&life.pipeline, id, Duration::ZERO));
                                stalled = Some(Stalled::new(message, id));
                            }
                            Handled::Transient(dependency, reason) => {
                                transient = state_read_failed(message, None, dependency, &reason, &mut work, &life);
                            }
                        }
                    }
                    Err(err) => {
                        let delay = held.failed(partition, &err, &life.consumer, &life.tps);
                        lookup = Some(fetch_schema(&life.pipeline, held.schema_id, delay));
                        stalled = Some(held);
                    }
                }
                Next::Continue
            }
            _ = async { match transient.as_mut() { Some(hold) => hold.retry.as_mut().await, None => std::future::pending().await } }, if transient.is_some() => {
                let Some(hold) = transient.take() else { continue };
                match handle(&hold.message, &mut work, &mut processor, &life).await {
                    Handled::Done => {
                        resume_after_state_errors(&hold, &life);
                        solo_took(&mut work, hold.message);
                    }
                    Handled::NeedsSchema(id) => {
                        resume_after_state_errors(&hold, &life);
                        lookup = Some(fetch_schema(&life.pipeline, id, Duration::ZERO));
                        stalled = Some(Stalled::new(hold.message, id));
                    }
                    Handled::Transient(dependency, reason) => {
                        let failures = hold.failures;
                        transient = state_read_failed(hold.message, Some(failures), dependency, &reason, &mut work, &life);
                    }
                }
                Next::Continue
            }
            _ = timer_rounds.tick(), if takes => {
                fire_timers(&mut work, &mut processor, &life).await;
                Next::Continue
            }
            message = records.next(), if takes => {
                let message = match message {
                    Some((input, Ok(message))) => {
                        work.clock.took_record(input);
                        message
                    }
                    Some((input, Err(KafkaError::PartitionEOF(_)))) => {
                        work.clock.reached_end(input);
                        continue;
                    }
                    Some((_, Err(err))) => {
                        tracing::warn!(partition, cause = %err, "partition queue error");
                        continue;
                    }
                    None => break,
                };
                if work.refusals.is_solo() {
                    let message = message.detach();
                    match handle(&message, &mut work, &mut processor, &life).await {
                        Handled::Done => solo_took(&mut work, message),
                        Handled::NeedsSchema(id) => {
                            lookup = Some(fetch_schema(&life.pipeline, id, Duration::ZERO));
                            stalled = Some(Stalled::new(message, id));
                        }
                        Handled::Transient(dependency, reason) => {
                            transient = state_read_failed(message, None, dependency, &reason, &mut work, &life);
                        }
                    }
                } else {
                    match handle(&message, &mut work, &mut processor, &life).await {
                        Handled::Done => {}
                        Handled::NeedsSchema(id) => {
                            lookup = Some(fetch_schema(&life.pipeline, id, Duration::ZERO));
                            stalled = Some(Stalled::new(message.detach(), id));
                        }
                        Handled::Transient(dependency, reason) => {
                            transient = state_read_failed(message.detach(), None, dependency, &reason, &mut work, &life);
                        }
                    }
                }
                Next::Continue
            }
        };
        match next {
            Next::Continue => {}
            Next::Reopen(reason) => {
                release_all(&mut stalled, &mut lookup, &mut transient, &life);
                work = Work::default();
                match life.reopen(processor, reason).await {
                    Some(reopened) => processor = reopened,
                    None => {
                        drop(records);
                        life.readiness.partition_released(partition);
                        return;
                    }
                }
            }
            Next::Stop(reply) => {
                release_all(&mut stalled, &mut lookup, &mut transient, &life);
                processor.on_abort();
                drop(records);
                processor.close().await;
                life.readiness.partition_released(partition);
                if let Some(reply) = reply {
                    let _ = reply.send(());
                }
                return;
            }
        }
    }
    release_all(&mut stalled, &mut lookup, &mut transient, &life);
    drop(records);
    processor.close().await;
    life.readiness.partition_released(partition);
}

/// A control message while processing.
async fn on_control(
    command: Option<Control>,
    work: &mut Work,
    processor: &mut PartitionProcessor,
    life: &mut Lifecycle,
) -> Next {
    match command {
        Some(Control::Barrier { reply }) => {
            // A failed reply means the engine gave up waiting for this
            // task; its next word (a reopen) says what to do.
            let _ = reply.send(work.progress(life.partition, &life.pipeline.timers_topic));
            let outcome = life.control.recv().await;
            settle(outcome, work, processor, life).await
        }
        Some(Control::Stop { reply }) => Next::Stop(Some(reply)),
        Some(Control::Reopen { next, reason }) => {
            life.generation = next;
            Next::Reopen(reason)
        }
        // Outcomes only follow a barrier; anything else is stale.
        Some(Control::Committed { .. }) | Some(Control::Aborted { .. }) => Next::Continue,
        None => Next::Stop(None),
    }
}

/// Applies a transaction's outcome to the task.
async fn settle(
    outcome: Option<Control>,
    work: &mut Work,
    processor: &mut PartitionProcessor,
    life: &mut Lifecycle,
) -> Next {
    let done = std::mem::take(&mut work.pending);
    match outcome {
        Some(Control::Committed { next, solo }) => {
            life.generation = next;
            work.clock.committed();
            let advanced: Vec<TopicPartition> = done.positions.keys().cloned().collect();
            for (tp, (_, next)) in &done.positions {
                life.pipeline.lag.committed(tp, *next);
            }
            let timers_fired = done.timer_sequence.is_some();
            if let Err(err) = processor.on_commit(done.last_changelog, timers_fired).await {
                tracing::error!(partition = life.partition, cause = %err, "cannot write committed state locally; reopening the stores");
                return Next::Reopen(ReopenReason::StateWrite);
            }
            work.refusals.committed(&advanced);
            if let Some(reason) = work.reopen.take() {
                return Next::Reopen(reason);
            }
            match grant(solo, work, processor, life).await {
                Ok(()) => Next::Continue,
                Err(reason) => Next::Reopen(reason),
            }
        }
        Some(Control::Aborted {
            next,
            refused,
            solo,
        }) => {
            life.generation = next;
            processor.on_abort();
            if let Some(reason) = work.reopen.take() {
                return Next::Reopen(reason);
            }
            let firsts: Vec<(TopicPartition, i64)> = done
                .positions
                .iter()
                .map(|(tp, (first, _))| (tp.clone(), *first))
                .collect();
            for (tp, first) in &firsts {
                if rewind(&life.consumer, tp, *first).await.is_err() {
                    return Next::Reopen(ReopenReason::SeekFailed);
                }
            }
            work.clock
                .rewound(firsts.iter().filter_map(|(tp, _)| life.input_index(tp)));
            work.rewound = firsts.iter().map(|(tp, _)| tp.clone()).collect();
            work.refusals.aborted(&firsts, refused.as_deref());
            match grant(solo, work, processor, life).await {
                Ok(()) => Next::Continue,
                Err(reason) => Next::Reopen(reason),
            }
        }
        Some(Control::Reopen { next, reason }) => {
            life.generation = next;
            Next::Reopen(reason)
        }
        Some(Control::Stop { reply }) => Next::Stop(Some(reply)),
        Some(Control::Barrier { .. }) | None => Next::Stop(None),
    }
}

/// Acts on the engine's choice of solo task: when it is this task and a
/// record is to be dead-lettered, writes the dead letter as the
/// transaction's only output and moves past the record. When the input
/// cannot be moved past it, nothing is written and the partition reopens
/// (the record is read again, refused again and granted again).
async fn grant(
    solo: Option<i32>,
    work: &mut Work,
    processor: &mut PartitionProcessor,
    life: &mut Lifecycle,
) -> Result<(), ReopenReason> {
    let Grant::WriteDeadLetter { message, cause } = work.refusals.granted(solo, life.partition)
    else {
        return Ok(());
    };
    work.outputs.clear();
    processor.dead_letter_input(
        message,
        ErrorClass::OutputRejected,
        cause.to_string(),
        &mut work.outputs,
    );
    let tp = TopicPartition::new(message.topic(), message.partition());
    if rewind(&life.consumer, &tp, message.offset() + 1)
        .await
        .is_err()
    {
        work.outputs.clear();
        return Err(ReopenReason::SeekFailed);
    }
    work.clock.rewound(life.input_index(&tp));
    record_outputs(
        &life.transactor,
        life.generation,
        &work.outputs,
        message,
        &mut work.pending,
    )
    .await;
    Ok(())
}

/// What became of one record in the task's hands.
enum Handled {
    Done,
    NeedsSchema(u32),
    Transient(&'static str, String),
}

/// Runs one record through the processor and sends its outputs.
async fn handle<M: Message>(
    message: &M,
    work: &mut Work,
    processor: &mut PartitionProcessor,
    life: &Lifecycle,
) -> Handled {
    work.outputs.clear();
    match processor.process(message, &mut work.outputs) {
        Processed::Done => {
            if let Some(at) = message.timestamp().to_millis() {
                work.clock.stream_time_ms = work.clock.stream_time_ms.max(at);
            }
            record_outputs(
                &life.transactor,
                life.generation,
                &work.outputs,
                message,
                &mut work.pending,
            )
            .await;
            Handled::Done
        }
        Processed::NeedsSchema(id) => Handled::NeedsSchema(id),
        Processed::Transient { dependency, reason } => Handled::Transient(dependency, reason),
    }
}

/// Fires the partition's due timers into the open transaction: each
/// firing's outputs are sent like an input's, and the transaction commits
/// the partition's timer sequence with its offsets.
///
/// Due means due by the wall clock once every input is read to its end,
/// and until then only up to the newest input applied (stream time; see
/// [`InputClock::cutoff_ms`]).
async fn fire_timers(work: &mut Work, processor: &mut PartitionProcessor, life: &Lifecycle) {
    let now_ms = wall_clock_ms();
    let cutoff_ms = work.clock.cutoff_ms(life.tps.len(), now_ms);
    let pipeline = &life.pipeline;
    work.outputs.clear();
    let report = match processor.fire_due(
        cutoff_ms,
        now_ms,
        pipeline.max_timers_per_round,
        &mut work.outputs,
    ) {
        Ok(report) => report,
        Err(err) => {
            // Nothing was staged for a timer that could not be read; it is
            // due again next round.
            tracing::warn!(partition = life.partition, cause = %err, "cannot read due timers; trying again next round");
            return;
        }
    };
    if let Some(id) = report.needs_schema {
        // A timer whose firing releases held Avro records waits for their
        // writer schema; fetching it needs no record of this task.
        let lookup = fetch_schema(pipeline, id, Duration::ZERO);
        tokio::spawn(async move {
            if let Err(err) = lookup.await {
                tracing::debug!(schema_id = id, cause = %err, "writer schema for a timer's held records not fetched yet");
            }
        });
    }
    if report.fired > 0 {
        if let Err(failure) = enqueue(
            &life.transactor,
            life.generation,
            &work.outputs,
            &mut work.pending.last_changelog,
        )
        .await
        {
            tracing::error!(partition = life.partition, timers_topic = %pipeline.timers_topic, cause = %failure, "cannot send a timer's output; the transaction will abort");
            work.pending.failure = Some(failure);
        }
        work.pending.timer_sequence = Some(processor.timer_sequence());
    }
    let grace = i64::try_from(pipeline.timer_interval.as_millis() * 2).unwrap_or(i64::MAX);
    let overdue = processor
        .overdue_timers(now_ms.saturating_sub(grace), OVERDUE_COUNT_LIMIT)
        .unwrap_or(0);
    METRICS
        .contexts_overdue
        .with_label_values(&[&life.partition.to_string()])
        .set(overdue as i64);
}

/// The most overdue timers one round counts (the gauge saturates there).
const OVERDUE_COUNT_LIMIT: usize = 10_000;

pub(super) fn wall_clock_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// In a solo transaction, the record just sent is the only one.
fn solo_took(work: &mut Work, message: OwnedMessage) {
    if work.refusals.is_solo() {
        work.refusals.took(message);
    }
}

/// After an abort, a held record on a rewound partition comes back with
/// the rewind; holding it too would process it twice.
fn release_rewound(
    stalled: &mut Option<Stalled>,
    lookup: &mut Option<SchemaLookup>,
    transient: &mut Option<TransientHold>,
    work: &mut Work,
    life: &Lifecycle,
) {
    let rewound = std::mem::take(&mut work.rewound);
    if stalled
        .as_ref()
        .is_some_and(|held| rewound.contains(&held.tp))
    {
        if let Some(held) = stalled.take() {
            held.release(&life.consumer, &life.tps);
        }
        *lookup = None;
    }
    if transient
        .as_ref()
        .is_some_and(|hold| rewound.contains(&hold.tp))
        && let Some(hold) = transient.take()
    {
        resume_after_state_errors(&hold, life);
    }
}

/// Lets go of every held record (the partition is reopened or released).
fn release_all(
    stalled: &mut Option<Stalled>,
    lookup: &mut Option<SchemaLookup>,
    transient: &mut Option<TransientHold>,
    life: &Lifecycle,
) {
    if let Some(held) = stalled.take() {
        held.release(&life.consumer, &life.tps);
    }
    *lookup = None;
    if let Some(hold) = transient.take() {
        resume_after_state_errors(&hold, life);
    }
}

/// Sends one input's outputs and advances its partition's position.
async fn record_outputs<M: Message>(
    transactor: &Transactor,
    generation: Generation,
    outputs: &[OutRecord],
    message: &M,
    pending: &mut Uncommitted,
) {
    let offset = message.offset();
    if let Err(failure) =
        enqueue(transactor, generation, outputs, &mut pending.last_changelog).await
    {
        tracing::error!(topic = message.topic(), partition = message.partition(), offset, cause = %failure, "cannot send an output; the transaction will abort");
        pending.failure = Some(failure);
    }
    pending
        .positions
        .entry(TopicPartition::new(message.topic(), message.partition()))
        .and_modify(|(_, next)| *next = offset + 1)
        .or_insert((offset, offset + 1));
    pending.records += 1;
}

/// Sends every output of one input into the open transaction, keeping the
/// delivery future of each store's last changelog record. A full local
/// queue is waited out, at most [`BARRIER_TIMEOUT`] (the engine gives up on
/// the task by then anyway); a stale generation or any other error fails
/// the transaction.
async fn enqueue(
    transactor: &Transactor,
    generation: Generation,
    outputs: &[OutRecord],
    last_changelog: &mut LastChangelog,
) -> Result<(), TaskFailure> {
    let deadline = Instant::now() + BARRIER_TIMEOUT;
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
            match transactor.send(generation, record) {
                // Other delivery reports are not awaited: the commit flushes
                // every outstanding record and fails if one failed.
                Ok(delivery) => {
                    METRICS.records_sent.inc();
                    if out.changelog {
                        last_changelog.0 = Some(delivery);
                    }
                    break;
                }
                Err(SendError::QueueFull) if Instant::now() < deadline => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                }
                Err(err @ SendError::Stale { .. }) => {
                    return Err(TaskFailure::Reopen(err.to_string()));
                }
                Err(err) => return Err(TaskFailure::Refused(format!("{}: {err}", out.topic))),
            }
        }
    }
    Ok(())
}

/// How often a rewind's seek is tried (50 ms back-off doubling to 2 s, each
/// seek up to 10 s) before the partition is reopened instead.
const REWIND_ATTEMPTS: u32 = 8;

/// Seeks the partition to `offset`. librdkafka discards whatever it had
/// already fetched past it. A failed seek must not be skipped (records would
/// be lost or repeated), so it is retried, [`REWIND_ATTEMPTS`] times; after
/// that the caller reopens the partition, which seeks to the committed
/// offsets afresh (and is bounded in its turn).
pub(super) async fn rewind(
    consumer: &Arc<StreamConsumer<RebalanceHook>>,
    tp: &TopicPartition,
    offset: i64,
) -> Result<(), ()> {
    let mut backoff = Duration::from_millis(50);
    for attempt in 1..=REWIND_ATTEMPTS {
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
                    partition = tp.partition(),
                    offset,
                    "rewound"
                );
                return Ok(());
            }
            Ok(Err(err)) => {
                tracing::warn!(topic = tp.topic(), partition = tp.partition(), offset, cause = %err, "seek failed; retrying")
            }
            Err(err) => {
                tracing::warn!(topic = tp.topic(), partition = tp.partition(), offset, cause = %err, "seek task failed; retrying")
            }
        }
        if attempt < REWIND_ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
    tracing::error!(
        topic = tp.topic(),
        partition = tp.partition(),
        offset,
        attempts = REWIND_ATTEMPTS,
        "cannot rewind the input; reopening the partition"
    );
    Err(())
}

#[cfg(test)]
mod tests {
    use super::InputClock;

    #[test]
    fn the_wall_clock_decides_only_once_every_input_is_read_to_its_end() {
        let mut clock = InputClock::default();
        // A task just opened: nothing applied, nothing read to its end.
        assert_eq!(clock.cutoff_ms(2, 10_000), 0);
        clock.stream_time_ms = 4_000;
        clock.reached_end(0);
        assert_eq!(
            clock.cutoff_ms(2, 10_000),
            4_000,
            "one input still has a backlog"
        );
        clock.reached_end(1);
        assert_eq!(clock.cutoff_ms(2, 10_000), 10_000);
        clock.took_record(1);
        assert_eq!(
            clock.cutoff_ms(2, 10_000),
            4_000,
            "a record came after the end"
        );
        clock.reached_end(1);
        clock.committed();
        clock.stream_time_ms = 7_000;
        // An abort rewinds input 0: stream time falls back to the commit's.
        clock.rewound([0]);
        assert_eq!(clock.cutoff_ms(2, 10_000), 4_000);
        clock.reached_end(0);
        assert_eq!(clock.cutoff_ms(2, 10_000), 10_000);
    }
}
