//! The listening side of the HTTP surface, with every resource bounded: open
//! connections (503 past the cap), the time to send a request head, the time
//! a connection may move no bytes at all, and the pace of `accept` retries
//! when the process runs out of file descriptors. File descriptors are shared
//! with RocksDB and librdkafka: an HTTP flood must not starve them.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::HttpState;
use crate::metrics::GUARDS;

/// hyper's read and write buffer limit per connection (request heads larger
/// than this are refused).
const CONNECTION_BUFFER: usize = 64 * 1024;
/// After a failed `accept`, wait this long before the next, doubling up to
/// [`ACCEPT_BACKOFF_MAX`]: EMFILE does not clear by retrying in a loop, and a
/// spinning loop would take the CPU the partitions need.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// What a connection past the cap is told before it is closed.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 87\r\n\r\n{\"error\":{\"code\":\"too_many_connections\",\"message\":\"the pod serves as many as it can\"}}\n";

/// Bounds of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// How long a client may take to send a request head, counted from when
    /// the connection is ready for one (so it also ends a keep-alive
    /// connection left idle that long).
    pub header_read_timeout: Duration,
    /// How long a connection may move no bytes in either direction, e.g. one
    /// whose client stopped reading its response.
    pub idle_timeout: Duration,
    /// Open connections on this listener; past it, 503 and close.
    pub max_connections: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
        }
    }
}

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The whole surface.
    Surface,
    /// `--metrics-addr`: `/metrics`, `/healthz` and `/readyz` only, for
    /// scrapers and probes, with its own connection cap so a flood of the
    /// surface does not fail the pod's probes.
    Metrics,
}

pub(super) async fn serve(listener: TcpListener, state: Arc<HttpState>, kind: Listener) {
    let shutdown = state.shutdown.clone();
    let limits = state.guards.limits;
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = tokio_util::task::TaskTracker::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let stream = tokio::select! {
            _ = shutdown.wait() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    stream
                }
                Err(err) => {
                    GUARDS.http_accept_errors.inc();
                    tracing::warn!(cause = %err, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                    tokio::select! {
                        _ = shutdown.wait() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            // One non-blocking write into an empty send buffer, then close:
            // a refused client can hold nothing of ours.
            GUARDS.http_connections_refused.inc();
            let _ = stream.try_write(REFUSAL);
            continue;
        };
        let state = Arc::clone(&state);
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            GUARDS.http_connections.inc();
            connection(stream, state, kind, limits, shutdown).await;
            GUARDS.http_connections.dec();
            drop(permit);
        });
    }
    connections.close();
    connections.wait().await;
}

async fn connection(
    stream: TcpStream,
    state: Arc<HttpState>,
    kind: Listener,
    limits: ServerLimits,
    shutdown: crate::shutdown::Shutdown,
) {
    let activity = Arc::new(Activity::new());
    let io = Tracked {
        inner: stream,
        activity: Arc::clone(&activity),
    };
    let service = service_fn(move |request| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(super::route(&state, kind, request).await) }
    });
    // hyper buffers up to ~400 KiB per connection by default; a live-feed
    // client's backlog belongs in Kafka, not in memory. Its header timeout
    // needs a timer, without which it is silently off.
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(CONNECTION_BUFFER)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(err) = result {
                if err.is_timeout() {
                    GUARDS.http_connections_cut.with_label_values(&["header_timeout"]).inc();
                }
                tracing::debug!(cause = %err, "http connection ended with an error");
            }
        }
        _ = activity.idle_for(limits.idle_timeout) => {
            GUARDS.http_connections_cut.with_label_values(&["idle"]).inc();
            tracing::debug!(idle_timeout_ms = limits.idle_timeout.as_millis() as u64, "http connection idle; closed");
        }
        _ = shutdown.wait() => {
            // Live feeds end on shutdown too, so this does not hang.
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(limits.idle_timeout, connection).await;
        }
    }
}

/// When a connection last moved a byte, in milliseconds since it opened.
struct Activity {
    opened: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = self.opened.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(now, Ordering::Relaxed);
    }

    /// Resolves once no byte has moved for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let quiet = self.opened.elapsed().saturating_sub(last);
            if quiet >= limit {
                return;
            }
            tokio::time::sleep(limit - quiet).await;
        }
    }
}

/// A stream that notes every byte it moves, for the idle timeout.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_refusal_is_a_whole_http_response() {
        let text = std::str::from_utf8(super::REFUSAL).expect("ascii");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length: "))
            .and_then(|n| n.parse().ok())
            .expect("content-length");
        assert_eq!(body.len(), length);
        serde_json::from_str::<serde_json::Value>(body).expect("JSON body");
    }
}
