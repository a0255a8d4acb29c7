//! The command line. Every flag of `baton run` also reads a `BATON_*`
//! variable, so pods are configured from their environment.

mod context;
mod dlq;
mod guard;
mod schemas;

pub use guard::{GuardArgs, HttpAuthMode, KafkaPropArgs};

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::RunConfig;
use crate::http::{self, HttpState};
use crate::kafka::KafkaSettings;
use crate::runtime::{self, Readiness};
use crate::sample;
use crate::shutdown::Shutdown;
use crate::topology::{Topology, describe};

#[derive(Debug, Parser)]
#[command(
    name = "baton",
    version,
    about = "Exactly-once orchestration for MCP agents"
)]
pub struct Cli {
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, global = true, env = "BATON_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

// Parsed once per process: the size of the `run` variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a baton pod: consume tool events, keep workflow state, hand over.
    Run(RunArgs),
    /// Validate or describe workflow definitions.
    #[command(subcommand)]
    Topology(TopologyCommand),
    /// Create the topics baton reads and writes.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// Produce sample vision-research traffic (demos, load tests).
    Simulate(SimulateArgs),
    /// Inspect workflow state.
    #[command(subcommand)]
    State(StateCommand),
    /// Check or register baton's Avro schemas in a Schema Registry.
    #[command(subcommand)]
    Schemas(schemas::SchemasCommand),
    /// Run the DLQ healer: retry, fall back, move to PlanB, or park.
    Heal(HealArgs),
    /// Inspect the dead-letter queue, or replay dead letters exactly once.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Cancel a context, or list contexts by state and the stalled ones.
    #[command(subcommand)]
    Context(context::ContextCommand),
}

#[derive(Debug, Args)]
pub struct HealArgs {
    #[arg(long, env = "BATON_BOOTSTRAP_SERVERS")]
    pub bootstrap_servers: String,
    /// Names the healer's consumer group (`{app}-healer`) and transactional id.
    #[arg(long, env = "BATON_APPLICATION_ID", default_value = crate::config::DEFAULT_APPLICATION_ID)]
    pub application_id: String,
    /// This healer's stable id (defaults to the host name).
    #[arg(long, env = "BATON_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// The workflow definitions whose retry policies the healer applies.
    #[arg(long, env = "BATON_TOPOLOGY", default_value = "topology")]
    pub topology: PathBuf,
    #[arg(long, env = "BATON_DLQ_TOPIC", default_value = crate::dlq::DEFAULT_DLQ_TOPIC)]
    pub dlq_topic: String,
    #[arg(long, env = "BATON_CONTROL_TOPIC", default_value = crate::control::DEFAULT_CONTROL_TOPIC)]
    pub control_topic: String,
    #[arg(long, env = "BATON_RETRY_TOPIC", default_value = crate::control::DEFAULT_RETRY_TOPIC)]
    pub retry_topic: String,
    /// Milliseconds per transaction.
    #[arg(long, env = "BATON_COMMIT_INTERVAL_MS", default_value_t = 100)]
    pub commit_interval_ms: u64,
    /// How long start-up tries to reach Kafka before failing.
    #[arg(long, env = "BATON_STARTUP_TIMEOUT_MS", default_value_t = 30_000)]
    pub startup_timeout_ms: u64,
    /// How long one commit may take end to end, recovery included, in
    /// milliseconds (at least the start-up timeout, at most 240000); past it
    /// the healer exits, since the same thread polls its consumer group.
    #[arg(
        long,
        env = "BATON_TRANSACTION_RECOVERY_TIMEOUT_MS",
        default_value_t = 60_000
    )]
    pub transaction_recovery_timeout_ms: u64,
    /// Metrics and health: `/metrics`, `/healthz`.
    #[arg(long, env = "BATON_HTTP_ADDR", default_value = "0.0.0.0:8081")]
    pub http_addr: std::net::SocketAddr,
    /// Retries held in memory until due (default 10000); at the bound the
    /// retry topic is paused, so the rest wait in Kafka.
    #[arg(long, env = "BATON_MAX_PENDING_RETRIES", default_value_t = crate::healer::DEFAULT_MAX_PENDING_RETRIES)]
    pub max_pending_retries: usize,
    #[command(flatten)]
    pub kafka: KafkaPropArgs,
}

#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Print a context's workflow state as JSON: from a running pod over
    /// HTTP (`--url`), or offline from a stopped pod's state directory.
    Get(StateGetArgs),
}

#[derive(Debug, Args)]
pub struct StateGetArgs {
    pub context_id: String,
    /// A running pod, e.g. http://baton-0.baton-headless:8080.
    #[arg(long, conflicts_with = "state_dir")]
    pub url: Option<String>,
    /// The bearer token for `--url` (`BATON_HTTP_AUTH_TOKEN`).
    #[arg(long, env = "BATON_HTTP_AUTH_TOKEN", hide_env_values = true)]
    pub token: Option<crate::secret::Secret>,
    /// A state directory to read offline (the pod must be stopped).
    #[arg(long, env = "BATON_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    #[arg(long, env = "BATON_APPLICATION_ID", default_value = crate::config::DEFAULT_APPLICATION_ID)]
    pub application_id: String,
}

/// Flags of `baton run`. Optional where a config file or default may fill in.
#[derive(Debug, Clone, Parser)]
#[command(name = "run")]
pub struct RunArgs {
    /// Kafka bootstrap servers, host:port[,host:port].
    #[arg(long, env = "BATON_BOOTSTRAP_SERVERS")]
    pub bootstrap_servers: Option<String>,
    /// Names the consumer group, changelogs and transactional ids.
    #[arg(long, env = "BATON_APPLICATION_ID")]
    pub application_id: Option<String>,
    /// This pod's stable id (defaults to the host name).
    #[arg(long, env = "BATON_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Input topics, comma separated.
    #[arg(long, env = "BATON_INPUT_TOPICS", value_delimiter = ',')]
    pub input_topics: Vec<String>,
    /// Workflow definitions: a file or a directory of `*.toml`.
    #[arg(long, env = "BATON_TOPOLOGY")]
    pub topology: Option<PathBuf>,
    /// Where RocksDB stores live.
    #[arg(long, env = "BATON_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Address of the HTTP server (metrics, health, state).
    #[arg(long, env = "BATON_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// Milliseconds per transaction.
    #[arg(long, env = "BATON_COMMIT_INTERVAL_MS")]
    pub commit_interval_ms: Option<u64>,
    #[command(flatten)]
    pub kafka: KafkaPropArgs,
    /// Dead-letter topic.
    #[arg(long, env = "BATON_DLQ_TOPIC")]
    pub dlq_topic: Option<String>,
    /// Records larger than this are dead-lettered.
    #[arg(long, env = "BATON_MAX_RECORD_BYTES")]
    pub max_record_bytes: Option<usize>,
    /// Records a context may hold while the healer decides on its failed
    /// step (default 100); past it they are dead-lettered as `held_overflow`.
    #[arg(long, env = "BATON_MAX_HELD_RECORDS")]
    pub max_held_records: Option<usize>,
    /// Bytes those held records may take (default 262144); past it, `held_overflow`.
    #[arg(long, env = "BATON_MAX_HELD_BYTES")]
    pub max_held_bytes: Option<usize>,
    /// Encoded bytes a context's memory may take (default 524288): the oldest
    /// tool outputs go first, then the input is dead-lettered as `memory_overflow`.
    #[arg(long, env = "BATON_MAX_MEMORY_BYTES")]
    pub max_memory_bytes: Option<usize>,
    /// Memory all of the pod's RocksDB stores share (default 134217728):
    /// one block cache, which their memtables are charged to as well, so a
    /// pod's state memory does not grow with its partitions or contexts.
    #[arg(long, env = "BATON_STATE_MEMORY_BYTES")]
    pub state_memory_bytes: Option<usize>,
    /// Due timers a partition fires per round (default 1000, at most 100000);
    /// the rest fire in the next round, at least once per commit interval.
    #[arg(long, env = "BATON_MAX_TIMERS_PER_ROUND")]
    pub max_timers_per_round: Option<usize>,
    /// Longest accepted `context_id` in bytes (default 1024); longer ones,
    /// and ones with control characters, are dead-lettered as `invalid_context_id`.
    #[arg(long, env = "BATON_MAX_CONTEXT_ID_BYTES")]
    pub max_context_id_bytes: Option<usize>,
    /// How long one transactional call (commit, abort, send offsets) may
    /// block, in milliseconds (default 30000). A commit still failing after
    /// its retries has an unknown outcome: the producer is rebuilt and every
    /// partition reopens from the offsets the broker has committed.
    #[arg(long, env = "BATON_TRANSACTION_CALL_TIMEOUT_MS")]
    pub transaction_call_timeout_ms: Option<u64>,
    /// How long one commit may take end to end, in milliseconds: its
    /// repeats, an abort, a producer rebuild and the next begin included
    /// (default 60000, from the call timeout up to 240000, and below the
    /// consumer's max.poll.interval.ms). Past it the pod exits so that its
    /// partitions move: the committing thread also runs the rebalances, and
    /// the whole group's rebalance waits for it.
    #[arg(long, env = "BATON_TRANSACTION_RECOVERY_TIMEOUT_MS")]
    pub transaction_recovery_timeout_ms: Option<u64>,
    /// How long start-up tries to reach Kafka before failing.
    #[arg(long, env = "BATON_STARTUP_TIMEOUT_MS")]
    pub startup_timeout_ms: Option<u64>,
    /// Optional TOML file; flags and variables override it.
    #[arg(long, env = "BATON_CONFIG")]
    pub config: Option<PathBuf>,
    /// An input topic's format, TOPIC=avro|json|auto, repeatable (default auto:
    /// magic byte 0 is Avro, `{` is JSON).
    #[arg(
        long = "input-format",
        env = "BATON_INPUT_FORMATS",
        value_delimiter = ','
    )]
    pub input_formats: Vec<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub surface: SurfaceArgs,
    #[command(flatten)]
    pub guard: GuardArgs,
}

/// The live feed, memory snapshots and the pod's place among its peers.
#[derive(Debug, Clone, Default, Args)]
pub struct SurfaceArgs {
    /// Where every state change goes, for the live feed.
    #[arg(long, env = "BATON_STATUS_TOPIC")]
    pub status_topic: Option<String>,
    /// `memory.upserted` records, co-partitioned with the input topics.
    #[arg(long, env = "BATON_MEMORY_TOPIC")]
    pub memory_topic: Option<String>,
    /// The healer's commands (`baton heal` writes them), co-partitioned with
    /// the input topics.
    #[arg(long, env = "BATON_CONTROL_TOPIC")]
    pub control_topic: Option<String>,
    /// Base of snapshot URLs in handovers, as agents reach it (an ingress, say).
    #[arg(long, env = "BATON_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// This pod's own URL as its peers reach it (Kafka Streams'
    /// `application.server`); defaults to the HTTP address, or the host name
    /// when listening on all interfaces.
    #[arg(long, env = "BATON_ADVERTISED_URL")]
    pub advertised_url: Option<String>,
    /// `disabled` writes no status records: no live feed (`/events`
    /// answers 404) and one record less per input.
    #[arg(long, env = "BATON_LIVE_FEED", value_enum)]
    pub live_feed: Option<crate::config::LiveFeedMode>,
    /// `disabled` runs without memory snapshot URLs (and without a secret).
    #[arg(long, env = "BATON_SNAPSHOTS", value_enum)]
    pub snapshots: Option<crate::config::SnapshotMode>,
    /// HMAC key of snapshot URLs; at least 32 bytes.
    #[arg(
        long,
        env = "BATON_SNAPSHOT_SECRET",
        hide_env_values = true,
        hide = true
    )]
    pub snapshot_secret: Option<crate::secret::Secret>,
    /// The previous key, still accepted while keys rotate.
    #[arg(
        long,
        env = "BATON_SNAPSHOT_SECRET_PREVIOUS",
        hide_env_values = true,
        hide = true
    )]
    pub snapshot_secret_previous: Option<crate::secret::Secret>,
    /// How long a snapshot URL stays valid, in seconds (default 86400).
    #[arg(long, env = "BATON_SNAPSHOT_EXPIRY_SECS")]
    pub snapshot_expiry_secs: Option<u64>,
    /// Snapshots older than this are pruned and answer 410, in seconds (default 604800).
    #[arg(long, env = "BATON_SNAPSHOT_RETENTION_SECS")]
    pub snapshot_retention_secs: Option<u64>,
    /// At most this many snapshots are kept per context (default 64).
    #[arg(long, env = "BATON_MAX_SNAPSHOTS_PER_CONTEXT")]
    pub max_snapshots_per_context: Option<usize>,
    /// Interval of SSE heartbeat comments, in milliseconds (default 15000).
    #[arg(long, env = "BATON_SSE_HEARTBEAT_MS")]
    pub sse_heartbeat_ms: Option<u64>,
}

/// Where the Schema Registry is and how to reach it.
#[derive(Debug, Clone, Default, Args)]
pub struct RegistryArgs {
    /// Schema Registry base URL(s), comma separated. Set, Avro input decodes
    /// and handovers are written as Avro; unset, output stays JSON.
    #[arg(long, env = "BATON_SCHEMA_REGISTRY_URL", value_delimiter = ',')]
    pub schema_registry_url: Vec<String>,
    /// Basic auth user (Confluent Cloud: the API key).
    #[arg(long, env = "BATON_SCHEMA_REGISTRY_USERNAME")]
    pub schema_registry_username: Option<String>,
    /// Basic auth password (Confluent Cloud: the API secret).
    #[arg(long, env = "BATON_SCHEMA_REGISTRY_PASSWORD", hide_env_values = true)]
    pub schema_registry_password: Option<crate::secret::Secret>,
    /// PEM file of the CA that signed the registry's certificate.
    #[arg(long, env = "BATON_SCHEMA_REGISTRY_CA_FILE")]
    pub schema_registry_ca_file: Option<PathBuf>,
    /// PEM client certificate, for mutual TLS.
    #[arg(long, env = "BATON_SCHEMA_REGISTRY_CERT_FILE")]
    pub schema_registry_cert_file: Option<PathBuf>,
    /// PKCS#8 PEM key of the client certificate.
    #[arg(long, env = "BATON_SCHEMA_REGISTRY_KEY_FILE")]
    pub schema_registry_key_file: Option<PathBuf>,
    /// Per-request timeout, in milliseconds (default 10000).
    #[arg(long, env = "BATON_SCHEMA_REGISTRY_TIMEOUT_MS")]
    pub schema_registry_timeout_ms: Option<u64>,
    /// How subjects are named: topic (`{topic}-value`) or record (the full name).
    #[arg(long, env = "BATON_SUBJECT_NAME_STRATEGY", value_enum)]
    pub subject_name_strategy: Option<crate::registry::SubjectStrategy>,
    /// Register baton's own schemas at start-up; without it a missing subject
    /// is a start-up error.
    #[arg(long, env = "BATON_AUTO_REGISTER_SCHEMAS")]
    pub auto_register_schemas: bool,
}

#[derive(Debug, Subcommand)]
pub enum TopologyCommand {
    /// Validate definitions; every problem is printed on its own line.
    Check { path: PathBuf },
    /// Print states and transitions as text and as a Mermaid diagram.
    Describe {
        path: PathBuf,
        #[arg(long, default_value = "both")]
        format: DescribeFormat,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DescribeFormat {
    Text,
    Mermaid,
    Both,
}

#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Create input, dead-letter and handover topics (existing ones are kept).
    Create(TopicsCreateArgs),
}

#[derive(Debug, Args)]
pub struct TopicsCreateArgs {
    #[arg(long, env = "BATON_BOOTSTRAP_SERVERS")]
    pub bootstrap_servers: String,
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
    #[arg(long, env = "BATON_TOPOLOGY", default_value = "topology")]
    pub topology: PathBuf,
    #[arg(long, env = "BATON_INPUT_TOPICS", value_delimiter = ',', default_value = crate::config::DEFAULT_INPUT_TOPIC)]
    pub input_topics: Vec<String>,
    #[arg(long, env = "BATON_DLQ_TOPIC", default_value = crate::dlq::DEFAULT_DLQ_TOPIC)]
    pub dlq_topic: String,
    #[arg(long, env = "BATON_MEMORY_TOPIC", default_value = crate::config::DEFAULT_MEMORY_TOPIC)]
    pub memory_topic: String,
    #[arg(long, env = "BATON_STATUS_TOPIC", default_value = crate::config::DEFAULT_STATUS_TOPIC)]
    pub status_topic: String,
    #[arg(long, env = "BATON_CONTROL_TOPIC", default_value = crate::control::DEFAULT_CONTROL_TOPIC)]
    pub control_topic: String,
    #[arg(long, env = "BATON_RETRY_TOPIC", default_value = crate::control::DEFAULT_RETRY_TOPIC)]
    pub retry_topic: String,
    #[command(flatten)]
    pub kafka: KafkaPropArgs,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    #[arg(long, env = "BATON_BOOTSTRAP_SERVERS")]
    pub bootstrap_servers: String,
    #[arg(long, default_value = crate::config::DEFAULT_INPUT_TOPIC)]
    pub topic: String,
    /// Contexts to run through the whole vision-research workflow.
    #[arg(long, default_value_t = 10)]
    pub contexts: usize,
    /// Percentage of extra poison records mixed in.
    #[arg(long, default_value_t = 0.0)]
    pub poison_percent: f64,
    /// Percent of contexts whose screenshot fails once (the healer retries it).
    #[arg(long, default_value_t = 0.0)]
    pub failure_percent: f64,
    /// Seed for the deterministic generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    pub kafka: KafkaPropArgs,
}

/// Runs the parsed command.
pub async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run(args).await,
        Command::Topology(TopologyCommand::Check { path }) => match Topology::load(&path) {
            Ok(topology) => {
                println!(
                    "{}: {} workflow(s) valid",
                    path.display(),
                    topology.workflows().count()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(err) => {
                eprintln!("{err}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Topology(TopologyCommand::Describe { path, format }) => {
            let topology = Topology::load(&path)?;
            match format {
                DescribeFormat::Text => print!("{}", describe::text(&topology)),
                DescribeFormat::Mermaid => print!("{}", describe::mermaid(&topology)),
                DescribeFormat::Both => {
                    print!("{}", describe::text(&topology));
                    println!();
                    print!("{}", describe::mermaid(&topology));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Topics(TopicsCommand::Create(args)) => create_topics(args).await,
        Command::Simulate(args) => simulate(args).await,
        Command::State(StateCommand::Get(args)) => state_get(args).await,
        Command::Schemas(command) => schemas::execute(command).await,
        Command::Heal(args) => heal(args).await,
        Command::Dlq(command) => dlq::execute(command).await,
        Command::Context(command) => context::execute(command).await,
    }
}

async fn heal(args: HealArgs) -> anyhow::Result<ExitCode> {
    let topology = match Topology::load(&args.topology) {
        Ok(topology) => Arc::new(topology),
        Err(err) => {
            eprintln!("{err}");
            return Ok(ExitCode::from(2));
        }
    };
    if !(1..=60_000).contains(&args.commit_interval_ms) {
        eprintln!(
            "invalid configuration: commit_interval_ms: {} is outside 1..=60000",
            args.commit_interval_ms
        );
        return Ok(ExitCode::from(2));
    }
    if !(args.startup_timeout_ms..=240_000).contains(&args.transaction_recovery_timeout_ms) {
        eprintln!(
            "invalid configuration: transaction_recovery_timeout_ms: {} is outside {}..=240000 (at least the start-up timeout, and below the consumer's max.poll.interval.ms)",
            args.transaction_recovery_timeout_ms, args.startup_timeout_ms
        );
        return Ok(ExitCode::from(2));
    }
    let Some(instance_id) = args
        .instance_id
        .clone()
        .or_else(crate::config::default_instance_id)
    else {
        eprintln!("invalid configuration: instance_id: required (no host name to default to)");
        return Ok(ExitCode::from(2));
    };
    let config = crate::healer::HealerConfig {
        kafka: match settings(&args.bootstrap_servers, &args.kafka) {
            Ok(settings) => settings,
            Err(problems) => {
                eprintln!("{problems}");
                return Ok(ExitCode::from(2));
            }
        },
        application_id: args.application_id.clone(),
        instance_id,
        parked_topic: crate::dlq::parked_topic(&args.dlq_topic),
        dlq_topic: args.dlq_topic.clone(),
        control_topic: args.control_topic.clone(),
        retry_topic: args.retry_topic.clone(),
        commit_interval: std::time::Duration::from_millis(args.commit_interval_ms),
        startup_timeout: std::time::Duration::from_millis(args.startup_timeout_ms),
        transaction_recovery_timeout: std::time::Duration::from_millis(
            args.transaction_recovery_timeout_ms,
        ),
        max_pending_retries: args.max_pending_retries.max(1),
    };
    let shutdown = Shutdown::new();
    shutdown.listen_for_signals();
    // The pod's HTTP surface, of which a healer serves /metrics and /healthz.
    let readiness = Arc::new(Readiness::default());
    let http_state = Arc::new(HttpState::new(
        Arc::clone(&readiness),
        Arc::new(crate::state::OpenStores::default()),
        Arc::default(),
        shutdown.clone(),
    ));
    let server = serve_http(args.http_addr, http_state).await?;
    let outcome = match crate::healer::spawn(config, topology, shutdown.clone()) {
        // Running: /readyz and baton_ready say so (it owns no partitions,
        // so BatonPodNotReady treats it like any pod).
        Ok(healer) => {
            readiness.set_joined(true);
            match tokio::task::spawn_blocking(move || healer.join()).await {
                Ok(Ok(result)) => result.map_err(|err| err.to_string()),
                _ => Err("the healer thread panicked".to_string()),
            }
        }
        Err(err) => Err(err.to_string()),
    };
    shutdown.trigger();
    let _ = server.await;
    match outcome {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(message) => {
            tracing::error!(cause = %message, "healer stopped");
            eprintln!("error: {message}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Binds the pod's HTTP surface and serves it on a task of its own.
async fn serve_http(
    addr: std::net::SocketAddr,
    state: Arc<HttpState>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (bound, server) = http::bind(addr, state)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(addr = %bound, "http server listening");
    Ok(tokio::spawn(server))
}

async fn state_get(args: StateGetArgs) -> anyhow::Result<ExitCode> {
    if let Some(url) = &args.url {
        let encoded = percent_encoding::utf8_percent_encode(
            &args.context_id,
            percent_encoding::NON_ALPHANUMERIC,
        );
        let target = format!("{}/contexts/{encoded}", url.trim_end_matches('/'));
        let authorization = crate::http::bearer(args.token.as_ref());
        let headers = crate::http::authorization_headers(&authorization);
        let (status, _, body) = http::get_with_headers(&target, &headers).await?;
        println!("{body}");
        return Ok(if status == 200 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let state_dir = args
        .state_dir
        .context("give --url of a running pod or --state-dir of a stopped one")?;
    match crate::state::get_offline(
        &state_dir,
        &args.application_id,
        crate::runtime::processor::CONTEXT_STORE,
        &args.context_id,
    )?
    .map(|(partition, bytes)| crate::state::record::decode_workflow(&bytes).map(|s| (partition, s)))
    .transpose()
    .map_err(anyhow::Error::msg)?
    {
        Some((partition, Some(state))) => {
            let mut value = serde_json::to_value(&state)?;
            if let Some(object) = value.as_object_mut() {
                object.insert("partition".into(), serde_json::json!(partition));
            }
            println!("{}", serde_json::to_string_pretty(&value)?);
            Ok(ExitCode::SUCCESS)
        }
        Some((_, None)) | None => {
            eprintln!(
                "no workflow state for context `{}` in {}",
                args.context_id,
                state_dir.display()
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = match RunConfig::resolve(&args) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("{err}");
            return Ok(ExitCode::from(2));
        }
    };
    let topology = match Topology::load(&config.topology) {
        Ok(topology) => Arc::new(topology),
        Err(err) => {
            eprintln!("{err}");
            return Ok(ExitCode::from(2));
        }
    };
    let shutdown = Shutdown::new();
    shutdown.listen_for_signals();
    let http_state = Arc::new(
        HttpState::new(
            Arc::new(Readiness::default()),
            Arc::new(crate::state::OpenStores::default()),
            Arc::default(),
            shutdown.clone(),
        )
        .with_guards(config.guards.clone()),
    );
    let server = serve_http(config.http_addr, Arc::clone(&http_state)).await?;
    let metrics_server = match config.metrics_addr {
        Some(addr) => {
            let (bound, serving) = http::bind_listener(
                addr,
                Arc::clone(&http_state),
                http::server::Listener::Metrics,
            )
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
            tracing::info!(addr = %bound, "metrics listening");
            Some(tokio::spawn(serving))
        }
        None => None,
    };
    let result = runtime::run(config, topology, http_state, shutdown.clone()).await;
    shutdown.trigger();
    let _ = server.await;
    if let Some(metrics_server) = metrics_server {
        let _ = metrics_server.await;
    }
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(err) => {
            tracing::error!(cause = %err, "baton stopped");
            eprintln!("error: {err}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The Kafka settings of a tool command, or its configuration problems.
fn settings(
    bootstrap_servers: &str,
    props: &KafkaPropArgs,
) -> Result<KafkaSettings, crate::config::ConfigError> {
    let mut problems = Vec::new();
    let properties = props.collect(&mut problems);
    if !problems.is_empty() {
        return Err(crate::config::ConfigError { problems });
    }
    Ok(KafkaSettings {
        bootstrap_servers: bootstrap_servers.to_string(),
        properties,
    })
}

async fn create_topics(args: TopicsCreateArgs) -> anyhow::Result<ExitCode> {
    let topology = Topology::load(&args.topology)?;
    let settings = settings(&args.bootstrap_servers, &args.kafka)?;
    let mut topics: Vec<(String, i32, bool)> = args
        .input_topics
        .iter()
        .map(|t| (t.clone(), args.partitions, false))
        .collect();
    topics.push((args.dlq_topic.clone(), args.partitions, false));
    topics.push((
        crate::dlq::parked_topic(&args.dlq_topic),
        args.partitions,
        false,
    ));
    // Memory is co-partitioned with the inputs: same partition count.
    topics.push((args.memory_topic.clone(), args.partitions, false));
    topics.push((args.status_topic.clone(), args.partitions, false));
    // Healer commands are co-partitioned with the inputs too.
    topics.push((args.control_topic.clone(), args.partitions, false));
    topics.push((args.retry_topic.clone(), args.partitions, false));
    for topic in topology.output_topics() {
        topics.push((topic, args.partitions, false));
    }
    runtime::create_topics(&settings, &topics).await?;
    for (topic, partitions, _) in &topics {
        println!("{topic} ({partitions} partitions)");
    }
    Ok(ExitCode::SUCCESS)
}

async fn simulate(args: SimulateArgs) -> anyhow::Result<ExitCode> {
    let settings = settings(&args.bootstrap_servers, &args.kafka)?;
    let records = sample::vision_research_traffic_with_failures(
        args.contexts,
        args.poison_percent,
        args.failure_percent,
        args.seed,
    );
    let count = records.len();
    sample::produce(&settings, &args.topic, records).await?;
    println!("produced {count} records to {}", args.topic);
    Ok(ExitCode::SUCCESS)
}
