//! Fetching a handover's memory snapshot from its signed URL.
//!
//! The URL carries its own signature and expiry (`?exp=...&sig=...`), so an
//! agent needs no bearer token for it; whichever baton pod the URL names
//! answers, forwarding to the pod that owns the context.

use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

use super::retry::Attempt;

/// Why a snapshot could not be had.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// The pod could not be reached, timed out, or answered 5xx/429: an
    /// outage to wait out.
    #[error("snapshot unavailable: {0}")]
    Unavailable(String),
    /// The pod refused the URL (expired, bad signature) or has no such
    /// snapshot: asking again will not help; a retry of the step brings a
    /// fresh URL.
    #[error("snapshot refused: {0}")]
    Refused(String),
    /// The answer was larger than the agent accepts, or not JSON.
    #[error("snapshot unreadable: {0}")]
    Unreadable(String),
}

impl SnapshotError {
    pub fn into_attempt(self) -> Attempt<SnapshotError> {
        match self {
            SnapshotError::Unavailable(_) => Attempt::Retriable(self),
            SnapshotError::Refused(_) | SnapshotError::Unreadable(_) => Attempt::Permanent(self),
        }
    }
}

/// An HTTP client for snapshot URLs with a per-request timeout and a bound on
/// the body it reads.
#[derive(Clone)]
pub struct SnapshotClient {
    http: reqwest::Client,
    max_bytes: usize,
}

impl SnapshotClient {
    pub fn new(timeout: Duration, max_bytes: usize) -> Result<SnapshotClient, String> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|err| format!("cannot build the snapshot HTTP client: {err}"))?;
        Ok(SnapshotClient { http, max_bytes })
    }

    /// One GET of `url`, classified.
    pub async fn fetch(&self, url: &str) -> Result<Value, SnapshotError> {
        let mut response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|err| SnapshotError::Unavailable(without_query(&err.to_string())))?;
        let status = response.status();
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(SnapshotError::Unavailable(format!("HTTP {status}")));
        }
        if !status.is_success() {
            let body = read_bounded(&mut response, 512).await.unwrap_or_default();
            return Err(SnapshotError::Refused(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        if let Some(length) = response.content_length()
            && length > self.max_bytes as u64
        {
            return Err(SnapshotError::Unreadable(format!(
                "{length} bytes, more than the {} accepted",
                self.max_bytes
            )));
        }
        let body = read_bounded(&mut response, self.max_bytes)
            .await
            .map_err(|err| SnapshotError::Unavailable(without_query(&err)))?;
        if body.len() > self.max_bytes {
            return Err(SnapshotError::Unreadable(format!(
                "more than the {} bytes accepted",
                self.max_bytes
            )));
        }
        serde_json::from_slice(&body)
            .map_err(|err| SnapshotError::Unreadable(format!("not JSON: {err}")))
    }
}

/// Reads the body up to `limit + 1` bytes (one more tells the caller it was
/// too long), never more.
async fn read_bounded(response: &mut reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|err| err.to_string())? {
        let room = (limit + 1).saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() > limit {
            break;
        }
    }
    Ok(body)
}

/// reqwest's errors quote the URL; its query holds the signature, which has
/// no business in a log line.
fn without_query(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('?') {
        out.push_str(&rest[..at]);
        out.push_str("?...");
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| c.is_whitespace() || c == ')' || c == '"')
            .unwrap_or(tail.len());
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_stay_out_of_error_texts() {
        let text = "error sending request for url (http://127.0.0.1:1/contexts/c/snapshots/2?exp=9&sig=abc)";
        let cleaned = without_query(text);
        assert!(!cleaned.contains("sig=abc"), "{cleaned}");
        assert!(
            cleaned.contains("/contexts/c/snapshots/2?...)"),
            "{cleaned}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_pod_is_retriable_and_a_refusal_is_not() {
        let client = SnapshotClient::new(Duration::from_millis(500), 1024).expect("client");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port");
        // Nothing listens on the port now.
        let err = client
            .fetch(&format!(
                "http://127.0.0.1:{port}/contexts/c/snapshots/1?exp=1&sig=00"
            ))
            .await
            .expect_err("unreachable");
        assert!(matches!(err.into_attempt(), Attempt::Retriable(_)));
        assert!(matches!(
            SnapshotError::Refused("HTTP 403".into()).into_attempt(),
            Attempt::Permanent(_)
        ));
    }
}
