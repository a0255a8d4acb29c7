//! The normalised tool-completed event every input format decodes into.
//!
//! Producers speak two JSON dialects today (the platform's legacy shape and the
//! canonical one) and Avro tomorrow; the rest of baton only ever sees
//! [`ToolEvent`], with `context_id` as the one name for the conversation.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where a record came from, so derived ids and dead letters can point at it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SourceCoordinates {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl SourceCoordinates {
    /// The deterministic event id used when a producer sent none: a replay of the
    /// same record yields the same id, so deduplication still works.
    pub fn derived_event_id(&self) -> String {
        format!("{}-{}-{}", self.topic, self.partition, self.offset)
    }
}

/// Token usage a tool call reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

/// Whether the tool call behind an event succeeded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolStatus {
    #[default]
    Ok,
    Error,
}

/// One `tool.{name}.completed` event, whatever format it arrived in.
/// `Default` is the empty event the decoders fill in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolEvent {
    pub event_id: String,
    pub context_id: String,
    /// The event name, for example `tool.vision_analyze.completed`.
    pub event: String,
    pub server_id: Option<String>,
    pub tool: Option<String>,
    pub arguments: Value,
    pub result: Value,
    pub usage: Option<Usage>,
    pub token_budget: Option<u64>,
    pub occurred_at: Option<String>,
    pub correlation_id: Option<String>,
    /// The workflow the producer asks for; otherwise the topology decides.
    pub workflow: Option<String>,
    pub status: ToolStatus,
    pub error: Option<String>,
    /// The agent that sent an `agent.heartbeat`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// A heartbeat's progress text, for the live feed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
}

impl ToolEvent {
    /// The tool name: the explicit field, or the middle of `tool.{name}.completed`.
    pub fn tool_name(&self) -> Option<&str> {
        self.tool.as_deref().or_else(|| {
            self.event
                .strip_prefix("tool.")
                .and_then(|rest| rest.strip_suffix(".completed"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_name_falls_back_to_event_name() {
        let event = ToolEvent {
            event_id: "e".into(),
            context_id: "c".into(),
            event: "tool.vision_analyze.completed".into(),
            ..ToolEvent::default()
        };
        assert_eq!(event.tool_name(), Some("vision_analyze"));
    }

    #[test]
    fn derived_event_id_is_stable() {
        let source = SourceCoordinates {
            topic: "mcp.events.all".into(),
            partition: 3,
            offset: 42,
        };
        assert_eq!(source.derived_event_id(), "mcp.events.all-3-42");
        assert_eq!(source.derived_event_id(), source.clone().derived_event_id());
    }
}
