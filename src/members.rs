//! Who owns which partition, the way Kafka Streams answers it with
//! `application.server`: every pod publishes its assignment and advertised
//! URL to the compacted `{application_id}-members` topic, and every pod reads
//! that topic back. No consensus of baton's own: the group coordinator
//! already decided the assignment; this only tells it to the HTTP surface.
//!
//! The topic is trusted only as far as its records are signed: each carries
//! an HMAC-SHA256 of its key and value under the cluster's shared secret
//! (`BATON_MEMBERSHIP_SECRET`, else the snapshot secret), and a record
//! without a valid one, or advertising anything but `http(s)://host:port`,
//! is ignored. Whoever can write the topic but lacks the secret can neither
//! claim partitions nor point a pod's forwarded requests at another host.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hmac::{Hmac, Mac};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::kafka::{ClientRole, KafkaSettings};
use crate::metrics::GUARDS;
use crate::runtime::Readiness;
use crate::shutdown::Shutdown;

/// How often a pod republishes its assignment, and after how long without
/// one its entry is ignored (a pod that died without a goodbye).
const PUBLISH_EVERY: Duration = Duration::from_secs(2);
const STALE_AFTER_MS: i64 = 10_000;

/// The header holding a record's signature (hex).
pub const SIGNATURE_HEADER: &str = "baton.signature";
/// Domain separation: a membership signature is never valid as any other.
const SIGNATURE_CONTEXT: &[u8] = b"baton-members-v1\0";

type HmacSha256 = Hmac<Sha256>;
use sha2::Sha256;

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
    /// Signs this pod's records and checks everyone's; `None` trusts nothing
    /// it reads.
    key: Option<HmacSha256>,
}

/// Why a membership record was ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    Unsigned,
    BadSignature,
    BadUrl,
    Unreadable,
}

impl Ignored {
    fn label(self) -> &'static str {
        match self {
            Ignored::Unsigned => "unsigned",
            Ignored::BadSignature => "bad_signature",
            Ignored::BadUrl => "bad_url",
            Ignored::Unreadable => "unreadable",
        }
    }
}

/// An advertised URL must be exactly `http(s)://host:port`: no user info,
/// no path, no query, no fragment. A pod forwards requests, with their
/// tokens, to these URLs; anything more is a way to point them elsewhere.
pub fn check_advertised_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("`{url}` is not an http:// or https:// URL"))?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority
        .chars()
        .any(|c| matches!(c, '/' | '?' | '#' | '@' | '\\') || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "`{url}` must be http(s)://host:port, without credentials, path or query"
        ));
    }
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| format!("`{url}` names no port (http(s)://host:port)"))?;
    // Port 0 is allowed: a pod listening on an ephemeral port advertises
    // it before it is known, and nobody can be sent there.
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!(
            "`{url}` must be http(s)://host:port with a port in 0..=65535"
        ));
    }
    Ok(())
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
            key: None,
        }
    }

    /// Signs and verifies records with `secret` (an empty one trusts nothing).
    pub fn signed_with(mut self, secret: &[u8]) -> Membership {
        self.key = (!secret.is_empty())
            .then(|| HmacSha256::new_from_slice(secret).ok())
            .flatten();
        self
    }

    fn mac(&self, key: &str, value: Option<&[u8]>) -> Option<HmacSha256> {
        let mut mac = self.key.clone()?;
        mac.update(SIGNATURE_CONTEXT);
        mac.update(&(key.len() as u64).to_be_bytes());
        mac.update(key.as_bytes());
        match value {
            Some(value) => {
                mac.update(&[1]);
                mac.update(value);
            }
            None => mac.update(&[0]),
        }
        Some(mac)
    }

    /// The signature header for a record of this pod.
    pub fn signature(&self, key: &str, value: Option<&[u8]>) -> Option<String> {
        self.mac(key, value)
            .map(|mac| hex::encode(mac.finalize().into_bytes()))
    }

    /// Whether `signature` (hex) signs this key and value, in constant time.
    fn verify(
        &self,
        key: &str,
        value: Option<&[u8]>,
        signature: Option<&[u8]>,
    ) -> Result<(), Ignored> {
        let signature = signature.ok_or(Ignored::Unsigned)?;
        let signature = hex::decode(signature).map_err(|_| Ignored::BadSignature)?;
        let mac = self.mac(key, value).ok_or(Ignored::BadSignature)?;
        mac.verify_slice(&signature)
            .map_err(|_| Ignored::BadSignature)
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

    /// Takes one record of the members topic in, if it is signed and sane.
    pub fn apply(&self, key: &str, value: Option<&[u8]>, signature: Option<&[u8]>) {
        if let Err(ignored) = self.check(key, value, signature) {
            GUARDS
                .members_ignored
                .with_label_values(&[ignored.label()])
                .inc();
            tracing::warn!(key, reason = ignored.label(), "membership record ignored");
            return;
        }
        let mut members = self
            .members
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match value.map(serde_json::from_slice::<Member>) {
            Some(Ok(member)) => {
                members.insert(key.to_string(), member);
            }
            Some(Err(_)) => {}
            None => {
                members.remove(key);
            }
        }
    }

    fn check(
        &self,
        key: &str,
        value: Option<&[u8]>,
        signature: Option<&[u8]>,
    ) -> Result<(), Ignored> {
        self.verify(key, value, signature)?;
        let Some(value) = value else {
            return Ok(());
        };
        let member: Member = serde_json::from_slice(value).map_err(|_| Ignored::Unreadable)?;
        if member.instance_id != key {
            return Err(Ignored::Unreadable);
        }
        check_advertised_url(&member.url).map_err(|_| Ignored::BadUrl)
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
                let signature = membership
                    .signature(&membership.instance_id, Some(&payload))
                    .unwrap_or_default();
                let record = BaseRecord::to(&membership.topic)
                    .key(&membership.instance_id)
                    .payload(&payload)
                    .headers(OwnedHeaders::new().insert(Header {
                        key: SIGNATURE_HEADER,
                        value: Some(signature.as_bytes()),
                    }));
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
                        let signature = message.headers().and_then(|headers| {
                            headers
                                .iter()
                                .find(|header| header.key == SIGNATURE_HEADER)
                                .and_then(|header| header.value)
                        });
                        membership.apply(&key, message.payload(), signature);
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
    let signature = membership
        .signature(&membership.instance_id, None)
        .unwrap_or_default();
    let goodbye = BaseRecord::<str, [u8]>::to(&membership.topic)
        .key(&membership.instance_id)
        .headers(OwnedHeaders::new().insert(Header {
            key: SIGNATURE_HEADER,
            value: Some(signature.as_bytes()),
        }));
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
        Membership::new("app", "pod-a", "http://a:8080/", readiness).signed_with(KEY)
    }

    const KEY: &[u8] = b"members-key-0123456789abcdef0123";

    /// Applies a record signed as a pod with the cluster key would sign it.
    fn apply_signed(view: &Membership, key: &str, value: Option<&[u8]>) {
        let signature = view.signature(key, value).expect("keyed");
        view.apply(key, value, Some(signature.as_bytes()));
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
        apply_signed(&view, "pod-b", Some(&peer("pod-b", vec![2, 3], now_ms())));
        assert_eq!(view.owner_of(2), Owner::Peer("http://pod-b:8080".into()));
        // Two claims: a rebalance is moving it.
        apply_signed(&view, "pod-c", Some(&peer("pod-c", vec![3], now_ms())));
        assert_eq!(view.owner_of(3), Owner::Moving);
        // A stale claim is ignored; a tombstone removes the member.
        apply_signed(
            &view,
            "pod-c",
            Some(&peer("pod-c", vec![4], now_ms() - 60_000)),
        );
        assert_eq!(view.owner_of(4), Owner::Moving);
        assert_eq!(view.owner_of(3), Owner::Peer("http://pod-b:8080".into()));
        apply_signed(&view, "pod-b", None);
        assert_eq!(view.owner_of(2), Owner::Moving);
        assert_eq!(view.members().len(), 1, "only this pod is left");
    }

    #[test]
    fn unsigned_forged_or_strange_records_are_ignored() {
        let view = membership();
        let claim = peer("pod-x", vec![2], now_ms());
        view.apply("pod-x", Some(&claim), None);
        assert_eq!(view.owner_of(2), Owner::Moving, "unsigned");
        let forger = Membership::new("app", "evil", "http://e:1", Arc::default())
            .signed_with(b"not-the-cluster-key-0123456789ab");
        let forged = forger.signature("pod-x", Some(&claim)).expect("keyed");
        view.apply("pod-x", Some(&claim), Some(forged.as_bytes()));
        assert_eq!(view.owner_of(2), Owner::Moving, "signed with another key");
        // A valid signature over other bytes does not carry over.
        let other = view.signature("pod-x", Some(b"{}")).expect("keyed");
        view.apply("pod-x", Some(&claim), Some(other.as_bytes()));
        assert_eq!(
            view.owner_of(2),
            Owner::Moving,
            "signature of another value"
        );
        let mut sneaky = serde_json::from_slice::<Member>(&claim).expect("json");
        sneaky.url = "http://pod-x:8080/admin?x=1".into();
        apply_signed(
            &view,
            "pod-x",
            Some(&serde_json::to_vec(&sneaky).expect("json")),
        );
        assert_eq!(view.owner_of(2), Owner::Moving, "a URL with a path");
        apply_signed(&view, "pod-x", Some(&claim));
        assert_eq!(view.owner_of(2), Owner::Peer("http://pod-x:8080".into()));
        // An unsigned tombstone removes nobody.
        view.apply("pod-x", None, None);
        assert_eq!(view.owner_of(2), Owner::Peer("http://pod-x:8080".into()));
    }

    #[test]
    fn advertised_urls_are_scheme_host_and_port_only() {
        for good in [
            "http://baton-0.baton:8080",
            "https://10.0.0.7:443/",
            "http://[::1]:8080",
        ] {
            assert!(check_advertised_url(good).is_ok(), "{good}");
        }
        for bad in [
            "http://baton-0:8080/path",
            "http://baton-0:8080?x=1",
            "http://user:pw@baton-0:8080",
            "http://baton-0",
            "http://baton-0:65536",
            "ftp://baton-0:21",
            "http://:8080",
            "http://baton-0:8080#frag",
        ] {
            assert!(check_advertised_url(bad).is_err(), "{bad}");
        }
    }
}
