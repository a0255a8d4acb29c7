//! Who owns which partition, the way Kafka Streams answers it with
//! `application.server`: every pod publishes its assignment and advertised
//! URL to the compacted `{application_id}-members` topic, and every pod reads
//! that topic back. No consensus of baton's own: the group coordinator
//! already decided the assignment; this only tells it to the HTTP surface.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::kafka::{ClientRole, KafkaSettings};
use crate::runtime::Readiness;
use crate::shutdown::Shutdown;

/// How often a pod republishes its assignment, and after how long without
/// one its entry is ignored (a pod that died without a goodbye).
const PUBLISH_EVERY: Duration = Duration::from_secs(2);
const STALE_AFTER_MS: i64 = 10_000;

pub fn members_topic(application_id: &str) -> String {
    format!("{application_id}-members")
}

/// One pod's published view of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub instance_id: String,
    pub url: String,
    /// Partitions assigned to it.
    pub partitions: Vec<i32>,
    /// Of those, the ones restored and serving.
    pub ready: Vec<i32>,
    pub updated_at: i64,
}

/// Where a context's partition is served from, right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This pod, restored and serving.
    Local,
    /// This pod, still restoring it.
    Restoring,
    /// Another pod, at this URL.
    Peer(String),
    /// Nobody, or more than one pod, claims it: a rebalance is moving it.
    Moving,
}

/// The membership view every pod keeps.
pub struct Membership {
    pub instance_id: String,
    pub url: String,
    pub topic: String,
    readiness: Arc<Readiness>,
    members: RwLock<BTreeMap<String, Member>>,
}

impl Membership {
    pub fn new(
        application_id: &str,
        instance_id: &str,
        url: &str,
        readiness: Arc<Readiness>,
    ) -> Membership {
        Membership {
            instance_id: instance_id.to_string(),
            url: url.trim_end_matches('/').to_string(),
            topic: members_topic(application_id),
            readiness,
            members: RwLock::new(BTreeMap::new()),
        }
    }

    /// Live members (this pod always included, from its own readiness).
    pub fn members(&self) -> Vec<Member> {
        let now = now_ms();
        let mut members: BTreeMap<String, Member> = self
            .members
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .filter(|member| now - member.updated_at < STALE_AFTER_MS)
            .map(|member| (member.instance_id.clone(), member.clone()))
            .collect();
        members.insert(self.instance_id.clone(), self.me());
        members.into_values().collect()
    }

    fn me(&self) -> Member {
        let owned = self.readiness.owned();
        Member {
            instance_id: self.instance_id.clone(),
            url: self.url.clone(),
            partitions: owned.keys().copied().collect(),
            ready: owned
                .iter()
                .filter(|(_, ready)| **ready)
                .map(|(partition, _)| *partition)
                .collect(),
            updated_at: now_ms(),
        }
    }

    /// Who serves `partition`. This pod's own assignment is authoritative
    /// for itself; peers are believed only when exactly one claims it.
    pub fn owner_of(&self, partition: i32) -> Owner {
        match self.readiness.owned().get(&partition) {
            Some(true) => return Owner::Local,
            Some(false) => return Owner::Restoring,
            None => {}
        }
        let claims: BTreeSet<String> = self
            .members()
            .into_iter()
            .filter(|member| member.instance_id != self.instance_id)
            .filter(|member| member.partitions.contains(&partition))
            .map(|member| member.url)
            .collect();
        match claims.len() {
            1 => claims.into_iter().next().map_or(Owner::Moving, Owner::Peer),
            _ => Owner::Moving,
        }
    }

    fn apply(&self, key: &str, value: Option<&[u8]>) {
        let mut members = self
            .members
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match value.map(serde_json::from_slice::<Member>) {
            Some(Ok(member)) => {
                members.insert(key.to_string(), member);
            }
            Some(Err(err)) => tracing::warn!(key, cause = %err, "unreadable members record"),
            None => {
                members.remove(key);
            }
        }
    }
}

/// Publishes this pod's assignment every couple of seconds and reads every
/// pod's, until shutdown; then says goodbye with a tombstone. Runs on its own
/// thread: librdkafka's calls here block.
pub fn run(membership: Arc<Membership>, kafka: KafkaSettings, shutdown: Shutdown) {
    let producer: ThreadedProducer<DefaultProducerContext> = match kafka
        .client_config(ClientRole::Producer)
        .create()
    {
        Ok(producer) => producer,
        Err(err) => {
            tracing::error!(cause = %err, "cannot create the members producer; peers will not find this pod");
            return;
        }
    };
    let mut config = kafka.client_config(ClientRole::Consumer);
    config
        .set(
            "group.id",
            format!("{}-{}", membership.topic, membership.instance_id),
        )
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer = match config.create() {
        Ok(consumer) => consumer,
        Err(err) => {
            tracing::error!(cause = %err, "cannot create the members reader");
            return;
        }
    };
    let mut assigned = false;
    let mut last_published = std::time::Instant::now() - PUBLISH_EVERY;
    let mut last_sent: Option<(Vec<i32>, Vec<i32>)> = None;
    while !shutdown.is_triggered() {
        if !assigned {
            assigned = assign_all(&consumer, &membership.topic);
        }
        let me = membership.me();
        let changed = last_sent.as_ref() != Some(&(me.partitions.clone(), me.ready.clone()));
        if changed || last_published.elapsed() >= PUBLISH_EVERY {
            if let Ok(payload) = serde_json::to_vec(&me) {
                let record = BaseRecord::to(&membership.topic)
                    .key(&membership.instance_id)
                    .payload(&payload);
                if let Err((err, _)) = producer.send(record) {
                    tracing::warn!(cause = %err, "cannot publish this pod's assignment");
                }
            }
            last_sent = Some((me.partitions, me.ready));
            last_published = std::time::Instant::now();
        }
        if assigned {
            // Drain what arrived, then come back to publish on time.
            while let Some(result) = consumer.poll(Duration::from_millis(200)) {
                match result {
                    Ok(message) => {
                        let key = message
                            .key()
                            .map(|k| String::from_utf8_lossy(k).into_owned())
                            .unwrap_or_default();
                        membership.apply(&key, message.payload());
                    }
                    Err(err) => {
                        tracing::debug!(cause = %err, "members read error");
                        break;
                    }
                }
            }
        } else {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let goodbye = BaseRecord::<str, [u8]>::to(&membership.topic).key(&membership.instance_id);
    let _ = producer.send(goodbye);
    let _ = producer.flush(Duration::from_secs(5));
}

fn assign_all(consumer: &BaseConsumer, topic: &str) -> bool {
    let metadata = match consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
        Ok(metadata) => metadata,
        Err(err) => {
            tracing::debug!(cause = %err, "members topic metadata");
            return false;
        }
    };
    let mut assignment = TopicPartitionList::new();
    for found in metadata.topics().iter().filter(|t| t.name() == topic) {
        for partition in found.partitions() {
            let _ = assignment.add_partition_offset(topic, partition.id(), Offset::Beginning);
        }
    }
    if assignment.count() == 0 {
        return false;
    }
    consumer.assign(&assignment).is_ok()
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn membership() -> Membership {
        let readiness = Arc::new(Readiness::default());
        readiness.partition_restoring(1);
        readiness.partition_ready(0);
        Membership::new("app", "pod-a", "http://a:8080/", readiness)
    }

    fn peer(id: &str, partitions: Vec<i32>, updated_at: i64) -> Vec<u8> {
        serde_json::to_vec(&Member {
            instance_id: id.into(),
            url: format!("http://{id}:8080"),
            ready: partitions.clone(),
            partitions,
            updated_at,
        })
        .expect("json")
    }

    #[test]
    fn owners_come_from_this_pod_first_then_a_single_live_claim() {
        let view = membership();
        assert_eq!(view.owner_of(0), Owner::Local);
        assert_eq!(view.owner_of(1), Owner::Restoring);
        assert_eq!(view.owner_of(2), Owner::Moving);
        view.apply("pod-b", Some(&peer("pod-b", vec![2, 3], now_ms())));
        assert_eq!(view.owner_of(2), Owner::Peer("http://pod-b:8080".into()));
        // Two claims: a rebalance is moving it.
        view.apply("pod-c", Some(&peer("pod-c", vec![3], now_ms())));
        assert_eq!(view.owner_of(3), Owner::Moving);
        // A stale claim is ignored; a tombstone removes the member.
        view.apply("pod-c", Some(&peer("pod-c", vec![4], now_ms() - 60_000)));
        assert_eq!(view.owner_of(4), Owner::Moving);
        assert_eq!(view.owner_of(3), Owner::Peer("http://pod-b:8080".into()));
        view.apply("pod-b", None);
        assert_eq!(view.owner_of(2), Owner::Moving);
        assert_eq!(view.members().len(), 1, "only this pod is left");
    }
}
