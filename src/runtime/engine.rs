//! The exactly-once engine: one transactional producer per pod, the registry
//! of partition tasks, and the commit protocol that ties them together.
//!
//! Every commit interval the engine stops the world the way Kafka Streams
//! does: each task finishes the record in hand and reports its position, the
//! engine sends those offsets to the transaction and commits it, and only
//! then do tasks apply their state and resume. An abortable failure rewinds
//! every task to its last committed offset; fencing or another fatal error
//! rebuilds the producer first. Rebalance callbacks run on the coordinator
//! thread and use the same protocol, so partitions only leave after their
//! transaction is settled.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use thiserror::Error;
use tokio::sync::mpsc;
use tracing::Instrument;

use super::task::{self, Control, TaskProgress, TaskSetup, TopicPartition};
use super::{Pipeline, Readiness};
use crate::metrics::METRICS;

/// The consumer type every baton pod uses.
pub type BatonConsumer = StreamConsumer<RebalanceHook>;

/// How long one transactional call may take before we call it failed.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a task may take to reach a barrier (it finishes one record).
const BARRIER_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum EngineError {
    #[error("cannot create the transactional producer: {0}")]
    ProducerCreate(#[source] KafkaError),
    #[error("cannot initialise transactions for `{transactional_id}`: {source}")]
    InitTransactions {
        transactional_id: String,
        #[source]
        source: KafkaError,
    },
    #[error("the consumer is gone")]
    ConsumerGone,
}

/// What happened to one commit attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Nothing was consumed since the last commit.
    Idle,
    Committed,
    /// The transaction was aborted; tasks rewound to their committed offsets.
    Aborted,
    /// The producer was fenced or failed fatally and was rebuilt.
    Rebuilt,
}

struct TaskHandle {
    control: mpsc::UnboundedSender<Control>,
}

/// Owns the producer and the tasks. Shared between the coordinator loop and
/// the rebalance callbacks, which both run on the coordinator thread.
pub struct Engine {
    pipeline: Arc<Pipeline>,
    producer_config: ClientConfig,
    transactional_id: String,
    producer: FutureProducer,
    consumer: OnceLock<Weak<BatonConsumer>>,
    runtime: tokio::runtime::Handle,
    /// Input partitions assigned to this pod.
    assigned: BTreeSet<TopicPartition>,
    /// One task per partition number.
    tasks: BTreeMap<i32, TaskHandle>,
    readiness: Arc<Readiness>,
}

impl Engine {
    /// Creates the producer and initialises transactions, which fences any
    /// earlier incarnation of this pod and settles what it left open.
    /// Blocking.
    pub fn new(
        pipeline: Arc<Pipeline>,
        producer_config: ClientConfig,
        transactional_id: String,
        runtime: tokio::runtime::Handle,
        readiness: Arc<Readiness>,
    ) -> Result<Engine, EngineError> {
        let producer = create_transactional_producer(&producer_config, &transactional_id)?;
        Ok(Engine {
            pipeline,
            producer_config,
            transactional_id,
            producer,
            consumer: OnceLock::new(),
            runtime,
            assigned: BTreeSet::new(),
            tasks: BTreeMap::new(),
            readiness,
        })
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
        let span = tracing::info_span!("task", partition);
        let _enter = self.runtime.enter();
        self.runtime.spawn(
            task::run_partition_task(TaskSetup {
                partition,
                queues,
                consumer,
                producer: self.producer.clone(),
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

    /// Brings every task to a barrier and collects their positions. A task
    /// that does not answer has died; its partition is treated as failed.
    fn barrier(&mut self) -> (Vec<TaskProgress>, bool) {
        let (reply, replies) = std_mpsc::channel();
        let mut expected = 0;
        for handle in self.tasks.values() {
            if handle
                .control
                .send(Control::Barrier {
                    reply: reply.clone(),
                })
                .is_ok()
            {
                expected += 1;
            }
        }
        drop(reply);
        let mut progress = Vec::with_capacity(expected);
        let deadline = Instant::now() + BARRIER_TIMEOUT;
        while progress.len() < expected {
            let left = deadline.saturating_duration_since(Instant::now());
            match replies.recv_timeout(left) {
                Ok(p) => progress.push(p),
                Err(_) => break,
            }
        }
        let complete = progress.len() == self.tasks.len();
        (progress, complete)
    }

    fn broadcast(&self, make: impl Fn() -> Control) {
        for handle in self.tasks.values() {
            let _ = handle.control.send(make());
        }
    }

    /// One round of the commit protocol: barrier, send offsets, commit.
    pub fn commit(&mut self) -> CommitOutcome {
        if self.tasks.is_empty() {
            return CommitOutcome::Idle;
        }
        let (progress, complete) = self.barrier();
        let failed: Vec<&str> = progress
            .iter()
            .filter_map(|p| p.failure.as_deref())
            .collect();
        if !complete || !failed.is_empty() {
            tracing::warn!(
                ?failed,
                complete,
                "a task failed inside the transaction; aborting"
            );
            return self.abort_after_barrier("task failure");
        }
        let mut offsets = TopicPartitionList::new();
        let mut records = 0;
        for p in &progress {
            records += p.records;
            for (tp, next) in &p.next_offsets {
                if let Err(err) =
                    offsets.add_partition_offset(tp.topic(), tp.partition(), Offset::Offset(*next))
                {
                    tracing::error!(cause = %err, "cannot build the offset list");
                    return self.abort_after_barrier("offset list");
                }
            }
        }
        if offsets.count() == 0 {
            self.broadcast(|| Control::Committed { producer: None });
            return CommitOutcome::Idle;
        }
        let started = Instant::now();
        match self.commit_offsets(&offsets) {
            Ok(()) => {
                METRICS
                    .transaction_commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                METRICS.transaction_records.observe(records as f64);
                METRICS.transactions.with_label_values(&["committed"]).inc();
                let rebuilt = self.begin_or_rebuild();
                self.broadcast(|| Control::Committed {
                    producer: rebuilt.clone(),
                });
                CommitOutcome::Committed
            }
            Err(err) => {
                tracing::warn!(cause = %err, "transaction commit failed");
                let fatal = match &err {
                    KafkaError::Transaction(e) => e.is_fatal() || !e.txn_requires_abort(),
                    _ => false,
                };
                if fatal {
                    self.rebuild_after_barrier(&err.to_string())
                } else {
                    self.abort_after_barrier(&err.to_string())
                }
            }
        }
    }

    /// Aborts everything in flight (used when partitions were lost).
    fn abort_all(&mut self, reason: &str) -> CommitOutcome {
        if self.tasks.is_empty() {
            return CommitOutcome::Idle;
        }
        self.barrier();
        self.abort_after_barrier(reason)
    }

    fn commit_offsets(&self, offsets: &TopicPartitionList) -> Result<(), KafkaError> {
        let consumer = self.consumer().map_err(|_| KafkaError::Canceled)?;
        let metadata = consumer.group_metadata().ok_or(KafkaError::Canceled)?;
        self.producer
            .send_offsets_to_transaction(offsets, &metadata, TRANSACTION_TIMEOUT)?;
        // A commit that times out may be retried; librdkafka says so by
        // marking the error retriable.
        let mut attempts = 0;
        loop {
            match self.producer.commit_transaction(TRANSACTION_TIMEOUT) {
                Ok(()) => return Ok(()),
                Err(KafkaError::Transaction(err)) if err.is_retriable() && attempts < 3 => {
                    attempts += 1;
                    tracing::warn!(cause = %err, attempts, "commit timed out; retrying");
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// With every task at a barrier: aborts the open transaction and rewinds
    /// every task to its last committed offset, discarding its state.
    fn abort_after_barrier(&mut self, reason: &str) -> CommitOutcome {
        match self.producer.abort_transaction(TRANSACTION_TIMEOUT) {
            Ok(()) => {
                METRICS.transactions.with_label_values(&["aborted"]).inc();
                tracing::warn!(
                    reason,
                    "transaction aborted; rewinding to committed offsets"
                );
                let rebuilt = self.begin_or_rebuild();
                self.broadcast(|| Control::Aborted {
                    producer: rebuilt.clone(),
                });
                CommitOutcome::Aborted
            }
            Err(err) => {
                tracing::warn!(cause = %err, "abort failed; rebuilding the producer");
                self.rebuild_after_barrier(&err.to_string())
            }
        }
    }

    /// With every task at a barrier: replaces a fenced or broken producer
    /// (`init_transactions` on the new one aborts what the old one left
    /// open) and rewinds every task.
    fn rebuild_after_barrier(&mut self, reason: &str) -> CommitOutcome {
        let producer = self.rebuild(reason);
        self.broadcast(|| Control::Aborted {
            producer: Some(producer.clone()),
        });
        CommitOutcome::Rebuilt
    }

    /// Creates a new producer and begins its first transaction, retrying
    /// until the cluster lets us.
    fn rebuild(&mut self, reason: &str) -> FutureProducer {
        METRICS.transactions.with_label_values(&["fatal"]).inc();
        METRICS.producer_rebuilds.inc();
        tracing::error!(
            reason,
            "producer failed fatally or was fenced; rebuilding it"
        );
        let mut backoff = Duration::from_millis(100);
        loop {
            match create_transactional_producer(&self.producer_config, &self.transactional_id)
                .and_then(|producer| {
                    producer
                        .begin_transaction()
                        .map(|()| producer)
                        .map_err(EngineError::ProducerCreate)
                }) {
                Ok(producer) => {
                    self.producer = producer.clone();
                    return producer;
                }
                Err(err) => {
                    tracing::error!(cause = %err, "cannot rebuild the producer yet");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Begins the next transaction; returns the new producer if the old one
    /// could not begin and had to be replaced.
    fn begin_or_rebuild(&mut self) -> Option<FutureProducer> {
        match self.producer.begin_transaction() {
            Ok(()) => None,
            Err(err) => Some(self.rebuild(&err.to_string())),
        }
    }

    /// Starts the first transaction.
    pub fn start(&mut self) {
        if let Err(err) = self.producer.begin_transaction() {
            let _ = self.rebuild(&err.to_string());
        }
    }
}

fn create_transactional_producer(
    config: &ClientConfig,
    transactional_id: &str,
) -> Result<FutureProducer, EngineError> {
    let producer: FutureProducer = config.create().map_err(EngineError::ProducerCreate)?;
    producer
        .init_transactions(TRANSACTION_TIMEOUT)
        .map_err(|source| EngineError::InitTransactions {
            transactional_id: transactional_id.to_string(),
            source,
        })?;
    Ok(producer)
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
}

impl RebalanceHook {
    pub fn new(engine: Arc<Mutex<Engine>>) -> Self {
        RebalanceHook { engine }
    }
}

impl ClientContext for RebalanceHook {}

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
