//! `baton dlq inspect|replay`: operator tools for the dead-letter queue.
//!
//! `inspect` reads the DLQ and its parked topic and shows what failed, why
//! and when. `replay` republishes selected dead letters, byte for byte, to
//! the topic they came from once the cause is fixed. It does so exactly
//! once: the republished records and one replay-log entry per record go out
//! in a single Kafka transaction, and records the log already names are
//! skipped, so a crash leaves all or nothing and a second run republishes
//! nothing. It writes only to the application's own input topics: a
//! `baton.source.topic` header is whatever the letter's writer put there, and
//! the control topic in particular belongs to the healer alone.

mod render;
mod select;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use thiserror::Error;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::dlq::headers;
use crate::kafka::{self, ConnectError, KafkaSettings};
use crate::transactor::{Failure, Generation, Transactor, TxnError};
use select::{DeadLetterRecord, Selection};

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Show dead letters: class, reason, context, source and age. Reads each
    /// partition from its beginning to its end; commits nothing.
    Inspect(InspectArgs),
    /// Republish selected dead letters to the topic they came from, exactly
    /// once: records already replayed (per `{dlq}.replays`) are skipped.
    Replay(ReplayArgs),
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub select: SelectArgs,
    /// `table` for people, `json` for one object per record and line.
    #[arg(long, value_enum, default_value = "table")]
    pub format: InspectFormat,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub select: SelectArgs,
    /// Show what would be republished; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Republish records the replay log says were replayed already.
    #[arg(long)]
    pub again: bool,
    /// Names the replay's `transactional.id`: `{application_id}-dlq-replay`.
    #[arg(long, env = "BATON_APPLICATION_ID", default_value = crate::config::DEFAULT_APPLICATION_ID)]
    pub application_id: String,
    /// The application's input topics, where replays may go (with the
    /// memory topic and the repartition topic).
    #[arg(long, env = "BATON_INPUT_TOPICS", value_delimiter = ',', default_value = crate::config::DEFAULT_INPUT_TOPIC)]
    pub input_topics: Vec<String>,
    #[arg(long, env = "BATON_MEMORY_TOPIC", default_value = crate::config::DEFAULT_MEMORY_TOPIC)]
    pub memory_topic: String,
    /// Another topic replays may go to, repeatable; anything else named by a
    /// letter's `baton.source.topic` is refused.
    #[arg(long = "allow-topic")]
    pub allow_topics: Vec<String>,
}

impl ReplayArgs {
    /// Where a replay may write.
    fn allowed_targets(&self) -> BTreeSet<String> {
        let mut allowed: BTreeSet<String> = self.input_topics.iter().cloned().collect();
        allowed.insert(self.memory_topic.clone());
        allowed.insert(crate::runtime::repartition_topic(&self.application_id));
        allowed.extend(self.allow_topics.iter().cloned());
        allowed
    }
}

/// Where to read and which dead letters to pick; shared by both commands.
#[derive(Debug, Args)]
pub struct SelectArgs {
    /// Kafka bootstrap servers, host:port[,host:port].
    #[arg(long, env = "BATON_BOOTSTRAP_SERVERS")]
    pub bootstrap_servers: String,
    /// librdkafka property KEY=VALUE, repeatable (SASL, TLS, tuning).
    #[command(flatten)]
    pub kafka: crate::cli::KafkaPropArgs,
    /// The dead-letter topic; its parked topic is `{dlq}.parked`.
    #[arg(long, env = "BATON_DLQ_TOPIC", default_value = crate::dlq::DEFAULT_DLQ_TOPIC)]
    pub dlq_topic: String,
    /// Which topic to read [default: both for inspect, dlq for replay].
    #[arg(long, value_enum)]
    pub topic: Option<TopicChoice>,
    /// Only this error class (repeatable, or comma separated).
    #[arg(long = "class", value_delimiter = ',')]
    pub classes: Vec<String>,
    /// Only this context (the record key, or the value's `context_id`).
    #[arg(long)]
    pub context: Option<String>,
    /// Only records that failed within this window: 90s, 15m, 2h, 2d.
    #[arg(long)]
    pub since: Option<String>,
    /// Only records that failed at or after this RFC 3339 time.
    #[arg(long)]
    pub after: Option<String>,
    /// At most this many records, in topic, partition and offset order
    /// (replay: records to republish; already replayed ones do not count).
    #[arg(long)]
    pub limit: Option<usize>,
    /// How long to try reaching Kafka, and to read each topic to its end.
    #[arg(long, env = "BATON_DLQ_TIMEOUT_MS", default_value_t = 30_000)]
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TopicChoice {
    Dlq,
    Parked,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InspectFormat {
    Table,
    Json,
}

/// Where replays are logged: `{dlq}.replays`, keyed by DLQ coordinates.
pub fn replays_topic(dlq_topic: &str) -> String {
    format!("{dlq_topic}.replays")
}

#[derive(Debug, Error)]
pub enum DlqToolError {
    /// Bad flags, one line each.
    #[error("{}", .0.join("; "))]
    Usage(Vec<String>),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("topic `{topic}` does not exist ({hint})")]
    MissingTopic { topic: String, hint: String },
    #[error(
        "refused: {count} selected record(s) name `{topic}` in baton.source.topic, which is not an input topic of the application; nothing was republished (--allow-topic {topic} replays there anyway)"
    )]
    TargetNotAllowed { topic: String, count: usize },
    #[error("cannot read {topic}: {cause}")]
    Read { topic: String, cause: String },
    #[error(
        "{topic}: partition(s) {partitions:?} did not reach their end within {timeout:?} (an open transaction holds back read_committed readers)"
    )]
    Timeout {
        topic: String,
        partitions: Vec<i32>,
        timeout: Duration,
    },
    #[error(transparent)]
    CreateTopic(#[from] crate::runtime::RunError),
    #[error("replay producer: {0}")]
    Producer(String),
    #[error("the replay transaction failed, nothing was republished: {0}")]
    Transaction(String),
    #[error("a worker thread failed: {0}")]
    Worker(String),
}

pub async fn execute(command: DlqCommand) -> anyhow::Result<ExitCode> {
    let result = match command {
        DlqCommand::Inspect(args) => inspect(args).await,
        DlqCommand::Replay(args) => replay(args).await,
    };
    match result {
        Ok(code) => Ok(code),
        Err(DlqToolError::Usage(problems)) => {
            for problem in problems {
                eprintln!("error: {problem}");
            }
            Ok(ExitCode::from(2))
        }
        Err(err) => {
            eprintln!("error: {err}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Validated flags, and the partitions of every topic the cluster has.
struct Prepared {
    settings: KafkaSettings,
    selection: Selection,
    timeout: Duration,
    /// The DLQ topics to read, in order.
    topics: Vec<String>,
    /// Partitions of every topic that exists.
    existing: BTreeMap<String, Vec<i32>>,
}

async fn prepare(
    args: &SelectArgs,
    default_topic: TopicChoice,
    now: OffsetDateTime,
) -> Result<Prepared, DlqToolError> {
    let mut problems = Vec::new();
    let properties = args.kafka.collect(&mut problems);
    let selection = Selection::parse(
        &args.classes,
        args.context.as_deref(),
        args.since.as_deref(),
        args.after.as_deref(),
        args.limit,
        now,
    )
    .unwrap_or_else(|more| {
        problems.extend(more);
        Selection::default()
    });
    if !problems.is_empty() {
        return Err(DlqToolError::Usage(problems));
    }
    let settings = KafkaSettings {
        bootstrap_servers: args.bootstrap_servers.clone(),
        properties,
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let parked = crate::dlq::parked_topic(&args.dlq_topic);
    let topics = match args.topic.unwrap_or(default_topic) {
        TopicChoice::Dlq => vec![args.dlq_topic.clone()],
        TopicChoice::Parked => vec![parked],
        TopicChoice::Both => vec![args.dlq_topic.clone(), parked],
    };
    let lookup = settings.clone();
    let metadata =
        blocking(move || Ok(kafka::fetch_metadata_with_retry(&lookup, timeout)?)).await?;
    let existing: BTreeMap<String, Vec<i32>> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| {
            let partitions = t.partitions().iter().map(|p| p.id()).collect();
            (t.name().to_string(), partitions)
        })
        .collect();
    if let Some(topic) = topics.iter().find(|t| !existing.contains_key(t.as_str())) {
        return Err(DlqToolError::MissingTopic {
            topic: topic.clone(),
            hint: "check --dlq-topic and --topic; `baton topics create` creates it".into(),
        });
    }
    Ok(Prepared {
        settings,
        selection,
        timeout,
        topics,
        existing,
    })
}

/// Runs blocking Kafka work off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, DlqToolError> + Send + 'static,
) -> Result<T, DlqToolError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| DlqToolError::Worker(err.to_string()))?
}

/// What a read of the DLQ topics kept.
struct Collected {
    /// Selected records in (topic, partition, offset) order, at most `limit`.
    records: Vec<DeadLetterRecord>,
    /// Records read, per topic.
    scanned: Vec<(String, u64)>,
}

/// Reads every DLQ topic to its end, keeping the records the selection
/// matches and `keep` accepts (which sees each matching record once).
fn collect(
    prepared: &Prepared,
    mut keep: impl FnMut(&DeadLetterRecord) -> bool,
) -> Result<Collected, DlqToolError> {
    let mut kept: BTreeMap<(usize, i32, i64), DeadLetterRecord> = BTreeMap::new();
    let mut scanned = Vec::new();
    for (index, topic) in prepared.topics.iter().enumerate() {
        let partitions = prepared.existing.get(topic).cloned().unwrap_or_default();
        let read = select::read_topic(
            &prepared.settings,
            topic,
            &partitions,
            prepared.timeout,
            |record| {
                if !prepared.selection.matches(&record) || !keep(&record) {
                    return;
                }
                kept.insert((index, record.partition, record.offset), record);
                if prepared
                    .selection
                    .limit
                    .is_some_and(|limit| kept.len() > limit)
                {
                    kept.pop_last();
                }
            },
        )?;
        scanned.push((topic.clone(), read));
    }
    Ok(Collected {
        records: kept.into_values().collect(),
        scanned,
    })
}

/// Writes to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

async fn inspect(args: InspectArgs) -> Result<ExitCode, DlqToolError> {
    let now = OffsetDateTime::now_utc();
    let prepared = prepare(&args.select, TopicChoice::Both, now).await?;
    let collected = blocking(move || collect(&prepared, |_| true)).await?;
    let summary = render::summary(&collected.records, &collected.scanned, "shown");
    match args.format {
        InspectFormat::Table => {
            out(&render::table(&collected.records, now));
            out(&format!("{summary}\n"));
        }
        InspectFormat::Json => {
            let mut lines = String::new();
            for record in &collected.records {
                lines.push_str(&render::json_line(record, now));
                lines.push('\n');
            }
            out(&lines);
            // Stdout stays one object per line; people still get the count.
            eprintln!("{summary}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn replay(args: ReplayArgs) -> Result<ExitCode, DlqToolError> {
    let now = OffsetDateTime::now_utc();
    let prepared = prepare(&args.select, TopicChoice::Dlq, now).await?;
    let log_topic = replays_topic(&args.select.dlq_topic);
    let log_partitions = match prepared.existing.get(&log_topic) {
        Some(partitions) => Some(partitions.clone()),
        None if args.dry_run => None,
        None => {
            crate::runtime::create_topics(&prepared.settings, &[(log_topic.clone(), 1, true)])
                .await?;
            Some(vec![0])
        }
    };
    // Initialising the transactional id first fences an earlier replay and
    // closes what a crashed one left open, so the log read next is final.
    let producer = if args.dry_run {
        None
    } else {
        let settings = prepared.settings.clone();
        let transactional_id = format!("{}-dlq-replay", args.application_id);
        let timeout = prepared.timeout;
        Some(blocking(move || Replayer::init(&settings, &transactional_id, timeout)).await?)
    };
    let replayed: HashSet<String> = match log_partitions {
        Some(partitions) if !args.again => {
            let (settings, topic) = (prepared.settings.clone(), log_topic.clone());
            let timeout = prepared.timeout;
            blocking(move || read_replay_log(&settings, &topic, &partitions, timeout)).await?
        }
        _ => HashSet::new(),
    };
    let existing: BTreeSet<String> = prepared.existing.keys().cloned().collect();
    let allowed = args.allowed_targets();

    let (collected, no_source, truncated, already) = blocking(move || {
        let mut no_source = Vec::new();
        let mut truncated = Vec::new();
        let mut already = 0u64;
        let collected = collect(&prepared, |record| {
            // A timeout's letter describes a timer, not a record that
            // arrived: there is nothing to republish (the healer answers it).
            if record.source_topic().is_none() || is_timer_firing(record) {
                no_source.push(record.coordinates());
                false
            } else if is_truncated(record) {
                truncated.push((record.coordinates(), record.source()));
                false
            } else if replayed.contains(&record.coordinates()) {
                already += 1;
                false
            } else {
                true
            }
        })?;
        Ok((collected, no_source, truncated, already))
    })
    .await?;
    let records = collected.records;

    out(&render::table(&records, now));
    for coordinates in &no_source {
        out(&format!(
            "skipped {coordinates}: no {} header naming an input it came from (a step_timed_out letter describes a timer, not an input)\n",
            headers::SOURCE_TOPIC
        ));
    }
    for (coordinates, source) in &truncated {
        out(&format!(
            "refused {coordinates}: its value was cut to fit the dead-letter topic ({}=true), so replaying it would republish a corrupt record; the original is at its source {}\n",
            headers::VALUE_TRUNCATED,
            source.as_deref().unwrap_or("(unknown)")
        ));
    }
    if already > 0 {
        out(&format!(
            "skipped {already} record(s) already replayed (logged in {log_topic}; --again replays them anyway)\n"
        ));
    }
    if records.is_empty() {
        out("nothing to republish\n");
        return Ok(ExitCode::SUCCESS);
    }
    let targets = target_counts(&records);
    // Checked before anything is written: a replay to a topic outside the
    // application, or to a missing one, fails whole.
    if let Some(refused) = targets.keys().find(|topic| !allowed.contains(*topic)) {
        return Err(DlqToolError::TargetNotAllowed {
            topic: refused.clone(),
            count: targets.get(refused).copied().unwrap_or(0),
        });
    }
    if let Some(missing) = targets.keys().find(|topic| !existing.contains(*topic)) {
        return Err(DlqToolError::MissingTopic {
            topic: missing.clone(),
            hint: format!(
                "named by {} of the selected records; nothing was republished",
                headers::SOURCE_TOPIC
            ),
        });
    }
    let Some(replayer) = producer else {
        out(&format!(
            "dry run: would republish {} record(s) to {}; nothing was written\n",
            records.len(),
            describe_targets(&targets)
        ));
        return Ok(ExitCode::SUCCESS);
    };
    let batch = ReplayBatch {
        records,
        log_topic: log_topic.clone(),
        replay_id: new_replay_id(),
        replayed_at: now.format(&Rfc3339).unwrap_or_default(),
    };
    let (count, replay_id) = (batch.records.len(), batch.replay_id.clone());
    blocking(move || replayer.publish(&batch)).await?;
    out(&format!(
        "republished {count} record(s) to {} in one transaction; replay id {replay_id}; logged in {log_topic}\n",
        describe_targets(&targets)
    ));
    Ok(ExitCode::SUCCESS)
}

/// A `step_timed_out` letter: written by a timer's firing, not an input.
fn is_timer_firing(record: &DeadLetterRecord) -> bool {
    record.header(headers::ERROR_CLASS) == Some(crate::dlq::ErrorClass::StepTimedOut.as_str())
}

/// A letter whose value was cut to fit (see [`crate::dlq::fit_record`]):
/// it no longer holds the original record and must never be replayed.
fn is_truncated(record: &DeadLetterRecord) -> bool {
    record.header(headers::VALUE_TRUNCATED) == Some("true")
}

/// The coordinates every replay so far has logged.
fn read_replay_log(
    settings: &KafkaSettings,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
) -> Result<HashSet<String>, DlqToolError> {
    let mut keys = HashSet::new();
    select::read_topic(settings, topic, partitions, timeout, |entry| {
        if let Some(key) = entry.key.and_then(|key| String::from_utf8(key).ok()) {
            keys.insert(key);
        }
    })?;
    Ok(keys)
}

/// Records to republish, per target topic.
fn target_counts(records: &[DeadLetterRecord]) -> BTreeMap<String, usize> {
    let mut targets = BTreeMap::new();
    for record in records {
        if let Some(topic) = record.source_topic() {
            *targets.entry(topic.to_string()).or_default() += 1;
        }
    }
    targets
}

/// `mcp.events.all (3), orders (1)`.
fn describe_targets(targets: &BTreeMap<String, usize>) -> String {
    targets
        .iter()
        .map(|(topic, n)| format!("{topic} ({n})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// 128 random bits as hex: tells one replay's records from another's.
fn new_replay_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// What one replay writes: the records and their log entries.
struct ReplayBatch {
    records: Vec<DeadLetterRecord>,
    log_topic: String,
    replay_id: String,
    replayed_at: String,
}

/// The replay's transactional producer, initialised.
struct Replayer {
    transactor: Transactor,
}

impl Replayer {
    /// Blocking: creates the producer and initialises its transactional id.
    fn init(
        settings: &KafkaSettings,
        transactional_id: &str,
        timeout: Duration,
    ) -> Result<Replayer, DlqToolError> {
        let transactor = Transactor::init(
            settings.transactional_producer_config(transactional_id),
            transactional_id,
            timeout,
        )
        .map_err(|err| {
            DlqToolError::Producer(format!(
                "cannot initialise transactional id `{transactional_id}`: {err}"
            ))
        })?;
        Ok(Replayer { transactor })
    }

    /// Blocking: republishes every record and logs it, in one transaction.
    /// On any failure the transaction is settled as the transactor
    /// classifies it (aborted, or the producer rebuilt, which aborts it too:
    /// nothing was committed unless the commit's outcome is unknown, which
    /// the error then says).
    fn publish(&self, batch: &ReplayBatch) -> Result<(), DlqToolError> {
        let generation = self
            .transactor
            .begin()
            .map_err(|err| DlqToolError::Transaction(err.to_string()))?;
        let result = self
            .send_all(generation, batch)
            .and_then(|()| self.transactor.commit());
        if let Err(err) = result {
            let _ = self.transactor.recover(err.failure, &err.cause);
            let text = if err.failure == Failure::OutcomeUnknown {
                format!(
                    "{err} (the commit may have happened: read {} before replaying again)",
                    batch.log_topic
                )
            } else {
                err.to_string()
            };
            return Err(DlqToolError::Transaction(text));
        }
        Ok(())
    }

    fn send_all(&self, generation: Generation, batch: &ReplayBatch) -> Result<(), TxnError> {
        for record in &batch.records {
            let Some(target) = record.source_topic() else {
                continue;
            };
            let coordinates = record.coordinates();
            let mut kept = OwnedHeaders::new();
            for (name, value) in &record.headers {
                if !name.starts_with("baton.") {
                    kept = kept.insert(Header {
                        key: name,
                        value: value.as_deref(),
                    });
                }
            }
            let headers = kept
                .insert(text_header(headers::REPLAY_OF, &coordinates))
                .insert(text_header(headers::REPLAYED_AT, &batch.replayed_at))
                .insert(text_header(headers::REPLAY_ID, &batch.replay_id));
            self.transactor.send_waiting(generation, || {
                let mut republished =
                    FutureRecord::<[u8], [u8]>::to(target).headers(headers.clone());
                if let Some(key) = &record.key {
                    republished = republished.key(key);
                }
                if let Some(value) = &record.value {
                    republished = republished.payload(value);
                }
                republished
            })?;
            let entry = serde_json::json!({
                "replay_id": batch.replay_id,
                "replayed_at": batch.replayed_at,
                "target_topic": target,
            })
            .to_string();
            self.transactor.send_waiting(generation, || {
                FutureRecord::<[u8], [u8]>::to(&batch.log_topic)
                    .key(coordinates.as_bytes())
                    .payload(entry.as_bytes())
            })?;
        }
        Ok(())
    }
}

fn text_header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a [u8]> {
    Header {
        key,
        value: Some(value.as_bytes()),
    }
}
