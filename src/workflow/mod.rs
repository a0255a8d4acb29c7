//! Per-context workflow state and the pure step that advances it.
//!
//! Nothing here does I/O or reads a clock: the shell passes in the context it
//! loaded (state and memory), the input and the record's timestamp, and
//! encodes and sends whatever [`Effects`] [`step`], [`apply_command`] or
//! [`remember`] return. That keeps exactly-once a property of the shell alone and
//! lets every rule below be tested without a broker.

pub mod plan;
mod state;
mod step;
pub mod timers;
mod tokens;

pub use plan::{
    Context, Effects, Input, Outcome, Policy, TimerChanges, apply_command, fire, remember, step,
};
pub use state::{
    HeldRecord, PendingFailure, RECENT_EVENT_IDS, STATE_ENCODING_VERSION, StateDecodeError,
    WorkflowState,
};
pub use step::{
    CommandOutcome, ContextStatus, HeartbeatOutcome, StatusUpdate, StepOutcome, TimerOutcome,
    answer_command, fire_timer, heartbeat, transition,
};
pub use tokens::estimate_tokens;

#[cfg(test)]
mod plan_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod timer_tests;
