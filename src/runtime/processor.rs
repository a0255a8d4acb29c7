//! The imperative shell around the pure workflow step, for one task.
//!
//! decode -> step(state, event, topology) -> outcome, then turn the outcome
//! into output records: handovers, the changelog write, dead letters. All of
//! them go into the pod's open transaction together with the input offset.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use prometheus::{Histogram, IntCounter};
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::DeliveryFuture;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::Pipeline;
use super::engine::RebalanceHook;
use super::task::{Control, TaskProgress, TopicPartition};
use crate::codec::DecodeError;
use crate::dlq::{DeadLetter, ErrorClass};
use crate::event::{SourceCoordinates, ToolEvent};
use crate::handover::Handover;
use crate::memory::{self, Memory, Snapshot, ToolOutput};
use crate::metrics::METRICS;
use crate::state::restore::{self, RestoreRequest};
use crate::state::{self, PartitionStore};
use crate::workflow::{self, StatusUpdate, StepOutcome, WorkflowState};

/// The workflow store's name; its changelog is `{app}-workflow-changelog`.
pub const WORKFLOW_STORE: &str = "workflow";
/// The memory store's name: live memory and frozen snapshots per context.
pub const MEMORY_STORE: &str = "memory";

/// What became of one input record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processed {
    /// Its outputs (possibly none) are in the output buffer.
    Done,
    /// It is Avro written with a schema not yet fetched; nothing was output.
    NeedsSchema(u32),
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
    /// Opens the partition's store and restores it from the changelog before
    /// any input is processed. While restoring, the task still answers the
    /// engine: a barrier gets an empty report, a stop ends the restore.
    /// Returns `None` when stopped first.
    pub async fn open(
        pipeline: &Arc<Pipeline>,
        partition: i32,
        inputs: &[TopicPartition],
        consumer: &Arc<StreamConsumer<RebalanceHook>>,
        control: &mut mpsc::UnboundedReceiver<Control>,
        producer: &mut rdkafka::producer::FutureProducer,
    ) -> Option<PartitionProcessor> {
        METRICS.partitions_restoring.inc();
        let cancel = restore::cancel_flag();
        let restoring = {
            let pipeline = Arc::clone(pipeline);
            let consumer = Arc::clone(consumer);
            let inputs = inputs.to_vec();
            let cancel = Arc::clone(&cancel);
            tokio::task::spawn_blocking(move || {
                open_and_restore(&pipeline, partition, &inputs, &consumer, &cancel)
            })
        };
        tokio::pin!(restoring);
        let result = loop {
            tokio::select! {
                biased;
                command = control.recv() => match command {
                    Some(Control::Barrier { reply }) => {
                        let _ = reply.send(TaskProgress { partition, next_offsets: vec![], records: 0, failure: None });
                        // The outcome of a transaction this task took no part
                        // in; only a replaced producer matters.
                        match control.recv().await {
                            Some(Control::Committed { producer: Some(rebuilt) })
                            | Some(Control::Aborted { producer: Some(rebuilt) }) => *producer = rebuilt,
                            _ => {}
                        }
                    }
                    Some(Control::Stop { reply }) => {
                        cancel.store(true, Ordering::Relaxed);
                        let _ = (&mut restoring).await;
                        let _ = reply.send(());
                        METRICS.partitions_restoring.dec();
                        return None;
                    }
                    Some(_) => {}
                    None => {
                        cancel.store(true, Ordering::Relaxed);
                        METRICS.partitions_restoring.dec();
                        return None;
                    }
                },
                joined = &mut restoring => break joined,
            }
        };
        METRICS.partitions_restoring.dec();
        let (store, memory) = match result {
            Ok(Ok(stores)) => stores,
            Ok(Err(err)) => {
                tracing::error!(partition, cause = %err, "cannot restore the workflow store; the partition stays unprocessed");
                return wait_for_stop(control, partition).await;
            }
            Err(err) => {
                tracing::error!(partition, cause = %err, "the restore task failed");
                return wait_for_stop(control, partition).await;
            }
        };
        pipeline.stores.register(partition, Arc::clone(store.db()));
        pipeline
            .memory_stores
            .register(partition, Arc::clone(memory.db()));
        Some(PartitionProcessor {
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
        let source = SourceCoordinates {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
        };
        if source.topic == self.pipeline.memory_topic {
            self.consumed
                .entry(source.topic.clone())
                .or_insert_with(|| METRICS.records_consumed.with_label_values(&[&source.topic]))
                .inc();
            self.remember(message, &source, out);
            return Processed::Done;
        }
        let started = Instant::now();
        let decoded = self.pipeline.decoder.decode(message.payload(), &source);
        self.stages.decode.observe(started.elapsed().as_secs_f64());
        if let Err(DecodeError::MissingSchema { id }) = decoded {
            return Processed::NeedsSchema(id);
        }
        self.consumed
            .entry(source.topic.clone())
            .or_insert_with(|| METRICS.records_consumed.with_label_values(&[&source.topic]))
            .inc();
        let event = match decoded {
            Ok(event) => event,
            Err(DecodeError::Poison { class, reason }) => {
                out.push(self.dead_letter(message, &source, class, reason));
                return Processed::Done;
            }
            Err(DecodeError::MissingSchema { .. }) => return Processed::Done,
        };
        let now_ms = message.timestamp().to_millis().unwrap_or(0);
        let current = match self.load_state(&event.context_id) {
            Ok(state) => state,
            Err(reason) => {
                tracing::error!(context_id = %event.context_id, cause = %reason, "stored state is unreadable");
                out.push(self.dead_letter(message, &source, ErrorClass::InvalidTransition, reason));
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
                let snapshot_url = match self.update_memory(
                    &event,
                    !handovers.is_empty(),
                    now_ms,
                    &source,
                    out,
                ) {
                    Ok(url) => url,
                    Err(reason) => {
                        tracing::error!(context_id = %event.context_id, cause = %reason, "memory is unreadable; handing over without a snapshot");
                        None
                    }
                };
                self.emit_handovers(&event, &handovers, snapshot_url, out);
                self.emit_status_updates(&status_updates, out);
                let write =
                    self.store
                        .put(&state.context_id, state.encode(), state.version, &source);
                out.push(self.changelog_record(Store::Workflow, write));
                self.stages.encode.observe(started.elapsed().as_secs_f64());
            }
            StepOutcome::Duplicate => METRICS.events_duplicate.inc(),
            StepOutcome::Unrouted => METRICS.events_unrouted.inc(),
            StepOutcome::Invalid { reason } => {
                out.push(self.dead_letter(message, &source, ErrorClass::InvalidTransition, reason));
            }
        }
        Processed::Done
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
    fn remember<M: Message>(
        &mut self,
        message: &M,
        source: &SourceCoordinates,
        out: &mut Vec<OutRecord>,
    ) {
        let upsert = match memory::decode_upsert(message.payload().unwrap_or_default()) {
            Ok(upsert) => upsert,
            Err(reason) => {
                out.push(self.dead_letter(message, source, ErrorClass::UnrecognizedFormat, reason));
                return;
            }
        };
        let mut memory = match self.load_memory(&upsert.context_id) {
            Ok(memory) => memory,
            Err(reason) => {
                out.push(self.dead_letter(message, source, ErrorClass::InvalidTransition, reason));
                return;
            }
        };
        let at = message.timestamp().to_millis().unwrap_or(0);
        memory.upsert(&upsert, at);
        let write = self
            .memory
            .put(&memory.context_id, memory.encode(), memory.version, source);
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
        let mut url = None;
        if hands_over && let Some(snapshots) = &self.pipeline.snapshots {
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
        Ok(url)
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

    fn emit_handovers(
        &self,
        event: &ToolEvent,
        drafts: &[crate::handover::HandoverDraft],
        snapshot_url: Option<String>,
        out: &mut Vec<OutRecord>,
    ) {
        let produced_at = now_rfc3339();
        for draft in drafts {
            let handover =
                Handover::from_draft(draft, event, snapshot_url.clone(), produced_at.clone());
            match self
                .pipeline
                .output
                .encode_handover(&draft.topic, &handover)
            {
                Ok(payload) => {
                    METRICS
                        .handovers_produced
                        .with_label_values(&[&draft.agent])
                        .inc();
                    out.push(OutRecord {
                        topic: draft.topic.clone(),
                        partition: None,
                        key: Some(event.context_id.clone().into_bytes()),
                        payload: Some(payload),
                        headers: None,
                        changelog: None,
                    });
                }
                Err(err) => tracing::error!(cause = %err, "cannot encode a handover"),
            }
        }
    }

    fn dead_letter<M: Message>(
        &self,
        message: &M,
        source: &SourceCoordinates,
        class: ErrorClass,
        reason: String,
    ) -> OutRecord {
        METRICS
            .dlq_records
            .with_label_values(&[class.as_str()])
            .inc();
        tracing::debug!(class = class.as_str(), %reason, offset = source.offset, "dead-lettered");
        let letter = DeadLetter {
            class,
            reason,
            source: source.clone(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
            failed_at: now_rfc3339(),
            extra_headers: vec![],
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
    pub async fn on_commit(&mut self, last_changelog: LastChangelog) {
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
        for (store, checkpoint) in [(&mut self.store, workflow), (&mut self.memory, memory)] {
            if let Err(err) = store.commit(checkpoint).await {
                // Kafka holds the committed truth; a later restore repairs this.
                tracing::error!(partition = self.partition, cause = %err, "cannot write committed state locally");
            }
        }
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
        // Flushing the memtables on close makes the next open fast.
        let _ = tokio::task::spawn_blocking(move || {
            for db in dbs {
                let _ = db.flush();
            }
        })
        .await;
    }
}

/// A store that cannot be restored must not be processed on; hold the
/// partition (uncommitted, so nothing is lost) until the engine releases it.
async fn wait_for_stop(
    control: &mut mpsc::UnboundedReceiver<Control>,
    partition: i32,
) -> Option<PartitionProcessor> {
    while let Some(command) = control.recv().await {
        match command {
            Control::Barrier { reply } => {
                let _ = reply.send(TaskProgress {
                    partition,
                    next_offsets: vec![],
                    records: 0,
                    failure: None,
                });
                let _ = control.recv().await;
            }
            Control::Stop { reply } => {
                let _ = reply.send(());
                return None;
            }
            _ => {}
        }
    }
    None
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
