//! Local state: one RocksDB instance per store and partition, backed by a
//! compacted changelog topic.
//!
//! Writes made inside a transaction live in an in-memory overlay that reads
//! see; RocksDB is written only after Kafka has committed, so local state
//! never runs ahead of the committed input offsets. A checkpoint records the
//! changelog offset the local copy has applied, so a restore only reads the
//! tail.
//!
//! Like Kafka Streams, the stores write no RocksDB write-ahead log: the
//! changelog is the log. Each batch carries its data and checkpoint together,
//! and with atomic flush every column family reaches disk at the same
//! sequence number, so what survives a crash is always a prefix of the
//! committed batches with a checkpoint that matches it; the restore replays
//! the rest of the changelog (at most the unflushed memtables).

pub mod record;
pub mod restore;
pub mod timer_index;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rdkafka::message::{Header, OwnedHeaders};
use rocksdb::{ColumnFamilyDescriptor, DB, Options, WriteBatch};
use thiserror::Error;

use crate::event::SourceCoordinates;
use crate::metrics::StoreFamily;
use crate::workflow::timers::Timer;
use timer_index::{DueTimer, TIMERS_FAMILY};

/// Header names on changelog records.
pub mod headers {
    pub use crate::dlq::headers::{SOURCE_OFFSET, SOURCE_PARTITION, SOURCE_TOPIC};
    /// The version of the state the record holds; restore never lets an
    /// older version overwrite a newer one.
    pub const STATE_VERSION: &str = "baton.state.version";
}

const META_FAMILY: &str = "meta";
const CHECKPOINT_KEY: &[u8] = b"changelog.next_offset";

#[derive(Debug, Error)]
pub enum StateError {
    #[error("cannot open the state store at {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error("cannot create the state directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state store I/O failed: {0}")]
    Io(#[from] rocksdb::Error),
    #[error("the state store's column family `{0}` is missing")]
    MissingFamily(&'static str),
    #[error("the blocking state task failed: {0}")]
    Join(String),
    /// Only under the test fault switch (see [`faults`]).
    #[error("state write failed: injected by {0} (BATON_TEST_FAULTS_DIR, test only)")]
    InjectedFault(PathBuf),
}

/// A fault switch for integration tests, never for production: when the
/// environment variable `BATON_TEST_FAULTS_DIR` is set (it is read once),
/// every [`PartitionStore::commit`] fails with an I/O-like error while the
/// file `{dir}/fail-state-writes` exists. A test flips it mid-run to make a
/// running pod's RocksDB writes fail, deterministically. Unset, it costs
/// one initialised `OnceLock` read per commit.
pub mod faults {
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;

    /// The variable that names the fault directory.
    pub const DIR_VAR: &str = "BATON_TEST_FAULTS_DIR";
    /// While this file exists in the fault directory, state writes fail.
    pub const FAIL_STATE_WRITES: &str = "fail-state-writes";

    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();

    /// The switch file, when state writes must fail now.
    pub fn failing_state_writes() -> Option<PathBuf> {
        let dir: &Path = DIR
            .get_or_init(|| std::env::var_os(DIR_VAR).map(PathBuf::from))
            .as_deref()?;
        let switch = dir.join(FAIL_STATE_WRITES);
        switch.exists().then_some(switch)
    }
}

/// The name of a store's changelog topic.
pub fn changelog_topic(application_id: &str, store: &str) -> String {
    format!("{application_id}-{store}-changelog")
}

/// Where a store's partition lives on disk.
pub fn store_path(state_dir: &Path, application_id: &str, store: &str, partition: i32) -> PathBuf {
    state_dir
        .join(application_id)
        .join(format!("{store}-{partition}"))
}

/// What [`OpenStores::scan`] read: records in key order, and, when a
/// partition stopped at its share of the budget, the smallest key where one
/// did (records past it may be missing; a next page starts there).
#[derive(Debug, Default)]
pub struct Scan {
    pub records: Vec<(i32, String, Vec<u8>)>,
    pub scanned_to: Option<String>,
}

/// The store partitions open in this pod, so the HTTP surface can read
/// committed state without going through a task.
#[derive(Default)]
pub struct OpenStores {
    stores: std::sync::RwLock<std::collections::BTreeMap<i32, Arc<DB>>>,
}

impl OpenStores {
    pub fn register(&self, partition: i32, db: Arc<DB>) {
        self.write().insert(partition, db);
    }

    pub fn unregister(&self, partition: i32) {
        self.write().remove(&partition);
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, std::collections::BTreeMap<i32, Arc<DB>>> {
        self.stores
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Timers in every open partition's index (RocksDB's estimates).
    pub fn pending_timers(&self) -> u64 {
        let stores = match self.stores.read() {
            Ok(stores) => stores,
            Err(poisoned) => poisoned.into_inner(),
        };
        stores
            .values()
            .filter_map(|db| {
                let family = db.cf_handle(TIMERS_FAMILY)?;
                db.property_int_value_cf(&family, "rocksdb.estimate-num-keys")
                    .ok()
                    .flatten()
            })
            .sum()
    }

    /// RocksDB's estimates of keys and bytes in every open partition, per
    /// store (column family): the contexts and the timer index.
    pub fn estimates(&self) -> Vec<(StoreFamily, u64, u64)> {
        let stores = match self.stores.read() {
            Ok(stores) => stores,
            Err(poisoned) => poisoned.into_inner(),
        };
        StoreFamily::ALL
            .into_iter()
            .map(|store| {
                let family_name = match store {
                    StoreFamily::Contexts => rocksdb::DEFAULT_COLUMN_FAMILY_NAME,
                    StoreFamily::Timers => TIMERS_FAMILY,
                };
                let (mut keys, mut bytes) = (0, 0);
                for db in stores.values() {
                    let Some(family) = db.cf_handle(family_name) else {
                        continue;
                    };
                    let property = |name: &str| {
                        db.property_int_value_cf(&family, name)
                            .ok()
                            .flatten()
                            .unwrap_or(0)
                    };
                    keys += property("rocksdb.estimate-num-keys");
                    bytes += property("rocksdb.estimate-live-data-size")
                        + property("rocksdb.cur-size-all-mem-tables");
                }
                (store, keys, bytes)
            })
            .collect()
    }

    /// Committed records after `after` (exclusive), in key order, across
    /// every open partition, reading at most `budget` records in all.
    pub fn scan(&self, after: Option<&str>, budget: usize) -> Result<Scan, StateError> {
        let stores: Vec<(i32, Arc<DB>)> = {
            let stores = match self.stores.read() {
                Ok(stores) => stores,
                Err(poisoned) => poisoned.into_inner(),
            };
            stores.iter().map(|(p, db)| (*p, Arc::clone(db))).collect()
        };
        let per_partition = (budget / stores.len().max(1)).max(1);
        let mut scan = Scan::default();
        for (partition, db) in stores {
            let start = after.map(str::as_bytes).unwrap_or_default();
            let mode = rocksdb::IteratorMode::From(start, rocksdb::Direction::Forward);
            let mut taken = 0;
            let mut last: Option<String> = None;
            let mut exhausted = true;
            for item in db.iterator(mode) {
                let (key, value) = item?;
                if after.is_some_and(|after| key.as_ref() == after.as_bytes()) {
                    continue;
                }
                if taken == per_partition {
                    exhausted = false;
                    break;
                }
                let key = String::from_utf8_lossy(&key).into_owned();
                last = Some(key.clone());
                scan.records.push((partition, key, value.to_vec()));
                taken += 1;
            }
            if !exhausted && let Some(last) = last {
                scan.scanned_to = Some(match scan.scanned_to.take() {
                    Some(earlier) if earlier < last => earlier,
                    _ => last,
                });
            }
        }
        scan.records.sort_by(|a, b| a.1.cmp(&b.1));
        Ok(scan)
    }

    /// The committed value of `key` in whichever open partition holds it.
    pub fn get(&self, key: &str) -> Result<Option<(i32, Vec<u8>)>, StateError> {
        let stores = self
            .stores
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (partition, db) in stores.iter() {
            if let Some(value) = db.get(key.as_bytes())? {
                return Ok(Some((*partition, value)));
            }
        }
        Ok(None)
    }
}

/// Looks `key` up in a state directory offline, read-only, across every
/// partition of `store`. For `baton state get` on a stopped pod (after a
/// crash, the copy on disk may be behind the changelog until a restart
/// restores it).
pub fn get_offline(
    state_dir: &Path,
    application_id: &str,
    store: &str,
    key: &str,
) -> Result<Option<(i32, Vec<u8>)>, StateError> {
    let dir = state_dir.join(application_id);
    let entries = std::fs::read_dir(&dir).map_err(|source| StateError::CreateDir {
        path: dir.clone(),
        source,
    })?;
    let prefix = format!("{store}-");
    let mut partitions: Vec<(i32, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let partition = name.strip_prefix(&prefix)?.parse().ok()?;
            Some((partition, entry.path()))
        })
        .collect();
    partitions.sort();
    for (partition, path) in partitions {
        let families = [rocksdb::DEFAULT_COLUMN_FAMILY_NAME, META_FAMILY];
        let db = DB::open_cf_for_read_only(&Options::default(), &path, families, false).map_err(
            |source| StateError::Open {
                path: path.clone(),
                source,
            },
        )?;
        if let Some(value) = db.get(key.as_bytes())? {
            return Ok(Some((partition, value)));
        }
    }
    Ok(None)
}

/// The default of `--state-memory-bytes`.
pub const DEFAULT_STATE_MEMORY_BYTES: usize = 128 * 1024 * 1024;

/// Memory every partition store of a pod shares, as Kafka Streams'
/// `BoundedMemoryRocksDBConfig` does: one LRU block cache, and a write
/// buffer manager that charges every memtable to that same cache (half of it
/// at most), so RocksDB's memory is one budget however many partitions and
/// contexts the pod holds. Past it, memtables are flushed early and cold
/// blocks are evicted; nothing is refused.
#[derive(Clone)]
pub struct StoreMemory {
    cache: rocksdb::Cache,
    write_buffers: rocksdb::WriteBufferManager,
}

impl StoreMemory {
    pub fn new(bytes: usize) -> StoreMemory {
        let cache = rocksdb::Cache::new_lru_cache(bytes);
        let write_buffers = rocksdb::WriteBufferManager::new_write_buffer_manager_with_cache(
            bytes / 2,
            false,
            cache.clone(),
        );
        StoreMemory {
            cache,
            write_buffers,
        }
    }

    /// Bytes the cache holds now, memtables included.
    pub fn usage(&self) -> usize {
        self.cache.get_usage()
    }
}

/// One store partition: RocksDB plus the uncommitted overlay.
pub struct PartitionStore {
    db: Arc<DB>,
    /// Writes of the open transaction: `None` is a delete.
    overlay: HashMap<String, Option<Vec<u8>>>,
    /// Timer index changes of the open transaction: `true` adds the entry,
    /// `false` removes it.
    timer_overlay: BTreeMap<Vec<u8>, bool>,
}

/// A value written inside the open transaction, and the changelog record
/// that makes it durable.
pub struct ChangelogWrite {
    pub key: String,
    pub value: Option<Vec<u8>>,
    pub headers: OwnedHeaders,
}

impl PartitionStore {
    /// Opens (or creates) the store. Blocking: call from a blocking thread.
    pub fn open(path: &Path, memory: &StoreMemory) -> Result<PartitionStore, StateError> {
        std::fs::create_dir_all(path).map_err(|source| StateError::CreateDir {
            path: path.to_path_buf(),
            source,
        })?;
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_compression_type(rocksdb::DBCompressionType::Lz4);
        // Data and checkpoint families persist together (see the module docs).
        options.set_atomic_flush(true);
        options.set_write_buffer_manager(&memory.write_buffers);
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(&memory.cache);
        let mut data = Options::default();
        data.set_compression_type(rocksdb::DBCompressionType::Lz4);
        data.set_block_based_table_factory(&table);
        // Smaller memtables than the default 64 MiB: many partitions share
        // the budget, and each flush stays short.
        data.set_write_buffer_size(8 * 1024 * 1024);
        let mut meta = Options::default();
        meta.set_block_based_table_factory(&table);
        meta.set_write_buffer_size(1024 * 1024);
        let mut timers = Options::default();
        timers.set_block_based_table_factory(&table);
        timers.set_write_buffer_size(2 * 1024 * 1024);
        let families = vec![
            ColumnFamilyDescriptor::new(rocksdb::DEFAULT_COLUMN_FAMILY_NAME, data),
            ColumnFamilyDescriptor::new(META_FAMILY, meta),
            ColumnFamilyDescriptor::new(TIMERS_FAMILY, timers),
        ];
        let db = DB::open_cf_descriptors(&options, path, families).map_err(|source| {
            StateError::Open {
                path: path.to_path_buf(),
                source,
            }
        })?;
        Ok(PartitionStore {
            db: Arc::new(db),
            overlay: HashMap::new(),
            timer_overlay: BTreeMap::new(),
        })
    }

    /// Reads a value, seeing the open transaction's own writes first. Point
    /// reads hit the memtable or block cache and take microseconds.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        if let Some(value) = self.overlay.get(key) {
            return Ok(value.clone());
        }
        Ok(self.db.get(key.as_bytes())?)
    }

    /// Records a write in the open transaction and returns the changelog
    /// record that must be produced in the same transaction.
    pub fn put(
        &mut self,
        key: &str,
        value: Vec<u8>,
        version: u64,
        source: &SourceCoordinates,
    ) -> ChangelogWrite {
        self.overlay.insert(key.to_string(), Some(value.clone()));
        ChangelogWrite {
            key: key.to_string(),
            value: Some(value),
            headers: changelog_headers(source, version),
        }
    }

    /// Records a delete in the open transaction and returns its tombstone.
    pub fn delete(
        &mut self,
        key: &str,
        version: u64,
        source: &SourceCoordinates,
    ) -> ChangelogWrite {
        self.overlay.insert(key.to_string(), None);
        ChangelogWrite {
            key: key.to_string(),
            value: None,
            headers: changelog_headers(source, version),
        }
    }

    /// Records a write (`None`: a delete) in the open transaction; its
    /// changelog record is the caller's to produce in the same transaction.
    pub fn stage(&mut self, key: &str, value: Option<Vec<u8>>) {
        self.overlay.insert(key.to_string(), value);
    }

    /// Records timer index changes of `context_id` in the open transaction.
    pub fn stage_timers(&mut self, context_id: &str, set: &[Timer], deleted: &[Timer]) {
        for timer in deleted {
            self.timer_overlay
                .insert(timer_index::key_of(context_id, timer), false);
        }
        for timer in set {
            self.timer_overlay
                .insert(timer_index::key_of(context_id, timer), true);
        }
    }

    /// Removes an index entry whose context no longer holds its timer.
    pub fn drop_timer_entry(&mut self, due: &DueTimer) {
        self.timer_overlay.insert(
            timer_index::index_key(due.due_at, &due.context_id, &due.timer_key),
            false,
        );
    }

    /// The timers due at or before `now_ms`, earliest first, at most
    /// `limit`, seeing the open transaction's own changes.
    pub fn due_timers(&self, now_ms: i64, limit: usize) -> Result<Vec<DueTimer>, StateError> {
        let family = self
            .db
            .cf_handle(TIMERS_FAMILY)
            .ok_or(StateError::MissingFamily(TIMERS_FAMILY))?;
        let bound = timer_index::upper_bound(now_ms);
        let mut keys: Vec<Vec<u8>> = Vec::new();
        for item in self.db.iterator_cf(&family, rocksdb::IteratorMode::Start) {
            let (key, _) = item?;
            if key.as_ref() >= bound.as_slice() || keys.len() >= limit {
                break;
            }
            if self.timer_overlay.get(key.as_ref()) != Some(&false) {
                keys.push(key.to_vec());
            }
        }
        keys.extend(
            self.timer_overlay
                .range(..bound)
                .filter(|(_, added)| **added)
                .map(|(key, _)| key.clone()),
        );
        keys.sort_unstable();
        keys.dedup();
        keys.truncate(limit);
        Ok(keys
            .iter()
            .filter_map(|key| timer_index::parse_key(key))
            .collect())
    }

    /// How many timers the index holds (RocksDB's estimate; cheap).
    pub fn pending_timers(&self) -> u64 {
        self.db
            .cf_handle(TIMERS_FAMILY)
            .and_then(|family| {
                self.db
                    .property_int_value_cf(&family, "rocksdb.estimate-num-keys")
                    .ok()
                    .flatten()
            })
            .unwrap_or(0)
    }

    /// Forgets the open transaction's writes.
    pub fn abort(&mut self) {
        self.overlay.clear();
        self.timer_overlay.clear();
    }

    /// Makes the committed transaction's writes durable together with the
    /// new checkpoint, atomically. Runs on the blocking pool.
    pub async fn commit(&mut self, checkpoint: Option<i64>) -> Result<(), StateError> {
        if self.overlay.is_empty() && self.timer_overlay.is_empty() && checkpoint.is_none() {
            return Ok(());
        }
        if let Some(switch) = faults::failing_state_writes() {
            self.overlay.clear();
            self.timer_overlay.clear();
            return Err(StateError::InjectedFault(switch));
        }
        let overlay = std::mem::take(&mut self.overlay);
        let timers = std::mem::take(&mut self.timer_overlay);
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || write_batch(&db, overlay, timers, checkpoint))
            .await
            .map_err(|err| StateError::Join(err.to_string()))?
    }

    pub fn checkpoint(&self) -> Result<Option<i64>, StateError> {
        read_checkpoint(&self.db)
    }

    pub fn db(&self) -> &Arc<DB> {
        &self.db
    }
}

fn write_batch(
    db: &DB,
    overlay: HashMap<String, Option<Vec<u8>>>,
    timers: BTreeMap<Vec<u8>, bool>,
    checkpoint: Option<i64>,
) -> Result<(), StateError> {
    // Sized up front: a batch that grows by doubling copies every value again.
    let bytes: usize = overlay
        .iter()
        .map(|(key, value)| key.len() + value.as_ref().map_or(0, Vec::len) + 24)
        .sum();
    let mut batch = WriteBatch::with_capacity_bytes(bytes + 64);
    for (key, value) in overlay {
        match value {
            Some(value) => batch.put(key.as_bytes(), value),
            None => batch.delete(key.as_bytes()),
        }
    }
    if !timers.is_empty() {
        let family = db
            .cf_handle(TIMERS_FAMILY)
            .ok_or(StateError::MissingFamily(TIMERS_FAMILY))?;
        for (key, added) in timers {
            if added {
                batch.put_cf(&family, key, []);
            } else {
                batch.delete_cf(&family, key);
            }
        }
    }
    if let Some(offset) = checkpoint {
        let meta = db
            .cf_handle(META_FAMILY)
            .ok_or(StateError::MissingFamily(META_FAMILY))?;
        batch.put_cf(&meta, CHECKPOINT_KEY, offset.to_be_bytes());
    }
    let mut options = rocksdb::WriteOptions::default();
    options.disable_wal(true);
    db.write_opt(batch, &options)?;
    Ok(())
}

/// Writes every memtable of the store to disk, all families at one sequence
/// number. Blocking.
/// Contexts per (workflow, state).
pub type WorkflowCounts = HashMap<(String, String), i64>;

/// Contexts per (workflow, state) in a partition's committed store, read
/// once when the partition opens; the workflow gauges start from it. Records
/// without a workflow (memory only) or that do not decode are not counted
/// (the second kind is returned, for the log).
pub fn count_workflows(db: &DB) -> Result<(WorkflowCounts, u64), StateError> {
    let mut counts = WorkflowCounts::new();
    let mut unreadable = 0;
    for item in db.iterator(rocksdb::IteratorMode::Start) {
        let (_, value) = item?;
        match record::workflow_and_state(&value) {
            Some(key) => *counts.entry(key).or_default() += 1,
            None if record::decode_workflow(&value).is_err() => unreadable += 1,
            None => {}
        }
    }
    Ok((counts, unreadable))
}

pub(crate) fn flush(db: &DB) -> Result<(), StateError> {
    let meta = db
        .cf_handle(META_FAMILY)
        .ok_or(StateError::MissingFamily(META_FAMILY))?;
    let data =
        db.cf_handle(rocksdb::DEFAULT_COLUMN_FAMILY_NAME)
            .ok_or(StateError::MissingFamily(
                rocksdb::DEFAULT_COLUMN_FAMILY_NAME,
            ))?;
    let timers = db
        .cf_handle(TIMERS_FAMILY)
        .ok_or(StateError::MissingFamily(TIMERS_FAMILY))?;
    db.flush_cfs_opt(&[&data, &meta, &timers], &rocksdb::FlushOptions::default())?;
    Ok(())
}

pub(crate) fn read_checkpoint(db: &DB) -> Result<Option<i64>, StateError> {
    let meta = db
        .cf_handle(META_FAMILY)
        .ok_or(StateError::MissingFamily(META_FAMILY))?;
    Ok(db.get_cf(&meta, CHECKPOINT_KEY)?.and_then(|bytes| {
        let array: [u8; 8] = bytes.as_slice().try_into().ok()?;
        Some(i64::from_be_bytes(array))
    }))
}

/// The provenance headers every changelog record carries.
/// The changelog headers of a context record holding `timers`: the
/// provenance and version headers, and the timers for the restore's index.
pub fn context_changelog_headers(
    source: &SourceCoordinates,
    version: u64,
    timers: &[Timer],
) -> OwnedHeaders {
    let headers = changelog_headers(source, version);
    match timer_index::header_value(timers) {
        Some(value) => headers.insert(Header {
            key: timer_index::TIMERS_HEADER,
            value: Some(value.as_str()),
        }),
        None => headers,
    }
}

pub fn changelog_headers(source: &SourceCoordinates, version: u64) -> OwnedHeaders {
    let partition = source.partition.to_string();
    let offset = source.offset.to_string();
    let version = version.to_string();
    OwnedHeaders::new_with_capacity(4)
        .insert(Header {
            key: headers::SOURCE_TOPIC,
            value: Some(source.topic.as_str()),
        })
        .insert(Header {
            key: headers::SOURCE_PARTITION,
            value: Some(partition.as_str()),
        })
        .insert(Header {
            key: headers::SOURCE_OFFSET,
            value: Some(offset.as_str()),
        })
        .insert(Header {
            key: headers::STATE_VERSION,
            value: Some(version.as_str()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(offset: i64) -> SourceCoordinates {
        SourceCoordinates {
            topic: "mcp.events.all".into(),
            partition: 0,
            offset,
        }
    }

    #[tokio::test]
    async fn reads_see_uncommitted_writes_and_abort_forgets_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let memory = StoreMemory::new(DEFAULT_STATE_MEMORY_BYTES);
        let mut store = PartitionStore::open(dir.path(), &memory).expect("open");
        store.put("c-1", b"one".to_vec(), 1, &source(0));
        assert_eq!(store.get("c-1").expect("get"), Some(b"one".to_vec()));
        store.abort();
        assert_eq!(store.get("c-1").expect("get"), None);

        store.put("c-1", b"two".to_vec(), 2, &source(1));
        store.commit(Some(42)).await.expect("commit");
        assert_eq!(store.get("c-1").expect("get"), Some(b"two".to_vec()));
        assert_eq!(store.checkpoint().expect("checkpoint"), Some(42));
        drop(store);

        let reopened = PartitionStore::open(dir.path(), &memory).expect("reopen");
        assert_eq!(reopened.get("c-1").expect("get"), Some(b"two".to_vec()));
        assert_eq!(reopened.checkpoint().expect("checkpoint"), Some(42));
    }

    #[test]
    fn paths_and_topics_are_per_store_and_partition() {
        assert_eq!(
            changelog_topic("baton", "workflow"),
            "baton-workflow-changelog"
        );
        assert_eq!(
            store_path(Path::new("/var/lib/baton"), "baton", "workflow", 3),
            PathBuf::from("/var/lib/baton/baton/workflow-3")
        );
    }
}
