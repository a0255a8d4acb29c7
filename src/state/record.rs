//! One store record per context: its workflow state and its memory (with
//! every snapshot it can still serve) together. An input that changes a
//! context therefore writes one changelog record, whichever parts changed.
//!
//! `{"v":1,"version":N,"workflow":{...}|null,"memory":{...}}`. The parts keep
//! their own encodings and version tags, so each part's decoder still reads
//! every layout it ever wrote.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::memory::Memory;
use crate::workflow::WorkflowState;

/// The layout version of the record around its parts.
pub const CONTEXT_RECORD_VERSION: u64 = 1;

/// The version a record carries: it grows with every change of either part,
/// so a restore can skip changelog records older than the one it holds.
pub fn version(workflow: Option<&WorkflowState>, memory: &Memory) -> u64 {
    workflow
        .map_or(0, |state| state.version)
        .saturating_add(memory.version)
}

/// The record of a context.
pub fn encode(workflow: Option<&WorkflowState>, memory: &Memory) -> Vec<u8> {
    let version = version(workflow, memory).to_string();
    let workflow = workflow.map(WorkflowState::encode);
    let memory = memory.encode();
    let workflow: &[u8] = workflow.as_deref().unwrap_or(b"null");
    let mut out = Vec::with_capacity(40 + version.len() + workflow.len() + memory.len());
    out.extend_from_slice(br#"{"v":1,"version":"#);
    out.extend_from_slice(version.as_bytes());
    out.extend_from_slice(br#","workflow":"#);
    out.extend_from_slice(workflow);
    out.extend_from_slice(br#","memory":"#);
    out.extend_from_slice(&memory);
    out.push(b'}');
    out
}

#[derive(Deserialize)]
struct Parts<'a> {
    v: u64,
    #[serde(borrow)]
    workflow: Option<&'a RawValue>,
    #[serde(borrow)]
    memory: &'a RawValue,
}

/// Only the version; serde skips the rest without building it.
#[derive(Deserialize)]
struct Head {
    version: u64,
}

fn parts(bytes: &[u8]) -> Result<Parts<'_>, String> {
    let parts: Parts<'_> = serde_json::from_slice(bytes)
        .map_err(|err| format!("the context record is not readable: {err}"))?;
    if parts.v != CONTEXT_RECORD_VERSION {
        return Err(format!(
            "the context record has layout version {}; this baton reads {CONTEXT_RECORD_VERSION}",
            parts.v
        ));
    }
    Ok(parts)
}

/// Both parts of a stored record.
pub fn decode(bytes: &[u8]) -> Result<(Option<WorkflowState>, Memory), String> {
    let parts = parts(bytes)?;
    let workflow = match parts.workflow {
        Some(raw) => Some(
            WorkflowState::decode(raw.get().as_bytes())
                .map_err(|err| format!("workflow state: {err}"))?,
        ),
        None => None,
    };
    let memory = Memory::decode(parts.memory.get().as_bytes())?;
    Ok((workflow, memory))
}

/// Only the workflow state (the memory is not decoded).
pub fn decode_workflow(bytes: &[u8]) -> Result<Option<WorkflowState>, String> {
    match parts(bytes)?.workflow {
        Some(raw) => WorkflowState::decode(raw.get().as_bytes())
            .map(Some)
            .map_err(|err| format!("workflow state: {err}")),
        None => Ok(None),
    }
}

/// The workflow and state a stored record's context is in, reading only
/// those two fields; `None` for a record with no workflow yet (memory
/// only) or one that does not decode.
pub fn workflow_and_state(bytes: &[u8]) -> Option<(String, String)> {
    #[derive(Deserialize)]
    struct Where {
        workflow: String,
        state: String,
    }
    let raw = parts(bytes).ok()?.workflow?;
    let found: Where = serde_json::from_str(raw.get()).ok()?;
    Some((found.workflow, found.state))
}

/// The `(due_at, key)` of the timers a stored record holds; none for a
/// record that does not decode (its index entries are then left to a
/// firing to find stale).
pub fn timers_of(bytes: &[u8]) -> Vec<(i64, String)> {
    decode_workflow(bytes)
        .ok()
        .flatten()
        .map(|state| {
            state
                .timers
                .iter()
                .map(|timer| (timer.due_at, timer.key()))
                .collect()
        })
        .unwrap_or_default()
}

/// The version of a stored record, for the restore's stale check.
pub fn version_of(bytes: &[u8]) -> Option<u64> {
    serde_json::from_slice::<Head>(bytes)
        .ok()
        .map(|head| head.version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MemoryKind, MemoryUpsert};

    #[test]
    fn both_parts_round_trip_and_the_version_is_their_sum() {
        let mut memory = Memory::new("c-1");
        memory.upsert(
            &MemoryUpsert {
                context_id: "c-1".into(),
                kind: MemoryKind::Fact,
                content: "owns a red bicycle".into(),
                importance: 0.5,
                key: None,
            },
            1,
        );
        memory.freeze(2);
        let state = WorkflowState {
            context_id: "c-1".into(),
            workflow: "vision-research".into(),
            state: "ResearcherQueued".into(),
            locked_by: Some("researcher".into()),
            attempts: 1,
            token_budget: 1_000,
            tokens_used: 10,
            version: 4,
            updated_at: 5,
            join_arrived: Default::default(),
            recent_event_ids: Default::default(),
            failure: None,
            held: Vec::new(),
            timers: Vec::new(),
        };
        let bytes = encode(Some(&state), &memory);
        assert_eq!(version_of(&bytes), Some(4 + memory.version));
        let (workflow, decoded) = decode(&bytes).expect("decodes");
        assert_eq!(workflow.as_ref(), Some(&state));
        assert_eq!(decoded, memory);
        assert_eq!(decode_workflow(&bytes).expect("decodes"), Some(state));
        assert_eq!(
            workflow_and_state(&bytes),
            Some(("vision-research".into(), "ResearcherQueued".into()))
        );

        let bare = encode(None, &Memory::new("c-2"));
        assert_eq!(version_of(&bare), Some(0));
        let (workflow, decoded) = decode(&bare).expect("decodes");
        assert!(workflow.is_none());
        assert_eq!(decoded, Memory::new("c-2"));
        assert_eq!(workflow_and_state(&bare), None);
    }

    #[test]
    fn unreadable_records_are_errors_that_say_why() {
        assert!(decode(b"not json").is_err());
        let err = decode(br#"{"v":2,"version":1,"workflow":null,"memory":{}}"#).unwrap_err();
        assert!(err.contains("layout version 2"), "{err}");
        let err = decode(br#"{"v":1,"version":1,"workflow":null,"memory":{"v":9}}"#).unwrap_err();
        assert!(err.contains("encoding version 9"), "{err}");
        assert_eq!(version_of(b"{}"), None);
    }
}
