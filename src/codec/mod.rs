//! Turning input bytes into [`ToolEvent`]s and output records into bytes.
//!
//! Every failure is classified here, once: poison (the record itself is bad and
//! goes to the DLQ), or a schema the registry must be asked for first (which
//! the task does without blocking, pausing the partition while the registry
//! is down).

pub mod avro;
pub mod json;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use thiserror::Error;

use crate::dlq::ErrorClass;
use crate::event::{SourceCoordinates, ToolEvent};
use crate::handover::Handover;
use crate::registry::{Registry, WriterSchema};
use crate::workflow::StatusUpdate;

/// Why a record could not be decoded (yet).
#[derive(Debug, Error, Clone, PartialEq)]
pub enum DecodeError {
    /// The record is bad and will stay bad: dead-letter it.
    #[error("{class}: {reason}")]
    Poison { class: ErrorClass, reason: String },
    /// An Avro record whose writer schema is not cached: look it up (an
    /// outage pauses the partition), then decode the same record again.
    #[error("writer schema {id} must be fetched from the schema registry")]
    MissingSchema { id: u32 },
}

impl DecodeError {
    pub fn poison(class: ErrorClass, reason: impl Into<String>) -> Self {
        DecodeError::Poison {
            class,
            reason: reason.into(),
        }
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

/// What an input topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputFormat {
    /// Confluent wire-format Avro only.
    Avro,
    /// JSON only (the legacy and canonical forms).
    Json,
    /// Per record: magic byte 0 is Avro, anything else JSON; a topic can
    /// carry both while its producers migrate.
    #[default]
    Auto,
}

impl InputFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            InputFormat::Avro => "avro",
            InputFormat::Json => "json",
            InputFormat::Auto => "auto",
        }
    }

    pub fn parse(name: &str) -> Option<InputFormat> {
        [InputFormat::Avro, InputFormat::Json, InputFormat::Auto]
            .into_iter()
            .find(|format| format.as_str() == name)
    }
}

/// Decodes input records by their topic's format.
#[derive(Clone)]
pub struct InputDecoder {
    pub limits: DecodeLimits,
    formats: HashMap<String, InputFormat>,
    registry: Option<Arc<Registry>>,
    /// A decoder per writer schema id, built on first use, or why none can
    /// be. Its schema is leaked to give the decoder a `'static` borrow:
    /// schema ids are immutable and never evicted, so this is the lifetime
    /// the cache would give them anyway, and it is leaked once per id (a
    /// failure is cached too), bounded by the ids producers actually use.
    writers: Arc<RwLock<HashMap<u32, WriterDecoderOutcome>>>,
}

impl std::fmt::Debug for InputDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputDecoder")
            .field("limits", &self.limits)
            .field("formats", &self.formats)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

impl InputDecoder {
    pub fn new(
        limits: DecodeLimits,
        formats: HashMap<String, InputFormat>,
        registry: Option<Arc<Registry>>,
    ) -> Self {
        InputDecoder {
            limits,
            formats,
            registry,
            writers: Arc::default(),
        }
    }

    /// JSON only, as before any registry: for tools and tests.
    pub fn json(limits: DecodeLimits) -> Self {
        InputDecoder::new(limits, HashMap::new(), None)
    }

    pub fn registry(&self) -> Option<&Arc<Registry>> {
        self.registry.as_ref()
    }

    /// A topic's format: as configured, else `auto` with a registry (one
    /// topic may carry both while producers migrate) and `json` without one
    /// (Avro could not be decoded anyway, so a leading 0 byte is bad JSON).
    pub fn format_of(&self, topic: &str) -> InputFormat {
        match self.formats.get(topic) {
            Some(format) => *format,
            None if self.registry.is_some() => InputFormat::Auto,
            None => InputFormat::Json,
        }
    }

    /// Decodes one input record's value, by its topic's format.
    pub fn decode(
        &self,
        value: Option<&[u8]>,
        source: &SourceCoordinates,
    ) -> Result<ToolEvent, DecodeError> {
        let bytes = value.unwrap_or_default();
        if bytes.len() > self.limits.max_record_bytes {
            return Err(DecodeError::poison(
                ErrorClass::RecordTooLarge,
                format!(
                    "record of {} bytes exceeds the limit of {} bytes",
                    bytes.len(),
                    self.limits.max_record_bytes
                ),
            ));
        }
        let is_avro = match self.format_of(&source.topic) {
            InputFormat::Avro => true,
            InputFormat::Json => false,
            InputFormat::Auto => bytes.first() == Some(&avro::MAGIC_BYTE),
        };
        if !is_avro {
            return json::decode(bytes, source);
        }
        let (id, datum) = avro::split_frame(bytes)?;
        let Some(registry) = &self.registry else {
            return Err(DecodeError::poison(
                ErrorClass::UnknownSchema,
                format!("Avro record (schema id {id}) but no schema registry is configured"),
            ));
        };
        match registry.cached(id) {
            Some(WriterSchema::Found(writer)) => {
                self.writer_decoder(id, &writer)?.decode(datum, source)
            }
            Some(WriterSchema::Unknown(reason)) => {
                Err(DecodeError::poison(ErrorClass::UnknownSchema, reason))
            }
            None => Err(DecodeError::MissingSchema { id }),
        }
    }
}

type WriterDecoderOutcome = Result<Arc<avro::WriterDecoder<'static>>, DecodeError>;

impl InputDecoder {
    fn writer_decoder(&self, id: u32, writer: &apache_avro::Schema) -> WriterDecoderOutcome {
        if let Some(outcome) = self
            .writers
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&id)
        {
            return outcome.clone();
        }
        let mut writers = self
            .writers
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        writers
            .entry(id)
            .or_insert_with(|| {
                let schema: &'static apache_avro::Schema = Box::leak(Box::new(writer.clone()));
                avro::WriterDecoder::new(id, schema).map(Arc::new)
            })
            .clone()
    }
}

/// Decodes one JSON input record, checking the size limit first.
pub fn decode_event(
    value: Option<&[u8]>,
    source: &SourceCoordinates,
    limits: &DecodeLimits,
) -> Result<ToolEvent, DecodeError> {
    InputDecoder::json(*limits).decode(value, source)
}

impl OutputEncoder {
    pub fn encode_status(&self, update: &StatusUpdate) -> Result<Vec<u8>, String> {
        match self {
            OutputEncoder::Json => serde_json::to_vec(update).map_err(|err| err.to_string()),
            OutputEncoder::Avro {
                status_schema_id, ..
            } => avro::encode_status(*status_schema_id, update),
        }
    }
}

/// How handovers are written: JSON, or Avro under the schema id registered
/// for each handover topic's subject.
#[derive(Debug, Clone, Default)]
pub enum OutputEncoder {
    #[default]
    Json,
    Avro {
        /// By handover topic.
        schema_ids: HashMap<String, u32>,
        /// Of `StatusUpdate` on the live-feed topic.
        status_schema_id: u32,
    },
}

impl OutputEncoder {
    pub fn encode_handover(&self, topic: &str, handover: &Handover) -> Result<Vec<u8>, String> {
        match self {
            OutputEncoder::Json => serde_json::to_vec(handover).map_err(|err| err.to_string()),
            OutputEncoder::Avro { schema_ids, .. } => {
                let id = schema_ids
                    .get(topic)
                    .ok_or_else(|| format!("no schema id resolved for topic {topic}"))?;
                avro::encode_handover(*id, handover)
            }
        }
    }
}
