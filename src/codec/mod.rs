//! Turning input bytes into [`ToolEvent`]s and output records into bytes.
//!
//! Every failure is classified here, once: poison (the record itself is bad and
//! goes to the DLQ) or transient (the world is briefly broken; pause and retry).

pub mod json;

use thiserror::Error;

use crate::dlq::ErrorClass;
use crate::event::{SourceCoordinates, ToolEvent};

/// Why a record could not be decoded.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum DecodeError {
    /// The record is bad and will stay bad: dead-letter it.
    #[error("{class}: {reason}")]
    Poison { class: ErrorClass, reason: String },
    /// Something outside the record failed (a Schema Registry outage, say):
    /// pause the partition and try the same record again later.
    #[error("transient: {reason}")]
    Transient { reason: String },
}

impl DecodeError {
    pub fn poison(class: ErrorClass, reason: impl Into<String>) -> Self {
        DecodeError::Poison {
            class,
            reason: reason.into(),
        }
    }

    pub fn is_retriable(&self) -> bool {
        matches!(self, DecodeError::Transient { .. })
    }
}

/// Limits that turn a hostile record into poison instead of an outage.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub max_record_bytes: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_record_bytes: 1024 * 1024,
        }
    }
}

/// Decodes one input record's value, whatever its format.
pub fn decode_event(
    value: Option<&[u8]>,
    source: &SourceCoordinates,
    limits: &DecodeLimits,
) -> Result<ToolEvent, DecodeError> {
    let bytes = value.unwrap_or_default();
    if bytes.len() > limits.max_record_bytes {
        return Err(DecodeError::poison(
            ErrorClass::RecordTooLarge,
            format!(
                "record of {} bytes exceeds the limit of {} bytes",
                bytes.len(),
                limits.max_record_bytes
            ),
        ));
    }
    json::decode(bytes, source)
}
