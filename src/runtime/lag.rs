//! Consumer lag as the fetches see it.
//!
//! Lag is the partition's high watermark minus its committed offset. The
//! high watermark comes from librdkafka's statistics (`hi_offset`, taken
//! from fetch responses), not from ListOffsets, which the development
//! broker answers wrongly (BROKER.md gap 3). The committed offset comes from
//! the task that owns the partition: baton commits offsets through its
//! transactional producer, so the consumer's own `committed_offset` is only
//! right once, when the group's offsets are first fetched on assignment.
//!
//! Only partitions a task tracks are reported; a released partition's
//! series go with it (its new owner reports them).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use rdkafka::Statistics;

use super::task::TopicPartition;
use crate::metrics::OPS;

/// Where one tracked partition stands.
struct Position {
    /// The next offset to process, as committed.
    committed: Option<i64>,
    /// When `committed` last moved, or when tracking began.
    moved_at: Instant,
    /// The high watermark of the last fetch, when one was seen.
    high: Option<i64>,
}

/// Every tracked partition of this pod; fed by the tasks and by the
/// consumer's statistics callback.
#[derive(Default)]
pub struct ConsumerLag {
    positions: Mutex<HashMap<TopicPartition, Position>>,
}

impl ConsumerLag {
    fn positions(&self) -> std::sync::MutexGuard<'_, HashMap<TopicPartition, Position>> {
        self.positions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A task took the partition.
    pub fn track(&self, tp: &TopicPartition) {
        self.positions().insert(
            tp.clone(),
            Position {
                committed: None,
                moved_at: Instant::now(),
                high: None,
            },
        );
    }

    /// A transaction committed `next` as the partition's offset.
    pub fn committed(&self, tp: &TopicPartition, next: i64) {
        let mut positions = self.positions();
        if let Some(position) = positions.get_mut(tp) {
            if position.committed != Some(next) {
                position.moved_at = Instant::now();
            }
            position.committed = Some(next);
            publish(tp, position);
        }
    }

    /// The task released the partition: its series go.
    pub fn release(&self, tp: &TopicPartition) {
        self.positions().remove(tp);
        let partition = tp.partition().to_string();
        let labels = [tp.topic(), partition.as_str()];
        let _ = OPS.consumer_lag.remove_label_values(&labels);
        let _ = OPS.committed_offset_age.remove_label_values(&labels);
    }

    /// librdkafka's statistics: the fetch-side high watermark of every
    /// partition, and the group's committed offset as fetched on assignment.
    pub fn on_statistics(&self, statistics: &Statistics) {
        let mut positions = self.positions();
        for (topic, stats) in &statistics.topics {
            for (partition, stats) in &stats.partitions {
                let tp = TopicPartition::new(topic, *partition);
                let Some(position) = positions.get_mut(&tp) else {
                    continue;
                };
                if stats.hi_offset >= 0 {
                    position.high = Some(stats.hi_offset);
                }
                if position.committed.is_none() && stats.committed_offset >= 0 {
                    position.committed = Some(stats.committed_offset);
                }
                publish(&tp, position);
            }
        }
    }
}

/// Sets the partition's gauges, once both ends are known.
fn publish(tp: &TopicPartition, position: &Position) {
    let (Some(high), Some(committed)) = (position.high, position.committed) else {
        return;
    };
    let lag = (high - committed).max(0);
    let partition = tp.partition().to_string();
    let labels = [tp.topic(), partition.as_str()];
    OPS.consumer_lag.with_label_values(&labels).set(lag);
    let age = if lag == 0 {
        0.0
    } else {
        position.moved_at.elapsed().as_secs_f64()
    };
    OPS.committed_offset_age.with_label_values(&labels).set(age);
}

/// Tracks a task's partitions while it runs and releases their series
/// however the task ends.
pub(super) struct LagTracking {
    lag: std::sync::Arc<ConsumerLag>,
    tps: Vec<TopicPartition>,
}

impl LagTracking {
    pub fn start(lag: &std::sync::Arc<ConsumerLag>, tps: &[TopicPartition]) -> LagTracking {
        for tp in tps {
            lag.track(tp);
        }
        LagTracking {
            lag: std::sync::Arc::clone(lag),
            tps: tps.to_vec(),
        }
    }
}

impl Drop for LagTracking {
    fn drop(&mut self) {
        for tp in &self.tps {
            self.lag.release(tp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statistics(topic: &str, partition: i32, hi: i64, committed: i64) -> Statistics {
        let json = format!(
            r#"{{"name":"c","client_id":"c","type":"consumer","ts":0,"time":0,"age":0,"replyq":0,
            "msg_cnt":0,"msg_size":0,"msg_max":0,"msg_size_max":0,"tx":0,"tx_bytes":0,"rx":0,
            "rx_bytes":0,"txmsgs":0,"txmsg_bytes":0,"rxmsgs":0,"rxmsg_bytes":0,"simple_cnt":0,
            "metadata_cache_cnt":0,"brokers":{{}},"topics":{{"{topic}":{{"topic":"{topic}",
            "age":0,"metadata_age":0,"batchsize":{{"min":0,"max":0,"avg":0,"sum":0,"stddev":0,
            "p50":0,"p75":0,"p90":0,"p95":0,"p99":0,"p99_99":0,"outofrange":0,"hdrsize":0,"cnt":0}},
            "batchcnt":{{"min":0,"max":0,"avg":0,"sum":0,"stddev":0,"p50":0,"p75":0,"p90":0,
            "p95":0,"p99":0,"p99_99":0,"outofrange":0,"hdrsize":0,"cnt":0}},
            "partitions":{{"{partition}":{{"partition":{partition},"broker":1,"leader":1,
            "desired":true,"unknown":false,"msgq_cnt":0,"msgq_bytes":0,"xmit_msgq_cnt":0,
            "xmit_msgq_bytes":0,"fetchq_cnt":0,"fetchq_size":0,"fetch_state":"active",
            "query_offset":0,"next_offset":0,"app_offset":0,"stored_offset":0,
            "committed_offset":{committed},"eof_offset":0,"lo_offset":0,"hi_offset":{hi},
            "ls_offset":{hi},"consumer_lag":0,"consumer_lag_stored":0,"txmsgs":0,"txbytes":0,
            "rxmsgs":0,"rxbytes":0,"msgs":0,"rx_ver_drops":0,"msgs_inflight":0,
            "next_ack_seq":0,"next_err_seq":0,"acked_msgid":0}}}}}}}}}}"#
        );
        serde_json::from_str(&json).expect("test statistics parse")
    }

    fn lag(topic: &str, partition: i32) -> i64 {
        OPS.consumer_lag
            .with_label_values(&[topic, &partition.to_string()])
            .get()
    }

    #[test]
    fn lag_is_the_fetch_high_watermark_minus_the_committed_offset() {
        let lag_tracker = ConsumerLag::default();
        let tp = TopicPartition::new("lag-unit-a", 3);
        lag_tracker.track(&tp);
        // On assignment the consumer knows the group's committed offset.
        lag_tracker.on_statistics(&statistics("lag-unit-a", 3, 120, 100));
        assert_eq!(lag("lag-unit-a", 3), 20);
        // Later commits go through the producer: the task's word counts,
        // the statistics' stale committed offset does not.
        lag_tracker.committed(&tp, 115);
        assert_eq!(lag("lag-unit-a", 3), 5);
        lag_tracker.on_statistics(&statistics("lag-unit-a", 3, 130, 100));
        assert_eq!(lag("lag-unit-a", 3), 15);
        lag_tracker.committed(&tp, 130);
        assert_eq!(lag("lag-unit-a", 3), 0);
        let age = OPS
            .committed_offset_age
            .with_label_values(&["lag-unit-a", "3"])
            .get();
        assert_eq!(age, 0.0, "caught up: no age");
    }

    #[test]
    fn untracked_and_released_partitions_have_no_series() {
        let lag_tracker = ConsumerLag::default();
        lag_tracker.on_statistics(&statistics("lag-unit-b", 0, 50, 10));
        let text = crate::metrics::render();
        assert!(
            !text.contains("lag-unit-b"),
            "an untracked partition is not reported"
        );
        let tp = TopicPartition::new("lag-unit-b", 0);
        lag_tracker.track(&tp);
        lag_tracker.on_statistics(&statistics("lag-unit-b", 0, 50, 10));
        assert!(crate::metrics::render().contains("topic=\"lag-unit-b\""));
        lag_tracker.release(&tp);
        assert!(!crate::metrics::render().contains("lag-unit-b"));
    }
}
