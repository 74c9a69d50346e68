//! What a checkpoint save cost the run: the loop's stall, the copy to host memory, the upload, the
//! latency from the step to the commit, and how much slower the steps ran while the save was in
//! flight ([`SaveReport`]); [`OverlapMeter`] is the pure bookkeeping of the last.

use serde_json::{json, Value};

/// One committed save, as the loop reports it (log line, `logs/metrics.jsonl`, TensorBoard).
#[derive(Debug, Clone, PartialEq)]
pub struct SaveReport {
    /// The checkpoint (`step-XXXXXX`).
    pub checkpoint: String,
    /// Its step.
    pub step: u64,
    /// Seconds the training loop was blocked by it (the save call, and waiting for its copy
    /// before the optimizer changed the weights).
    pub stall_s: f64,
    /// Seconds the copy of the state to host memory took (on its thread for a background save).
    pub snapshot_s: f64,
    /// Bytes of the state taken from another save's host copy of the same step instead of copied
    /// again (a durable save draining the memory tier's copy).
    pub drained_bytes: u64,
    /// Seconds from the start of the write to the commit.
    pub upload_s: f64,
    /// Seconds from the end of its step to the commit: how old the newest durable state is when
    /// it becomes durable.
    pub commit_latency_s: f64,
    /// Steps that ran while it was being copied or written.
    pub overlap_steps: u64,
    /// Their mean duration over that of the steps that ran with no save in flight (`None` until
    /// both are known).
    pub overlap_slowdown: Option<f64>,
}

impl SaveReport {
    /// The fields it adds to the metrics line of the step at which the commit was seen.
    pub fn metrics_fields(&self) -> Value {
        let mut v = json!({
            "save_step": self.step,
            "save_snapshot_s": self.snapshot_s,
            "save_upload_s": self.upload_s,
            "save_commit_latency_s": self.commit_latency_s,
            "save_overlap_steps": self.overlap_steps,
        });
        if self.drained_bytes > 0 {
            v["save_drained_mb"] = json!(self.drained_bytes >> 20);
        }
        if let Some(s) = self.overlap_slowdown {
            v["save_overlap_slowdown"] = json!(s);
        }
        v
    }

    /// The log line's text.
    pub fn describe(&self) -> String {
        let slowdown = match self.overlap_slowdown {
            Some(s) => format!(", {:.2}× as slow as steps without a save", s),
            None => String::new(),
        };
        let drained = match self.drained_bytes {
            0 => String::new(),
            b => format!(" ({} MB of it the memory tier's copy)", b >> 20),
        };
        format!(
            "{}: loop stalled {:.3} s, snapshot {:.2} s{drained}, upload {:.2} s, step → commit \
             {:.2} s; {} step(s) overlapped{slowdown}",
            self.checkpoint,
            self.stall_s,
            self.snapshot_s,
            self.upload_s,
            self.commit_latency_s,
            self.overlap_steps
        )
    }
}

/// Step durations split by whether a save was in flight when the step ran: the steps overlapping
/// the save being reported, and a running mean of the others.
#[derive(Debug, Clone, Default)]
pub struct OverlapMeter {
    overlapped: Vec<f64>,
    clean_sum: f64,
    clean_count: u64,
}

impl OverlapMeter {
    /// Records a step of `secs`; `saving`: a save was being copied or written while it ran.
    pub fn step(&mut self, secs: f64, saving: bool) {
        if saving {
            self.overlapped.push(secs);
        } else {
            self.clean_sum += secs;
            self.clean_count += 1;
        }
    }

    /// The mean time of a step that ran with no save in flight (`None` before the first).
    pub fn clean_mean(&self) -> Option<f64> {
        (self.clean_count > 0).then(|| self.clean_sum / self.clean_count as f64)
    }

    /// The steps that overlapped the save just committed (their count, and their slowdown against
    /// the steps without a save); starts counting afresh for the next save.
    pub fn take(&mut self) -> (u64, Option<f64>) {
        let overlapped = std::mem::take(&mut self.overlapped);
        let n = overlapped.len() as u64;
        if n == 0 || self.clean_count == 0 {
            return (n, None);
        }
        let mean = overlapped.iter().sum::<f64>() / n as f64;
        let clean = self.clean_sum / self.clean_count as f64;
        (n, (clean > 0.0).then(|| mean / clean))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slowdown_is_overlapped_steps_against_the_others() {
        let mut m = OverlapMeter::default();
        assert_eq!(m.take(), (0, None));
        m.step(1.0, true);
        assert_eq!(m.take(), (1, None), "no step without a save yet");
        m.step(1.0, false);
        m.step(3.0, false);
        m.step(3.0, true);
        m.step(5.0, true);
        let (n, slowdown) = m.take();
        assert_eq!(n, 2);
        assert!((slowdown.unwrap() - 2.0).abs() < 1e-12);
        assert_eq!(m.take(), (0, None));
    }

    #[test]
    fn a_report_names_every_figure() {
        let r = SaveReport {
            checkpoint: "step-000010".into(),
            step: 10,
            stall_s: 0.004,
            snapshot_s: 0.5,
            drained_bytes: 0,
            upload_s: 3.0,
            commit_latency_s: 3.6,
            overlap_steps: 4,
            overlap_slowdown: Some(1.25),
        };
        let f = r.metrics_fields();
        assert_eq!(f["save_step"], 10);
        assert_eq!(f["save_overlap_slowdown"], 1.25);
        assert_eq!(f["save_commit_latency_s"], 3.6);
        let text = r.describe();
        assert!(
            text.contains("step → commit 3.60 s") && text.contains("1.25×"),
            "{text}"
        );
        let none = SaveReport {
            overlap_slowdown: None,
            ..r
        };
        assert!(none.metrics_fields().get("save_overlap_slowdown").is_none());
        assert!(none.metrics_fields().get("save_drained_mb").is_none());
        let drained = SaveReport {
            drained_bytes: 3 << 20,
            ..none
        };
        assert_eq!(drained.metrics_fields()["save_drained_mb"], 3);
        assert!(
            drained
                .describe()
                .contains("3 MB of it the memory tier's copy"),
            "{}",
            drained.describe()
        );
    }
}
