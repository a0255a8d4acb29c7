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
use crate::metrics::METRICS;
use crate::state::restore::{self, RestoreRequest};
use crate::state::{self, PartitionStore};
use crate::workflow::{self, StepOutcome, WorkflowState};

/// The workflow store's name; its changelog is `{app}-workflow-changelog`.
pub const WORKFLOW_STORE: &str = "workflow";

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
    pub payload: Vec<u8>,
    pub headers: Option<rdkafka::message::OwnedHeaders>,
    /// A changelog write: its offset becomes the store's checkpoint.
    pub changelog: bool,
}

pub struct PartitionProcessor {
    pipeline: Arc<Pipeline>,
    partition: i32,
    store: PartitionStore,
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
        let store = match result {
            Ok(Ok(store)) => store,
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
        Some(PartitionProcessor {
            pipeline: Arc::clone(pipeline),
            partition,
            store,
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
                status_updates: _,
            } => {
                let started = Instant::now();
                self.emit_handovers(&event, &handovers, out);
                let write =
                    self.store
                        .put(&state.context_id, state.encode(), state.version, &source);
                out.push(OutRecord {
                    topic: self.pipeline.workflow_changelog.clone(),
                    partition: Some(self.partition),
                    key: Some(write.key.into_bytes()),
                    payload: write.value.unwrap_or_default(),
                    headers: Some(write.headers),
                    changelog: true,
                });
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

    fn emit_handovers(
        &self,
        event: &ToolEvent,
        drafts: &[crate::handover::HandoverDraft],
        out: &mut Vec<OutRecord>,
    ) {
        let produced_at = now_rfc3339();
        for draft in drafts {
            let handover = Handover::from_draft(draft, event, None, produced_at.clone());
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
                        payload,
                        headers: None,
                        changelog: false,
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
            payload: letter.value.unwrap_or_default(),
            changelog: false,
        }
    }

    /// The transaction committed: write its state and checkpoint to RocksDB.
    pub async fn on_commit(&mut self, last_changelog: Option<DeliveryFuture>) {
        let checkpoint = match last_changelog {
            Some(delivery) => match delivery.await {
                Ok(Ok(delivery)) => Some(delivery.offset + 1),
                _ => None,
            },
            None => None,
        };
        if let Err(err) = self.store.commit(checkpoint).await {
            // Kafka holds the committed truth; a later restore repairs this.
            tracing::error!(partition = self.partition, cause = %err, "cannot write committed state locally");
        }
    }

    pub fn on_abort(&mut self) {
        self.store.abort();
    }

    pub async fn close(self) {
        self.pipeline.stores.unregister(self.partition);
        let db = Arc::clone(self.store.db());
        drop(self.store);
        // Flushing the memtable on close makes the next open fast.
        let _ = tokio::task::spawn_blocking(move || db.flush()).await;
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

/// Opens and restores the workflow store of one partition. Blocking.
fn open_and_restore(
    pipeline: &Pipeline,
    partition: i32,
    inputs: &[TopicPartition],
    consumer: &StreamConsumer<RebalanceHook>,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<PartitionStore, String> {
    let path = state::store_path(
        &pipeline.state_dir,
        &pipeline.application_id,
        WORKFLOW_STORE,
        partition,
    );
    let store = PartitionStore::open(&path).map_err(|err| err.to_string())?;
    let committed = committed_offsets(consumer, inputs)?;
    let report = restore::restore(
        store.db(),
        &RestoreRequest {
            kafka: &pipeline.kafka,
            changelog_topic: &pipeline.workflow_changelog,
            partition,
            committed: &committed,
            version_of: |bytes| WorkflowState::decode(bytes).ok().map(|s| s.version),
            cancel,
        },
    )
    .map_err(|err| err.to_string())?;
    tracing::info!(
        partition,
        read = report.read,
        applied = report.applied,
        skipped_uncommitted = report.skipped_uncommitted,
        skipped_stale = report.skipped_stale,
        elapsed_ms = report.elapsed.as_millis() as u64,
        "workflow store restored"
    );
    Ok(store)
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
