//! Per-context workflow state and the pure step that advances it.
//!
//! Nothing here does I/O or reads a clock: the shell passes in the state it
//! loaded, the event and the record's timestamp, and writes out whatever
//! [`step`] returns. That keeps exactly-once a property of the shell alone and
//! lets every rule below be tested without a broker.

mod state;
mod step;
mod tokens;

pub use state::{
    HeldRecord, PendingFailure, RECENT_EVENT_IDS, STATE_ENCODING_VERSION, StateDecodeError,
    WorkflowState,
};
pub use step::{CommandOutcome, ContextStatus, StatusUpdate, StepOutcome, apply_command, step};
pub use tokens::estimate_tokens;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
