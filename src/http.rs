//! The HTTP surface: `/metrics`, `/healthz`, `/readyz`, `/contexts/{id}`.
//!
//! Errors are JSON with a code and a message, so agents and operators can
//! act on them without scraping text.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use crate::metrics;
use crate::runtime::Readiness;
use crate::shutdown::Shutdown;
use crate::state::OpenStores;
use crate::workflow::WorkflowState;

pub type HttpResponse = Response<Full<Bytes>>;

/// State every request handler can see.
pub struct HttpState {
    pub readiness: Arc<Readiness>,
    pub stores: Arc<OpenStores>,
}

/// Binds `addr` (so a taken port fails start-up loudly) and returns the
/// bound address and the serving future.
pub async fn bind(
    addr: SocketAddr,
    state: Arc<HttpState>,
    shutdown: Shutdown,
) -> std::io::Result<(SocketAddr, impl Future<Output = ()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((bound, serve(listener, state, shutdown)))
}

async fn serve(listener: TcpListener, state: Arc<HttpState>, shutdown: Shutdown) {
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.wait() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(cause = %err, "accept failed");
                    continue;
                }
            },
        };
        let state = Arc::clone(&state);
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let service = service_fn(move |request| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(route(&state, request).await) }
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(err) = result {
                        tracing::debug!(cause = %err, "http connection ended with an error");
                    }
                }
                _ = shutdown.wait() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
}

async fn route(state: &HttpState, request: Request<Incoming>) -> HttpResponse {
    if request.method() != Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "only GET is supported",
        );
    }
    match request.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics::render(),
        ),
        "/healthz" => json_response(StatusCode::OK, &json!({"status": "alive"})),
        "/readyz" => {
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
        path => match path.strip_prefix("/contexts/") {
            Some(id) if !id.is_empty() && !id.contains('/') => context(state, id),
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no route for {path}"),
            ),
        },
    }
}

/// The committed workflow state of a context this pod owns.
fn context(state: &HttpState, raw_id: &str) -> HttpResponse {
    // Context ids may hold any character; clients percent-encode them.
    let id = percent_encoding::percent_decode_str(raw_id)
        .decode_utf8_lossy()
        .into_owned();
    match state.stores.get(&id) {
        Ok(Some((partition, bytes))) => match WorkflowState::decode(&bytes) {
            Ok(workflow_state) => match serde_json::to_value(&workflow_state) {
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
            &format!("no workflow state for context `{id}` on this pod"),
        ),
        Err(err) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "state_store",
            &err.to_string(),
        ),
    }
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
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A GET with hyper's client: (status, body). For `baton state get` and
/// forwarding between pods.
pub async fn get(url: &str) -> Result<(u16, String), HttpClientError> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|err: hyper::http::uri::InvalidUri| HttpClientError(format!("{url}: {err}")))?;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let response = tokio::time::timeout(std::time::Duration::from_secs(10), client.get(uri))
        .await
        .map_err(|_| HttpClientError(format!("{url}: timed out")))?
        .map_err(|err| HttpClientError(format!("{url}: {err}")))?;
    let status = response.status().as_u16();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .map_err(|err| HttpClientError(format!("{url}: {err}")))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[derive(Debug, thiserror::Error)]
#[error("http request failed: {0}")]
pub struct HttpClientError(String);
