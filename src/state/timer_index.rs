//! The partition's timer index: every timer of every context in the store,
//! ordered by due time, in its own column family.
//!
//! A context's timers live in its record (see `workflow::timers`); this
//! index is derived from them, so it is written in the same RocksDB batch
//! as the records (after the commit, like all state) and rebuilt from the
//! changelog on restore: each changelog record names its context's timers
//! in a header, so the restore keeps the index without decoding values.
//!
//! A key is `due_at` (big-endian, sign flipped so that byte order is time
//! order), the context id, a NUL, and the timer's key. Values are empty.

use crate::workflow::timers::Timer;

/// The column family of the index.
pub const TIMERS_FAMILY: &str = "timers";

/// The changelog header that lists a record's timers, as JSON
/// `[[due_at, "key"], ...]`; absent when the context has none.
pub const TIMERS_HEADER: &str = "baton.timers";

/// One index entry, read back.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DueTimer {
    pub due_at: i64,
    pub context_id: String,
    pub timer_key: String,
}

/// The index key of `timer_key` of `context_id`, due at `due_at`.
pub fn index_key(due_at: i64, context_id: &str, timer_key: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + context_id.len() + 1 + timer_key.len());
    key.extend_from_slice(&order_preserving(due_at));
    key.extend_from_slice(context_id.as_bytes());
    key.push(0);
    key.extend_from_slice(timer_key.as_bytes());
    key
}

/// The index key of a context's timer.
pub fn key_of(context_id: &str, timer: &Timer) -> Vec<u8> {
    index_key(timer.due_at, context_id, &timer.key())
}

/// Reads an index key back; `None` for bytes this module did not write.
pub fn parse_key(key: &[u8]) -> Option<DueTimer> {
    let (due, rest) = key.split_at_checked(8)?;
    let due: [u8; 8] = due.try_into().ok()?;
    // Context ids hold no control characters (checked at the door), so the
    // first NUL ends it.
    let split = rest.iter().position(|byte| *byte == 0)?;
    let context_id = std::str::from_utf8(&rest[..split]).ok()?.to_owned();
    let timer_key = std::str::from_utf8(&rest[split + 1..]).ok()?.to_owned();
    Some(DueTimer {
        due_at: from_order_preserving(due),
        context_id,
        timer_key,
    })
}

/// The first key past every timer due at or before `due_at`.
pub fn upper_bound(due_at: i64) -> Vec<u8> {
    match due_at.checked_add(1) {
        Some(next) => order_preserving(next).to_vec(),
        None => vec![0xff; 9],
    }
}

fn order_preserving(value: i64) -> [u8; 8] {
    ((value as u64) ^ (1 << 63)).to_be_bytes()
}

fn from_order_preserving(bytes: [u8; 8]) -> i64 {
    (u64::from_be_bytes(bytes) ^ (1 << 63)) as i64
}

/// The header value naming `timers`; `None` when there are none.
pub fn header_value(timers: &[Timer]) -> Option<String> {
    if timers.is_empty() {
        return None;
    }
    let entries: Vec<(i64, String)> = timers
        .iter()
        .map(|timer| (timer.due_at, timer.key()))
        .collect();
    serde_json::to_string(&entries).ok()
}

/// The `(due_at, key)` pairs a header names; empty for a missing or
/// unreadable header (the record's own timers are then rebuilt when its
/// context is next written).
pub fn parse_header(value: Option<&[u8]>) -> Vec<(i64, String)> {
    value
        .and_then(|bytes| serde_json::from_slice(bytes).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_due_time_and_read_back() {
        let early = index_key(-5, "c-1", "step/A/researcher");
        let later = index_key(1_700_000_000_000, "a", "deadline");
        let latest = index_key(i64::MAX, "a", "deadline");
        assert!(early < later && later < latest);
        assert!(later < upper_bound(1_700_000_000_000));
        assert!(index_key(1_700_000_000_001, "a", "x") >= upper_bound(1_700_000_000_000));
        assert_eq!(
            parse_key(&later),
            Some(DueTimer {
                due_at: 1_700_000_000_000,
                context_id: "a".into(),
                timer_key: "deadline".into()
            })
        );
        assert_eq!(parse_key(b"short"), None);
    }

    #[test]
    fn headers_round_trip() {
        let timer = Timer {
            kind: crate::workflow::timers::TimerKind::Deadline,
            due_at: 42,
            step: String::new(),
            agent: None,
            event: None,
            attempt: 0,
        };
        let value = header_value(std::slice::from_ref(&timer)).expect("one timer");
        assert_eq!(
            parse_header(Some(value.as_bytes())),
            vec![(42, "deadline".to_owned())]
        );
        assert_eq!(header_value(&[]), None);
        assert!(parse_header(Some(b"not json")).is_empty());
    }
}
