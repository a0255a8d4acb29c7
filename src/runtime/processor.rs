//! The imperative shell around the pure workflow step, for one task.
//!
//! decode -> step(state, event, topology) -> outcome, then turn the outcome
//! into output records: handovers, the changelog write, dead letters. All of
//! them go into the pod's open transaction together with the input offset.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use prometheus::{Histogram, IntCounter};
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::DeliveryFuture;
use rdkafka::{Offset, TopicPartitionList};

use super::Pipeline;
use super::engine::RebalanceHook;
use super::task::TopicPartition;
use crate::codec::DecodeError;
use crate::control::ControlCommand;
use crate::dlq::{self, DeadLetter, ErrorClass};
use crate::event::{SourceCoordinates, ToolEvent};
use crate::handover::Handover;
use crate::memory::{self, Memory, Snapshot, ToolOutput};
use crate::metrics::METRICS;
use crate::state::restore::{self, RestoreRequest};
use crate::state::{self, PartitionStore};
use crate::workflow::{self, CommandOutcome, HeldRecord, StatusUpdate, StepOutcome, WorkflowState};

/// The workflow store's name; its changelog is `{app}-workflow-changelog`.
pub const WORKFLOW_STORE: &str = "workflow";
/// The memory store's name: live memory and frozen snapshots per context.
pub const MEMORY_STORE: &str = "memory";

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

/// An input record as the processor sees it: from the consumer, or released
/// from a context's held records.
struct InputRecord<'a> {
    source: SourceCoordinates,
    timestamp_ms: i64,
    key: Option<&'a [u8]>,
    payload: Option<&'a [u8]>,
}

/// One record to produce inside the open transaction.
#[derive(Debug)]
pub struct OutRecord {
    pub topic: String,
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    /// `None` is a tombstone (a changelog delete).
    pub payload: Option<Vec<u8>>,
    pub headers: Option<rdkafka::message::OwnedHeaders>,
    /// A changelog write of this store: its offset becomes the checkpoint.
    pub changelog: Option<Store>,
}

/// The stores of a task, each with its own changelog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Workflow,
    Memory,
}

/// The last changelog record of each store in the open transaction.
#[derive(Default)]
pub struct LastChangelog {
    pub workflow: Option<DeliveryFuture>,
    pub memory: Option<DeliveryFuture>,
}

pub struct PartitionProcessor {
    pipeline: Arc<Pipeline>,
    partition: i32,
    store: PartitionStore,
    memory: PartitionStore,
    consumed: HashMap<String, IntCounter>,
    stages: StageTimers,
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
            tokio::task::spawn_blocking(move || {
                open_and_restore(&pipeline, partition, &inputs, &consumer, &cancel)
            })
        };
        let result = restoring.await;
        METRICS.partitions_restoring.dec();
        let (store, memory) = match result {
            Ok(Ok(stores)) => stores,
            Ok(Err(err)) => return Err(err),
            Err(err) => return Err(format!("the restore task failed: {err}")),
        };
        pipeline.stores.register(partition, Arc::clone(store.db()));
        pipeline
            .memory_stores
            .register(partition, Arc::clone(memory.db()));
        Ok(PartitionProcessor {
            pipeline: Arc::clone(pipeline),
            partition,
            store,
            memory,
            consumed: HashMap::new(),
            stages: StageTimers::new(),
        })
    }

    /// Turns one input record into output records, or says which writer
    /// schema must be fetched first (nothing is output then).
    pub fn process<M: Message>(&mut self, message: &M, out: &mut Vec<OutRecord>) -> Processed {
        let record = InputRecord {
            source: SourceCoordinates {
                topic: message.topic().to_string(),
                partition: message.partition(),
                offset: message.offset(),
            },
            timestamp_ms: message.timestamp().to_millis().unwrap_or(0),
            key: message.key(),
            payload: message.payload(),
        };
        let topic = record.source.topic.as_str();
        if topic == self.pipeline.memory_topic {
            self.count_consumed(topic);
            self.remember(&record, out);
            return Processed::Done;
        }
        if topic == self.pipeline.control_topic {
            return self.command(&record, out);
        }
        self.event(&record, out)
    }

    fn count_consumed(&mut self, topic: &str) {
        self.consumed
            .entry(topic.to_string())
            .or_insert_with(|| METRICS.records_consumed.with_label_values(&[topic]))
            .inc();
    }

    /// A tool event: decode, step, and write what the step decided.
    fn event(&mut self, record: &InputRecord<'_>, out: &mut Vec<OutRecord>) -> Processed {
        let source = &record.source;
        let started = Instant::now();
        let decoded = self.pipeline.decoder.decode(record.payload, source);
        self.stages.decode.observe(started.elapsed().as_secs_f64());
        if let Err(DecodeError::MissingSchema { id }) = decoded {
            return Processed::NeedsSchema(id);
        }
        self.count_consumed(&source.topic);
        let event = match decoded {
            Ok(event) => event,
            Err(DecodeError::Poison { class, reason }) => {
                out.push(self.dead_letter(record, class, reason, vec![]));
                return Processed::Done;
            }
            Err(DecodeError::MissingSchema { .. }) => return Processed::Done,
        };
        let now_ms = record.timestamp_ms;
        let current = match self.load_state(&event.context_id) {
            Ok(state) => state,
            Err(reason) => {
                tracing::error!(context_id = %event.context_id, cause = %reason, "stored state is unreadable");
                out.push(self.dead_letter(record, ErrorClass::InvalidTransition, reason, vec![]));
                return Processed::Done;
            }
        };
        let started = Instant::now();
        let outcome = workflow::step(current.as_ref(), &event, &self.pipeline.topology, now_ms);
        self.stages.step.observe(started.elapsed().as_secs_f64());
        match outcome {
            StepOutcome::Applied {
                state,
                handovers,
                status_updates,
            } => {
                let started = Instant::now();
                let snapshot_url =
                    self.record_output(&event, !handovers.is_empty(), now_ms, source, out);
                let produced_at = now_rfc3339();
                let handovers: Vec<(String, Handover)> = handovers
                    .iter()
                    .map(|draft| {
                        let handover = Handover::from_draft(
                            draft,
                            &event,
                            snapshot_url.clone(),
                            produced_at.clone(),
                        );
                        (draft.topic.clone(), handover)
                    })
                    .collect();
                self.emit_handovers(&handovers, out);
                self.emit_status_updates(&status_updates, out);
                self.write_state(&state, source, out);
                self.stages.encode.observe(started.elapsed().as_secs_f64());
            }
            StepOutcome::Duplicate => METRICS.events_duplicate.inc(),
            StepOutcome::Unrouted => METRICS.events_unrouted.inc(),
            StepOutcome::Invalid { reason } => {
                out.push(self.dead_letter(record, ErrorClass::InvalidTransition, reason, vec![]));
            }
            StepOutcome::ToolFailed {
                state,
                failure,
                status_updates,
            } => {
                self.record_output(&event, false, now_ms, source, out);
                let mut headers = vec![
                    (dlq::headers::WORKFLOW, state.workflow.clone()),
                    (dlq::headers::STEP, failure.step.clone()),
                    (dlq::headers::ATTEMPTS, failure.attempt.to_string()),
                    (dlq::headers::FAILED_EVENT, failure.event.clone()),
                ];
                if let Some(agent) = &failure.locked_by {
                    headers.push((dlq::headers::LOCKED_BY, agent.clone()));
                }
                let reason = format!(
                    "tool call `{}` failed{}",
                    failure.event,
                    event
                        .error
                        .as_deref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
                out.push(self.dead_letter(record, ErrorClass::ToolFailed, reason, headers));
                self.emit_status_updates(&status_updates, out);
                self.write_state(&state, source, out);
            }
            StepOutcome::Hold => {
                // `failure` is set, so the state exists.
                if let Some(mut state) = current {
                    state.held.push(HeldRecord {
                        topic: source.topic.clone(),
                        partition: source.partition,
                        offset: source.offset,
                        timestamp_ms: record.timestamp_ms,
                        key: record.key.map(<[u8]>::to_vec),
                        value: record.payload.map(<[u8]>::to_vec),
                    });
                    state.version = state.version.saturating_add(1);
                    METRICS.events_held.inc();
                    self.write_state(&state, source, out);
                }
            }
        }
        Processed::Done
    }

    /// A healer command: applied through the pure step; the records it
    /// releases are then processed in their arrival order.
    fn command(&mut self, record: &InputRecord<'_>, out: &mut Vec<OutRecord>) -> Processed {
        let source = &record.source;
        let command = match ControlCommand::decode(record.payload.unwrap_or_default()) {
            Ok(command) => command,
            Err(reason) => {
                self.count_consumed(&source.topic);
                out.push(self.dead_letter(record, ErrorClass::UnrecognizedFormat, reason, vec![]));
                return Processed::Done;
            }
        };
        let current = match self.load_state(&command.context_id) {
            Ok(state) => state,
            Err(reason) => {
                self.count_consumed(&source.topic);
                out.push(self.dead_letter(record, ErrorClass::InvalidTransition, reason, vec![]));
                return Processed::Done;
            }
        };
        // Released Avro records need their writer schemas: fetch them before
        // anything is applied, so the command can be processed whole.
        for held in current.iter().flat_map(|state| &state.held) {
            let coordinates = SourceCoordinates {
                topic: held.topic.clone(),
                partition: held.partition,
                offset: held.offset,
            };
            if let Err(DecodeError::MissingSchema { id }) = self
                .pipeline
                .decoder
                .decode(held.value.as_deref(), &coordinates)
            {
                return Processed::NeedsSchema(id);
            }
        }
        self.count_consumed(&source.topic);
        let now_ms = record.timestamp_ms;
        let outcome =
            workflow::apply_command(current.as_ref(), &command, &self.pipeline.topology, now_ms);
        match outcome {
            CommandOutcome::Ignored { duplicate, reason } => {
                let outcome = if duplicate { "duplicate" } else { "stale" };
                METRICS
                    .control_commands
                    .with_label_values(&[command.action.as_str(), outcome])
                    .inc();
                tracing::info!(context_id = %command.context_id, command_id = %command.command_id, %reason, "control command ignored");
            }
            CommandOutcome::Applied {
                state,
                handovers,
                status_updates,
                release,
                causation_id,
            } => {
                METRICS
                    .control_commands
                    .with_label_values(&[command.action.as_str(), "applied"])
                    .inc();
                let snapshot_url = if handovers.is_empty() {
                    None
                } else {
                    self.freeze_snapshot(&command.context_id, now_ms, source, out)
                };
                let last_output = self.last_tool_output(&command.context_id);
                let produced_at = now_rfc3339();
                let handovers: Vec<(String, Handover)> = handovers
                    .iter()
                    .map(|draft| {
                        let handover = Handover::for_command(
                            draft,
                            &command.context_id,
                            &causation_id,
                            last_output.clone(),
                            snapshot_url.clone(),
                            produced_at.clone(),
                        );
                        (draft.topic.clone(), handover)
                    })
                    .collect();
                self.emit_handovers(&handovers, out);
                self.emit_status_updates(&status_updates, out);
                self.write_state(&state, source, out);
                for held in &release {
                    METRICS.events_released.inc();
                    let released = InputRecord {
                        source: SourceCoordinates {
                            topic: held.topic.clone(),
                            partition: held.partition,
                            offset: held.offset,
                        },
                        timestamp_ms: held.timestamp_ms,
                        key: held.key.as_deref(),
                        payload: held.value.as_deref(),
                    };
                    // Schemas were checked above; `event` cannot ask for one.
                    self.event(&released, out);
                }
            }
        }
        Processed::Done
    }

    fn write_state(
        &mut self,
        state: &WorkflowState,
        source: &SourceCoordinates,
        out: &mut Vec<OutRecord>,
    ) {
        let write = self
            .store
            .put(&state.context_id, state.encode(), state.version, source);
        out.push(self.changelog_record(Store::Workflow, write));
    }

    /// Records a tool output in memory; see [`Self::update_memory`]. A memory
    /// that cannot be read only costs the snapshot URL.
    fn record_output(
        &mut self,
        event: &ToolEvent,
        hands_over: bool,
        now_ms: i64,
        source: &SourceCoordinates,
        out: &mut Vec<OutRecord>,
    ) -> Option<String> {
        match self.update_memory(event, hands_over, now_ms, source, out) {
            Ok(url) => url,
            Err(reason) => {
                tracing::error!(context_id = %event.context_id, cause = %reason, "memory is unreadable; handing over without a snapshot");
                None
            }
        }
    }

    /// The newest tool output in a context's memory, for handovers a healer
    /// command causes (they have no tool event of their own).
    fn last_tool_output(&self, context_id: &str) -> serde_json::Value {
        self.load_memory(context_id)
            .ok()
            .and_then(|memory| memory.last_tool_output().cloned())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Freezes the context's memory as a snapshot for a command's handover.
    fn freeze_snapshot(
        &mut self,
        context_id: &str,
        now_ms: i64,
        source: &SourceCoordinates,
        out: &mut Vec<OutRecord>,
    ) -> Option<String> {
        let memory = match self.load_memory(context_id) {
            Ok(memory) => memory,
            Err(reason) => {
                tracing::error!(%context_id, cause = %reason, "memory is unreadable; handing over without a snapshot");
                return None;
            }
        };
        self.snapshot(memory, now_ms, source, out)
    }

    fn load_state(&self, context_id: &str) -> Result<Option<WorkflowState>, String> {
        match self.store.get(context_id) {
            Ok(Some(bytes)) => WorkflowState::decode(&bytes)
                .map(Some)
                .map_err(|err| err.to_string()),
            Ok(None) => Ok(None),
            Err(err) => Err(err.to_string()),
        }
    }

    fn changelog_record(&self, store: Store, write: state::ChangelogWrite) -> OutRecord {
        let topic = match store {
            Store::Workflow => &self.pipeline.workflow_changelog,
            Store::Memory => &self.pipeline.memory_changelog,
        };
        OutRecord {
            topic: topic.clone(),
            partition: Some(self.partition),
            key: Some(write.key.into_bytes()),
            payload: write.value,
            headers: Some(write.headers),
            changelog: Some(store),
        }
    }

    fn load_memory(&self, context_id: &str) -> Result<Memory, String> {
        match self.memory.get(context_id) {
            Ok(Some(bytes)) => Memory::decode(&bytes),
            Ok(None) => Ok(Memory::new(context_id)),
            Err(err) => Err(err.to_string()),
        }
    }

    /// A `memory.upserted` record: the entry joins the context's memory.
    fn remember(&mut self, record: &InputRecord<'_>, out: &mut Vec<OutRecord>) {
        let upsert = match memory::decode_upsert(record.payload.unwrap_or_default()) {
            Ok(upsert) => upsert,
            Err(reason) => {
                out.push(self.dead_letter(record, ErrorClass::UnrecognizedFormat, reason, vec![]));
                return;
            }
        };
        let mut memory = match self.load_memory(&upsert.context_id) {
            Ok(memory) => memory,
            Err(reason) => {
                out.push(self.dead_letter(record, ErrorClass::InvalidTransition, reason, vec![]));
                return;
            }
        };
        memory.upsert(&upsert, record.timestamp_ms);
        let write = self.memory.put(
            &memory.context_id,
            memory.encode(),
            memory.version,
            &record.source,
        );
        out.push(self.changelog_record(Store::Memory, write));
        METRICS.memory_upserts.inc();
    }

    /// Records the tool output in the context's memory and, when the step
    /// hands over, freezes the memory as a snapshot and signs its URL.
    fn update_memory(
        &mut self,
        event: &ToolEvent,
        hands_over: bool,
        now_ms: i64,
        source: &SourceCoordinates,
        out: &mut Vec<OutRecord>,
    ) -> Result<Option<String>, String> {
        let mut memory = self.load_memory(&event.context_id)?;
        memory.record_tool_output(ToolOutput {
            event_id: event.event_id.clone(),
            tool: event.tool_name().unwrap_or_default().to_string(),
            output: event.result.clone(),
            at: now_ms,
        });
        if hands_over {
            return Ok(self.snapshot(memory, now_ms, source, out));
        }
        let write = self
            .memory
            .put(&memory.context_id, memory.encode(), memory.version, source);
        out.push(self.changelog_record(Store::Memory, write));
        Ok(None)
    }

    /// Writes `memory`, frozen as a new snapshot (older ones pruned) when
    /// snapshots are enabled, and returns the snapshot's signed URL.
    fn snapshot(
        &mut self,
        mut memory: Memory,
        now_ms: i64,
        source: &SourceCoordinates,
        out: &mut Vec<OutRecord>,
    ) -> Option<String> {
        let mut url = None;
        if let Some(snapshots) = &self.pipeline.snapshots {
            let snapshot = memory.freeze(now_ms);
            let key = memory::snapshot_key(&snapshot.context_id, snapshot.version);
            let write = self
                .memory
                .put(&key, snapshot.encode(), snapshot.version, source);
            out.push(self.changelog_record(Store::Memory, write));
            let now_unix = time::OffsetDateTime::now_utc().unix_timestamp();
            url = Some(
                snapshots
                    .signer
                    .sign(&snapshot.context_id, snapshot.version, now_unix),
            );
            METRICS.snapshots_frozen.inc();
            for version in memory.prune(now_ms, snapshots.retention_ms, snapshots.max_per_context) {
                let key = memory::snapshot_key(&memory.context_id, version);
                let write = self.memory.delete(&key, version, source);
                out.push(self.changelog_record(Store::Memory, write));
                METRICS.snapshots_pruned.inc();
            }
        }
        let write = self
            .memory
            .put(&memory.context_id, memory.encode(), memory.version, source);
        out.push(self.changelog_record(Store::Memory, write));
        url
    }

    fn emit_status_updates(&self, updates: &[StatusUpdate], out: &mut Vec<OutRecord>) {
        for update in updates {
            match self.pipeline.output.encode_status(update) {
                Ok(payload) => out.push(OutRecord {
                    topic: self.pipeline.status_topic.clone(),
                    partition: None,
                    key: Some(update.context_id.clone().into_bytes()),
                    payload: Some(payload),
                    headers: None,
                    changelog: None,
                }),
                Err(err) => tracing::error!(cause = %err, "cannot encode a status update"),
            }
        }
    }

    /// Produces each handover to its topic.
    fn emit_handovers(&self, handovers: &[(String, Handover)], out: &mut Vec<OutRecord>) {
        for (topic, handover) in handovers {
            match self.pipeline.output.encode_handover(topic, handover) {
                Ok(payload) => {
                    METRICS
                        .handovers_produced
                        .with_label_values(&[&handover.agent])
                        .inc();
                    out.push(OutRecord {
                        topic: topic.clone(),
                        partition: None,
                        key: Some(handover.context_id.clone().into_bytes()),
                        payload: Some(payload),
                        headers: None,
                        changelog: None,
                    });
                }
                Err(err) => tracing::error!(cause = %err, "cannot encode a handover"),
            }
        }
    }

    fn dead_letter(
        &self,
        record: &InputRecord<'_>,
        class: ErrorClass,
        reason: String,
        extra_headers: Vec<(&'static str, String)>,
    ) -> OutRecord {
        METRICS
            .dlq_records
            .with_label_values(&[class.as_str()])
            .inc();
        tracing::debug!(class = class.as_str(), %reason, offset = record.source.offset, "dead-lettered");
        let letter = DeadLetter {
            class,
            reason,
            source: record.source.clone(),
            key: record.key.map(<[u8]>::to_vec),
            value: record.payload.map(<[u8]>::to_vec),
            failed_at: now_rfc3339(),
            extra_headers,
        };
        OutRecord {
            topic: self.pipeline.dlq_topic.clone(),
            partition: None,
            headers: Some(letter.headers()),
            key: letter.key,
            payload: letter.value,
            changelog: None,
        }
    }

    /// The transaction committed: write its state and checkpoints to RocksDB.
    /// An error means the local copy no longer matches what Kafka committed:
    /// the task must close the stores and reopen (restore) them before it
    /// takes more input.
    pub async fn on_commit(
        &mut self,
        last_changelog: LastChangelog,
    ) -> Result<(), state::StateError> {
        let checkpoint = |delivery: Option<DeliveryFuture>| async move {
            match delivery {
                Some(delivery) => match delivery.await {
                    Ok(Ok(delivery)) => Some(delivery.offset + 1),
                    _ => None,
                },
                None => None,
            }
        };
        let workflow = checkpoint(last_changelog.workflow).await;
        let memory = checkpoint(last_changelog.memory).await;
        let (workflow, memory) =
            tokio::join!(self.store.commit(workflow), self.memory.commit(memory));
        workflow.and(memory)
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
        let record = InputRecord {
            source: SourceCoordinates {
                topic: message.topic().to_string(),
                partition: message.partition(),
                offset: message.offset(),
            },
            timestamp_ms: message.timestamp().to_millis().unwrap_or(0),
            key: message.key(),
            payload: message.payload(),
        };
        out.push(self.dead_letter(&record, class, reason, vec![]));
    }

    pub fn on_abort(&mut self) {
        self.store.abort();
        self.memory.abort();
    }

    pub async fn close(self) {
        self.pipeline.stores.unregister(self.partition);
        self.pipeline.memory_stores.unregister(self.partition);
        let dbs = [Arc::clone(self.store.db()), Arc::clone(self.memory.db())];
        drop(self.store);
        drop(self.memory);
        // The stores write no WAL: flushing on close keeps their state, so
        // the next open restores nothing.
        let partition = self.partition;
        let _ = tokio::task::spawn_blocking(move || {
            for db in dbs {
                if let Err(err) = crate::state::flush(&db) {
                    tracing::warn!(partition, cause = %err, "cannot flush a store on close; the next open restores from the changelog");
                }
            }
        })
        .await;
    }
}

/// Opens and restores the workflow and memory stores of one partition. Blocking.
fn open_and_restore(
    pipeline: &Pipeline,
    partition: i32,
    inputs: &[TopicPartition],
    consumer: &StreamConsumer<RebalanceHook>,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<(PartitionStore, PartitionStore), String> {
    let committed = committed_offsets(consumer, inputs)?;
    let open = |store: &str, changelog_topic: &str, version_of: fn(&[u8]) -> Option<u64>| {
        let path = state::store_path(
            &pipeline.state_dir,
            &pipeline.application_id,
            store,
            partition,
        );
        let opened = PartitionStore::open(&path).map_err(|err| err.to_string())?;
        let report = restore::restore(
            opened.db(),
            &RestoreRequest {
                kafka: &pipeline.kafka,
                changelog_topic,
                partition,
                committed: &committed,
                version_of,
                cancel,
            },
        )
        .map_err(|err| err.to_string())?;
        tracing::info!(
            partition,
            store,
            read = report.read,
            applied = report.applied,
            skipped_uncommitted = report.skipped_uncommitted,
            skipped_stale = report.skipped_stale,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "store restored"
        );
        Ok::<_, String>(opened)
    };
    let workflow = open(WORKFLOW_STORE, &pipeline.workflow_changelog, |bytes| {
        WorkflowState::decode(bytes).ok().map(|s| s.version)
    })?;
    let memory = open(MEMORY_STORE, &pipeline.memory_changelog, |bytes| {
        // Live memory carries a version; a snapshot is written once, so its
        // own number serves.
        Memory::decode(bytes)
            .map(|m| m.version)
            .or_else(|_| Snapshot::decode(bytes).map(|s| s.version))
            .ok()
    })?;
    Ok((workflow, memory))
}

/// The group's committed offsets for the task's inputs. Blocking.
fn committed_offsets(
    consumer: &StreamConsumer<RebalanceHook>,
    inputs: &[TopicPartition],
) -> Result<HashMap<(String, i32), i64>, String> {
    let mut request = TopicPartitionList::new();
    for tp in inputs {
        request.add_partition(tp.topic(), tp.partition());
    }
    let committed = consumer
        .committed_offsets(request, std::time::Duration::from_secs(30))
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

pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
