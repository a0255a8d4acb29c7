//! What an agent writes: `ToolCompleted` events (canonical JSON, or Avro
//! through the Schema Registry when one is configured), `memory.upserted`
//! records and `agent.heartbeat`s, each keyed by `context_id`.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::retry::{Attempt, Dependency, RetryPolicy, retry};
use crate::codec::avro::{TOOL_COMPLETED, encode_tool_completed};
use crate::event::{ToolEvent, ToolStatus, Usage};
use crate::handover::Handover;
use crate::memory::{MEMORY_UPSERTED, MemoryKind};
use crate::registry::{Registry, RegistryConfig, SubjectStrategy};
use crate::topology::HEARTBEAT_EVENT;

/// The time now, as baton writes it (RFC 3339, UTC).
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The `event_id` of an agent's answer to a handover: derived from the
/// handover id, so the answer to one handover has one id however often it
/// is written, and baton applies it once.
pub fn completion_event_id(handover_id: &str, tool: &str) -> String {
    format!("{handover_id}.{tool}")
}

/// One memory entry an agent writes to the memory topic.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryWrite {
    pub kind: MemoryKind,
    pub content: String,
    /// In `0..=1`.
    pub importance: f64,
    /// Entries with the same key replace each other.
    pub key: Option<String>,
}

impl MemoryWrite {
    /// The `memory.upserted` record baton's memory topic reads.
    pub fn record(&self, context_id: &str) -> Vec<u8> {
        json!({
            "event": MEMORY_UPSERTED,
            "context_id": context_id,
            "type": self.kind.as_str(),
            "content": self.content,
            "importance": self.importance.clamp(0.0, 1.0),
            "key": self.key,
        })
        .to_string()
        .into_bytes()
    }
}

/// A tool call's outcome, as the `ToolCompleted` event that reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub event: ToolEvent,
    /// The handover answered, when there was one (the vision source starts
    /// contexts without one).
    pub handover_id: Option<String>,
    pub latency_ms: Option<u64>,
}

impl Completion {
    /// The answer to `handover`: `tool.{tool}.completed`, ok or error.
    pub fn for_handover(
        handover: &Handover,
        tool: &str,
        result: Value,
        usage: Usage,
        error: Option<String>,
        latency: Duration,
    ) -> Completion {
        let event = ToolEvent {
            event_id: completion_event_id(&handover.handover_id, tool),
            context_id: handover.context_id.clone(),
            event: format!("tool.{tool}.completed"),
            server_id: Some(handover.agent.clone()),
            tool: Some(tool.to_owned()),
            arguments: json!({"intent": handover.intent, "attempt": handover.attempt}),
            result,
            usage: Some(usage),
            token_budget: None,
            occurred_at: Some(now_rfc3339()),
            correlation_id: handover.correlation_id.clone(),
            workflow: Some(handover.workflow.clone()),
            status: if error.is_some() {
                ToolStatus::Error
            } else {
                ToolStatus::Ok
            },
            error,
            agent: None,
            progress: None,
        };
        Completion {
            event,
            handover_id: Some(handover.handover_id.clone()),
            latency_ms: Some(u64::try_from(latency.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    /// The canonical JSON form (what baton reads without a registry), with
    /// the `handover_id` it answers.
    pub fn json(&self) -> Vec<u8> {
        let e = &self.event;
        let mut value = json!({
            "event_id": e.event_id,
            "context_id": e.context_id,
            "event": e.event,
            "server_id": e.server_id,
            "tool": e.tool,
            "arguments": e.arguments,
            "result": e.result,
            "usage": e.usage,
            "status": e.status,
            "occurred_at": e.occurred_at,
            "correlation_id": e.correlation_id,
        });
        if let Value::Object(fields) = &mut value {
            let mut put = |key: &str, v: Value| {
                if !v.is_null() {
                    fields.insert(key.to_owned(), v);
                }
            };
            put("handover_id", json!(self.handover_id));
            put("workflow", json!(e.workflow));
            put("token_budget", json!(e.token_budget));
            put("error", json!(e.error));
            put("latency_ms", json!(self.latency_ms));
        }
        value.to_string().into_bytes()
    }
}

/// An `agent.heartbeat` for `handover`'s context: the holder is alive and
/// says how far it got.
pub fn heartbeat_record(handover: &Handover, beat: u64, progress: &str) -> Vec<u8> {
    json!({
        "event": HEARTBEAT_EVENT,
        "event_id": format!("{}.heartbeat.{beat}", handover.handover_id),
        "context_id": handover.context_id,
        "agent": handover.agent,
        "progress": progress,
        "occurred_at": now_rfc3339(),
    })
    .to_string()
    .into_bytes()
}

/// How completions are encoded: canonical JSON, or Avro in the Confluent
/// wire format under a schema id the registry issued.
#[derive(Clone)]
pub enum Encoding {
    Json,
    Avro { schema_id: u32 },
}

impl Encoding {
    /// JSON without a registry; with one, the id of `ToolCompleted` (v2)
    /// under `{topic}-value`, registered if the subject lacks it. An
    /// unreachable registry is retried within `policy`; a refusal is final.
    pub async fn resolve(
        registry_url: Option<&str>,
        topic: &str,
        agent: &str,
        policy: RetryPolicy,
    ) -> Result<Encoding, String> {
        Ok(Encoding::connect(registry_url, topic, agent, policy)
            .await?
            .0)
    }

    /// [`Encoding::resolve`], and the registry it registered with (to read
    /// Avro handovers).
    pub async fn connect(
        registry_url: Option<&str>,
        topic: &str,
        agent: &str,
        policy: RetryPolicy,
    ) -> Result<(Encoding, Option<Arc<Registry>>), String> {
        let Some(url) = registry_url else {
            return Ok((Encoding::Json, None));
        };
        let registry = Arc::new(
            Registry::connect(RegistryConfig {
                urls: url.split(',').map(|u| u.trim().to_owned()).collect(),
                username: None,
                password: None,
                ca_file: None,
                cert_file: None,
                key_file: None,
                timeout: Duration::from_secs(5),
                subject_strategy: SubjectStrategy::Topic,
                auto_register: true,
            })
            .map_err(|err| format!("schema registry: {err}"))?,
        );
        let subject = SubjectStrategy::Topic.subject(topic, &TOOL_COMPLETED.full_name());
        let schema_id = retry(
            policy,
            agent,
            Dependency::Registry,
            "register ToolCompleted",
            || {
                let registry = Arc::clone(&registry);
                let subject = subject.clone();
                async move {
                    let found = match registry.find(&subject, &TOOL_COMPLETED).await {
                        Ok(found) => found,
                        Err(err) if err.is_transient() => return Err(Attempt::Retriable(err)),
                        Err(err) => return Err(Attempt::Permanent(err)),
                    };
                    match found {
                        Some(id) => Ok(id),
                        None => registry
                            .register(&subject, &TOOL_COMPLETED)
                            .await
                            .map_err(|err| {
                                if err.is_transient() {
                                    Attempt::Retriable(err)
                                } else {
                                    Attempt::Permanent(err)
                                }
                            }),
                    }
                }
            },
        )
        .await
        .map_err(|gave_up| {
            format!(
                "schema registry: ToolCompleted under `{subject}` after {} attempts: {}",
                gave_up.attempts, gave_up.error
            )
        })?;
        tracing::info!(agent, subject, schema_id, "completions are written as Avro");
        Ok((Encoding::Avro { schema_id }, Some(registry)))
    }

    pub fn encode(&self, completion: &Completion) -> Result<Vec<u8>, String> {
        match self {
            Encoding::Json => Ok(completion.json()),
            Encoding::Avro { schema_id } => {
                encode_tool_completed(*schema_id, &completion.event, completion.latency_ms)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::SourceCoordinates;
    use crate::handover::HandoverStatus;

    fn handover() -> Handover {
        Handover {
            handover_id: "h-1".into(),
            context_id: "ctx-1".into(),
            intent: "capture_evidence".into(),
            agent: "playwright".into(),
            workflow: "vision-research".into(),
            status: HandoverStatus::Retrying,
            last_tool_output: json!({}),
            memory_snapshot_url: None,
            token_budget: Some(900),
            correlation_id: Some("corr".into()),
            causation_id: "e-0".into(),
            produced_at: now_rfc3339(),
            attempt: 2,
            deadline_at: None,
        }
    }

    fn source() -> SourceCoordinates {
        SourceCoordinates {
            topic: "mcp.events.all".into(),
            partition: 0,
            offset: 0,
        }
    }

    #[test]
    fn a_completion_is_canonical_json_baton_decodes() {
        let usage = Usage {
            input_tokens: 10,
            output_tokens: 5,
        };
        let completion = Completion::for_handover(
            &handover(),
            "browser_take_screenshot",
            json!({"png": "..."}),
            usage,
            Some("timeout".into()),
            Duration::from_millis(30),
        );
        let decoded = crate::codec::json::decode(&completion.json(), &source()).expect("decodes");
        assert_eq!(decoded.event_id, "h-1.browser_take_screenshot");
        assert_eq!(decoded.event, "tool.browser_take_screenshot.completed");
        assert_eq!(decoded.status, ToolStatus::Error);
        assert_eq!(decoded.usage, Some(usage));
        assert_eq!(decoded.error.as_deref(), Some("timeout"));
        assert_eq!(decoded.context_id, "ctx-1");
        let value: Value = serde_json::from_slice(&completion.json()).expect("json");
        assert_eq!(value["handover_id"], "h-1");
    }

    #[test]
    fn memory_and_heartbeat_records_are_what_baton_reads() {
        let write = MemoryWrite {
            kind: MemoryKind::Fact,
            content: "a red bicycle".into(),
            importance: 1.5,
            key: Some("caption".into()),
        };
        let upsert = crate::memory::decode_upsert(&write.record("ctx-1")).expect("an upsert");
        assert_eq!(upsert.context_id, "ctx-1");
        assert_eq!(upsert.importance, 1.0, "clamped");
        let beat =
            crate::codec::json::decode(&heartbeat_record(&handover(), 3, "half way"), &source())
                .expect("decodes");
        assert_eq!(beat.event, HEARTBEAT_EVENT);
        assert_eq!(beat.agent.as_deref(), Some("playwright"));
        assert_eq!(beat.progress.as_deref(), Some("half way"));
    }
}
