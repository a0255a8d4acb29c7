//! The two JSON dialects producers write: the platform's legacy shape
//! (`conversationId`, `payload.{tool,arguments,result}`) and baton's canonical
//! one (`event_id`, `context_id`, `usage`, ...). One serde pass reads both.

use serde::Deserialize;
use serde_json::Value;

use super::DecodeError;
use crate::dlq::ErrorClass;
use crate::event::{SourceCoordinates, ToolEvent, ToolStatus, Usage};

/// Every field either dialect may carry. Aliases fold the legacy camelCase
/// names into the canonical ones, so `conversationId` becomes `context_id`.
#[derive(Deserialize)]
struct WireEvent {
    #[serde(default, alias = "eventId")]
    event_id: Option<String>,
    #[serde(default, alias = "conversationId", alias = "contextId")]
    context_id: Option<String>,
    #[serde(default)]
    event: Option<String>,
    #[serde(default, alias = "serverId")]
    server_id: Option<String>,
    #[serde(default)]
    tool: Option<String>,
    #[serde(default)]
    arguments: Option<Value>,
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default, alias = "tokenBudget")]
    token_budget: Option<u64>,
    #[serde(default, alias = "occurredAt")]
    occurred_at: Option<WireTime>,
    #[serde(default, alias = "correlationId")]
    correlation_id: Option<String>,
    #[serde(default)]
    workflow: Option<String>,
    #[serde(default)]
    status: Option<ToolStatus>,
    #[serde(default)]
    error: Option<String>,
    /// `agent.heartbeat`: who sends it, and how far it got.
    #[serde(default)]
    agent: Option<String>,
    #[serde(default)]
    progress: Option<String>,
    /// `approval.granted` / `approval.denied`: who answered, and why. They
    /// become the event's result, so memory and the handover carry them.
    #[serde(default)]
    approver: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    /// Legacy events nest the call under `payload`.
    #[serde(default)]
    payload: Option<LegacyPayload>,
}

/// `occurred_at` as producers write it: an RFC 3339 string, or epoch
/// milliseconds as a JSON integer (what JavaScript's `Date.now()` gives).
#[derive(Deserialize)]
#[serde(untagged)]
enum WireTime {
    Text(String),
    Millis(i64),
    /// Anything else (a fraction, a number past i64, an object), refused
    /// with a reason rather than lost to a shape error.
    Other(Value),
}

impl WireTime {
    /// The time as RFC 3339 (UTC). Strings are kept as written.
    fn into_rfc3339(self) -> Result<String, DecodeError> {
        match self {
            WireTime::Text(text) => Ok(text),
            WireTime::Millis(millis) => time::OffsetDateTime::from_unix_timestamp_nanos(
                i128::from(millis) * 1_000_000,
            )
            .ok()
            .and_then(|at| {
                at.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .ok_or_else(|| {
                DecodeError::poison(
                    ErrorClass::UnrecognizedFormat,
                    format!(
                        "`occurred_at` {millis}: epoch milliseconds outside what RFC 3339 can write (years 0 to 9999)"
                    ),
                )
            }),
            WireTime::Other(value) => Err(DecodeError::poison(
                ErrorClass::UnrecognizedFormat,
                format!(
                    "`occurred_at` must be an RFC 3339 string or integer epoch milliseconds, got {}",
                    crate::memory::preview(&value)
                ),
            )),
        }
    }
}

#[derive(Deserialize)]
struct LegacyPayload {
    #[serde(default)]
    tool: Option<String>,
    #[serde(default)]
    arguments: Option<Value>,
    #[serde(default)]
    result: Option<Value>,
}

/// Decodes a JSON event. Bytes that are not JSON, JSON that is neither
/// dialect and events without a context are poison, each with its own class.
pub fn decode(bytes: &[u8], source: &SourceCoordinates) -> Result<ToolEvent, DecodeError> {
    // One pass: serde_json says whether the bytes were not JSON at all
    // (syntax, truncation) or JSON of the wrong shape (data).
    let wire: WireEvent = serde_json::from_slice(bytes).map_err(|err| {
        let class = match err.classify() {
            serde_json::error::Category::Data => ErrorClass::UnrecognizedFormat,
            _ => ErrorClass::MalformedJson,
        };
        DecodeError::poison(class, err.to_string())
    })?;
    let event = match wire.event {
        Some(event) if !event.is_empty() => event,
        _ => {
            return Err(DecodeError::poison(
                ErrorClass::UnrecognizedFormat,
                "neither the legacy nor the canonical form: no `event` name",
            ));
        }
    };
    let context_id = match wire.context_id {
        Some(id) if !id.is_empty() => id,
        _ => {
            return Err(DecodeError::poison(
                ErrorClass::MissingContextId,
                "event has no `context_id` (or `conversationId`)",
            ));
        }
    };
    let (payload_tool, payload_arguments, payload_result) = match wire.payload {
        Some(p) => (p.tool, p.arguments, p.result),
        None => (None, None, None),
    };
    let result = match (wire.result.or(payload_result), wire.approver, wire.reason) {
        (Some(result), _, _) => result,
        (None, None, None) => Value::Null,
        (None, approver, reason) => serde_json::json!({"approver": approver, "reason": reason}),
    };
    // MCP reports a failed call as a result with `isError: true`.
    let mcp_error = result
        .get("isError")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let status = match wire.status {
        Some(status) => status,
        None if mcp_error => ToolStatus::Error,
        None => ToolStatus::Ok,
    };
    Ok(ToolEvent {
        event_id: wire
            .event_id
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| source.derived_event_id()),
        context_id,
        event,
        server_id: wire.server_id,
        tool: wire.tool.or(payload_tool),
        arguments: wire.arguments.or(payload_arguments).unwrap_or(Value::Null),
        result,
        usage: wire.usage,
        token_budget: wire.token_budget,
        occurred_at: wire.occurred_at.map(WireTime::into_rfc3339).transpose()?,
        correlation_id: wire.correlation_id,
        workflow: wire.workflow,
        status,
        error: wire.error,
        agent: wire.agent,
        progress: wire.progress,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn source() -> SourceCoordinates {
        SourceCoordinates {
            topic: "mcp.events.all".into(),
            partition: 1,
            offset: 7,
        }
    }

    #[test]
    fn decodes_the_legacy_form() {
        let bytes = br#"{"event":"tool.vision_analyze.completed","serverId":"srv-1","payload":{"tool":"vision_analyze","arguments":{"url":"u"},"result":{"labels":["cat"]}},"conversationId":"c-1","correlationId":"r-1"}"#;
        let event = decode(bytes, &source()).expect("legacy form decodes");
        assert_eq!(event.context_id, "c-1");
        assert_eq!(event.event, "tool.vision_analyze.completed");
        assert_eq!(event.server_id.as_deref(), Some("srv-1"));
        assert_eq!(event.tool.as_deref(), Some("vision_analyze"));
        assert_eq!(event.arguments, json!({"url": "u"}));
        assert_eq!(event.result, json!({"labels": ["cat"]}));
        assert_eq!(event.correlation_id.as_deref(), Some("r-1"));
        assert_eq!(event.event_id, "mcp.events.all-1-7");
        assert_eq!(event.status, ToolStatus::Ok);
    }

    #[test]
    fn decodes_the_canonical_form() {
        let bytes = serde_json::to_vec(&json!({
            "event_id": "e-9", "context_id": "c-2", "event": "tool.research_enrich.completed",
            "server_id": "srv-2", "tool": "research_enrich", "arguments": {}, "result": {"ok": true},
            "usage": {"input_tokens": 120, "output_tokens": 30}, "token_budget": 5000,
            "occurred_at": "2026-11-24T10:00:00Z"
        }))
        .expect("json");
        let event = decode(&bytes, &source()).expect("canonical form decodes");
        assert_eq!(event.event_id, "e-9");
        assert_eq!(event.context_id, "c-2");
        assert_eq!(
            event.usage,
            Some(Usage {
                input_tokens: 120,
                output_tokens: 30
            })
        );
        assert_eq!(event.token_budget, Some(5000));
    }

    #[test]
    fn occurred_at_may_be_epoch_milliseconds_or_rfc3339() {
        // What JavaScript writes: `JSON.stringify({..., occurred_at: Date.now()})`.
        let millis = br#"{"event":"tool.vision_analyze.completed","context_id":"c","occurred_at":1764651600250}"#;
        let event = decode(millis, &source()).expect("epoch milliseconds decode");
        assert_eq!(
            event.occurred_at.as_deref(),
            Some("2025-12-02T05:00:00.25Z")
        );
        let camel = br#"{"event":"tool.x.completed","conversationId":"c","occurredAt":0}"#;
        let event = decode(camel, &source()).expect("decodes");
        assert_eq!(event.occurred_at.as_deref(), Some("1970-01-01T00:00:00Z"));
        let text = br#"{"event":"tool.x.completed","context_id":"c","occurred_at":"2026-11-24T10:00:00Z"}"#;
        let event = decode(text, &source()).expect("decodes");
        assert_eq!(event.occurred_at.as_deref(), Some("2026-11-24T10:00:00Z"));
        let absent = br#"{"event":"tool.x.completed","context_id":"c","occurred_at":null}"#;
        assert_eq!(
            decode(absent, &source()).expect("decodes").occurred_at,
            None
        );
    }

    #[test]
    fn an_unusable_occurred_at_is_refused_with_its_reason() {
        for bytes in [
            &br#"{"event":"tool.x.completed","context_id":"c","occurred_at":1.5}"#[..],
            br#"{"event":"tool.x.completed","context_id":"c","occurred_at":99999999999999999}"#,
            br#"{"event":"tool.x.completed","context_id":"c","occurred_at":18446744073709551615}"#,
            br#"{"event":"tool.x.completed","context_id":"c","occurred_at":{"ms":1}}"#,
        ] {
            match decode(bytes, &source()) {
                Err(DecodeError::Poison { class, reason }) => {
                    assert_eq!(class, ErrorClass::UnrecognizedFormat);
                    assert!(reason.contains("occurred_at"), "{reason}");
                }
                other => panic!("expected poison, got {other:?}"),
            }
        }
    }

    #[test]
    fn mcp_is_error_marks_a_failed_call() {
        let bytes = br#"{"event":"tool.browser_take_screenshot.completed","conversationId":"c","payload":{"result":{"isError":true}}}"#;
        let event = decode(bytes, &source()).expect("decodes");
        assert_eq!(event.status, ToolStatus::Error);
    }

    fn class_of(bytes: &[u8]) -> ErrorClass {
        match decode(bytes, &source()) {
            Err(DecodeError::Poison { class, .. }) => class,
            other => panic!("expected poison, got {other:?}"),
        }
    }

    #[test]
    fn poison_is_classified() {
        assert_eq!(class_of(b"not json"), ErrorClass::MalformedJson);
        assert_eq!(class_of(b"[1,2]"), ErrorClass::UnrecognizedFormat);
        assert_eq!(
            class_of(br#"{"hello":"world"}"#),
            ErrorClass::UnrecognizedFormat
        );
        assert_eq!(
            class_of(br#"{"event":"tool.x.completed","usage":"lots"}"#),
            ErrorClass::UnrecognizedFormat
        );
        assert_eq!(
            class_of(br#"{"event":"tool.x.completed"}"#),
            ErrorClass::MissingContextId
        );
        assert_eq!(
            class_of(br#"{"event":"tool.x.completed","context_id":""}"#),
            ErrorClass::MissingContextId
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes, &source());
        }

        #[test]
        fn canonical_round_trip(context in "[a-z0-9-]{1,20}", event_id in "[a-z0-9-]{1,20}", tokens in 0u64..1_000_000) {
            let bytes = serde_json::to_vec(&json!({
                "event_id": event_id, "context_id": context, "event": "tool.t.completed",
                "usage": {"input_tokens": tokens, "output_tokens": 1}
            })).expect("json");
            let event = decode(&bytes, &source()).expect("decodes");
            prop_assert_eq!(event.context_id, context);
            prop_assert_eq!(event.event_id, event_id);
            prop_assert_eq!(event.usage.map(|u| u.total()), Some(tokens + 1));
        }
    }
}
