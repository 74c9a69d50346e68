//! The one retry budget of every storage call, stated once.
//!
//! A [`RetryPolicy`] says how often and for how long a transient failure is retried, and how long one
//! request may take. It is applied in exactly one place per backend, never stacked: cloud backends
//! (S3, GCS, Azure) retry inside `object_store`'s HTTP client, which also bounds each request
//! (connect, first byte, whole request); other backends (local files, memory) are retried by
//! [`RetryPolicy::run`] around each whole operation. So a frozen or unreachable endpoint ends every
//! storage call within the retry deadline plus one request timeout and one back-off.
//!
//! Defaults: 5 retries, back-off 100 ms doubling to 10 s, no retry started later than 60 s after the
//! first try, 30 s per request, 5 s to connect. `WAYPOINT_STORAGE_TIMEOUT_SECS` (per request) and
//! `WAYPOINT_STORAGE_RETRY_SECS` (the retry deadline) override them ([`RetryPolicy::from_env`]).

use std::future::Future;
use std::time::Duration;

/// How often and how patiently to retry a transient failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try; 0 disables retrying.
    pub max_retries: u32,
    /// Wait before the first retry; doubled after each further one.
    pub initial_backoff: Duration,
    /// The longest wait between two tries.
    pub max_backoff: Duration,
    /// No retry starts later than this after the first try.
    pub deadline: Duration,
    /// The longest one request may take, from connecting to the last byte (cloud backends).
    pub request_timeout: Duration,
    /// The longest connecting may take (cloud backends).
    pub connect_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            deadline: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Environment variable: seconds one storage request may take.
pub const TIMEOUT_ENV: &str = "WAYPOINT_STORAGE_TIMEOUT_SECS";
/// Environment variable: seconds after the first try past which no retry starts.
pub const RETRY_ENV: &str = "WAYPOINT_STORAGE_RETRY_SECS";

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        Self {
            max_retries: 0,
            ..Self::default()
        }
    }

    /// The defaults, with [`TIMEOUT_ENV`] and [`RETRY_ENV`] applied when set (whole seconds, ≥ 1).
    pub fn from_env() -> Result<Self, String> {
        let mut p = Self::default();
        let secs = |name: &str| -> Result<Option<Duration>, String> {
            match std::env::var(name) {
                Err(_) => Ok(None),
                Ok(v) => match v.trim().parse::<u64>() {
                    Ok(n) if (1..=86_400).contains(&n) => Ok(Some(Duration::from_secs(n))),
                    _ => Err(format!("{name}={v:?}: give whole seconds from 1 to 86400")),
                },
            }
        };
        if let Some(t) = secs(TIMEOUT_ENV)? {
            p.request_timeout = t;
            p.connect_timeout = p.connect_timeout.min(t);
        }
        if let Some(d) = secs(RETRY_ENV)? {
            p.deadline = d;
        }
        Ok(p)
    }

    /// The wait before retry number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }

    /// The equivalent `object_store` client configuration, for backends that speak HTTP.
    pub fn to_client_config(self) -> object_store::RetryConfig {
        object_store::RetryConfig {
            backoff: object_store::BackoffConfig {
                init_backoff: self.initial_backoff,
                max_backoff: self.max_backoff,
                base: 2.0,
            },
            max_retries: self.max_retries as usize,
            retry_timeout: self.deadline,
        }
    }

    /// The `object_store` HTTP client's timeouts.
    pub fn to_client_options(self) -> object_store::ClientOptions {
        object_store::ClientOptions::new()
            .with_timeout(self.request_timeout)
            .with_connect_timeout(self.connect_timeout)
    }

    /// Runs `op` until it succeeds, fails permanently, or the retries are spent.
    pub(crate) async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> object_store::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = object_store::Result<T>>,
    {
        let mut attempt = 0;
        let started = std::time::Instant::now();
        loop {
            match op().await {
                Err(e)
                    if is_transient(&e)
                        && attempt < self.max_retries
                        && started.elapsed() < self.deadline =>
                {
                    attempt += 1;
                    let wait = self.backoff(attempt);
                    tracing::warn!(%e, attempt, ?wait, "{what}: transient storage error, retrying");
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }
}

/// Whether an error may go away on its own (I/O, network, server errors) rather than being an answer
/// (not found, already exists, refused, unsupported).
pub fn is_transient(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy {
            max_retries: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
            ..RetryPolicy::default()
        };
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(3), Duration::from_millis(400));
        assert_eq!(p.backoff(4), Duration::from_millis(500));
        assert_eq!(p.backoff(60), Duration::from_millis(500));
    }
}
