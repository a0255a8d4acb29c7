//! The HTTP surface (hyper 1.x): `/metrics`, `/healthz`, `/readyz`,
//! `/contexts/{id}`, `/contexts/{id}/snapshots/{version}`, `/events` (SSE),
//! `/api/overview` and the dashboard at `/`.
//!
//! Any pod answers for any context: a request for a partition another pod
//! owns is forwarded to that pod (one hop, marked so it is never forwarded
//! again), and a partition in the middle of a move answers 503 with
//! `Retry-After`. Errors are JSON with a code and a message, so agents and
//! operators can act on them without scraping text.
//!
//! Every endpoint but `/metrics`, `/healthz`, `/readyz`, the dashboard page
//! (static, it holds no data) and signed snapshot URLs needs a bearer token
//! ([`auth`]); the listener bounds what a client can hold ([`server`]).

pub mod auth;
mod contexts;
mod dlq_tally;

pub use contexts::{
    ContextSummary, ListQuery as ContextQuery, MAX_LIMIT as MAX_CONTEXTS_PAGE, Page as ContextPage,
};
mod feed;
pub mod server;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use self::auth::{Auth, Caller};
use self::server::{Listener, ServerLimits};

use crate::kafka::{self, KafkaSettings};
use crate::members::{Membership, Owner};
use crate::memory::{self, SnapshotState};
use crate::metrics::{self, METRICS};
use crate::runtime::Readiness;
use crate::shutdown::Shutdown;
use crate::snapshot_url::UrlSigner;
use crate::state::{OpenStores, record};
use crate::workflow::WorkflowState;

pub type HttpResponse = Response<BoxBody<Bytes, Infallible>>;

/// Marks a request one pod forwarded to another, so it is never forwarded again.
const FORWARDED: &str = "x-baton-forwarded";
/// Names the pod that answered.
const SERVED_BY: &str = "x-baton-served-by";

/// The largest answer a pod relays from a peer, and the longest it waits for
/// the whole of it: a peer that streams forever or sends gigabytes costs a
/// bounded buffer and a bounded wait.
const MAX_FORWARDED_BYTES: usize = 16 * 1024 * 1024;
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a snapshot request waits for a rendering slot before a 503.
const RENDER_WAIT: Duration = Duration::from_secs(5);
const DASHBOARD: &str = include_str!("http/dashboard.html");

/// State every request handler can see.
pub struct HttpState {
    pub readiness: Arc<Readiness>,
    /// Open context store partitions.
    pub stores: Arc<OpenStores>,
    /// Set once start-up has checked the topics; until then, 503.
    pub surface: Arc<OnceLock<Surface>>,
    pub shutdown: Shutdown,
    feeds: Arc<feed::FeedSlots>,
    dlq_tally: Arc<dlq_tally::DlqTally>,
    guards: Guards,
    /// Bounds the snapshot renderings (tokenizing) running at once, on the
    /// blocking pool: the async workers stay free for the partitions.
    render_slots: Arc<Semaphore>,
}

/// Who may call, and what each listener and caller may hold.
#[derive(Debug, Clone)]
pub struct Guards {
    pub auth: Auth,
    pub limits: ServerLimits,
    /// False when `/metrics` has its own listener (`--metrics-addr`).
    pub metrics_on_surface: bool,
    pub feed_lifetime: Duration,
    pub max_feeds_per_token: usize,
    /// Snapshot renderings at once (`--render-concurrency`).
    pub render_concurrency: usize,
}

impl Default for Guards {
    /// Refuses every protected endpoint: a process that never configured
    /// tokens serves only the open ones.
    fn default() -> Self {
        Guards {
            auth: Auth::deny_all(),
            limits: ServerLimits::default(),
            metrics_on_surface: true,
            feed_lifetime: feed::DEFAULT_FEED_LIFETIME,
            max_feeds_per_token: feed::DEFAULT_MAX_FEEDS_PER_TOKEN,
            render_concurrency: DEFAULT_RENDER_CONCURRENCY,
        }
    }
}

/// The most live feeds one pod serves, whoever asks.
pub const MAX_FEEDS: usize = feed::MAX_CLIENTS;

/// Snapshot renderings at once, by default.
pub const DEFAULT_RENDER_CONCURRENCY: usize = 2;

impl HttpState {
    pub fn new(
        readiness: Arc<Readiness>,
        stores: Arc<OpenStores>,
        surface: Arc<OnceLock<Surface>>,
        shutdown: Shutdown,
    ) -> HttpState {
        HttpState {
            readiness,
            stores,
            surface,
            shutdown,
            feeds: Arc::default(),
            dlq_tally: Arc::default(),
            guards: Guards::default(),
            render_slots: Arc::new(Semaphore::new(DEFAULT_RENDER_CONCURRENCY)),
        }
    }

    /// Replaces the default (deny-all) guards.
    pub fn with_guards(mut self, guards: Guards) -> HttpState {
        self.feeds = Arc::new(feed::FeedSlots::new(guards.max_feeds_per_token));
        self.render_slots = Arc::new(Semaphore::new(guards.render_concurrency.max(1)));
        self.guards = guards;
        self
    }
}

/// What the surface learns at start-up.
pub struct Surface {
    pub membership: Arc<Membership>,
    /// The input topics' partition count: a context's partition is
    /// murmur2(context_id) modulo this.
    pub partitions: i32,
    pub kafka: KafkaSettings,
    /// None when the live feed is off.
    pub status_topic: Option<String>,
    pub dlq_topic: String,
    pub parked_topic: String,
    pub signer: Option<UrlSigner>,
    pub sse_heartbeat: Duration,
}

/// Binds `addr` (so a taken port fails start-up loudly) and returns the
/// bound address and the serving future.
pub async fn bind(
    addr: SocketAddr,
    state: Arc<HttpState>,
) -> std::io::Result<(SocketAddr, impl Future<Output = ()>)> {
    bind_listener(addr, state, Listener::Surface).await
}

/// Like [`bind`], for a listener that serves only some endpoints.
pub async fn bind_listener(
    addr: SocketAddr,
    state: Arc<HttpState>,
    kind: Listener,
) -> std::io::Result<(SocketAddr, impl Future<Output = ()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((bound, server::serve(listener, state, kind)))
}

/// Whether `path` is served without a token: scrapes and probes, the static
/// dashboard page (it asks for a token itself), and snapshot URLs, whose
/// signature is their credential.
fn is_open(path: &str) -> bool {
    matches!(
        path,
        "/metrics" | "/healthz" | "/readyz" | "/" | "/index.html"
    ) || path
        .strip_prefix("/contexts/")
        .is_some_and(|rest| rest.split('/').nth(1) == Some("snapshots"))
}

pub(crate) async fn route(
    state: &HttpState,
    kind: Listener,
    request: Request<Incoming>,
) -> HttpResponse {
    if request.method() != Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "only GET is supported",
        );
    }
    let path = request.uri().path().to_string();
    let served = match kind {
        Listener::Surface => path != "/metrics" || state.guards.metrics_on_surface,
        Listener::Metrics => matches!(path.as_str(), "/metrics" | "/healthz" | "/readyz"),
    };
    if !served {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no route for {path} on this listener"),
        );
    }
    let caller = if is_open(&path) {
        Caller::Anonymous
    } else {
        let presented = request
            .headers()
            .get(AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        match state.guards.auth.check(presented) {
            Ok(caller) => caller,
            Err(refused) => {
                crate::metrics::GUARDS.http_unauthorized.inc();
                let mut response =
                    error(StatusCode::UNAUTHORIZED, "unauthorized", refused.message());
                response.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"baton\""),
                );
                METRICS
                    .http_requests
                    .with_label_values(&["unauthorized", "401"])
                    .inc();
                return response;
            }
        }
    };
    let (endpoint, response) = match path.as_str() {
        "/" | "/index.html" => (
            "dashboard",
            text(
                StatusCode::OK,
                "text/html; charset=utf-8",
                DASHBOARD.to_string(),
            ),
        ),
        "/metrics" => (
            "metrics",
            text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                render_metrics(state),
            ),
        ),
        "/healthz" => (
            "healthz",
            json_response(StatusCode::OK, &json!({"status": "alive"})),
        ),
        "/readyz" => ("readyz", readyz(state)),
        "/api/overview" => ("overview", overview(state).await),
        "/api/contexts" => ("contexts", list_contexts(state, &request).await),
        "/events" => ("events", events(state, &request, caller).await),
        _ => match path
            .strip_prefix("/contexts/")
            .map(|rest| rest.split('/').collect::<Vec<_>>())
        {
            Some(parts) if parts.len() == 1 && !parts[0].is_empty() => {
                ("context", context(state, &request, parts[0]).await)
            }
            Some(parts) if parts.len() == 3 && !parts[0].is_empty() && parts[1] == "snapshots" => (
                "snapshot",
                snapshot(state, &request, parts[0], parts[2]).await,
            ),
            _ => (
                "unknown",
                error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    &format!("no route for {path}"),
                ),
            ),
        },
    };
    METRICS
        .http_requests
        .with_label_values(&[endpoint, response.status().as_str()])
        .inc();
    response
}

/// `/metrics`: the gauges read at scrape time (readiness, RocksDB's
/// estimates of the open stores), then every registered metric.
fn render_metrics(state: &HttpState) -> String {
    let ops = &metrics::OPS;
    ops.ready.set(i64::from(state.readiness.is_ready()));
    for (store, keys, bytes) in state.stores.estimates() {
        let labels = [store.as_str()];
        ops.state_keys
            .with_label_values(&labels)
            .set(i64::try_from(keys).unwrap_or(i64::MAX));
        ops.state_bytes
            .with_label_values(&labels)
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
    metrics::render()
}

fn readyz(state: &HttpState) -> HttpResponse {
    let ready = state.readiness.is_ready();
    let owned: Vec<serde_json::Value> = state
        .readiness
        .owned()
        .into_iter()
        .map(|(partition, restored)| json!({"partition": partition, "restored": restored}))
        .collect();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &json!({"ready": ready, "partitions": owned}))
}

/// What start-up learned, or why it is not known yet.
fn surface(state: &HttpState) -> Result<&Surface, Unavailable> {
    state.surface.get().ok_or(Unavailable {
        code: "starting",
        message: "the pod is still starting; retry shortly".into(),
    })
}

/// A 503 with `Retry-After`: the answer exists, just not here right now.
struct Unavailable {
    code: &'static str,
    message: String,
}

impl Unavailable {
    fn into_response(self) -> HttpResponse {
        retry_later(self.code, &self.message)
    }
}

/// Decodes a percent-encoded path segment: context ids may hold any character.
fn decode_segment(raw: &str) -> String {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8_lossy()
        .into_owned()
}

/// Who serves `context_id`: `Ok(None)` this pod, `Ok(Some(url))` a peer.
fn route_context(
    state: &HttpState,
    request: &Request<Incoming>,
    context_id: &str,
) -> Result<Option<String>, Unavailable> {
    let surface = surface(state)?;
    let partition = kafka::partition_for_key(context_id.as_bytes(), surface.partitions);
    match surface.membership.owner_of(partition) {
        Owner::Local => Ok(None),
        Owner::Restoring => Err(Unavailable {
            code: "partition_restoring",
            message: format!("partition {partition} is restoring on this pod"),
        }),
        Owner::Peer(url) if !request.headers().contains_key(FORWARDED) => Ok(Some(url)),
        Owner::Peer(_) | Owner::Moving => Err(Unavailable {
            code: "partition_moving",
            message: format!("partition {partition} is moving between pods"),
        }),
    }
}

/// Answers from the owning pod, passing its status and body through.
async fn forward(url: &str, request: &Request<Incoming>) -> HttpResponse {
    let target = match request.uri().path_and_query() {
        Some(path_and_query) => format!("{url}{path_and_query}"),
        None => url.to_string(),
    };
    // The caller's token goes along: the peer checks it as this pod did.
    let authorization = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    let mut headers = vec![(FORWARDED, "1")];
    if let Some(authorization) = authorization {
        headers.push((AUTHORIZATION.as_str(), authorization));
    }
    match get_bounded(&target, &headers, MAX_FORWARDED_BYTES, FORWARD_TIMEOUT).await {
        Ok((status, headers, body)) => {
            METRICS.forwarded_requests.with_label_values(&["ok"]).inc();
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut response = text(status, "application/json", body);
            for name in [SERVED_BY, RETRY_AFTER.as_str()] {
                if let Some(value) = headers.get(name) {
                    response.headers_mut().insert(name, value.clone());
                }
            }
            response
        }
        Err(err) => {
            METRICS
                .forwarded_requests
                .with_label_values(&["failed"])
                .inc();
            tracing::debug!(cause = %err, %target, "forwarding failed");
            retry_later(
                "owner_unreachable",
                &format!("the owning pod did not answer: {err}"),
            )
        }
    }
}

/// The committed workflow state of a context, from whichever pod owns it.
async fn context(state: &HttpState, request: &Request<Incoming>, raw_id: &str) -> HttpResponse {
    let id = decode_segment(raw_id);
    match route_context(state, request, &id) {
        Ok(None) => served_here(state, local_context(state, &id)),
        Ok(Some(url)) => forward(&url, request).await,
        Err(unavailable) => unavailable.into_response(),
    }
}

fn local_context(state: &HttpState, id: &str) -> HttpResponse {
    match state.stores.get(id) {
        Ok(Some((partition, bytes))) => match record::decode_workflow(&bytes) {
            Ok(None) => error(
                StatusCode::NOT_FOUND,
                "unknown_context",
                &format!("no workflow state for context `{id}`"),
            ),
            Ok(Some(workflow_state)) => match serde_json::to_value(&workflow_state) {
                Ok(mut value) => {
                    if let Some(object) = value.as_object_mut() {
                        object.insert("partition".into(), json!(partition));
                    }
                    json_response(StatusCode::OK, &value)
                }
                Err(err) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "encoding",
                    &err.to_string(),
                ),
            },
            Err(err) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "corrupt_state",
                &err.to_string(),
            ),
        },
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "unknown_context",
            &format!("no workflow state for context `{id}`"),
        ),
        Err(err) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "state_store",
            &err.to_string(),
        ),
    }
}

/// A frozen memory snapshot, prompt-ready. The signature is checked first,
/// by whichever pod the request reaches.
async fn snapshot(
    state: &HttpState,
    request: &Request<Incoming>,
    raw_id: &str,
    raw_version: &str,
) -> HttpResponse {
    let surface = match surface(state) {
        Ok(surface) => surface,
        Err(unavailable) => return unavailable.into_response(),
    };
    let Some(signer) = &surface.signer else {
        return error(
            StatusCode::NOT_FOUND,
            "snapshots_disabled",
            "memory snapshots are disabled on this deployment",
        );
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if let Err(err) = signer.verify(request.uri().path(), request.uri().query(), now) {
        let status = StatusCode::from_u16(err.http_status()).unwrap_or(StatusCode::FORBIDDEN);
        return error(
            status,
            err.code(),
            &format!("the snapshot URL is not valid: {err}"),
        );
    }
    let Ok(version) = raw_version.parse::<u64>() else {
        return error(
            StatusCode::NOT_FOUND,
            "unknown_snapshot",
            &format!("`{raw_version}` is not a snapshot version"),
        );
    };
    let max_tokens = match feed::form_pairs(request.uri().query())
        .into_iter()
        .find(|(key, _)| key == "max_tokens")
    {
        Some((_, value)) => match value.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_max_tokens",
                    &format!("max_tokens: `{value}` is not a number"),
                );
            }
        },
        None => None,
    };
    let id = decode_segment(raw_id);
    match route_context(state, request, &id) {
        Ok(None) => served_here(state, render_here(state, id, version, max_tokens).await),
        Ok(Some(url)) => forward(&url, request).await,
        Err(unavailable) => unavailable.into_response(),
    }
}

/// Reads and renders a snapshot on the blocking pool, at most
/// `--render-concurrency` at once; past that a request waits up to
/// [`RENDER_WAIT`] for a slot, then answers 503.
async fn render_here(
    state: &HttpState,
    id: String,
    version: u64,
    max_tokens: Option<u64>,
) -> HttpResponse {
    let permit =
        match tokio::time::timeout(RENDER_WAIT, Arc::clone(&state.render_slots).acquire_owned())
            .await
        {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) | Err(_) => {
                crate::metrics::GUARDS.render_busy.inc();
                return retry_later(
                    "render_busy",
                    "this pod is rendering as many snapshots as it can",
                );
            }
        };
    let stores = Arc::clone(&state.stores);
    let rendered = tokio::task::spawn_blocking(move || {
        let response = local_snapshot(&stores, &id, version, max_tokens);
        drop(permit);
        response
    })
    .await;
    rendered.unwrap_or_else(|err| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "render",
            &format!("rendering failed: {err}"),
        )
    })
}

fn local_snapshot(
    stores: &OpenStores,
    id: &str,
    version: u64,
    max_tokens: Option<u64>,
) -> HttpResponse {
    let stored = match stores.get(id) {
        Ok(stored) => stored,
        Err(err) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "state_store",
                &err.to_string(),
            );
        }
    };
    let (workflow, memory) = match stored.map(|(_, bytes)| record::decode(&bytes)) {
        Some(Ok(context)) => context,
        Some(Err(err)) => return error(StatusCode::INTERNAL_SERVER_ERROR, "corrupt_state", &err),
        None => {
            return error(
                StatusCode::NOT_FOUND,
                "unknown_context",
                &format!("no memory for context `{id}`"),
            );
        }
    };
    if let Some(snapshot) = memory.snapshot(version) {
        // Trimmed to what the context can still spend. `max_tokens` is not
        // signed, so it may only lower that, never raise it.
        let left = workflow
            .as_ref()
            .map_or(u64::MAX, WorkflowState::tokens_left);
        let budget = max_tokens.map_or(left, |asked| asked.min(left));
        return json_response(StatusCode::OK, &memory::render_prompt(&snapshot, budget));
    }
    match memory.snapshot_state(version) {
        SnapshotState::Pruned => error(
            StatusCode::GONE,
            "snapshot_pruned",
            &format!("snapshot {version} of `{id}` is older than the retention and was pruned"),
        ),
        // A live one was answered above.
        SnapshotState::Live | SnapshotState::Unknown => error(
            StatusCode::NOT_FOUND,
            "unknown_snapshot",
            &format!("context `{id}` has no snapshot {version}"),
        ),
    }
}

fn served_here(state: &HttpState, mut response: HttpResponse) -> HttpResponse {
    if let Some(surface) = state.surface.get()
        && let Ok(value) = HeaderValue::from_str(&surface.membership.instance_id)
    {
        response.headers_mut().insert(SERVED_BY, value);
    }
    response
}

/// The live feed (SSE).
async fn events(state: &HttpState, request: &Request<Incoming>, caller: Caller) -> HttpResponse {
    let surface = match surface(state) {
        Ok(surface) => surface,
        Err(unavailable) => return unavailable.into_response(),
    };
    let Some(topic) = surface.status_topic.clone() else {
        return error(
            StatusCode::NOT_FOUND,
            "live_feed_disabled",
            "this pod runs with --live-feed disabled",
        );
    };
    let last_event_id = request
        .headers()
        .get("last-event-id")
        .and_then(|value| value.to_str().ok());
    let feed_request = match feed::FeedRequest::parse(request.uri().query(), last_event_id) {
        Ok(feed_request) => feed_request,
        Err(message) => return error(StatusCode::BAD_REQUEST, "bad_feed_request", &message),
    };
    let slot = match state.feeds.acquire(caller) {
        Ok(slot) => slot,
        Err(feed::SlotRefused::Pod) => {
            return retry_later(
                "too_many_feeds",
                "this pod serves as many live feeds as it can",
            );
        }
        Err(feed::SlotRefused::Caller) => {
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_feeds_for_token",
                "this token already holds as many live feeds as one token may",
            );
        }
    };
    let opened = {
        let kafka = surface.kafka.clone();
        let feed_request = feed_request.clone();
        tokio::task::spawn_blocking(move || feed::open_reader(&kafka, &topic, &feed_request)).await
    };
    let (consumer, position) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(message)) => return retry_later("feed_unavailable", &message),
        Err(err) => return error(StatusCode::INTERNAL_SERVER_ERROR, "feed", &err.to_string()),
    };
    let (sink, source) = feed::client_queue();
    tokio::spawn(feed::stream(
        consumer,
        position,
        feed_request,
        sink,
        feed::FeedTiming {
            heartbeat: surface.sse_heartbeat,
            lifetime: state.guards.feed_lifetime,
        },
        state.shutdown.clone(),
        slot,
    ));
    let body = StreamBody::new(futures::stream::unfold(source, |mut source| async move {
        source
            .recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(Frame::data(chunk)), source))
    }));
    let mut response = Response::new(BodyExt::boxed(body));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// What the dashboard polls: this pod, every pod's partitions, DLQ counts.
async fn overview(state: &HttpState) -> HttpResponse {
    let surface = match surface(state) {
        Ok(surface) => surface,
        Err(unavailable) => return unavailable.into_response(),
    };
    state.dlq_tally.start(
        surface.kafka.clone(),
        [surface.dlq_topic.clone(), surface.parked_topic.clone()],
        state.shutdown.clone(),
    );
    let dlq = state
        .dlq_tally
        .json(&surface.dlq_topic, &surface.parked_topic);
    json_response(
        StatusCode::OK,
        &json!({
            "pod": {"instance_id": surface.membership.instance_id, "url": surface.membership.url},
            "partitions": surface.partitions,
            "members": surface.membership.members(),
            "dlq": dlq,
            "ready": state.readiness.is_ready(),
        }),
    )
}

/// Contexts by state and workflow, and the stalled ones, paged: this pod's
/// partitions, merged with every other pod's (see [`contexts`]).
async fn list_contexts(state: &HttpState, request: &Request<Incoming>) -> HttpResponse {
    let query = match contexts::ListQuery::parse(&feed::form_pairs(request.uri().query())) {
        Ok(query) => query,
        Err(message) => return error(StatusCode::BAD_REQUEST, "bad_query", &message),
    };
    let now_ms = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    // Up to SCAN_BUDGET RocksDB reads and decodes: off the async workers.
    let stores = Arc::clone(&state.stores);
    let local_query = query.clone();
    let local = match tokio::task::spawn_blocking(move || {
        contexts::local_page(&stores, &local_query, now_ms)
    })
    .await
    {
        Ok(Ok(page)) => page,
        Ok(Err(err)) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "state_store",
                &err.to_string(),
            );
        }
        Err(err) => return error(StatusCode::INTERNAL_SERVER_ERROR, "scan", &err.to_string()),
    };
    if request.headers().contains_key(FORWARDED) {
        return served_here(state, json_response(StatusCode::OK, &json!(local)));
    }
    let surface = match surface(state) {
        Ok(surface) => surface,
        Err(unavailable) => return unavailable.into_response(),
    };
    let members = surface.membership.members();
    let served: std::collections::BTreeSet<i32> = members
        .iter()
        .flat_map(|member| member.ready.iter().copied())
        .collect();
    if (served.len() as i32) < surface.partitions {
        return retry_later(
            "partition_moving",
            &format!(
                "{} of {} partitions are served right now; a list would miss the rest",
                served.len(),
                surface.partitions
            ),
        );
    }
    let query_string = query.to_query_string();
    // The caller's token goes along: each peer checks it as this pod did.
    let authorization = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    let mut headers = vec![(FORWARDED, "1")];
    if let Some(authorization) = authorization {
        headers.push((AUTHORIZATION.as_str(), authorization));
    }
    let headers = &headers;
    let peers = members
        .iter()
        .filter(|member| member.instance_id != surface.membership.instance_id)
        .filter(|member| !member.ready.is_empty())
        .map(|member| {
            let url = format!("{}/api/contexts?{query_string}", member.url);
            async move {
                let answer = get_bounded(&url, headers, MAX_FORWARDED_BYTES, FORWARD_TIMEOUT).await;
                (url, answer)
            }
        });
    let mut pages = vec![local];
    for (url, answer) in futures::future::join_all(peers).await {
        let page = match answer {
            Ok((200, _, body)) => serde_json::from_str::<contexts::Page>(&body)
                .map_err(|err| format!("{url}: not a page of contexts: {err}")),
            Ok((status, _, _)) => Err(format!("{url} answered {status}")),
            Err(err) => Err(format!("{url}: {err}")),
        };
        match page {
            Ok(page) => pages.push(page),
            Err(message) => {
                METRICS
                    .forwarded_requests
                    .with_label_values(&["failed"])
                    .inc();
                return retry_later("pod_unreachable", &message);
            }
        }
    }
    served_here(
        state,
        json_response(StatusCode::OK, &json!(contexts::merge(pages, query.limit))),
    )
}

fn retry_later(code: &str, message: &str) -> HttpResponse {
    let mut response = error(StatusCode::SERVICE_UNAVAILABLE, code, message);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

pub fn json_response(status: StatusCode, body: &serde_json::Value) -> HttpResponse {
    text(status, "application/json", body.to_string())
}

pub fn error(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    json_response(
        status,
        &json!({"error": {"code": code, "message": message}}),
    )
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A GET with hyper's client: (status, body). For `baton state get`.
pub async fn get(url: &str) -> Result<(u16, String), HttpClientError> {
    get_with_headers(url, &[])
        .await
        .map(|(status, _, body)| (status, body))
}

/// The `Authorization` value for a bearer token, when there is one.
pub fn bearer(token: Option<&crate::secret::Secret>) -> Option<String> {
    token.map(|token| format!("Bearer {}", token.expose()))
}

/// The headers of a request carrying `authorization`, when there is one.
pub fn authorization_headers(authorization: &Option<String>) -> Vec<(&'static str, &str)> {
    authorization
        .iter()
        .map(|value| ("authorization", value.as_str()))
        .collect()
}

/// A GET with extra headers, for forwarding between pods.
pub async fn get_with_headers(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, hyper::HeaderMap, String), HttpClientError> {
    get_bounded(url, headers, MAX_FORWARDED_BYTES, FORWARD_TIMEOUT).await
}

/// A GET whose whole answer, head and body, must arrive within `timeout`
/// and fit `max_bytes`.
pub async fn get_bounded(
    url: &str,
    headers: &[(&str, &str)],
    max_bytes: usize,
    timeout: Duration,
) -> Result<(u16, hyper::HeaderMap, String), HttpClientError> {
    tokio::time::timeout(timeout, get_unbounded_in_time(url, headers, max_bytes))
        .await
        .map_err(|_| HttpClientError(format!("{url}: no whole answer within {timeout:?}")))?
}

async fn get_unbounded_in_time(
    url: &str,
    headers: &[(&str, &str)],
    max_bytes: usize,
) -> Result<(u16, hyper::HeaderMap, String), HttpClientError> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|err: hyper::http::uri::InvalidUri| HttpClientError(format!("{url}: {err}")))?;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let mut builder = Request::get(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder
        .body(http_body_util::Empty::new())
        .map_err(|err| HttpClientError(format!("{url}: {err}")))?;
    let response = client
        .request(request)
        .await
        .map_err(|err| HttpClientError(format!("{url}: {err}")))?;
    let status = response.status().as_u16();
    let response_headers = response.headers().clone();
    let body = http_body_util::Limited::new(response.into_body(), max_bytes)
        .collect()
        .await
        .map_err(|err| {
            HttpClientError(format!(
                "{url}: {err} (at most {max_bytes} bytes are relayed)"
            ))
        })?
        .to_bytes();
    Ok((
        status,
        response_headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

#[derive(Debug, thiserror::Error)]
#[error("http request failed: {0}")]
pub struct HttpClientError(String);
