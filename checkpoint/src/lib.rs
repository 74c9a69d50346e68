//! waypoint-checkpoint: checkpoint formats and the CheckpointManager (no libtorch).
//!
//! Not built yet: see the checkpoint-runtime issue. The crate exists so that the workspace has the
//! shape of DESIGN.md and the dependency direction `trainer → checkpoint → storage` is fixed.

pub use waypoint_storage as storage;
