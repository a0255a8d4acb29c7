//! One shutdown signal for the whole process.
//!
//! SIGTERM (what Kubernetes sends) and Ctrl-C both trigger it; every long-lived
//! task selects on it so the open transaction can finish before exit.

use tokio_util::sync::CancellationToken;

/// A cloneable handle: `trigger` once, every `wait` returns.
#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn trigger(&self) {
        self.token.cancel();
    }

    pub async fn wait(&self) {
        self.token.cancelled().await;
    }

    /// For loops on blocking threads, which cannot await `wait`.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Triggers on SIGTERM or Ctrl-C. Spawned once by `main`.
    pub fn listen_for_signals(&self) {
        let shutdown = self.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested; finishing the open transaction");
            shutdown.trigger();
        });
    }
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut sigterm) => {
            tokio::select! {
                _ = sigterm.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(err) => {
            tracing::warn!(cause = %err, "cannot listen for SIGTERM; only Ctrl-C stops baton");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
