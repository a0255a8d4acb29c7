//! Restoring a store partition from its changelog.
//!
//! Reads from the checkpoint to the fetch-side end of the partition (never
//! ListOffsets, which some brokers get wrong) and applies each record unless
//! it belongs to input that was never committed, or it would put an older
//! version over a newer one. Both rules keep state exact even on a broker
//! that shows aborted transactions to `read_committed` readers, and they are
//! defence in depth on real Kafka.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{Message, Offset, TopicPartitionList};
use rocksdb::{DB, WriteBatch};
use thiserror::Error;

use super::timer_index::{self, TIMERS_FAMILY, TIMERS_HEADER};
use super::{CHECKPOINT_KEY, META_FAMILY, StateError, headers, read_checkpoint};
use crate::kafka::{ClientRole, KafkaSettings};
use crate::metrics::METRICS;

/// The `(due_at, key)` of a record's timers, as its changelog header names them.
type TimerEntries = Vec<(i64, String)>;

/// Records applied per RocksDB write batch while restoring.
const RESTORE_BATCH: usize = 10_000;

#[derive(Debug, Error)]
pub enum RestoreError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot read changelog {topic}-{partition}: {source}")]
    Kafka {
        topic: String,
        partition: i32,
        #[source]
        source: KafkaError,
    },
    #[error("restore cancelled")]
    Cancelled,
}

/// What to restore, and the committed input offsets that decide which
/// changelog records count.
pub struct RestoreRequest<'a> {
    pub kafka: &'a KafkaSettings,
    pub changelog_topic: &'a str,
    pub partition: i32,
    /// Committed next-offset per input (topic, partition). An input with no
    /// committed offset has committed nothing, so none of its records count.
    pub committed: &'a HashMap<(String, i32), i64>,
    /// Reads the version out of a stored value.
    pub version_of: fn(&[u8]) -> Option<u64>,
    /// Reads the `(due_at, key)` of the timers a stored value holds, so the
    /// timer index loses the entries of a value the restore overwrites.
    pub timers_of: fn(&[u8]) -> Vec<(i64, String)>,
    pub cancel: &'a AtomicBool,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    pub read: u64,
    pub applied: u64,
    pub skipped_uncommitted: u64,
    pub skipped_stale: u64,
    pub start_offset: Option<i64>,
    pub next_offset: Option<i64>,
    pub elapsed: Duration,
}

/// Restores `db` from the changelog. Blocking: run on a blocking thread.
pub fn restore(db: &DB, request: &RestoreRequest<'_>) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    let kafka_error = |source| RestoreError::Kafka {
        topic: request.changelog_topic.to_string(),
        partition: request.partition,
        source,
    };
    let mut config = request.kafka.client_config(ClientRole::Consumer);
    config
        .set("group.id", format!("{}-restore", request.changelog_topic))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("fetch.max.bytes", "52428800")
        .set("max.partition.fetch.bytes", "10485760")
        .set("fetch.wait.max.ms", "50")
        // The fetch-side high watermark, for the records-remaining gauge.
        .set("statistics.interval.ms", "1000");
    let consumer: BaseConsumer<RestoreContext> = config
        .create_with_context(RestoreContext {
            high_watermark: AtomicI64::new(-1),
        })
        .map_err(kafka_error)?;
    let remaining = Remaining::new();
    let checkpoint = read_checkpoint(db)?;
    let start = checkpoint.map_or(Offset::Beginning, Offset::Offset);
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(request.changelog_topic, request.partition, start)
        .map_err(kafka_error)?;
    consumer.assign(&assignment).map_err(kafka_error)?;

    let _bulk_load = BulkLoad::start(db);
    let mut report = RestoreReport {
        start_offset: checkpoint,
        next_offset: checkpoint,
        ..RestoreReport::default()
    };
    // A store that starts empty (a new pod, a wiped disk) holds only what
    // this restore writes: its stale check needs no RocksDB reads.
    let starts_empty = db.iterator(rocksdb::IteratorMode::Start).next().is_none();
    let mut restorer = Restorer {
        db,
        request,
        batch: WriteBatch::default(),
        batched: 0,
        versions: HashMap::new(),
        versions_complete: starts_empty,
        counters: RestoreCounters::new(),
    };
    loop {
        if request.cancel.load(Ordering::Relaxed) {
            return Err(RestoreError::Cancelled);
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {
                remaining.update(consumer.context(), report.next_offset);
                continue;
            }
            Some(Ok(message)) => {
                report.read += 1;
                report.next_offset = Some(message.offset() + 1);
                if report.read.is_multiple_of(REMAINING_EVERY) {
                    remaining.update(consumer.context(), report.next_offset);
                }
                restorer.apply(&message, &mut report)?;
                if restorer.batched >= RESTORE_BATCH {
                    restorer.flush(report.next_offset)?;
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(err)) => {
                // Transport errors are retried by librdkafka; say so and wait.
                tracing::warn!(cause = %err, topic = request.changelog_topic, "changelog read error; still restoring");
            }
        }
    }
    restorer.flush(report.next_offset)?;
    // A finished restore is worth keeping: the next open starts from here.
    super::flush(db)?;
    report.elapsed = started.elapsed();
    METRICS
        .restore_seconds
        .observe(report.elapsed.as_secs_f64());
    Ok(report)
}

/// While a restore writes, RocksDB does not compact (Kafka Streams' bulk-load
/// mode): the many versions of a key in the changelog are compacted once,
/// after, rather than rewritten level by level while they arrive. Compactions
/// come back on however the restore ends.
struct BulkLoad<'a>(&'a DB);

impl<'a> BulkLoad<'a> {
    fn start(db: &'a DB) -> BulkLoad<'a> {
        if let Err(err) = db.set_options(&[("disable_auto_compactions", "true")]) {
            tracing::debug!(cause = %err, "restore: compactions stay on");
        }
        BulkLoad(db)
    }
}

impl Drop for BulkLoad<'_> {
    fn drop(&mut self) {
        if let Err(err) = self.0.set_options(&[("disable_auto_compactions", "false")]) {
            tracing::warn!(cause = %err, "restore: cannot turn compactions back on");
        }
    }
}

struct Restorer<'a> {
    db: &'a DB,
    request: &'a RestoreRequest<'a>,
    batch: WriteBatch,
    batched: usize,
    /// The version and timers of every key this restore has written, so
    /// the stale check and the timer index only read RocksDB for keys it
    /// has not met yet. At most [`MAX_TRACKED_VERSIONS`] after a flush:
    /// past it, it is cleared, and older keys are read back from RocksDB.
    versions: HashMap<Vec<u8>, (u64, TimerEntries)>,
    /// `versions` knows every key the store holds (it started empty and was
    /// never cleared): a key it lacks is not stored.
    versions_complete: bool,
    counters: RestoreCounters,
}

/// `baton_restore_records_total` by outcome, resolved once per restore
/// rather than per record.
struct RestoreCounters {
    applied: prometheus::IntCounter,
    stale: prometheus::IntCounter,
    uncommitted: prometheus::IntCounter,
}

impl RestoreCounters {
    fn new() -> RestoreCounters {
        let outcome = |label: &str| METRICS.restore_records.with_label_values(&[label]);
        RestoreCounters {
            applied: outcome("applied"),
            stale: outcome("skipped_stale"),
            uncommitted: outcome("skipped_uncommitted"),
        }
    }
}

/// Keys whose restored version is remembered between batches; bounds the
/// restore's memory whatever the store's size.
const MAX_TRACKED_VERSIONS: usize = 200_000;

impl Restorer<'_> {
    fn apply(
        &mut self,
        message: &BorrowedMessage<'_>,
        report: &mut RestoreReport,
    ) -> Result<(), RestoreError> {
        let Some(key) = message.key() else {
            return Ok(());
        };
        let meta = ChangelogMeta::read(message);
        // A partition's inputs are a handful of topics: a scan beats hashing
        // an owned key per record.
        let committed = meta.as_ref().and_then(|m| {
            self.request
                .committed
                .iter()
                .find(|((topic, partition), _)| {
                    topic == m.source_topic && *partition == m.source_partition
                })
                .map(|(_, next)| next)
        });
        let counts = matches!((&meta, committed), (Some(m), Some(next)) if m.source_offset < *next);
        if !counts {
            report.skipped_uncommitted += 1;
            self.counters.uncommitted.inc();
            return Ok(());
        }
        let version = meta.as_ref().map_or(0, |m| m.version);
        let current = match self.versions.get(key) {
            Some((version, timers)) => Some((*version, timers.clone())),
            None if self.versions_complete => None,
            None => self.db.get(key).map_err(StateError::from)?.map(|bytes| {
                (
                    (self.request.version_of)(&bytes).unwrap_or(0),
                    (self.request.timers_of)(&bytes),
                )
            }),
        };
        if current
            .as_ref()
            .is_some_and(|(current, _)| version < *current)
        {
            report.skipped_stale += 1;
            self.counters.stale.inc();
            return Ok(());
        }
        match message.payload() {
            Some(value) => self.batch.put(key, value),
            None => self.batch.delete(key),
        }
        // The timer index follows the record: the old value's entries go,
        // the new one's (named in its header) come.
        let timers = match message.payload() {
            Some(_) => timer_index::parse_header(meta.as_ref().and_then(|m| m.timers)),
            None => Vec::new(),
        };
        let old_timers = current.map(|(_, timers)| timers).unwrap_or_default();
        if !(old_timers.is_empty() && timers.is_empty()) {
            let family = self
                .db
                .cf_handle(TIMERS_FAMILY)
                .ok_or(StateError::MissingFamily(TIMERS_FAMILY))?;
            let context_id = String::from_utf8_lossy(key);
            for (due_at, timer_key) in &old_timers {
                self.batch.delete_cf(
                    &family,
                    timer_index::index_key(*due_at, &context_id, timer_key),
                );
            }
            for (due_at, timer_key) in &timers {
                self.batch.put_cf(
                    &family,
                    timer_index::index_key(*due_at, &context_id, timer_key),
                    [],
                );
            }
        }
        self.versions.insert(key.to_vec(), (version, timers));
        self.batched += 1;
        report.applied += 1;
        self.counters.applied.inc();
        Ok(())
    }

    fn flush(&mut self, next_offset: Option<i64>) -> Result<(), RestoreError> {
        let mut batch = std::mem::take(&mut self.batch);
        if let Some(offset) = next_offset {
            let meta = self
                .db
                .cf_handle(META_FAMILY)
                .ok_or(StateError::MissingFamily(META_FAMILY))?;
            batch.put_cf(&meta, CHECKPOINT_KEY, offset.to_be_bytes());
        }
        // No write-ahead log, as for every store write (see `state`): the
        // checkpoint travels in the same batch, so a crash leaves an older
        // checkpoint with matching data. The restore's end flushes.
        let mut options = rocksdb::WriteOptions::default();
        options.disable_wal(true);
        self.db
            .write_opt(batch, &options)
            .map_err(StateError::from)?;
        // `versions` is kept: a key restored once never needs its stored value
        // read and decoded again, until it holds too many.
        if self.versions.len() > MAX_TRACKED_VERSIONS {
            self.versions.clear();
            self.versions_complete = false;
        }
        self.batched = 0;
        Ok(())
    }
}

/// The provenance headers of a changelog record, borrowed from it.
struct ChangelogMeta<'a> {
    source_topic: &'a str,
    source_partition: i32,
    source_offset: i64,
    version: u64,
    timers: Option<&'a [u8]>,
}

impl<'a> ChangelogMeta<'a> {
    fn read(message: &'a BorrowedMessage<'_>) -> Option<ChangelogMeta<'a>> {
        let headers = message.headers()?;
        let mut topic = None;
        let mut partition = None;
        let mut offset = None;
        let mut version = None;
        let mut timers = None;
        for header in headers.iter() {
            if header.key == TIMERS_HEADER {
                timers = header.value;
                continue;
            }
            let value = header.value.and_then(|v| std::str::from_utf8(v).ok());
            match header.key {
                headers::SOURCE_TOPIC => topic = value,
                headers::SOURCE_PARTITION => partition = value.and_then(|v| v.parse().ok()),
                headers::SOURCE_OFFSET => offset = value.and_then(|v| v.parse().ok()),
                headers::STATE_VERSION => version = value.and_then(|v| v.parse().ok()),
                _ => {}
            }
        }
        Some(ChangelogMeta {
            source_topic: topic?,
            source_partition: partition?,
            source_offset: offset?,
            version: version.unwrap_or(0),
            timers,
        })
    }
}

/// The restore consumer's context: reaching the end of the changelog is the
/// goal, not an error worth a log line.
struct RestoreContext {
    /// The changelog partition's high watermark from the last fetch
    /// (librdkafka's statistics; -1 until one is seen).
    high_watermark: AtomicI64,
}

impl ClientContext for RestoreContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let high = statistics
            .topics
            .values()
            .flat_map(|topic| topic.partitions.values())
            .map(|partition| partition.hi_offset)
            .max()
            .unwrap_or(-1);
        if high >= 0 {
            self.high_watermark.store(high, Ordering::Relaxed);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if !crate::kafka::is_partition_eof(&error) {
            tracing::warn!(cause = %error, reason, "changelog reader error");
        }
    }
}

impl ConsumerContext for RestoreContext {}

/// How many changelog records a restore reads between updates of its
/// records-remaining gauge.
const REMAINING_EVERY: u64 = 1_000;

/// One restoring partition's share of `baton_state_restore_records_remaining`
/// (a pod-wide sum, so the series exists while nothing restores); the
/// share goes when the restore ends, however it ends.
struct Remaining {
    share: std::cell::Cell<i64>,
}

impl Remaining {
    fn new() -> Remaining {
        Remaining {
            share: std::cell::Cell::new(0),
        }
    }

    fn update(&self, context: &RestoreContext, next_offset: Option<i64>) {
        let high = context.high_watermark.load(Ordering::Relaxed);
        if high >= 0 {
            let now = (high - next_offset.unwrap_or(0)).max(0);
            crate::metrics::OPS
                .restore_records_remaining
                .add(now - self.share.replace(now));
        }
    }
}

impl Drop for Remaining {
    fn drop(&mut self) {
        crate::metrics::OPS
            .restore_records_remaining
            .sub(self.share.get());
    }
}

/// A cancellation flag shared between a task and its blocking restore.
pub fn cancel_flag() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}
