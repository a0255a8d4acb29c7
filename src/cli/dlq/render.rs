//! How dead letters are shown: an aligned table for people, one JSON object
//! per line for scripts.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use super::select::DeadLetterRecord;
use crate::dlq::headers;

const REASON_WIDTH: usize = 48;
const CONTEXT_WIDTH: usize = 32;
const COLUMNS: [&str; 8] = [
    "TOPIC", "AT", "CLASS", "REASON", "CONTEXT", "SOURCE", "ATTEMPTS", "AGE",
];

/// The table's cells for one record.
fn row(record: &DeadLetterRecord, now: OffsetDateTime) -> [String; 8] {
    let or_dash = |text: Option<String>| text.unwrap_or_else(|| "-".into());
    [
        record.topic.clone(),
        format!("{}/{}", record.partition, record.offset),
        or_dash(record.header(headers::ERROR_CLASS).map(one_line)),
        or_dash(
            record
                .header(headers::ERROR_REASON)
                .map(|reason| truncate(&one_line(reason), REASON_WIDTH)),
        ),
        or_dash(
            record
                .context()
                .map(|context| truncate(&one_line(&context), CONTEXT_WIDTH)),
        ),
        or_dash(record.source().map(|source| one_line(&source))),
        or_dash(record.header(headers::ATTEMPTS).map(one_line)),
        or_dash(record.failed_at().map(|at| age(now - at))),
    ]
}

/// An aligned table with a header line; empty when there are no records.
pub fn table(records: &[DeadLetterRecord], now: OffsetDateTime) -> String {
    if records.is_empty() {
        return String::new();
    }
    let rows: Vec<[String; 8]> = records.iter().map(|record| row(record, now)).collect();
    let mut widths = COLUMNS.map(|name| name.chars().count());
    for cells in &rows {
        for (width, cell) in widths.iter_mut().zip(cells) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header = COLUMNS.map(str::to_string);
    for cells in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `shown N of M scanned (topic: n, ...); by class: a=1 b=2`.
pub fn summary(records: &[DeadLetterRecord], scanned: &[(String, u64)], verb: &str) -> String {
    let total: u64 = scanned.iter().map(|(_, n)| n).sum();
    let per_topic: Vec<String> = scanned
        .iter()
        .map(|(topic, n)| format!("{topic}: {n}"))
        .collect();
    let mut classes: BTreeMap<String, u64> = BTreeMap::new();
    for record in records {
        let class = record.header(headers::ERROR_CLASS).unwrap_or("unknown");
        *classes.entry(one_line(class)).or_default() += 1;
    }
    let by_class: Vec<String> = classes
        .iter()
        .map(|(class, n)| format!("{class}={n}"))
        .collect();
    format!(
        "{verb} {} of {total} record(s) scanned ({}); by class: {}",
        records.len(),
        per_topic.join(", "),
        if by_class.is_empty() {
            "-".to_string()
        } else {
            by_class.join(" ")
        }
    )
}

/// One record as a JSON object: coordinates, every header, the key and the
/// value as text when they are UTF-8 (else base64, said by `*_encoding`).
pub fn json_line(record: &DeadLetterRecord, now: OffsetDateTime) -> String {
    let mut header_map = Map::new();
    for (name, value) in &record.headers {
        let value = match value {
            Some(bytes) => Value::String(String::from_utf8_lossy(bytes).into_owned()),
            None => Value::Null,
        };
        header_map.insert(name.clone(), value);
    }
    let (key, key_encoding) = bytes_json(record.key.as_deref());
    let (value, value_encoding) = bytes_json(record.value.as_deref());
    json!({
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "class": record.header(headers::ERROR_CLASS),
        "reason": record.header(headers::ERROR_REASON),
        "context": record.context(),
        "source": record.source(),
        "attempts": record.header(headers::ATTEMPTS),
        "failed_at": record.header(headers::FAILED_AT),
        "age_secs": record.failed_at().map(|at| (now - at).whole_seconds().max(0)),
        "headers": header_map,
        "key": key,
        "key_encoding": key_encoding,
        "value": value,
        "value_encoding": value_encoding,
    })
    .to_string()
}

fn bytes_json(bytes: Option<&[u8]>) -> (Value, Value) {
    match bytes {
        None => (Value::Null, Value::Null),
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => (json!(text), json!("utf8")),
            Err(_) => (json!(BASE64.encode(bytes)), json!("base64")),
        },
    }
}

/// `42s`, `5m`, `3h`, `2d`: the largest whole unit. A failure "in the
/// future" (clock skew between pods) shows as `0s`.
pub fn age(elapsed: time::Duration) -> String {
    let secs = elapsed.whole_seconds().max(0);
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3_600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3_600),
        s => format!("{}d", s / 86_400),
    }
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut short: String = text.chars().take(width - 1).collect();
    short.push('…');
    short
}

/// Control characters (a reason with a newline, say) would break the table.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(headers: &[(&str, &str)], value: &[u8]) -> DeadLetterRecord {
        DeadLetterRecord {
            topic: "mcp.events.dlq".into(),
            partition: 0,
            offset: 3,
            key: Some(b"ctx-1".to_vec()),
            value: Some(value.to_vec()),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), Some(v.as_bytes().to_vec())))
                .collect(),
        }
    }

    #[test]
    fn ages_use_the_largest_whole_unit() {
        let secs = time::Duration::seconds;
        assert_eq!(age(secs(42)), "42s");
        assert_eq!(age(secs(5 * 60 + 59)), "5m");
        assert_eq!(age(secs(3 * 3_600)), "3h");
        assert_eq!(age(secs(2 * 86_400 + 5)), "2d");
        assert_eq!(age(secs(-10)), "0s");
    }

    #[test]
    fn table_truncates_reasons_and_aligns_columns() {
        let now = OffsetDateTime::parse(
            "2026-11-24T12:00:00Z",
            &time::format_description::well_known::Rfc3339,
        )
        .expect("time");
        let long = "x".repeat(100);
        let records = vec![record(
            &[
                (headers::ERROR_CLASS, "tool_failed"),
                (headers::ERROR_REASON, &format!("line one\n{long}")),
                (headers::SOURCE_TOPIC, "mcp.events.all"),
                (headers::SOURCE_PARTITION, "2"),
                (headers::SOURCE_OFFSET, "9"),
                (headers::ATTEMPTS, "3"),
                (headers::FAILED_AT, "2026-11-24T09:00:00Z"),
            ],
            b"{}",
        )];
        let text = table(&records, now);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("TOPIC"), "{text}");
        let cells: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(cells[0], "mcp.events.dlq");
        assert_eq!(cells[1], "0/3");
        assert_eq!(cells[2], "tool_failed");
        assert!(lines[1].contains("line one xxx"), "{text}");
        assert!(lines[1].contains('…'), "{text}");
        assert!(!lines[1].contains(&long), "{text}");
        assert!(
            lines[1].ends_with("ctx-1    mcp.events.all/2/9  3         3h"),
            "{text}"
        );
        // The header's columns start where the row's cells do.
        let at = lines[0].find("AGE").expect("AGE column");
        assert_eq!(&lines[1][lines[1].len() - 2..], "3h");
        assert_eq!(lines[1].chars().count() - 2, lines[0][..at].chars().count());
    }

    #[test]
    fn json_line_has_every_header_and_base64_for_binary_values() {
        let now = OffsetDateTime::now_utc();
        let text = record(&[(headers::ERROR_CLASS, "malformed_json")], b"\x00\xffbin");
        let line: Value = serde_json::from_str(&json_line(&text, now)).expect("json");
        assert_eq!(line["headers"]["baton.error.class"], "malformed_json");
        assert_eq!(line["class"], "malformed_json");
        assert_eq!(line["value_encoding"], "base64");
        assert_eq!(line["value"], BASE64.encode(b"\x00\xffbin"));
        assert_eq!(line["key"], "ctx-1");
        assert_eq!(line["context"], "ctx-1");
        assert_eq!(line["attempts"], Value::Null);
        let utf8 = record(&[], br#"{"a":1}"#);
        let line: Value = serde_json::from_str(&json_line(&utf8, now)).expect("json");
        assert_eq!(line["value"], r#"{"a":1}"#);
        assert_eq!(line["value_encoding"], "utf8");
    }
}
