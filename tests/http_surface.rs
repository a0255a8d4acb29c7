//! Issue 6's integration tests: the HTTP surface against a real broker and
//! real baton pods: endpoints and their errors, signed memory snapshots,
//! queries across pods, and the live feed's resume.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use baton::sample::{self, SampleRecord};
use baton::snapshot_url::UrlSigner;
use common::{
    Baton, BatonOptions, Broker, HANDOVER_TOPICS, HTTP_TOKEN, Reader, SNAPSHOT_SECRET, reference,
};

const PARTITIONS: i32 = 3;

fn memory_record(
    context_id: &str,
    kind: &str,
    content: &str,
    importance: f64,
    key: Option<&str>,
) -> SampleRecord {
    let mut value = serde_json::json!({
        "event": "memory.upserted", "context_id": context_id, "type": kind,
        "content": content, "importance": importance,
    });
    if let Some(key) = key {
        value["key"] = serde_json::json!(key);
    }
    SampleRecord {
        key: Some(context_id.as_bytes().to_vec()),
        value: value.to_string().into_bytes(),
    }
}

fn metric(baton: &Baton, series: &str) -> f64 {
    let Some((200, body)) = baton.http_get("/metrics") else {
        return f64::NAN;
    };
    body.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|value| value.trim().parse().ok())
        })
        .unwrap_or(f64::NAN)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|err| panic!("not JSON ({err}): {body}"))
}

fn error_code(body: &str) -> String {
    json(body)["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The path and query of a handover's snapshot URL.
fn snapshot_target(handover: &serde_json::Value) -> String {
    let url = handover["memory_snapshot_url"]
        .as_str()
        .expect("snapshot URL");
    let at = url.find("/contexts/").expect("path");
    url[at..].to_string()
}

fn handovers_of(reader: &Reader, context_id: &str) -> Vec<serde_json::Value> {
    reader
        .handovers()
        .into_iter()
        .map(|record| record.json())
        .filter(|value| value["context_id"] == context_id)
        .collect()
}

#[test]
fn endpoints_answer_and_errors_are_json() {
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    let baton = Baton::start(&broker, BatonOptions::new("http-a"));
    common::wait_for("ready", Duration::from_secs(60), || baton.is_ready());

    assert_eq!(baton.http_get("/healthz").map(|r| r.0), Some(200));
    let (status, headers, body) = baton.http_request("/", &[]).expect("dashboard");
    assert_eq!(status, 200);
    assert!(
        headers["content-type"].starts_with("text/html"),
        "{headers:?}"
    );
    assert!(body.contains("baton"), "the dashboard page");

    let (status, body) = baton.http_get("/contexts/nobody").expect("context");
    assert_eq!(
        (status, error_code(&body).as_str()),
        (404, "unknown_context"),
        "{body}"
    );
    let (status, body) = baton.http_get("/no/such/route").expect("route");
    assert_eq!((status, error_code(&body).as_str()), (404, "not_found"));
    let (status, body) = baton.http_get("/events?replay=oops").expect("feed");
    assert_eq!(
        (status, error_code(&body).as_str()),
        (400, "bad_feed_request")
    );

    let (status, overview) = baton.http_get("/api/overview").expect("overview");
    assert_eq!(status, 200, "{overview}");
    let overview = json(&overview);
    assert_eq!(overview["partitions"], PARTITIONS);
    assert_eq!(overview["pod"]["instance_id"], "http-a");
    assert_eq!(overview["dlq"]["records"], 0);
    let members = overview["members"].as_array().expect("members");
    assert_eq!(members.len(), 1);
    assert_eq!(
        members[0]["partitions"].as_array().map(Vec::len),
        Some(PARTITIONS as usize)
    );

    // Only GET.
    let mut stream = TcpStream::connect(("127.0.0.1", baton.http_port)).expect("connect");
    write!(
        stream,
        "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut response = String::new();
    std::io::Read::read_to_string(&mut stream, &mut response).expect("read");
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
    assert!(response.contains("method_not_allowed"), "{response}");
}

#[test]
fn snapshots_are_signed_frozen_trimmed_pruned_and_survive_key_rotation() {
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    let mut baton = Baton::start(&broker, {
        let mut options = BatonOptions::new("snap-a");
        options.extra_args = vec!["--max-snapshots-per-context".into(), "2".into()];
        options
    });
    let context = "ctx-memory";
    broker.produce(
        "mcp.memory",
        &[
            memory_record(
                context,
                "preference",
                "Prefers short answers",
                0.4,
                Some("style"),
            ),
            memory_record(context, "fact", "Owns a 1960s teak sofa", 0.9, None),
            memory_record(
                context,
                "instruction",
                "Never quote prices in USD",
                0.7,
                None,
            ),
            // Same key: replaces the first one.
            memory_record(
                context,
                "preference",
                "Prefers bullet points",
                0.6,
                Some("style"),
            ),
        ],
    );
    common::wait_for("memory applied", Duration::from_secs(60), || {
        metric(&baton, "baton_memory_upserts_total") >= 4.0
    });
    let mut rng = fastrand::Rng::with_seed(5);
    broker.produce("mcp.events.all", &sample::context_events(context, &mut rng));

    let mut reader = Reader::new(&broker, &HANDOVER_TOPICS);
    reader.wait_until(
        "the reporter handover",
        Duration::from_secs(60),
        |records| records.iter().any(|r| r.topic == "mcp.handover.reporter"),
    );
    let handovers = handovers_of(&reader, context);
    let target_of = |agent: &str| {
        snapshot_target(
            handovers
                .iter()
                .find(|h| h["agent"] == agent)
                .unwrap_or_else(|| panic!("a handover to {agent}")),
        )
    };
    let first = target_of("researcher");
    let last = target_of("reporter");
    assert!(
        first.starts_with("/contexts/ctx%2Dmemory/snapshots/1?"),
        "{first}"
    );
    assert!(
        last.starts_with("/contexts/ctx%2Dmemory/snapshots/3?"),
        "{last}"
    );

    // The latest snapshot: memories by importance, then the tool outputs.
    let (status, body) = baton.http_get(&last).expect("snapshot");
    assert_eq!(status, 200, "{body}");
    let prompt = json(&body);
    let contents: Vec<&str> = prompt["memories"]
        .as_array()
        .expect("memories")
        .iter()
        .map(|m| m["content"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        contents,
        [
            "Owns a 1960s teak sofa",
            "Never quote prices in USD",
            "Prefers bullet points"
        ]
    );
    let outputs = prompt["tool_outputs"].as_array().expect("tool outputs");
    assert_eq!(outputs.len(), 4, "every tool output so far: {prompt}");
    assert!(
        outputs
            .iter()
            .all(|o| o["tokens"].as_u64().is_some_and(|t| t > 0))
    );
    assert_eq!(prompt["truncated"], false);

    // Trimmed to a budget: the most important memory first, nothing after
    // the first item that does not fit.
    let (status, body) = baton
        .http_get(&format!("{last}&max_tokens=12"))
        .expect("trimmed");
    assert_eq!(status, 200, "{body}");
    let trimmed = json(&body);
    assert_eq!(trimmed["truncated"], true, "{trimmed}");
    assert!(
        trimmed["total_tokens"].as_u64().is_some_and(|t| t <= 12),
        "{trimmed}"
    );
    assert_eq!(trimmed["memories"][0]["content"], "Owns a 1960s teak sofa");

    // Signatures: missing 401, tampered 403, expired 403.
    let path = last
        .split_once('?')
        .map(|(p, _)| p.to_string())
        .expect("path");
    let (status, body) = baton.http_get(&path).expect("unsigned");
    assert_eq!(
        (status, error_code(&body).as_str()),
        (401, "signature_missing"),
        "{body}"
    );
    // Flip the signature's last hex digit.
    let mut tampered = last.clone();
    let sig_end = tampered.find("sig=").map(|at| {
        tampered[at..]
            .find('&')
            .map_or(tampered.len(), |end| at + end)
    });
    if let Some(end) = sig_end {
        let flipped = if tampered.as_bytes()[end - 1] == b'0' {
            "1"
        } else {
            "0"
        };
        tampered.replace_range(end - 1..end, flipped);
    }
    let (status, body) = baton.http_get(&tampered).expect("tampered");
    assert_eq!(
        (status, error_code(&body).as_str()),
        (403, "signature_invalid"),
        "{body}"
    );
    let other_context = last.replace("ctx%2Dmemory", "ctx%2Dother");
    assert_eq!(
        baton.http_get(&other_context).map(|r| r.0),
        Some(403),
        "a signature binds its path"
    );
    let signer = UrlSigner::new(
        SNAPSHOT_SECRET.as_bytes(),
        None,
        "http://127.0.0.1",
        Duration::from_secs(60),
    )
    .expect("signer");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let sign = |version: u64, at: i64| {
        let url = signer.sign(context, version, at);
        url[url.find("/contexts/").expect("path")..].to_string()
    };
    let (status, body) = baton.http_get(&sign(3, now - 3600)).expect("expired");
    assert_eq!(
        (status, error_code(&body).as_str()),
        (403, "signature_expired"),
        "{body}"
    );

    // Kept: the newest two. Version 1 was pruned (410); 99 never existed (404).
    let (status, body) = baton.http_get(&first).expect("pruned");
    assert_eq!(
        (status, error_code(&body).as_str()),
        (410, "snapshot_pruned"),
        "{body}"
    );
    let (status, body) = baton.http_get(&sign(99, now)).expect("unknown");
    assert_eq!(
        (status, error_code(&body).as_str()),
        (404, "unknown_snapshot"),
        "{body}"
    );
    let (status, body) = baton
        .http_get(&{
            let url = signer.sign("ctx-nobody", 1, now);
            url[url.find("/contexts/").expect("path")..].to_string()
        })
        .expect("unknown context");
    assert_eq!(
        (status, error_code(&body).as_str()),
        (404, "unknown_context"),
        "{body}"
    );

    // Key rotation: the old key is still accepted as the previous one.
    baton.kill();
    let state_dir = std::mem::replace(&mut baton.state_dir, tempfile::tempdir().expect("dir"));
    let new_secret = "rotated-snapshot-secret-abcdefghijklmnop";
    let rotated = Baton::start(&broker, {
        let mut options = BatonOptions::new("snap-a");
        options.state_dir = Some(state_dir);
        options.extra_args = vec![
            "--snapshot-secret".into(),
            new_secret.into(),
            "--snapshot-secret-previous".into(),
            SNAPSHOT_SECRET.into(),
        ];
        options
    });
    common::wait_for("ready after rotation", Duration::from_secs(60), || {
        rotated.is_ready()
    });
    let (status, body) = rotated.http_get(&last).expect("old URL");
    assert_eq!(status, 200, "a URL signed with the previous key: {body}");
    let stranger = UrlSigner::new(
        b"some-other-key-that-nobody-configured",
        None,
        "http://x",
        Duration::from_secs(60),
    )
    .expect("signer")
    .sign(context, 3, now);
    let stranger = &stranger[stranger.find("/contexts/").expect("path")..];
    assert_eq!(rotated.http_get(stranger).map(|r| r.0), Some(403));
}

#[test]
fn any_pod_answers_for_any_context() {
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    let inputs = sample::vision_research_traffic(30, 0.0, 17);
    broker.produce("mcp.events.all", &inputs);
    let expected = reference(&inputs);
    let pod_a = Baton::start(&broker, BatonOptions::new("pod-a"));
    let pod_b = Baton::start(&broker, BatonOptions::new("pod-b"));
    let mut reader = Reader::new(&broker, &HANDOVER_TOPICS);
    reader.wait_until("every handover", Duration::from_secs(90), |records| {
        common::unique_handover_count(records) >= expected.handovers.len()
    });
    // Both pods own partitions, and each knows the other's.
    common::wait_for(
        "both pods serve partitions",
        Duration::from_secs(60),
        || {
            [&pod_a, &pod_b].iter().all(|pod| {
                pod.http_get("/api/overview")
                    .filter(|(status, _)| *status == 200)
                    .map(|(_, body)| json(&body))
                    .is_some_and(|overview| {
                        let members = overview["members"].as_array().cloned().unwrap_or_default();
                        members.len() == 2
                            && members
                                .iter()
                                .all(|m| m["ready"].as_array().is_some_and(|p| !p.is_empty()))
                    })
            })
        },
    );

    let mut served_by: BTreeMap<String, usize> = BTreeMap::new();
    for pod in [&pod_a, &pod_b] {
        for (context_id, state) in &expected.states {
            let encoded = percent_encoding::utf8_percent_encode(
                context_id,
                percent_encoding::NON_ALPHANUMERIC,
            );
            let (status, headers, body) = pod
                .http_request(&format!("/contexts/{encoded}"), &[])
                .expect("context");
            assert_eq!(status, 200, "{context_id} via {}: {body}", pod.instance_id);
            let answer = json(&body);
            assert_eq!(answer["state"], state.state.as_str(), "{context_id}");
            assert_eq!(answer["version"], state.version, "{context_id}");
            let server = headers
                .get("x-baton-served-by")
                .cloned()
                .unwrap_or_default();
            if server != pod.instance_id {
                *served_by
                    .entry(format!("{}->{server}", pod.instance_id))
                    .or_default() += 1;
            }
        }
    }
    assert!(
        served_by.contains_key("pod-a->pod-b") && served_by.contains_key("pod-b->pod-a"),
        "each pod forwards to the other: {served_by:?}"
    );
    // A forwarded request is never forwarded again.
    let foreign = expected
        .states
        .keys()
        .find(|id| {
            let encoded =
                percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC);
            pod_a
                .http_request(&format!("/contexts/{encoded}"), &[])
                .is_some_and(|(_, headers, _)| {
                    headers.get("x-baton-served-by").map(String::as_str) == Some("pod-b")
                })
        })
        .expect("a context pod-b owns");
    let encoded =
        percent_encoding::utf8_percent_encode(foreign, percent_encoding::NON_ALPHANUMERIC);
    let (status, headers, body) = pod_a
        .http_request(
            &format!("/contexts/{encoded}"),
            &[("x-baton-forwarded", "1")],
        )
        .expect("loop guard");
    assert_eq!(
        (status, error_code(&body).as_str()),
        (503, "partition_moving"),
        "{body}"
    );
    assert_eq!(headers.get("retry-after").map(String::as_str), Some("1"));
}

/// A minimal SSE client over HTTP/1.0 (the body is then close-delimited).
struct Feed {
    lines: BufReader<TcpStream>,
}

#[derive(Debug)]
struct Event {
    id: String,
    data: serde_json::Value,
}

impl Feed {
    fn open(baton: &Baton, path: &str, last_event_id: Option<&str>) -> Feed {
        let mut stream = TcpStream::connect(("127.0.0.1", baton.http_port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        let mut request = format!(
            "GET {path} HTTP/1.0\r\nHost: localhost\r\nAccept: text/event-stream\r\nAuthorization: Bearer {HTTP_TOKEN}\r\n"
        );
        if let Some(id) = last_event_id {
            request.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).expect("request");
        let mut lines = BufReader::new(stream);
        let mut status = String::new();
        lines.read_line(&mut status).expect("status line");
        assert!(status.contains(" 200 "), "{status}");
        loop {
            let mut header = String::new();
            lines.read_line(&mut header).expect("header");
            if header.trim().is_empty() {
                break;
            }
        }
        Feed { lines }
    }

    /// Reads until `wanted` events arrived (or `timeout`), also counting heartbeats.
    fn read(&mut self, wanted: usize, timeout: Duration) -> (Vec<Event>, usize) {
        let deadline = Instant::now() + timeout;
        let (mut events, mut heartbeats) = (Vec::new(), 0);
        let (mut id, mut data) = (String::new(), String::new());
        while events.len() < wanted && Instant::now() < deadline {
            let mut line = String::new();
            match self.lines.read_line(&mut line) {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => continue, // read timeout: look at the deadline again
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line == ": heartbeat" {
                heartbeats += 1;
            } else if let Some(value) = line.strip_prefix("id: ") {
                id = value.to_string();
            } else if let Some(value) = line.strip_prefix("data: ") {
                data = value.to_string();
            } else if line.is_empty() && !data.is_empty() {
                events.push(Event {
                    id: std::mem::take(&mut id),
                    data: json(&std::mem::take(&mut data)),
                });
            }
        }
        (events, heartbeats)
    }
}

fn key_of(update: &baton::workflow::StatusUpdate) -> (String, String) {
    (update.context_id.clone(), update.to.clone())
}

fn event_key(event: &Event) -> (String, String) {
    (
        event.data["context_id"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        event.data["to"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn the_live_feed_streams_filters_and_resumes_after_a_disconnect() {
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    let baton = Baton::start(&broker, {
        let mut options = BatonOptions::new("feed-a");
        options.extra_args = vec!["--sse-heartbeat-ms".into(), "300".into()];
        options
    });
    let before = sample::vision_research_traffic(5, 0.0, 31);
    broker.produce("mcp.events.all", &before);
    let expected_before = reference(&before);
    let wanted = expected_before.status_updates.len();

    let mut feed = Feed::open(&baton, "/events?replay=1000", None);
    let (events, _) = feed.read(wanted, Duration::from_secs(60));
    assert_eq!(events.len(), wanted, "every update so far");
    let mut seen: Vec<(String, String)> = events.iter().map(event_key).collect();
    let mut expected: Vec<(String, String)> =
        expected_before.status_updates.iter().map(key_of).collect();
    seen.sort();
    expected.sort();
    assert_eq!(seen, expected);
    let sample_event = &events[0].data;
    for field in [
        "context_id",
        "workflow",
        "from",
        "to",
        "agent",
        "status",
        "message",
        "tokens_left",
        "token_budget",
        "at",
    ] {
        assert!(
            sample_event.get(field).is_some(),
            "{field} in {sample_event}"
        );
    }
    let last_id = events.last().map(|e| e.id.clone()).expect("an id");
    // Idle now: heartbeats keep the connection alive.
    let (_, heartbeats) = feed.read(usize::MAX, Duration::from_secs(1));
    assert!(heartbeats >= 1, "heartbeats while idle");
    drop(feed);

    // Disconnected while more happens; resuming from the last id yields
    // exactly what was missed.
    let after = sample::vision_research_traffic(4, 0.0, 32);
    broker.produce("mcp.events.all", &after);
    let expected_after = reference(&after);
    let mut resumed = Feed::open(&baton, "/events", Some(&last_id));
    let (events, _) = resumed.read(expected_after.status_updates.len(), Duration::from_secs(60));
    let mut seen: Vec<(String, String)> = events.iter().map(event_key).collect();
    let mut expected: Vec<(String, String)> =
        expected_after.status_updates.iter().map(key_of).collect();
    seen.sort();
    expected.sort();
    assert_eq!(seen, expected, "exactly the missed updates, none twice");
    let (extra, _) = resumed.read(1, Duration::from_millis(800));
    assert!(extra.is_empty(), "nothing more: {extra:?}");

    // One context only.
    let only = &expected_after.status_updates[0].context_id;
    let mut filtered = Feed::open(
        &baton,
        &format!("/events?replay=1000&context_id={only}"),
        None,
    );
    let count = expected_after
        .status_updates
        .iter()
        .filter(|u| &u.context_id == only)
        .count();
    let (events, _) = filtered.read(count, Duration::from_secs(30));
    assert_eq!(events.len(), count);
    assert!(events.iter().all(|e| e.data["context_id"] == only.as_str()));
    assert!(metric(&baton, "baton_sse_clients") >= 1.0);
}

#[test]
fn a_client_that_stops_reading_is_dropped_without_slowing_the_others() {
    let broker = Broker::start();
    broker.create_baton_topics(PARTITIONS);
    let baton = Baton::start(&broker, BatonOptions::new("feed-slow"));
    common::wait_for("ready", Duration::from_secs(60), || baton.is_ready());

    // A client that never reads, with a tiny window and small segments so
    // that loopback's kernel buffers stay small: its bytes pile up in baton's
    // bounded per-client queue. Both options only take effect before connect.
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.set_tcp_mss(536).expect("TCP_MAXSEG");
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], baton.http_port));
    socket.connect(&address.into()).expect("connect");
    let mut stalled = TcpStream::from(socket);
    write!(
        stalled,
        "GET /events HTTP/1.0\r\nHost: localhost\r\nAccept: text/event-stream\r\nAuthorization: Bearer {HTTP_TOKEN}\r\n\r\n"
    )
    .expect("request");
    let mut reader = Feed::open(&baton, "/events", None);
    common::wait_for("both clients", Duration::from_secs(10), || {
        metric(&baton, "baton_sse_clients") >= 2.0
    });

    let traffic = sample::vision_research_traffic(500, 0.0, 41);
    let expected = reference(&traffic);
    broker.produce("mcp.events.all", &traffic);
    let wanted = expected.status_updates.len();
    let (events, _) = reader.read(wanted, Duration::from_secs(120));
    assert_eq!(events.len(), wanted, "the reading client got every update");
    common::wait_for(
        "the stalled client dropped",
        Duration::from_secs(30),
        || metric(&baton, "baton_sse_dropped_total") >= 1.0,
    );
    assert_eq!(
        metric(&baton, "baton_sse_clients"),
        1.0,
        "only the reader is left"
    );
    drop(stalled);
}
