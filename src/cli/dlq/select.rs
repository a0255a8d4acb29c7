//! Which dead letters an operator means: the record as read from the DLQ,
//! the filters (`--class`, `--context`, `--since`, `--after`), and the
//! bounded read of a topic from its beginning to its end.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::DlqToolError;
use crate::dlq::{ErrorClass, headers};
use crate::kafka::{ClientRole, KafkaSettings};

/// One record of the DLQ or the parked topic, as it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// Every header, in order; a name may repeat.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl DeadLetterRecord {
    pub fn from_message(message: &BorrowedMessage<'_>) -> DeadLetterRecord {
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default();
        DeadLetterRecord {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
            headers,
        }
    }

    /// The first header called `name`, when it is UTF-8 text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .and_then(|(_, value)| value.as_deref())
            .and_then(|value| std::str::from_utf8(value).ok())
    }

    /// `topic/partition/offset` of this record: the key of its replay log entry.
    pub fn coordinates(&self) -> String {
        format!("{}/{}/{}", self.topic, self.partition, self.offset)
    }

    pub fn class(&self) -> Option<ErrorClass> {
        self.header(headers::ERROR_CLASS)
            .and_then(ErrorClass::parse)
    }

    pub fn failed_at(&self) -> Option<OffsetDateTime> {
        self.header(headers::FAILED_AT)
            .and_then(|text| OffsetDateTime::parse(text, &Rfc3339).ok())
    }

    /// The topic the poison input was read from; replay republishes there.
    pub fn source_topic(&self) -> Option<&str> {
        self.header(headers::SOURCE_TOPIC)
            .filter(|topic| !topic.is_empty())
    }

    /// `topic/partition/offset` of the original input, when the headers say.
    pub fn source(&self) -> Option<String> {
        Some(format!(
            "{}/{}/{}",
            self.source_topic()?,
            self.header(headers::SOURCE_PARTITION)?,
            self.header(headers::SOURCE_OFFSET)?
        ))
    }

    /// The conversation: the key when it is text (baton keys by context),
    /// else the value's `context_id` (or its aliases) when the value is JSON.
    pub fn context(&self) -> Option<String> {
        if let Some(key) = self.key.as_deref()
            && let Ok(text) = std::str::from_utf8(key)
            && !text.is_empty()
        {
            return Some(text.to_string());
        }
        let value: serde_json::Value = serde_json::from_slice(self.value.as_deref()?).ok()?;
        ["context_id", "conversationId", "contextId"]
            .iter()
            .find_map(|field| value.get(field).and_then(|v| v.as_str()))
            .filter(|text| !text.is_empty())
            .map(str::to_string)
    }
}

/// The filters, validated.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Empty: every class.
    pub classes: BTreeSet<ErrorClass>,
    pub context: Option<String>,
    /// Records that failed at or after this instant (`--since`, `--after`).
    pub failed_from: Option<OffsetDateTime>,
    pub limit: Option<usize>,
}

impl Selection {
    /// Builds the selection from the flags; every problem is one line naming
    /// its flag and value.
    pub fn parse(
        classes: &[String],
        context: Option<&str>,
        since: Option<&str>,
        after: Option<&str>,
        limit: Option<usize>,
        now: OffsetDateTime,
    ) -> Result<Selection, Vec<String>> {
        let mut problems = Vec::new();
        let mut selection = Selection {
            context: context.map(str::to_string),
            limit,
            ..Selection::default()
        };
        for name in classes {
            match ErrorClass::parse(name) {
                Some(class) => {
                    selection.classes.insert(class);
                }
                None => problems.push(format!(
                    "--class: `{name}` is not an error class (one of {})",
                    ErrorClass::ALL.map(ErrorClass::as_str).join(", ")
                )),
            }
        }
        if let Some(text) = since {
            let from = parse_duration(text).and_then(|window| {
                time::Duration::try_from(window)
                    .ok()
                    .and_then(|window| now.checked_sub(window))
                    .ok_or_else(|| format!("`{text}` reaches back further than time does"))
            });
            match from {
                Ok(from) => selection.failed_from = Some(from),
                Err(why) => problems.push(format!("--since: {why}")),
            }
        }
        if let Some(text) = after {
            match OffsetDateTime::parse(text, &Rfc3339) {
                Ok(at) => {
                    selection.failed_from = Some(selection.failed_from.map_or(at, |f| f.max(at)))
                }
                Err(err) => problems.push(format!(
                    "--after: `{text}` is not an RFC 3339 time such as 2026-11-24T09:30:00Z ({err})"
                )),
            }
        }
        if limit == Some(0) {
            problems.push("--limit: must be at least 1".into());
        }
        if problems.is_empty() {
            Ok(selection)
        } else {
            Err(problems)
        }
    }

    /// Whether the filters keep `record` (the limit is applied by the caller).
    /// With a time filter, a record without a readable `baton.failed.at` is
    /// left out: nobody can say it failed in the window.
    pub fn matches(&self, record: &DeadLetterRecord) -> bool {
        if !self.classes.is_empty() && !record.class().is_some_and(|c| self.classes.contains(&c)) {
            return false;
        }
        if let Some(context) = &self.context
            && record.context().as_deref() != Some(context.as_str())
        {
            return false;
        }
        if let Some(from) = self.failed_from
            && record.failed_at().is_none_or(|at| at < from)
        {
            return false;
        }
        true
    }
}

/// `15m`, `2h`, `90s`, `2d`, `1w`, or a sum such as `1h30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = |why: &str| format!("`{text}` is not a duration such as 90s, 15m, 2h or 2d ({why})");
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(bad("empty"));
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for ch in trimmed.chars() {
        if ch.is_ascii_digit() {
            digits.push(ch);
            continue;
        }
        let unit: u64 = match ch {
            's' => 1,
            'm' => 60,
            'h' => 3_600,
            'd' => 86_400,
            'w' => 604_800,
            other => return Err(bad(&format!("unknown unit `{other}`"))),
        };
        if digits.is_empty() {
            return Err(bad("a unit needs a number before it"));
        }
        let amount: u64 = digits.parse().map_err(|_| bad("number too large"))?;
        digits.clear();
        total = amount
            .checked_mul(unit)
            .and_then(|secs| total.checked_add(secs))
            .ok_or_else(|| bad("too large"))?;
    }
    if !digits.is_empty() {
        return Err(bad("a number needs a unit: s, m, h, d or w"));
    }
    Ok(Duration::from_secs(total))
}

/// The reader's context: reaching the end of a partition is the goal, not an
/// error worth a log line.
struct QuietEof;

impl ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        if !crate::kafka::is_partition_eof(&error) {
            tracing::warn!(cause = %error, reason, "DLQ reader error");
        }
    }
}

impl ConsumerContext for QuietEof {}

/// Reads every committed record of `topic`'s `partitions` from the beginning
/// to the end of each partition, handing each to `visit`; returns how many
/// were read. Assigned, never subscribed: no group, no commits.
///
/// "The end" is the fetch-side end of partition (`enable.partition.eof`):
/// the end each partition had when the reader caught up with it, which for a
/// DLQ is the end it had when the command started. ListOffsets is not used,
/// because some brokers answer it wrongly (BROKER.md, gap 3); records that
/// arrive on a partition after its end was reached are not read.
///
/// Blocking: call from a blocking thread.
pub fn read_topic(
    settings: &KafkaSettings,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
    mut visit: impl FnMut(DeadLetterRecord),
) -> Result<u64, DlqToolError> {
    let read_error = |cause: String| DlqToolError::Read {
        topic: topic.to_string(),
        cause,
    };
    let mut config = settings.client_config(ClientRole::Consumer);
    // Assigned partitions, no commits: the group id is never joined, but
    // librdkafka needs one to assign.
    config
        .set("group.id", "baton-dlq-tools")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "50");
    let consumer: BaseConsumer<QuietEof> = config
        .create_with_context(QuietEof)
        .map_err(|err| read_error(err.to_string()))?;
    // Leaders known before the assignment: otherwise the first offset
    // lookup waits for a retry timer.
    consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|err| read_error(err.to_string()))?;
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        assignment
            .add_partition_offset(topic, *partition, Offset::Beginning)
            .map_err(|err| read_error(err.to_string()))?;
    }
    consumer
        .assign(&assignment)
        .map_err(|err| read_error(err.to_string()))?;
    let deadline = Instant::now() + timeout;
    let mut pending: BTreeSet<i32> = partitions.iter().copied().collect();
    let mut read = 0;
    while !pending.is_empty() {
        if Instant::now() >= deadline {
            return Err(DlqToolError::Timeout {
                topic: topic.to_string(),
                partitions: pending.into_iter().collect(),
                timeout,
            });
        }
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(message)) if pending.contains(&message.partition()) => {
                read += 1;
                visit(DeadLetterRecord::from_message(&message));
            }
            // Past its end: the partition grew after the command started.
            Some(Ok(_)) => {}
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                pending.remove(&partition);
            }
            Some(Err(err)) => {
                // Transport errors are retried by librdkafka until the deadline.
                tracing::debug!(cause = %err, topic, "DLQ read error; still reading");
            }
        }
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(headers: &[(&str, &str)], key: Option<&str>, value: &str) -> DeadLetterRecord {
        DeadLetterRecord {
            topic: "mcp.events.dlq".into(),
            partition: 1,
            offset: 7,
            key: key.map(|k| k.as_bytes().to_vec()),
            value: Some(value.as_bytes().to_vec()),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), Some(v.as_bytes().to_vec())))
                .collect(),
        }
    }

    #[test]
    fn durations_parse_with_units_and_sums() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7_200)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5_400)));
        for bad in ["", "15", "m", "15x", "1.5h", "-2h", "99999999999999999999s"] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains(&format!("`{bad}`")), "{err}");
        }
    }

    #[test]
    fn context_comes_from_the_key_then_the_json_value() {
        assert_eq!(
            record(&[], Some("ctx-1"), "x").context().as_deref(),
            Some("ctx-1")
        );
        assert_eq!(
            record(&[], None, r#"{"context_id":"ctx-2"}"#)
                .context()
                .as_deref(),
            Some("ctx-2")
        );
        assert_eq!(
            record(&[], None, r#"{"conversationId":"ctx-3"}"#)
                .context()
                .as_deref(),
            Some("ctx-3")
        );
        assert_eq!(record(&[], None, "not json").context(), None);
        let mut binary_key = record(&[], None, r#"{"context_id":"ctx-4"}"#);
        binary_key.key = Some(vec![0xff, 0xfe]);
        assert_eq!(binary_key.context().as_deref(), Some("ctx-4"));
    }

    #[test]
    fn selection_reports_every_bad_flag() {
        let now = OffsetDateTime::now_utc();
        let problems = Selection::parse(
            &["tool_failed".into(), "nope".into()],
            None,
            Some("15"),
            Some("yesterday"),
            Some(0),
            now,
        )
        .expect_err("bad flags");
        assert_eq!(problems.len(), 4, "{problems:?}");
        let too_far = Selection::parse(&[], None, Some("9999999w"), None, None, now)
            .expect_err("before the year -9999");
        assert!(too_far[0].starts_with("--since: `9999999w`"), "{too_far:?}");
        assert!(problems[0].starts_with("--class: `nope`"), "{problems:?}");
        assert!(problems[1].starts_with("--since: `15`"), "{problems:?}");
        assert!(
            problems[2].starts_with("--after: `yesterday`"),
            "{problems:?}"
        );
    }

    #[test]
    fn selection_filters_by_class_context_and_time() {
        let now = OffsetDateTime::parse("2026-11-24T12:00:00Z", &Rfc3339).expect("time");
        let recent = record(
            &[
                (headers::ERROR_CLASS, "tool_failed"),
                (headers::FAILED_AT, "2026-11-24T11:50:00Z"),
            ],
            Some("ctx-1"),
            "{}",
        );
        let old = record(
            &[
                (headers::ERROR_CLASS, "malformed_json"),
                (headers::FAILED_AT, "2026-11-20T11:50:00Z"),
            ],
            Some("ctx-2"),
            "{}",
        );
        let undated = record(&[(headers::ERROR_CLASS, "tool_failed")], None, "{}");
        let select = |classes: &[&str], context, since, after| {
            let classes: Vec<String> = classes.iter().map(|c| c.to_string()).collect();
            Selection::parse(&classes, context, since, after, None, now).expect("valid")
        };
        let all = select(&[], None, None, None);
        assert!(all.matches(&recent) && all.matches(&old) && all.matches(&undated));
        let failed = select(&["tool_failed"], None, None, None);
        assert!(failed.matches(&recent) && !failed.matches(&old) && failed.matches(&undated));
        let ctx = select(&[], Some("ctx-2"), None, None);
        assert!(!ctx.matches(&recent) && ctx.matches(&old));
        let window = select(&[], None, Some("15m"), None);
        assert!(window.matches(&recent) && !window.matches(&old) && !window.matches(&undated));
        let after = select(&[], None, None, Some("2026-11-01T00:00:00Z"));
        assert!(after.matches(&recent) && after.matches(&old));
        // Both: the later bound wins.
        let both = select(&[], None, Some("30d"), Some("2026-11-24T11:55:00Z"));
        assert!(!both.matches(&recent));
    }

    #[test]
    fn source_needs_all_three_headers() {
        let full = record(
            &[
                (headers::SOURCE_TOPIC, "mcp.events.all"),
                (headers::SOURCE_PARTITION, "2"),
                (headers::SOURCE_OFFSET, "17"),
            ],
            None,
            "",
        );
        assert_eq!(full.source().as_deref(), Some("mcp.events.all/2/17"));
        assert_eq!(full.source_topic(), Some("mcp.events.all"));
        assert_eq!(full.coordinates(), "mcp.events.dlq/1/7");
        let partial = record(&[(headers::SOURCE_TOPIC, "mcp.events.all")], None, "");
        assert_eq!(partial.source(), None);
        assert_eq!(record(&[], None, "").source_topic(), None);
    }
}
