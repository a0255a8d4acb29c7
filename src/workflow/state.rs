//! [`WorkflowState`], the registry entry of one context, and its versioned
//! encoding: state written by an older baton must stay readable by a newer
//! one, because it outlives deployments in RocksDB and the changelog.

use std::collections::{BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::timers::Timer;
use crate::topology::WorkflowDefinition;

/// The encoding version [`WorkflowState::encode`] writes. Bump it when a field
/// changes meaning, and teach [`WorkflowState::decode`] the old layout.
pub const STATE_ENCODING_VERSION: u64 = 1;

/// How many recent `event_id`s a context remembers to drop upstream
/// duplicates. Producers retry within seconds, so a short window is enough
/// and keeps each entry small.
pub const RECENT_EVENT_IDS: usize = 64;

/// Where one context stands in its workflow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowState {
    pub context_id: String,
    /// The workflow the context bound to on its first event.
    pub workflow: String,
    pub state: String,
    /// The agent that holds the context; `None` before the first dispatch and
    /// once the workflow stopped dispatching.
    pub locked_by: Option<String>,
    /// Dispatches of the current step: a transition that hands over sets it to
    /// 1, the healer's retries raise it, and it never falls within a step.
    pub attempts: u32,
    pub token_budget: u64,
    /// May exceed `token_budget` when the last step overspent; see
    /// [`WorkflowState::tokens_left`].
    pub tokens_used: u64,
    /// Bumped by one for every applied step.
    pub version: u64,
    /// Milliseconds since the epoch of the input record last applied.
    pub updated_at: i64,
    /// The join triggers of the current state that have already arrived
    /// (an alternate's event is recorded as the trigger it stands in for).
    /// Cleared whenever the state changes.
    pub join_arrived: BTreeSet<String>,
    /// The last [`RECENT_EVENT_IDS`] applied `event_id`s (and control
    /// `command:` ids), oldest first.
    pub recent_event_ids: VecDeque<String>,
    /// A failed tool call the healer has not answered yet. While it is set,
    /// the context's later events wait in `held`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<PendingFailure>,
    /// Input records that arrived while `failure` was pending, in arrival
    /// order; released, in order, once the healer's command is applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<HeldRecord>,
    /// The deadlines the context waits on, ordered by key. Each is also an
    /// entry in its partition's timer index, which the task fires from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timers: Vec<Timer>,
}

/// The failed call a context waits on the healer for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingFailure {
    /// The state the failed call belongs to.
    pub step: String,
    /// The failed call's event name, e.g. `tool.browser_take_screenshot.completed`.
    pub event: String,
    /// The failed call's `event_id`: handovers the healer's answer causes
    /// derive their ids from it, so they are the same however often the
    /// answer is delivered.
    pub event_id: String,
    /// `attempts` when it failed: the healer's command starts `attempt + 1`.
    pub attempt: u32,
    /// The call did not fail: it timed out (or missed its heartbeat). Its
    /// answer, should it still come, is accepted while the step is current.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    /// Who held the context when the call failed (the lock is released while
    /// the healer decides); it picks the retry target where several agents
    /// work on one step.
    #[serde(default)]
    pub locked_by: Option<String>,
    /// The input record's timestamp, in milliseconds.
    pub at: i64,
}

/// An input record held back while a retry is pending: its bytes exactly as
/// they arrived, so releasing it (or dead-lettering it) loses nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: i64,
    #[serde(default, with = "hex_bytes")]
    pub key: Option<Vec<u8>>,
    #[serde(default, with = "hex_bytes")]
    pub value: Option<Vec<u8>>,
}

impl HeldRecord {
    /// The bytes it holds, as the held-record bound counts them.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len) + self.value.as_ref().map_or(0, Vec::len)
    }
}

/// Bytes as a hex string in the JSON state encoding.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        bytes: &Option<Vec<u8>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(bytes) => serializer.serialize_some(&hex::encode(bytes)),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|text| hex::decode(text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Why stored state bytes could not be read back.
#[derive(Debug, Error)]
pub enum StateDecodeError {
    #[error("workflow state is not valid JSON for its version: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("workflow state carries no encoding version `v`")]
    MissingVersion,
    #[error(
        "workflow state has encoding version {found}; this baton reads up to {STATE_ENCODING_VERSION}"
    )]
    UnsupportedVersion { found: u64 },
}

/// The on-disk layout: the state's fields next to a version tag `v`.
#[derive(Serialize)]
struct Envelope<'a> {
    v: u64,
    #[serde(flatten)]
    state: &'a WorkflowState,
}

impl WorkflowState {
    /// A context just bound to `definition`, before its first event is applied.
    pub fn bind(
        context_id: &str,
        definition: &WorkflowDefinition,
        requested_budget: Option<u64>,
    ) -> WorkflowState {
        WorkflowState {
            context_id: context_id.to_owned(),
            workflow: definition.name.clone(),
            state: definition.initial.clone(),
            locked_by: None,
            attempts: 0,
            token_budget: requested_budget.unwrap_or(definition.budget.default_tokens),
            tokens_used: 0,
            version: 0,
            updated_at: 0,
            join_arrived: BTreeSet::new(),
            recent_event_ids: VecDeque::new(),
            failure: None,
            held: Vec::new(),
            timers: Vec::new(),
        }
    }

    /// Tokens still to spend; zero, never negative, once the budget is used up.
    pub fn tokens_left(&self) -> u64 {
        self.token_budget.saturating_sub(self.tokens_used)
    }

    pub fn has_seen(&self, event_id: &str) -> bool {
        self.recent_event_ids.iter().any(|seen| seen == event_id)
    }

    /// Records an applied `event_id`, forgetting the oldest beyond the window.
    pub fn remember(&mut self, event_id: &str) {
        if self.has_seen(event_id) {
            return;
        }
        self.recent_event_ids.push_back(event_id.to_owned());
        while self.recent_event_ids.len() > RECENT_EVENT_IDS {
            self.recent_event_ids.pop_front();
        }
    }

    /// JSON with a version tag: `{"v":1,"context_id":...}`.
    pub fn encode(&self) -> Vec<u8> {
        let envelope = Envelope {
            v: STATE_ENCODING_VERSION,
            state: self,
        };
        // Strings, integers, sets and lists of strings: serialising cannot fail.
        serde_json::to_vec(&envelope).expect("WorkflowState serialises to JSON")
    }

    /// Reads bytes any released version of baton wrote.
    pub fn decode(bytes: &[u8]) -> Result<WorkflowState, StateDecodeError> {
        // The tag first, without building the rest; then one typed pass.
        #[derive(Deserialize)]
        struct Tag {
            v: Option<u64>,
        }
        let tag: Tag = serde_json::from_slice(bytes)?;
        match tag.v.ok_or(StateDecodeError::MissingVersion)? {
            // Version 1 is today's layout; the tag itself is ignored as an unknown field.
            1 => Ok(serde_json::from_slice(bytes)?),
            found => Err(StateDecodeError::UnsupportedVersion { found }),
        }
    }
}
