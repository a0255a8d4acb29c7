//! Run configuration: flags and `BATON_*` variables first, then an optional
//! TOML file, then defaults; validated in one step that names every bad key.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cli::{HttpAuthMode, RegistryArgs, RunArgs};
use crate::codec::{DecodeLimits, InputFormat};
use crate::dlq::DEFAULT_DLQ_TOPIC;
use crate::kafka::{self, KafkaSettings};
use crate::registry::{RegistryConfig, SubjectStrategy};
use crate::secret::Secret;

pub const DEFAULT_INPUT_TOPIC: &str = "mcp.events.all";
pub const DEFAULT_APPLICATION_ID: &str = "baton";
pub const DEFAULT_STATUS_TOPIC: &str = "mcp.orchestration.status";
pub const DEFAULT_MEMORY_TOPIC: &str = "mcp.memory";
/// Timers a task fires in one round: a burst of due timers (after an outage,
/// say) is spread over rounds instead of filling one transaction.
pub const DEFAULT_MAX_TIMERS_PER_ROUND: usize = 1_000;

/// The optional TOML file. Unknown keys are an error, not a silent typo.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub bootstrap_servers: Option<String>,
    pub application_id: Option<String>,
    pub instance_id: Option<String>,
    pub input_topics: Option<Vec<String>>,
    pub topology: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub http_addr: Option<String>,
    pub commit_interval_ms: Option<u64>,
    pub dlq_topic: Option<String>,
    pub max_record_bytes: Option<usize>,
    pub max_held_records: Option<usize>,
    pub max_held_bytes: Option<usize>,
    pub max_memory_bytes: Option<usize>,
    pub max_context_id_bytes: Option<usize>,
    pub state_memory_bytes: Option<usize>,
    pub max_timers_per_round: Option<usize>,
    pub transaction_call_timeout_ms: Option<u64>,
    pub transaction_recovery_timeout_ms: Option<u64>,
    pub startup_timeout_ms: Option<u64>,
    /// Per input topic: `avro`, `json` or `auto` (the default).
    #[serde(default)]
    pub input_formats: BTreeMap<String, String>,
    pub schema_registry_url: Option<String>,
    pub schema_registry_username: Option<String>,
    pub schema_registry_password: Option<Secret>,
    pub schema_registry_ca_file: Option<PathBuf>,
    pub schema_registry_cert_file: Option<PathBuf>,
    pub schema_registry_key_file: Option<PathBuf>,
    pub schema_registry_timeout_ms: Option<u64>,
    pub subject_name_strategy: Option<SubjectStrategy>,
    pub auto_register_schemas: Option<bool>,
    pub status_topic: Option<String>,
    pub memory_topic: Option<String>,
    pub control_topic: Option<String>,
    pub public_url: Option<String>,
    pub advertised_url: Option<String>,
    pub snapshots: Option<SnapshotMode>,
    pub live_feed: Option<LiveFeedMode>,
    pub snapshot_expiry_secs: Option<u64>,
    pub snapshot_retention_secs: Option<u64>,
    pub max_snapshots_per_context: Option<usize>,
    pub sse_heartbeat_ms: Option<u64>,
    pub http_auth: Option<HttpAuthMode>,
    pub http_auth_token_file: Option<PathBuf>,
    pub metrics_addr: Option<String>,
    pub http_header_timeout_ms: Option<u64>,
    pub http_idle_timeout_ms: Option<u64>,
    pub http_max_connections: Option<usize>,
    pub sse_max_lifetime_secs: Option<u64>,
    pub max_feeds_per_token: Option<usize>,
    pub render_concurrency: Option<usize>,
    pub max_token_budget: Option<u64>,
    pub max_json_depth: Option<usize>,
    pub max_schema_depth: Option<usize>,
    /// librdkafka properties, passed through as they are.
    #[serde(default)]
    pub kafka: BTreeMap<String, String>,
}

/// Everything `baton run` needs, resolved and validated.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub kafka: KafkaSettings,
    pub application_id: String,
    pub instance_id: String,
    pub input_topics: Vec<String>,
    pub topology: PathBuf,
    pub state_dir: PathBuf,
    pub http_addr: SocketAddr,
    pub commit_interval: Duration,
    pub dlq_topic: String,
    pub limits: DecodeLimits,
    /// Bounds on one context: held records, memory, its id.
    pub context_limits: ContextLimits,
    /// What the pod's RocksDB stores share: block cache and memtables.
    pub state_memory_bytes: usize,
    /// Timers a task fires per round; the rest wait for the next round.
    pub max_timers_per_round: usize,
    /// How long one transactional call may block before it counts as failed.
    pub transaction_call_timeout: Duration,
    /// How long one commit cycle, recovery included, may block the thread
    /// that also runs rebalances; past it the pod exits.
    pub transaction_recovery_timeout: Duration,
    /// How long start-up keeps trying to reach the brokers before giving up.
    pub startup_timeout: Duration,
    /// Per input topic; topics not named are `auto`.
    pub input_formats: HashMap<String, InputFormat>,
    /// Set: Avro input is decodable and handovers are written as Avro.
    pub schema_registry: Option<RegistryConfig>,
    pub status_topic: String,
    /// Off: no status records are written, and `/events` answers 404.
    pub live_feed: bool,
    pub memory_topic: String,
    /// The healer's commands, co-partitioned with the input topics.
    pub control_topic: String,
    pub advertised_url: String,
    pub snapshots: Option<SnapshotConfig>,
    pub sse_heartbeat: Duration,
    /// Who may call the HTTP surface and what a client may hold there.
    pub guards: crate::http::Guards,
    /// `/metrics` (and the probes) on a listener of their own.
    pub metrics_addr: Option<SocketAddr>,
    /// HMAC key of `{app}-members` records.
    pub membership_secret: Secret,
}

/// Bounds on what one context may hold (see [`crate::workflow::Policy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextLimits {
    pub max_held_records: usize,
    pub max_held_bytes: usize,
    pub max_memory_bytes: usize,
    pub max_context_id_bytes: usize,
}

impl Default for ContextLimits {
    fn default() -> Self {
        use crate::workflow::plan;
        ContextLimits {
            max_held_records: plan::DEFAULT_MAX_HELD_RECORDS,
            max_held_bytes: plan::DEFAULT_MAX_HELD_BYTES,
            max_memory_bytes: plan::DEFAULT_MAX_MEMORY_BYTES,
            max_context_id_bytes: plan::DEFAULT_MAX_CONTEXT_ID_BYTES,
        }
    }
}

/// Whether handovers carry signed memory snapshot URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    #[default]
    Enabled,
    Disabled,
}

/// Whether every state change is written to the status topic for the live
/// feed (`/events`, the dashboard). Off, an input costs one record less.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LiveFeedMode {
    #[default]
    Enabled,
    Disabled,
}

/// Memory snapshots: how their URLs are signed and how long they live.
#[derive(Clone)]
pub struct SnapshotConfig {
    pub public_url: String,
    pub secret: Vec<u8>,
    pub previous_secret: Option<Vec<u8>>,
    pub expiry: Duration,
    pub retention: Duration,
    pub max_per_context: usize,
}

impl fmt::Debug for SnapshotConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the keys.
        f.debug_struct("SnapshotConfig")
            .field("public_url", &self.public_url)
            .field("expiry", &self.expiry)
            .field("retention", &self.retention)
            .field("max_per_context", &self.max_per_context)
            .finish_non_exhaustive()
    }
}

impl RunConfig {
    /// The pod's stable transactional id: a restart fences its predecessor.
    pub fn transactional_id(&self) -> String {
        format!("{}-{}", self.application_id, self.instance_id)
    }

    /// The consumer group all pods of one application share.
    pub fn group_id(&self) -> &str {
        &self.application_id
    }
}

/// Every problem found, one per line, each naming its key.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "invalid configuration: {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn one(problem: String) -> Self {
        ConfigError {
            problems: vec![problem],
        }
    }
}

/// Reads the TOML file, reporting a parse error on one line with its key.
pub fn read_file_config(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        ConfigError::one(format!("config: cannot read {}: {err}", path.display()))
    })?;
    toml::from_str(&text).map_err(|err| {
        let message = err.message().replace('\n', " ");
        let location = err
            .span()
            .map(|span| {
                let line = text[..span.start].matches('\n').count() + 1;
                format!(" (line {line})")
            })
            .unwrap_or_default();
        ConfigError::one(format!("{}{location}: {message}", path.display()))
    })
}

impl RunConfig {
    /// Merges flags over the file over defaults, then validates everything.
    pub fn resolve(args: &RunArgs) -> Result<RunConfig, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        let mut problems = Vec::new();
        let schema_registry = registry_config(&args.registry, &file, &mut problems);
        let guard = &args.guard;
        let (guards, metrics_addr) = http_guards(guard, &file, &mut problems);

        let bootstrap_servers = args
            .bootstrap_servers
            .clone()
            .or(file.bootstrap_servers)
            .unwrap_or_default();
        if bootstrap_servers.trim().is_empty() {
            problems.push(
                "bootstrap_servers: required (--bootstrap-servers or BATON_BOOTSTRAP_SERVERS)"
                    .into(),
            );
        }

        let application_id = args
            .application_id
            .clone()
            .or(file.application_id)
            .unwrap_or_else(|| DEFAULT_APPLICATION_ID.into());
        check_name("application_id", &application_id, &mut problems);

        let instance_id = args
            .instance_id
            .clone()
            .or(file.instance_id)
            .or_else(default_instance_id)
            .unwrap_or_default();
        check_name("instance_id", &instance_id, &mut problems);

        let input_topics = if !args.input_topics.is_empty() {
            args.input_topics.clone()
        } else {
            file.input_topics
                .unwrap_or_else(|| vec![DEFAULT_INPUT_TOPIC.into()])
        };
        if input_topics.is_empty() {
            problems.push("input_topics: at least one topic is required".into());
        }
        for topic in &input_topics {
            if let Err(reason) = check_topic_name(topic) {
                problems.push(format!("input_topics: `{topic}` {reason}"));
            }
        }

        let topology = args
            .topology
            .clone()
            .or(file.topology)
            .unwrap_or_else(|| PathBuf::from("topology"));
        if !topology.exists() {
            problems.push(format!("topology: {} does not exist", topology.display()));
        }

        let state_dir = args
            .state_dir
            .clone()
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from("baton-state"));

        let http_addr_text = args
            .http_addr
            .clone()
            .or(file.http_addr)
            .unwrap_or_else(|| "127.0.0.1:8080".into());
        let http_addr = match http_addr_text.parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => {
                problems.push(format!(
                    "http_addr: `{http_addr_text}` is not an address like 0.0.0.0:8080"
                ));
                SocketAddr::from(([127, 0, 0, 1], 8080))
            }
        };

        let commit_interval_ms = args
            .commit_interval_ms
            .or(file.commit_interval_ms)
            .unwrap_or(100);
        if !(1..=60_000).contains(&commit_interval_ms) {
            problems.push(format!(
                "commit_interval_ms: {commit_interval_ms} is outside 1..=60000"
            ));
        }

        let dlq_topic = args
            .dlq_topic
            .clone()
            .or(file.dlq_topic)
            .unwrap_or_else(|| DEFAULT_DLQ_TOPIC.into());
        if let Err(reason) = check_topic_name(&dlq_topic) {
            problems.push(format!("dlq_topic: `{dlq_topic}` {reason}"));
        }

        let max_record_bytes = args
            .max_record_bytes
            .or(file.max_record_bytes)
            .unwrap_or(DecodeLimits::default().max_record_bytes);
        if !(64..=64 * 1024 * 1024).contains(&max_record_bytes) {
            problems.push(format!(
                "max_record_bytes: {max_record_bytes} is outside 64..=67108864"
            ));
        }

        let defaults = ContextLimits::default();
        let mut bounded = |name: &str,
                           value: Option<usize>,
                           default: usize,
                           range: std::ops::RangeInclusive<usize>| {
            let value = value.unwrap_or(default);
            if !range.contains(&value) {
                problems.push(format!(
                    "{name}: {value} is outside {}..={}",
                    range.start(),
                    range.end()
                ));
            }
            value
        };
        let context_limits = ContextLimits {
            max_held_records: bounded(
                "max_held_records",
                args.max_held_records.or(file.max_held_records),
                defaults.max_held_records,
                0..=100_000,
            ),
            max_held_bytes: bounded(
                "max_held_bytes",
                args.max_held_bytes.or(file.max_held_bytes),
                defaults.max_held_bytes,
                0..=64 * 1024 * 1024,
            ),
            max_memory_bytes: bounded(
                "max_memory_bytes",
                args.max_memory_bytes.or(file.max_memory_bytes),
                defaults.max_memory_bytes,
                1024..=64 * 1024 * 1024,
            ),
            max_context_id_bytes: bounded(
                "max_context_id_bytes",
                args.max_context_id_bytes.or(file.max_context_id_bytes),
                defaults.max_context_id_bytes,
                1..=64 * 1024,
            ),
        };

        let max_timers_per_round = bounded(
            "max_timers_per_round",
            args.max_timers_per_round.or(file.max_timers_per_round),
            DEFAULT_MAX_TIMERS_PER_ROUND,
            1..=100_000,
        );
        let state_memory_bytes = bounded(
            "state_memory_bytes",
            args.state_memory_bytes.or(file.state_memory_bytes),
            crate::state::DEFAULT_STATE_MEMORY_BYTES,
            16 * 1024 * 1024..=64 * 1024 * 1024 * 1024,
        );
        let transaction_call_timeout_ms = args
            .transaction_call_timeout_ms
            .or(file.transaction_call_timeout_ms)
            .unwrap_or(crate::transactor::TRANSACTION_TIMEOUT.as_millis() as u64);
        if !(100..=300_000).contains(&transaction_call_timeout_ms) {
            problems.push(format!(
                "transaction_call_timeout_ms: {transaction_call_timeout_ms} is outside 100..=300000"
            ));
        }

        let transaction_recovery_timeout_ms = args
            .transaction_recovery_timeout_ms
            .or(file.transaction_recovery_timeout_ms)
            .unwrap_or(crate::transactor::RECOVERY_DEADLINE.as_millis() as u64);
        if !(transaction_call_timeout_ms..=240_000).contains(&transaction_recovery_timeout_ms) {
            problems.push(format!(
                "transaction_recovery_timeout_ms: {transaction_recovery_timeout_ms} is outside \
                 {transaction_call_timeout_ms}..=240000 (at least one call's timeout, and below \
                 the consumer's max.poll.interval.ms)"
            ));
        }

        let startup_timeout_ms = args
            .startup_timeout_ms
            .or(file.startup_timeout_ms)
            .unwrap_or(30_000);
        if !(100..=600_000).contains(&startup_timeout_ms) {
            problems.push(format!(
                "startup_timeout_ms: {startup_timeout_ms} is outside 100..=600000"
            ));
        }

        let mut format_names: Vec<(String, String)> = file.input_formats.into_iter().collect();
        for pair in &args.input_formats {
            match pair.split_once('=') {
                Some((topic, format)) if !topic.trim().is_empty() => {
                    format_names.push((topic.trim().to_string(), format.trim().to_string()))
                }
                _ => problems.push(format!(
                    "input_format: `{pair}` is not TOPIC=avro|json|auto"
                )),
            }
        }
        let mut input_formats = HashMap::new();
        for (topic, name) in format_names {
            let Some(format) = InputFormat::parse(&name) else {
                problems.push(format!(
                    "input_formats.{topic}: `{name}` is not one of avro, json, auto"
                ));
                continue;
            };
            if !input_topics.contains(&topic) {
                problems.push(format!("input_formats.{topic}: not an input topic"));
            }
            if format == InputFormat::Avro && schema_registry.is_none() {
                problems.push(format!(
                    "input_formats.{topic}: avro needs a schema registry (--schema-registry-url)"
                ));
            }
            input_formats.insert(topic, format);
        }

        let surface = &args.surface;
        let status_topic = surface
            .status_topic
            .clone()
            .or(file.status_topic)
            .unwrap_or_else(|| DEFAULT_STATUS_TOPIC.into());
        let memory_topic = surface
            .memory_topic
            .clone()
            .or(file.memory_topic)
            .unwrap_or_else(|| DEFAULT_MEMORY_TOPIC.into());
        let control_topic = surface
            .control_topic
            .clone()
            .or(file.control_topic)
            .unwrap_or_else(|| crate::control::DEFAULT_CONTROL_TOPIC.into());
        for (key, topic) in [
            ("status_topic", &status_topic),
            ("memory_topic", &memory_topic),
            ("control_topic", &control_topic),
        ] {
            if let Err(reason) = check_topic_name(topic) {
                problems.push(format!("{key}: `{topic}` {reason}"));
            }
        }
        if input_topics.contains(&memory_topic) {
            problems.push(format!(
                "memory_topic: `{memory_topic}` is also an input topic"
            ));
        }
        if input_topics.contains(&control_topic) || control_topic == memory_topic {
            problems.push(format!(
                "control_topic: `{control_topic}` is also an input or the memory topic"
            ));
        }
        let advertised_url = surface
            .advertised_url
            .clone()
            .or(file.advertised_url)
            .unwrap_or_else(|| default_advertised_url(http_addr, &instance_id));
        if let Err(reason) = crate::members::check_advertised_url(&advertised_url) {
            problems.push(format!("advertised_url: {reason}"));
        }
        let sse_heartbeat_ms = surface
            .sse_heartbeat_ms
            .or(file.sse_heartbeat_ms)
            .unwrap_or(15_000);
        if !(100..=300_000).contains(&sse_heartbeat_ms) {
            problems.push(format!(
                "sse_heartbeat_ms: {sse_heartbeat_ms} is outside 100..=300000"
            ));
        }
        let snapshots = match surface.snapshots.or(file.snapshots).unwrap_or_default() {
            SnapshotMode::Disabled => None,
            SnapshotMode::Enabled => {
                let public_url = surface
                    .public_url
                    .clone()
                    .or(file.public_url.clone())
                    .unwrap_or_else(|| advertised_url.clone());
                check_url("public_url", &public_url, &mut problems);
                let secret = surface
                    .snapshot_secret
                    .as_ref()
                    .map(|secret| secret.expose().to_string())
                    .unwrap_or_default();
                if secret.is_empty() {
                    problems.push(
                        "snapshot_secret: BATON_SNAPSHOT_SECRET is required to sign memory snapshot URLs (or run with --snapshots disabled)"
                            .into(),
                    );
                } else if secret.len() < 32 {
                    problems.push(
                        "snapshot_secret: BATON_SNAPSHOT_SECRET is too short: use at least 32 random bytes"
                            .into(),
                    );
                }
                let expiry_secs = surface
                    .snapshot_expiry_secs
                    .or(file.snapshot_expiry_secs)
                    .unwrap_or(86_400);
                let retention_secs = surface
                    .snapshot_retention_secs
                    .or(file.snapshot_retention_secs)
                    .unwrap_or(7 * 86_400);
                let max_per_context = surface
                    .max_snapshots_per_context
                    .or(file.max_snapshots_per_context)
                    .unwrap_or(64);
                if !(1..=365 * 86_400).contains(&expiry_secs) {
                    problems.push(format!(
                        "snapshot_expiry_secs: {expiry_secs} is outside 1..=31536000"
                    ));
                }
                if !(1..=3650 * 86_400).contains(&retention_secs) {
                    problems.push(format!(
                        "snapshot_retention_secs: {retention_secs} is outside 1..=315360000"
                    ));
                }
                if !(1..=10_000).contains(&max_per_context) {
                    problems.push(format!(
                        "max_snapshots_per_context: {max_per_context} is outside 1..=10000"
                    ));
                }
                Some(SnapshotConfig {
                    public_url: public_url.trim_end_matches('/').to_string(),
                    secret: secret.into_bytes(),
                    previous_secret: surface
                        .snapshot_secret_previous
                        .as_ref()
                        .filter(|previous| !previous.is_empty())
                        .map(|previous| previous.expose().as_bytes().to_vec()),
                    expiry: Duration::from_secs(expiry_secs),
                    retention: Duration::from_secs(retention_secs),
                    max_per_context,
                })
            }
        };

        // A feed that sends nothing for the idle timeout is cut, so
        // heartbeats must come more often.
        let idle_ms = guards.limits.idle_timeout.as_millis() as u64;
        if sse_heartbeat_ms >= idle_ms {
            problems.push(format!(
                "sse_heartbeat_ms: {sse_heartbeat_ms} must be shorter than http_idle_timeout_ms ({idle_ms})"
            ));
        }
        let membership_secret = match (&guard.membership_secret, &snapshots) {
            (Some(secret), _) if !secret.is_empty() => secret.clone(),
            (_, Some(snapshots)) => Secret::new(String::from_utf8_lossy(&snapshots.secret)),
            _ => {
                problems.push(
                    "membership_secret: BATON_MEMBERSHIP_SECRET is required to sign membership records when snapshots are disabled"
                        .into(),
                );
                Secret::default()
            }
        };
        if !membership_secret.is_empty()
            && membership_secret.expose().len() < crate::snapshot_url::MIN_SECRET_BYTES
        {
            problems.push(
                "membership_secret: BATON_MEMBERSHIP_SECRET is too short: use at least 32 random bytes"
                    .into(),
            );
        }
        let max_token_budget = guard
            .max_token_budget
            .or(file.max_token_budget)
            .unwrap_or(crate::codec::DEFAULT_MAX_TOKEN_BUDGET);
        if !(1..=i64::MAX as u64).contains(&max_token_budget) {
            problems.push(format!(
                "max_token_budget: {max_token_budget} is outside 1..={}",
                i64::MAX
            ));
        }
        let max_json_depth = guard
            .max_json_depth
            .or(file.max_json_depth)
            .unwrap_or(crate::codec::DEFAULT_MAX_JSON_DEPTH);
        if !(8..=crate::codec::MAX_JSON_DEPTH).contains(&max_json_depth) {
            problems.push(format!(
                "max_json_depth: {max_json_depth} is outside 8..={}",
                crate::codec::MAX_JSON_DEPTH
            ));
        }
        let max_schema_depth = guard
            .max_schema_depth
            .or(file.max_schema_depth)
            .unwrap_or(crate::codec::DEFAULT_MAX_SCHEMA_DEPTH);
        if !(4..=crate::codec::MAX_SCHEMA_DEPTH).contains(&max_schema_depth) {
            problems.push(format!(
                "max_schema_depth: {max_schema_depth} is outside 4..={}",
                crate::codec::MAX_SCHEMA_DEPTH
            ));
        }

        let mut file_properties: Vec<(String, String)> = Vec::new();
        for (key, value) in file.kafka {
            file_properties.push((format!("config [kafka] {key}"), format!("{key}={value}")));
        }
        let mut properties = kafka::parse_properties(&file_properties, &mut problems);
        properties.extend(args.kafka.collect(&mut problems));
        if let Some(poll_interval_ms) = kafka::consumer_max_poll_interval_ms(&properties)
            && transaction_recovery_timeout_ms >= poll_interval_ms
        {
            problems.push(format!(
                "transaction_recovery_timeout_ms: {transaction_recovery_timeout_ms} must be below \
                 the consumer's max.poll.interval.ms ({poll_interval_ms}): a commit that blocks \
                 longer makes the group's rebalances wait for this pod"
            ));
        }

        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        Ok(RunConfig {
            kafka: KafkaSettings {
                bootstrap_servers,
                properties,
            },
            application_id,
            instance_id,
            input_topics,
            topology,
            state_dir,
            http_addr,
            commit_interval: Duration::from_millis(commit_interval_ms),
            dlq_topic,
            limits: DecodeLimits {
                max_record_bytes,
                max_token_budget,
                max_json_depth,
                max_schema_depth,
            },
            context_limits,
            state_memory_bytes,
            max_timers_per_round,
            transaction_call_timeout: Duration::from_millis(transaction_call_timeout_ms),
            transaction_recovery_timeout: Duration::from_millis(transaction_recovery_timeout_ms),
            startup_timeout: Duration::from_millis(startup_timeout_ms),
            input_formats,
            schema_registry,
            status_topic,
            memory_topic,
            control_topic,
            advertised_url,
            snapshots,
            live_feed: surface.live_feed.or(file.live_feed).unwrap_or_default()
                == LiveFeedMode::Enabled,
            sse_heartbeat: Duration::from_millis(sse_heartbeat_ms),
            guards,
            metrics_addr,
            membership_secret,
        })
    }
}

/// The HTTP surface's guards from flags over the file: tokens (required
/// unless `--http-auth none`), connection and feed bounds.
fn http_guards(
    guard: &crate::cli::GuardArgs,
    file: &FileConfig,
    problems: &mut Vec<String>,
) -> (crate::http::Guards, Option<SocketAddr>) {
    use crate::http::auth::{self, Auth};
    let defaults = crate::http::Guards::default();
    let mode = guard.http_auth.or(file.http_auth).unwrap_or_default();
    let token_file = guard
        .http_auth_token_file
        .clone()
        .or(file.http_auth_token_file.clone());
    let tokens = auth::collect_tokens(
        guard.http_auth_tokens.as_ref().map(Secret::expose),
        token_file.as_deref(),
        problems,
    );
    let auth = match mode {
        HttpAuthMode::None => {
            if !tokens.is_empty() {
                problems.push(
                    "http_auth: `none` with tokens configured; drop the tokens or the `none`"
                        .into(),
                );
            }
            Auth::Open
        }
        HttpAuthMode::Tokens => {
            if tokens.is_empty() {
                problems.push(
                    "http_auth_tokens: the HTTP surface needs bearer tokens (--http-auth-token-file or BATON_HTTP_AUTH_TOKENS), or run with --http-auth none"
                        .into(),
                );
            }
            Auth::from_tokens(tokens.iter().map(String::as_str))
        }
    };
    let mut number =
        |name: &str, value: Option<u64>, default: u64, range: std::ops::RangeInclusive<u64>| {
            let value = value.unwrap_or(default);
            if !range.contains(&value) {
                problems.push(format!(
                    "{name}: {value} is outside {}..={}",
                    range.start(),
                    range.end()
                ));
            }
            value
        };
    let header_ms = number(
        "http_header_timeout_ms",
        guard.http_header_timeout_ms.or(file.http_header_timeout_ms),
        defaults.limits.header_read_timeout.as_millis() as u64,
        100..=600_000,
    );
    let idle_ms = number(
        "http_idle_timeout_ms",
        guard.http_idle_timeout_ms.or(file.http_idle_timeout_ms),
        defaults.limits.idle_timeout.as_millis() as u64,
        100..=3_600_000,
    );
    let max_connections = number(
        "http_max_connections",
        guard
            .http_max_connections
            .or(file.http_max_connections)
            .map(|n| n as u64),
        defaults.limits.max_connections as u64,
        1..=65_536,
    );
    let lifetime_secs = number(
        "sse_max_lifetime_secs",
        guard.sse_max_lifetime_secs.or(file.sse_max_lifetime_secs),
        defaults.feed_lifetime.as_secs(),
        1..=86_400,
    );
    let feeds_per_token = number(
        "max_feeds_per_token",
        guard
            .max_feeds_per_token
            .or(file.max_feeds_per_token)
            .map(|n| n as u64),
        defaults.max_feeds_per_token as u64,
        1..=crate::http::MAX_FEEDS as u64,
    );
    let render_concurrency = number(
        "render_concurrency",
        guard
            .render_concurrency
            .or(file.render_concurrency)
            .map(|n| n as u64),
        defaults.render_concurrency as u64,
        1..=64,
    );
    let metrics_addr = guard
        .metrics_addr
        .clone()
        .or(file.metrics_addr.clone())
        .and_then(|text| match text.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                problems.push(format!(
                    "metrics_addr: `{text}` is not an address like 0.0.0.0:9090"
                ));
                None
            }
        });
    let guards = crate::http::Guards {
        auth,
        limits: crate::http::server::ServerLimits {
            header_read_timeout: Duration::from_millis(header_ms),
            idle_timeout: Duration::from_millis(idle_ms),
            max_connections: max_connections as usize,
        },
        metrics_on_surface: metrics_addr.is_none(),
        feed_lifetime: Duration::from_secs(lifetime_secs),
        max_feeds_per_token: feeds_per_token as usize,
        render_concurrency: render_concurrency as usize,
    };
    (guards, metrics_addr)
}

/// The registry settings from flags over the file; `None` when no URL is set.
pub fn registry_config(
    args: &RegistryArgs,
    file: &FileConfig,
    problems: &mut Vec<String>,
) -> Option<RegistryConfig> {
    let urls: Vec<String> = if !args.schema_registry_url.is_empty() {
        args.schema_registry_url.clone()
    } else {
        file.schema_registry_url
            .iter()
            .flat_map(|urls| urls.split(','))
            .map(str::to_string)
            .collect()
    };
    let urls: Vec<String> = urls
        .into_iter()
        .map(|url| url.trim().to_string())
        .filter(|url| !url.is_empty())
        .collect();
    for url in &urls {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            problems.push(format!(
                "schema_registry_url: `{url}` is not an http:// or https:// URL"
            ));
        }
    }
    let timeout_ms = args
        .schema_registry_timeout_ms
        .or(file.schema_registry_timeout_ms)
        .unwrap_or(10_000);
    if !(100..=600_000).contains(&timeout_ms) {
        problems.push(format!(
            "schema_registry_timeout_ms: {timeout_ms} is outside 100..=600000"
        ));
    }
    let pick = |flag: &Option<PathBuf>, file: &Option<PathBuf>| flag.clone().or(file.clone());
    let ca_file = pick(&args.schema_registry_ca_file, &file.schema_registry_ca_file);
    let cert_file = pick(
        &args.schema_registry_cert_file,
        &file.schema_registry_cert_file,
    );
    let key_file = pick(
        &args.schema_registry_key_file,
        &file.schema_registry_key_file,
    );
    for (key, path) in [
        ("schema_registry_ca_file", &ca_file),
        ("schema_registry_cert_file", &cert_file),
        ("schema_registry_key_file", &key_file),
    ] {
        if let Some(path) = path
            && !path.is_file()
        {
            problems.push(format!("{key}: {} is not a readable file", path.display()));
        }
    }
    if cert_file.is_some() != key_file.is_some() {
        problems.push(
            "schema_registry_cert_file: a client certificate needs schema_registry_key_file too"
                .into(),
        );
    }
    let auto_register = args.auto_register_schemas || file.auto_register_schemas.unwrap_or(false);
    if urls.is_empty() {
        if auto_register {
            problems.push(
                "auto_register_schemas: needs a schema registry (--schema-registry-url)".into(),
            );
        }
        return None;
    }
    Some(RegistryConfig {
        urls,
        username: args
            .schema_registry_username
            .clone()
            .or(file.schema_registry_username.clone()),
        password: args
            .schema_registry_password
            .clone()
            .or(file.schema_registry_password.clone()),
        ca_file,
        cert_file,
        key_file,
        timeout: Duration::from_millis(timeout_ms),
        subject_strategy: args
            .subject_name_strategy
            .or(file.subject_name_strategy)
            .unwrap_or_default(),
        auto_register,
    })
}

fn check_url(key: &str, url: &str, problems: &mut Vec<String>) {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        problems.push(format!("{key}: `{url}` is not an http:// or https:// URL"));
    }
}

/// How peers reach this pod: the listen address, unless it listens on every
/// interface, where the instance id (the pod's DNS name in a StatefulSet's
/// headless service) stands in for the host.
fn default_advertised_url(http_addr: SocketAddr, instance_id: &str) -> String {
    if http_addr.ip().is_unspecified() {
        format!("http://{instance_id}:{}", http_addr.port())
    } else {
        format!("http://{http_addr}")
    }
}

/// The host name: in a StatefulSet it is the pod name, stable across restarts.
pub fn default_instance_id() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
}

fn check_name(key: &str, value: &str, problems: &mut Vec<String>) {
    if value.is_empty() {
        problems.push(format!("{key}: required"));
    } else if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        problems.push(format!(
            "{key}: `{value}` may only contain letters, digits, '-', '_' and '.'"
        ));
    }
}

/// Kafka's own topic-name rules.
pub fn check_topic_name(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() {
        return Err("is empty");
    }
    if topic.len() > 249 {
        return Err("is longer than 249 characters");
    }
    if topic == "." || topic == ".." {
        return Err("is not a valid topic name");
    }
    if !topic
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err("may only contain letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn resolve(argv: &[&str]) -> Result<RunConfig, ConfigError> {
        let mut full = vec!["run", "--topology", "."];
        if !argv.iter().any(|arg| arg.starts_with("--http-auth")) {
            full.extend_from_slice(&["--http-auth", "none"]);
        }
        if !argv.iter().any(|arg| arg.starts_with("--snapshot")) {
            full.extend_from_slice(&["--snapshot-secret", SECRET]);
        }
        full.extend_from_slice(argv);
        let args = RunArgs::try_parse_from(full).expect("flags parse");
        RunConfig::resolve(&args)
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn snapshots_need_a_long_enough_secret_unless_disabled() {
        let base = ["--bootstrap-servers", "k:9092", "--instance-id", "pod-0"];
        let missing =
            resolve(&[&base[..], &["--snapshots", "enabled"]].concat()).expect_err("no secret");
        assert!(
            missing
                .to_string()
                .contains("BATON_SNAPSHOT_SECRET is required"),
            "{missing}"
        );
        let short = resolve(&[&base[..], &["--snapshot-secret", "short"]].concat())
            .expect_err("short secret");
        assert!(short.to_string().contains("too short"), "{short}");
        // Without snapshots, membership records need a key of their own.
        let unsigned = resolve(&[&base[..], &["--snapshots", "disabled"]].concat())
            .expect_err("no membership key");
        assert!(
            unsigned.to_string().contains("BATON_MEMBERSHIP_SECRET"),
            "{unsigned}"
        );
        let disabled = resolve(
            &[
                &base[..],
                &["--snapshots", "disabled", "--membership-secret", SECRET],
            ]
            .concat(),
        )
        .expect("valid");
        assert!(disabled.snapshots.is_none());
        assert_eq!(disabled.membership_secret.expose(), SECRET);
        let enabled = resolve(&base).expect("valid");
        let snapshots = enabled.snapshots.expect("enabled by default");
        assert_eq!(snapshots.public_url, "http://127.0.0.1:8080");
        assert!(
            !format!("{snapshots:?}").contains(SECRET),
            "the key is never printed"
        );
    }

    #[test]
    fn the_http_surface_needs_tokens_unless_auth_is_off() {
        let base = ["--bootstrap-servers", "k:9092", "--instance-id", "pod-0"];
        let err =
            resolve(&[&base[..], &["--http-auth", "tokens"]].concat()).expect_err("no tokens");
        let text = err.to_string();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("--http-auth none"), "{text}");
        let token = "a-token-of-twenty-bytes";
        let config = resolve(&[&base[..], &["--http-auth-tokens", token]].concat()).expect("valid");
        assert!(
            matches!(config.guards.auth, crate::http::auth::Auth::Tokens(ref t) if t.len() == 1)
        );
        assert!(!format!("{config:?}").contains(token), "no token in Debug");
        let open = resolve(&base).expect("valid");
        assert!(matches!(open.guards.auth, crate::http::auth::Auth::Open));
    }

    #[test]
    fn no_secret_reaches_debug_or_errors() {
        let base = ["--bootstrap-servers", "k:9092", "--instance-id", "pod-0"];
        let config = resolve(
            &[
                &base[..],
                &[
                    "--kafka-prop",
                    "sasl.password=pa,ss=word",
                    "--schema-registry-url",
                    "http://r:8081",
                    "--schema-registry-password",
                    "registry-pass",
                ],
            ]
            .concat(),
        )
        .expect("valid");
        assert_eq!(
            config.kafka.properties,
            vec![("sasl.password".to_string(), "pa,ss=word".to_string())],
            "a flag's value keeps its commas"
        );
        let shown = format!("{config:?}");
        for secret in ["pa,ss=word", "registry-pass", SECRET] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        let err = resolve(&[&base[..], &["--kafka-prop", "enable.auto.commit=true"]].concat())
            .expect_err("reserved");
        let text = err.to_string();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("kafka_prop.enable.auto.commit"), "{text}");
    }

    #[test]
    fn defaults_apply() {
        let config =
            resolve(&["--bootstrap-servers", "k:9092", "--instance-id", "pod-0"]).expect("valid");
        assert_eq!(config.input_topics, vec!["mcp.events.all".to_string()]);
        assert_eq!(config.commit_interval, Duration::from_millis(100));
        assert_eq!(config.transactional_id(), "baton-pod-0");
        assert_eq!(config.transaction_recovery_timeout, Duration::from_secs(60));
    }

    #[test]
    fn a_commit_may_not_block_as_long_as_the_poll_interval() {
        let base = ["--bootstrap-servers", "k:9092", "--instance-id", "pod-0"];
        let problems = |extra: &[&str]| -> String {
            resolve(&[&base[..], extra].concat())
                .expect_err("invalid")
                .to_string()
        };
        let text = problems(&[
            "--transaction-call-timeout-ms",
            "30000",
            "--transaction-recovery-timeout-ms",
            "20000",
        ]);
        assert!(text.contains("outside 30000..=240000"), "{text}");
        let text = problems(&["--kafka-prop", "consumer.max.poll.interval.ms=45000"]);
        assert!(
            text.contains("below the consumer's max.poll.interval.ms (45000)"),
            "{text}"
        );
        let config = resolve(
            &[
                &base[..],
                &[
                    "--kafka-prop",
                    "max.poll.interval.ms=45000",
                    "--transaction-recovery-timeout-ms",
                    "40000",
                ],
            ]
            .concat(),
        )
        .expect("valid");
        assert_eq!(config.transaction_recovery_timeout, Duration::from_secs(40));
    }

    #[test]
    fn each_problem_names_its_key_on_one_line() {
        let err = resolve(&[
            "--instance-id",
            "pod 0",
            "--commit-interval-ms",
            "0",
            "--kafka-prop",
            "no.such.thing=1",
            "--kafka-prop",
            "novalue",
        ])
        .expect_err("invalid");
        let text = err.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[0].contains("bootstrap_servers"));
        assert!(lines[1].contains("instance_id"));
        assert!(lines[2].contains("commit_interval_ms"));
        assert!(lines[3].contains("kafka_prop.no.such.thing"));
        assert!(lines[4].contains("kafka_prop: --kafka-prop 2 is not KEY=VALUE"));
    }

    #[test]
    fn file_rejects_unknown_keys_naming_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("baton.toml");
        std::fs::write(
            &path,
            "bootstrap_servers = \"k:9092\"\ncommit_intervall_ms = 5\n",
        )
        .expect("write");
        let err = read_file_config(&path).expect_err("unknown key");
        let text = err.to_string();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("commit_intervall_ms"), "{text}");
        assert!(text.contains("line 2"), "{text}");
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("baton.toml");
        std::fs::write(
            &path,
            "bootstrap_servers = \"file:9092\"\ninstance_id = \"file-pod\"\ncommit_interval_ms = 250\n[kafka]\n\"linger.ms\" = \"10\"\n",
        )
        .expect("write");
        let config = resolve(&[
            "--config",
            path.to_str().expect("utf8"),
            "--bootstrap-servers",
            "flag:9092",
        ])
        .expect("valid");
        assert_eq!(config.kafka.bootstrap_servers, "flag:9092");
        assert_eq!(config.instance_id, "file-pod");
        assert_eq!(config.commit_interval, Duration::from_millis(250));
        assert_eq!(
            config.kafka.properties,
            vec![("linger.ms".to_string(), "10".to_string())]
        );
    }
}
