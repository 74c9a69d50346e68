//! Progress of the steps: a bar on an interactive terminal, log lines otherwise.

use std::io::IsTerminal;

/// Progress: a bar on an interactive terminal, log lines otherwise.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    every: u64,
}

impl Progress {
    /// Progress from step `start` of `total`, a line every `every` steps; `enabled` on the rank
    /// that reports (rank 0).
    pub fn new(total: u64, start: u64, every: u64, enabled: bool) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} steps  {msg}  eta {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_position(start);
            bar
        });
        Self {
            bar,
            every: if enabled { every.max(1) } else { u64::MAX },
        }
    }

    /// Step `step` is done with `loss` at learning rate `lr`; `metrics` is its line of
    /// `logs/metrics.jsonl` (a preference run's reward accuracy and margin are shown too).
    pub fn step(&self, step: u64, loss: f64, lr: f64, metrics: &serde_json::Value) {
        let line_due = step % self.every == 0 || (step == 1 && self.every != u64::MAX);
        let pref = match (
            metrics["rewards/accuracies"].as_f64(),
            metrics["rewards/margins"].as_f64(),
        ) {
            (Some(a), Some(m)) => format!("accuracy {a:.3}  margin {m:.4}"),
            _ => String::new(),
        };
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(format!("loss {loss:.4}  lr {lr:.2e}  {pref}"));
                // The bar stands for these lines on the terminal; train.log still gets them.
                if line_due && pref.is_empty() {
                    tracing::info!(target: crate::trainlog::FILE_ONLY, step, loss, lr, "train")
                } else if line_due {
                    tracing::info!(target: crate::trainlog::FILE_ONLY, step, loss, lr, preference = %pref, "train")
                }
            }
            None if line_due && pref.is_empty() => tracing::info!(step, loss, lr, "train"),
            None if line_due => tracing::info!(step, loss, lr, preference = %pref, "train"),
            None => {}
        }
    }

    /// The last step is done.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
