//! The exactly-once engine: the pod's [`Transactor`], the registry of
//! partition tasks, and the commit protocol that ties them together.
//!
//! Every commit interval the engine stops the world the way Kafka Streams
//! does: each task finishes the record in hand and reports its position, the
//! engine seals the transaction's generation (later sends are refused),
//! sends those offsets to the transaction and commits it, and only then do
//! tasks apply their state and resume. An abortable failure rewinds every
//! task to its last committed offset. A fenced, fatal or outcome-unknown
//! failure rebuilds the producer, and every task reopens its partition:
//! stores closed, restored from the changelog, consumer seeked to the
//! broker's committed offsets. A task that misses the barrier is reopened
//! the same way. Rebalance callbacks run on the coordinator thread and use
//! the same protocol, so partitions only leave after their transaction is
//! settled.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::lag::ConsumerLag;
use super::task::{
    self, Control, ReopenReason, TaskFailure, TaskProgress, TaskSetup, TopicPartition,
};
use super::{Pipeline, Readiness};
use crate::metrics::METRICS;
use crate::transactor::{Failure, Generation, Recovery, Transactor, TxnError};

/// The consumer type every baton pod uses.
pub type BatonConsumer = StreamConsumer<RebalanceHook>;

/// How long a task may take to reach a barrier (it finishes one record). A
/// task that takes longer is treated as failed: the transaction aborts and
/// the task reopens its partition.
pub const BARRIER_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum EngineError {
    #[error("cannot initialise transactions for `{transactional_id}`: {source}")]
    InitTransactions {
        transactional_id: String,
        #[source]
        source: TxnError,
    },
    #[error("the consumer is gone")]
    ConsumerGone,
    #[error("the transactional producer cannot be recovered: {0}")]
    Broken(#[source] TxnError),
}

/// What happened to one commit attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Nothing was consumed since the last commit.
    Idle,
    Committed,
    /// The transaction was aborted; tasks rewound to their committed offsets.
    Aborted,
    /// The producer was fenced, failed fatally or left a commit's outcome
    /// unknown; it was rebuilt and every task reopened its partition.
    Rebuilt,
    /// The producer could not be rebuilt: the pod must exit.
    Broken,
}

/// Why a transaction is given up.
#[derive(Debug, Clone)]
enum AbortCause {
    /// The broker or producer refused something in it.
    Refused(String),
    /// Tasks did not reach the barrier in time.
    MissedBarrier(Vec<i32>),
    /// Anything else (a task asked for it, partitions lost, ...).
    Other(String),
}

impl AbortCause {
    /// The broker's words, when the broker or producer caused the abort:
    /// tasks count these to isolate a record the broker keeps refusing.
    fn refusal(&self) -> Option<String> {
        match self {
            AbortCause::Refused(text) => Some(text.clone()),
            _ => None,
        }
    }
}

impl fmt::Display for AbortCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AbortCause::Refused(text) => write!(f, "refused: {text}"),
            AbortCause::MissedBarrier(partitions) => {
                write!(f, "partitions {partitions:?} missed the barrier")
            }
            AbortCause::Other(text) => f.write_str(text),
        }
    }
}

struct TaskHandle {
    control: mpsc::UnboundedSender<Control>,
}

/// What one barrier collected.
struct Barrier {
    progress: Vec<TaskProgress>,
    /// Tasks that did not answer in time.
    missing: Vec<i32>,
}

/// Owns the transactor and the tasks. Shared between the coordinator loop
/// and the rebalance callbacks, which both run on the coordinator thread.
pub struct Engine {
    pipeline: Arc<Pipeline>,
    transactor: Arc<Transactor>,
    /// The open transaction's generation.
    generation: Generation,
    consumer: OnceLock<Weak<BatonConsumer>>,
    runtime: tokio::runtime::Handle,
    /// Input partitions assigned to this pod.
    assigned: BTreeSet<TopicPartition>,
    /// One task per partition number.
    tasks: BTreeMap<i32, TaskHandle>,
    readiness: Arc<Readiness>,
    /// Set when the producer could not be rebuilt; the pod exits with it.
    broken: Option<TxnError>,
}

impl Engine {
    /// Creates the producer and initialises transactions, which fences any
    /// earlier incarnation of this pod and settles what it left open.
    /// Blocking.
    pub fn new(
        pipeline: Arc<Pipeline>,
        producer_config: ClientConfig,
        transactional_id: String,
        timeouts: TransactionTimeouts,
        runtime: tokio::runtime::Handle,
        readiness: Arc<Readiness>,
    ) -> Result<Engine, EngineError> {
        let transactor = Transactor::init(producer_config, &transactional_id, timeouts.call)
            .map_err(|source| EngineError::InitTransactions {
                transactional_id: transactional_id.clone(),
                source,
            })?
            .with_recovery_deadline(timeouts.recovery);
        let generation = transactor.generation();
        Ok(Engine {
            pipeline,
            transactor: Arc::new(transactor),
            generation,
            consumer: OnceLock::new(),
            runtime,
            assigned: BTreeSet::new(),
            tasks: BTreeMap::new(),
            readiness,
            broken: None,
        })
    }

    /// The error that broke the engine, once it cannot go on.
    pub fn take_broken(&mut self) -> Option<EngineError> {
        self.broken.take().map(EngineError::Broken)
    }
    pub fn attach_consumer(&self, consumer: &Arc<BatonConsumer>) {
        let _ = self.consumer.set(Arc::downgrade(consumer));
    }

    fn consumer(&self) -> Result<Arc<BatonConsumer>, EngineError> {
        self.consumer
            .get()
            .and_then(Weak::upgrade)
            .ok_or(EngineError::ConsumerGone)
    }

    /// Starts tasks for newly assigned partitions. Called before the
    /// assignment takes effect, so every record lands in its task's queue.
    /// A task owns partition N of every input topic; if partition N of
    /// another topic joins an existing task, that task is settled and
    /// restarted with the full set.
    fn assign(&mut self, partitions: &TopicPartitionList) {
        let added: Vec<TopicPartition> = partitions
            .elements()
            .iter()
            .map(|e| TopicPartition::new(e.topic(), e.partition()))
            .collect();
        let touched: BTreeSet<i32> = added.iter().map(TopicPartition::partition).collect();
        if touched.iter().any(|p| self.tasks.contains_key(p)) {
            self.commit();
            let restart: Vec<i32> = touched
                .iter()
                .copied()
                .filter(|p| self.tasks.contains_key(p))
                .collect();
            self.stop_tasks(&restart);
        }
        self.assigned.extend(added);
        for partition in touched {
            self.spawn_task(partition);
        }
        METRICS.assigned_partitions.set(self.assigned.len() as i64);
    }

    fn spawn_task(&mut self, partition: i32) {
        let consumer = match self.consumer() {
            Ok(consumer) => consumer,
            Err(err) => {
                tracing::error!(cause = %err, "cannot start a partition task");
                return;
            }
        };
        let mut queues = Vec::new();
        for tp in self
            .assigned
            .iter()
            .filter(|tp| tp.partition() == partition)
        {
            match consumer.split_partition_queue(tp.topic(), partition) {
                Some(queue) => queues.push((tp.clone(), queue)),
                None => {
                    tracing::error!(
                        topic = tp.topic(),
                        partition,
                        "cannot split the partition queue"
                    )
                }
            }
        }
        let (control, control_rx) = mpsc::unbounded_channel();
        // Every line the task writes names its partition and its topics
        // (partition N of each co-partitioned input).
        let topics: Vec<&str> = queues.iter().map(|(tp, _)| tp.topic()).collect();
        let span = tracing::info_span!("task", partition, topics = %topics.join(","));
        let _enter = self.runtime.enter();
        self.runtime.spawn(
            task::run_partition_task(TaskSetup {
                partition,
                queues,
                consumer,
                transactor: Arc::clone(&self.transactor),
                generation: self.generation,
                pipeline: Arc::clone(&self.pipeline),
                readiness: Arc::clone(&self.readiness),
                control: control_rx,
            })
            .instrument(span),
        );
        tracing::info!(partition, "task started");
        self.tasks.insert(partition, TaskHandle { control });
    }

    /// Settles the open transaction, then stops the tasks of the revoked
    /// partitions. Lost partitions (the group moved on without us) cannot be
    /// committed, so their work is aborted instead.
    fn revoke(&mut self, partitions: &TopicPartitionList, lost: bool) {
        let outcome = if lost {
            self.abort_all("partitions lost")
        } else {
            self.commit()
        };
        tracing::info!(
            ?outcome,
            lost,
            count = partitions.count(),
            "settled before revocation"
        );
        let mut touched = BTreeSet::new();
        for element in partitions.elements() {
            self.assigned
                .remove(&TopicPartition::new(element.topic(), element.partition()));
            touched.insert(element.partition());
        }
        let touched: Vec<i32> = touched.into_iter().collect();
        self.stop_tasks(&touched);
        // Partitions of other topics with the same number stay with us.
        for partition in touched {
            if self.assigned.iter().any(|tp| tp.partition() == partition) {
                self.spawn_task(partition);
            }
        }
        METRICS.assigned_partitions.set(self.assigned.len() as i64);
    }

    /// Stops the given tasks and waits until each has closed its stores.
    fn stop_tasks(&mut self, partitions: &[i32]) {
        let (reply, replies) = std_mpsc::channel();
        let mut expected = 0;
        for partition in partitions {
            if let Some(handle) = self.tasks.remove(partition) {
                if handle
                    .control
                    .send(Control::Stop {
                        reply: reply.clone(),
                    })
                    .is_ok()
                {
                    expected += 1;
                }
                tracing::info!(partition, "task stopped");
            }
        }
        drop(reply);
        for _ in 0..expected {
            if replies.recv_timeout(BARRIER_TIMEOUT).is_err() {
                tracing::error!("a partition task did not stop in time");
                break;
            }
        }
    }

    pub fn stop_all(&mut self) {
        let all: Vec<i32> = self.tasks.keys().copied().collect();
        self.stop_tasks(&all);
        self.assigned.clear();
        METRICS.assigned_partitions.set(0);
    }

    /// Brings every task to a barrier and collects their positions, waiting
    /// at most [`BARRIER_TIMEOUT`]. A task that does not answer in time has
    /// failed (it is stuck, or dead).
    fn barrier(&mut self) -> Barrier {
        let (reply, replies) = std_mpsc::channel();
        for handle in self.tasks.values() {
            let _ = handle.control.send(Control::Barrier {
                reply: reply.clone(),
            });
        }
        drop(reply);
        let mut progress: Vec<TaskProgress> = Vec::with_capacity(self.tasks.len());
        let deadline = Instant::now() + BARRIER_TIMEOUT;
        while progress.len() < self.tasks.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match replies.recv_timeout(left) {
                Ok(p) => progress.push(p),
                Err(_) => break,
            }
        }
        let answered: BTreeSet<i32> = progress.iter().map(|p| p.partition).collect();
        let missing = self
            .tasks
            .keys()
            .copied()
            .filter(|p| !answered.contains(p))
            .collect();
        Barrier { progress, missing }
    }

    fn broadcast(&self, make: impl Fn() -> Control) {
        for handle in self.tasks.values() {
            let _ = handle.control.send(make());
        }
    }

    /// One round of the commit protocol: barrier, seal, send offsets,
    /// commit, begin the next generation.
    pub fn commit(&mut self) -> CommitOutcome {
        if self.broken.is_some() {
            return CommitOutcome::Broken;
        }
        if self.tasks.is_empty() {
            return CommitOutcome::Idle;
        }
        let Barrier { progress, missing } = self.barrier();
        // From here on a straggler's sends are refused.
        self.transactor.seal();
        if !missing.is_empty() {
            tracing::warn!(
                ?missing,
                "tasks missed the barrier; aborting and reopening them"
            );
            return self.fail(Failure::Abortable, AbortCause::MissedBarrier(missing));
        }
        if let Some(cause) = task_failure(&progress) {
            tracing::warn!(%cause, "a task failed inside the transaction; aborting");
            return self.fail(Failure::Abortable, cause);
        }
        let solo = progress
            .iter()
            .filter(|p| p.wants_solo)
            .map(|p| p.partition)
            .min();
        let (offsets, records) = match offsets_of(&progress) {
            Ok(built) => built,
            Err(err) => return self.fail(Failure::Abortable, AbortCause::Other(err)),
        };
        if offsets.count() == 0 {
            // Nothing was sent either: the open transaction goes on.
            self.transactor.unseal();
            let next = self.generation;
            self.broadcast(|| Control::Committed { next, solo });
            return CommitOutcome::Idle;
        }
        let Some(metadata) = self.consumer().ok().and_then(|c| c.group_metadata()) else {
            return self.fail(
                Failure::Abortable,
                AbortCause::Other("no consumer group metadata".into()),
            );
        };
        let started = Instant::now();
        match self.transactor.commit_with_offsets(&offsets, &metadata) {
            Ok(()) => {
                METRICS
                    .transaction_commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                METRICS.transaction_records.observe(records as f64);
                METRICS.transactions.with_label_values(&["committed"]).inc();
                let Some(next) = self.begin_next() else {
                    return CommitOutcome::Broken;
                };
                self.broadcast(|| Control::Committed { next, solo });
                CommitOutcome::Committed
            }
            Err(err) => {
                tracing::warn!(cause = %err, failure = ?err.failure, "transaction commit failed");
                let cause = if err.failure == Failure::Abortable {
                    AbortCause::Refused(err.cause.clone())
                } else {
                    AbortCause::Other(err.to_string())
                };
                self.fail(err.failure, cause)
            }
        }
    }

    /// Aborts everything in flight (used when partitions were lost).
    fn abort_all(&mut self, reason: &str) -> CommitOutcome {
        if self.tasks.is_empty() {
            return CommitOutcome::Idle;
        }
        let Barrier { missing, .. } = self.barrier();
        self.transactor.seal();
        let cause = if missing.is_empty() {
            AbortCause::Other(reason.to_string())
        } else {
            AbortCause::MissedBarrier(missing)
        };
        self.fail(Failure::Abortable, cause)
    }

    /// With every task at a barrier (or given up on): recovers from
    /// `failure`, begins the next generation and tells every task what to
    /// do. After an abort, tasks rewind to their committed offsets; after a
    /// rebuild, and for tasks that missed the barrier, they reopen their
    /// partitions from what the broker committed.
    fn fail(&mut self, failure: Failure, cause: AbortCause) -> CommitOutcome {
        let reason = cause.to_string();
        let recovery = match self.transactor.recover(failure, &reason) {
            Ok(recovery) => recovery,
            Err(err) => return self.break_down(err),
        };
        tracing::warn!(?recovery, %reason, "transaction given up");
        let Some(next) = self.begin_next() else {
            return CommitOutcome::Broken;
        };
        let stragglers = match &cause {
            AbortCause::MissedBarrier(partitions) => partitions.clone(),
            _ => Vec::new(),
        };
        let refused = cause.refusal();
        for (partition, handle) in &self.tasks {
            let command = if stragglers.contains(partition) {
                Control::Reopen {
                    next,
                    reason: ReopenReason::MissedBarrier,
                }
            } else {
                match recovery {
                    Recovery::Aborted => Control::Aborted {
                        next,
                        refused: refused.clone(),
                        solo: None,
                    },
                    Recovery::Rebuilt => Control::Reopen {
                        next,
                        reason: if failure == Failure::OutcomeUnknown {
                            ReopenReason::CommitUnknown
                        } else {
                            ReopenReason::ProducerRebuilt
                        },
                    },
                }
            };
            let _ = handle.control.send(command);
        }
        match recovery {
            Recovery::Aborted => CommitOutcome::Aborted,
            Recovery::Rebuilt => CommitOutcome::Rebuilt,
        }
    }

    /// Begins the next transaction; a producer that cannot begin is
    /// rebuilt once. `None` when even that fails (the engine is broken).
    fn begin_next(&mut self) -> Option<Generation> {
        let begun = self.transactor.begin().or_else(|err| {
            tracing::warn!(cause = %err, "cannot begin a transaction; rebuilding the producer");
            self.transactor
                .rebuild(&err.to_string())
                .and_then(|()| self.transactor.begin())
        });
        match begun {
            Ok(generation) => {
                self.generation = generation;
                Some(generation)
            }
            Err(err) => {
                self.break_down(err);
                None
            }
        }
    }

    /// The producer cannot be recovered: remember why; the coordinator
    /// exits the pod with it (a restarted pod settles everything).
    fn break_down(&mut self, err: TxnError) -> CommitOutcome {
        tracing::error!(cause = %err, "the transactional producer cannot be recovered; the pod stops");
        self.broken = Some(err);
        CommitOutcome::Broken
    }

    /// Starts the first transaction.
    pub fn start(&mut self) {
        let _ = self.begin_next();
    }
}

/// How long the engine's transactional calls may block: one call, and one
/// commit cycle with its recovery.
#[derive(Debug, Clone, Copy)]
pub struct TransactionTimeouts {
    pub call: Duration,
    pub recovery: Duration,
}

/// The first failure a task reported, as an abort cause.
fn task_failure(progress: &[TaskProgress]) -> Option<AbortCause> {
    progress.iter().find_map(|p| {
        p.failure.as_ref().map(|failure| match failure {
            TaskFailure::Refused(text) => AbortCause::Refused(text.clone()),
            TaskFailure::Reopen(text) => {
                AbortCause::Other(format!("partition {}: {text}", p.partition))
            }
        })
    })
}

/// The offsets to commit and the number of input records they cover.
fn offsets_of(progress: &[TaskProgress]) -> Result<(TopicPartitionList, u64), String> {
    let mut offsets = TopicPartitionList::new();
    let mut records = 0;
    for p in progress {
        records += p.records;
        for (tp, next) in &p.next_offsets {
            offsets
                .add_partition_offset(tp.topic(), tp.partition(), Offset::Offset(*next))
                .map_err(|err| format!("cannot build the offset list: {err}"))?;
        }
    }
    Ok((offsets, records))
}

/// Locks the engine. A panic while holding the lock leaves it usable: the
/// engine's invariants are re-established by the next commit or abort.
pub fn lock(engine: &Mutex<Engine>) -> MutexGuard<'_, Engine> {
    engine
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The consumer context: turns librdkafka's rebalance callbacks into engine
/// calls. They run on the coordinator thread, inside its poll of the consumer.
pub struct RebalanceHook {
    engine: Arc<Mutex<Engine>>,
    lag: Arc<ConsumerLag>,
}

impl RebalanceHook {
    pub fn new(engine: Arc<Mutex<Engine>>, lag: Arc<ConsumerLag>) -> Self {
        RebalanceHook { engine, lag }
    }
}

impl ClientContext for RebalanceHook {
    /// The fetch-side high watermarks, for the lag gauges (never logged:
    /// the default implementation writes them at info every interval).
    fn stats(&self, statistics: rdkafka::Statistics) {
        self.lag.on_statistics(&statistics);
    }

    /// Ends of partitions (the timers' cutoff needs them) arrive on the
    /// tasks' queues; the error callback's copy of each is dropped.
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if !crate::kafka::is_partition_eof(&error) {
            tracing::error!(target: "librdkafka", "librdkafka: {error}: {reason}");
        }
    }
}

impl ConsumerContext for RebalanceHook {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                METRICS.rebalances.with_label_values(&["assign"]).inc();
                lock(&self.engine).assign(partitions);
            }
            Rebalance::Revoke(partitions) => {
                let lost = consumer.assignment_lost();
                METRICS
                    .rebalances
                    .with_label_values(&[if lost { "lost" } else { "revoke" }])
                    .inc();
                lock(&self.engine).revoke(partitions, lost);
            }
            Rebalance::Error(err) => {
                tracing::error!(cause = %err, "rebalance error");
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = rebalance {
            let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
            tracing::info!(assigned, "rebalance complete");
        }
        let engine = lock(&self.engine);
        engine.readiness.set_joined(true);
    }
}
