//! The live feed: `StatusUpdate`s from `mcp.orchestration.status` as
//! Server-Sent Events.
//!
//! Every client gets its own `read_committed` reader of the topic, so any pod
//! serves any context, and a slow client only ever slows its own reader.
//! Between the reader and the socket sits a small bounded queue. A client
//! that reads slowly is lagged: its queue fills and its own reader waits, so
//! its backlog stays in Kafka, not in memory. A client that accepts nothing
//! for [`STALL_LIMIT`] is dropped (its browser reconnects with `Last-Event-ID`
//! and resumes where it left off), which frees its reader and its slot.
//!
//! An event id is the resume position: `partition:next_offset` for every
//! partition of the topic, comma separated.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Bytes;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::auth::Caller;
use crate::codec::avro;
use crate::kafka::{ClientRole, KafkaSettings};
use crate::metrics::{GUARDS, METRICS};
use crate::shutdown::Shutdown;

/// Events queued between a client's reader and its socket.
const CLIENT_QUEUE: usize = 256;
/// How long a client may accept nothing, with its queue full, before it is
/// dropped. Bursts only lag a reading client; a stalled one gives back its
/// Kafka reader.
pub const STALL_LIMIT: Duration = Duration::from_secs(10);
/// Open feeds per pod; each holds a Kafka reader.
pub const MAX_CLIENTS: usize = 64;
/// Open feeds per token, by default (`--max-feeds-per-token`).
pub const DEFAULT_MAX_FEEDS_PER_TOKEN: usize = 8;
/// How long one feed lives, by default (`--sse-max-lifetime-secs`): then it
/// ends and the browser reconnects with `Last-Event-ID`, so a feed opened
/// with a token that was since removed does not outlive the rotation.
pub const DEFAULT_FEED_LIFETIME: Duration = Duration::from_secs(3600);
/// Upper bound on `?replay=N`.
const MAX_REPLAY: i64 = 1000;

/// What one client asked for.
#[derive(Debug, Clone, Default)]
pub struct FeedRequest {
    pub context_id: Option<String>,
    /// The most recent N updates per partition, before going live.
    pub replay: i64,
    /// From `Last-Event-ID`: where to resume, per partition.
    pub resume: BTreeMap<i32, i64>,
}

impl FeedRequest {
    pub fn parse(query: Option<&str>, last_event_id: Option<&str>) -> Result<FeedRequest, String> {
        let mut request = FeedRequest::default();
        for (key, value) in form_pairs(query) {
            match key.as_str() {
                "context_id" if !value.is_empty() => request.context_id = Some(value),
                "replay" => {
                    request.replay = value
                        .parse::<i64>()
                        .ok()
                        .filter(|n| (0..=MAX_REPLAY).contains(n))
                        .ok_or_else(|| {
                            format!("replay: `{value}` is not a number in 0..={MAX_REPLAY}")
                        })?
                }
                _ => {}
            }
        }
        if let Some(id) = last_event_id.filter(|id| !id.trim().is_empty()) {
            request.resume = parse_position(id)
                .ok_or_else(|| format!("Last-Event-ID: `{id}` is not a feed position"))?;
        }
        Ok(request)
    }
}

/// `partition:offset,...` into a map.
pub fn parse_position(text: &str) -> Option<BTreeMap<i32, i64>> {
    text.split(',')
        .map(|pair| {
            let (partition, offset) = pair.trim().split_once(':')?;
            Some((partition.parse().ok()?, offset.parse().ok()?))
        })
        .collect()
}

pub fn format_position(position: &BTreeMap<i32, i64>) -> String {
    position
        .iter()
        .map(|(partition, offset)| format!("{partition}:{offset}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Decoded `key=value` pairs of a query string.
pub fn form_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |text: &str| {
                percent_encoding::percent_decode_str(&text.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (decode(key), decode(value))
        })
        .collect()
}

/// Counts open feeds, per pod and per caller, and refuses past either bound:
/// one token cannot take every feed a pod can serve.
pub struct FeedSlots {
    open: AtomicUsize,
    per_caller: Mutex<BTreeMap<Caller, usize>>,
    max_per_caller: usize,
}

impl Default for FeedSlots {
    fn default() -> Self {
        FeedSlots::new(DEFAULT_MAX_FEEDS_PER_TOKEN)
    }
}

/// Held while a feed is open.
pub struct FeedSlot {
    slots: Arc<FeedSlots>,
    caller: Caller,
}

/// Why no feed slot was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRefused {
    Pod,
    Caller,
}

impl FeedSlots {
    pub fn new(max_per_caller: usize) -> FeedSlots {
        FeedSlots {
            open: AtomicUsize::new(0),
            per_caller: Mutex::new(BTreeMap::new()),
            max_per_caller,
        }
    }

    /// A slot for `caller`. Anonymous callers (`--http-auth none`) are
    /// bounded by the pod's cap only: they cannot be told apart.
    pub fn acquire(self: &Arc<Self>, caller: Caller) -> Result<FeedSlot, SlotRefused> {
        let mut per_caller = self
            .per_caller
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mine = per_caller.entry(caller).or_insert(0);
        if caller != Caller::Anonymous && *mine >= self.max_per_caller {
            return Err(SlotRefused::Caller);
        }
        let previous = self.open.fetch_add(1, Ordering::SeqCst);
        if previous >= MAX_CLIENTS {
            self.open.fetch_sub(1, Ordering::SeqCst);
            return Err(SlotRefused::Pod);
        }
        *mine += 1;
        METRICS.sse_clients.inc();
        Ok(FeedSlot {
            slots: Arc::clone(self),
            caller,
        })
    }
}

impl Drop for FeedSlot {
    fn drop(&mut self) {
        let mut per_caller = self
            .slots
            .per_caller
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = per_caller.get_mut(&self.caller) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                per_caller.remove(&self.caller);
            }
        }
        self.slots.open.fetch_sub(1, Ordering::SeqCst);
        METRICS.sse_clients.dec();
    }
}

/// Opens the client's reader at its starting positions. Blocking (metadata
/// and watermark calls): run it on the blocking pool.
pub fn open_reader(
    kafka: &KafkaSettings,
    topic: &str,
    request: &FeedRequest,
) -> Result<(StreamConsumer, BTreeMap<i32, i64>), String> {
    let mut config = kafka.client_config(ClientRole::Consumer);
    config
        .set("group.id", "baton-live-feed")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        // Little prefetch: the client's pace, not the broker's, sets the rate.
        .set("queued.max.messages.kbytes", "1024")
        .set("fetch.wait.max.ms", "100")
        // A resume position past the end means the topic was recreated:
        // go live rather than flood the client with a replay.
        .set("auto.offset.reset", "latest");
    let consumer: StreamConsumer = config
        .create()
        .map_err(|err| format!("cannot create a feed reader: {err}"))?;
    let timeout = Duration::from_secs(5);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|err| format!("cannot read {topic} metadata: {err}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(format!("topic {topic} does not exist"));
    }
    let mut position = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, timeout)
            .map_err(|err| format!("cannot read {topic}-{partition} offsets: {err}"))?;
        let start = match request.resume.get(&partition) {
            // Not clamped to `high`: a high watermark can lag the log (a
            // broker that reports the last batch's base offset + 1), and
            // clamping would replay what the client has already seen.
            Some(next) => (*next).max(low),
            None => (high - request.replay).max(low),
        };
        position.insert(partition, start);
        assignment
            .add_partition_offset(topic, partition, Offset::Offset(start))
            .map_err(|err| err.to_string())?;
    }
    consumer
        .assign(&assignment)
        .map_err(|err| format!("cannot assign {topic}: {err}"))?;
    Ok((consumer, position))
}

/// How one feed is paced and bounded.
#[derive(Debug, Clone, Copy)]
pub struct FeedTiming {
    pub heartbeat: Duration,
    /// The feed ends after this long; the client resumes from its last id.
    pub lifetime: Duration,
}

/// Streams the reader's updates to `sink` until the client goes away,
/// stalls for longer than [`STALL_LIMIT`], its lifetime ends, or the pod
/// shuts down.
pub async fn stream(
    consumer: StreamConsumer,
    mut position: BTreeMap<i32, i64>,
    request: FeedRequest,
    sink: mpsc::Sender<Bytes>,
    timing: FeedTiming,
    shutdown: Shutdown,
    _slot: FeedSlot,
) {
    let heartbeat = timing.heartbeat;
    let ends = tokio::time::sleep(timing.lifetime);
    tokio::pin!(ends);
    // The opening comment flushes headers to the client at once.
    if sink
        .send(Bytes::from_static(b": baton live feed\n\n"))
        .await
        .is_err()
    {
        return;
    }
    let mut ticker = tokio::time::interval(heartbeat);
    // Heartbeats missed while lagged are not owed afterwards.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        let frame = tokio::select! {
            _ = shutdown.wait() => return,
            _ = sink.closed() => return,
            _ = &mut ends => {
                GUARDS.sse_ended.with_label_values(&["lifetime"]).inc();
                // `retry` tells the browser to come back at once.
                let _ = sink.try_send(Bytes::from_static(b"retry: 100\n: feed lifetime reached\n\n"));
                return;
            }
            _ = ticker.tick() => Bytes::from_static(b": heartbeat\n\n"),
            received = consumer.recv() => match received {
                Ok(message) => {
                    position.insert(message.partition(), message.offset() + 1);
                    if let Some(filter) = &request.context_id
                        && message.key() != Some(filter.as_bytes())
                    {
                        continue;
                    }
                    let Some(update) = message.payload().and_then(status_json) else {
                        continue;
                    };
                    METRICS.sse_events.inc();
                    Bytes::from(format!(
                        "id: {}\nevent: status\ndata: {update}\n\n",
                        format_position(&position)
                    ))
                }
                Err(err) => {
                    tracing::debug!(cause = %err, "live feed read error");
                    continue;
                }
            },
        };
        // Waiting here is the lag: this client's reader stops fetching.
        let queued = tokio::select! {
            _ = shutdown.wait() => return,
            queued = tokio::time::timeout(STALL_LIMIT, sink.send(frame)) => queued,
        };
        match queued {
            Ok(Ok(())) => {}
            Ok(Err(_closed)) => return,
            Err(_stalled) => {
                METRICS.sse_dropped.inc();
                tracing::info!(
                    stall_limit_s = STALL_LIMIT.as_secs(),
                    "live-feed client stalled; dropped (it resumes from its last event id)"
                );
                return;
            }
        }
    }
}

pub fn client_queue() -> (mpsc::Sender<Bytes>, mpsc::Receiver<Bytes>) {
    mpsc::channel(CLIENT_QUEUE)
}

/// A status record as one line of JSON: JSON records pass through, Avro
/// ones (baton wrote them with its own schema) are decoded.
fn status_json(payload: &[u8]) -> Option<String> {
    if payload.first() != Some(&avro::MAGIC_BYTE) {
        let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
        return Some(value.to_string());
    }
    let (_, datum) = avro::split_frame(payload).ok()?;
    avro::decode_status_json(datum).map(|value| value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_token_cannot_take_every_feed() {
        let slots = Arc::new(FeedSlots::new(2));
        let first = slots.acquire(Caller::Token(0)).expect("first");
        let _second = slots.acquire(Caller::Token(0)).expect("second");
        assert_eq!(
            slots.acquire(Caller::Token(0)).err(),
            Some(SlotRefused::Caller)
        );
        let _other = slots.acquire(Caller::Token(1)).expect("another token");
        drop(first);
        let _again = slots.acquire(Caller::Token(0)).expect("a slot came back");
        // Past the pod's cap nobody gets one, anonymous callers included.
        let mut held = Vec::new();
        while let Ok(slot) = slots.acquire(Caller::Anonymous) {
            held.push(slot);
        }
        assert_eq!(held.len(), MAX_CLIENTS - 3);
        assert_eq!(
            slots.acquire(Caller::Token(2)).err(),
            Some(SlotRefused::Pod)
        );
    }

    #[test]
    fn positions_round_trip() {
        let position: BTreeMap<i32, i64> = [(0, 12), (1, 0), (2, 7)].into_iter().collect();
        let text = format_position(&position);
        assert_eq!(text, "0:12,1:0,2:7");
        assert_eq!(parse_position(&text), Some(position));
        assert_eq!(parse_position("0:x"), None);
    }

    #[test]
    fn requests_parse_filters_replay_and_resume() {
        let request = FeedRequest::parse(Some("context_id=ctx%201&replay=50"), Some("0:3,1:4"))
            .expect("valid");
        assert_eq!(request.context_id.as_deref(), Some("ctx 1"));
        assert_eq!(request.replay, 50);
        assert_eq!(request.resume.get(&1), Some(&4));
        assert!(FeedRequest::parse(Some("replay=-1"), None).is_err());
        assert!(FeedRequest::parse(None, Some("garbage")).is_err());
    }
}
