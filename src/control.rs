//! [`ControlCommand`]: what the healer asks the task that owns a context to
//! do about a failed step. Commands travel on the control topic, keyed by
//! `context_id` and co-partitioned with the inputs, so the task that owns the
//! context applies them in order with its other events. The healer never
//! writes workflow state itself.

use serde::{Deserialize, Serialize};

/// The default control topic baton consumes and the healer writes.
pub const DEFAULT_CONTROL_TOPIC: &str = "mcp.orchestration.control";
/// The default topic where the healer schedules delayed retries.
pub const DEFAULT_RETRY_TOPIC: &str = "mcp.events.dlq.retry";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlAction {
    /// Dispatch the same step again.
    Retry,
    /// Dispatch the step's alternate tool/agent.
    Alternate,
    /// Move the workflow to its PlanB route.
    PlanB,
    /// Give up: move the workflow to its failed state.
    Fail,
    /// An operator's `baton context cancel`: stop the workflow whatever it
    /// waits for.
    Cancel,
}

impl ControlAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlAction::Retry => "retry",
            ControlAction::Alternate => "alternate",
            ControlAction::PlanB => "plan_b",
            ControlAction::Fail => "fail",
            ControlAction::Cancel => "cancel",
        }
    }
}

/// One command, as in `schemas/ControlCommand.avsc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlCommand {
    /// Deterministic from the DLQ record it answers, so a command that
    /// arrives twice has no effect the second time.
    pub command_id: String,
    pub context_id: String,
    pub action: ControlAction,
    /// The workflow state the failed step belongs to.
    pub step: String,
    /// The attempt number this command starts.
    pub attempt: u32,
    pub dlq_topic: String,
    pub dlq_partition: i32,
    pub dlq_offset: i64,
    /// Milliseconds since the epoch before which the command must not apply;
    /// the healer holds it in the retry topic until then.
    #[serde(default)]
    pub not_before: Option<i64>,
    /// Why an operator cancelled (a `cancel` command only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ControlCommand {
    /// An operator's cancellation of `context_id`; `command_id` makes it
    /// idempotent (the CLI derives it from the context and the time).
    pub fn cancel(context_id: &str, command_id: String, reason: Option<String>) -> ControlCommand {
        ControlCommand {
            command_id,
            context_id: context_id.to_owned(),
            action: ControlAction::Cancel,
            step: String::new(),
            attempt: 0,
            dlq_topic: String::new(),
            dlq_partition: -1,
            dlq_offset: -1,
            not_before: None,
            reason,
        }
    }

    /// The id for the command answering the DLQ record at these coordinates.
    pub fn id_for(dlq_topic: &str, partition: i32, offset: i64) -> String {
        format!("{dlq_topic}/{partition}/{offset}")
    }

    pub fn encode(&self) -> Vec<u8> {
        // Strings and integers only: serialising cannot fail.
        serde_json::to_vec(self).expect("ControlCommand serialises to JSON")
    }

    pub fn decode(bytes: &[u8]) -> Result<ControlCommand, String> {
        serde_json::from_slice(bytes).map_err(|err| format!("not a control command: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let command = ControlCommand {
            command_id: ControlCommand::id_for("mcp.events.dlq", 2, 17),
            context_id: "ctx-1".into(),
            action: ControlAction::PlanB,
            step: "DownstreamQueued".into(),
            attempt: 5,
            dlq_topic: "mcp.events.dlq".into(),
            dlq_partition: 2,
            dlq_offset: 17,
            not_before: Some(1_700_000_000_000),
            reason: None,
        };
        let bytes = command.encode();
        assert!(String::from_utf8_lossy(&bytes).contains(r#""action":"plan_b""#));
        assert_eq!(ControlCommand::decode(&bytes), Ok(command));
        assert!(ControlCommand::decode(b"{\"action\":\"retry\"}").is_err());
        assert!(ControlCommand::decode(b"\x00garbage").is_err());
    }
}
