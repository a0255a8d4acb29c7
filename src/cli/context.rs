//! `baton context cancel|list`: operator commands for single contexts.
//!
//! `cancel` writes a `cancel` control command, keyed by the context, to the
//! control topic: the task that owns the context applies it in order with
//! its other input, as it does the healer's commands. `list` asks a pod's
//! `/api/contexts` (any pod answers for all) and follows its pages.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::control::ControlCommand;

#[derive(Debug, Subcommand)]
pub enum ContextCommand {
    /// Cancel a workflow: the context moves to `Cancelled`, its timers are
    /// deleted, the agent holding it gets a `cancelled` handover, and the
    /// records it held are parked.
    Cancel(CancelArgs),
    /// List contexts by state or workflow, or those past a deadline.
    List(ListArgs),
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The context to cancel.
    pub context_id: String,
    /// Why; shown on the live feed.
    #[arg(long)]
    pub reason: Option<String>,
    /// Kafka bootstrap servers, host:port[,host:port].
    #[arg(long, env = "BATON_BOOTSTRAP_SERVERS")]
    pub bootstrap_servers: String,
    #[command(flatten)]
    pub kafka: super::guard::KafkaPropArgs,
    #[arg(long, env = "BATON_CONTROL_TOPIC", default_value = crate::control::DEFAULT_CONTROL_TOPIC)]
    pub control_topic: String,
    /// How long to wait for the broker to take the command.
    #[arg(long, default_value_t = 30_000)]
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ListFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Any pod's HTTP address.
    #[arg(long, env = "BATON_POD_URL", default_value = "http://127.0.0.1:8080")]
    pub pod_url: String,
    /// The bearer token for the pod (`BATON_HTTP_AUTH_TOKEN`).
    #[arg(long, env = "BATON_HTTP_AUTH_TOKEN", hide_env_values = true)]
    pub token: Option<crate::secret::Secret>,
    /// Only contexts in this state.
    #[arg(long)]
    pub state: Option<String>,
    /// Only contexts of this workflow.
    #[arg(long)]
    pub workflow: Option<String>,
    /// Only contexts with a timer past due.
    #[arg(long)]
    pub stalled: bool,
    /// At most this many contexts in all.
    #[arg(long, default_value_t = 1_000)]
    pub max: usize,
    #[arg(long, value_enum, default_value_t = ListFormat::Text)]
    pub format: ListFormat,
}

pub async fn execute(command: ContextCommand) -> anyhow::Result<ExitCode> {
    match command {
        ContextCommand::Cancel(args) => cancel(args).await,
        ContextCommand::List(args) => list(args).await,
    }
}

async fn cancel(args: CancelArgs) -> anyhow::Result<ExitCode> {
    if args.context_id.is_empty() {
        anyhow::bail!("context_id: must not be empty");
    }
    let settings = super::settings(&args.bootstrap_servers, &args.kafka)?;
    let producer: FutureProducer = settings
        .producer_config()
        .create()
        .map_err(|err| anyhow::anyhow!("cannot create a producer: {err}"))?;
    let issued_at = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    // One id per invocation: a retried send of this command is applied
    // once; a second `cancel` of a cancelled context is ignored anyway.
    let command_id = format!("cancel/{}/{issued_at}", args.context_id);
    let command = ControlCommand::cancel(&args.context_id, command_id.clone(), args.reason);
    let payload = command.encode();
    let record = FutureRecord::to(&args.control_topic)
        .key(args.context_id.as_bytes())
        .payload(&payload);
    match producer
        .send(record, Duration::from_millis(args.timeout_ms))
        .await
    {
        Ok(delivery) => {
            println!(
                "cancel requested for `{}` ({command_id}, {} partition {} offset {})",
                args.context_id, args.control_topic, delivery.partition, delivery.offset
            );
            Ok(ExitCode::SUCCESS)
        }
        Err((err, _)) => {
            eprintln!(
                "error: the cancel command for `{}` was not written to {}: {err}",
                args.context_id, args.control_topic
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Pages a pod waits on before the list gives up (each page is bounded).
const MAX_PAGES: usize = 10_000;

async fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let base = args.pod_url.trim_end_matches('/');
    let mut query = crate::http::ContextQuery {
        state: args.state.clone(),
        workflow: args.workflow.clone(),
        stalled: args.stalled,
        limit: args.max.clamp(1, crate::http::MAX_CONTEXTS_PAGE),
        after: None,
    };
    let authorization = crate::http::bearer(args.token.as_ref());
    let headers = crate::http::authorization_headers(&authorization);
    let mut contexts = Vec::new();
    for _ in 0..MAX_PAGES {
        let url = format!("{base}/api/contexts?{}", query.to_query_string());
        let (status, _, body) = crate::http::get_with_headers(&url, &headers)
            .await
            .map_err(|err| anyhow::anyhow!("{url}: {err}"))?;
        if status != 200 {
            eprintln!("error: {url} answered {status}: {body}");
            return Ok(ExitCode::FAILURE);
        }
        let page: crate::http::ContextPage = serde_json::from_str(&body)
            .map_err(|err| anyhow::anyhow!("{url}: not a page of contexts: {err}"))?;
        contexts.extend(page.contexts);
        match page.next {
            Some(next) if contexts.len() < args.max => query.after = Some(next),
            _ => break,
        }
    }
    contexts.truncate(args.max);
    match args.format {
        ListFormat::Json => println!("{}", serde_json::to_string_pretty(&contexts)?),
        ListFormat::Text => {
            println!(
                "{:<36} {:<22} {:<20} {:<12} {:>8} {:>10} OVERDUE",
                "CONTEXT", "WORKFLOW", "STATE", "LOCKED BY", "ATTEMPTS", "TOKENS"
            );
            for context in &contexts {
                println!(
                    "{:<36} {:<22} {:<20} {:<12} {:>8} {:>10} {}",
                    context.context_id,
                    context.workflow,
                    context.state,
                    context.locked_by.as_deref().unwrap_or("-"),
                    context.attempts,
                    context.tokens_left,
                    if context.overdue { "yes" } else { "no" }
                );
            }
            println!("{} context(s)", contexts.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}
