//! Issue 13's integration tests: nobody gets in where they do not belong.
//! Tokens on the HTTP surface (with a rotation), a bounded server under a
//! slowloris client and a flood of idle connections, signed membership,
//! recursive Avro writer schemas, a forged far-future retry, and secrets
//! that never reach `--help`. Real broker, real pods.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use baton::sample;
use common::registry::SchemaRegistry;
use common::{Baton, BatonOptions, Broker, HANDOVER_TOPICS, HTTP_TOKEN, RawRecord, Reader};
use rdkafka::consumer::{BaseConsumer, Consumer};

const PARTITIONS: i32 = 3;
const OLD_TOKEN: &str = "old-token-before-rotation-0123";
const NEW_TOKEN: &str = "new-token-after-rotation-45678";

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|err| panic!("not JSON ({err}): {body}"))
}

/// One GET on a fresh connection with exactly `token` (or none), reading
/// only the status line and headers, so a live feed's endless body is fine.
fn status_of(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("request");
    let mut lines = BufReader::new(stream);
    let mut status_line = String::new();
    lines.read_line(&mut status_line).expect("status line");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("{path}: no status in {status_line:?}"));
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if lines.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    // A short body (errors, JSON answers) comes along; a feed's does not.
    let mut body = String::new();
    if !head.to_ascii_lowercase().contains("text/event-stream") {
        let _ = lines.read_to_string(&mut body);
    }
    (status, body)
}

#[test]
fn every_protected_endpoint_needs_a_token_and_a_rotation_keeps_both() {
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    let inputs = sample::vision_research_traffic(2, 0.0, 5);
    broker.produce("mcp.events.all", &inputs);
    let dir = tempfile::tempdir().expect("dir");
    let token_file = dir.path().join("tokens");
    std::fs::write(
        &token_file,
        format!("# old and new while clients move\n{OLD_TOKEN}\n{NEW_TOKEN}\n"),
    )
    .expect("token file");
    let metrics_port = common::free_port();
    let baton = Baton::start(&broker, {
        let mut options = BatonOptions::new("auth-a");
        options.extra_args = vec![
            "--http-auth-token-file".into(),
            token_file.display().to_string(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{metrics_port}"),
        ];
        options
    });
    common::wait_for("ready", Duration::from_secs(60), || baton.is_ready());
    let mut reader = Reader::new(&broker, &HANDOVER_TOPICS);
    reader.wait_until("a handover", Duration::from_secs(60), |records| {
        !records.is_empty()
    });
    let handover = reader.handovers()[0].json();
    let context_id = handover["context_id"]
        .as_str()
        .expect("context")
        .to_string();
    let port = baton.http_port;

    let protected = [
        format!("/contexts/{context_id}"),
        "/api/overview".to_string(),
        "/events?replay=1".to_string(),
        "/contexts/nobody".to_string(),
    ];
    for path in &protected {
        for (token, why) in [
            (None, "no token"),
            (Some("wrong-token-0123456789abc"), "wrong token"),
        ] {
            let (status, body) = status_of(port, path, token);
            assert_eq!(status, 401, "{path} with {why}: {body}");
            assert_eq!(
                json(&body)["error"]["code"],
                "unauthorized",
                "{path}: {body}"
            );
        }
        for token in [OLD_TOKEN, NEW_TOKEN, HTTP_TOKEN] {
            let (status, body) = status_of(port, path, Some(token));
            let expected = if path.ends_with("nobody") { 404 } else { 200 };
            assert_eq!(status, expected, "{path} with a configured token: {body}");
        }
    }
    // A malformed Authorization header is not a token.
    let (status, _, _) = baton
        .http_request_as("/api/overview", &[("Authorization", "Basic b2xkOnRva2Vu")])
        .expect("overview");
    assert_eq!(status, 401);

    // Open without a token: probes, the page, signed snapshot URLs, and
    // /metrics, which --metrics-addr moved to its own listener.
    for path in ["/healthz", "/readyz", "/"] {
        assert_eq!(status_of(port, path, None).0, 200, "{path}");
    }
    let url = handover["memory_snapshot_url"]
        .as_str()
        .expect("snapshot URL");
    let target = &url[url.find("/contexts/").expect("path")..];
    let (status, body) = status_of(port, target, None);
    assert_eq!(status, 200, "a signed snapshot URL needs no token: {body}");
    assert!(json(&body)["tool_outputs"].is_array(), "{body}");
    let (status, body) = status_of(metrics_port, "/metrics", None);
    assert_eq!(status, 200);
    assert!(
        body.contains("baton_http_unauthorized_total"),
        "{body:.300}"
    );
    let refused: f64 = body
        .lines()
        .find_map(|line| line.strip_prefix("baton_http_unauthorized_total "))
        .and_then(|n| n.trim().parse().ok())
        .expect("counter");
    assert!(refused >= 9.0, "every refusal counted: {refused}");
    assert_eq!(status_of(metrics_port, "/healthz", None).0, 200);
    assert_eq!(status_of(port, "/metrics", None).0, 404, "moved away");
    assert_eq!(
        status_of(metrics_port, "/api/overview", Some(NEW_TOKEN)).0,
        404,
        "the metrics listener serves nothing else"
    );
}

/// Reads until the server closes the connection: what it sent, and when.
fn until_closed(stream: &mut TcpStream, deadline: Duration) -> (String, Option<Duration>) {
    let started = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut received = Vec::new();
    let mut buffer = [0u8; 512];
    while started.elapsed() < deadline {
        match stream.read(&mut buffer) {
            Ok(0) => {
                return (
                    String::from_utf8_lossy(&received).into_owned(),
                    Some(started.elapsed()),
                );
            }
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                return (
                    String::from_utf8_lossy(&received).into_owned(),
                    Some(started.elapsed()),
                );
            }
        }
    }
    (String::from_utf8_lossy(&received).into_owned(), None)
}

#[test]
fn slowloris_and_a_thousand_idle_connections_are_cut_or_refused_while_others_are_served() {
    const CAP: usize = 200;
    const HEADER_TIMEOUT: Duration = Duration::from_millis(2500);
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    let baton = Baton::start(&broker, {
        let mut options = BatonOptions::new("bounded-a");
        options.extra_args = vec![
            "--http-header-timeout-ms".into(),
            HEADER_TIMEOUT.as_millis().to_string(),
            "--http-idle-timeout-ms".into(),
            "5000".into(),
            "--http-max-connections".into(),
            CAP.to_string(),
            "--sse-heartbeat-ms".into(),
            "1000".into(),
        ];
        options
    });
    common::wait_for("ready", Duration::from_secs(60), || baton.is_ready());
    let port = baton.http_port;

    // A normal client on a keep-alive connection, asking every 100 ms
    // throughout: every answer must be a 200.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let normal = {
        let (stop, served) = (Arc::clone(&stop), Arc::clone(&served));
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        std::thread::spawn(move || {
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut lines = BufReader::new(stream.try_clone().expect("clone"));
            while !stop.load(Ordering::SeqCst) {
                let request = format!(
                    "GET /api/overview HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {HTTP_TOKEN}\r\n\r\n"
                );
                stream
                    .write_all(request.as_bytes())
                    .expect("the normal client writes");
                let mut status = String::new();
                if let Err(err) = lines.read_line(&mut status) {
                    panic!(
                        "the normal client's request {} failed: {err}",
                        served.load(Ordering::SeqCst)
                    );
                }
                assert!(
                    status.contains(" 200 "),
                    "the normal client was refused: {status:?}"
                );
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    lines.read_line(&mut line).expect("header");
                    if line == "\r\n" {
                        break;
                    }
                    if let Some(n) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = n.trim().parse().expect("length");
                    }
                }
                let mut body = vec![0; length];
                lines.read_exact(&mut body).expect("body");
                served.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    common::wait_for(
        "the normal client is served",
        Duration::from_secs(10),
        || served.load(Ordering::SeqCst) >= 3,
    );

    // A slowloris client: one header byte every 300 ms, never finishing.
    let slowloris = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let opened = Instant::now();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .expect("head");
        stream
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let mut buffer = [0u8; 256];
        while opened.elapsed() < Duration::from_secs(20) {
            if stream.write_all(b"a").is_err() {
                return opened.elapsed();
            }
            match stream.read(&mut buffer) {
                Ok(0) => return opened.elapsed(),
                Ok(_) => {}
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(err) if err.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return opened.elapsed(),
            }
        }
        panic!("the slowloris client was never cut");
    });

    // Partitions keep processing while the surface is under siege.
    let inputs = sample::vision_research_traffic(20, 0.0, 9);
    let expected = common::reference(&inputs);

    // 1,000 idle connections that never send a byte.
    let opened = Instant::now();
    let mut idle: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    broker.produce("mcp.events.all", &inputs);
    let mut refused = 0;
    let mut cut = 0;
    for stream in &mut idle {
        let left = Duration::from_secs(15).saturating_sub(opened.elapsed());
        let (received, closed_after) = until_closed(stream, left.max(Duration::from_secs(1)));
        assert!(
            closed_after.is_some(),
            "an idle connection stayed open past its timeout"
        );
        if received.starts_with("HTTP/1.1 503") {
            assert!(received.contains("too_many_connections"), "{received}");
            refused += 1;
        } else {
            // hyper closes a connection whose head timed out, at most with a 408.
            assert!(
                received.is_empty() || received.starts_with("HTTP/1.1 408"),
                "an idle connection got something else: {received}"
            );
            cut += 1;
        }
    }
    let all_closed = opened.elapsed();
    // Cut connections free their slots while the flood still arrives, so
    // more than CAP may be accepted over time, never more than CAP at once.
    assert!(
        refused >= 100 && cut >= CAP / 2,
        "past the cap connections are refused, the others cut: {refused} refused, {cut} cut"
    );
    assert!(
        all_closed < HEADER_TIMEOUT + Duration::from_secs(8),
        "every idle connection was closed near its timeout: {all_closed:?}"
    );
    let slow = slowloris.join().expect("slowloris thread");
    assert!(
        slow >= HEADER_TIMEOUT - Duration::from_millis(200) && slow < HEADER_TIMEOUT * 4,
        "the slowloris client is cut at the header timeout: {slow:?}"
    );

    let mut reader = Reader::new(&broker, &HANDOVER_TOPICS);
    reader.wait_until("every handover", Duration::from_secs(90), |records| {
        common::unique_handover_count(records) >= expected.handovers.len()
    });
    stop.store(true, Ordering::SeqCst);
    normal
        .join()
        .expect("the normal client was served throughout");
    assert!(served.load(Ordering::SeqCst) >= 10);
    // And a new client after the siege is served too.
    assert_eq!(baton.http_get("/healthz").map(|r| r.0), Some(200));
    assert!(baton.metric("baton_http_connections_refused_total") >= refused as f64);
    assert!(
        baton.metric("baton_http_connections_cut_total{reason=\"header_timeout\"}") >= 1.0,
        "{}",
        baton.http_get("/metrics").map(|r| r.1).unwrap_or_default()
    );
}

#[test]
fn a_forged_membership_record_never_redirects_a_request() {
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    let inputs = sample::vision_research_traffic(12, 0.0, 21);
    broker.produce("mcp.events.all", &inputs);
    let expected = common::reference(&inputs);
    let pod_a = Baton::start(&broker, BatonOptions::new("pod-a"));
    let pod_b = Baton::start(&broker, BatonOptions::new("pod-b"));
    let mut reader = Reader::new(&broker, &HANDOVER_TOPICS);
    reader.wait_until("every handover", Duration::from_secs(90), |records| {
        common::unique_handover_count(records) >= expected.handovers.len()
    });
    common::wait_for("both pods serve", Duration::from_secs(60), || {
        [&pod_a, &pod_b].iter().all(|pod| {
            pod.http_get("/api/overview")
                .filter(|(status, _)| *status == 200)
                .is_some_and(|(_, body)| {
                    json(&body)["members"].as_array().is_some_and(|members| {
                        members.len() == 2
                            && members
                                .iter()
                                .all(|m| m["ready"].as_array().is_some_and(|p| !p.is_empty()))
                    })
                })
        })
    });

    // The attacker's listener: it counts every connection it gets.
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    let attacker = format!(
        "http://127.0.0.1:{}",
        listener.local_addr().expect("addr").port()
    );
    listener.set_nonblocking(true).expect("nonblocking");
    let received = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let listening = {
        let (received, stop) = (Arc::clone(&received), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok(_) => {
                        received.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })
    };
    // Forged records: pod-b's own key, every partition, the attacker's URL;
    // unsigned, and with a signature made up by someone without the key.
    let forge = |signature: Option<&str>| {
        let member = serde_json::json!({
            "instance_id": "pod-b", "url": attacker, "partitions": [0, 1, 2],
            "ready": [0, 1, 2], "updated_at": time::OffsetDateTime::now_utc().unix_timestamp() * 1000 + 5_000,
        });
        RawRecord {
            key: Some(b"pod-b".to_vec()),
            value: member.to_string().into_bytes(),
            headers: signature
                .map(|sig| vec![("baton.signature".to_string(), sig.to_string())])
                .unwrap_or_default(),
            ..RawRecord::default()
        }
    };
    let started = Instant::now();
    let mut asked = 0;
    let mut served_by_b = 0;
    while started.elapsed() < Duration::from_secs(6) {
        broker.produce_raw(
            "baton-test-members",
            &[forge(None), forge(Some(&"ab".repeat(32)))],
        );
        for context_id in expected.states.keys() {
            let encoded = percent_encoding::utf8_percent_encode(
                context_id,
                percent_encoding::NON_ALPHANUMERIC,
            );
            if let Some((status, headers, _)) =
                pod_a.http_request(&format!("/contexts/{encoded}"), &[])
            {
                asked += 1;
                if status == 200
                    && headers.get("x-baton-served-by").map(String::as_str) == Some("pod-b")
                {
                    served_by_b += 1;
                }
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    listening.join().expect("listener");
    assert_eq!(
        received.load(Ordering::SeqCst),
        0,
        "the forged URL received a connection"
    );
    assert!(
        asked > 0 && served_by_b > 0,
        "requests were forwarded to the real pod-b: {served_by_b} of {asked}"
    );
    assert!(pod_a.metric("baton_members_ignored_total{reason=\"unsigned\"}") >= 1.0);
    assert!(pod_a.metric("baton_members_ignored_total{reason=\"bad_signature\"}") >= 1.0);
}

#[test]
fn a_recursive_writer_schema_with_a_deep_datum_is_dead_lettered_and_the_partition_flows_on() {
    let broker = Broker::start();
    broker.create_baton_topics(1);
    let registry = SchemaRegistry::start();
    let id = registry.register(
        "evil-value",
        r#"{"type":"record","name":"Node","fields":[
            {"name":"value","type":"string"},{"name":"next","type":["null","Node"]}]}"#,
    );
    // 100,000 levels: an empty string and "the next one follows", then the end.
    let mut datum = Vec::with_capacity(200_002);
    for _ in 0..100_000 {
        datum.extend_from_slice(&[0x00, 0x02]);
    }
    datum.extend_from_slice(&[0x00, 0x00]);
    let mut value = vec![0u8];
    value.extend_from_slice(&id.to_be_bytes());
    value.extend_from_slice(&datum);
    let context = "deep-ctx";
    let poison = sample::SampleRecord {
        key: Some(context.as_bytes().to_vec()),
        value: value.clone(),
    };
    let after = sample::vision_research_traffic(3, 0.0, 4);
    let expected = common::reference(&after);
    let mut records = vec![poison.clone(), poison];
    records.extend(after);
    broker.produce("mcp.events.all", &records);
    let mut baton = Baton::start(&broker, {
        let mut options = BatonOptions::new("deep-a");
        options.extra_args = vec![
            "--schema-registry-url".into(),
            registry.url(),
            "--auto-register-schemas".into(),
        ];
        options
    });
    let mut reader = common::outputs_reader(&broker);
    reader.wait_until(
        "both dead letters and every later handover",
        Duration::from_secs(90),
        |records| {
            // Handovers are Avro here: counted, not compared.
            records
                .iter()
                .filter(|r| r.topic.starts_with("mcp.handover."))
                .count()
                >= expected.handovers.len()
                && records
                    .iter()
                    .filter(|r| r.topic == "mcp.events.dlq")
                    .count()
                    >= 2
        },
    );
    let dead = reader.topic("mcp.events.dlq");
    assert_eq!(dead.len(), 2, "{dead:?}");
    for letter in dead {
        assert_eq!(letter.headers["baton.error.class"], "unsupported_schema");
        assert!(
            letter.headers["baton.error.reason"].contains("contains itself"),
            "{:?}",
            letter.headers
        );
        assert_eq!(letter.value, value, "byte for byte");
    }
    assert!(
        baton.wait_for_exit(Duration::from_millis(100)).is_none(),
        "the pod stays up"
    );
    assert!(baton.is_ready());
    // The schema was judged once, by its id: one lookup.
    assert_eq!(registry.id_lookups(), 1);
}

#[test]
fn a_retry_a_year_ahead_is_capped_and_the_retry_topic_moves_on() {
    let broker = Broker::start();
    broker.create_baton_topics(1);
    let topology = common::topology_variant(&[("max_backoff_ms = 30000", "max_backoff_ms = 2000")]);
    let healer = common::Healer::start(&broker, "healer-cap", topology.path());
    let year_ms = 365 * 86_400 * 1_000i64;
    let now_ms = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    let command = baton::control::ControlCommand {
        command_id: "mcp.events.dlq/0/999".into(),
        context_id: "ctx-far".into(),
        action: baton::control::ControlAction::Retry,
        step: "DownstreamQueued".into(),
        attempt: 2,
        dlq_topic: "mcp.events.dlq".into(),
        dlq_partition: 0,
        dlq_offset: 999,
        not_before: Some(now_ms + year_ms),
        reason: None,
    };
    broker.produce_raw(
        "mcp.events.dlq.retry",
        &[RawRecord {
            key: Some(b"ctx-far".to_vec()),
            value: command.encode(),
            ..RawRecord::default()
        }],
    );
    let sent = Instant::now();
    let mut control = Reader::new(&broker, &["mcp.orchestration.control"]);
    control.wait_until(
        "the capped retry is forwarded",
        Duration::from_secs(60),
        |records| !records.is_empty(),
    );
    let waited = sent.elapsed();
    let forwarded =
        baton::control::ControlCommand::decode(&control.records[0].value).expect("command");
    assert_eq!(forwarded, command, "forwarded as written");
    assert!(
        waited < Duration::from_secs(30),
        "capped near 2 s, not a year: {waited:?}"
    );
    // The healer's committed offset on the retry topic moves past it.
    let consumer: BaseConsumer = broker
        .client_config()
        .set("group.id", "baton-test-healer")
        .create()
        .expect("consumer");
    common::wait_for(
        "the retry topic is committed past the record",
        Duration::from_secs(30),
        || {
            let mut partitions = rdkafka::TopicPartitionList::new();
            partitions.add_partition("mcp.events.dlq.retry", 0);
            consumer
                .committed_offsets(partitions, Duration::from_secs(5))
                .ok()
                .and_then(|committed| {
                    committed
                        .find_partition("mcp.events.dlq.retry", 0)
                        .map(|p| p.offset())
                })
                == Some(rdkafka::Offset::Offset(1))
        },
    );
    assert_eq!(healer.metric("baton_healer_retries_capped_total"), 1.0);
}

#[test]
fn help_and_config_errors_print_no_secret() {
    let secrets: BTreeMap<&str, &str> = [
        (
            "BATON_KAFKA_PROPS",
            "sasl.username=u,sasl.password=hunter2-kafka,fragment-after-comma",
        ),
        (
            "BATON_SNAPSHOT_SECRET",
            "snapshot-secret-0123456789abcdef0123",
        ),
        (
            "BATON_SNAPSHOT_SECRET_PREVIOUS",
            "previous-secret-0123456789abcdef01",
        ),
        ("BATON_HTTP_AUTH_TOKENS", "bearer-token-0123456789abcdef"),
        ("BATON_HTTP_AUTH_TOKEN", "client-token-0123456789abcdef"),
        (
            "BATON_MEMBERSHIP_SECRET",
            "membership-secret-0123456789abcdef",
        ),
        ("BATON_SCHEMA_REGISTRY_PASSWORD", "registry-pw-s3cr3t-0123"),
    ]
    .into_iter()
    .collect();
    let needles = [
        "hunter2-kafka",
        "fragment-after-comma",
        "snapshot-secret",
        "previous-secret",
        "bearer-token",
        "client-token",
        "membership-secret",
        "registry-pw-s3cr3t",
    ];
    let run = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_baton"))
            .args(args)
            .envs(secrets.iter())
            .env("BATON_BOOTSTRAP_SERVERS", "127.0.0.1:9")
            .output()
            .expect("baton runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        for needle in needles {
            assert!(
                !text.contains(needle),
                "{args:?} printed `{needle}`:\n{text}"
            );
        }
        (output.status.code(), text)
    };
    for command in [
        &["run", "--help"][..],
        &["heal", "--help"],
        &["dlq", "replay", "--help"],
        &["dlq", "inspect", "--help"],
        &["state", "get", "--help"],
        &["topics", "create", "--help"],
    ] {
        let (code, text) = run(command);
        assert_eq!(code, Some(0), "{command:?}: {text}");
        assert!(text.contains("Usage"), "{text}");
    }
    assert!(run(&["run", "--help"]).1.contains("--http-auth-token-file"));
    // A bad configuration names what is wrong without quoting a secret: the
    // comma in BATON_KAFKA_PROPS split off a fragment that is no KEY=VALUE.
    let (code, text) = run(&["run", "--topology", "topology", "--instance-id", "p"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("BATON_KAFKA_PROPS entry 3 is not KEY=VALUE"),
        "{text}"
    );
}
