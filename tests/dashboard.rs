//! Issue 6's browser test: the dashboard page in headless Chromium against a
//! real broker and a real pod. It checks what a person would see: finished
//! and live contexts with their states, counts, the pod list and a live
//! connection, and that updates arrive while the page is open. A screenshot
//! is kept under the cargo target's tmp directory for people to look at.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use baton::sample;
use common::{Baton, BatonOptions, Broker, HANDOVER_TOPICS, Reader, browser};

/// How long the page runs before we read it: the SSE replay, one overview
/// poll and the live updates produced meanwhile all land well within it.
const PAGE_TIME: Duration = Duration::from_secs(6);

/// One opening tag's attribute, as Chromium serialises it (double quotes,
/// entities for `"`, `&`, `<`, `>`).
fn attribute<'t>(tag: &'t str, name: &str) -> Option<&'t str> {
    let needle = format!(" {name}=\"");
    let start = tag.find(&needle)? + needle.len();
    let end = start + tag[start..].find('"')?;
    Some(&tag[start..end])
}

/// The opening tags of every element carrying `attribute_name`.
fn tags_with<'d>(dom: &'d str, attribute_name: &str) -> Vec<&'d str> {
    let needle = format!(" {attribute_name}=\"");
    dom.match_indices('<')
        .filter_map(|(at, _)| dom[at..].find('>').map(|end| &dom[at..at + end + 1]))
        .filter(|tag| !tag.starts_with("</") && tag.contains(&needle))
        .collect()
}

/// The text content of the element with `id` (no nested elements expected).
fn text_of_id<'d>(dom: &'d str, id: &str) -> &'d str {
    let needle = format!(" id=\"{id}\"");
    let at = dom
        .find(&needle)
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let open_end = at + dom[at..].find('>').expect("tag end") + 1;
    let close = open_end + dom[open_end..].find('<').expect("closing tag");
    dom[open_end..close].trim()
}

/// The context rows: (context id, state, status).
fn context_rows(dom: &str) -> Vec<(String, String, String)> {
    tags_with(dom, "data-context-id")
        .into_iter()
        .map(|tag| {
            let get = |name| attribute(tag, name).unwrap_or_default().to_string();
            (
                get("data-context-id"),
                get("data-state"),
                get("data-status"),
            )
        })
        .collect()
}

fn chromium() -> PathBuf {
    browser::chromium().unwrap_or_else(|| {
        panic!(
            "the dashboard test needs Chromium: run scripts/test.sh (it installs Debian's \
             chromium), or set BATON_CHROMIUM"
        )
    })
}

#[test]
fn the_dashboard_shows_contexts_counts_pods_and_live_updates() {
    let chromium = chromium();
    let broker = Broker::start();
    broker.create_baton_topics(3);
    let baton = Baton::start(&broker, BatonOptions::new("dash-a"));
    common::wait_for("ready", Duration::from_secs(60), || baton.is_ready());

    // Before the page opens: two whole workflows and one poison record.
    let mut rng = fastrand::Rng::with_seed(6);
    let finished = ["ctx-sofa", "ctx-lamp"];
    for context in finished {
        broker.produce("mcp.events.all", &sample::context_events(context, &mut rng));
    }
    broker.produce("mcp.events.all", &[sample::poison_record(0)]);
    let mut reader = Reader::new(&broker, &HANDOVER_TOPICS);
    reader.wait_until("both reporters", Duration::from_secs(60), |records| {
        records
            .iter()
            .filter(|r| r.topic == "mcp.handover.reporter")
            .count()
            >= finished.len()
    });
    common::wait_for("the poison record counted", Duration::from_secs(30), || {
        baton
            .http_get("/api/overview")
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            .is_some_and(|overview| {
                overview["dlq"]["records"] == 1 && overview["dlq"]["complete"] == true
            })
    });

    // While the page is open: the first step of a third workflow, which must
    // arrive over the live feed.
    let live = "ctx-chair";
    let first_event = sample::context_events(live, &mut rng)
        .into_iter()
        .next()
        .expect("an event");
    // The token travels in the fragment, which the page moves to sessionStorage.
    let url = format!(
        "http://127.0.0.1:{}/#token={}",
        baton.http_port,
        common::HTTP_TOKEN
    );
    let dom = std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(PAGE_TIME / 3);
            broker.produce("mcp.events.all", std::slice::from_ref(&first_event));
        });
        browser::dump_dom(&chromium, &url, PAGE_TIME)
    });

    assert_eq!(text_of_id(&dom, "connection"), "live", "the feed connected");
    let rows = context_rows(&dom);
    for context in finished {
        let row = rows.iter().find(|(id, _, _)| id == context);
        assert_eq!(
            row.map(|(_, _, status)| status.as_str()),
            Some("completed"),
            "{context} in {rows:?}"
        );
    }
    // The live row shows the state the pod holds for it.
    let (status, body) = baton
        .http_get(&format!("/contexts/{live}"))
        .expect("context");
    assert_eq!(status, 200, "{body}");
    let held: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let live_row = rows
        .iter()
        .find(|(id, _, _)| id == live)
        .unwrap_or_else(|| panic!("{live} arrived live: {rows:?}"));
    assert_eq!(Some(live_row.1.as_str()), held["state"].as_str(), "{held}");
    assert_ne!(live_row.2, "completed");

    assert_eq!(text_of_id(&dom, "active-count"), "1");
    assert_eq!(text_of_id(&dom, "completed-count"), "2");
    assert_eq!(text_of_id(&dom, "dlq-count"), "1");
    assert_eq!(text_of_id(&dom, "parked-count"), "0");
    assert_eq!(text_of_id(&dom, "pod"), "dash-a");
    let pods = tags_with(&dom, "data-instance-id");
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(attribute(pods[0], "data-self"), Some("true"));
    // Every status update of the three workflows is in the event list.
    let events = tags_with(&dom, "data-context");
    assert!(
        events
            .iter()
            .any(|tag| attribute(tag, "data-context") == Some(live)),
        "the live event is listed"
    );

    // For people: what the page looks like now.
    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    browser::screenshot(
        &chromium,
        &url,
        Duration::from_secs(3),
        (1440, 900),
        &screenshot,
    );
    let png = std::fs::read(&screenshot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    eprintln!("dashboard screenshot: {}", screenshot.display());
}
