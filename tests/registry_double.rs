//! The Schema Registry test double against its own contract: Confluent's
//! endpoints, bodies and error codes, real Avro compatibility checks, and an
//! outage that clients really see. No broker needed.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::registry::SchemaRegistry;
use reqwest::Method;
use serde_json::{Value, json};

const SR_JSON: &str = "application/vnd.schemaregistry.v1+json";

const V1: &str = r#"{"type":"record","name":"Event","namespace":"dev.baton","fields":[
    {"name":"id","type":"string"}]}"#;
/// V1 with different whitespace and a doc: the same schema.
const V1_AGAIN: &str = r#"{"type": "record", "name": "Event", "namespace": "dev.baton",
    "doc": "the same schema, written differently",
    "fields": [{"name": "id", "type": "string"}]}"#;
/// V1 plus a field with a default: BACKWARD and FORWARD compatible.
const V2_DEFAULT: &str = r#"{"type":"record","name":"Event","namespace":"dev.baton","fields":[
    {"name":"id","type":"string"},{"name":"score","type":"int","default":0}]}"#;
/// V1 plus a field without a default: FORWARD compatible only.
const V2_REQUIRED: &str = r#"{"type":"record","name":"Event","namespace":"dev.baton","fields":[
    {"name":"id","type":"string"},{"name":"score","type":"int"}]}"#;

fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
        .block_on(future)
}

/// One response: status, JSON body, content type.
struct Answer {
    status: u16,
    body: Value,
    content_type: String,
}

async fn call(
    client: &reqwest::Client,
    method: Method,
    url: String,
    body: Option<Value>,
) -> Answer {
    let mut request = client.request(method, &url);
    if let Some(body) = body {
        request = request
            .header("Content-Type", SR_JSON)
            .body(body.to_string());
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|err| panic!("{url}: {err}"));
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let text = response.text().await.expect("a response body");
    let body = serde_json::from_str(&text).unwrap_or_else(|err| panic!("{url}: {err}: {text}"));
    Answer {
        status,
        body,
        content_type,
    }
}

async fn get(client: &reqwest::Client, url: String) -> Answer {
    call(client, Method::GET, url, None).await
}

async fn post_schema(client: &reqwest::Client, url: String, schema: &str) -> Answer {
    call(client, Method::POST, url, Some(json!({"schema": schema}))).await
}

fn error(code: u32, message: &str) -> Value {
    json!({"error_code": code, "message": message})
}

#[test]
fn registration_issues_global_ids_and_dedups_identical_schemas() {
    let registry = SchemaRegistry::start();
    let base = registry.url();
    block_on(async {
        let client = reqwest::Client::new();
        let register = |subject: &str| format!("{base}/subjects/{subject}/versions");

        let first = post_schema(&client, register("events-value"), V1).await;
        assert_eq!((first.status, first.body.clone()), (200, json!({"id": 1})));
        assert_eq!(first.content_type, SR_JSON);

        // Whitespace and docs do not make a new version.
        let again = post_schema(&client, register("events-value"), V1_AGAIN).await;
        assert_eq!(again.body, json!({"id": 1}));
        let versions = get(&client, register("events-value")).await;
        assert_eq!(versions.body, json!([1]));

        // The same schema under another subject keeps its global id.
        let other = post_schema(&client, register("other-value"), V1).await;
        assert_eq!(other.body, json!({"id": 1}));

        let second = post_schema(&client, register("events-value"), V2_DEFAULT).await;
        assert_eq!(second.body, json!({"id": 2}));
        assert_eq!(
            get(&client, register("events-value")).await.body,
            json!([1, 2])
        );

        // The request may name the type and carry an empty reference list.
        let typed = call(
            &client,
            Method::POST,
            register("events-value"),
            Some(json!({"schema": V2_DEFAULT, "schemaType": "AVRO", "references": []})),
        )
        .await;
        assert_eq!(typed.body, json!({"id": 2}));

        let subjects = get(&client, format!("{base}/subjects")).await;
        assert_eq!(subjects.body, json!(["events-value", "other-value"]));
    });

    // The direct API shares the state and the rules.
    assert_eq!(registry.register("events-value", V2_DEFAULT), 2);
    assert_eq!(registry.register("third-value", V2_REQUIRED), 3);
}

#[test]
fn schemas_by_id_and_their_lookup_count() {
    let registry = SchemaRegistry::start();
    let id = registry.register("events-value", V1);
    let base = registry.url();
    block_on(async {
        let client = reqwest::Client::new();
        let found = get(&client, format!("{base}/schemas/ids/{id}?deleted=true")).await;
        assert_eq!(found.status, 200);
        assert_eq!(found.body, json!({"schema": V1}));
        assert_eq!(found.content_type, SR_JSON);

        let missing = get(&client, format!("{base}/schemas/ids/99")).await;
        assert_eq!(missing.status, 404);
        assert_eq!(missing.body, error(40403, "Schema 99 not found"));

        let malformed = get(&client, format!("{base}/schemas/ids/abc")).await;
        assert_eq!(malformed.status, 404);
        assert_eq!(malformed.body, error(404, "HTTP 404 Not Found"));
    });
    assert_eq!(registry.id_lookups(), 3);
}

#[test]
fn versions_and_lookups_by_subject() {
    let registry = SchemaRegistry::start();
    // Subjects with a '/' arrive percent-encoded.
    registry.register("team/events-value", V1);
    registry.register("team/events-value", V2_DEFAULT);
    let base = registry.url();
    let subject = format!("{base}/subjects/team%2Fevents-value");
    block_on(async {
        let client = reqwest::Client::new();
        let latest = get(&client, format!("{subject}/versions/latest")).await;
        assert_eq!(
            latest.body,
            json!({"subject": "team/events-value", "version": 2, "id": 2, "schema": V2_DEFAULT})
        );
        let first = get(&client, format!("{subject}/versions/1")).await;
        assert_eq!(
            first.body,
            json!({"subject": "team/events-value", "version": 1, "id": 1, "schema": V1})
        );

        let no_version = get(&client, format!("{subject}/versions/3")).await;
        assert_eq!(no_version.status, 404);
        assert_eq!(no_version.body, error(40402, "Version 3 not found."));

        let bad_version = get(&client, format!("{subject}/versions/newest")).await;
        assert_eq!(bad_version.status, 422);
        assert_eq!(bad_version.body["error_code"], 42202);

        let no_subject = get(&client, format!("{base}/subjects/nope/versions/latest")).await;
        assert_eq!(no_subject.status, 404);
        assert_eq!(no_subject.body, error(40401, "Subject 'nope' not found."));
        let no_versions = get(&client, format!("{base}/subjects/nope/versions")).await;
        assert_eq!(no_versions.body, error(40401, "Subject 'nope' not found."));

        // Is this schema registered under the subject?
        let lookup = post_schema(&client, format!("{subject}?deleted=false"), V1_AGAIN).await;
        assert_eq!(
            lookup.body,
            json!({"subject": "team/events-value", "version": 1, "id": 1, "schema": V1})
        );
        let not_there = post_schema(&client, subject.clone(), V2_REQUIRED).await;
        assert_eq!(not_there.status, 404);
        assert_eq!(not_there.body, error(40403, "Schema not found"));
        let unknown = post_schema(&client, format!("{base}/subjects/nope"), V1).await;
        assert_eq!(unknown.body, error(40401, "Subject 'nope' not found."));
    });
}

#[test]
fn backward_compatibility_is_checked_for_real() {
    let registry = SchemaRegistry::start();
    registry.register("events-value", V1);
    let base = registry.url();
    block_on(async {
        let client = reqwest::Client::new();
        let check = |version: &str, verbose: bool| {
            format!(
                "{base}/compatibility/subjects/events-value/versions/{version}{}",
                if verbose { "?verbose=true" } else { "" }
            )
        };

        let with_default = post_schema(&client, check("latest", false), V2_DEFAULT).await;
        assert_eq!(with_default.body, json!({"is_compatible": true}));

        // A new required field cannot be filled from data written with V1.
        let required = post_schema(&client, check("latest", false), V2_REQUIRED).await;
        assert_eq!(required.body, json!({"is_compatible": false}));
        let verbose = post_schema(&client, check("1", true), V2_REQUIRED).await;
        assert_eq!(verbose.body["is_compatible"], false);
        let messages = verbose.body["messages"].as_array().expect("messages");
        let text = messages
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            text.contains("READER_FIELD_MISSING_DEFAULT_VALUE"),
            "{text}"
        );
        assert!(text.contains("'score'"), "{text}");
        assert!(text.contains("{compatibility: 'BACKWARD'}"), "{text}");

        let refused = post_schema(
            &client,
            format!("{base}/subjects/events-value/versions"),
            V2_REQUIRED,
        )
        .await;
        assert_eq!(refused.status, 409);
        assert_eq!(refused.body["error_code"], 409);
        let message = refused.body["message"].as_str().expect("a message");
        assert!(
            message.starts_with(
                "Schema being registered is incompatible with an earlier schema for subject \"events-value\", details: ["
            ),
            "{message}"
        );
        assert_eq!(
            get(&client, format!("{base}/subjects/events-value/versions"))
                .await
                .body,
            json!([1])
        );

        let ok = post_schema(
            &client,
            format!("{base}/subjects/events-value/versions"),
            V2_DEFAULT,
        )
        .await;
        assert_eq!(ok.body, json!({"id": 2}));

        let no_version = post_schema(&client, check("7", false), V1).await;
        assert_eq!(no_version.body, error(40402, "Version 7 not found."));
        let no_subject = post_schema(
            &client,
            format!("{base}/compatibility/subjects/nope/versions/latest"),
            V1,
        )
        .await;
        assert_eq!(no_subject.body, error(40401, "Subject 'nope' not found."));
        // The version-less form, which the converter uses, finds nothing to
        // be incompatible with in an unknown subject.
        let fresh = post_schema(
            &client,
            format!("{base}/compatibility/subjects/nope/versions"),
            V2_REQUIRED,
        )
        .await;
        assert_eq!(fresh.body, json!({"is_compatible": true}));
    });
}

#[test]
fn forward_full_and_transitive_levels() {
    let registry = SchemaRegistry::start();
    let base = registry.url();
    block_on(async {
        let client = reqwest::Client::new();
        let config = |subject: &str| format!("{base}/config/{subject}");
        let http = &client;
        let set = move |subject: &str, level: &str| {
            call(
                http,
                Method::PUT,
                config(subject),
                Some(json!({"compatibility": level})),
            )
        };
        let versions = |subject: &str| format!("{base}/subjects/{subject}/versions");

        assert_eq!(
            get(&client, format!("{base}/config")).await.body,
            json!({"compatibilityLevel": "BACKWARD"})
        );
        let unset = get(&client, config("fwd-value")).await;
        assert_eq!(unset.status, 404);
        assert_eq!(
            unset.body,
            error(
                40408,
                "Subject 'fwd-value' does not have subject-level compatibility configured"
            )
        );
        assert_eq!(
            get(
                &client,
                format!("{}?defaultToGlobal=true", config("fwd-value"))
            )
            .await
            .body,
            json!({"compatibilityLevel": "BACKWARD"})
        );

        // FORWARD: V1 readers must read the new data; an added required field is fine,
        // dropping the field V1 requires is not.
        assert_eq!(
            set("fwd-value", "FORWARD").await.body,
            json!({"compatibility": "FORWARD"})
        );
        assert_eq!(
            get(&client, config("fwd-value")).await.body,
            json!({"compatibilityLevel": "FORWARD"})
        );
        registry.register("fwd-value", V1);
        assert_eq!(
            post_schema(&client, versions("fwd-value"), V2_REQUIRED)
                .await
                .body,
            json!({"id": 2})
        );
        let dropped = r#"{"type":"record","name":"Event","namespace":"dev.baton","fields":[
            {"name":"score","type":"int"}]}"#;
        assert_eq!(
            post_schema(&client, versions("fwd-value"), dropped)
                .await
                .status,
            409
        );

        // FULL: both directions against the latest version.
        set("full-value", "full").await;
        registry.register("full-value", V1);
        assert_eq!(
            post_schema(&client, versions("full-value"), V2_REQUIRED)
                .await
                .status,
            409
        );
        assert_eq!(
            post_schema(&client, versions("full-value"), V2_DEFAULT)
                .await
                .status,
            200
        );

        // Removing `id`, then bringing it back as a string: each step is
        // BACKWARD against the latest, but the last cannot read V1's data.
        let only_score = r#"{"type":"record","name":"Event","namespace":"dev.baton","fields":[
            {"name":"score","type":"int","default":0}]}"#;
        let id_as_int = r#"{"type":"record","name":"Event","namespace":"dev.baton","fields":[
            {"name":"score","type":"int","default":0},{"name":"id","type":"int","default":0}]}"#;
        for subject in ["plain-value", "transitive-value"] {
            registry.register(subject, V2_DEFAULT);
            registry.register(subject, only_score);
        }
        set("transitive-value", "BACKWARD_TRANSITIVE").await;
        assert_eq!(
            post_schema(&client, versions("plain-value"), id_as_int)
                .await
                .status,
            200
        );
        let refused = post_schema(&client, versions("transitive-value"), id_as_int).await;
        assert_eq!(refused.status, 409, "{}", refused.body);
        let checked = post_schema(
            &client,
            format!("{base}/compatibility/subjects/transitive-value/versions/latest?verbose=true"),
            id_as_int,
        )
        .await;
        assert_eq!(checked.body["is_compatible"], false);
        assert!(
            checked.body["messages"]
                .to_string()
                .contains("{oldSchemaVersion: 1}"),
            "{}",
            checked.body
        );
        // A named version is checked alone.
        let against_2 = post_schema(
            &client,
            format!("{base}/compatibility/subjects/transitive-value/versions/2"),
            id_as_int,
        )
        .await;
        assert_eq!(against_2.body, json!({"is_compatible": true}));

        // NONE accepts anything.
        set("none-value", "NONE").await;
        registry.register("none-value", V1);
        let unrelated = r#"{"type":"record","name":"Other","fields":[{"name":"x","type":"long"}]}"#;
        assert_eq!(
            post_schema(&client, versions("none-value"), unrelated)
                .await
                .status,
            200
        );

        let invalid = set("fwd-value", "SIDEWAYS").await;
        assert_eq!(invalid.status, 422);
        assert_eq!(invalid.body["error_code"], 42203);
        let global = call(
            &client,
            Method::PUT,
            format!("{base}/config"),
            Some(json!({"compatibility": "FULL_TRANSITIVE"})),
        )
        .await;
        assert_eq!(global.body, json!({"compatibility": "FULL_TRANSITIVE"}));
        assert_eq!(
            get(&client, format!("{base}/config")).await.body,
            json!({"compatibilityLevel": "FULL_TRANSITIVE"})
        );
    });
}

#[test]
fn malformed_requests_get_json_errors() {
    let registry = SchemaRegistry::start();
    let base = registry.url();
    block_on(async {
        let client = reqwest::Client::new();
        let versions = format!("{base}/subjects/events-value/versions");

        let invalid = post_schema(&client, versions.clone(), r#"{"type":"recrod"}"#).await;
        assert_eq!(invalid.status, 422);
        assert_eq!(invalid.body["error_code"], 42201);
        let not_json = post_schema(&client, versions.clone(), "not json at all").await;
        assert_eq!(not_json.body["error_code"], 42201);
        let no_schema = call(&client, Method::POST, versions.clone(), Some(json!({}))).await;
        assert_eq!(no_schema.body["error_code"], 42201);
        let protobuf = call(
            &client,
            Method::POST,
            versions.clone(),
            Some(json!({"schema": "syntax = \"proto3\";", "schemaType": "PROTOBUF"})),
        )
        .await;
        assert_eq!(protobuf.body["error_code"], 42201);

        let garbage = client
            .post(&versions)
            .header("Content-Type", "application/json")
            .body("{oops")
            .send()
            .await
            .expect("an answer");
        assert_eq!(garbage.status().as_u16(), 400);
        let text = client
            .post(&versions)
            .header("Content-Type", "text/plain")
            .body(json!({"schema": V1}).to_string())
            .send()
            .await
            .expect("an answer");
        assert_eq!(text.status().as_u16(), 415);

        let unknown = get(&client, format!("{base}/nothing/here")).await;
        assert_eq!(unknown.status, 404);
        assert_eq!(unknown.body, error(404, "HTTP 404 Not Found"));
        let wrong_method = call(&client, Method::DELETE, format!("{base}/config"), None).await;
        assert_eq!(wrong_method.status, 405);

        // Nothing above registered anything, and the server still serves.
        assert_eq!(
            get(&client, format!("{base}/subjects")).await.body,
            json!([])
        );
    });
}

#[test]
fn stop_is_a_real_outage_and_resume_keeps_the_state() {
    let registry = SchemaRegistry::start();
    let id = registry.register("events-value", V1);
    let base = registry.url();
    let address = base.trim_start_matches("http://").to_string();

    // A keep-alive connection that has been served, open across the stop.
    let mut open = TcpStream::connect(&address).expect("connect");
    open.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("a read timeout");
    write!(
        open,
        "GET /subjects HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\n\r\n"
    )
    .expect("a request");
    let mut response = [0u8; 512];
    let read = open.read(&mut response).expect("a response");
    assert!(response[..read].starts_with(b"HTTP/1.1 200"));

    registry.stop();

    match open.read(&mut response) {
        Ok(0) => {}
        Err(err) if err.kind() != ErrorKind::WouldBlock && err.kind() != ErrorKind::TimedOut => {}
        other => panic!("the open connection survived stop(): {other:?}"),
    }
    let refused = TcpStream::connect(&address).expect_err("nothing listens");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);
    block_on(async {
        let client = reqwest::Client::new();
        let err = client
            .get(format!("{base}/schemas/ids/{id}"))
            .send()
            .await
            .expect_err("the registry is down");
        assert!(err.is_connect(), "{err:?}");
    });
    // Stopping twice is harmless.
    registry.stop();

    registry.resume();
    assert_eq!(registry.url(), base);
    block_on(async {
        let client = reqwest::Client::new();
        let found = get(&client, format!("{base}/schemas/ids/{id}")).await;
        assert_eq!(found.body, json!({"schema": V1}));
        let next = post_schema(
            &client,
            format!("{base}/subjects/events-value/versions"),
            V2_DEFAULT,
        )
        .await;
        assert_eq!(next.body, json!({"id": 2}));
    });
    // Only served lookups count; the refused one never reached the registry.
    assert_eq!(registry.id_lookups(), 1);

    // Stop and resume again, as an outage test might.
    registry.stop();
    registry.resume();
    block_on(async {
        let client = reqwest::Client::new();
        let versions = get(&client, format!("{base}/subjects/events-value/versions")).await;
        assert_eq!(versions.body, json!([1, 2]));
    });
}

/// The client baton itself uses agrees with the double.
#[test]
fn schema_registry_converter_works_against_the_double() {
    use schema_registry_converter::async_impl::schema_registry::{
        SrSettings, get_all_versions, get_schema_by_id, get_schema_by_subject_and_version,
        is_compatible_schema, post_schema,
    };
    use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};

    let registry = SchemaRegistry::start();
    let settings = SrSettings::new(registry.url());
    let supplied = |text: &str| {
        SuppliedSchema::new(
            Some("dev.baton.Event".into()),
            SchemaType::Avro,
            text.into(),
        )
    };
    block_on(async {
        let first = post_schema(&settings, "events-value".into(), supplied(V1))
            .await
            .expect("registered");
        assert_eq!(first.id, 1);
        let fetched = get_schema_by_id(1, &settings).await.expect("found");
        assert_eq!(fetched.schema, V1);
        assert!(get_schema_by_id(42, &settings).await.is_err());

        assert!(
            is_compatible_schema(&settings, "events-value".into(), supplied(V2_DEFAULT))
                .await
                .expect("an answer")
        );
        assert!(
            !is_compatible_schema(&settings, "events-value".into(), supplied(V2_REQUIRED))
                .await
                .expect("an answer")
        );
        let refused = post_schema(&settings, "events-value".into(), supplied(V2_REQUIRED)).await;
        assert!(refused.is_err());

        post_schema(&settings, "events-value".into(), supplied(V2_DEFAULT))
            .await
            .expect("registered");
        assert_eq!(
            get_all_versions(&settings, "events-value".into())
                .await
                .expect("versions"),
            vec![1, 2]
        );
        let latest = get_schema_by_subject_and_version(&settings, "events-value", None)
            .await
            .expect("latest");
        assert_eq!((latest.id, latest.version), (2, Some(2)));
    });
    assert_eq!(registry.id_lookups(), 2);
}
