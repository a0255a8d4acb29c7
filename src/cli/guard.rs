//! `baton run` flags that guard the pod: who may call its HTTP surface, what
//! a client may hold, how peers trust each other, and how deep a hostile
//! input may nest.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::Deserialize;

use crate::secret::Secret;

/// Whether the HTTP surface asks for a bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpAuthMode {
    /// Every endpoint but metrics, probes and signed snapshot URLs needs one
    /// of the configured tokens; baton refuses to start without one.
    #[default]
    Tokens,
    /// No tokens: only for a network where every client is trusted.
    None,
}

#[derive(Debug, Clone, Default, Args)]
pub struct GuardArgs {
    /// `tokens` (default): protected endpoints need `Authorization: Bearer`;
    /// `none` turns that off, explicitly.
    #[arg(long, env = "BATON_HTTP_AUTH", value_enum)]
    pub http_auth: Option<HttpAuthMode>,
    /// File of accepted bearer tokens, one per line (`#` comments); list the
    /// old and the new token while rotating.
    #[arg(long, env = "BATON_HTTP_AUTH_TOKEN_FILE")]
    pub http_auth_token_file: Option<PathBuf>,
    /// Accepted bearer tokens, comma separated (`BATON_HTTP_AUTH_TOKENS`).
    #[arg(
        long,
        env = "BATON_HTTP_AUTH_TOKENS",
        hide_env_values = true,
        hide = true
    )]
    pub http_auth_tokens: Option<Secret>,
    /// Serve `/metrics`, `/healthz` and `/readyz` on this address too, and
    /// `/metrics` only there.
    #[arg(long, env = "BATON_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Milliseconds a client may take to send a request head (default 10000).
    #[arg(long, env = "BATON_HTTP_HEADER_TIMEOUT_MS")]
    pub http_header_timeout_ms: Option<u64>,
    /// Milliseconds a connection may move no bytes before it is closed (default 60000).
    #[arg(long, env = "BATON_HTTP_IDLE_TIMEOUT_MS")]
    pub http_idle_timeout_ms: Option<u64>,
    /// Open HTTP connections per listener (default 1024); past it, 503.
    #[arg(long, env = "BATON_HTTP_MAX_CONNECTIONS")]
    pub http_max_connections: Option<usize>,
    /// Seconds one live feed may stay open before the client must reconnect
    /// (default 3600).
    #[arg(long, env = "BATON_SSE_MAX_LIFETIME_SECS")]
    pub sse_max_lifetime_secs: Option<u64>,
    /// Live feeds one token may hold open at once (default 8).
    #[arg(long, env = "BATON_MAX_FEEDS_PER_TOKEN")]
    pub max_feeds_per_token: Option<usize>,
    /// Snapshot renderings (tokenizing) at once, on the blocking pool (default 2).
    #[arg(long, env = "BATON_RENDER_CONCURRENCY")]
    pub render_concurrency: Option<usize>,
    /// HMAC key of `{app}-members` records; defaults to the snapshot secret.
    #[arg(
        long,
        env = "BATON_MEMBERSHIP_SECRET",
        hide_env_values = true,
        hide = true
    )]
    pub membership_secret: Option<Secret>,
    /// Largest `token_budget` an event may carry (default 100000000); a
    /// larger one is dead-lettered as `invalid_token_budget`.
    #[arg(long, env = "BATON_MAX_TOKEN_BUDGET")]
    pub max_token_budget: Option<u64>,
    /// Deepest nesting of a JSON input (default 64, at most 100); deeper is
    /// poison. Stored state and snapshots always read what was accepted.
    #[arg(long, env = "BATON_MAX_JSON_DEPTH")]
    pub max_json_depth: Option<usize>,
    /// Deepest nesting of an Avro writer schema (default 32); deeper ones,
    /// and recursive ones, are `unsupported_schema`.
    #[arg(long, env = "BATON_MAX_SCHEMA_DEPTH")]
    pub max_schema_depth: Option<usize>,
}

/// librdkafka properties, from three places (later ones override earlier):
/// a file, `BATON_KAFKA_PROPS` and `--kafka-prop` flags. A flag is one whole
/// KEY=VALUE, so its value may hold commas; the variable is one per line, or
/// comma separated on a single line.
#[derive(Debug, Clone, Default, Args)]
pub struct KafkaPropArgs {
    /// librdkafka property KEY=VALUE, repeatable (SASL, TLS, tuning); prefix
    /// `consumer.`, `producer.` or `admin.` for one kind of client. Also
    /// `BATON_KAFKA_PROPS` (one per line, or comma separated).
    #[arg(long = "kafka-prop")]
    pub kafka_props: Vec<String>,
    #[arg(
        long = "kafka-props",
        env = "BATON_KAFKA_PROPS",
        hide = true,
        hide_env_values = true
    )]
    pub kafka_props_env: Option<Secret>,
    /// A file of librdkafka properties, KEY=VALUE per line (`#` comments).
    #[arg(long, env = "BATON_KAFKA_PROPS_FILE")]
    pub kafka_props_file: Option<PathBuf>,
}

impl KafkaPropArgs {
    /// The properties in order, or one line per problem, each naming its key
    /// and never a value.
    pub fn collect(&self, problems: &mut Vec<String>) -> Vec<(String, String)> {
        let mut entries: Vec<(String, String)> = Vec::new();
        if let Some(path) = &self.kafka_props_file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    for (number, line) in text.lines().enumerate() {
                        let line = line.trim();
                        if !line.is_empty() && !line.starts_with('#') {
                            entries.push((
                                format!("{} line {}", path.display(), number + 1),
                                line.to_string(),
                            ));
                        }
                    }
                }
                Err(err) => problems.push(format!(
                    "kafka_props_file: cannot read {}: {}",
                    path.display(),
                    err.kind()
                )),
            }
        }
        if let Some(env) = &self.kafka_props_env {
            let text = env.expose();
            let parts: Vec<&str> = if text.contains('\n') {
                text.lines().collect()
            } else {
                text.split(',').collect()
            };
            for (index, part) in parts.into_iter().enumerate() {
                if !part.trim().is_empty() {
                    entries.push((
                        format!("BATON_KAFKA_PROPS entry {}", index + 1),
                        part.trim().to_string(),
                    ));
                }
            }
        }
        for (index, flag) in self.kafka_props.iter().enumerate() {
            entries.push((format!("--kafka-prop {}", index + 1), flag.clone()));
        }
        crate::kafka::parse_properties(&entries, problems)
    }
}
