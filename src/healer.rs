//! `baton heal`: the DLQ healer.
//!
//! It reads the dead-letter topic with its own consumer group and decides,
//! per record, from its class and the workflow's retry policy ([`decide`]):
//!
//! - **retry** the step while `attempts < max_attempts`, after an
//!   exponential backoff;
//! - **alternate**: attempts exhausted and the failed tool has an alternate;
//! - **plan B**: the alternate is exhausted too (or there is none) and the
//!   workflow has a PlanB route;
//! - **park** otherwise, and at once for every poison class: the record goes
//!   to `{dlq}.parked` with the reason, and a `tool_failed` record's workflow
//!   is failed.
//!
//! The healer never writes workflow state: it sends [`ControlCommand`]s to
//! the control topic, keyed by `context_id`, and the task owning the context
//! applies them through the pure step. Per batch, one Kafka transaction holds
//! the commands, the parked records and the consumer offsets, so a crash
//! neither loses a dead letter nor acts on one twice.
//!
//! Backoff never sleeps on a partition: a delayed retry is written to the
//! retry topic with its `not_before`, and the healer follows that topic,
//! keeping not-yet-due commands in memory and committing the retry topic only
//! up to its oldest pending command. A restarted healer reads them again from
//! there; a command it had already forwarded is forwarded again and has no
//! effect, because tasks apply each `command_id` once.
//!
//! Both bounds hold against a forged record too: a `not_before` later than
//! the policy's maximum backoff after the record was written is capped there
//! (a far-future one would pin the retry topic's committed offset), and at
//! `--max-pending-retries` held retries the retry topic is paused until
//! some fall due, so the rest wait in Kafka, not in memory.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use thiserror::Error;

use crate::control::{ControlAction, ControlCommand};
use crate::dlq::{ErrorClass, headers};
use crate::kafka::KafkaSettings;
use crate::metrics::{GUARDS, METRICS};
use crate::shutdown::Shutdown;
use crate::topology::{Topology, tool_of_event};
use crate::transactor::{Failure, Generation, Transactor, TxnError};

/// What the healer was told about one dead letter, from its headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterView {
    pub class: Option<String>,
    pub reason: Option<String>,
    pub context_id: Option<String>,
    pub workflow: Option<String>,
    pub step: Option<String>,
    pub attempts: Option<u32>,
    pub failed_event: Option<String>,
    pub locked_by: Option<String>,
}

impl DeadLetterView {
    pub fn of<M: Message>(message: &M) -> DeadLetterView {
        let mut view = DeadLetterView {
            context_id: message
                .key()
                .and_then(|key| std::str::from_utf8(key).ok())
                .filter(|key| !key.is_empty())
                .map(str::to_owned),
            ..DeadLetterView::default()
        };
        let Some(found) = message.headers() else {
            return view;
        };
        for header in found.iter() {
            let Some(value) = header.value.and_then(|v| std::str::from_utf8(v).ok()) else {
                continue;
            };
            let value = value.to_owned();
            match header.key {
                headers::ERROR_CLASS => view.class = Some(value),
                headers::ERROR_REASON => view.reason = Some(value),
                headers::WORKFLOW => view.workflow = Some(value),
                headers::STEP => view.step = Some(value),
                headers::ATTEMPTS => view.attempts = value.parse().ok(),
                headers::FAILED_EVENT => view.failed_event = Some(value),
                headers::LOCKED_BY => view.locked_by = Some(value),
                _ => {}
            }
        }
        view
    }
}

/// What to do with one dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send `action` for `step`, starting `attempt`, after `delay_ms`.
    Command {
        action: ControlAction,
        step: String,
        attempt: u32,
        delay_ms: u64,
    },
    /// Park the record with `reason`; `fail` names the step and attempt of a
    /// workflow to fail along with it.
    Park {
        reason: String,
        fail: Option<(String, u32)>,
    },
}

impl Decision {
    pub fn kind(&self) -> &'static str {
        match self {
            Decision::Command { action, .. } => match action {
                ControlAction::Retry => "retry",
                ControlAction::Alternate => "alternate",
                ControlAction::PlanB => "plan_b",
                ControlAction::Fail => "park",
                ControlAction::Cancel => "cancel",
            },
            Decision::Park { .. } => "park",
        }
    }
}

/// The healer's policy, pure: see the module documentation. Attempts count
/// dispatches of the step; the alternate, once dispatched, gets
/// `max_attempts` dispatches of its own before plan B.
pub fn decide(topology: &Topology, letter: &DeadLetterView) -> Decision {
    let park = |reason: String| Decision::Park { reason, fail: None };
    let class = letter.class.as_deref().unwrap_or("unknown");
    // A call that timed out is healed as one that failed.
    if !matches!(
        ErrorClass::parse(class),
        Some(ErrorClass::ToolFailed | ErrorClass::StepTimedOut)
    ) {
        let why = letter.reason.as_deref().unwrap_or("no reason given");
        return park(format!(
            "`{class}` cannot be healed by retrying; a person must look at it: {why}"
        ));
    }
    let (Some(_), Some(workflow), Some(step), Some(attempts), Some(failed_event)) = (
        &letter.context_id,
        &letter.workflow,
        &letter.step,
        letter.attempts,
        &letter.failed_event,
    ) else {
        return park(format!(
            "a `{class}` record without its context, workflow, step, attempts or failed event"
        ));
    };
    let Some(definition) = topology.workflow(workflow) else {
        return park(format!("workflow `{workflow}` is not in the topology"));
    };
    let policy = &definition.retry;
    let max = policy.max_attempts;
    let next = attempts.saturating_add(1);
    let command = |action, delay_ms| Decision::Command {
        action,
        step: step.clone(),
        attempt: next,
        delay_ms,
    };
    let retryable = definition
        .retry_target(step, failed_event, letter.locked_by.as_deref())
        .is_some();
    let on_alternate = policy.alternate_completing_with(failed_event).is_some();
    let route_attempts = if on_alternate {
        attempts.saturating_sub(max)
    } else {
        attempts
    };
    if retryable && route_attempts < max {
        return command(
            ControlAction::Retry,
            policy.backoff_ms(route_attempts.saturating_add(1)),
        );
    }
    if !on_alternate
        && policy
            .alternate_for_tool(tool_of_event(failed_event))
            .is_some()
    {
        return command(ControlAction::Alternate, 0);
    }
    if let Some(plan_b) = &policy.plan_b
        && plan_b.state != *step
    {
        return command(ControlAction::PlanB, 0);
    }
    Decision::Park {
        reason: format!(
            "`{failed_event}` kept failing in `{step}` of `{workflow}` after {attempts} attempt(s), with no route left"
        ),
        fail: Some((step.clone(), next)),
    }
}

/// How `baton heal` runs.
#[derive(Debug, Clone)]
pub struct HealerConfig {
    pub kafka: KafkaSettings,
    pub application_id: String,
    pub instance_id: String,
    pub dlq_topic: String,
    pub parked_topic: String,
    pub control_topic: String,
    pub retry_topic: String,
    pub commit_interval: Duration,
    pub startup_timeout: Duration,
    /// How long one commit cycle, recovery included, may block the thread
    /// that polls the consumer; past it the healer exits.
    pub transaction_recovery_timeout: Duration,
    /// Retries held in memory until due; at the bound the retry topic pauses.
    pub max_pending_retries: usize,
}

/// The default of `--max-pending-retries`.
pub const DEFAULT_MAX_PENDING_RETRIES: usize = 10_000;

/// The latest a retry written for `step` may be held: the largest maximum
/// backoff of the workflows that have that step (of all of them, if none
/// does), after the record's own timestamp, or now if that lies ahead.
pub fn retry_due_cap(topology: &Topology, step: &str, scheduled_ms: i64, now_ms: i64) -> i64 {
    let of = |with_step: bool| {
        topology
            .workflows()
            .filter(|definition| !with_step || definition.states.iter().any(|s| s == step))
            .map(|definition| definition.retry.max_backoff_ms)
            .max()
    };
    let max_backoff = of(true).or_else(|| of(false)).unwrap_or(0);
    scheduled_ms
        .min(now_ms)
        .saturating_add(i64::try_from(max_backoff).unwrap_or(i64::MAX))
}

impl HealerConfig {
    pub fn group_id(&self) -> String {
        format!("{}-healer", self.application_id)
    }

    pub fn transactional_id(&self) -> String {
        format!("{}-healer-{}", self.application_id, self.instance_id)
    }
}

#[derive(Debug, Error)]
pub enum HealError {
    #[error("cannot reach Kafka at {servers} after {attempts} attempts: {cause}")]
    Unreachable {
        servers: String,
        attempts: u32,
        cause: String,
    },
    #[error("missing topics: {0} (create them, e.g. with `baton topics create`)")]
    MissingTopics(String),
    #[error("kafka client: {0}")]
    Client(#[from] KafkaError),
    #[error(transparent)]
    Transaction(#[from] TxnError),
    #[error("cannot size parked records: {0}")]
    Config(String),
    #[error("the consumer has no group metadata yet")]
    NoGroupMetadata,
    #[error("cannot start the healer thread: {0}")]
    Thread(std::io::Error),
}

/// A retry the healer holds until it is due.
struct PendingRetry {
    partition: i32,
    offset: i64,
    due_ms: i64,
    /// When the retry was scheduled (the retry record's timestamp).
    scheduled_ms: i64,
    key: Option<Vec<u8>>,
    command: ControlCommand,
}

/// Runs the healer until `shutdown`. Blocking: call it on its own thread.
pub fn run(
    config: &HealerConfig,
    topology: &Topology,
    shutdown: &Shutdown,
) -> Result<(), HealError> {
    check_topics(config)?;
    let mut consumer_config = config.kafka.eos_consumer_config(&config.group_id());
    consumer_config.set("group.instance.id", config.transactional_id());
    let consumer: BaseConsumer = consumer_config.create()?;
    consumer.subscribe(&[config.dlq_topic.as_str(), config.retry_topic.as_str()])?;
    let transactor = Transactor::init(
        config
            .kafka
            .transactional_producer_config(&config.transactional_id()),
        &config.transactional_id(),
        config.startup_timeout,
    )?
    .with_recovery_deadline(config.transaction_recovery_timeout);
    let max_bytes = transactor.max_message_bytes().map_err(HealError::Config)?;
    tracing::info!(
        group = %config.group_id(),
        transactional_id = %config.transactional_id(),
        dlq = %config.dlq_topic,
        "healer is running"
    );
    let mut healer = Healer {
        config,
        topology,
        consumer,
        transactor,
        generation: None,
        max_bytes,
        pending: BTreeMap::new(),
        retries_paused: false,
    };
    while !shutdown.is_triggered() {
        if let Err(err) = healer.batch() {
            let failure = match &err {
                HealError::Transaction(txn) => txn.failure,
                // Reading or building offsets failed: nothing was committed.
                _ => Failure::Abortable,
            };
            tracing::warn!(cause = %err, ?failure, "healer batch failed; settling it and rewinding");
            healer.recover_and_rewind(failure, &err.to_string())?;
        }
    }
    Ok(())
}

struct Healer<'a> {
    config: &'a HealerConfig,
    topology: &'a Topology,
    consumer: BaseConsumer,
    transactor: Transactor,
    /// The open transaction's generation, if one is open.
    generation: Option<Generation>,
    /// The producer's `message.max.bytes`: parked records are fitted to it.
    max_bytes: usize,
    /// Not-yet-due retries by (partition, offset), as read from the retry topic.
    pending: BTreeMap<(i32, i64), PendingRetry>,
    /// Whether the retry topic is paused at the pending bound.
    retries_paused: bool,
}

const TIMEOUT: Duration = Duration::from_secs(10);

impl Healer<'_> {
    /// One transaction: everything read for `commit_interval`, the retries
    /// that fell due, and the offsets of both.
    fn batch(&mut self) -> Result<(), HealError> {
        let deadline = Instant::now() + self.config.commit_interval;
        let mut dlq_next: BTreeMap<i32, i64> = BTreeMap::new();
        let mut retry_read: BTreeMap<i32, i64> = BTreeMap::new();
        let mut open = false;
        let mut decisions: Vec<&'static str> = Vec::new();
        let mut parked: Vec<String> = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let Some(polled) = self.consumer.poll(left) else {
                continue;
            };
            let message = match polled {
                Ok(message) => message,
                Err(err) => {
                    tracing::warn!(cause = %err, "healer read error");
                    continue;
                }
            };
            if !open {
                self.generation = Some(self.transactor.begin()?);
                open = true;
            }
            if message.topic() == self.config.retry_topic {
                retry_read.insert(message.partition(), message.offset() + 1);
                if let Some(retry) = pending_retry(&message, self.topology) {
                    self.pending.insert((retry.partition, retry.offset), retry);
                }
                if self.pending.len() >= self.config.max_pending_retries {
                    self.pause_retries(true);
                }
            } else {
                dlq_next.insert(message.partition(), message.offset() + 1);
                let letter = DeadLetterView::of(&message);
                let decision = decide(self.topology, &letter);
                decisions.push(decision.kind());
                if let Decision::Park { .. } = decision {
                    parked.push(letter.class.clone().unwrap_or_else(|| "unknown".into()));
                }
                self.act(&message, &letter, decision)?;
            }
        }
        self.drop_revoked();
        let now = now_ms();
        let due: Vec<(i32, i64)> = self
            .pending
            .iter()
            .filter(|(_, retry)| retry.due_ms <= now)
            .map(|(at, _)| *at)
            .collect();
        if !due.is_empty() && !open {
            self.generation = Some(self.transactor.begin()?);
            open = true;
        }
        let mut forwarded = Vec::new();
        for at in &due {
            if let Some(retry) = self.pending.get(at) {
                let payload = retry.command.encode();
                self.send(&self.config.control_topic, retry.key.as_deref(), &payload)?;
                forwarded.push(*at);
            }
        }
        if !open {
            self.update_gauges();
            return Ok(());
        }
        let mut offsets = TopicPartitionList::new();
        for (partition, next) in &dlq_next {
            offsets.add_partition_offset(
                &self.config.dlq_topic,
                *partition,
                Offset::Offset(*next),
            )?;
        }
        // The retry topic is committed up to its oldest command still
        // pending, so a restart reads every undelivered retry again.
        let mut retry_partitions: BTreeSet<i32> = retry_read.keys().copied().collect();
        retry_partitions.extend(forwarded.iter().map(|(partition, _)| *partition));
        for partition in retry_partitions {
            let oldest_pending = self
                .pending
                .range((partition, i64::MIN)..=(partition, i64::MAX))
                .map(|((_, offset), _)| *offset)
                .find(|offset| !forwarded.contains(&(partition, *offset)));
            let committed = match (oldest_pending, retry_read.get(&partition)) {
                (Some(offset), _) => Some(offset),
                (None, Some(next)) => Some(*next),
                (None, None) => forwarded
                    .iter()
                    .filter(|(p, _)| *p == partition)
                    .map(|(_, offset)| offset + 1)
                    .max(),
            };
            if let Some(committed) = committed {
                offsets.add_partition_offset(
                    &self.config.retry_topic,
                    partition,
                    Offset::Offset(committed),
                )?;
            }
        }
        let started = Instant::now();
        let metadata = self
            .consumer
            .group_metadata()
            .ok_or(HealError::NoGroupMetadata)?;
        self.transactor.commit_with_offsets(&offsets, &metadata)?;
        self.generation = None;
        METRICS
            .transaction_commit_seconds
            .observe(started.elapsed().as_secs_f64());
        METRICS.transactions.with_label_values(&["committed"]).inc();
        for at in forwarded {
            self.pending.remove(&at);
        }
        if self.pending.len() < self.config.max_pending_retries {
            self.pause_retries(false);
        }
        for decision in decisions {
            METRICS
                .healer_decisions
                .with_label_values(&[decision])
                .inc();
        }
        for class in parked {
            METRICS.parked_records.with_label_values(&[&class]).inc();
        }
        self.update_gauges();
        Ok(())
    }

    /// Writes what `decision` asks for into the open transaction.
    fn act(
        &self,
        message: &BorrowedMessage<'_>,
        letter: &DeadLetterView,
        decision: Decision,
    ) -> Result<(), TxnError> {
        let command = |action, step: String, attempt, not_before| ControlCommand {
            command_id: ControlCommand::id_for(
                message.topic(),
                message.partition(),
                message.offset(),
            ),
            context_id: letter.context_id.clone().unwrap_or_default(),
            action,
            step,
            attempt,
            dlq_topic: message.topic().to_string(),
            dlq_partition: message.partition(),
            dlq_offset: message.offset(),
            not_before,
            reason: None,
        };
        let key = letter.context_id.as_deref().map(str::as_bytes);
        match decision {
            Decision::Command {
                action,
                step,
                attempt,
                delay_ms,
            } => {
                // Per record: debug (baton_healer_decisions_total counts them).
                tracing::debug!(
                    context_id = letter.context_id.as_deref().unwrap_or("-"),
                    action = action.as_str(),
                    %step,
                    attempt,
                    delay_ms,
                    "healing"
                );
                if delay_ms == 0 {
                    let payload = command(action, step, attempt, None).encode();
                    self.send(&self.config.control_topic, key, &payload)
                } else {
                    let due = now_ms().saturating_add(i64::try_from(delay_ms).unwrap_or(i64::MAX));
                    let payload = command(action, step, attempt, Some(due)).encode();
                    self.send(&self.config.retry_topic, key, &payload)
                }
            }
            Decision::Park { reason, fail } => {
                // Per record: debug (baton_parked_records_total and the
                // BatonRecordsParked alert report them; `baton dlq inspect`
                // shows each one).
                tracing::debug!(
                    context_id = letter.context_id.as_deref().unwrap_or("-"),
                    class = letter.class.as_deref().unwrap_or("unknown"),
                    %reason,
                    "parking"
                );
                self.park(message, &reason)?;
                if let Some((step, attempt)) = fail
                    && letter.context_id.is_some()
                {
                    let payload = command(ControlAction::Fail, step, attempt, None).encode();
                    self.send(&self.config.control_topic, key, &payload)?;
                }
                Ok(())
            }
        }
    }

    /// Forgets pending retries of partitions this healer no longer owns:
    /// their new owner reads them from the committed offset.
    fn drop_revoked(&mut self) {
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let owned: BTreeSet<i32> = assignment
            .elements_for_topic(&self.config.retry_topic)
            .iter()
            .map(|element| element.partition())
            .collect();
        self.pending
            .retain(|_, retry| owned.contains(&retry.partition));
    }

    /// Writes `message` to the parked topic with the reason and time
    /// added, fitted to `message.max.bytes`: a parked record must not be
    /// lost to its own size (the original stays at its source coordinates).
    fn park(&self, message: &BorrowedMessage<'_>, reason: &str) -> Result<(), TxnError> {
        let mut headers: Vec<(String, Vec<u8>)> = Vec::new();
        if let Some(original) = message.headers() {
            for header in original.iter() {
                headers.push((
                    header.key.to_string(),
                    header.value.map(<[u8]>::to_vec).unwrap_or_default(),
                ));
            }
        }
        let parked_at = crate::runtime::processor::now_rfc3339();
        headers.push((
            headers::PARKED_REASON.to_string(),
            crate::dlq::cut_text(reason, crate::dlq::MAX_REASON_BYTES).into_bytes(),
        ));
        headers.push((headers::PARKED_AT.to_string(), parked_at.into_bytes()));
        let fitted = crate::dlq::fit_record(
            message.key().map(<[u8]>::to_vec),
            Some(message.payload().unwrap_or_default().to_vec()),
            headers,
            self.max_bytes,
        );
        if fitted.truncated {
            tracing::warn!(
                partition = message.partition(),
                offset = message.offset(),
                max_bytes = self.max_bytes,
                "parked record cut to fit message.max.bytes"
            );
        }
        let owned = fitted.owned_headers();
        self.send_record(
            &self.config.parked_topic,
            fitted.key.as_deref(),
            fitted.value.as_deref().unwrap_or_default(),
            Some(owned),
        )
    }

    fn send(&self, topic: &str, key: Option<&[u8]>, payload: &[u8]) -> Result<(), TxnError> {
        self.send_record(topic, key, payload, None)
    }

    /// Sends one record into the open transaction.
    fn send_record(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: Option<OwnedHeaders>,
    ) -> Result<(), TxnError> {
        let generation = self.generation.ok_or_else(|| TxnError {
            op: crate::transactor::Op::Send,
            failure: Failure::Abortable,
            cause: "no open transaction".into(),
        })?;
        self.transactor.send_waiting(generation, || {
            let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(payload);
            if let Some(key) = key {
                record = record.key(key);
            }
            if let Some(headers) = &headers {
                record = record.headers(headers.clone());
            }
            record
        })
    }

    /// After a failed transaction: settle it (abort, or rebuild the
    /// producer when the failure calls for it), forget what was read, and
    /// go back to the group's committed offsets, read from the broker, so
    /// the same records are decided again.
    fn recover_and_rewind(&mut self, failure: Failure, reason: &str) -> Result<(), HealError> {
        self.generation = None;
        self.transactor.recover(failure, reason)?;
        self.pending.clear();
        let assignment = self.consumer.assignment()?;
        let committed = self.consumer.committed_offsets(assignment, TIMEOUT)?;
        for element in committed.elements() {
            let offset = match element.offset() {
                Offset::Offset(at) => Offset::Offset(at),
                _ => Offset::Beginning,
            };
            if let Err(err) =
                self.consumer
                    .seek(element.topic(), element.partition(), offset, TIMEOUT)
            {
                tracing::warn!(topic = element.topic(), partition = element.partition(), cause = %err, "rewind failed");
            }
        }
        Ok(())
    }

    /// Pauses (or resumes) reading the retry topic. Paused, its records stay
    /// in Kafka and its committed offset stays at the oldest held retry, so
    /// nothing is lost; the held ones still fall due and make room.
    fn pause_retries(&mut self, pause: bool) {
        if self.retries_paused == pause {
            return;
        }
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let mut retry_partitions = TopicPartitionList::new();
        for element in assignment.elements() {
            if element.topic() == self.config.retry_topic {
                retry_partitions.add_partition(element.topic(), element.partition());
            }
        }
        let result = if pause {
            self.consumer.pause(&retry_partitions)
        } else {
            self.consumer.resume(&retry_partitions)
        };
        match result {
            Ok(()) => {
                self.retries_paused = pause;
                GUARDS.retries_paused.set(i64::from(pause));
                tracing::info!(
                    pending = self.pending.len(),
                    bound = self.config.max_pending_retries,
                    paused = pause,
                    "retry topic {}",
                    if pause {
                        "paused at the pending-retry bound"
                    } else {
                        "resumed"
                    }
                );
            }
            Err(err) => tracing::warn!(cause = %err, "cannot pause or resume the retry topic"),
        }
    }

    fn update_gauges(&self) {
        METRICS.retries_pending.set(self.pending.len() as i64);
        let now = now_ms();
        let oldest = self
            .pending
            .values()
            .map(|retry| now.saturating_sub(retry.scheduled_ms))
            .max();
        METRICS
            .oldest_retry_seconds
            .set(oldest.map_or(0.0, |age| age.max(0) as f64 / 1000.0));
    }
}

/// A retry-topic record, kept until due (it may be due already), never past
/// [`retry_due_cap`].
fn pending_retry(message: &BorrowedMessage<'_>, topology: &Topology) -> Option<PendingRetry> {
    let command = match ControlCommand::decode(message.payload().unwrap_or_default()) {
        Ok(command) => command,
        Err(reason) => {
            // Only the healer writes this topic; a record it cannot read is
            // skipped loudly rather than blocking every retry behind it.
            tracing::error!(partition = message.partition(), offset = message.offset(), %reason, "unreadable retry record skipped");
            return None;
        }
    };
    let now = now_ms();
    let scheduled_ms = message.timestamp().to_millis().unwrap_or(now);
    let asked = command.not_before.unwrap_or(0);
    let cap = retry_due_cap(topology, &command.step, scheduled_ms, now);
    let due_ms = if asked > cap {
        GUARDS.retries_capped.inc();
        tracing::warn!(
            partition = message.partition(),
            offset = message.offset(),
            not_before = asked,
            capped_at = cap,
            "retry record's not_before lies beyond the maximum backoff; capped"
        );
        cap
    } else {
        asked
    };
    Some(PendingRetry {
        partition: message.partition(),
        offset: message.offset(),
        due_ms,
        scheduled_ms: scheduled_ms.min(now),
        key: message.key().map(<[u8]>::to_vec),
        command,
    })
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(i64::MAX)
}

/// Every topic the healer reads or writes must exist: a clear start-up error
/// names those missing. Retries reaching Kafka are bounded by the start-up timeout.
fn check_topics(config: &HealerConfig) -> Result<(), HealError> {
    let consumer: BaseConsumer = config
        .kafka
        .client_config(crate::kafka::ClientRole::Consumer)
        .create()?;
    let started = Instant::now();
    let mut attempts = 0;
    let metadata = loop {
        attempts += 1;
        match consumer.fetch_metadata(None, Duration::from_secs(2)) {
            Ok(metadata) => break metadata,
            Err(err) if started.elapsed() >= config.startup_timeout => {
                return Err(HealError::Unreachable {
                    servers: config.kafka.bootstrap_servers.clone(),
                    attempts,
                    cause: err.to_string(),
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    let existing: BTreeSet<&str> = metadata
        .topics()
        .iter()
        .filter(|topic| topic.error().is_none())
        .map(|topic| topic.name())
        .collect();
    let missing: Vec<String> = [
        ("dead-letter", &config.dlq_topic),
        ("parked", &config.parked_topic),
        ("control", &config.control_topic),
        ("retry", &config.retry_topic),
    ]
    .into_iter()
    .filter(|(_, topic)| !existing.contains(topic.as_str()))
    .map(|(role, topic)| format!("{role} topic `{topic}`"))
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(HealError::MissingTopics(missing.join(", ")))
    }
}

/// Starts the healer on its own thread; the handle yields its result.
pub fn spawn(
    config: HealerConfig,
    topology: Arc<Topology>,
    shutdown: Shutdown,
) -> Result<std::thread::JoinHandle<Result<(), HealError>>, HealError> {
    std::thread::Builder::new()
        .name("healer".into())
        .spawn(move || run(&config, &topology, &shutdown))
        .map_err(HealError::Thread)
}

#[cfg(test)]
mod tests;
