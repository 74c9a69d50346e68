//! Goodput: how much of a run's wall time went into steps whose work was kept, and what failures
//! cost it — attempts, steps redone, seconds lost to down time, recovery and redone work.
//!
//! Pure accounting, carried from attempt to attempt in `logs/progress.json` (`goodput`), which rank
//! 0 rewrites every few seconds: at a restart the new attempt reads the previous one's last
//! progress (its step, when it was written, its pace) and adds what the restart cost:
//! - the steps redone: the previous attempt's last step minus the step resumed from (timed at the
//!   previous attempt's pace);
//! - the down time: from the previous attempt's last progress to this process's start;
//! - the recovery: from this process's start to its first step.
//!
//! A worker killed without warning loses the last few seconds of its progress (written every
//! [`crate::watch::PROGRESS_EVERY`]): its steps since then are neither counted as redone nor as
//! useful, and its last seconds count as down time.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use serde_json::Value;

static PROCESS_START_MS: OnceLock<u64> = OnceLock::new();

/// Records when this process started (call first thing in `main`); later calls change nothing.
pub fn mark_process_start() {
    let _ = PROCESS_START_MS.set(waypoint_checkpoint::now_ms());
}

/// When this process started (ms since the Unix epoch), as [`mark_process_start`] recorded it;
/// now when it was not called.
pub fn process_start_ms() -> u64 {
    *PROCESS_START_MS.get_or_init(waypoint_checkpoint::now_ms)
}

/// What the newest restart cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Restart {
    /// The attempt that restarted.
    pub attempt: u64,
    /// The step it resumed after.
    pub resumed_step: u64,
    /// Steps the previous attempt had done beyond it.
    pub steps_redone: u64,
    /// Seconds from the previous attempt's last progress to this process's start.
    pub down_s: f64,
    /// Seconds from this process's start to its first step (`None` before it).
    pub start_to_first_step_s: Option<f64>,
}

/// A run's goodput, over all its attempts so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Goodput {
    /// When the run's first attempt started (ms since the Unix epoch).
    pub run_started_unix_ms: u64,
    /// Attempts so far, this one included.
    pub attempts: u64,
    /// Steps trained again after restarts, over all restarts.
    pub steps_redone: u64,
    /// Seconds lost to failures: down time, recovery and redone steps, over all restarts.
    pub lost_s: f64,
    /// Seconds of optimizer steps, over all attempts (redone ones included).
    pub train_s: f64,
    /// Seconds of steps that were later redone.
    pub redone_s: f64,
    /// Useful step time (`train_s − redone_s`) over wall time since the run started, as of the
    /// last update.
    pub goodput: Option<f64>,
    /// The newest restart.
    pub last_restart: Option<Restart>,
}

/// What a new attempt reads of the previous one's last `progress.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct PreviousProgress {
    /// Its step.
    pub step: u64,
    /// When it was written (ms since the Unix epoch).
    pub updated_unix_ms: u64,
    /// Its pace (steps per second), when known.
    pub steps_per_s: Option<f64>,
    /// Its goodput record, when it had one.
    pub goodput: Option<Goodput>,
}

impl PreviousProgress {
    /// Reads a `progress.json` body; `None` when it holds no step.
    pub fn parse(body: &Value) -> Option<Self> {
        Some(Self {
            step: body["step"].as_u64()?,
            updated_unix_ms: body["updated_unix_ms"].as_u64().unwrap_or(0),
            steps_per_s: body["steps_per_s"].as_f64().filter(|r| *r > 0.0),
            goodput: serde_json::from_value(body["goodput"].clone()).ok(),
        })
    }
}

impl Goodput {
    /// The account of attempt `attempt` of a run, which resumes after `resumed_step`, its process
    /// started at `process_ms`; `previous` is the last progress of the attempt before (if any).
    pub fn start(
        attempt: u64,
        resumed_step: u64,
        process_ms: u64,
        previous: Option<&PreviousProgress>,
    ) -> Self {
        let fresh = Self {
            run_started_unix_ms: process_ms,
            attempts: 0,
            steps_redone: 0,
            lost_s: 0.0,
            train_s: 0.0,
            redone_s: 0.0,
            goodput: None,
            last_restart: None,
        };
        let Some(prev) = previous else {
            return Self {
                attempts: attempt.max(1),
                ..fresh
            };
        };
        let mut g = prev.goodput.clone().unwrap_or(fresh);
        let redone = prev.step.saturating_sub(resumed_step);
        let redone_s = prev.steps_per_s.map_or(0.0, |r| redone as f64 / r);
        let down_s = process_ms.saturating_sub(prev.updated_unix_ms) as f64 / 1000.0;
        g.attempts = attempt.max(g.attempts + 1);
        g.steps_redone += redone;
        g.redone_s += redone_s;
        g.lost_s += down_s + redone_s;
        g.last_restart = Some(Restart {
            attempt,
            resumed_step,
            steps_redone: redone,
            down_s,
            start_to_first_step_s: None,
        });
        g
    }

    /// This attempt's first step began at `first_step_ms`; its process started at `process_ms`.
    /// A restart's recovery (start to first step) counts as lost.
    pub fn first_step(&mut self, process_ms: u64, first_step_ms: u64) {
        let secs = first_step_ms.saturating_sub(process_ms) as f64 / 1000.0;
        if let Some(r) = self
            .last_restart
            .as_mut()
            .filter(|r| r.start_to_first_step_s.is_none())
        {
            r.start_to_first_step_s = Some(secs);
            self.lost_s += secs;
        }
    }

    /// A step of `secs` ran.
    pub fn step(&mut self, secs: f64) {
        if secs.is_finite() && secs > 0.0 {
            self.train_s += secs;
        }
    }

    /// Updates the goodput ratio as of `now_ms`.
    pub fn update(&mut self, now_ms: u64) {
        let wall = now_ms.saturating_sub(self.run_started_unix_ms) as f64 / 1000.0;
        self.goodput =
            (wall > 0.0).then(|| ((self.train_s - self.redone_s) / wall).clamp(0.0, 1.0));
    }

    /// One line for people: `87.5% (useful step time / wall time); 3 attempts, 12 steps redone,
    /// 41.2 s lost to failures and recovery`.
    pub fn describe(&self) -> String {
        let ratio = self
            .goodput
            .map_or("–".to_string(), |g| format!("{:.1}%", 100.0 * g));
        let mut s = format!(
            "{ratio} (useful step time / wall time); {} attempt(s), {} step(s) redone, {:.1} s \
             lost to failures and recovery",
            self.attempts, self.steps_redone, self.lost_s
        );
        if let Some(r) = &self.last_restart {
            let first = r.start_to_first_step_s.map_or(String::new(), |t| {
                format!(", {t:.1} s from start to first step")
            });
            s.push_str(&format!(
                "; last restart (attempt {}): resumed after step {}, {} step(s) redone, {:.1} s \
                 down{first}",
                r.attempt, r.resumed_step, r.steps_redone, r.down_s
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_adds_its_down_time_recovery_and_redone_steps() {
        // Attempt 1 from t=0: 100 steps of 0.5 s.
        let mut g = Goodput::start(1, 0, 0, None);
        g.first_step(0, 2_000);
        assert!(
            g.last_restart.is_none() && g.lost_s == 0.0,
            "a first start loses nothing"
        );
        for _ in 0..100 {
            g.step(0.5);
        }
        g.update(52_000);
        assert_eq!(g.goodput, Some(50.0 / 52.0));
        // Its last progress at t=52 s, step 100, 2 steps a second; it dies; a new process starts at
        // t=60 s and resumes after step 90: 10 steps (5 s) redone, 8 s down.
        let prev = PreviousProgress::parse(&serde_json::json!({
            "step": 100, "updated_unix_ms": 52_000, "steps_per_s": 2.0,
            "goodput": serde_json::to_value(&g).unwrap(),
        }))
        .unwrap();
        let mut g = Goodput::start(2, 90, 60_000, Some(&prev));
        assert_eq!((g.attempts, g.steps_redone), (2, 10));
        assert!((g.lost_s - 13.0).abs() < 1e-9, "{}", g.lost_s);
        // Its first step 3 s after its start: recovery.
        g.first_step(60_000, 63_000);
        assert!((g.lost_s - 16.0).abs() < 1e-9);
        for _ in 0..20 {
            g.step(0.5);
        }
        g.update(73_000);
        // Useful: 50 + 10 − 5 = 55 s of 73 s.
        assert!((g.goodput.unwrap() - 55.0 / 73.0).abs() < 1e-9);
        let line = g.describe();
        assert!(
            line.contains("75.3%") && line.contains("2 attempt(s), 10 step(s) redone"),
            "{line}"
        );
        assert!(line.contains("3.0 s from start to first step"), "{line}");
    }

    #[test]
    fn a_previous_progress_without_an_account_starts_one() {
        let prev = PreviousProgress::parse(&serde_json::json!({
            "step": 7, "updated_unix_ms": 1_000,
        }))
        .unwrap();
        let g = Goodput::start(3, 5, 4_000, Some(&prev));
        assert_eq!((g.attempts, g.steps_redone), (3, 2));
        assert_eq!(g.redone_s, 0.0, "no pace: the redone steps are not timed");
        assert!(PreviousProgress::parse(&serde_json::json!({})).is_none());
    }
}
