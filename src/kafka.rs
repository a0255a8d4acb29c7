//! librdkafka configuration for every client baton owns.
//!
//! Defaults that exactly-once depends on are set here once; user properties
//! (`--kafka-prop`) are layered on top so SASL and TLS work against real
//! clusters. A property prefixed `consumer.`, `producer.` or `admin.` applies
//! to that kind of client only.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::metadata::Metadata;
use thiserror::Error;

/// Which client a configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRole {
    Consumer,
    Producer,
    Admin,
}

impl ClientRole {
    fn prefix(self) -> &'static str {
        match self {
            ClientRole::Consumer => "consumer.",
            ClientRole::Producer => "producer.",
            ClientRole::Admin => "admin.",
        }
    }
}

/// Connection settings shared by all clients of one process.
#[derive(Clone)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    /// `--kafka-prop` pairs, in the order given.
    pub properties: Vec<(String, String)>,
}

/// Secret values (`sasl.password`, ...) are redacted: settings end up in logs.
impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let properties: Vec<(&str, &str)> = self
            .properties
            .iter()
            .map(|(key, value)| (key.as_str(), crate::secret::shown_value(key, value)))
            .collect();
        f.debug_struct("KafkaSettings")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("properties", &properties)
            .finish()
    }
}

impl KafkaSettings {
    /// The base configuration for a client of `role`.
    pub fn client_config(&self, role: ClientRole) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        // Java's murmur2 partitioner, so records baton writes land on the same
        // partitions as records Java producers write for the same key.
        if role == ClientRole::Producer {
            config.set("partitioner", "murmur2_random");
        }
        for (key, value) in &self.properties {
            match strip_role_prefix(key) {
                Some((for_role, key)) if for_role == role => {
                    config.set(key, value);
                }
                Some(_) => {}
                None => {
                    config.set(key, value);
                }
            }
        }
        config
    }

    /// Consumer for an exactly-once input: read_committed, no auto-commit,
    /// cooperative rebalancing.
    pub fn eos_consumer_config(&self, group_id: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("enable.partition.eof", "false")
            // Prefetch is bounded per partition (librdkafka's default is
            // 64 MiB each, which a lagging pod with many partitions holds in
            // memory), as Kafka Streams bounds its buffered records per
            // partition. 8 MiB is still many commit intervals of input.
            .set("queued.max.messages.kbytes", "8192")
            .set("queued.min.messages", "10000");
        overlay(config, self.client_config(ClientRole::Consumer))
    }

    /// Transactional producer with a stable `transactional.id`: a restarted
    /// pod fences its predecessor and closes whatever it left open.
    pub fn transactional_producer_config(&self, transactional_id: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("transactional.id", transactional_id)
            .set("enable.idempotence", "true")
            .set("transaction.timeout.ms", "60000")
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "500000");
        overlay(config, self.client_config(ClientRole::Producer))
    }

    /// A plain (non-transactional) idempotent producer, for tools and tests.
    pub fn producer_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("enable.idempotence", "true");
        overlay(config, self.client_config(ClientRole::Producer))
    }
}

/// What librdkafka adds to every message on top of its key, value and
/// headers when it checks `message.max.bytes` (the record batch v2 framing of
/// one record, rounded up), and what each header costs beyond its bytes.
const RECORD_OVERHEAD_BYTES: usize = 64;
const HEADER_OVERHEAD_BYTES: usize = 12;

/// The size librdkafka counts for a message against `message.max.bytes`, or a
/// little more: a record this says fits is never refused locally as too large.
pub fn record_wire_size<'a>(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
) -> usize {
    let headers: usize = headers
        .into_iter()
        .map(|(name, value)| name.len() + value.map_or(0, <[u8]>::len) + HEADER_OVERHEAD_BYTES)
        .sum();
    RECORD_OVERHEAD_BYTES + key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len) + headers
}

/// The producer's effective `message.max.bytes`: what the user set, else
/// librdkafka's own default, read back from a native configuration so the
/// two can never disagree.
pub fn max_message_bytes(config: &ClientConfig) -> Result<usize, String> {
    let native = config
        .create_native_config()
        .map_err(|err| format!("invalid producer configuration: {err}"))?;
    let value = native
        .get("message.max.bytes")
        .map_err(|err| format!("cannot read message.max.bytes: {err}"))?;
    value
        .parse::<usize>()
        .map_err(|err| format!("message.max.bytes `{value}` is not a size: {err}"))
}

fn strip_role_prefix(key: &str) -> Option<(ClientRole, &str)> {
    [
        ClientRole::Consumer,
        ClientRole::Producer,
        ClientRole::Admin,
    ]
    .into_iter()
    .find_map(|role| key.strip_prefix(role.prefix()).map(|rest| (role, rest)))
}

/// Whether a client error is only the end of a partition, which a consumer
/// with `enable.partition.eof` reports on its queues as an event and
/// librdkafka's error callback repeats as a "global error" (not worth a log
/// line).
pub fn is_partition_eof(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::PartitionEOF(_)
            | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
    )
}

/// The consumer's `max.poll.interval.ms` when the user set it (bare or with
/// the `consumer.` prefix; the last one given wins, as in the client).
pub fn consumer_max_poll_interval_ms(properties: &[(String, String)]) -> Option<u64> {
    properties
        .iter()
        .filter(|(key, _)| match strip_role_prefix(key) {
            None => key == "max.poll.interval.ms",
            Some((ClientRole::Consumer, rest)) => rest == "max.poll.interval.ms",
            Some(_) => false,
        })
        .filter_map(|(_, value)| value.parse().ok())
        .next_back()
}

/// Applies every property of `top` over `base`; user settings win.
fn overlay(mut base: ClientConfig, top: ClientConfig) -> ClientConfig {
    for (key, value) in top.config_map() {
        base.set(key, value);
    }
    base
}

/// Properties baton sets itself because exactly-once depends on them: a
/// user's value would silently turn off read_committed, commit offsets
/// outside the transaction, share or drop the transactional id, lose
/// idempotence, or move records to partitions their state does not live on.
pub const RESERVED_PROPERTIES: &[&str] = &[
    "isolation.level",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "enable.partition.eof",
    "group.id",
    "partition.assignment.strategy",
    "transactional.id",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "partitioner",
];

/// Checks that librdkafka knows a property and accepts its value, so a typo
/// is reported at start-up with its key instead of deep inside a client.
/// The answer never holds a secret value.
pub fn check_property(key: &str, value: &str) -> Result<(), String> {
    let key = strip_role_prefix(key).map_or(key, |(_, rest)| rest);
    if RESERVED_PROPERTIES.contains(&key) {
        return Err(
            "baton sets this itself for exactly-once delivery and it cannot be overridden".into(),
        );
    }
    let mut config = ClientConfig::new();
    config.set(key, value);
    config.create_native_config().map(|_| ()).map_err(|err| {
        let description = match err {
            KafkaError::ClientConfig(_, description, _, _) => description,
            other => other.to_string(),
        };
        crate::secret::scrub(&description, key, value)
    })
}

/// Splits `KEY=VALUE` entries (each labelled with where it came from) and
/// checks every one; a problem names the key, or for a malformed entry its
/// place, and never shows a value.
pub fn parse_properties(
    entries: &[(String, String)],
    problems: &mut Vec<String>,
) -> Vec<(String, String)> {
    let mut properties = Vec::new();
    for (place, entry) in entries {
        match entry.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                let key = key.trim();
                match check_property(key, value) {
                    Ok(()) => properties.push((key.to_string(), value.to_string())),
                    Err(reason) => problems.push(format!("kafka_prop.{key}: {reason}")),
                }
            }
            _ => problems.push(format!(
                "kafka_prop: {place} is not KEY=VALUE (its text is not shown: it may hold a secret)"
            )),
        }
    }
    properties
}

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error(
        "cannot reach Kafka at {bootstrap} after {attempts} attempts over {elapsed:?}: {cause}"
    )]
    Unreachable {
        bootstrap: String,
        attempts: u32,
        elapsed: Duration,
        cause: String,
    },
    #[error("cannot create a Kafka client: {0}")]
    Client(#[source] KafkaError),
}

/// Fetches cluster metadata, retrying with capped backoff until `deadline`.
/// Blocking: call from a blocking thread.
pub fn fetch_metadata_with_retry(
    settings: &KafkaSettings,
    deadline: Duration,
) -> Result<Metadata, ConnectError> {
    let consumer: BaseConsumer = settings
        .client_config(ClientRole::Admin)
        .create()
        .map_err(ConnectError::Client)?;
    let started = std::time::Instant::now();
    let mut attempts = 0;
    let mut backoff = Duration::from_millis(200);
    loop {
        attempts += 1;
        let remaining = deadline.saturating_sub(started.elapsed());
        let timeout = remaining.clamp(Duration::from_millis(100), Duration::from_secs(5));
        match consumer.fetch_metadata(None, timeout) {
            Ok(metadata) => return Ok(metadata),
            Err(err) => {
                let elapsed = started.elapsed();
                if elapsed + backoff >= deadline {
                    return Err(ConnectError::Unreachable {
                        bootstrap: settings.bootstrap_servers.clone(),
                        attempts,
                        elapsed,
                        cause: err.to_string(),
                    });
                }
                tracing::warn!(attempt = attempts, cause = %err, "Kafka not reachable yet; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(props: &[(&str, &str)]) -> KafkaSettings {
        KafkaSettings {
            bootstrap_servers: "127.0.0.1:9".into(),
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn the_consumers_poll_interval_is_read_bare_or_prefixed() {
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(consumer_max_poll_interval_ms(&pairs(&[])), None);
        assert_eq!(
            consumer_max_poll_interval_ms(&pairs(&[
                ("max.poll.interval.ms", "100000"),
                ("producer.max.poll.interval.ms", "1"),
                ("consumer.max.poll.interval.ms", "50000"),
            ])),
            Some(50000)
        );
    }

    #[test]
    fn role_prefixed_properties_reach_only_their_client() {
        let s = settings(&[
            ("security.protocol", "SASL_SSL"),
            ("producer.linger.ms", "20"),
            ("consumer.session.timeout.ms", "6000"),
        ]);
        let producer = s.transactional_producer_config("app-0");
        assert_eq!(producer.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(producer.get("linger.ms"), Some("20"));
        assert_eq!(producer.get("session.timeout.ms"), None);
        assert_eq!(producer.get("partitioner"), Some("murmur2_random"));
        let consumer = s.eos_consumer_config("app");
        assert_eq!(consumer.get("session.timeout.ms"), Some("6000"));
        assert_eq!(consumer.get("isolation.level"), Some("read_committed"));
        assert_eq!(consumer.get("linger.ms"), None);
    }

    #[test]
    fn properties_exactly_once_needs_are_refused_by_name() {
        for key in [
            "isolation.level",
            "consumer.enable.auto.commit",
            "producer.transactional.id",
            "enable.idempotence",
        ] {
            let err = check_property(key, "x").expect_err(key);
            assert!(err.contains("exactly-once"), "{key}: {err}");
        }
        let mut problems = Vec::new();
        let entries = vec![
            (
                "--kafka-prop 1".to_string(),
                "sasl.password=a,b=c".to_string(),
            ),
            (
                "--kafka-prop 2".to_string(),
                "isolation.level=read_uncommitted".to_string(),
            ),
            ("--kafka-prop 3".to_string(), "s3cr3t-fragment".to_string()),
        ];
        let properties = parse_properties(&entries, &mut problems);
        assert_eq!(
            properties,
            vec![("sasl.password".to_string(), "a,b=c".to_string())]
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("kafka_prop.isolation.level: "),
            "{problems:?}"
        );
        assert!(problems[1].contains("--kafka-prop 3"), "{problems:?}");
        assert!(
            problems
                .iter()
                .all(|p| !p.contains("s3cr3t") && !p.contains("a,b")),
            "{problems:?}"
        );
        let shown = format!(
            "{:?}",
            settings(&[("sasl.password", "a,b=c"), ("linger.ms", "5")])
        );
        assert!(
            !shown.contains("a,b=c") && shown.contains("linger.ms"),
            "{shown}"
        );
    }

    #[test]
    fn unknown_properties_are_reported() {
        assert!(check_property("linger.ms", "5").is_ok());
        let err = check_property("no.such.property", "1").expect_err("unknown key");
        assert!(err.contains("no.such.property"), "{err}");
    }
}

/// The partition Kafka's default partitioner (and librdkafka's
/// `murmur2_random`, which every baton producer uses) picks for a keyed
/// record: murmur2 of the key, made positive, modulo the partition count.
/// It tells any pod which partition, and so which task, owns a context.
pub fn partition_for_key(key: &[u8], partitions: i32) -> i32 {
    if partitions <= 0 {
        return 0;
    }
    ((murmur2(key) & 0x7fff_ffff) % partitions as u32) as i32
}

/// Kafka's murmur2 (the Java client's `Utils.murmur2`, seed 0x9747b28c).
fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod partitioner_tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Kafka's UtilsTest.testMurmur2 vectors.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(
                murmur2(key) as i32,
                expected,
                "{}",
                String::from_utf8_lossy(key)
            );
        }
        assert!((0..6).contains(&partition_for_key(b"ctx-1", 6)));
    }
}

#[cfg(test)]
mod sizing_tests {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord};

    use super::*;

    /// librdkafka itself is the judge: a record our estimate says fits
    /// `message.max.bytes` must be accepted locally, and the estimate must not
    /// be far above what librdkafka counts.
    #[test]
    fn the_size_estimate_never_lets_librdkafka_refuse_a_record() {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("message.max.bytes", "10000");
        assert_eq!(max_message_bytes(&config), Ok(10_000));
        let producer: BaseProducer = config.create().expect("producer");
        let header_value = vec![b'h'; 300];
        let headers = || {
            OwnedHeaders::new()
                .insert(Header {
                    key: "baton.error.reason",
                    value: Some(header_value.as_slice()),
                })
                .insert(Header {
                    key: "baton.source.topic",
                    value: Some(b"mcp.events.all".as_slice()),
                })
        };
        let key = b"ctx-1".as_slice();
        let estimate = |value: &[u8]| {
            record_wire_size(
                Some(key),
                Some(value),
                [
                    ("baton.error.reason", Some(header_value.as_slice())),
                    ("baton.source.topic", Some(b"mcp.events.all".as_slice())),
                ],
            )
        };
        let fixed = estimate(&[]);
        let fits = vec![b'v'; 10_000 - fixed];
        assert_eq!(estimate(&fits), 10_000);
        let sent = producer.send(
            BaseRecord::to("t")
                .key(key)
                .payload(fits.as_slice())
                .headers(headers()),
        );
        assert!(sent.is_ok(), "a record the estimate accepts is accepted");
        // librdkafka's own overhead is smaller than ours, but not by much.
        let over = vec![b'v'; 10_000 - fixed + 64];
        let refused = producer.send(
            BaseRecord::to("t")
                .key(key)
                .payload(over.as_slice())
                .headers(headers()),
        );
        match refused {
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {}
            other => panic!(
                "expected MessageSizeTooLarge, got {:?}",
                other.err().map(|e| e.0)
            ),
        }
    }
}
