//! The one retry budget of every storage call, stated once.
//!
//! A [`RetryPolicy`] says how long a transient failure is retried and how long one request may take.
//! Its unit is time, not a count: a transient failure (connection refused or reset, a timeout, a 5xx,
//! 429/503 SlowDown) is retried with capped exponential back-off and jitter until the deadline has
//! passed since the call's first try, however many tries that takes. A two-second server restart
//! costs a few tries; an S3 SlowDown burst, as many as it needs within the deadline.
//!
//! Where the retries happen:
//! - cloud backends (S3, GCS, Azure): inside `object_store`'s HTTP client ([`RetryPolicy::to_client_config`]:
//!   unbounded count, `retry_timeout` = the deadline, decorrelated jitter), which also bounds each
//!   request. That client leaves alone what it cannot know is safe to repeat: a request that was sent
//!   and then lost (timed out, reset) when the HTTP method is not idempotent (the `DELETE` of an
//!   object, the `POST ?delete` of a batch, a create-only `PUT`). [`RetryPolicy::run`] around each
//!   store call retries exactly those — every store call is safe to repeat: deletes and overwrites
//!   are idempotent, and a repeated create-only put is settled by reading back what is there
//!   ([`crate::Store::put_create`]) — within the same deadline, measured from the same first try, and
//!   the whole call is cut at the deadline plus one request timeout. So one budget, never stacked.
//! - local backends (files, memory): [`RetryPolicy::run`] around each operation retries every
//!   transient (I/O) error until the deadline.
//!
//! Defaults: back-off from 100 ms doubling, jittered, no wait longer than 5 s; no retry started later than
//! 60 s after the first try; 30 s per request, 5 s to connect. So a frozen or unreachable endpoint
//! fails a storage call within 90 s (deadline + one request timeout), and anything shorter than the
//! deadline is ridden out. `WAYPOINT_STORAGE_TIMEOUT_SECS` (per request) and
//! `WAYPOINT_STORAGE_RETRY_SECS` (the deadline) override them ([`RetryPolicy::from_env`]).

use std::future::Future;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};

/// How patiently to retry a transient failure, and how long one request may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Wait before the first retry; doubled after each further one (with jitter).
    pub initial_backoff: Duration,
    /// The longest wait between two tries.
    pub max_backoff: Duration,
    /// No retry starts later than this after the first try; zero disables retrying.
    pub deadline: Duration,
    /// The longest one request may take, from connecting to the last byte (cloud backends).
    pub request_timeout: Duration,
    /// The longest connecting may take (cloud backends).
    pub connect_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
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

/// The bounds of both settings, in seconds.
const SECS_RANGE: std::ops::RangeInclusive<u64> = 1..=86_400;

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        Self {
            deadline: Duration::ZERO,
            ..Self::default()
        }
    }

    /// The defaults, with [`TIMEOUT_ENV`] and [`RETRY_ENV`] applied when set (whole seconds, 1 to
    /// 86400).
    pub fn from_env() -> Result<Self, String> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The defaults, with the settings `var` gives applied.
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut p = Self::default();
        let secs = |name: &str| -> Result<Option<Duration>, String> {
            match var(name) {
                None => Ok(None),
                Some(v) => match v.trim().parse::<u64>() {
                    Ok(n) if SECS_RANGE.contains(&n) => Ok(Some(Duration::from_secs(n))),
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
            // A short deadline keeps its back-off short too, so it still gets several tries.
            p.max_backoff = p.max_backoff.min(d / 4).max(p.initial_backoff);
        }
        Ok(p)
    }

    /// The longest a storage call can take before it fails: the deadline plus one request.
    pub fn give_up_after(&self) -> Duration {
        self.deadline + self.request_timeout
    }

    /// The equivalent `object_store` client configuration, for backends that speak HTTP: the count
    /// is unbounded, the deadline ends the retries.
    pub fn to_client_config(self) -> object_store::RetryConfig {
        object_store::RetryConfig {
            backoff: object_store::BackoffConfig {
                init_backoff: self.initial_backoff,
                max_backoff: self.max_backoff,
                base: 2.0,
            },
            max_retries: if self.deadline.is_zero() {
                0
            } else {
                usize::MAX
            },
            retry_timeout: self.deadline,
        }
    }

    /// The `object_store` HTTP client's timeouts.
    pub fn to_client_options(self) -> object_store::ClientOptions {
        object_store::ClientOptions::new()
            .with_timeout(self.request_timeout)
            .with_connect_timeout(self.connect_timeout)
    }

    /// The back-off between tries: exponential from `initial_backoff`, with jitter (each wait is
    /// its delay plus up to as much again), at most `max_backoff`, unbounded in count (the deadline
    /// ends it).
    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.initial_backoff)
            .with_max_delay((self.max_backoff / 2).max(self.initial_backoff))
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
    }

    /// Runs `op` until it succeeds, fails with an answer (not transient), or the deadline since the
    /// first try has passed. `client_retries` says the backend's HTTP client already retried what it
    /// could (then only the transport failures it left alone are retried here, and the whole call is
    /// cut at [`RetryPolicy::give_up_after`]).
    pub(crate) async fn run<T, F, Fut>(
        &self,
        what: &str,
        client_retries: bool,
        op: F,
    ) -> object_store::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = object_store::Result<T>>,
    {
        let started = Instant::now();
        let deadline = self.deadline;
        let tries = op
            .retry(self.backoff().build())
            .sleep(tokio::time::sleep)
            .when(|e| {
                let retry = if client_retries {
                    is_lost_request(e)
                } else {
                    is_transient(e)
                };
                retry && started.elapsed() < deadline
            })
            .notify(|e, wait| {
                tracing::warn!(%e, ?wait, elapsed = ?started.elapsed(), "{what}: transient storage error, retrying");
            });
        if !client_retries {
            return tries.await;
        }
        let limit = self.give_up_after();
        match tokio::time::timeout(limit, tries).await {
            Ok(result) => result,
            Err(_) => Err(object_store::Error::Generic {
                store: "waypoint",
                source: format!(
                    "{what} gave up: no answer within the retry deadline ({deadline:?}) plus one request timeout ({:?})",
                    self.request_timeout
                )
                .into(),
            }),
        }
    }
}

/// Whether an error may go away on its own (network, server errors, an interrupted or timed-out
/// I/O) rather than being an answer (not found, already exists, refused, unsupported) or a lasting
/// local condition (a directory where a file goes, no permission, no space).
pub fn is_transient(e: &object_store::Error) -> bool {
    if is_lost_request(e) {
        return true;
    }
    if !matches!(e, object_store::Error::Generic { .. }) {
        return false;
    }
    // A local file error is transient only when its kind says so.
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return transient_io(io);
        }
        current = err.source();
    }
    true
}

/// I/O errors that a retry may see go away: interrupted, would block, timed out, a connection
/// dropped (network file systems), EIO / EBUSY / ESTALE, and a folder removed while a file was
/// being written into it (the write's rename finds no directory: the retried write recreates it;
/// a missing object is `NotFound`, not a local I/O error, so reads are not retried for it).
fn transient_io(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::NotFound
            | K::Interrupted
            | K::WouldBlock
            | K::TimedOut
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::ConnectionRefused
            | K::BrokenPipe
            | K::UnexpectedEof
    ) || matches!(e.raw_os_error(), Some(5 | 16 | 116))
}

/// Whether an error of a cloud backend is a transport failure: the request may not have reached the
/// server, or its answer was lost (connection refused or reset, timed out, cut short). Answers the
/// server gave (4xx statuses, retried 5xx past the deadline) are not.
fn is_lost_request(e: &object_store::Error) -> bool {
    if matches!(e, object_store::Error::JoinError { .. }) {
        return true;
    }
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if err.is::<object_store::client::HttpError>() {
            return true;
        }
        current = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_grows_to_its_cap_and_never_runs_out() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
            ..RetryPolicy::default()
        };
        let waits: Vec<Duration> = p.backoff().build().take(200).collect();
        assert_eq!(waits.len(), 200, "the count never runs out");
        // Jitter adds up to one more delay to each wait; no wait is longer than the cap.
        assert!(waits
            .iter()
            .all(|w| *w >= Duration::from_millis(100) && *w <= Duration::from_millis(500)));
        assert!(waits[0] <= Duration::from_millis(200));
        assert!(waits[150] >= Duration::from_millis(250), "{:?}", waits[150]);
    }

    #[test]
    fn the_client_counts_nothing_and_stops_at_the_deadline() {
        let c = RetryPolicy::default().to_client_config();
        assert_eq!(c.max_retries, usize::MAX);
        assert_eq!(c.retry_timeout, Duration::from_secs(60));
        assert_eq!(RetryPolicy::none().to_client_config().max_retries, 0);
    }

    #[test]
    fn settings_are_bounded_and_a_short_deadline_shortens_the_backoff() {
        let vars = |t: &'static str, r: &'static str| {
            move |name: &str| match name {
                TIMEOUT_ENV => Some(t.to_string()),
                RETRY_ENV => Some(r.to_string()),
                _ => None,
            }
        };
        let p = RetryPolicy::from_vars(vars("3", "8")).unwrap();
        assert_eq!(p.request_timeout, Duration::from_secs(3));
        assert_eq!(p.connect_timeout, Duration::from_secs(3));
        assert_eq!(p.deadline, Duration::from_secs(8));
        assert_eq!(p.max_backoff, Duration::from_secs(2));
        assert_eq!(p.give_up_after(), Duration::from_secs(11));
        for bad in ["0", "86401", "x", "-1"] {
            let e = RetryPolicy::from_vars(vars("3", bad)).unwrap_err();
            assert!(e.contains(RETRY_ENV), "{e}");
        }
        assert_eq!(
            RetryPolicy::from_vars(|_| None).unwrap(),
            RetryPolicy::default()
        );
    }

    #[test]
    fn lasting_local_conditions_are_answers_not_transient() {
        let local = |kind: std::io::ErrorKind| object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(std::io::Error::from(kind)),
        };
        assert!(!is_transient(&local(std::io::ErrorKind::IsADirectory)));
        assert!(!is_transient(&local(std::io::ErrorKind::PermissionDenied)));
        assert!(is_transient(&local(std::io::ErrorKind::Interrupted)));
        // The folder a write was renaming into was removed (a run folder deleted mid-run).
        assert!(is_transient(&local(std::io::ErrorKind::NotFound)));
        assert!(is_transient(&local(std::io::ErrorKind::TimedOut)));
        assert!(is_transient(&object_store::Error::Generic {
            store: "s3",
            source: "a server error".into(),
        }));
    }

    #[tokio::test]
    async fn a_transient_failure_is_retried_until_the_deadline_not_a_count() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
            deadline: Duration::from_millis(1500),
            ..RetryPolicy::default()
        };
        // Forty failures in a row — eight times the old count of five — are ridden out.
        let mut tries = 0u32;
        let out = p
            .run("op", false, || {
                tries += 1;
                let failing = tries <= 40;
                async move {
                    if failing {
                        Err(object_store::Error::Generic {
                            store: "test",
                            source: "refused".into(),
                        })
                    } else {
                        Ok(7)
                    }
                }
            })
            .await;
        assert_eq!(out.unwrap(), 7);
        assert_eq!(tries, 41);
        // Failing for ever ends soon after the deadline, with the error.
        let started = Instant::now();
        let out: object_store::Result<()> = p
            .run("op", false, || async {
                Err(object_store::Error::Generic {
                    store: "test",
                    source: "refused".into(),
                })
            })
            .await;
        assert!(out.is_err());
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1500) && took < Duration::from_millis(2500),
            "{took:?}"
        );
        // An answer is not retried.
        let mut tries = 0;
        let out: object_store::Result<()> = p
            .run("op", false, || {
                tries += 1;
                async {
                    Err(object_store::Error::NotFound {
                        path: "k".into(),
                        source: "absent".into(),
                    })
                }
            })
            .await;
        assert!(matches!(out, Err(object_store::Error::NotFound { .. })));
        assert_eq!(tries, 1);
    }
}
