//! What a task sends: one record of the open transaction, the changelog
//! writes among them, and their size as librdkafka counts it.

use rdkafka::message::{Headers, OwnedHeaders};
use rdkafka::producer::DeliveryFuture;

/// One record to produce inside the open transaction.
#[derive(Debug)]
pub struct OutRecord {
    pub topic: String,
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    /// `None` is a tombstone (a changelog delete).
    pub payload: Option<Vec<u8>>,
    pub headers: Option<OwnedHeaders>,
    /// The record's timestamp; `None` lets the producer stamp it.
    pub timestamp: Option<i64>,
    /// A changelog write: its offset becomes the store's checkpoint.
    pub changelog: bool,
}

impl OutRecord {
    pub(super) fn to(topic: &str, key: &str, payload: Vec<u8>) -> OutRecord {
        OutRecord {
            topic: topic.to_owned(),
            partition: None,
            key: Some(key.as_bytes().to_vec()),
            payload: Some(payload),
            headers: None,
            timestamp: None,
            changelog: false,
        }
    }

    /// The size librdkafka counts against `message.max.bytes`.
    pub(super) fn wire_size(&self) -> usize {
        let headers = self.headers.iter().flat_map(|headers| {
            headers
                .iter()
                .map(|header| (header.key, header.value))
                .collect::<Vec<_>>()
        });
        crate::kafka::record_wire_size(self.key.as_deref(), self.payload.as_deref(), headers)
    }
}

/// The last changelog record of the open transaction: once it is
/// delivered, its offset becomes the store's checkpoint.
#[derive(Default)]
pub struct LastChangelog(pub Option<DeliveryFuture>);
