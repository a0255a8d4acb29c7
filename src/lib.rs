//! baton: Kafka Streams-style, exactly-once orchestration for agents built on
//! MCP tool servers.
//!
//! # Layout
//!
//! Each module is one room; a record travels through them in this order.
//!
//! - [`agent`]: the agent library the examples are built on: consume handovers, fetch snapshots, heartbeat, answer exactly once.
//! - [`cli`]: the command line (`baton run`, `topology`, `state`, `dlq`, ...), parsed with clap.
//! - [`config`]: run configuration from flags, `BATON_*` variables and an optional TOML file, validated in one place.
//! - [`event`]: [`event::ToolEvent`], the one shape every input format decodes into.
//! - [`codec`]: bytes to events and back (JSON, Confluent wire-format Avro); classifies every decode failure as poison or a schema to fetch first.
//! - [`topology`]: workflow definitions from `topology/`, their loading, validation and diagrams.
//! - [`workflow`]: per-context workflow state and the pure step `(state, event, definition) -> outcome`.
//! - [`handover`]: the standard handover record and its deterministic id.
//! - [`memory`]: per-context memory (upserted entries, recent tool outputs), its numbered snapshots and their prompt rendering.
//! - [`snapshot_url`]: signed, expiring snapshot URLs, with secret rotation.
//! - [`dlq`]: poison classes and the dead-letter record.
//! - [`control`]: the healer's commands to the task that owns a context (retry, alternate, plan B, fail).
//! - [`healer`]: `baton heal`: reads the DLQ, decides per record, schedules retries through Kafka, parks what cannot heal.
//! - [`kafka`]: librdkafka client configuration shared by every producer and consumer baton owns.
//! - [`runtime`]: the consumer group, one task per partition, and the exactly-once transaction loop.
//! - [`transactor`]: the one transactional producer wrapper (pods, healer, replay): generations, and every error classified once.
//! - [`http`]: the HTTP surface: metrics, health, state and snapshot queries across pods, the SSE live feed and the dashboard.
//! - [`members`]: which pod owns which partition, published to and read from `{app}-members` (Kafka Streams' `application.server`).
//! - [`metrics`]: every Prometheus metric, defined once.
//! - [`registry`]: the Confluent-compatible Schema Registry: settings, the writer-schema cache, registration and compatibility.
//! - [`state`]: RocksDB stores per partition, their changelogs, checkpoints and restore.
//! - [`sample`]: deterministic sample traffic for the demo, load tests and benchmarks.
//! - [`secret`]: secret values that never print, and which Kafka properties hold one.
//! - [`shutdown`]: the one shutdown signal every task listens to.

pub mod agent;
pub mod cli;
pub mod codec;
pub mod config;
pub mod control;
pub mod dlq;
pub mod event;
pub mod handover;
pub mod healer;
pub mod http;
pub mod kafka;
pub mod members;
pub mod memory;
pub mod metrics;
pub mod registry;
pub mod runtime;
pub mod sample;
pub mod secret;
pub mod shutdown;
pub mod snapshot_url;
pub mod state;
pub mod topology;
pub mod transactor;
pub mod workflow;
