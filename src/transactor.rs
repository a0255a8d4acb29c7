//! The one transactional producer wrapper, shared by the pod's engine, the
//! healer and `baton dlq replay`.
//!
//! Like Kafka Streams' `StreamsProducer`, it owns the producer and classifies
//! every error exactly once, into a [`Failure`]:
//!
//! - **abortable**: the transaction failed but the producer is healthy;
//!   abort it and go back to the committed offsets;
//! - **fenced** or **fatal**: the producer cannot go on; a new producer with
//!   the same stable `transactional.id` runs `init_transactions`, which
//!   fences the old one and settles what it left open;
//! - **outcome unknown**: a commit that timed out or lost its connection;
//!   the broker may or may not have committed. The producer is rebuilt (its
//!   `init_transactions` completes or aborts that transaction) and positions
//!   come from the broker, never from memory.
//!
//! Every transaction has a [`Generation`]. A send tagged with an older
//! generation than the open transaction's, or sent while no transaction is
//! open (sealed at a barrier), is refused: a task that missed a barrier can
//! never leak records into the next transaction.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::ToBytes;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, TopicPartitionList};
use thiserror::Error;

use crate::metrics::METRICS;

/// How long one transactional call may take before it counts as failed.
pub const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Policy for retriable errors (librdkafka marks a timed-out call
/// retriable, and lets the very same call be repeated): up to this many
/// repeats. A commit still failing after them has an unknown outcome.
pub const CALL_RETRIES: u32 = 3;

/// Policy for rebuilding the producer: up to this many attempts, backing off
/// from 100 ms doubling to 5 s, all within the recovery deadline. After that
/// the caller gives up and exits; a restarted process settles everything
/// with its own `init_transactions`.
pub const REBUILD_ATTEMPTS: u32 = 20;

/// How long one commit may take from its seal to the next begin, repeats,
/// abort and rebuild included, unless configured otherwise. The thread that
/// commits is the one that polls the consumer and runs its rebalances: while
/// it is blocked, every rebalance of the group waits for this member, up to
/// `max.poll.interval.ms` (300 s by default). Past the deadline the caller
/// exits instead, so its partitions move and the group goes on.
pub const RECOVERY_DEADLINE: Duration = Duration::from_secs(60);
const REBUILD_BACKOFF_FIRST: Duration = Duration::from_millis(100);
const REBUILD_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How a failed transactional call must be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Abort the transaction and retry from the committed offsets.
    Abortable,
    /// Another producer took over our `transactional.id`: rebuild.
    Fenced,
    /// The producer is unusable: rebuild.
    Fatal,
    /// The commit may or may not have happened: rebuild, then read
    /// positions from the broker.
    OutcomeUnknown,
}

impl Failure {
    /// Whether the producer must be replaced (and positions re-read from
    /// the broker) rather than the transaction merely aborted.
    pub fn needs_rebuild(self) -> bool {
        !matches!(self, Failure::Abortable)
    }

    /// The `baton_transactions_total` outcome label.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Abortable => "aborted",
            Failure::Fenced => "fenced",
            Failure::Fatal => "fatal",
            Failure::OutcomeUnknown => "outcome_unknown",
        }
    }
}

/// The transactional call that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Init,
    Begin,
    Send,
    SendOffsets,
    Commit,
    Abort,
}

/// A classified transactional error.
#[derive(Debug, Error)]
#[error("transactional {op:?} failed ({failure:?}): {cause}")]
pub struct TxnError {
    pub op: Op,
    pub failure: Failure,
    pub cause: String,
}

/// What librdkafka says about an error, reduced to what classification
/// needs (so that classification is a pure, testable function).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorTraits {
    pub fatal: bool,
    pub retriable: bool,
    pub requires_abort: bool,
    pub fenced: bool,
}

impl ErrorTraits {
    /// Reads the traits of a client error. Errors that are not
    /// transactional carry only their code.
    pub fn of(err: &KafkaError) -> ErrorTraits {
        let fenced = err.rdkafka_error_code().is_some_and(is_fencing_code);
        match err {
            KafkaError::Transaction(e) => ErrorTraits {
                fatal: e.is_fatal(),
                retriable: e.is_retriable(),
                requires_abort: e.txn_requires_abort(),
                fenced,
            },
            _ => ErrorTraits {
                fenced,
                ..ErrorTraits::default()
            },
        }
    }
}

/// Codes that say another producer now owns our `transactional.id`.
fn is_fencing_code(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
    )
}

/// The one classification of a transactional error (after any retries of
/// a retriable call are spent). Fencing and fatality win; an error that
/// requires an abort is abortable; a commit that failed any other way has
/// an unknown outcome; a failed abort, init or begin leaves the producer in
/// a state only a rebuild settles; a failed send or offset send happened
/// before any commit, so the transaction can be aborted.
pub fn classify(op: Op, traits: ErrorTraits) -> Failure {
    if traits.fenced {
        return Failure::Fenced;
    }
    if traits.fatal {
        return Failure::Fatal;
    }
    if traits.requires_abort {
        return Failure::Abortable;
    }
    match op {
        Op::Commit => Failure::OutcomeUnknown,
        Op::Abort | Op::Init | Op::Begin => Failure::Fatal,
        Op::Send | Op::SendOffsets => Failure::Abortable,
    }
}

fn txn_error(op: Op, err: &KafkaError) -> TxnError {
    TxnError {
        op,
        failure: classify(op, ErrorTraits::of(err)),
        cause: err.to_string(),
    }
}

/// The number of a transaction. Sends carry the generation the sender was
/// told; the transactor refuses any other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(u64);

impl Generation {
    pub fn number(self) -> u64 {
        self.0
    }
}

/// Why a send was not enqueued.
#[derive(Debug, Error)]
pub enum SendError {
    /// The sender's generation is not the open transaction's (or none is
    /// open): it missed a barrier and must not write.
    #[error("stale generation {sender} (open transaction: {open:?})")]
    Stale { sender: u64, open: Option<u64> },
    /// The local queue is full: wait and send again.
    #[error("the producer queue is full")]
    QueueFull,
    /// The producer refused the record: the transaction must abort.
    #[error("{0}")]
    Refused(KafkaError),
}

/// What recovery did after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// The transaction was aborted; offsets committed before it stand.
    Aborted,
    /// The producer was replaced; read positions from the broker.
    Rebuilt,
}

struct Current {
    producer: FutureProducer,
    generation: u64,
    /// A transaction is open and accepts sends of `generation`.
    open: bool,
    /// When the commit cycle under way began (the first seal since the last
    /// begin); its blocking calls end by this plus the recovery deadline.
    cycle_began: Option<Instant>,
}

/// The transactional producer of one `transactional.id`.
pub struct Transactor {
    config: ClientConfig,
    transactional_id: String,
    timeout: Duration,
    recovery_deadline: Duration,
    current: RwLock<Current>,
}

impl Transactor {
    /// Creates the producer and initialises transactions, which fences any
    /// earlier producer of the same id and settles what it left open.
    /// Blocking. Each call blocks at most `timeout`; a commit cycle, at most
    /// [`RECOVERY_DEADLINE`] (see [`Transactor::with_recovery_deadline`]).
    pub fn init(
        config: ClientConfig,
        transactional_id: &str,
        timeout: Duration,
    ) -> Result<Transactor, TxnError> {
        let producer = create_producer(&config, timeout)?;
        Ok(Transactor {
            config,
            transactional_id: transactional_id.to_string(),
            timeout,
            recovery_deadline: RECOVERY_DEADLINE.max(timeout),
            current: RwLock::new(Current {
                producer,
                generation: 0,
                open: false,
                cycle_began: None,
            }),
        })
    }

    /// Bounds one commit cycle, from its seal to the next begin, by
    /// `deadline` (never below one call's timeout).
    pub fn with_recovery_deadline(mut self, deadline: Duration) -> Transactor {
        self.recovery_deadline = deadline.max(self.timeout);
        self
    }

    /// The timeout for the next blocking call: the call timeout, cut to
    /// what is left of the commit cycle's deadline. `None` once it passed.
    fn call_timeout(&self) -> Option<Duration> {
        match self.read().cycle_began {
            None => Some(self.timeout),
            Some(began) => {
                let left = self.recovery_deadline.checked_sub(began.elapsed())?;
                (!left.is_zero()).then(|| left.min(self.timeout))
            }
        }
    }

    fn past_deadline(&self, op: Op, last: &str) -> TxnError {
        TxnError {
            op,
            failure: Failure::Fatal,
            cause: format!(
                "gave up: the commit did not recover within its {:?} deadline (last: {last})",
                self.recovery_deadline
            ),
        }
    }

    pub fn transactional_id(&self) -> &str {
        &self.transactional_id
    }

    /// The producer's effective `message.max.bytes`.
    pub fn max_message_bytes(&self) -> Result<usize, String> {
        crate::kafka::max_message_bytes(&self.config)
    }

    fn read(&self) -> RwLockReadGuard<'_, Current> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Current> {
        self.current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn producer(&self) -> FutureProducer {
        self.read().producer.clone()
    }

    /// The generation of the open (or last) transaction.
    pub fn generation(&self) -> Generation {
        Generation(self.read().generation)
    }

    /// Begins the next transaction and returns its generation.
    pub fn begin(&self) -> Result<Generation, TxnError> {
        let mut current = self.write();
        current
            .producer
            .begin_transaction()
            .map_err(|err| txn_error(Op::Begin, &err))?;
        current.generation += 1;
        current.open = true;
        current.cycle_began = None;
        Ok(Generation(current.generation))
    }

    /// Closes the open transaction to further sends: from now on every send
    /// is refused until the next `begin`. The first seal since the last
    /// begin starts the commit cycle's deadline.
    pub fn seal(&self) {
        let mut current = self.write();
        current.open = false;
        current.cycle_began.get_or_insert_with(Instant::now);
    }

    /// Accepts sends of the sealed transaction again: for a barrier that
    /// found nothing to commit (and so nothing was sent), where the same
    /// transaction simply goes on.
    pub fn unseal(&self) {
        let mut current = self.write();
        current.open = true;
        current.cycle_began = None;
    }

    /// Enqueues one record in the open transaction, if `generation` is the
    /// open transaction's. Never blocks.
    pub fn send<K, P>(
        &self,
        generation: Generation,
        record: FutureRecord<'_, K, P>,
    ) -> Result<DeliveryFuture, SendError>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        // The read lock is held across the enqueue, so a seal cannot slip
        // in between the check and the send.
        let current = self.read();
        if !current.open || current.generation != generation.0 {
            return Err(SendError::Stale {
                sender: generation.0,
                open: current.open.then_some(current.generation),
            });
        }
        match current.producer.send_result(record) {
            Ok(delivery) => Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(SendError::QueueFull)
            }
            Err((err, _)) => Err(SendError::Refused(err)),
        }
    }

    /// Blocking send for the healer and replay: waits out a full queue up
    /// to the transaction timeout. `build` makes the record afresh for
    /// each attempt.
    pub fn send_waiting<'a, K, P>(
        &self,
        generation: Generation,
        build: impl Fn() -> FutureRecord<'a, K, P>,
    ) -> Result<(), TxnError>
    where
        K: ToBytes + ?Sized + 'a,
        P: ToBytes + ?Sized + 'a,
    {
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.send(generation, build()) {
                // The commit flushes every record and fails if one failed.
                Ok(_) => return Ok(()),
                Err(SendError::QueueFull) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(SendError::Refused(err)) => return Err(txn_error(Op::Send, &err)),
                Err(err) => {
                    return Err(TxnError {
                        op: Op::Send,
                        failure: Failure::Abortable,
                        cause: err.to_string(),
                    });
                }
            }
        }
    }

    /// Adds the consumed offsets to the open transaction (EOS v2: with the
    /// consumer's group metadata, so a zombie of an old generation is
    /// fenced by the group coordinator).
    pub fn send_offsets(
        &self,
        offsets: &TopicPartitionList,
        metadata: &ConsumerGroupMetadata,
    ) -> Result<(), TxnError> {
        let producer = self.producer();
        self.retrying(Op::SendOffsets, |timeout| {
            producer.send_offsets_to_transaction(offsets, metadata, timeout)
        })
    }

    /// Commits the open transaction. A timed-out commit is repeated (the
    /// same commit, as librdkafka allows) up to [`CALL_RETRIES`] times.
    pub fn commit(&self) -> Result<(), TxnError> {
        self.seal();
        let producer = self.producer();
        self.retrying(Op::Commit, |timeout| producer.commit_transaction(timeout))
    }

    /// Sends the offsets, then commits.
    pub fn commit_with_offsets(
        &self,
        offsets: &TopicPartitionList,
        metadata: &ConsumerGroupMetadata,
    ) -> Result<(), TxnError> {
        self.seal();
        self.send_offsets(offsets, metadata)?;
        self.commit()
    }

    /// Aborts the open transaction.
    pub fn abort(&self) -> Result<(), TxnError> {
        self.seal();
        let producer = self.producer();
        self.retrying(Op::Abort, |timeout| producer.abort_transaction(timeout))
    }

    /// Repeats a call while librdkafka calls its error retriable, bounded by
    /// [`CALL_RETRIES`] and by the commit cycle's deadline.
    fn retrying(
        &self,
        op: Op,
        mut call: impl FnMut(Duration) -> Result<(), KafkaError>,
    ) -> Result<(), TxnError> {
        let mut attempt = 0;
        let mut last = String::from("no call made");
        loop {
            let Some(timeout) = self.call_timeout() else {
                return Err(self.past_deadline(op, &last));
            };
            match call(timeout) {
                Ok(()) => return Ok(()),
                Err(err) if ErrorTraits::of(&err).retriable && attempt < CALL_RETRIES => {
                    attempt += 1;
                    tracing::warn!(?op, attempt, cause = %err, "transactional call failed retriably; repeating it");
                    last = err.to_string();
                }
                Err(err) => return Err(txn_error(op, &err)),
            }
        }
    }

    /// Handles a classified failure: aborts an abortable transaction (a
    /// failed abort escalates to a rebuild); rebuilds the producer for
    /// anything else. The caller rewinds: to its committed offsets after
    /// `Aborted`, to the broker's committed offsets after `Rebuilt`.
    pub fn recover(&self, failure: Failure, reason: &str) -> Result<Recovery, TxnError> {
        METRICS
            .transactions
            .with_label_values(&[failure.label()])
            .inc();
        if !failure.needs_rebuild() {
            match self.abort() {
                Ok(()) => return Ok(Recovery::Aborted),
                Err(err) => {
                    tracing::warn!(cause = %err, "abort failed; rebuilding the producer");
                }
            }
        }
        self.rebuild(reason)?;
        Ok(Recovery::Rebuilt)
    }

    /// Replaces the producer with a new one of the same `transactional.id`,
    /// whose `init_transactions` fences the old one and completes or aborts
    /// whatever it left open. Bounded by [`REBUILD_ATTEMPTS`] and by the
    /// commit cycle's deadline.
    pub fn rebuild(&self, reason: &str) -> Result<(), TxnError> {
        self.seal();
        METRICS.producer_rebuilds.inc();
        tracing::error!(
            transactional_id = %self.transactional_id,
            reason,
            "rebuilding the transactional producer"
        );
        let mut backoff = REBUILD_BACKOFF_FIRST;
        let mut attempt = 1;
        let mut last = reason.to_string();
        loop {
            let Some(timeout) = self.call_timeout() else {
                return Err(self.past_deadline(Op::Init, &last));
            };
            match create_producer(&self.config, timeout) {
                Ok(producer) => {
                    self.write().producer = producer;
                    return Ok(());
                }
                Err(err) if attempt < REBUILD_ATTEMPTS => {
                    tracing::error!(attempt, cause = %err, "cannot rebuild the producer yet");
                    std::thread::sleep(backoff.min(self.call_timeout().unwrap_or_default()));
                    backoff = (backoff * 2).min(REBUILD_BACKOFF_MAX);
                    attempt += 1;
                    last = err.to_string();
                }
                Err(err) => return Err(err),
            }
        }
    }
}

/// Creates a producer and runs `init_transactions`. Blocking.
fn create_producer(config: &ClientConfig, timeout: Duration) -> Result<FutureProducer, TxnError> {
    let producer: FutureProducer = config.create().map_err(|err| TxnError {
        op: Op::Init,
        failure: Failure::Fatal,
        cause: format!("cannot create the producer: {err}"),
    })?;
    producer
        .init_transactions(timeout)
        .map_err(|err| txn_error(Op::Init, &err))?;
    Ok(producer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traits(fatal: bool, retriable: bool, requires_abort: bool, fenced: bool) -> ErrorTraits {
        ErrorTraits {
            fatal,
            retriable,
            requires_abort,
            fenced,
        }
    }

    #[test]
    fn an_error_that_requires_an_abort_is_abortable() {
        for op in [Op::Send, Op::SendOffsets, Op::Commit] {
            assert_eq!(
                classify(op, traits(false, false, true, false)),
                Failure::Abortable
            );
        }
    }

    #[test]
    fn fencing_and_fatality_win_over_everything() {
        let all = [
            Op::Init,
            Op::Begin,
            Op::Send,
            Op::SendOffsets,
            Op::Commit,
            Op::Abort,
        ];
        for op in all {
            assert_eq!(
                classify(op, traits(true, true, true, true)),
                Failure::Fenced
            );
            assert_eq!(
                classify(op, traits(true, true, true, false)),
                Failure::Fatal
            );
        }
    }

    #[test]
    fn a_commit_that_timed_out_has_an_unknown_outcome() {
        // Retriable after every repeat: the broker may have committed.
        assert_eq!(
            classify(Op::Commit, traits(false, true, false, false)),
            Failure::OutcomeUnknown
        );
        assert_eq!(
            classify(Op::Commit, ErrorTraits::default()),
            Failure::OutcomeUnknown
        );
        assert!(Failure::OutcomeUnknown.needs_rebuild());
    }

    #[test]
    fn a_failed_abort_or_begin_needs_a_new_producer() {
        assert_eq!(classify(Op::Abort, ErrorTraits::default()), Failure::Fatal);
        assert_eq!(classify(Op::Begin, ErrorTraits::default()), Failure::Fatal);
        assert!(!Failure::Abortable.needs_rebuild());
    }

    #[test]
    fn errors_outside_transactions_are_classified_by_code() {
        let fenced = KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced);
        assert_eq!(
            classify(Op::Send, ErrorTraits::of(&fenced)),
            Failure::Fenced
        );
        let too_large = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert_eq!(
            classify(Op::Send, ErrorTraits::of(&too_large)),
            Failure::Abortable
        );
    }

    /// A producer that never reaches a broker: `send` checks generations
    /// before it touches the network.
    fn offline() -> Transactor {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("message.timeout.ms", "1000");
        let producer: FutureProducer = config.create().expect("a local producer");
        Transactor {
            config,
            transactional_id: "offline".into(),
            timeout: Duration::from_millis(100),
            recovery_deadline: Duration::from_millis(300),
            current: RwLock::new(Current {
                producer,
                generation: 0,
                open: false,
                cycle_began: None,
            }),
        }
    }

    fn open_generation(transactor: &Transactor, generation: u64) {
        let mut current = transactor.write();
        current.generation = generation;
        current.open = true;
    }

    fn record() -> FutureRecord<'static, [u8], [u8]> {
        FutureRecord::to("t").payload(&b"x"[..])
    }

    #[test]
    fn a_send_of_an_older_generation_is_refused() {
        let transactor = offline();
        open_generation(&transactor, 7);
        let refused = transactor.send(Generation(6), record());
        assert!(
            matches!(
                refused,
                Err(SendError::Stale {
                    sender: 6,
                    open: Some(7)
                })
            ),
            "{:?}",
            refused.as_ref().err()
        );
        assert!(transactor.send(Generation(7), record()).is_ok());
    }

    #[test]
    fn nothing_is_accepted_between_a_seal_and_the_next_begin() {
        let transactor = offline();
        open_generation(&transactor, 3);
        transactor.seal();
        let refused = transactor.send(Generation(3), record());
        assert!(
            matches!(
                refused,
                Err(SendError::Stale {
                    sender: 3,
                    open: None
                })
            ),
            "{:?}",
            refused.as_ref().err()
        );
        assert_eq!(transactor.generation(), Generation(3));
    }

    #[test]
    fn a_commit_cycle_blocks_no_longer_than_its_deadline() {
        let transactor = offline();
        assert_eq!(transactor.call_timeout(), Some(Duration::from_millis(100)));
        transactor.seal();
        std::thread::sleep(Duration::from_millis(250));
        let left = transactor.call_timeout().expect("time left");
        assert!(left <= Duration::from_millis(50), "{left:?}");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(transactor.call_timeout(), None);
        // A barrier with nothing to commit goes on with the same
        // transaction: its cycle is over.
        transactor.unseal();
        assert_eq!(transactor.call_timeout(), Some(Duration::from_millis(100)));
    }

    #[test]
    fn a_rebuild_against_an_unreachable_broker_gives_up_at_the_deadline() {
        let mut transactor = offline();
        transactor
            .config
            .set("transactional.id", "offline")
            .set("transaction.timeout.ms", "1000");
        let transactor = transactor.with_recovery_deadline(Duration::from_millis(800));
        let began = Instant::now();
        let err = transactor
            .rebuild("a test")
            .expect_err("no broker to rebuild against");
        // Twenty attempts of 100 ms with their back-off would take over 60 s.
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{:?}",
            began.elapsed()
        );
        assert_eq!(err.failure, Failure::Fatal);
        assert!(err.cause.contains("deadline"), "{}", err.cause);
    }
}
