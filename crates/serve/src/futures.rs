//! The SDK's futures: every training call answers at once with a request id, and the client
//! long-polls `retrieve_future` for its outcome. [`Futures`] keeps each request's outcome (pending
//! until the trainer posts it) and lets a poll wait for it a bounded time; an outcome is kept a
//! minute after a poll took it (a client whose answer was lost in transit polls again), ten
//! minutes when no poll came, then dropped — outcomes (log-probs, samples) can be large, and a
//! week-long loop makes many.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How long an outcome no poll took is kept after it is posted.
const KEPT_FOR: Duration = Duration::from_secs(600);

/// How long an outcome is kept after a poll took it.
const KEPT_AFTER_TAKEN: Duration = Duration::from_secs(60);

/// What a request came to.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// A JSON result.
    Json(serde_json::Value),
    /// A protobuf result (`forward`, `forward_backward`, sampling).
    Proto(Vec<u8>),
    /// It failed; `category` is `user` (the request was wrong) or `server`.
    Failed { error: String, category: Category },
}

/// Whose fault a failed request was, as the SDK's `RequestFailedResponse` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Category {
    User,
    Server,
}

impl Category {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Category::User => "user",
            Category::Server => "server",
        }
    }
}

struct Entry {
    outcome: watch::Sender<Option<Arc<Outcome>>>,
    posted: Option<Instant>,
    /// When a poll first took the outcome.
    taken: Option<Instant>,
}

impl Entry {
    /// Whether it is still kept.
    fn kept(&self) -> bool {
        kept(
            self.posted.map(|t| t.elapsed()),
            self.taken.map(|t| t.elapsed()),
        )
    }
}

/// Whether an outcome posted `posted` ago (`None`: pending) and first taken by a poll `taken` ago
/// is still kept.
fn kept(posted: Option<Duration>, taken: Option<Duration>) -> bool {
    match (posted, taken) {
        (None, _) => true,
        (Some(_), Some(taken)) => taken < KEPT_AFTER_TAKEN,
        (Some(posted), None) => posted < KEPT_FOR,
    }
}

/// Every request's outcome, by request id.
#[derive(Default)]
pub(crate) struct Futures {
    entries: Mutex<HashMap<String, Entry>>,
    next: AtomicU64,
}

/// What a poll found.
#[derive(Debug, PartialEq)]
pub(crate) enum Polled {
    /// The outcome.
    Done(Arc<Outcome>),
    /// Not yet, after the wait.
    Pending,
    /// No such request (never made, or dropped long after its outcome).
    Unknown,
}

impl Futures {
    /// A new pending request; its id.
    pub(crate) fn open(&self) -> String {
        let id = format!("req-{}", self.next.fetch_add(1, Ordering::Relaxed) + 1);
        let (outcome, _) = watch::channel(None);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        // Outcomes taken or long posted are dropped as new requests come.
        entries.retain(|_, e| e.kept());
        entries.insert(
            id.clone(),
            Entry {
                outcome,
                posted: None,
                taken: None,
            },
        );
        id
    }

    /// Posts the outcome of request `id` (once; a second is ignored).
    pub(crate) fn post(&self, id: &str, outcome: Outcome) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = entries.get_mut(id) {
            if e.posted.is_none() {
                e.posted = Some(Instant::now());
                e.outcome.send_replace(Some(Arc::new(outcome)));
            }
        }
    }

    /// The outcome of request `id`, waiting for it at most `wait`.
    pub(crate) async fn poll(&self, id: &str, wait: Duration) -> Polled {
        let mut rx = {
            let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            match entries.get(id) {
                Some(e) => e.outcome.subscribe(),
                None => return Polled::Unknown,
            }
        };
        let ready = tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await;
        // The channel's guard is let go before the entries are locked (post locks them first).
        let outcome = match ready {
            Ok(Ok(guard)) => guard.clone().expect("waited for Some"),
            _ => return Polled::Pending,
        };
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = entries.get_mut(id) {
            e.taken.get_or_insert_with(Instant::now);
        }
        Polled::Done(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_is_kept_a_minute_once_taken_ten_untaken() {
        let ago = |s: u64| Some(Duration::from_secs(s));
        assert!(kept(None, None), "pending");
        assert!(kept(ago(500), None), "posted, not taken yet");
        assert!(
            !kept(ago(700), None),
            "never taken: dropped after ten minutes"
        );
        assert!(kept(ago(500), ago(30)), "taken: a retry may come");
        assert!(!kept(ago(100), ago(90)), "taken a minute ago: dropped");
    }

    #[tokio::test]
    async fn a_poll_waits_for_the_outcome_a_bounded_time() {
        let f = Arc::new(Futures::default());
        let id = f.open();
        assert_eq!(
            f.poll(&id, Duration::from_millis(20)).await,
            Polled::Pending
        );
        let poster = {
            let (f, id) = (f.clone(), id.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                f.post(&id, Outcome::Json(serde_json::json!({"metrics": {}})));
                f.post(&id, Outcome::Proto(vec![1]));
            })
        };
        let got = f.poll(&id, Duration::from_secs(5)).await;
        poster.await.unwrap();
        let want = Outcome::Json(serde_json::json!({"metrics": {}}));
        assert_eq!(
            got,
            Polled::Done(Arc::new(want.clone())),
            "the first outcome stays"
        );
        assert_eq!(
            f.poll(&id, Duration::ZERO).await,
            Polled::Done(Arc::new(want))
        );
        assert_eq!(f.poll("req-x", Duration::ZERO).await, Polled::Unknown);
        assert_ne!(f.open(), id, "ids are not reused");
    }
}
