//! Retries of whole store operations on transient errors.
//!
//! Cloud backends also retry each HTTP request inside `object_store` (configured from the same
//! [`RetryPolicy`]); this layer covers every backend, including local files, and operations whose
//! payload can be replayed (puts of in-memory bytes, gets, heads, lists, deletes, copies). A streaming
//! multipart upload cannot be replayed: a part that still fails after the client's retries aborts it.

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
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        Self {
            max_retries: 0,
            ..Self::default()
        }
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
            retry_timeout: Duration::from_secs(180),
        }
    }

    /// Runs `op` until it succeeds, fails permanently, or the retries are spent.
    pub(crate) async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> object_store::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = object_store::Result<T>>,
    {
        let mut attempt = 0;
        loop {
            match op().await {
                Err(e) if is_transient(&e) && attempt < self.max_retries => {
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
        };
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(3), Duration::from_millis(400));
        assert_eq!(p.backoff(4), Duration::from_millis(500));
        assert_eq!(p.backoff(60), Duration::from_millis(500));
    }
}
