//! The fault-injection proxy against the real broker: every client goes
//! through it, and each fault does what it says to real librdkafka clients.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::proxy::api;
use common::{Broker, wait_for};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A producer that gives up quickly: failures show within seconds.
fn producer(broker: &Broker, client_id: &str) -> FutureProducer {
    broker
        .client_config()
        .set("client.id", client_id)
        .set("linger.ms", "0")
        .set("request.timeout.ms", "1000")
        .set("message.timeout.ms", "2500")
        .set("reconnect.backoff.ms", "50")
        .set("reconnect.backoff.max.ms", "200")
        .set("retry.backoff.ms", "50")
        .create()
        .expect("producer")
}

/// Sends one record and waits for its delivery report.
fn send(
    runtime: &tokio::runtime::Runtime,
    producer: &FutureProducer,
    topic: &str,
    payload: &str,
) -> (Result<(), KafkaError>, Duration) {
    let start = Instant::now();
    let result = runtime
        .block_on(producer.send(
            FutureRecord::<(), str>::to(topic).payload(payload),
            Timeout::Never,
        ))
        .map(|_| ())
        .map_err(|(e, _)| e);
    (result, start.elapsed())
}

fn values(broker: &Broker, topic: &str) -> Vec<String> {
    let mut values: Vec<String> = broker
        .read_all(topic)
        .into_iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect();
    values.sort();
    values
}

/// An ApiVersions v0 request frame with correlation id `correlation`.
fn api_versions(correlation: i32) -> Vec<u8> {
    let client_id = b"raw-probe";
    let mut frame = Vec::new();
    frame.extend_from_slice(&api::API_VERSIONS.to_be_bytes());
    frame.extend_from_slice(&0i16.to_be_bytes());
    frame.extend_from_slice(&correlation.to_be_bytes());
    frame.extend_from_slice(&(client_id.len() as i16).to_be_bytes());
    frame.extend_from_slice(client_id);
    let mut request = (frame.len() as u32).to_be_bytes().to_vec();
    request.extend(frame);
    request
}

#[test]
fn produce_and_consume_through_the_proxy() {
    let (broker, proxy) = Broker::start_behind_proxy();
    assert_eq!(broker.bootstrap, proxy.addr().to_string());
    broker.create_topics(&[("proxy.plain", 2)]);
    let before = proxy.stats();
    let runtime = runtime();
    let producer = producer(&broker, "plain-producer");
    for i in 0..20 {
        send(&runtime, &producer, "proxy.plain", &format!("r{i}"))
            .0
            .expect("delivered through the proxy");
    }
    let metadata = producer
        .client()
        .fetch_metadata(None, Duration::from_secs(5))
        .expect("metadata");
    for advertised in metadata.brokers() {
        assert_eq!(
            (advertised.host(), advertised.port()),
            ("127.0.0.1", i32::from(proxy.port())),
            "the broker advertises the proxy"
        );
    }
    assert_eq!(values(&broker, "proxy.plain").len(), 20);
    let after = proxy.stats();
    println!("{after:?}");
    assert!(after.requests(api::PRODUCE) >= before.requests(api::PRODUCE) + 20);
    assert!(after.requests(api::FETCH) > before.requests(api::FETCH));
    assert!(after.requests(api::METADATA) > before.requests(api::METADATA));
    assert!(after.accepted > before.accepted);
    assert!(after.bytes_to_broker > before.bytes_to_broker);
    assert!(after.bytes_to_client > before.bytes_to_client);
    assert_eq!(after.fired, 0);
}

#[test]
fn a_cut_fails_delivery_and_heal_recovers() {
    let (broker, proxy) = Broker::start_behind_proxy();
    broker.create_topics(&[("proxy.cut", 1)]);
    let runtime = runtime();
    let producer = producer(&broker, "cut-producer");
    send(&runtime, &producer, "proxy.cut", "before")
        .0
        .expect("warm up");
    let accepted = proxy.stats().accepted;
    proxy.cut();
    wait_for("cut connections to close", Duration::from_secs(5), || {
        proxy.stats().open == 0
    });
    let (lost, took) = send(&runtime, &producer, "proxy.cut", "lost");
    println!("delivery while cut: {lost:?} after {took:?}");
    assert!(lost.is_err(), "nothing gets through a cut");
    assert!(
        proxy.stats().accepted > accepted,
        "the producer kept reconnecting and was refused"
    );
    assert_eq!(proxy.stats().open, 0, "refused connections stay closed");
    proxy.heal();
    let (after, took) = send(&runtime, &producer, "proxy.cut", "after");
    println!("delivery after heal: {after:?} after {took:?}");
    after.expect("the producer recovers after heal");
    assert_eq!(values(&broker, "proxy.cut"), ["after", "before"]);
}

#[test]
fn a_black_hole_times_requests_out_and_heal_recovers() {
    let (broker, proxy) = Broker::start_behind_proxy();
    broker.create_topics(&[("proxy.hole", 1)]);
    let runtime = runtime();
    let producer = producer(&broker, "hole-producer");
    send(&runtime, &producer, "proxy.hole", "before")
        .0
        .expect("warm up");
    let seen = proxy.stats().requests(api::PRODUCE);
    proxy.black_hole();
    let (lost, took) = send(&runtime, &producer, "proxy.hole", "lost");
    println!("delivery into the black hole: {lost:?} after {took:?}");
    assert!(
        matches!(lost, Err(KafkaError::MessageProduction(_))),
        "the record times out: {lost:?}"
    );
    assert!(
        proxy.stats().requests(api::PRODUCE) > seen,
        "the Produce was sent, and dropped"
    );
    // A new connection is accepted, kept open and answered nothing.
    let mut raw = TcpStream::connect(proxy.addr()).expect("accepted");
    raw.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    raw.write_all(&api_versions(7)).expect("sent");
    let mut reply = [0u8; 8];
    let silent = raw.read(&mut reply);
    assert!(
        matches!(&silent, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "a black-holed connection is neither answered nor closed: {silent:?}"
    );
    proxy.heal();
    let mut raw = TcpStream::connect(proxy.addr()).expect("accepted");
    raw.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    raw.write_all(&api_versions(8)).expect("sent");
    raw.read_exact(&mut reply).expect("answered after heal");
    assert_eq!(
        i32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]),
        8
    );
    let (after, took) = send(&runtime, &producer, "proxy.hole", "after");
    println!("delivery after heal: {after:?} after {took:?}");
    after.expect("the producer recovers after heal");
    assert_eq!(values(&broker, "proxy.hole"), ["after", "before"]);
}

#[test]
fn a_delay_slows_each_round_trip() {
    let (broker, proxy) = Broker::start_behind_proxy();
    broker.create_topics(&[("proxy.delay", 1)]);
    let runtime = runtime();
    let producer = producer(&broker, "delay-producer");
    send(&runtime, &producer, "proxy.delay", "warm")
        .0
        .expect("warm up");
    proxy.delay(Duration::from_millis(300));
    let (result, took) = send(&runtime, &producer, "proxy.delay", "slow");
    println!("delivery with 300 ms each way: {result:?} after {took:?}");
    result.expect("delayed, not lost");
    assert!(
        took >= Duration::from_millis(600),
        "request and reply both wait"
    );
    proxy.heal();
    send(&runtime, &producer, "proxy.delay", "fast")
        .0
        .expect("healed");
}

#[test]
fn a_fault_for_one_client_id_prefix_spares_the_others() {
    let (broker, proxy) = Broker::start_behind_proxy();
    broker.create_topics(&[("proxy.prefix", 1)]);
    let runtime = runtime();
    let alpha = producer(&broker, "alpha-1");
    let beta = producer(&broker, "beta-1");
    send(&runtime, &alpha, "proxy.prefix", "alpha-before")
        .0
        .expect("warm up");
    send(&runtime, &beta, "proxy.prefix", "beta-before")
        .0
        .expect("warm up");
    proxy.only("alpha").cut();
    let (lost, _) = send(&runtime, &alpha, "proxy.prefix", "alpha-lost");
    println!("alpha while cut: {lost:?}");
    assert!(lost.is_err(), "alpha is cut off");
    let (spared, took) = send(&runtime, &beta, "proxy.prefix", "beta-during");
    println!("beta while alpha is cut: {spared:?} after {took:?}");
    spared.expect("beta is not affected");
    proxy.heal();
    send(&runtime, &alpha, "proxy.prefix", "alpha-after")
        .0
        .expect("alpha recovers");
    assert_eq!(
        values(&broker, "proxy.prefix"),
        ["alpha-after", "alpha-before", "beta-before", "beta-during"]
    );
}

#[test]
fn losing_the_reply_of_a_commit_is_an_ambiguous_commit() {
    let (broker, proxy) = Broker::start_behind_proxy();
    broker.create_topics(&[("proxy.txn", 1)]);
    let producer: BaseProducer = broker
        .client_config()
        .set("client.id", "txn-producer")
        .set("transactional.id", "proxy-ambiguous")
        .set("request.timeout.ms", "2000")
        .set("reconnect.backoff.ms", "50")
        .set("reconnect.backoff.max.ms", "200")
        .set("retry.backoff.ms", "50")
        .create()
        .expect("transactional producer");
    producer
        .init_transactions(Duration::from_secs(10))
        .expect("init");
    producer.begin_transaction().expect("begin");
    producer
        .send(BaseRecord::<(), str>::to("proxy.txn").payload("ambiguous"))
        .map_err(|(e, _)| e)
        .expect("send");
    producer.flush(Duration::from_secs(10)).expect("flush");
    let before = proxy.stats();
    proxy.only("txn-").cut_after_request(api::END_TXN, 1);
    let timeout = Duration::from_secs(15);
    let start = Instant::now();
    let mut outcome = producer.commit_transaction(timeout);
    println!(
        "commit whose reply was cut: {outcome:?} after {:?}",
        start.elapsed()
    );
    assert!(
        start.elapsed() < timeout + Duration::from_secs(2),
        "commit returns"
    );
    assert_eq!(proxy.fired(), 1, "the rule fired exactly once");
    if let Err(KafkaError::Transaction(e)) = &outcome {
        println!(
            "retriable: {}, requires abort: {}, fatal: {}",
            e.is_retriable(),
            e.txn_requires_abort(),
            e.is_fatal()
        );
        if e.is_retriable() {
            outcome = producer.commit_transaction(timeout);
            println!("commit again: {outcome:?}");
        }
    }
    let after = proxy.stats();
    let end_txns = after.requests(api::END_TXN) - before.requests(api::END_TXN);
    println!("EndTxn requests seen: {end_txns}");
    assert!(end_txns >= 1, "the proxy saw the EndTxn");
    assert_eq!(proxy.fired(), 1, "a one-shot rule fires once, retries pass");
    let visible = values(&broker, "proxy.txn");
    println!(
        "read_committed after the ambiguous commit: {visible:?} (broker hides aborted: {})",
        broker.hides_aborted
    );
    if outcome.is_ok() {
        assert_eq!(
            visible,
            ["ambiguous"],
            "a commit the client saw succeed is visible"
        );
    }
}
