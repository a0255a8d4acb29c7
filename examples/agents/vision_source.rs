//! The vision source: starts new contexts at `--rate` per second, each with
//! a `tool.vision_analyze.completed` event on `mcp.events.all` (what an MCP
//! server's vision tool would publish). `--small-budget-percent` of them get
//! a budget of only `--small-budget-tokens`, so budget exhaustion is seen.
//! Simulated: no image is analysed and no model is called; the caption's
//! token counts come from baton's tokenizer.
//!
//! ```text
//! cargo run --example agents -- vision-source --bootstrap-servers 127.0.0.1:9092 --rate 2 --contexts 100
//! ```

use std::process::ExitCode;
use std::time::Duration;

use baton::agent::emit::{Completion, Encoding, completion_event_id, now_rfc3339};
use baton::agent::retry::{Attempt, Dependency, RetryPolicy, retry};
use baton::agent::simulate::{percentile, simulated_reply};
use baton::event::{ToolEvent, ToolStatus};
use baton::kafka::KafkaSettings;
use baton::shutdown::Shutdown;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, env = "BATON_BOOTSTRAP_SERVERS")]
    bootstrap_servers: String,
    /// New contexts per second (at most 1000).
    #[arg(long, env = "BATON_SOURCE_RATE", default_value_t = 2.0)]
    rate: f64,
    /// Contexts to start, then exit; 0 runs until SIGTERM or Ctrl-C.
    #[arg(long, env = "BATON_SOURCE_CONTEXTS", default_value_t = 0)]
    contexts: u64,
    /// Context ids are `{prefix}-{n}`; the default is unique per run. A
    /// rerun with the same prefix writes the same event ids, which baton
    /// applies once.
    #[arg(long, env = "BATON_SOURCE_CONTEXT_PREFIX")]
    context_prefix: Option<String>,
    /// Contexts that get the small budget, in percent.
    #[arg(long, env = "BATON_SOURCE_SMALL_BUDGET_PERCENT", default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=100))]
    small_budget_percent: u8,
    /// The small budget, in tokens: less than a research step costs.
    #[arg(long, env = "BATON_SOURCE_SMALL_BUDGET_TOKENS", default_value_t = 150)]
    small_budget_tokens: u64,
    /// The other contexts' budget; unset, the workflow's default.
    #[arg(long, env = "BATON_SOURCE_BUDGET_TOKENS")]
    budget_tokens: Option<u64>,
    /// Where the events go.
    #[arg(
        long,
        env = "BATON_AGENT_OUTPUT_TOPIC",
        default_value = "mcp.events.all"
    )]
    output_topic: String,
    /// A librdkafka property, `KEY=VALUE` (repeatable).
    #[arg(long = "kafka-prop", value_name = "KEY=VALUE")]
    kafka_props: Vec<String>,
    /// Write Avro (`ToolCompleted` v2) through this registry; else JSON.
    #[arg(long, env = "BATON_AGENT_SCHEMA_REGISTRY_URL")]
    schema_registry_url: Option<String>,
    /// Sends to the broker, in all, before giving up on one event (and exiting 1).
    #[arg(long, env = "BATON_AGENT_RETRY_ATTEMPTS", default_value_t = 6)]
    retry_attempts: u32,
}

const MAX_RATE: f64 = 1000.0;

fn vision_event(context_id: &str, n: u64, budget: Option<u64>) -> Completion {
    let prompt = json!({"image": format!("https://images.example.test/{context_id}.jpg")});
    // A vision model's call goes here; simulated instead.
    let reply = simulated_reply(context_id, &prompt, 25);
    let event = ToolEvent {
        event_id: completion_event_id(context_id, "vision_analyze"),
        context_id: context_id.to_owned(),
        event: "tool.vision_analyze.completed".into(),
        server_id: Some("vision-source".into()),
        tool: Some("vision_analyze".into()),
        arguments: prompt,
        result: json!({"caption": reply.text, "n": n, "simulated": true}),
        usage: Some(reply.usage),
        token_budget: budget,
        occurred_at: Some(now_rfc3339()),
        correlation_id: Some(format!("corr-{context_id}")),
        status: ToolStatus::Ok,
        ..ToolEvent::default()
    };
    Completion {
        event,
        handover_id: None,
        latency_ms: Some(40),
    }
}

async fn run(cli: Args, shutdown: Shutdown) -> Result<u64, String> {
    if !(cli.rate > 0.0 && cli.rate <= MAX_RATE) {
        return Err(format!(
            "--rate must be in (0, {MAX_RATE}], got {}",
            cli.rate
        ));
    }
    let entries: Vec<(String, String)> = cli
        .kafka_props
        .iter()
        .enumerate()
        .map(|(n, e)| (format!("--kafka-prop {}", n + 1), e.clone()))
        .collect();
    let mut problems = Vec::new();
    let properties = baton::kafka::parse_properties(&entries, &mut problems);
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    let settings = KafkaSettings {
        bootstrap_servers: cli.bootstrap_servers.clone(),
        properties,
    };
    let policy = RetryPolicy {
        attempts: cli.retry_attempts.max(1),
        first_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(5),
    };
    let encoding = Encoding::resolve(
        cli.schema_registry_url.as_deref(),
        &cli.output_topic,
        "vision-source",
        policy,
    )
    .await?;
    let producer: FutureProducer = settings
        .producer_config()
        .create()
        .map_err(|err| format!("producer: {err}"))?;
    let prefix = cli
        .context_prefix
        .clone()
        .unwrap_or_else(|| format!("ctx-{}", time::OffsetDateTime::now_utc().unix_timestamp()));
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / cli.rate));
    let mut sent = 0u64;
    while cli.contexts == 0 || sent < cli.contexts {
        tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            _ = ticker.tick() => {}
        }
        let context_id = format!("{prefix}-{sent}");
        let budget = if percentile(&context_id, "small-budget") < cli.small_budget_percent {
            Some(cli.small_budget_tokens)
        } else {
            cli.budget_tokens
        };
        let payload = encoding.encode(&vision_event(&context_id, sent, budget))?;
        retry(policy, "vision-source", Dependency::Broker, "send", || {
            let record = FutureRecord::to(&cli.output_topic)
                .key(context_id.as_bytes())
                .payload(payload.as_slice());
            let producer = &producer;
            async move {
                producer
                    .send(record, Duration::from_secs(10))
                    .await
                    .map(|_| ())
                    .map_err(|(err, _)| Attempt::Retriable(err))
            }
        })
        .await
        .map_err(|gave_up| format!("sending {context_id}: {}", gave_up.error))?;
        sent += 1;
        tracing::debug!(context_id, ?budget, "context started");
    }
    Ok(sent)
}

pub fn main(cli: Args) -> ExitCode {
    baton::agent::init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = Shutdown::new();
        shutdown.listen_for_signals();
        match run(cli, shutdown).await {
            Ok(sent) => {
                tracing::info!(contexts = sent, "vision source stopped");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        }
    })
}
