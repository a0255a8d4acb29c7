//! The imperative shell around the pure plan, for one task.
//!
//! decode -> plan (`workflow::step`, `apply_command`, `remember`) ->
//! [`Effects`] -> encode, size, send. Every output record is sized against
//! the producer's `message.max.bytes` before it is sent: an input whose
//! outputs cannot fit goes to the DLQ as `output_too_large` with its state
//! unchanged, and a dead letter that would not fit is cut to fit. All of it
//! goes into the pod's open transaction together with the input offset.
//!
//! Keys are fixed at the door: an event or memory record not keyed by its
//! `context_id` is forwarded, in the same transaction, to the
//! co-partitioned repartition topic keyed by it, and processed from there.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use prometheus::{Histogram, IntCounter};
use rdkafka::Message;
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::DeliveryFuture;

use super::Pipeline;
use super::engine::RebalanceHook;
pub use super::output::{LastChangelog, OutRecord};
use super::tally::Tally;
use super::task::TopicPartition;
use crate::codec::DecodeError;
use crate::control::ControlCommand;
use crate::dlq::{self, DeadLetter, ErrorClass};
use crate::event::SourceCoordinates;
use crate::memory::{self, Memory};
use crate::metrics::METRICS;
use crate::state::{self, PartitionStore, StateError, record as context_record};
use crate::workflow::timers::Timer;
use crate::workflow::{self, Context, Effects, HeldRecord, Input, Outcome, WorkflowState};

/// The context store's name: one record per context holding its workflow
/// state and its memory with its snapshots ([`context_record`]); its
/// changelog is `{app}-context-changelog`.
pub const CONTEXT_STORE: &str = "context";

/// What became of one input record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed {
    /// Its outputs (possibly none) are in the output buffer.
    Done,
    /// It is Avro written with a schema not yet fetched; nothing was output.
    NeedsSchema(u32),
    /// A local dependency failed in a way that says nothing about the record
    /// (a RocksDB read error): nothing was output or staged. The task pauses
    /// the partition and offers the same record again after a backoff.
    Transient {
        dependency: &'static str,
        reason: String,
    },
}

/// An input record as the shell sees it: from the consumer, from the
/// repartition topic, or released from a context's held records.
struct InputRecord<'a> {
    /// Where it was consumed: changelog records name it, so a restore can
    /// skip what an uncommitted transaction wrote.
    consumed: SourceCoordinates,
    /// Where it first arrived (differs after a repartition or a release):
    /// derived event ids and dead letters point there.
    identity: SourceCoordinates,
    timestamp_ms: i64,
    key: Option<&'a [u8]>,
    payload: Option<&'a [u8]>,
    origin: Origin,
}

/// How an input record reached the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// From an input topic, keyed however its producer chose.
    Consumer,
    /// From the repartition topic: keyed by its `context_id`.
    Repartition,
    /// Released from its context's held records by a healer command.
    Released,
    /// A due timer's firing: its coordinates are the partition's timer
    /// sequence, its bytes the timer's description.
    Timer,
}

impl InputRecord<'_> {
    fn plan_input(&self) -> Input<'_> {
        Input {
            source: &self.identity,
            timestamp_ms: self.timestamp_ms,
            key: self.key,
            value: self.payload,
        }
    }

    /// Whether the record is keyed by `context_id`; one that is not must be
    /// repartitioned before it touches any state.
    fn keyed_by(&self, context_id: &str) -> bool {
        self.origin != Origin::Consumer || self.key == Some(context_id.as_bytes())
    }
}

pub struct PartitionProcessor {
    pipeline: Arc<Pipeline>,
    partition: i32,
    store: PartitionStore,
    consumed: HashMap<String, IntCounter>,
    /// `baton_handovers_produced_total` per agent, resolved once.
    handovers: HashMap<String, IntCounter>,
    stages: StageTimers,
    timer_sequence: i64,
    /// Workflows by state, budgets and latencies, published at commit.
    tally: Tally,
}

/// Per-stage latency histograms, resolved once per task.
struct StageTimers {
    decode: Histogram,
    step: Histogram,
    encode: Histogram,
}

impl StageTimers {
    fn new() -> Self {
        let stage = |name: &str| METRICS.stage_seconds.with_label_values(&[name]);
        StageTimers {
            decode: stage("decode"),
            step: stage("step"),
            encode: stage("encode"),
        }
    }
}

/// What a round of timer firing did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FireReport {
    /// Timers whose firing went into the transaction.
    pub fired: usize,
    /// Index entries whose context no longer holds the timer, removed.
    pub stale: usize,
    /// A held record's writer schema to fetch before a timer can fire.
    pub needs_schema: Option<u32>,
}

/// Why a stored value could not be loaded.
enum LoadError {
    /// RocksDB failed: transient, the same record is tried again.
    Store(StateError),
    /// The bytes do not decode: the input is set aside.
    Unreadable(String),
}

/// Why an input's outputs cannot be sent as planned.
struct Rejected {
    class: ErrorClass,
    reason: String,
}

impl PartitionProcessor {
    /// Opens the partition's stores and restores them from the changelog
    /// before any input is processed. The task's lifecycle answers the
    /// engine meanwhile; `cancel` ends the restore early.
    pub async fn open(
        pipeline: &Arc<Pipeline>,
        partition: i32,
        inputs: &[TopicPartition],
        consumer: &Arc<StreamConsumer<RebalanceHook>>,
        cancel: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<PartitionProcessor, String> {
        METRICS.partitions_restoring.inc();
        let restoring = {
            let pipeline = Arc::clone(pipeline);
            let consumer = Arc::clone(consumer);
            let inputs = inputs.to_vec();
            // The blocking thread logs in the task's span (partition, topics).
            let span = tracing::Span::current();
            tokio::task::spawn_blocking(move || {
                let _span = span.enter();
                let opened = super::lifecycle::open_and_restore(
                    &pipeline, partition, &inputs, &consumer, &cancel,
                )?;
                let (counts, unreadable) = state::count_workflows(opened.0.db())
                    .map_err(|err| format!("cannot count the restored contexts: {err}"))?;
                if unreadable > 0 {
                    tracing::warn!(
                        partition,
                        unreadable,
                        "restored context records that do not decode are left out of baton_workflows (their next input dead-letters them)"
                    );
                }
                Ok((opened, counts))
            })
        };
        let result = restoring.await;
        METRICS.partitions_restoring.dec();
        let ((store, timer_sequence), counts) = match result {
            Ok(Ok(opened)) => opened,
            Ok(Err(err)) => return Err(err),
            Err(err) => return Err(format!("the restore task failed: {err}")),
        };
        pipeline.stores.register(partition, Arc::clone(store.db()));
        Ok(PartitionProcessor {
            pipeline: Arc::clone(pipeline),
            partition,
            store,
            consumed: HashMap::new(),
            handovers: HashMap::new(),
            stages: StageTimers::new(),
            timer_sequence,
            tally: Tally::restored(counts),
        })
    }

    /// The offset the next firing transaction uses on the timers topic: the
    /// partition's committed timer sequence.
    pub fn timer_sequence(&self) -> i64 {
        self.timer_sequence
    }

    /// Timers due at or before `cutoff_ms` and not fired (at most `limit`
    /// are counted).
    pub fn overdue_timers(&self, cutoff_ms: i64, limit: usize) -> Result<usize, StateError> {
        Ok(self.store.due_timers(cutoff_ms, limit)?.len())
    }

    /// Turns one input record into output records, or says why it must wait
    /// (a writer schema to fetch, a store that failed to read).
    pub fn process<M: Message>(&mut self, message: &M, out: &mut Vec<OutRecord>) -> Processed {
        let record = self.input_record(message);
        let topic = record.identity.topic.as_str();
        if topic == self.pipeline.memory_topic {
            self.count_consumed(&record.consumed.topic);
            let processed = self.remember(&record, out);
            if matches!(processed, Processed::Done) {
                self.tally.input(record.timestamp_ms);
            }
            return processed;
        }
        let processed = if topic == self.pipeline.control_topic {
            self.command(&record, out)
        } else {
            self.event(&record, out)
        };
        if matches!(processed, Processed::Done) {
            self.tally.input(record.timestamp_ms);
        }
        processed
    }

    /// A consumed record as the shell sees it; one from the repartition
    /// topic keeps the identity it had where it first arrived.
    fn input_record<'a, M: Message>(&self, message: &'a M) -> InputRecord<'a> {
        let consumed = SourceCoordinates {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
        };
        let (origin, identity) = if consumed.topic == self.pipeline.repartition_topic {
            let original = original_coordinates(message).unwrap_or_else(|| consumed.clone());
            (Origin::Repartition, original)
        } else {
            (Origin::Consumer, consumed.clone())
        };
        InputRecord {
            consumed,
            identity,
            timestamp_ms: message.timestamp().to_millis().unwrap_or(0),
            key: message.key(),
            payload: message.payload(),
            origin,
        }
    }

    fn count_consumed(&mut self, topic: &str) {
        self.consumed
            .entry(topic.to_string())
            .or_insert_with(|| METRICS.records_consumed.with_label_values(&[topic]))
            .inc();
    }

    /// A tool event: decode, plan, and write what the plan says.
    fn event(&mut self, record: &InputRecord<'_>, out: &mut Vec<OutRecord>) -> Processed {
        let started = Instant::now();
        let decoded = self
            .pipeline
            .decoder
            .decode(record.payload, &record.identity);
        self.stages.decode.observe(started.elapsed().as_secs_f64());
        let event = match decoded {
            Ok(event) => event,
            Err(DecodeError::MissingSchema { id }) => return Processed::NeedsSchema(id),
            Err(DecodeError::Poison { class, reason }) => {
                self.count_consumed(&record.consumed.topic);
                self.reject(record, class, reason, out);
                return Processed::Done;
            }
        };
        self.count_consumed(&record.consumed.topic);
        if !record.keyed_by(&event.context_id) {
            self.repartition(record, &event.context_id, out);
            return Processed::Done;
        }
        let (state, memory) = match self.load_context(&event.context_id) {
            Ok(context) => context,
            Err(LoadError::Store(err)) => return transient(err),
            Err(LoadError::Unreadable(reason)) => {
                self.reject(record, ErrorClass::UnreadableState, reason, out);
                return Processed::Done;
            }
        };
        let started = Instant::now();
        let effects = workflow::step(
            Context {
                state: state.as_ref(),
                memory: &memory,
            },
            &event,
            record.plan_input(),
            &self.pipeline.topology,
            &self.pipeline.policy,
            record.timestamp_ms,
        );
        self.stages.step.observe(started.elapsed().as_secs_f64());
        let started = Instant::now();
        self.apply(
            record,
            &event.context_id,
            (state.as_ref(), &memory),
            effects,
            out,
        );
        self.stages.encode.observe(started.elapsed().as_secs_f64());
        Processed::Done
    }

    /// A healer command: planned as one input; the records it releases are
    /// then stepped in their arrival order.
    fn command(&mut self, record: &InputRecord<'_>, out: &mut Vec<OutRecord>) -> Processed {
        let command = match ControlCommand::decode(record.payload.unwrap_or_default()) {
            Ok(command) => command,
            Err(reason) => {
                self.count_consumed(&record.consumed.topic);
                self.reject(record, ErrorClass::UnrecognizedFormat, reason, out);
                return Processed::Done;
            }
        };
        let (state, memory) = match self.load_context(&command.context_id) {
            Ok(context) => context,
            Err(LoadError::Store(err)) => return transient(err),
            Err(LoadError::Unreadable(reason)) => {
                self.count_consumed(&record.consumed.topic);
                self.reject(record, ErrorClass::UnreadableState, reason, out);
                return Processed::Done;
            }
        };
        // Released Avro records need their writer schemas: fetch them before
        // anything is applied, so the command is processed whole.
        if let Some(id) = self.missing_schema_of_held(state.as_ref()) {
            return Processed::NeedsSchema(id);
        }
        self.count_consumed(&record.consumed.topic);
        let effects = workflow::apply_command(
            Context {
                state: state.as_ref(),
                memory: &memory,
            },
            &command,
            &self.pipeline.topology,
            &self.pipeline.policy,
            record.timestamp_ms,
        );
        let outcome = match &effects.outcome {
            Outcome::CommandApplied => "applied",
            Outcome::CommandIgnored {
                duplicate: true, ..
            } => "duplicate",
            Outcome::CommandIgnored { reason, .. } => {
                tracing::debug!(context_id = %command.context_id, command_id = %command.command_id, %reason, "control command ignored");
                "stale"
            }
            _ => "rejected",
        };
        METRICS
            .control_commands
            .with_label_values(&[command.action.as_str(), outcome])
            .inc();
        let loaded = (state.as_ref(), &memory);
        let Some(applied) = self.apply(record, &command.context_id, loaded, effects, out) else {
            return Processed::Done;
        };
        self.release_held(record, &command.context_id, (state, memory), applied, out);
        Processed::Done
    }

    /// Steps the records `applied` released, in their arrival order, over
    /// the state it left (the store is not read again). `record` is what
    /// released them: a restore judges their state by its offset.
    fn release_held(
        &mut self,
        record: &InputRecord<'_>,
        context_id: &str,
        loaded: (Option<WorkflowState>, Memory),
        applied: Effects,
        out: &mut Vec<OutRecord>,
    ) {
        let (state, memory) = loaded;
        let mut state = applied.state.or(state);
        let mut memory = applied.memory.map_or(memory, |write| write.live);
        for held in applied.release {
            METRICS.events_released.inc();
            let released = InputRecord {
                consumed: record.consumed.clone(),
                identity: SourceCoordinates {
                    topic: held.topic.clone(),
                    partition: held.partition,
                    offset: held.offset,
                },
                timestamp_ms: held.timestamp_ms,
                key: held.key.as_deref(),
                payload: held.value.as_deref(),
                origin: Origin::Released,
            };
            let event = match self
                .pipeline
                .decoder
                .decode(released.payload, &released.identity)
            {
                Ok(event) => event,
                Err(DecodeError::Poison { class, reason }) => {
                    self.reject(&released, class, reason, out);
                    continue;
                }
                // Fetched before the release was planned, and the cache
                // never forgets an id.
                Err(DecodeError::MissingSchema { id }) => {
                    let reason = format!("writer schema {id} was fetched, yet is not cached");
                    self.reject(&released, ErrorClass::UnknownSchema, reason, out);
                    continue;
                }
            };
            if event.context_id != context_id {
                // Held by another context's state: it cannot have been held here.
                let reason = format!(
                    "held by context `{context_id}`, but the record is for `{}`",
                    event.context_id
                );
                self.reject(&released, ErrorClass::InvalidTransition, reason, out);
                continue;
            }
            let effects = workflow::step(
                Context {
                    state: state.as_ref(),
                    memory: &memory,
                },
                &event,
                released.plan_input(),
                &self.pipeline.topology,
                &self.pipeline.policy,
                released.timestamp_ms,
            );
            let loaded = (state.as_ref(), &memory);
            if let Some(applied) = self.apply(&released, &event.context_id, loaded, effects, out) {
                state = applied.state.or(state);
                memory = applied.memory.map_or(memory, |write| write.live);
            }
        }
    }

    /// The writer schema a context's held records need and the cache lacks,
    /// if any: a command or timer that would release them waits for it.
    fn missing_schema_of_held(&self, state: Option<&WorkflowState>) -> Option<u32> {
        state.iter().flat_map(|state| &state.held).find_map(|held| {
            let coordinates = SourceCoordinates {
                topic: held.topic.clone(),
                partition: held.partition,
                offset: held.offset,
            };
            match self
                .pipeline
                .decoder
                .decode(held.value.as_deref(), &coordinates)
            {
                Err(DecodeError::MissingSchema { id }) => Some(id),
                _ => None,
            }
        })
    }

    /// Fires the timers due at or before `cutoff_ms` (at most `limit`) into
    /// `out`, as inputs at the partition's timer sequence: each one's state,
    /// handovers and dead letter go into the open transaction. `now_ms` is
    /// the wall clock, for lateness.
    pub fn fire_due(
        &mut self,
        cutoff_ms: i64,
        now_ms: i64,
        limit: usize,
        out: &mut Vec<OutRecord>,
    ) -> Result<FireReport, StateError> {
        let sequence = self.timer_sequence;
        let mut report = FireReport::default();
        for due in self.store.due_timers(cutoff_ms, limit)? {
            let (state, memory) = match self.load_context(&due.context_id) {
                Ok(context) => context,
                Err(LoadError::Store(err)) => return Err(err),
                // A record that does not decode keeps its timer until the
                // record is fixed or replaced: it is not fired blind.
                Err(LoadError::Unreadable(reason)) => {
                    tracing::warn!(context_id = %due.context_id, %reason, "a due timer's context does not decode; the timer waits");
                    continue;
                }
            };
            let timer: Option<Timer> = state.as_ref().and_then(|state| {
                state
                    .timers
                    .iter()
                    .find(|timer| timer.key() == due.timer_key && timer.due_at == due.due_at)
                    .cloned()
            });
            let Some(timer) = timer else {
                // The context moved on (or the timer moved): the entry goes.
                self.store.drop_timer_entry(&due);
                report.stale += 1;
                continue;
            };
            if let Some(id) = self.missing_schema_of_held(state.as_ref()) {
                report.needs_schema = Some(id);
                continue;
            }
            let description = serde_json::json!({
                "event": "baton.timer.fired",
                "context_id": due.context_id,
                "timer": timer,
            })
            .to_string()
            .into_bytes();
            let coordinates = SourceCoordinates {
                topic: self.pipeline.timers_topic.clone(),
                partition: self.partition,
                offset: sequence,
            };
            let record = InputRecord {
                consumed: coordinates.clone(),
                identity: coordinates,
                timestamp_ms: now_ms,
                key: Some(due.context_id.as_bytes()),
                payload: Some(&description),
                origin: Origin::Timer,
            };
            let effects = workflow::fire(
                Context {
                    state: state.as_ref(),
                    memory: &memory,
                },
                &timer,
                &self.pipeline.topology,
                &self.pipeline.policy,
            );
            if effects.outcome == Outcome::TimerStale {
                report.stale += 1;
            } else {
                report.fired += 1;
                METRICS
                    .timer_lateness_seconds
                    .observe((now_ms.saturating_sub(timer.due_at)).max(0) as f64 / 1000.0);
            }
            let loaded = (state.as_ref(), &memory);
            if let Some(applied) = self.apply(&record, &due.context_id, loaded, effects, out) {
                self.release_held(&record, &due.context_id, (state, memory), applied, out);
            }
        }
        METRICS
            .timers_pending
            .set(self.pipeline.stores.pending_timers() as i64);
        Ok(report)
    }

    /// A `memory.upserted` record: the entry joins the context's memory.
    fn remember(&mut self, record: &InputRecord<'_>, out: &mut Vec<OutRecord>) -> Processed {
        let upsert = match memory::decode_upsert(record.payload.unwrap_or_default()) {
            Ok(upsert) => upsert,
            Err(reason) => {
                self.reject(record, ErrorClass::UnrecognizedFormat, reason, out);
                return Processed::Done;
            }
        };
        if !record.keyed_by(&upsert.context_id) {
            self.repartition(record, &upsert.context_id, out);
            return Processed::Done;
        }
        let (state, memory) = match self.load_context(&upsert.context_id) {
            Ok(context) => context,
            Err(LoadError::Store(err)) => return transient(err),
            Err(LoadError::Unreadable(reason)) => {
                self.reject(record, ErrorClass::UnreadableState, reason, out);
                return Processed::Done;
            }
        };
        let effects =
            workflow::remember(&memory, &upsert, &self.pipeline.policy, record.timestamp_ms);
        let loaded = (state.as_ref(), &memory);
        self.apply(record, &upsert.context_id, loaded, effects, out);
        Processed::Done
    }

    /// Forwards a record not keyed by its context to the repartition topic,
    /// keyed by it, as Kafka Streams does after `selectKey`. Its value and
    /// timestamp are unchanged; headers name where it first arrived.
    fn repartition(&self, record: &InputRecord<'_>, context_id: &str, out: &mut Vec<OutRecord>) {
        let partition = record.identity.partition.to_string();
        let offset = record.identity.offset.to_string();
        let headers = OwnedHeaders::new_with_capacity(3)
            .insert(Header {
                key: dlq::headers::SOURCE_TOPIC,
                value: Some(record.identity.topic.as_str()),
            })
            .insert(Header {
                key: dlq::headers::SOURCE_PARTITION,
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: dlq::headers::SOURCE_OFFSET,
                value: Some(offset.as_str()),
            });
        let forwarded = OutRecord {
            topic: self.pipeline.repartition_topic.clone(),
            partition: None,
            key: Some(context_id.as_bytes().to_vec()),
            payload: record.payload.map(<[u8]>::to_vec),
            headers: Some(headers),
            timestamp: Some(record.timestamp_ms),
            changelog: false,
        };
        if forwarded.wire_size() > self.pipeline.max_message_bytes {
            let reason = format!(
                "the record must be repartitioned by its context_id, but with its new key it would take {} bytes, more than message.max.bytes ({})",
                forwarded.wire_size(),
                self.pipeline.max_message_bytes
            );
            self.reject(record, ErrorClass::OutputTooLarge, reason, out);
            return;
        }
        METRICS.records_repartitioned.inc();
        out.push(forwarded);
    }

    /// Encodes and sizes everything `effects` plans, then stages its writes
    /// and queues its records; or, if an output cannot be encoded or cannot
    /// fit, dead-letters the input instead and changes nothing. `loaded` is
    /// the context the plan was made from. Returns the effects that were
    /// applied.
    fn apply(
        &mut self,
        record: &InputRecord<'_>,
        context_id: &str,
        loaded: (Option<&WorkflowState>, &Memory),
        effects: Effects,
        out: &mut Vec<OutRecord>,
    ) -> Option<Effects> {
        let mut records =
            Vec::with_capacity(effects.handovers.len() + effects.status_updates.len() + 1);
        let staged = match self.encode(record, context_id, loaded, &effects, &mut records) {
            Ok(staged) => staged,
            Err(rejected) => {
                self.reject(record, rejected.class, rejected.reason, out);
                return None;
            }
        };
        if let Some(plan) = &effects.dead_letter {
            self.dead_letter(record, plan.class, plan.reason.clone(), &plan.headers, out);
        }
        if let Some(value) = staged {
            self.store.stage(context_id, Some(value));
        }
        self.store
            .stage_timers(context_id, &effects.timers.set, &effects.timers.deleted);
        for held in &effects.park {
            self.park_held(context_id, held, out);
        }
        self.count(&effects);
        self.tally.applied(loaded.0, &effects, record.timestamp_ms);
        out.append(&mut records);
        Some(effects)
    }

    /// A record a cancelled context held goes to the parked topic, as it
    /// arrived, with the reason: nothing is lost, and nobody retries it.
    fn park_held(&self, context_id: &str, held: &HeldRecord, out: &mut Vec<OutRecord>) {
        let letter = DeadLetter {
            class: ErrorClass::ContextCancelled,
            reason: format!(
                "held by context `{}` while it waited on the healer; an operator cancelled the context",
                dlq::cut_text(context_id, 120)
            ),
            source: SourceCoordinates {
                topic: held.topic.clone(),
                partition: held.partition,
                offset: held.offset,
            },
            key: held.key.clone(),
            value: held.value.clone(),
            failed_at: now_rfc3339(),
            extra_headers: Vec::new(),
        };
        METRICS
            .dlq_records
            .with_label_values(&[ErrorClass::ContextCancelled.as_str()])
            .inc();
        let fitted = letter.fitted(self.pipeline.max_message_bytes);
        out.push(OutRecord {
            topic: self.pipeline.parked_topic.clone(),
            partition: None,
            headers: Some(fitted.owned_headers()),
            key: fitted.key,
            payload: fitted.value,
            timestamp: None,
            changelog: false,
        });
    }

    /// The records of `effects` other than its dead letter, each sized, and
    /// the context's new store value if it changed: one record with the
    /// workflow state and the memory, whichever of them changed.
    fn encode(
        &self,
        record: &InputRecord<'_>,
        context_id: &str,
        loaded: (Option<&WorkflowState>, &Memory),
        effects: &Effects,
        records: &mut Vec<OutRecord>,
    ) -> Result<Option<Vec<u8>>, Rejected> {
        let output = &self.pipeline.output;
        let unencodable = |what: &str, err: String| Rejected {
            class: ErrorClass::OutputUnencodable,
            reason: format!("cannot encode the {what}: {err}"),
        };
        if !effects.handovers.is_empty() {
            let produced_at = now_rfc3339();
            let now_unix = time::OffsetDateTime::now_utc().unix_timestamp();
            for planned in &effects.handovers {
                let mut handover = planned.handover.clone();
                handover.produced_at.clone_from(&produced_at);
                if let (Some(version), Some(snapshots)) =
                    (planned.snapshot, &self.pipeline.snapshots)
                {
                    handover.memory_snapshot_url =
                        Some(snapshots.signer.sign(context_id, version, now_unix));
                }
                let payload = output
                    .encode_handover(&planned.topic, &handover)
                    .map_err(|err| unencodable("handover", err))?;
                records.push(OutRecord::to(&planned.topic, context_id, payload));
            }
        }
        let live_feed = self.pipeline.status_topic.as_ref();
        for (topic, update) in live_feed
            .into_iter()
            .flat_map(|topic| effects.status_updates.iter().map(move |u| (topic, u)))
        {
            let payload = output
                .encode_status(update)
                .map_err(|err| unencodable("status update", err))?;
            records.push(OutRecord::to(topic, context_id, payload));
        }
        let mut staged = None;
        if effects.state.is_some() || effects.memory.is_some() {
            let state = effects.state.as_ref().or(loaded.0);
            let memory = effects
                .memory
                .as_ref()
                .map_or(loaded.1, |write| &write.live);
            let value = context_record::encode(state, memory);
            records.push(OutRecord {
                topic: self.pipeline.changelog.clone(),
                partition: Some(self.partition),
                key: Some(context_id.as_bytes().to_vec()),
                payload: Some(value.clone()),
                headers: Some(state::context_changelog_headers(
                    &record.consumed,
                    context_record::version(state, memory),
                    state.map_or(&[], |state| state.timers.as_slice()),
                )),
                timestamp: None,
                changelog: true,
            });
            staged = Some(value);
        }
        let max = self.pipeline.max_message_bytes;
        if let Some(big) = records.iter().find(|out| out.wire_size() > max) {
            return Err(Rejected {
                class: ErrorClass::OutputTooLarge,
                reason: format!(
                    "an output for {} would take {} bytes, more than message.max.bytes ({max}); the context's state is unchanged",
                    big.topic,
                    big.wire_size()
                ),
            });
        }
        Ok(staged)
    }

    /// Metrics for a planned input, once its outputs are queued.
    fn count(&mut self, effects: &Effects) {
        match &effects.outcome {
            Outcome::Duplicate => METRICS.events_duplicate.inc(),
            Outcome::Unrouted => METRICS.events_unrouted.inc(),
            Outcome::Held => METRICS.events_held.inc(),
            Outcome::Remembered => METRICS.memory_upserts.inc(),
            Outcome::Stale => METRICS.events_stale.inc(),
            Outcome::Heartbeat { accepted } => METRICS
                .heartbeats
                .with_label_values(&[if *accepted { "accepted" } else { "ignored" }])
                .inc(),
            Outcome::TimerFired(kind) => METRICS
                .timers_fired
                .with_label_values(&[kind.as_str()])
                .inc(),
            _ => {}
        }
        for planned in &effects.handovers {
            let agent = planned.handover.agent.as_str();
            match self.handovers.get(agent) {
                Some(counter) => counter.inc(),
                None => {
                    let counter = METRICS.handovers_produced.with_label_values(&[agent]);
                    counter.inc();
                    self.handovers.insert(agent.to_owned(), counter);
                }
            }
        }
        if let Some(write) = &effects.memory {
            if write.frozen.is_some() {
                METRICS.snapshots_frozen.inc();
            }
            METRICS.snapshots_pruned.inc_by(write.pruned.len() as u64);
        }
    }

    /// Sets the input aside as a dead letter of `class`; nothing else of it
    /// is written.
    fn reject(
        &self,
        record: &InputRecord<'_>,
        class: ErrorClass,
        reason: String,
        out: &mut Vec<OutRecord>,
    ) {
        if matches!(
            class,
            ErrorClass::OutputTooLarge
                | ErrorClass::OutputUnencodable
                | ErrorClass::UnreadableState
        ) {
            tracing::warn!(class = class.as_str(), %reason, topic = %record.identity.topic, partition = record.identity.partition, offset = record.identity.offset, "input set aside");
        }
        self.dead_letter(record, class, reason, &[], out);
    }

    /// The input's dead letter, fitted to `message.max.bytes`.
    fn dead_letter(
        &self,
        record: &InputRecord<'_>,
        class: ErrorClass,
        reason: String,
        extra_headers: &[(&'static str, String)],
        out: &mut Vec<OutRecord>,
    ) {
        METRICS
            .dlq_records
            .with_label_values(&[class.as_str()])
            .inc();
        tracing::debug!(class = class.as_str(), %reason, topic = %record.identity.topic, partition = record.identity.partition, offset = record.identity.offset, "dead-lettered");
        let letter = DeadLetter {
            class,
            reason,
            source: record.identity.clone(),
            key: record.key.map(<[u8]>::to_vec),
            value: record.payload.map(<[u8]>::to_vec),
            failed_at: now_rfc3339(),
            extra_headers: extra_headers.to_vec(),
        };
        let fitted = letter.fitted(self.pipeline.max_message_bytes);
        if fitted.truncated {
            METRICS.dlq_truncated.inc();
        }
        out.push(OutRecord {
            topic: self.pipeline.dlq_topic.clone(),
            partition: None,
            headers: Some(fitted.owned_headers()),
            key: fitted.key,
            payload: fitted.value,
            timestamp: None,
            changelog: false,
        });
    }

    fn load_context(&self, context_id: &str) -> Result<(Option<WorkflowState>, Memory), LoadError> {
        match self.store.get(context_id).map_err(LoadError::Store)? {
            Some(bytes) => context_record::decode(&bytes).map_err(LoadError::Unreadable),
            None => Ok((None, Memory::new(context_id))),
        }
    }

    /// The transaction committed: write its state and checkpoints to RocksDB.
    /// An error means the local copy no longer matches what Kafka committed:
    /// the task must close the stores and reopen (restore) them before it
    /// takes more input.
    pub async fn on_commit(
        &mut self,
        last_changelog: LastChangelog,
        timers_fired: bool,
    ) -> Result<(), state::StateError> {
        if timers_fired {
            // The transaction committed `sequence + 1` on the timers topic.
            self.timer_sequence += 1;
        }
        let checkpoint = |delivery: Option<DeliveryFuture>| async move {
            match delivery {
                Some(delivery) => match delivery.await {
                    Ok(Ok(delivery)) => Some(delivery.offset + 1),
                    _ => None,
                },
                None => None,
            }
        };
        let next = checkpoint(last_changelog.0).await;
        self.store.commit(next).await?;
        self.tally.committed(super::task::wall_clock_ms());
        Ok(())
    }

    /// Sets `message` aside: its dead letter of `class` goes to `out`, and
    /// nothing else happens (the engine isolates a record the broker keeps
    /// refusing this way).
    pub fn dead_letter_input<M: Message>(
        &self,
        message: &M,
        class: ErrorClass,
        reason: String,
        out: &mut Vec<OutRecord>,
    ) {
        let record = self.input_record(message);
        self.reject(&record, class, reason, out);
    }

    pub fn on_abort(&mut self) {
        self.store.abort();
        self.tally.aborted();
    }

    pub async fn close(self) {
        self.pipeline.stores.unregister(self.partition);
        let db = Arc::clone(self.store.db());
        drop(self.store);
        // The store writes no WAL: flushing on close keeps its state, so
        // the next open restores nothing.
        let partition = self.partition;
        let span = tracing::Span::current();
        let _ = tokio::task::spawn_blocking(move || {
            let _span = span.enter();
            if let Err(err) = crate::state::flush(&db) {
                tracing::warn!(partition, cause = %err, "cannot flush the store on close; the next open restores from the changelog");
            }
        })
        .await;
    }
}

pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn transient(err: StateError) -> Processed {
    Processed::Transient {
        dependency: "state",
        reason: err.to_string(),
    }
}

/// Where a repartitioned record first arrived, from its headers.
fn original_coordinates<M: Message>(message: &M) -> Option<SourceCoordinates> {
    let headers = message.headers()?;
    let text = |name: &str| {
        headers
            .iter()
            .find(|header| header.key == name)
            .and_then(|header| header.value)
            .and_then(|value| std::str::from_utf8(value).ok())
    };
    Some(SourceCoordinates {
        topic: text(dlq::headers::SOURCE_TOPIC)?.to_owned(),
        partition: text(dlq::headers::SOURCE_PARTITION)?.parse().ok()?,
        offset: text(dlq::headers::SOURCE_OFFSET)?.parse().ok()?,
    })
}
