//! The Confluent-compatible Schema Registry: settings, the writer-schema cache,
//! and the calls baton's codec and `baton schemas` make.
//!
//! Calls go through `schema_registry_converter` (multi-URL failover, basic
//! auth, TLS over reqwest). Its errors are re-classified here, once: the
//! converter retries only 502/503, while for baton every 5xx and every
//! transport failure is an outage to wait out, and a 404 is a fact about the
//! record (its schema id was never issued).

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use apache_avro::Schema;
use schema_registry_converter::async_impl::schema_registry::{
    SrSettings, get_all_versions, get_schema_by_id, get_schema_by_subject_and_version,
    is_compatible_schema, post_schema,
};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};
use thiserror::Error;

use crate::metrics::RegistryErrorKind;

/// How a record's subject is named (Confluent's `subject.name.strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectStrategy {
    /// `{topic}-value`: one schema history per topic (Confluent's default).
    #[default]
    Topic,
    /// The record's full name, e.g. `dev.baton.HandoverEvent`, whatever the topic.
    Record,
}

impl SubjectStrategy {
    pub fn subject(self, topic: &str, record_name: &str) -> String {
        match self {
            SubjectStrategy::Topic => format!("{topic}-value"),
            SubjectStrategy::Record => record_name.to_string(),
        }
    }
}

/// Where the registry is and how to talk to it.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// One or more base URLs, tried in order.
    pub urls: Vec<String>,
    pub username: Option<String>,
    pub password: Option<crate::secret::Secret>,
    /// PEM file of the CA that signed the registry's certificate.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and PKCS#8 key, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub timeout: Duration,
    pub subject_strategy: SubjectStrategy,
    pub auto_register: bool,
}

/// Why a registry call failed, classified for the caller.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum RegistryError {
    /// The registry answered that the thing does not exist (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// The registry is unreachable or failing (transport error, 5xx): retry later.
    #[error("schema registry unavailable: {0}")]
    Unavailable(String),
    /// Anything else (4xx, a schema that does not parse): retrying will not help.
    #[error("{0}")]
    Rejected(String),
}

impl RegistryError {
    pub fn is_transient(&self) -> bool {
        matches!(self, RegistryError::Unavailable(_))
    }

    fn from_converter(err: SRCError) -> RegistryError {
        let text = match &err.cause {
            Some(cause) => format!("{}: {cause}", err.error),
            None => err.error.clone(),
        };
        // The converter names the HTTP status in its message ("... failed with
        // status 404 Not Found"); transport failures carry no status.
        match http_status(&err.error) {
            Some(404) => RegistryError::NotFound(text),
            Some(status) if status >= 500 => RegistryError::Unavailable(text),
            Some(429) => RegistryError::Unavailable(text),
            Some(_) => RegistryError::Rejected(text),
            None if err.retriable => RegistryError::Unavailable(text),
            None => RegistryError::Rejected(text),
        }
    }
}

fn http_status(message: &str) -> Option<u16> {
    let (_, rest) = message.split_once("with status ")?;
    rest.get(..3)?.parse().ok()
}

/// A writer schema looked up by id: found, or definitively unknown.
#[derive(Clone)]
pub enum WriterSchema {
    Found(Arc<Schema>),
    Unknown(String),
}

impl fmt::Debug for WriterSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriterSchema::Found(schema) => write!(f, "Found({:?})", schema.name()),
            WriterSchema::Unknown(reason) => write!(f, "Unknown({reason})"),
        }
    }
}

/// Unknown ids are remembered so a flood of hostile ids costs one lookup
/// each, but only this many, so that flood cannot grow memory without bound.
const MAX_UNKNOWN_IDS: usize = 4096;

/// A connection to the registry and the schemas it has served, by id.
/// Schema ids are immutable in a Confluent registry, so a found schema is
/// cached for the life of the process.
pub struct Registry {
    settings: SrSettings,
    /// For the config endpoints the converter does not cover.
    http: reqwest::Client,
    base_urls: Vec<String>,
    auth: Option<(String, Option<String>)>,
    schemas: RwLock<HashMap<u32, WriterSchema>>,
    unknown: std::sync::atomic::AtomicUsize,
    pub config: RegistryConfig,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("urls", &self.base_urls)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Builds the HTTP client; fails on unreadable TLS files, never on the network.
    pub fn connect(config: RegistryConfig) -> Result<Registry, RegistryError> {
        let Some((first, rest)) = config.urls.split_first() else {
            return Err(RegistryError::Rejected(
                "schema_registry_url: no URL given".into(),
            ));
        };
        let mut builder = SrSettings::new_builder(first.trim_end_matches('/').to_string());
        for url in rest {
            builder.add_url(url.trim_end_matches('/').to_string());
        }
        if let Some(username) = &config.username {
            builder.set_basic_authorization(
                username,
                config.password.as_ref().map(crate::secret::Secret::expose),
            );
        }
        builder.set_timeout(config.timeout);
        let settings = builder
            .build_with(tls_client_builder(&config)?)
            .map_err(RegistryError::from_converter)?;
        let http = tls_client_builder(&config)?
            .timeout(config.timeout)
            .build()
            .map_err(|err| {
                RegistryError::Rejected(format!("cannot build the HTTP client: {err}"))
            })?;
        Ok(Registry {
            settings,
            http,
            base_urls: config
                .urls
                .iter()
                .map(|url| url.trim_end_matches('/').to_string())
                .collect(),
            auth: config.username.clone().map(|user| {
                let password = config.password.as_ref().map(|p| p.expose().to_string());
                (user, password)
            }),
            schemas: RwLock::new(HashMap::new()),
            unknown: std::sync::atomic::AtomicUsize::new(0),
            config,
        })
    }

    /// The writer schema for `id` if it has been looked up before.
    pub fn cached(&self, id: u32) -> Option<WriterSchema> {
        self.schemas
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&id)
            .cloned()
    }

    /// Puts a writer schema into the cache as a lookup would have: for a
    /// process that carries its schemas (the fuzzers' registry stub), so
    /// decoding follows exactly the path it follows after a fetch.
    pub fn insert_cached(&self, id: u32, schema: WriterSchema) {
        self.schemas
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(id, schema);
    }

    /// Looks `id` up and caches the answer (a schema, or the fact that the
    /// registry does not know it). Only an outage is an error.
    pub async fn fetch(&self, id: u32) -> Result<WriterSchema, RegistryError> {
        if let Some(known) = self.cached(id) {
            return Ok(known);
        }
        let answer = match get_schema_by_id(id, &self.settings).await {
            Ok(registered) => match Schema::parse_str(&registered.schema) {
                Ok(schema) => WriterSchema::Found(Arc::new(schema)),
                Err(err) => {
                    count_error(RegistryErrorKind::Unparseable);
                    WriterSchema::Unknown(format!("schema id {id} does not parse as Avro: {err}"))
                }
            },
            Err(err) => match RegistryError::from_converter(err) {
                RegistryError::NotFound(reason) => {
                    count_error(RegistryErrorKind::NotFound);
                    WriterSchema::Unknown(format!("schema id {id} is not registered: {reason}"))
                }
                // A refused lookup (401, 403, any 4xx but 404) says nothing
                // about the record, only about baton's access: a revoked key
                // must pause the partition like an outage, not dead-letter
                // every record that follows.
                RegistryError::Rejected(reason) | RegistryError::Unavailable(reason) => {
                    count_error(RegistryErrorKind::Unavailable);
                    return Err(RegistryError::Unavailable(format!(
                        "schema id {id}: {reason}"
                    )));
                }
            },
        };
        let mut schemas = self
            .schemas
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if matches!(answer, WriterSchema::Unknown(_)) {
            use std::sync::atomic::Ordering;
            if self.unknown.fetch_add(1, Ordering::Relaxed) >= MAX_UNKNOWN_IDS {
                schemas.retain(|_, known| matches!(known, WriterSchema::Found(_)));
                self.unknown.store(1, Ordering::Relaxed);
            }
        }
        let outcome = match answer {
            WriterSchema::Found(_) => "found",
            WriterSchema::Unknown(_) => "unknown",
        };
        crate::metrics::METRICS
            .schema_lookups
            .with_label_values(&[outcome])
            .inc();
        schemas.insert(id, answer.clone());
        Ok(answer)
    }

    /// Registers `schema` under `subject` (idempotent) and returns its id.
    pub async fn register(&self, subject: &str, schema: &Avsc) -> Result<u32, RegistryError> {
        post_schema(&self.settings, subject.to_string(), schema.supplied())
            .await
            .map(|registered| registered.id)
            .map_err(RegistryError::from_converter)
    }

    /// The id under which exactly this schema is registered for `subject`,
    /// without registering anything. `Ok(None)` when it is not registered.
    pub async fn find(&self, subject: &str, schema: &Avsc) -> Result<Option<u32>, RegistryError> {
        let wanted = schema.parsed.canonical_form();
        let versions = match get_all_versions(&self.settings, subject.to_string()).await {
            Ok(versions) => versions,
            Err(err) => match RegistryError::from_converter(err) {
                RegistryError::NotFound(_) => return Ok(None),
                other => return Err(other),
            },
        };
        // Newest first: the usual match is the latest version.
        for version in versions.into_iter().rev() {
            let registered =
                get_schema_by_subject_and_version(&self.settings, subject, Some(version))
                    .await
                    .map_err(RegistryError::from_converter)?;
            if let Ok(parsed) = Schema::parse_str(&registered.schema)
                && parsed.canonical_form() == wanted
            {
                return Ok(Some(registered.id));
            }
        }
        Ok(None)
    }

    /// The latest registered version of `subject`, if any.
    pub async fn latest(&self, subject: &str) -> Result<Option<(u32, Schema)>, RegistryError> {
        match get_schema_by_subject_and_version(&self.settings, subject, None).await {
            Ok(registered) => Schema::parse_str(&registered.schema)
                .map(|schema| Some((registered.version.unwrap_or_default(), schema)))
                .map_err(|err| {
                    RegistryError::Rejected(format!(
                        "the latest schema of {subject} does not parse: {err}"
                    ))
                }),
            Err(err) => match RegistryError::from_converter(err) {
                RegistryError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    /// The registry's verdict: may `schema` be registered under `subject`,
    /// under the subject's configured compatibility level?
    pub async fn is_compatible(&self, subject: &str, schema: &Avsc) -> Result<bool, RegistryError> {
        is_compatible_schema(&self.settings, subject.to_string(), schema.supplied())
            .await
            .map_err(RegistryError::from_converter)
    }

    /// The compatibility level that applies to `subject` (its own, else the global one).
    pub async fn compatibility_level(&self, subject: &str) -> Result<String, RegistryError> {
        let path = format!("/config/{}?defaultToGlobal=true", encode_segment(subject));
        let body = self.call(reqwest::Method::GET, &path, None).await?;
        body.get("compatibilityLevel")
            .or_else(|| body.get("compatibility"))
            .and_then(|level| level.as_str())
            .map(str::to_string)
            .ok_or_else(|| RegistryError::Rejected(format!("unexpected config answer: {body}")))
    }

    /// Sets `subject`'s compatibility level.
    pub async fn set_compatibility_level(
        &self,
        subject: &str,
        level: &str,
    ) -> Result<(), RegistryError> {
        let path = format!("/config/{}", encode_segment(subject));
        self.call(
            reqwest::Method::PUT,
            &path,
            Some(serde_json::json!({ "compatibility": level })),
        )
        .await
        .map(|_| ())
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, RegistryError> {
        let mut last = RegistryError::Unavailable("no registry URL".into());
        for base in &self.base_urls {
            let mut request = self
                .http
                .request(method.clone(), format!("{base}{path}"))
                .header("Accept", "application/vnd.schemaregistry.v1+json");
            if let Some((user, password)) = &self.auth {
                request = request.basic_auth(user, password.as_deref());
            }
            if let Some(body) = &body {
                request = request
                    .header("Content-Type", "application/vnd.schemaregistry.v1+json")
                    .body(body.to_string());
            }
            let response = match request.send().await {
                Ok(response) => response,
                Err(err) => {
                    last = RegistryError::Unavailable(format!("{base}: {err}"));
                    continue;
                }
            };
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            let value: serde_json::Value =
                serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
            if status.is_success() {
                return Ok(value);
            }
            let error = format!("{base}{path}: HTTP {status}: {value}");
            last = match status.as_u16() {
                404 => return Err(RegistryError::NotFound(error)),
                code if code >= 500 || code == 429 => RegistryError::Unavailable(error),
                _ => return Err(RegistryError::Rejected(error)),
            };
        }
        Err(last)
    }
}

/// An Avro schema as written (the text is what gets registered: the parsing
/// canonical form would drop the defaults that make evolution compatible).
#[derive(Debug, Clone)]
pub struct Avsc {
    pub text: String,
    pub parsed: Schema,
}

impl Avsc {
    pub fn parse(text: &str) -> Result<Avsc, apache_avro::Error> {
        Ok(Avsc {
            text: text.to_string(),
            parsed: Schema::parse_str(text)?,
        })
    }

    /// The record's full name, e.g. `dev.baton.HandoverEvent`.
    pub fn full_name(&self) -> String {
        self.parsed
            .name()
            .map(|name| name.fullname(None))
            .unwrap_or_default()
    }

    fn supplied(&self) -> SuppliedSchema {
        SuppliedSchema::new(Some(self.full_name()), SchemaType::Avro, self.text.clone())
    }
}

fn encode_segment(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A reqwest client builder with the configured CA and client identity.
fn tls_client_builder(config: &RegistryConfig) -> Result<reqwest::ClientBuilder, RegistryError> {
    let read = |path: &PathBuf, what: &str| {
        std::fs::read(path).map_err(|err| {
            RegistryError::Rejected(format!("{what}: cannot read {}: {err}", path.display()))
        })
    };
    let mut builder = reqwest::Client::builder();
    if let Some(ca) = &config.ca_file {
        let pem = read(ca, "schema_registry_ca_file")?;
        let certificate = reqwest::Certificate::from_pem(&pem).map_err(|err| {
            RegistryError::Rejected(format!("schema_registry_ca_file: {}: {err}", ca.display()))
        })?;
        builder = builder.add_root_certificate(certificate);
    }
    match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => {
            let cert_pem = read(cert, "schema_registry_cert_file")?;
            let key_pem = read(key, "schema_registry_key_file")?;
            let identity =
                reqwest::Identity::from_pkcs8_pem(&cert_pem, &key_pem).map_err(|err| {
                    RegistryError::Rejected(format!("schema_registry_cert_file/key_file: {err}"))
                })?;
            builder = builder.identity(identity);
        }
        (None, None) => {}
        _ => {
            return Err(RegistryError::Rejected(
                "schema_registry_cert_file and schema_registry_key_file go together".into(),
            ));
        }
    }
    Ok(builder)
}

/// Counts a failed lookup in `baton_schema_registry_errors_total`.
fn count_error(kind: RegistryErrorKind) {
    crate::metrics::OPS
        .registry_errors
        .with_label_values(&[kind.as_str()])
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        let error = |message: &str, retriable| SRCError::new(message, None, retriable);
        assert!(matches!(
            RegistryError::from_converter(error(
                "HTTP request to schema registry failed with status 404 Not Found",
                false
            )),
            RegistryError::NotFound(_)
        ));
        assert!(
            RegistryError::from_converter(error(
                "HTTP request to schema registry failed with status 500 Internal Server Error",
                false
            ))
            .is_transient()
        );
        assert!(
            RegistryError::from_converter(error("http call to schema registry failed", true))
                .is_transient()
        );
        assert!(matches!(
            RegistryError::from_converter(error(
                "HTTP request to schema registry failed with status 401 Unauthorized",
                false
            )),
            RegistryError::Rejected(_)
        ));
    }

    #[test]
    fn subjects_follow_the_strategy() {
        assert_eq!(
            SubjectStrategy::Topic.subject("mcp.handover.researcher", "dev.baton.HandoverEvent"),
            "mcp.handover.researcher-value"
        );
        assert_eq!(
            SubjectStrategy::Record.subject("mcp.handover.researcher", "dev.baton.HandoverEvent"),
            "dev.baton.HandoverEvent"
        );
    }
}
