//! Progress of the steps: a bar on an interactive terminal, log lines otherwise.

use std::io::IsTerminal;

/// Progress: a bar on an interactive terminal, log lines otherwise.
pub(super) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    every: u64,
}

impl Progress {
    pub(super) fn new(total: u64, start: u64, every: u64, enabled: bool) -> Self {
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

    pub(super) fn step(&self, step: u64, loss: f64, lr: f64) {
        let line_due = step % self.every == 0 || (step == 1 && self.every != u64::MAX);
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(format!("loss {loss:.4}  lr {lr:.2e}"));
                // The bar stands for these lines on the terminal; train.log still gets them.
                if line_due {
                    tracing::info!(target: super::trainlog::FILE_ONLY, step, loss, lr, "train")
                }
            }
            None if line_due => tracing::info!(step, loss, lr, "train"),
            None => {}
        }
    }

    pub(super) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
