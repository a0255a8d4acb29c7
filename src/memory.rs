//! The memory of one context: its recent tool outputs and the entries agents
//! write through `memory.upserted` records, frozen into an immutable numbered
//! [`Snapshot`] at every handover and rendered into prompt-ready JSON.
//!
//! Like [`crate::workflow`], nothing here does I/O or reads a clock: the shell
//! passes in record timestamps and writes out whatever these functions return,
//! so a replay from the changelog rebuilds the same memory.

use std::collections::VecDeque;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use crate::workflow::estimate_tokens;

/// The encoding version [`Memory::encode`] writes. Bump it when a field
/// changes meaning, and teach the decoder the old layout: memory outlives
/// deployments in RocksDB and the changelog. Version 2 holds its snapshots
/// (as [`Frozen`] versions and retired items) instead of copies.
pub const MEMORY_ENCODING_VERSION: u64 = 2;

/// The encoding version [`Snapshot::encode`] writes.
pub const SNAPSHOT_ENCODING_VERSION: u64 = 1;

/// Recent tool outputs a context keeps. The next agent mostly needs the last
/// few results; older ones are in the snapshots that carried them.
pub const MAX_TOOL_OUTPUTS: usize = 8;

/// Memory entries a context keeps. Bounds the stored value and the work of
/// every render, whatever agents upsert.
pub const MAX_ENTRIES: usize = 256;

/// The longest `content` one upsert may carry, in bytes.
pub const MAX_CONTENT_BYTES: usize = 16 * 1024;

/// The only `event` a memory record may name.
pub const MEMORY_UPSERTED: &str = "memory.upserted";

/// What a memory entry is, as agents classify it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryKind {
    Preference,
    Fact,
    Context,
    Instruction,
}

impl MemoryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryKind::Preference => "preference",
            MemoryKind::Fact => "fact",
            MemoryKind::Context => "context",
            MemoryKind::Instruction => "instruction",
        }
    }

    fn parse(text: &str) -> Option<MemoryKind> {
        match text {
            "preference" => Some(MemoryKind::Preference),
            "fact" => Some(MemoryKind::Fact),
            "context" => Some(MemoryKind::Context),
            "instruction" => Some(MemoryKind::Instruction),
            _ => None,
        }
    }
}

/// One `memory.upserted` record from the memory topic (default `mcp.memory`),
/// keyed by `context_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryUpsert {
    pub context_id: String,
    pub kind: MemoryKind,
    pub content: String,
    /// In `0..=1`.
    pub importance: f64,
    /// Entries with the same key replace each other; `None` always adds.
    pub key: Option<String>,
}

/// Decodes a `memory.upserted` record:
/// `{"event":"memory.upserted","context_id":"c","type":"fact","content":"...","importance":0.8,"key":"k"}`.
/// `context_id` may be spelled `conversationId` (or `contextId`), as in tool
/// events; `event` may be absent; `key` may be absent, `null` or empty for none.
/// The error names the offending field.
pub fn decode_upsert(bytes: &[u8]) -> Result<MemoryUpsert, String> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|err| format!("memory record is not valid JSON: {err}"))?;
    let Value::Object(fields) = value else {
        return Err(format!(
            "memory record is not a JSON object: {}",
            preview(&value)
        ));
    };
    match fields.get("event") {
        None | Some(Value::Null) => {}
        Some(Value::String(event)) if event == MEMORY_UPSERTED => {}
        Some(other) => {
            return Err(format!(
                "`event` is {}, not \"{MEMORY_UPSERTED}\"",
                preview(other)
            ));
        }
    }
    let context_id = decode_context_id(&fields)?;
    let kind = match fields.get("type") {
        None | Some(Value::Null) => return Err("`type` is missing".into()),
        Some(Value::String(text)) => MemoryKind::parse(text).ok_or_else(|| {
            format!(
                "unknown `type` {}: expected preference, fact, context or instruction",
                preview(&Value::String(text.clone()))
            )
        })?,
        Some(other) => return Err(format!("`type` must be a string, got {}", preview(other))),
    };
    let content = match fields.get("content") {
        None | Some(Value::Null) => return Err("`content` is missing".into()),
        Some(Value::String(content)) if content.len() > MAX_CONTENT_BYTES => {
            return Err(format!(
                "`content` is {} bytes; at most {MAX_CONTENT_BYTES} are accepted",
                content.len()
            ));
        }
        Some(Value::String(content)) => content.clone(),
        Some(other) => {
            return Err(format!(
                "`content` must be a string, got {}",
                preview(other)
            ));
        }
    };
    let importance = match fields.get("importance") {
        None | Some(Value::Null) => return Err("`importance` is missing".into()),
        Some(Value::Number(number)) => match number.as_f64() {
            // `contains` is false for NaN, so NaN is rejected here too.
            Some(importance) if (0.0..=1.0).contains(&importance) => importance,
            _ => return Err(format!("`importance` must be in 0..=1, got {number}")),
        },
        Some(other) => {
            return Err(format!(
                "`importance` must be a number in 0..=1, got {}",
                preview(other)
            ));
        }
    };
    let key = match fields.get("key") {
        None | Some(Value::Null) => None,
        Some(Value::String(key)) if key.is_empty() => None,
        Some(Value::String(key)) => Some(key.clone()),
        Some(other) => return Err(format!("`key` must be a string, got {}", preview(other))),
    };
    Ok(MemoryUpsert {
        context_id,
        kind,
        content,
        importance,
        key,
    })
}

fn decode_context_id(fields: &Map<String, Value>) -> Result<String, String> {
    let spelled = ["context_id", "conversationId", "contextId"]
        .into_iter()
        .find_map(|name| fields.get(name).map(|value| (name, value)));
    match spelled {
        None | Some((_, Value::Null)) => {
            Err("`context_id` (or `conversationId`) is missing".into())
        }
        Some((name, Value::String(id))) if id.is_empty() => Err(format!("`{name}` is empty")),
        Some((_, Value::String(id))) => Ok(id.clone()),
        Some((name, other)) => Err(format!("`{name}` must be a string, got {}", preview(other))),
    }
}

/// A value short enough to quote in an error: records come from outside and
/// a reason must not grow with them.
pub(crate) fn preview(value: &Value) -> String {
    const LIMIT: usize = 64;
    let text = value.to_string();
    if text.len() <= LIMIT {
        return text;
    }
    let mut end = LIMIT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// One remembered item of a context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryEntry {
    pub key: Option<String>,
    pub kind: MemoryKind,
    pub content: String,
    pub importance: f64,
    /// Recency: larger is newer. Taken from [`Memory::next_seq`] on every
    /// write, so a replaced entry counts as new.
    pub seq: u64,
    /// Milliseconds since the epoch of the record that last wrote it.
    pub at: i64,
    /// The [`Memory::version`] this entry became live at; the snapshots
    /// frozen from then on hold it. 0 in a frozen [`Snapshot`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub since: u64,
}

/// A JSON value kept as its text. A tool output is serialized once, when it
/// is recorded, and copied verbatim into every record after: the memory of
/// a context is re-encoded on every input, its tool outputs are not.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawJson(Box<RawValue>);

impl RawJson {
    pub fn from_value(value: &Value) -> RawJson {
        // A `Value` always serializes (its keys are strings); `null` is
        // only a formality for the type.
        RawJson(
            serde_json::value::to_raw_value(value).unwrap_or_else(|_| RawValue::NULL.to_owned()),
        )
    }

    /// The value, parsed (for a render or a handover built from memory).
    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.0.get()).unwrap_or(Value::Null)
    }

    pub fn get(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &RawJson) -> bool {
        self.0.get() == other.0.get()
    }
}

impl Eq for RawJson {}

/// The output of one tool call, as the next agent should see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolOutput {
    pub event_id: String,
    pub tool: String,
    pub output: RawJson,
    /// Milliseconds since the epoch of the event's record.
    pub at: i64,
    /// As [`MemoryEntry::since`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub since: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// A live snapshot: the memory as it was at [`Memory::version`] `as_of`.
/// Snapshots are not copies: an item that leaves the live memory while a
/// snapshot still holds it is kept in [`Memory::retired_entries`] or
/// [`Memory::retired_outputs`] until the last such snapshot is pruned, so
/// one record carries a context's memory and every snapshot it can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frozen {
    pub version: u64,
    /// Milliseconds since the epoch.
    pub frozen_at: i64,
    pub as_of: u64,
}

/// An item that left the live memory at version `until`, kept for the
/// snapshots frozen before that.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Retired<T> {
    pub until: u64,
    pub item: T,
}

/// The live memory of one context, with what its live snapshots need.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    pub context_id: String,
    pub entries: Vec<MemoryEntry>,
    /// Newest last; at most [`MAX_TOOL_OUTPUTS`].
    pub tool_outputs: VecDeque<ToolOutput>,
    pub next_seq: u64,
    /// The newest snapshot version; 0 before the first. Versions start at 1.
    pub latest_snapshot: u64,
    /// Live snapshots, oldest first.
    pub snapshots: VecDeque<Frozen>,
    /// Every version up to and including this one was pruned.
    pub pruned_through: u64,
    /// Bumped on every change, so a restore can skip changelog records older
    /// than the value it already holds; also the clock snapshots are read at.
    pub version: u64,
    /// Entries replaced or evicted while a live snapshot still holds them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired_entries: Vec<Retired<MemoryEntry>>,
    /// Tool outputs dropped while a live snapshot still holds them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired_outputs: Vec<Retired<ToolOutput>>,
}

/// Memory as encoding version 1 wrote it, next to frozen copies in their own
/// store: its snapshots' contents are not in it.
#[derive(Deserialize)]
struct MemoryV1 {
    context_id: String,
    entries: Vec<MemoryEntry>,
    tool_outputs: VecDeque<ToolOutput>,
    next_seq: u64,
    latest_snapshot: u64,
    pruned_through: u64,
    version: u64,
}

/// Whether a snapshot version can still be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotState {
    Live,
    /// It existed but was pruned: gone for good, unlike a version never frozen.
    Pruned,
    Unknown,
}

/// A frozen memory as an agent reads it, built by [`Memory::snapshot`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub context_id: String,
    pub version: u64,
    /// Milliseconds since the epoch.
    pub frozen_at: i64,
    pub entries: Vec<MemoryEntry>,
    /// Newest last, as in [`Memory::tool_outputs`].
    pub tool_outputs: Vec<ToolOutput>,
}

/// The on-disk layout: a value's fields next to a version tag `v`.
#[derive(Serialize)]
struct Envelope<'a, T> {
    v: u64,
    #[serde(flatten)]
    body: &'a T,
}

/// A writer that only counts what is written to it.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn encode_versioned<T: Serialize>(body: &T, version: u64) -> Vec<u8> {
    let envelope = Envelope { v: version, body };
    // Strings, integers, finite floats (upserts clamp importance) and JSON
    // values with string keys: serialising cannot fail.
    serde_json::to_vec(&envelope).expect("memory values serialise to JSON")
}

/// Only the version tag; serde skips the rest without building it.
#[derive(Deserialize)]
struct VersionTag {
    v: Option<u64>,
}

fn encoding_version(bytes: &[u8], what: &str) -> Result<u64, String> {
    let tag: VersionTag =
        serde_json::from_slice(bytes).map_err(|err| format!("{what} is not valid JSON: {err}"))?;
    tag.v
        .ok_or_else(|| format!("{what} carries no encoding version `v`"))
}

fn decode_as<T: DeserializeOwned>(bytes: &[u8], what: &str, version: u64) -> Result<T, String> {
    // The tag itself is ignored as an unknown field.
    serde_json::from_slice(bytes)
        .map_err(|err| format!("{what} is not valid for encoding version {version}: {err}"))
}

impl Memory {
    pub fn new(context_id: &str) -> Memory {
        Memory {
            context_id: context_id.to_owned(),
            entries: Vec::new(),
            tool_outputs: VecDeque::new(),
            next_seq: 0,
            latest_snapshot: 0,
            snapshots: VecDeque::new(),
            pruned_through: 0,
            version: 0,
            retired_entries: Vec::new(),
            retired_outputs: Vec::new(),
        }
    }

    /// An upsert with a key already held replaces that entry (kind, content,
    /// importance, and a fresh seq); one without a key or with a new key adds.
    /// Beyond [`MAX_ENTRIES`] the least important entry goes, the oldest of
    /// equals: that may be the new entry itself, when everything held matters
    /// more, because the bound keeps the most important memories, not the newest.
    pub fn upsert(&mut self, upsert: &MemoryUpsert, at: i64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.version += 1;
        let now = self.version;
        // A NaN would serialise as `null` and make the stored memory unreadable.
        let importance = if upsert.importance.is_nan() {
            0.0
        } else {
            upsert.importance.clamp(0.0, 1.0)
        };
        let held = upsert.key.as_deref().and_then(|key| {
            self.entries
                .iter()
                .position(|entry| entry.key.as_deref() == Some(key))
        });
        if let Some(index) = held {
            self.retire_entry(self.entries[index].clone());
            let entry = &mut self.entries[index];
            entry.kind = upsert.kind;
            entry.content.clone_from(&upsert.content);
            entry.importance = importance;
            entry.seq = seq;
            entry.at = at;
            entry.since = now;
            return;
        }
        self.entries.push(MemoryEntry {
            key: upsert.key.clone(),
            kind: upsert.kind,
            content: upsert.content.clone(),
            importance,
            seq,
            at,
            since: now,
        });
        while self.entries.len() > MAX_ENTRIES {
            let least = self
                .entries
                .iter()
                .enumerate()
                .min_by(|(_, a), (_, b)| {
                    a.importance
                        .total_cmp(&b.importance)
                        .then(a.seq.cmp(&b.seq))
                })
                .map(|(index, _)| index);
            if let Some(index) = least {
                let evicted = self.entries.remove(index);
                self.retire_entry(evicted);
            }
        }
    }

    /// The newest recorded tool output, if any.
    pub fn last_tool_output(&self) -> Option<Value> {
        self.tool_outputs
            .back()
            .map(|output| output.output.to_value())
    }

    /// Keeps the output, dropping the oldest beyond [`MAX_TOOL_OUTPUTS`]. An
    /// `event_id` already held is ignored, so a redelivered event changes nothing.
    pub fn record_tool_output(&mut self, mut output: ToolOutput) {
        if self
            .tool_outputs
            .iter()
            .any(|held| held.event_id == output.event_id)
        {
            return;
        }
        self.version += 1;
        output.since = self.version;
        self.tool_outputs.push_back(output);
        while self.tool_outputs.len() > MAX_TOOL_OUTPUTS {
            if let Some(dropped) = self.tool_outputs.pop_front() {
                self.retire_output(dropped);
            }
        }
    }

    /// Drops the oldest tool output (a bound on the memory's size).
    pub fn drop_oldest_tool_output(&mut self) {
        if let Some(dropped) = self.tool_outputs.pop_front() {
            self.version += 1;
            self.retire_output(dropped);
        }
    }

    /// Whether a live snapshot holds an item that was live from `since`
    /// until now.
    fn held_by_a_snapshot(&self, since: u64) -> bool {
        self.snapshots.iter().any(|frozen| frozen.as_of >= since)
    }

    /// An entry leaves the live memory at the current version.
    fn retire_entry(&mut self, entry: MemoryEntry) {
        if self.held_by_a_snapshot(entry.since) {
            self.retired_entries.push(Retired {
                until: self.version,
                item: entry,
            });
        }
    }

    fn retire_output(&mut self, output: ToolOutput) {
        if self.held_by_a_snapshot(output.since) {
            self.retired_outputs.push(Retired {
                until: self.version,
                item: output,
            });
        }
    }

    /// Freezes the memory as the next snapshot version and returns that
    /// version. Nothing is copied: see [`Frozen`].
    pub fn freeze(&mut self, at: i64) -> u64 {
        self.latest_snapshot += 1;
        self.snapshots.push_back(Frozen {
            version: self.latest_snapshot,
            frozen_at: at,
            as_of: self.version,
        });
        self.version += 1;
        self.latest_snapshot
    }

    /// A live snapshot's contents, as they were when it was frozen.
    pub fn snapshot(&self, version: u64) -> Option<Snapshot> {
        let frozen = self.snapshots.iter().find(|f| f.version == version)?;
        let mut entries = as_of(frozen.as_of, &self.entries, &self.retired_entries, |e| {
            e.since
        });
        entries.sort_by_key(|entry| entry.seq);
        let mut tool_outputs = as_of(
            frozen.as_of,
            &self.tool_outputs,
            &self.retired_outputs,
            |o| o.since,
        );
        tool_outputs.sort_by_key(|output| output.since);
        for entry in &mut entries {
            entry.since = 0;
        }
        for output in &mut tool_outputs {
            output.since = 0;
        }
        Some(Snapshot {
            context_id: self.context_id.clone(),
            version: frozen.version,
            frozen_at: frozen.frozen_at,
            entries,
            tool_outputs,
        })
    }

    /// Drops the snapshots frozen before `now - retention_ms`, then the oldest
    /// beyond `max_snapshots`, and the retired items only they held. Returns
    /// the dropped versions, oldest first.
    pub fn prune(&mut self, now: i64, retention_ms: i64, max_snapshots: usize) -> Vec<u64> {
        let cutoff = now.saturating_sub(retention_ms);
        let mut dropped = Vec::new();
        self.snapshots.retain(|frozen| {
            let keep = frozen.frozen_at >= cutoff;
            if !keep {
                dropped.push(frozen.version);
            }
            keep
        });
        while self.snapshots.len() > max_snapshots {
            if let Some(frozen) = self.snapshots.pop_front() {
                dropped.push(frozen.version);
            }
        }
        if dropped.is_empty() {
            return dropped;
        }
        dropped.sort_unstable();
        self.after_pruning();
        dropped
    }

    /// Prunes the oldest live snapshot ahead of its time (a bound on the
    /// memory's size); returns its version.
    pub fn prune_oldest_snapshot(&mut self) -> Option<u64> {
        let frozen = self.snapshots.pop_front()?;
        self.after_pruning();
        Some(frozen.version)
    }

    fn after_pruning(&mut self) {
        // Record timestamps may run backwards, so age can drop a version
        // newer than a live one: only the prefix below the oldest live
        // version is known to be gone entirely.
        let through = match self.snapshots.front() {
            Some(oldest_live) => oldest_live.version.saturating_sub(1),
            None => self.latest_snapshot,
        };
        self.pruned_through = self.pruned_through.max(through);
        let snapshots = &self.snapshots;
        let held = |since: u64, until: u64| {
            snapshots
                .iter()
                .any(|frozen| since <= frozen.as_of && frozen.as_of < until)
        };
        self.retired_entries.retain(|r| held(r.item.since, r.until));
        self.retired_outputs.retain(|r| held(r.item.since, r.until));
        self.version += 1;
    }

    /// Whether items are kept only for older snapshots.
    pub fn keeps_history(&self) -> bool {
        !self.retired_entries.is_empty() || !self.retired_outputs.is_empty()
    }

    pub fn snapshot_state(&self, version: u64) -> SnapshotState {
        if self
            .snapshots
            .iter()
            .any(|frozen| frozen.version == version)
        {
            SnapshotState::Live
        } else if version >= 1 && version <= self.latest_snapshot {
            SnapshotState::Pruned
        } else {
            SnapshotState::Unknown
        }
    }

    /// JSON with a version tag: `{"v":2,"context_id":...}`.
    pub fn encode(&self) -> Vec<u8> {
        encode_versioned(self, MEMORY_ENCODING_VERSION)
    }

    /// The length of [`Memory::encode`], counted without building it.
    pub fn encoded_len(&self) -> usize {
        let mut counter = ByteCounter(0);
        let envelope = Envelope {
            v: MEMORY_ENCODING_VERSION,
            body: self,
        };
        // Writing to a counter cannot fail; see `encode_versioned`.
        let _ = serde_json::to_writer(&mut counter, &envelope);
        counter.0
    }

    /// Reads bytes any released version of baton wrote. Version 1 kept its
    /// snapshots as copies elsewhere: they read as pruned (410 Gone).
    pub fn decode(bytes: &[u8]) -> Result<Memory, String> {
        match encoding_version(bytes, "memory")? {
            1 => {
                let old: MemoryV1 = decode_as(bytes, "memory", 1)?;
                Ok(Memory {
                    context_id: old.context_id,
                    entries: old.entries,
                    tool_outputs: old.tool_outputs,
                    next_seq: old.next_seq,
                    latest_snapshot: old.latest_snapshot,
                    snapshots: VecDeque::new(),
                    pruned_through: old.latest_snapshot.max(old.pruned_through),
                    version: old.version,
                    retired_entries: Vec::new(),
                    retired_outputs: Vec::new(),
                })
            }
            MEMORY_ENCODING_VERSION => decode_as(bytes, "memory", MEMORY_ENCODING_VERSION),
            found => Err(format!(
                "memory has encoding version {found}; this baton reads up to {MEMORY_ENCODING_VERSION}"
            )),
        }
    }
}

/// The items live at memory version `at`: live ones that were already
/// there, and retired ones that had not yet left.
fn as_of<'a, T: Clone + 'a>(
    at: u64,
    live: impl IntoIterator<Item = &'a T>,
    retired: &'a [Retired<T>],
    since: impl Fn(&T) -> u64,
) -> Vec<T> {
    live.into_iter()
        .filter(|item| since(item) <= at)
        .chain(
            retired
                .iter()
                .filter(|r| since(&r.item) <= at && at < r.until)
                .map(|r| &r.item),
        )
        .cloned()
        .collect()
}

impl Snapshot {
    /// JSON with a version tag: `{"v":1,"context_id":...}`.
    pub fn encode(&self) -> Vec<u8> {
        encode_versioned(self, SNAPSHOT_ENCODING_VERSION)
    }

    /// Reads bytes any released version of baton wrote.
    pub fn decode(bytes: &[u8]) -> Result<Snapshot, String> {
        match encoding_version(bytes, "memory snapshot")? {
            SNAPSHOT_ENCODING_VERSION => decode_as(bytes, "memory snapshot", 1),
            found => Err(format!(
                "memory snapshot has encoding version {found}; this baton reads up to {SNAPSHOT_ENCODING_VERSION}"
            )),
        }
    }
}

/// The prompt-ready JSON of a snapshot:
///
/// ```json
/// {"context_id": "c", "version": 3, "frozen_at": "2025-01-01T00:00:00Z",
///  "max_tokens": 2000, "total_tokens": 412, "truncated": false,
///  "memories": [{"type": "fact", "content": "...", "importance": 0.8, "key": null, "tokens": 12}],
///  "tool_outputs": [{"tool": "...", "event_id": "...", "output": {}, "tokens": 40, "at": "..."}],
///  "omitted": {"memories": 0, "tool_outputs": 0}}
/// ```
///
/// Memories come by importance, then recency; tool outputs after them, newest
/// first. Items are taken in that order while their cl100k tokens fit
/// `max_tokens`, and taking stops at the first that does not fit: a smaller
/// item further down never displaces a more important one.
pub fn render_prompt(snapshot: &Snapshot, max_tokens: u64) -> Value {
    let mut budget = Budget {
        max: max_tokens,
        used: 0,
        // A zero budget asks for no memory, even items that count zero tokens.
        exhausted: max_tokens == 0,
    };

    let mut by_importance: Vec<&MemoryEntry> = snapshot.entries.iter().collect();
    by_importance.sort_by(|a, b| {
        b.importance
            .total_cmp(&a.importance)
            .then(b.seq.cmp(&a.seq))
    });
    let mut memories = Vec::new();
    let mut omitted_memories = 0u64;
    for entry in by_importance {
        let taken = budget.take(|| estimate_tokens(&Value::String(entry.content.clone())));
        match taken {
            Some(tokens) => memories.push(json!({
                "type": entry.kind.as_str(),
                "content": entry.content,
                "importance": entry.importance,
                "key": entry.key,
                "tokens": tokens,
            })),
            None => omitted_memories += 1,
        }
    }

    let mut tool_outputs = Vec::new();
    let mut omitted_tool_outputs = 0u64;
    for output in snapshot.tool_outputs.iter().rev() {
        let value = output.output.to_value();
        match budget.take(|| estimate_tokens(&value)) {
            Some(tokens) => tool_outputs.push(json!({
                "tool": output.tool,
                "event_id": output.event_id,
                "output": value,
                "tokens": tokens,
                "at": rfc3339_from_millis(output.at),
            })),
            None => omitted_tool_outputs += 1,
        }
    }

    json!({
        "context_id": snapshot.context_id,
        "version": snapshot.version,
        "frozen_at": rfc3339_from_millis(snapshot.frozen_at),
        "max_tokens": max_tokens,
        "total_tokens": budget.used,
        "truncated": omitted_memories + omitted_tool_outputs > 0,
        "memories": memories,
        "tool_outputs": tool_outputs,
        "omitted": {"memories": omitted_memories, "tool_outputs": omitted_tool_outputs},
    })
}

/// The running token total of one render.
struct Budget {
    max: u64,
    used: u64,
    exhausted: bool,
}

impl Budget {
    /// Counts the item (lazily: nothing is tokenised once the budget ran out)
    /// and takes it if it fits; after the first misfit nothing more is taken.
    fn take(&mut self, count: impl FnOnce() -> u64) -> Option<u64> {
        if self.exhausted {
            return None;
        }
        let tokens = count();
        match self.used.checked_add(tokens) {
            Some(total) if total <= self.max => {
                self.used = total;
                Some(tokens)
            }
            _ => {
                self.exhausted = true;
                None
            }
        }
    }
}

/// `null` for a time RFC 3339 cannot write (beyond year 9999), never a made-up date.
fn rfc3339_from_millis(millis: i64) -> Value {
    let nanos = i128::from(millis) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|at| {
            at.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map_or(Value::Null, Value::String)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn upsert(key: Option<&str>, content: &str, importance: f64) -> MemoryUpsert {
        MemoryUpsert {
            context_id: "c-1".into(),
            kind: MemoryKind::Fact,
            content: content.into(),
            importance,
            key: key.map(str::to_owned),
        }
    }

    fn output(event_id: &str, at: i64) -> ToolOutput {
        ToolOutput {
            event_id: event_id.into(),
            tool: "vision_analyze".into(),
            output: RawJson::from_value(&json!({"labels": ["bicycle"], "event": event_id})),
            at,
            since: 0,
        }
    }

    fn live(memory: &Memory) -> Vec<(u64, i64)> {
        memory
            .snapshots
            .iter()
            .map(|frozen| (frozen.version, frozen.frozen_at))
            .collect()
    }

    fn contents(entries: &[MemoryEntry]) -> Vec<&str> {
        entries.iter().map(|entry| entry.content.as_str()).collect()
    }

    fn tokens_of(text: &str) -> u64 {
        estimate_tokens(&json!(text))
    }

    #[test]
    fn same_key_replaces_the_entry_with_a_fresh_seq() {
        let mut memory = Memory::new("c-1");
        memory.upsert(&upsert(Some("lang"), "answers in English", 0.5), 10);
        memory.upsert(&upsert(None, "likes bicycles", 0.4), 20);
        let mut replacement = upsert(Some("lang"), "answers in French", 0.9);
        replacement.kind = MemoryKind::Preference;
        memory.upsert(&replacement, 30);

        assert_eq!(memory.entries.len(), 2);
        let lang = &memory.entries[0];
        assert_eq!(lang.key.as_deref(), Some("lang"));
        assert_eq!(lang.content, "answers in French");
        assert_eq!(lang.kind, MemoryKind::Preference);
        assert_eq!(lang.importance, 0.9);
        assert_eq!(lang.seq, 2);
        assert_eq!(lang.at, 30);
        assert_eq!(memory.next_seq, 3);
        assert_eq!(memory.version, 3);
    }

    #[test]
    fn a_new_key_or_no_key_adds() {
        let mut memory = Memory::new("c-1");
        memory.upsert(&upsert(Some("a"), "one", 0.5), 1);
        memory.upsert(&upsert(Some("b"), "two", 0.5), 2);
        memory.upsert(&upsert(None, "three", 0.5), 3);
        memory.upsert(&upsert(None, "three", 0.5), 4);
        assert_eq!(contents(&memory.entries), ["one", "two", "three", "three"]);
        let seqs: Vec<u64> = memory.entries.iter().map(|entry| entry.seq).collect();
        assert_eq!(seqs, [0, 1, 2, 3]);
    }

    #[test]
    fn eviction_at_max_entries_takes_the_least_important_then_the_oldest() {
        let mut memory = Memory::new("c-1");
        for i in 0..MAX_ENTRIES {
            let importance = if i == 5 || i == 7 { 0.2 } else { 0.5 };
            memory.upsert(&upsert(None, &format!("m{i}"), importance), i as i64);
        }
        assert_eq!(memory.entries.len(), MAX_ENTRIES);

        // Two equally unimportant entries: the older (m5) goes first.
        memory.upsert(&upsert(None, "new-1", 0.5), 1_000);
        assert_eq!(memory.entries.len(), MAX_ENTRIES);
        assert!(!contents(&memory.entries).contains(&"m5"));
        assert!(contents(&memory.entries).contains(&"m7"));

        memory.upsert(&upsert(None, "new-2", 0.5), 1_001);
        assert!(!contents(&memory.entries).contains(&"m7"));

        // Now all are 0.5: the oldest of them goes.
        memory.upsert(&upsert(None, "new-3", 0.5), 1_002);
        assert!(!contents(&memory.entries).contains(&"m0"));
        assert!(contents(&memory.entries).contains(&"m1"));
        assert!(contents(&memory.entries).contains(&"new-3"));

        // A new entry less important than everything held is the one dropped.
        memory.upsert(&upsert(None, "trivia", 0.1), 1_003);
        assert_eq!(memory.entries.len(), MAX_ENTRIES);
        assert!(!contents(&memory.entries).contains(&"trivia"));
        assert!(contents(&memory.entries).contains(&"m1"));
    }

    #[test]
    fn replacing_a_key_when_full_evicts_nothing() {
        let mut memory = Memory::new("c-1");
        for i in 0..MAX_ENTRIES {
            memory.upsert(&upsert(Some(&format!("k{i}")), "x", 0.5), 0);
        }
        memory.upsert(&upsert(Some("k0"), "replaced", 0.0), 1);
        assert_eq!(memory.entries.len(), MAX_ENTRIES);
        assert_eq!(memory.entries[0].content, "replaced");
    }

    #[test]
    fn importance_out_of_range_is_clamped_so_the_memory_stays_encodable() {
        let mut memory = Memory::new("c-1");
        memory.upsert(&upsert(None, "nan", f64::NAN), 0);
        memory.upsert(&upsert(None, "big", 7.0), 0);
        assert_eq!(memory.entries[0].importance, 0.0);
        assert_eq!(memory.entries[1].importance, 1.0);
        assert_eq!(Memory::decode(&memory.encode()).unwrap(), memory);
    }

    #[test]
    fn tool_outputs_are_bounded_and_drop_the_oldest() {
        let mut memory = Memory::new("c-1");
        for i in 0..(MAX_TOOL_OUTPUTS + 3) {
            memory.record_tool_output(output(&format!("e-{i}"), i as i64));
        }
        assert_eq!(memory.tool_outputs.len(), MAX_TOOL_OUTPUTS);
        assert_eq!(memory.tool_outputs.front().unwrap().event_id, "e-3");
        assert_eq!(
            memory.tool_outputs.back().unwrap().event_id,
            format!("e-{}", MAX_TOOL_OUTPUTS + 2)
        );
    }

    #[test]
    fn a_redelivered_tool_output_changes_nothing() {
        let mut memory = Memory::new("c-1");
        memory.record_tool_output(output("e-1", 1));
        let before = memory.clone();
        memory.record_tool_output(output("e-1", 2));
        assert_eq!(memory, before);
    }

    #[test]
    fn freeze_numbers_versions_from_one_and_snapshots_keep_what_they_saw() {
        let mut memory = Memory::new("c-1");
        memory.upsert(&upsert(Some("k"), "first", 0.5), 1);
        memory.record_tool_output(output("e-1", 1));
        let one = memory.freeze(100);
        memory.upsert(&upsert(Some("k"), "second", 0.5), 2);
        memory.record_tool_output(output("e-2", 2));
        let two = memory.freeze(200);
        let three = memory.freeze(300);

        assert_eq!([one, two, three], [1, 2, 3]);
        assert_eq!(memory.latest_snapshot, 3);
        assert_eq!(live(&memory), [(1, 100), (2, 200), (3, 300)]);
        let [one, two, three] = [1, 2, 3].map(|v| memory.snapshot(v).expect("live"));
        assert_eq!(one.frozen_at, 100);
        assert_eq!(one.context_id, "c-1");
        assert_eq!(contents(&one.entries), ["first"]);
        assert_eq!(one.tool_outputs.len(), 1);
        assert_eq!(contents(&two.entries), ["second"]);
        assert_eq!(two.tool_outputs.len(), 2);
        assert_eq!(two.entries, three.entries);
    }

    #[test]
    fn prune_by_age_drops_what_was_frozen_before_the_retention() {
        let mut memory = Memory::new("c-1");
        for at in [100, 200, 300, 400] {
            memory.freeze(at);
        }
        let version = memory.version;
        // now 450, retention 200: cutoff 250, so 100 and 200 go.
        assert_eq!(memory.prune(450, 200, 10), [1, 2]);
        assert_eq!(live(&memory), [(3, 300), (4, 400)]);
        assert_eq!(memory.pruned_through, 2);
        assert!(memory.version > version);

        let version = memory.version;
        assert!(memory.prune(450, 200, 10).is_empty());
        assert_eq!(memory.version, version);

        assert_eq!(memory.snapshot_state(1), SnapshotState::Pruned);
        assert_eq!(memory.snapshot_state(2), SnapshotState::Pruned);
        assert_eq!(memory.snapshot_state(3), SnapshotState::Live);
        assert_eq!(memory.snapshot_state(4), SnapshotState::Live);
        assert_eq!(memory.snapshot_state(5), SnapshotState::Unknown);
        assert_eq!(memory.snapshot_state(0), SnapshotState::Unknown);
    }

    #[test]
    fn prune_by_count_keeps_the_newest() {
        let mut memory = Memory::new("c-1");
        for at in 1..=5 {
            memory.freeze(at);
        }
        assert_eq!(memory.prune(5, 1_000, 2), [1, 2, 3]);
        assert_eq!(live(&memory), [(4, 4), (5, 5)]);
        assert_eq!(memory.pruned_through, 3);

        assert_eq!(memory.prune(5, 1_000, 0), [4, 5]);
        assert!(memory.snapshots.is_empty());
        assert_eq!(memory.pruned_through, 5);
        assert_eq!(memory.snapshot_state(5), SnapshotState::Pruned);
        assert_eq!(memory.snapshot_state(6), SnapshotState::Unknown);

        // Versions keep counting after everything was pruned.
        assert_eq!(memory.freeze(6), 6);
        assert_eq!(memory.snapshot_state(6), SnapshotState::Live);
    }

    #[test]
    fn prune_with_timestamps_running_backwards_only_advances_over_the_gone_prefix() {
        let mut memory = Memory::new("c-1");
        memory.freeze(500);
        memory.freeze(100);
        memory.freeze(600);
        assert_eq!(memory.prune(600, 200, 10), [2]);
        assert_eq!(memory.pruned_through, 0);
        assert_eq!(memory.snapshot_state(1), SnapshotState::Live);
        assert_eq!(memory.snapshot_state(2), SnapshotState::Pruned);
        assert_eq!(memory.prune(800, 200, 10), [1]);
        assert_eq!(memory.pruned_through, 2);
    }

    #[test]
    fn a_snapshot_keeps_what_it_saw_after_the_live_memory_moves_on() {
        let mut memory = Memory::new("c-1");
        memory.upsert(&upsert(Some("lang"), "English", 0.5), 1);
        memory.upsert(&upsert(None, "bicycle", 0.4), 2);
        for i in 0..MAX_TOOL_OUTPUTS {
            memory.record_tool_output(output(&format!("e-{i}"), i as i64));
        }
        let one = memory.freeze(100);
        let seen = memory.snapshot(one).expect("live");
        // Replace an entry, push every tool output out, then freeze again.
        memory.upsert(&upsert(Some("lang"), "French", 0.9), 3);
        for i in 0..MAX_TOOL_OUTPUTS {
            memory.record_tool_output(output(&format!("f-{i}"), 100 + i as i64));
        }
        let two = memory.freeze(200);
        assert_eq!(memory.snapshot(one).expect("still live"), seen);
        assert_eq!(contents(&seen.entries), ["English", "bicycle"]);
        assert_eq!(seen.tool_outputs.len(), MAX_TOOL_OUTPUTS);
        assert_eq!(seen.tool_outputs[0].event_id, "e-0");
        let second = memory.snapshot(two).expect("live");
        assert_eq!(contents(&second.entries), ["bicycle", "French"]);
        assert_eq!(second.tool_outputs[0].event_id, "f-0");
        assert_eq!(memory.retired_entries.len(), 1);
        assert_eq!(memory.retired_outputs.len(), MAX_TOOL_OUTPUTS);
        assert!(Memory::decode(&memory.encode()).unwrap() == memory);

        // Pruning the first snapshot lets go of what only it held.
        assert_eq!(memory.prune(200, 1_000, 1), [1]);
        assert!(!memory.keeps_history());
        assert_eq!(memory.snapshot(two).expect("live"), second);
        assert_eq!(memory.snapshot(one), None);
    }

    #[test]
    fn items_nobody_froze_are_not_kept() {
        let mut memory = Memory::new("c-1");
        for i in 0..(MAX_TOOL_OUTPUTS * 3) {
            memory.record_tool_output(output(&format!("e-{i}"), i as i64));
            memory.upsert(&upsert(Some("k"), &format!("v{i}"), 0.5), i as i64);
        }
        assert!(!memory.keeps_history());
        memory.freeze(1);
        memory.drop_oldest_tool_output();
        memory.upsert(&upsert(Some("k"), "after", 0.5), 2);
        assert_eq!(memory.retired_outputs.len(), 1);
        assert_eq!(memory.retired_entries.len(), 1);
        assert_eq!(memory.prune_oldest_snapshot(), Some(1));
        assert!(!memory.keeps_history());
        assert_eq!(memory.snapshot_state(1), SnapshotState::Pruned);
    }

    proptest! {
        /// Whatever happens after a freeze, the snapshot reads as a copy
        /// taken at that moment would have.
        #[test]
        fn a_snapshot_equals_a_copy_taken_when_it_was_frozen(
            ops in prop::collection::vec((0u8..4, 0u8..6), 1..80)
        ) {
            let mut memory = Memory::new("c-1");
            let mut copies: Vec<(u64, Vec<MemoryEntry>, Vec<ToolOutput>)> = Vec::new();
            for (step, (op, arg)) in ops.into_iter().enumerate() {
                let at = step as i64;
                match op {
                    0 => memory.upsert(&upsert(Some(&format!("k{arg}")), &format!("s{step}"), 0.5), at),
                    1 => memory.record_tool_output(output(&format!("e-{step}"), at)),
                    2 => {
                        let version = memory.freeze(at);
                        let mut entries = memory.entries.clone();
                        entries.sort_by_key(|entry| entry.seq);
                        copies.push((version, entries, memory.tool_outputs.iter().cloned().collect()));
                    }
                    _ => {
                        memory.prune(at, 1_000, usize::from(arg));
                    }
                }
            }
            for (version, mut entries, mut outputs) in copies {
                entries.iter_mut().for_each(|entry| entry.since = 0);
                outputs.iter_mut().for_each(|output| output.since = 0);
                match memory.snapshot(version) {
                    Some(snapshot) => {
                        prop_assert_eq!(snapshot.entries, entries);
                        prop_assert_eq!(snapshot.tool_outputs, outputs);
                    }
                    None => prop_assert_eq!(memory.snapshot_state(version), SnapshotState::Pruned),
                }
            }
            prop_assert_eq!(Memory::decode(&memory.encode()).unwrap(), memory);
        }
    }

    fn populated() -> Memory {
        let mut memory = Memory::new("c-1");
        memory.upsert(&upsert(Some("lang"), "answers in French", 0.9), 1_000);
        memory.upsert(&upsert(None, "owns a red bicycle", 0.25), 1_500);
        memory.record_tool_output(output("e-1", 2_000));
        memory.freeze(3_000);
        memory.freeze(4_000);
        memory.prune(4_000, 500, 10);
        memory
    }

    #[test]
    fn memory_and_snapshots_round_trip() {
        let mut memory = populated();
        assert_eq!(Memory::decode(&memory.encode()).unwrap(), memory);
        let version = memory.freeze(5_000);
        let snapshot = memory.snapshot(version).expect("live");
        assert_eq!(Snapshot::decode(&snapshot.encode()).unwrap(), snapshot);
        assert!(memory.encode().starts_with(br#"{"v":2,"#));
        assert!(snapshot.encode().starts_with(br#"{"v":1,"#));
    }

    /// Stored memory outlives deployments: these bytes must decode forever.
    const MEMORY_V1: &[u8] = br#"{"v":1,"context_id":"c-1","entries":[{"key":"lang","kind":"preference","content":"answers in French","importance":0.9,"seq":0,"at":1000},{"key":null,"kind":"fact","content":"owns a red bicycle","importance":0.25,"seq":1,"at":1500}],"tool_outputs":[{"event_id":"e-1","tool":"vision_analyze","output":{"labels":["bicycle"]},"at":2000}],"next_seq":2,"latest_snapshot":2,"snapshots":[[2,4000]],"pruned_through":1,"version":6}"#;

    const SNAPSHOT_V1: &[u8] = br#"{"v":1,"context_id":"c-1","version":2,"frozen_at":4000,"entries":[{"key":"lang","kind":"preference","content":"answers in French","importance":0.9,"seq":0,"at":1000}],"tool_outputs":[{"event_id":"e-1","tool":"vision_analyze","output":{"labels":["bicycle"]},"at":2000}]}"#;

    #[test]
    fn a_v1_memory_literal_decodes_with_its_snapshots_gone() {
        let memory = Memory::decode(MEMORY_V1).unwrap();
        assert_eq!(memory.context_id, "c-1");
        assert_eq!(memory.entries.len(), 2);
        assert_eq!(memory.entries[0].kind, MemoryKind::Preference);
        assert_eq!(memory.entries[1].key, None);
        assert_eq!(
            memory.tool_outputs[0].output.to_value(),
            json!({"labels": ["bicycle"]})
        );
        // Version 1 kept snapshot copies in another store: they are gone.
        assert!(memory.snapshots.is_empty());
        assert_eq!(memory.snapshot_state(2), SnapshotState::Pruned);
        assert_eq!(memory.pruned_through, 2);
        assert_eq!(memory.version, 6);
        assert_eq!(Memory::decode(&memory.encode()).unwrap(), memory);
    }

    #[test]
    fn a_v1_snapshot_literal_decodes_and_encodes_to_the_same_bytes() {
        let snapshot = Snapshot::decode(SNAPSHOT_V1).unwrap();
        assert_eq!(snapshot.version, 2);
        assert_eq!(snapshot.frozen_at, 4000);
        assert_eq!(snapshot.entries[0].content, "answers in French");
        assert_eq!(snapshot.encode(), SNAPSHOT_V1);
    }

    #[test]
    fn unknown_or_missing_encoding_versions_are_rejected() {
        let v3 = String::from_utf8(MEMORY_V1.to_vec())
            .unwrap()
            .replacen(r#""v":1"#, r#""v":3"#, 1);
        let err = Memory::decode(v3.as_bytes()).unwrap_err();
        assert!(err.contains("encoding version 3"), "{err}");
        let err = Snapshot::decode(br#"{"v":9,"context_id":"c"}"#).unwrap_err();
        assert!(err.contains("encoding version 9"), "{err}");
        let err = Memory::decode(br#"{"context_id":"c"}"#).unwrap_err();
        assert!(err.contains("`v`"), "{err}");
        assert!(Memory::decode(b"not json").is_err());
        assert!(Memory::decode(br#"{"v":1,"context_id":"c"}"#).is_err());
    }

    #[test]
    fn decode_upsert_accepts_both_id_spellings() {
        let canonical = decode_upsert(
            br#"{"event":"memory.upserted","context_id":"c-1","type":"fact","content":"owns a bicycle","importance":0.8,"key":"bike"}"#,
        )
        .unwrap();
        assert_eq!(
            canonical,
            MemoryUpsert {
                context_id: "c-1".into(),
                kind: MemoryKind::Fact,
                content: "owns a bicycle".into(),
                importance: 0.8,
                key: Some("bike".into()),
            }
        );
        let legacy = decode_upsert(
            br#"{"conversationId":"c-2","type":"instruction","content":"be brief","importance":1}"#,
        )
        .unwrap();
        assert_eq!(legacy.context_id, "c-2");
        assert_eq!(legacy.kind, MemoryKind::Instruction);
        assert_eq!(legacy.importance, 1.0);
        assert_eq!(legacy.key, None);
        let empty_key = decode_upsert(
            br#"{"context_id":"c","type":"context","content":"","importance":0,"key":""}"#,
        )
        .unwrap();
        assert_eq!(empty_key.key, None);
        assert_eq!(empty_key.kind, MemoryKind::Context);
    }

    #[test]
    fn decode_upsert_names_the_field_of_each_bad_case() {
        let long = "x".repeat(MAX_CONTENT_BYTES + 1);
        let at_limit = "x".repeat(MAX_CONTENT_BYTES);
        let cases: Vec<(String, &str)> = vec![
            ("not json".into(), "not valid JSON"),
            ("[1,2]".into(), "not a JSON object"),
            (
                r#"{"event":"tool.x.completed","context_id":"c","type":"fact","content":"x","importance":0.5}"#.into(),
                "`event`",
            ),
            (
                r#"{"type":"fact","content":"x","importance":0.5}"#.into(),
                "`context_id`",
            ),
            (
                r#"{"context_id":"","type":"fact","content":"x","importance":0.5}"#.into(),
                "`context_id` is empty",
            ),
            (
                r#"{"conversationId":"","type":"fact","content":"x","importance":0.5}"#.into(),
                "`conversationId` is empty",
            ),
            (
                r#"{"context_id":7,"type":"fact","content":"x","importance":0.5}"#.into(),
                "`context_id` must be a string",
            ),
            (
                r#"{"context_id":"c","content":"x","importance":0.5}"#.into(),
                "`type` is missing",
            ),
            (
                r#"{"context_id":"c","type":"opinion","content":"x","importance":0.5}"#.into(),
                "unknown `type`",
            ),
            (
                r#"{"context_id":"c","type":"fact","importance":0.5}"#.into(),
                "`content` is missing",
            ),
            (
                r#"{"context_id":"c","type":"fact","content":["x"],"importance":0.5}"#.into(),
                "`content` must be a string",
            ),
            (
                format!(r#"{{"context_id":"c","type":"fact","content":"{long}","importance":0.5}}"#),
                "`content` is 16385 bytes",
            ),
            (
                r#"{"context_id":"c","type":"fact","content":"x"}"#.into(),
                "`importance` is missing",
            ),
            (
                r#"{"context_id":"c","type":"fact","content":"x","importance":1.5}"#.into(),
                "`importance` must be in 0..=1",
            ),
            (
                r#"{"context_id":"c","type":"fact","content":"x","importance":-0.1}"#.into(),
                "`importance` must be in 0..=1",
            ),
            (
                r#"{"context_id":"c","type":"fact","content":"x","importance":"high"}"#.into(),
                "`importance` must be a number",
            ),
            (
                r#"{"context_id":"c","type":"fact","content":"x","importance":0.5,"key":3}"#.into(),
                "`key` must be a string",
            ),
        ];
        for (record, reason) in cases {
            let err = decode_upsert(record.as_bytes()).unwrap_err();
            assert!(
                err.contains(reason),
                "{record:.80}: expected `{reason}` in `{err}`"
            );
            assert!(err.len() < 300, "reasons stay short: {err}");
        }
        let fits = format!(
            r#"{{"context_id":"c","type":"fact","content":"{at_limit}","importance":0.5}}"#
        );
        assert!(decode_upsert(fits.as_bytes()).is_ok());
    }

    fn snapshot_of(entries: Vec<MemoryEntry>, tool_outputs: Vec<ToolOutput>) -> Snapshot {
        Snapshot {
            context_id: "c-1".into(),
            version: 3,
            frozen_at: 1_700_000_000_123,
            entries,
            tool_outputs,
        }
    }

    fn entry(content: &str, importance: f64, seq: u64) -> MemoryEntry {
        MemoryEntry {
            key: None,
            kind: MemoryKind::Fact,
            content: content.into(),
            importance,
            seq,
            at: 0,
            since: 0,
        }
    }

    fn rendered_contents(prompt: &Value) -> Vec<&str> {
        prompt["memories"]
            .as_array()
            .unwrap()
            .iter()
            .map(|memory| memory["content"].as_str().unwrap())
            .collect()
    }

    fn rendered_events(prompt: &Value) -> Vec<&str> {
        prompt["tool_outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|output| output["event_id"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn render_orders_by_importance_then_recency_then_newest_tool_outputs() {
        let mut lang = entry("answers in French", 0.5, 1);
        lang.key = Some("lang".into());
        lang.kind = MemoryKind::Preference;
        let snapshot = snapshot_of(
            vec![
                lang,
                entry("old and important", 0.9, 0),
                entry("new and important", 0.9, 4),
                entry("trivia", 0.1, 5),
            ],
            vec![output("e-1", 1_000), output("e-2", 2_000)],
        );
        let prompt = render_prompt(&snapshot, 100_000);
        assert_eq!(
            rendered_contents(&prompt),
            [
                "new and important",
                "old and important",
                "answers in French",
                "trivia"
            ]
        );
        assert_eq!(rendered_events(&prompt), ["e-2", "e-1"]);
        assert_eq!(prompt["context_id"], "c-1");
        assert_eq!(prompt["version"], 3);
        assert_eq!(prompt["frozen_at"], "2023-11-14T22:13:20.123Z");
        assert_eq!(prompt["max_tokens"], 100_000);
        assert_eq!(prompt["truncated"], false);
        assert_eq!(prompt["omitted"], json!({"memories": 0, "tool_outputs": 0}));

        let lang = &prompt["memories"][2];
        assert_eq!(lang["type"], "preference");
        assert_eq!(lang["importance"], 0.5);
        assert_eq!(lang["key"], "lang");
        assert_eq!(lang["tokens"], tokens_of("answers in French"));
        assert_eq!(prompt["memories"][0]["key"], Value::Null);

        let newest = &prompt["tool_outputs"][0];
        assert_eq!(newest["tool"], "vision_analyze");
        assert_eq!(newest["output"], output("e-2", 0).output.to_value());
        assert_eq!(
            newest["tokens"],
            estimate_tokens(&output("e-2", 0).output.to_value())
        );
        assert_eq!(newest["at"], "1970-01-01T00:00:02Z");

        let total: u64 = prompt["memories"]
            .as_array()
            .unwrap()
            .iter()
            .chain(prompt["tool_outputs"].as_array().unwrap())
            .map(|item| item["tokens"].as_u64().unwrap())
            .sum();
        assert!(total > 0);
        assert_eq!(prompt["total_tokens"], total);
    }

    #[test]
    fn render_stops_at_the_first_item_that_does_not_fit() {
        let big = "the quick brown fox jumps over the lazy dog ".repeat(4);
        let snapshot = snapshot_of(
            vec![
                entry("hello world", 0.9, 0),
                entry(&big, 0.8, 1),
                entry("hi", 0.7, 2),
            ],
            vec![output("e-1", 1_000)],
        );
        let first = tokens_of("hello world");
        assert!(tokens_of(&big) > 5);
        // Room for the first and for "hi", but not for the big one between them.
        let max_tokens = first + tokens_of("hi") + 2;
        let prompt = render_prompt(&snapshot, max_tokens);
        assert_eq!(rendered_contents(&prompt), ["hello world"]);
        assert!(rendered_events(&prompt).is_empty());
        assert_eq!(prompt["truncated"], true);
        assert_eq!(prompt["total_tokens"], first);
        assert_eq!(prompt["omitted"], json!({"memories": 2, "tool_outputs": 1}));

        // Exactly enough for every memory: only the tool output is left out.
        let memories = first + tokens_of(&big) + tokens_of("hi");
        let prompt = render_prompt(&snapshot, memories);
        assert_eq!(rendered_contents(&prompt).len(), 3);
        assert_eq!(prompt["total_tokens"], memories);
        assert_eq!(prompt["omitted"], json!({"memories": 0, "tool_outputs": 1}));
    }

    #[test]
    fn render_with_zero_tokens_gives_empty_lists() {
        let snapshot = snapshot_of(
            vec![entry("hello world", 0.9, 0), entry("", 0.8, 1)],
            vec![output("e-1", 1_000)],
        );
        let prompt = render_prompt(&snapshot, 0);
        assert!(rendered_contents(&prompt).is_empty());
        assert!(rendered_events(&prompt).is_empty());
        assert_eq!(prompt["total_tokens"], 0);
        assert_eq!(prompt["truncated"], true);
        assert_eq!(prompt["omitted"], json!({"memories": 2, "tool_outputs": 1}));

        let empty = render_prompt(&snapshot_of(Vec::new(), Vec::new()), 0);
        assert_eq!(empty["truncated"], false);
    }

    #[test]
    fn render_writes_null_for_a_time_rfc3339_cannot_hold() {
        let mut snapshot = snapshot_of(Vec::new(), Vec::new());
        snapshot.frozen_at = i64::MAX;
        assert_eq!(render_prompt(&snapshot, 10)["frozen_at"], Value::Null);
    }

    proptest! {
        #[test]
        fn decode_upsert_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_upsert(&bytes);
        }

        #[test]
        fn decode_upsert_never_panics_on_near_miss_records(
            id_field in prop::sample::select(vec!["context_id", "conversationId", "contextId", "id"]),
            id in prop_oneof![Just(json!("")), Just(json!(null)), "\\PC{0,8}".prop_map(Value::from), any::<i64>().prop_map(Value::from)],
            kind in prop_oneof![Just(json!("fact")), Just(json!("preference")), "\\PC{0,8}".prop_map(Value::from), any::<bool>().prop_map(Value::from)],
            content in prop_oneof![Just(json!(null)), "\\PC{0,64}".prop_map(Value::from), any::<f64>().prop_map(Value::from)],
            importance in prop_oneof![any::<f64>().prop_map(Value::from), any::<i64>().prop_map(Value::from), Just(json!("0.5"))],
            key in prop_oneof![Just(json!(null)), "\\PC{0,8}".prop_map(Value::from), any::<u8>().prop_map(Value::from)],
        ) {
            let record = json!({id_field: id, "type": kind, "content": content, "importance": importance, "key": key});
            if let Ok(upsert) = decode_upsert(record.to_string().as_bytes()) {
                prop_assert!(!upsert.context_id.is_empty());
                prop_assert!((0.0..=1.0).contains(&upsert.importance));
            }
        }
    }
}
