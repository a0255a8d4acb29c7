//! A Confluent-compatible Schema Registry test double: the REST subset baton
//! and `schema_registry_converter` call, with Confluent's JSON bodies and
//! error codes, and real Avro compatibility checks (apache-avro's resolution
//! rules, per the subject's or the global compatibility level).
//!
//! Tests are synchronous, so the server runs on its own thread with its own
//! runtime. `stop()` closes the listener and drops every open connection (a
//! real outage: clients get "connection refused"), `resume()` listens again
//! on the same port with the same schemas.
//!
//! Deliberate differences from Confluent: only Avro; no deletes, modes,
//! contexts or `/schemas/ids/{id}/subjects`; a schema's identity (for "already
//! registered") is its parsed form without `doc` and `aliases`, as in Avro
//! Java's `Schema.equals` which Confluent relies on, so whitespace and docs do
//! not make a new version but a changed default does.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use apache_avro::Schema;
use apache_avro::error::CompatibilityError;
use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc as tokio_mpsc, oneshot};
use tokio::task::JoinSet;

const SR_CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// Bodies larger than this are refused rather than buffered.
const MAX_BODY: usize = 16 << 20;

/// A running Schema Registry double on 127.0.0.1. Dropping it stops the server.
pub struct SchemaRegistry {
    shared: Arc<Shared>,
    port: u16,
    control: tokio_mpsc::UnboundedSender<Control>,
    thread: Option<JoinHandle<()>>,
}

impl SchemaRegistry {
    /// Binds 127.0.0.1 on a free port and serves until dropped.
    pub fn start() -> SchemaRegistry {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            id_lookups: AtomicU64::new(0),
            required_authorization: Mutex::new(None),
        });
        let (control, commands) = tokio_mpsc::unbounded_channel();
        let (bound_tx, bound_rx) = mpsc::channel();
        let server_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("schema-registry-double".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = bound_tx.send(Err(format!("cannot build a runtime: {err}")));
                        return;
                    }
                };
                runtime.block_on(run_server(server_shared, commands, bound_tx));
            })
            .expect("spawn the schema registry thread");
        let port = match bound_rx.recv() {
            Ok(Ok(port)) => port,
            Ok(Err(err)) => panic!("schema registry double cannot start: {err}"),
            Err(_) => panic!("schema registry double thread died while starting"),
        };
        SchemaRegistry {
            shared,
            port,
            control,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops listening and drops every open connection, so clients see an
    /// outage (connection refused); registered schemas are kept. Returns once
    /// the listener and all connections are closed.
    pub fn stop(&self) {
        let (done, wait) = mpsc::channel();
        if self.control.send(Control::Stop(done)).is_ok() {
            let _ = wait.recv();
        }
    }

    /// From now on, answers 401 (Confluent's 40101) to any request without
    /// these basic-auth credentials; `None` opens it again.
    pub fn require_basic_auth(&self, credentials: Option<(&str, &str)>) {
        use base64::Engine;
        let header = credentials.map(|(user, password)| {
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            format!("Basic {token}")
        });
        *self
            .shared
            .required_authorization
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = header;
    }

    /// Listens again on the same port with the same state. Panics if the
    /// port cannot be bound again within a few seconds.
    pub fn resume(&self) {
        let (done, wait) = mpsc::channel();
        if self.control.send(Control::Resume(done)).is_err() {
            panic!("schema registry double thread is gone");
        }
        match wait.recv() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => panic!(
                "schema registry double cannot listen on port {} again: {err}",
                self.port
            ),
            Err(_) => panic!("schema registry double thread died while resuming"),
        }
    }

    /// Registers directly (no HTTP), returning the id, with the same
    /// semantics as `POST /subjects/{subject}/versions` (the subject's
    /// compatibility level applies). Panics on an invalid or incompatible
    /// schema, which in a test is a mistake in the test.
    pub fn register(&self, subject: &str, schema_json: &str) -> u32 {
        let request = SchemaRequest {
            schema: Some(schema_json.to_string()),
            schema_type: None,
            references: None,
        };
        let mut state = self.shared.lock();
        match state
            .candidate(&request)
            .and_then(|candidate| state.register(subject, candidate))
        {
            Ok(id) => id,
            Err(err) => panic!(
                "registering under {subject:?} failed: HTTP {} {}",
                err.status, err.message
            ),
        }
    }

    /// How many `GET /schemas/ids/{id}` requests have been served (found or
    /// not), so tests can prove a client caches.
    pub fn id_lookups(&self) -> u64 {
        self.shared.id_lookups.load(Ordering::SeqCst)
    }
}

impl Drop for SchemaRegistry {
    fn drop(&mut self) {
        let _ = self.control.send(Control::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

enum Control {
    Stop(mpsc::Sender<()>),
    Resume(mpsc::Sender<Result<(), String>>),
    Shutdown,
}

struct Shared {
    state: Mutex<State>,
    id_lookups: AtomicU64,
    /// The `Authorization` header every request must carry, when set.
    required_authorization: Mutex<Option<String>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not take the registry down with it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

// ---------------------------------------------------------------------------
// The server's lifecycle.

/// A listener being served, and the way to end it.
struct Serving {
    shutdown: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Serving {
    fn start(listener: TcpListener, shared: Arc<Shared>) -> Serving {
        let (shutdown, stopped) = oneshot::channel();
        let task = tokio::spawn(serve(listener, shared, stopped));
        Serving { shutdown, task }
    }

    /// Waits until the listener and every connection are closed, so that
    /// `stop()` returning means the outage is real.
    async fn stop(self) {
        let _ = self.shutdown.send(());
        let _ = self.task.await;
    }
}

async fn run_server(
    shared: Arc<Shared>,
    mut commands: tokio_mpsc::UnboundedReceiver<Control>,
    bound: mpsc::Sender<Result<u16, String>>,
) {
    let listener = match bind(0).await {
        Ok(listener) => listener,
        Err(err) => {
            let _ = bound.send(Err(format!("cannot bind 127.0.0.1:0: {err}")));
            return;
        }
    };
    let port = match listener.local_addr() {
        Ok(addr) => addr.port(),
        Err(err) => {
            let _ = bound.send(Err(format!("no local address: {err}")));
            return;
        }
    };
    let mut serving = Some(Serving::start(listener, Arc::clone(&shared)));
    let _ = bound.send(Ok(port));
    while let Some(command) = commands.recv().await {
        match command {
            Control::Stop(done) => {
                if let Some(serving) = serving.take() {
                    serving.stop().await;
                }
                let _ = done.send(());
            }
            Control::Resume(done) => {
                if serving.is_none() {
                    match bind(port).await {
                        Ok(listener) => {
                            serving = Some(Serving::start(listener, Arc::clone(&shared)));
                        }
                        Err(err) => {
                            let _ = done.send(Err(err.to_string()));
                            continue;
                        }
                    }
                }
                let _ = done.send(Ok(()));
            }
            Control::Shutdown => break,
        }
    }
    if let Some(serving) = serving.take() {
        serving.stop().await;
    }
}

/// Binds 127.0.0.1:`port`. SO_REUSEADDR lets a resumed registry take its
/// port back while the connections `stop()` closed sit in TIME_WAIT; the
/// retry covers the moment the kernel still holds the old listener.
async fn bind(port: u16) -> io::Result<TcpListener> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let attempt = TcpSocket::new_v4().and_then(|socket| {
            socket.set_reuseaddr(true)?;
            socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
            socket.listen(1024)
        });
        match attempt {
            Err(err)
                if err.kind() == io::ErrorKind::AddrInUse
                    && port != 0
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stopped: oneshot::Receiver<()>) {
    // Connections live in a JoinSet so that stopping can abort them all: an
    // outage must cut keep-alive connections too, not only refuse new ones.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = Arc::clone(&shared);
                    connections.spawn(async move {
                        let service = service_fn(move |request| {
                            let shared = Arc::clone(&shared);
                            async move { Ok::<_, Infallible>(route(&shared, request).await) }
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                // Out of descriptors or a connection reset while queued:
                // pause rather than spin, then keep serving.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

// ---------------------------------------------------------------------------
// The registry's state and rules, shared by HTTP and `register()`.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    None,
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
}

impl Level {
    fn parse(name: &str) -> Option<Level> {
        Some(match name.to_ascii_uppercase().as_str() {
            "NONE" => Level::None,
            "BACKWARD" => Level::Backward,
            "BACKWARD_TRANSITIVE" => Level::BackwardTransitive,
            "FORWARD" => Level::Forward,
            "FORWARD_TRANSITIVE" => Level::ForwardTransitive,
            "FULL" => Level::Full,
            "FULL_TRANSITIVE" => Level::FullTransitive,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Level::None => "NONE",
            Level::Backward => "BACKWARD",
            Level::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Level::Forward => "FORWARD",
            Level::ForwardTransitive => "FORWARD_TRANSITIVE",
            Level::Full => "FULL",
            Level::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    fn transitive(self) -> bool {
        matches!(
            self,
            Level::BackwardTransitive | Level::ForwardTransitive | Level::FullTransitive
        )
    }

    /// The new schema must read data written with the old ones.
    fn backward(self) -> bool {
        matches!(
            self,
            Level::Backward | Level::BackwardTransitive | Level::Full | Level::FullTransitive
        )
    }

    /// The old schemas must read data written with the new one.
    fn forward(self) -> bool {
        matches!(
            self,
            Level::Forward | Level::ForwardTransitive | Level::Full | Level::FullTransitive
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Reference {
    name: String,
    subject: String,
    version: i64,
}

/// A registration or compatibility request body.
#[derive(Debug, Deserialize)]
struct SchemaRequest {
    schema: Option<String>,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
    references: Option<Vec<Reference>>,
}

struct StoredSchema {
    text: String,
    references: Vec<Reference>,
    /// With references inlined, ready for compatibility checks.
    resolved: Schema,
    identity: String,
    /// The texts of every schema this one references, transitively.
    dependencies: Vec<String>,
}

/// A parsed, valid schema not yet stored.
struct Candidate {
    text: String,
    references: Vec<Reference>,
    resolved: Schema,
    identity: String,
    dependencies: Vec<String>,
}

struct State {
    /// Id `n` is at index `n - 1`.
    schemas: Vec<StoredSchema>,
    /// Each subject's versions as schema ids; version `n` is at index `n - 1`.
    subjects: BTreeMap<String, Vec<u32>>,
    global: Level,
    subject_levels: HashMap<String, Level>,
}

impl Default for State {
    fn default() -> State {
        State {
            schemas: Vec::new(),
            subjects: BTreeMap::new(),
            global: Level::Backward,
            subject_levels: HashMap::new(),
        }
    }
}

enum VersionSelector {
    Latest,
    Number(u32),
}

struct ApiError {
    status: StatusCode,
    code: u32,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: u32, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn subject_not_found(subject: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            40401,
            format!("Subject '{subject}' not found."),
        )
    }

    fn version_not_found(version: u32) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            40402,
            format!("Version {version} not found."),
        )
    }

    fn invalid_schema(detail: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            format!("Invalid schema {detail}"),
        )
    }

    fn invalid_level() -> ApiError {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            42203,
            "Invalid compatibility level. Valid values are none, backward, forward, full, \
             backward_transitive, forward_transitive, and full_transitive",
        )
    }

    fn not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, 404, "HTTP 404 Not Found")
    }

    fn method_not_allowed() -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            405,
            "HTTP 405 Method Not Allowed",
        )
    }
}

impl State {
    fn stored(&self, id: u32) -> Option<&StoredSchema> {
        let index = usize::try_from(id).ok()?.checked_sub(1)?;
        self.schemas.get(index)
    }

    fn level_for(&self, subject: &str) -> Level {
        self.subject_levels
            .get(subject)
            .copied()
            .unwrap_or(self.global)
    }

    fn versions(&self, subject: &str) -> Result<&[u32], ApiError> {
        self.subjects
            .get(subject)
            .map(Vec::as_slice)
            .ok_or_else(|| ApiError::subject_not_found(subject))
    }

    /// The (version, id) `selector` names under `subject`.
    fn version(&self, subject: &str, selector: &VersionSelector) -> Result<(u32, u32), ApiError> {
        let versions = self.versions(subject)?;
        let version = match selector {
            VersionSelector::Latest => u32::try_from(versions.len()).unwrap_or(u32::MAX),
            VersionSelector::Number(version) => *version,
        };
        let id = usize::try_from(version)
            .ok()
            .and_then(|version| version.checked_sub(1))
            .and_then(|index| versions.get(index))
            .copied()
            .ok_or_else(|| ApiError::version_not_found(version))?;
        Ok((version, id))
    }

    /// Validates and parses a request's schema, resolving its references.
    fn candidate(&self, request: &SchemaRequest) -> Result<Candidate, ApiError> {
        if let Some(kind) = &request.schema_type
            && !kind.eq_ignore_ascii_case("AVRO")
        {
            return Err(ApiError::invalid_schema(format!(
                "of type {kind}: this test double supports AVRO only"
            )));
        }
        let text = match &request.schema {
            Some(text) if !text.trim().is_empty() => text.clone(),
            _ => return Err(ApiError::invalid_schema("(empty)")),
        };
        let references = request.references.clone().unwrap_or_default();
        let mut dependencies: Vec<String> = Vec::new();
        for reference in &references {
            let selector = if reference.version == -1 {
                VersionSelector::Latest
            } else {
                match u32::try_from(reference.version) {
                    Ok(version) if version > 0 => VersionSelector::Number(version),
                    _ => {
                        return Err(ApiError::invalid_schema(format!(
                            "{text}, details: reference {:?} has an invalid version {}",
                            reference.name, reference.version
                        )));
                    }
                }
            };
            let stored = self
                .version(&reference.subject, &selector)
                .ok()
                .and_then(|(_, id)| self.stored(id))
                .ok_or_else(|| {
                    ApiError::invalid_schema(format!(
                        "{text}, details: reference {:?} to subject {:?} version {} is not registered",
                        reference.name, reference.subject, reference.version
                    ))
                })?;
            for dependency in stored
                .dependencies
                .iter()
                .chain(std::iter::once(&stored.text))
            {
                // parse_str_with_list refuses the same named type twice.
                if !dependencies.contains(dependency) {
                    dependencies.push(dependency.clone());
                }
            }
        }
        let resolved = if dependencies.is_empty() {
            Schema::parse_str(&text)
                .map_err(|err| ApiError::invalid_schema(format!("{text}, details: {err}")))?
        } else {
            let (mut schema, schemata) = Schema::parse_str_with_list(&text, &dependencies)
                .map_err(|err| ApiError::invalid_schema(format!("{text}, details: {err}")))?;
            schema
                .denormalize(&schemata)
                .map_err(|err| ApiError::invalid_schema(format!("{text}, details: {err}")))?;
            schema
        };
        let identity = identity(&resolved, &references);
        Ok(Candidate {
            text,
            references,
            resolved,
            identity,
            dependencies,
        })
    }

    /// Registers `candidate` under `subject`: its existing id if it is
    /// already there, else a new version (after the compatibility check)
    /// with the global id of an identical schema, or a new id.
    fn register(&mut self, subject: &str, candidate: Candidate) -> Result<u32, ApiError> {
        let versions = self.subjects.get(subject).map(Vec::as_slice).unwrap_or(&[]);
        if let Some(id) = versions.iter().copied().find(|id| {
            self.stored(*id)
                .is_some_and(|stored| stored.identity == candidate.identity)
        }) {
            return Ok(id);
        }
        let level = self.level_for(subject);
        let messages = incompatibilities(
            &candidate.resolved,
            level,
            &self.previous(versions, level, None),
        );
        if !messages.is_empty() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                409,
                format!(
                    "Schema being registered is incompatible with an earlier schema for subject \"{subject}\", details: [{}]",
                    messages.join(", ")
                ),
            ));
        }
        let id = match self
            .schemas
            .iter()
            .position(|stored| stored.identity == candidate.identity)
        {
            Some(index) => u32::try_from(index + 1).unwrap_or(u32::MAX),
            None => {
                self.schemas.push(StoredSchema {
                    text: candidate.text,
                    references: candidate.references,
                    resolved: candidate.resolved,
                    identity: candidate.identity,
                    dependencies: candidate.dependencies,
                });
                u32::try_from(self.schemas.len()).unwrap_or(u32::MAX)
            }
        };
        self.subjects
            .entry(subject.to_string())
            .or_default()
            .push(id);
        Ok(id)
    }

    /// The versions a new schema is checked against: the latest, or all for
    /// a transitive level; or only `only` when a version was named.
    fn previous(
        &self,
        versions: &[u32],
        level: Level,
        only: Option<u32>,
    ) -> Vec<(u32, &StoredSchema)> {
        let mut numbered = versions
            .iter()
            .enumerate()
            .filter_map(|(index, id)| Some((u32::try_from(index + 1).ok()?, self.stored(*id)?)));
        match only {
            Some(version) => numbered.filter(|(v, _)| *v == version).collect(),
            None if level.transitive() => numbered.collect(),
            None => numbered.next_back().into_iter().collect(),
        }
    }

    /// Why `candidate` may not be registered under `subject` (empty when it
    /// may). `selector` None is the level-driven check registration does.
    fn compatibility(
        &self,
        subject: &str,
        selector: Option<VersionSelector>,
        candidate: &Candidate,
    ) -> Result<Vec<String>, ApiError> {
        let level = self.level_for(subject);
        let previous = match selector {
            // Confluent answers "compatible" for a subject with no versions.
            None => match self.subjects.get(subject) {
                Some(versions) => self.previous(versions, level, None),
                None => Vec::new(),
            },
            // Confluent checks `latest` as registration would (all versions
            // for a transitive level), a named version alone.
            Some(VersionSelector::Latest) => self.previous(self.versions(subject)?, level, None),
            Some(selector @ VersionSelector::Number(_)) => {
                let (version, _) = self.version(subject, &selector)?;
                self.previous(self.versions(subject)?, level, Some(version))
            }
        };
        Ok(incompatibilities(&candidate.resolved, level, &previous))
    }
}

/// A schema's identity for "is it already registered": its full parsed form
/// (defaults included, unlike the parsing canonical form, because a changed
/// default is a different schema to Confluent) without docs and aliases,
/// which Avro Java's `Schema.equals` ignores too.
fn identity(schema: &Schema, references: &[Reference]) -> String {
    let mut value = serde_json::to_value(schema).unwrap_or(Value::Null);
    strip_docs(&mut value);
    let references = serde_json::to_string(references).unwrap_or_default();
    format!("{value}|{references}")
}

fn strip_docs(value: &mut Value) {
    match value {
        Value::Object(object) => {
            object.remove("doc");
            object.remove("aliases");
            for (key, inner) in object.iter_mut() {
                // A default is data; a record default may well have a "doc" field.
                if key != "default" {
                    strip_docs(inner);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(strip_docs),
        _ => {}
    }
}

/// Confluent-style messages for every way `new` fails `level` against
/// `previous`; empty when compatible.
fn incompatibilities(new: &Schema, level: Level, previous: &[(u32, &StoredSchema)]) -> Vec<String> {
    let mut messages = Vec::new();
    for (version, old) in previous {
        let before = messages.len();
        if level.backward()
            && let Some((kind, why)) = reading_problem(&old.resolved, new)
        {
            messages.push(format!(
                "{{errorType:'{kind}', description:'The new schema cannot read data written with version {version}: {why}'}}"
            ));
        }
        if level.forward()
            && let Some((kind, why)) = reading_problem(new, &old.resolved)
        {
            messages.push(format!(
                "{{errorType:'{kind}', description:'Version {version} cannot read data written with the new schema: {why}'}}"
            ));
        }
        if messages.len() > before {
            messages.push(format!("{{oldSchemaVersion: {version}}}"));
            messages.push(format!("{{oldSchema: '{}'}}", old.text));
        }
    }
    if !messages.is_empty() {
        messages.push(format!("{{compatibility: '{}'}}", level.name()));
    }
    messages
}

/// Why a reader with `reader` cannot resolve data written with `writer`:
/// Avro Java's error type name and apache-avro's explanation.
fn reading_problem(writer: &Schema, reader: &Schema) -> Option<(&'static str, String)> {
    match SchemaCompatibility::can_read(writer, reader) {
        Ok(Compatibility::Full) => None,
        // apache-avro's Partial means some written values would fail to
        // resolve (a writer union branch or enum symbol the reader lacks,
        // with no enum default). Avro Java, and so Confluent, calls that
        // incompatible, so the double does too.
        Ok(Compatibility::Partial) => Some((
            "MISSING_UNION_BRANCH_OR_ENUM_SYMBOL",
            "only partially compatible: some values of the writer's schema (a union branch or \
             an enum symbol) have no counterpart in the reader's schema"
                .to_string(),
        )),
        Err(err) => Some((error_type(&err), error_chain(&err))),
    }
}

fn error_type(err: &CompatibilityError) -> &'static str {
    match err {
        CompatibilityError::FieldTypeMismatch(_, inner) => error_type(inner),
        CompatibilityError::MissingDefaultValue(_) => "READER_FIELD_MISSING_DEFAULT_VALUE",
        CompatibilityError::MissingSymbols => "MISSING_ENUM_SYMBOLS",
        CompatibilityError::MissingUnionElements
        | CompatibilityError::SchemaMismatchAllUnionElements => "MISSING_UNION_BRANCH",
        CompatibilityError::FixedMismatch => "FIXED_SIZE_MISMATCH",
        CompatibilityError::NameMismatch { .. } => "NAME_MISMATCH",
        _ => "TYPE_MISMATCH",
    }
}

fn error_chain(err: &CompatibilityError) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

// ---------------------------------------------------------------------------
// HTTP.

type HttpResponse = Response<Full<Bytes>>;

fn respond(status: StatusCode, body: &Value) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(SR_CONTENT_TYPE));
    response
}

fn ok(body: Value) -> Result<HttpResponse, ApiError> {
    Ok(respond(StatusCode::OK, &body))
}

fn error_response(err: &ApiError) -> HttpResponse {
    respond(
        err.status,
        &json!({"error_code": err.code, "message": err.message}),
    )
}

async fn route(shared: &Shared, request: Request<Incoming>) -> HttpResponse {
    let required = shared
        .required_authorization
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    if let Some(required) = required {
        let given = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok());
        if given != Some(required.as_str()) {
            return error_response(&ApiError {
                status: StatusCode::UNAUTHORIZED,
                code: 40101,
                message: "Unauthorized".into(),
            });
        }
    }
    match handle(shared, request).await {
        Ok(response) => response,
        Err(err) => error_response(&err),
    }
}

async fn handle(shared: &Shared, request: Request<Incoming>) -> Result<HttpResponse, ApiError> {
    let (parts, body) = request.into_parts();
    let query = Query::parse(parts.uri.query());
    // Split before decoding: a subject may hold an encoded '/'.
    let segments: Vec<String> = parts
        .uri
        .path()
        .strip_prefix('/')
        .unwrap_or_default()
        .split('/')
        .map(|segment| {
            percent_encoding::percent_decode_str(segment)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = parts.method.clone();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["subjects"]) => {
            let state = shared.lock();
            ok(json!(state.subjects.keys().collect::<Vec<_>>()))
        }
        (&Method::GET, ["subjects", subject, "versions"]) => {
            let state = shared.lock();
            let count = state.versions(subject)?.len();
            ok(json!((1..=count).collect::<Vec<_>>()))
        }
        (&Method::POST, ["subjects", subject, "versions"]) => {
            let request = schema_request(&parts.headers, body).await?;
            let mut state = shared.lock();
            let candidate = state.candidate(&request)?;
            let id = state.register(subject, candidate)?;
            ok(json!({"id": id}))
        }
        (&Method::GET, ["subjects", subject, "versions", version]) => {
            let selector = version_selector(version)?;
            let state = shared.lock();
            let (version, id) = state.version(subject, &selector)?;
            ok(version_body(&state, subject, version, id))
        }
        (&Method::POST, ["subjects", subject]) => {
            let request = schema_request(&parts.headers, body).await?;
            let state = shared.lock();
            let versions = state.versions(subject)?;
            let candidate = state.candidate(&request)?;
            let found = versions.iter().enumerate().find(|(_, id)| {
                state
                    .stored(**id)
                    .is_some_and(|stored| stored.identity == candidate.identity)
            });
            match found {
                Some((index, id)) => ok(version_body(
                    &state,
                    subject,
                    u32::try_from(index + 1).unwrap_or(u32::MAX),
                    *id,
                )),
                None => Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    40403,
                    "Schema not found",
                )),
            }
        }
        (&Method::GET, ["schemas", "ids", id]) => {
            shared.id_lookups.fetch_add(1, Ordering::SeqCst);
            // Jersey answers a non-numeric path parameter with a plain 404.
            let id: u32 = id.parse().map_err(|_| ApiError::not_found())?;
            let state = shared.lock();
            let stored = state.stored(id).ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    40403,
                    format!("Schema {id} not found"),
                )
            })?;
            let mut body = json!({"schema": stored.text});
            if !stored.references.is_empty() {
                body["references"] = json!(stored.references);
            }
            ok(body)
        }
        (&Method::POST, ["compatibility", "subjects", subject, "versions"]) => {
            let request = schema_request(&parts.headers, body).await?;
            let state = shared.lock();
            let candidate = state.candidate(&request)?;
            let messages = state.compatibility(subject, None, &candidate)?;
            ok(compatibility_body(&messages, query.flag("verbose")))
        }
        (&Method::POST, ["compatibility", "subjects", subject, "versions", version]) => {
            let selector = version_selector(version)?;
            let request = schema_request(&parts.headers, body).await?;
            let state = shared.lock();
            // An unknown subject or version is a 404 before the schema is looked at.
            state.version(subject, &selector)?;
            let candidate = state.candidate(&request)?;
            let messages = state.compatibility(subject, Some(selector), &candidate)?;
            ok(compatibility_body(&messages, query.flag("verbose")))
        }
        (&Method::GET, ["config"]) => {
            let state = shared.lock();
            ok(json!({"compatibilityLevel": state.global.name()}))
        }
        (&Method::PUT, ["config"]) => {
            let level = level_request(&parts.headers, body).await?;
            shared.lock().global = level;
            ok(json!({"compatibility": level.name()}))
        }
        (&Method::GET, ["config", subject]) => {
            let state = shared.lock();
            let level = match state.subject_levels.get(*subject) {
                Some(level) => *level,
                None if query.flag("defaultToGlobal") => state.global,
                None => {
                    return Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        40408,
                        format!(
                            "Subject '{subject}' does not have subject-level compatibility configured"
                        ),
                    ));
                }
            };
            ok(json!({"compatibilityLevel": level.name()}))
        }
        (&Method::PUT, ["config", subject]) => {
            let level = level_request(&parts.headers, body).await?;
            shared
                .lock()
                .subject_levels
                .insert((*subject).to_string(), level);
            ok(json!({"compatibility": level.name()}))
        }
        (
            _,
            ["subjects"]
            | ["subjects", _, "versions"]
            | ["subjects", _, "versions", _]
            | ["subjects", _]
            | ["schemas", "ids", _]
            | ["compatibility", "subjects", _, "versions"]
            | ["compatibility", "subjects", _, "versions", _]
            | ["config"]
            | ["config", _],
        ) => Err(ApiError::method_not_allowed()),
        _ => Err(ApiError::not_found()),
    }
}

fn version_body(state: &State, subject: &str, version: u32, id: u32) -> Value {
    let mut body = json!({"subject": subject, "version": version, "id": id});
    if let Some(stored) = state.stored(id) {
        body["schema"] = json!(stored.text);
        if !stored.references.is_empty() {
            body["references"] = json!(stored.references);
        }
    }
    body
}

fn compatibility_body(messages: &[String], verbose: bool) -> Value {
    let mut body = json!({"is_compatible": messages.is_empty()});
    if verbose {
        body["messages"] = json!(messages);
    }
    body
}

fn version_selector(version: &str) -> Result<VersionSelector, ApiError> {
    if version == "latest" || version == "-1" {
        return Ok(VersionSelector::Latest);
    }
    match version.parse::<u32>() {
        Ok(number) if number > 0 && number <= i32::MAX as u32 => {
            Ok(VersionSelector::Number(number))
        }
        _ => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            42202,
            format!(
                "The specified version '{version}' is not a valid version id. Allowed values are \
                 between [1, 2^31-1] and the string \"latest\""
            ),
        )),
    }
}

async fn json_body(headers: &HeaderMap, body: Incoming) -> Result<Value, ApiError> {
    // Confluent's resources consume its own media types, plain JSON and
    // octet-stream (what a body without a type defaults to).
    if let Some(content_type) = headers.get(CONTENT_TYPE) {
        let essence = content_type
            .to_str()
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        let accepted = [
            "application/vnd.schemaregistry.v1+json",
            "application/vnd.schemaregistry+json",
            "application/json",
            "application/octet-stream",
        ];
        if !accepted.contains(&essence.as_str()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                415,
                "HTTP 415 Unsupported Media Type",
            ));
        }
    }
    let bytes = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|err| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                400,
                format!("cannot read the request body: {err}"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|err| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            400,
            format!("the request body is not JSON: {err}"),
        )
    })
}

async fn schema_request(headers: &HeaderMap, body: Incoming) -> Result<SchemaRequest, ApiError> {
    let value = json_body(headers, body).await?;
    serde_json::from_value(value).map_err(|err| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            422,
            format!("Unrecognizable request: {err}"),
        )
    })
}

async fn level_request(headers: &HeaderMap, body: Incoming) -> Result<Level, ApiError> {
    let value = json_body(headers, body).await?;
    value
        .get("compatibility")
        .or_else(|| value.get("compatibilityLevel"))
        .and_then(Value::as_str)
        .and_then(Level::parse)
        .ok_or_else(ApiError::invalid_level)
}

/// The query string's parameters; unknown ones are ignored, as Confluent does.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: Option<&str>) -> Query {
        let decode = |text: &str| {
            percent_encoding::percent_decode_str(&text.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        };
        Query(
            query
                .unwrap_or_default()
                .split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (decode(key), decode(value))
                })
                .collect(),
        )
    }

    fn flag(&self, name: &str) -> bool {
        self.0
            .iter()
            .any(|(key, value)| key == name && value.eq_ignore_ascii_case("true"))
    }
}
