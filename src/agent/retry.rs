//! Bounded retries with capped exponential backoff, for the three things an
//! agent depends on: the broker, the snapshot URL and the Schema Registry.
//! Every repeat is logged and counted; nothing retries forever.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use crate::metrics::AGENTS;

/// What an agent called that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    Broker,
    Snapshot,
    Registry,
}

impl Dependency {
    /// The `dependency` label of the agent metrics.
    pub fn label(self) -> &'static str {
        match self {
            Dependency::Broker => "broker",
            Dependency::Snapshot => "snapshot",
            Dependency::Registry => "registry",
        }
    }
}

/// How often and how patiently a call is repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Calls in all, the first included (at least 1).
    pub attempts: u32,
    /// The pause after the first failure; it doubles after each one...
    pub first_backoff: Duration,
    /// ...up to this.
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// The pause after failed call number `failures` (1-based).
    pub fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(20);
        self.first_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
    }
}

/// One call's error, as the caller classifies it.
#[derive(Debug)]
pub enum Attempt<E> {
    /// An outage or a timeout: worth repeating.
    Retriable(E),
    /// Repeating cannot help (a refused signature, a schema the registry
    /// rejects): give up at once.
    Permanent(E),
}

/// Why a retried call gave up.
#[derive(Debug)]
pub struct GaveUp<E> {
    pub error: E,
    /// Calls made, the last included.
    pub attempts: u32,
    /// Whether the last error was retriable (the bound was reached) rather
    /// than permanent.
    pub exhausted: bool,
}

/// Calls `call` until it succeeds, fails permanently, or `policy.attempts`
/// calls have failed; pauses with capped exponential backoff in between.
/// Each repeat is a warning in the log and a count in
/// `baton_agent_retries_total{agent,dependency}`; giving up at the bound
/// counts in `baton_agent_retries_exhausted_total`.
pub async fn retry<T, E, F, Fut>(
    policy: RetryPolicy,
    agent: &str,
    dependency: Dependency,
    what: &str,
    mut call: F,
) -> Result<T, GaveUp<E>>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Attempt<E>>>,
{
    let attempts = policy.attempts.max(1);
    let mut failures = 0;
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(Attempt::Permanent(error)) => {
                tracing::warn!(agent, dependency = dependency.label(), what, cause = %error, "permanent error; not retrying");
                return Err(GaveUp {
                    error,
                    attempts: failures + 1,
                    exhausted: false,
                });
            }
            Err(Attempt::Retriable(error)) => {
                failures += 1;
                if failures >= attempts {
                    AGENTS
                        .retries_exhausted
                        .with_label_values(&[agent, dependency.label()])
                        .inc();
                    tracing::error!(agent, dependency = dependency.label(), what, attempts = failures, cause = %error, "still failing at the retry bound; giving up");
                    return Err(GaveUp {
                        error,
                        attempts: failures,
                        exhausted: true,
                    });
                }
                let pause = policy.backoff(failures);
                AGENTS
                    .retries
                    .with_label_values(&[agent, dependency.label()])
                    .inc();
                tracing::warn!(agent, dependency = dependency.label(), what, attempt = failures, pause_ms = pause.as_millis() as u64, cause = %error, "retriable error; retrying");
                tokio::time::sleep(pause).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn policy(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(4),
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let policy = RetryPolicy {
            attempts: 10,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
        };
        let pauses: Vec<u128> = (1..=6).map(|n| policy.backoff(n).as_millis()).collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(policy.backoff(u32::MAX).as_millis(), 1000);
    }

    #[tokio::test]
    async fn repeats_a_retriable_error_until_it_succeeds() {
        let calls = Cell::new(0);
        let before = AGENTS
            .retries
            .with_label_values(&["test-a", "snapshot"])
            .get();
        let outcome = retry(policy(5), "test-a", Dependency::Snapshot, "fetch", || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                if n < 3 {
                    Err(Attempt::Retriable("down"))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(outcome.ok(), Some(3));
        let after = AGENTS
            .retries
            .with_label_values(&["test-a", "snapshot"])
            .get();
        assert_eq!(after - before, 2, "two repeats counted");
    }

    #[tokio::test]
    async fn gives_up_at_the_bound_and_at_once_on_a_permanent_error() {
        let calls = Cell::new(0);
        let outcome: Result<(), _> = retry(policy(4), "test-b", Dependency::Broker, "send", || {
            calls.set(calls.get() + 1);
            async { Err(Attempt::Retriable("down")) }
        })
        .await;
        let gave_up = outcome.expect_err("gives up");
        assert!(gave_up.exhausted);
        assert_eq!((gave_up.attempts, calls.get()), (4, 4));
        assert_eq!(
            AGENTS
                .retries_exhausted
                .with_label_values(&["test-b", "broker"])
                .get(),
            1
        );

        calls.set(0);
        let outcome: Result<(), _> =
            retry(policy(4), "test-b", Dependency::Registry, "find", || {
                calls.set(calls.get() + 1);
                async { Err(Attempt::Permanent("rejected")) }
            })
            .await;
        let gave_up = outcome.expect_err("gives up");
        assert!(!gave_up.exhausted);
        assert_eq!(calls.get(), 1);
    }
}
