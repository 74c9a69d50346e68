//! waypoint-trainer: the `waypoint` command.
//!
//! - [`cli`]: argument parsing and dispatch; errors are reported with context and an exit code.
//! - [`device`]: `--device auto|cpu|cuda[:i]` to a libtorch device.
//! - [`smoke`]: a small real training run on libtorch (autograd + AdamW) that records its run under the
//!   run layout. It is what `waypoint train` runs until the full trainer lands.

pub mod cli;
pub mod device;
pub mod smoke;
