//! waypoint-observe: what people watch of a run, with no libtorch and nothing of the model.
//!
//! - [`records`]: `status.json` (the control plane's job states), `logs/metrics.jsonl` and the
//!   `TORCHELASTIC_ERROR_FILE`;
//! - [`watch`]: rank 0's outputs of one attempt — it owns `logs/train.log` ([`trainlog`], the log's
//!   file sink), the TensorBoard event file ([`tensorboard`]: record framing, CRC32C, the `Event`
//!   protobuf), `logs/loss.svg` ([`plot`], drawn from `metrics.jsonl`) and `logs/progress.json`;
//! - [`progress`]: the progress bar on a terminal, a line every `logging_steps` elsewhere;
//! - [`saves`]: what each checkpoint save cost the run (stall, snapshot, upload, step → commit,
//!   the slowdown of the steps it overlapped);
//! - [`goodput`]: what failures cost a run over its attempts (steps redone, time lost, useful step
//!   time over wall time), carried in `progress.json`;
//! - [`explain`]: an error as people read it (secrets masked, a hint where one helps);
//! - [`metrics`]: the names of a metrics line's fields that several readers know.
//!
//! Arrows inside: `records → watch → {trainlog, tensorboard, plot, goodput}`, `tensorboard → metrics`;
//! `explain` and `progress` stand alone.

pub mod explain;
pub mod goodput;
pub mod metrics;
pub mod plot;
pub mod progress;
pub mod records;
pub mod saves;
pub mod tensorboard;
pub mod trainlog;
pub mod watch;

pub use explain::{explain, Prefixed, Redacting};
