//! The one error type of the checkpoint crate.

use waypoint_storage::StorageError;

/// What can go wrong saving, finding, loading, promoting or checking a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The storage layer failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A run id, framework, checkpoint name or model id broke a naming rule.
    #[error("invalid {what} {value:?}: {rule}")]
    InvalidName {
        /// Which kind of name ("run id", "checkpoint name", …).
        what: &'static str,
        /// The offending value.
        value: String,
        /// The rule it broke.
        rule: String,
    },
    /// A safetensors blob is malformed or lies about its contents.
    #[error("{key}: bad safetensors blob: {reason}")]
    BadBlob {
        /// The blob's key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A manifest cannot be parsed or is inconsistent.
    #[error("{key}: bad manifest: {reason}")]
    BadManifest {
        /// The manifest's key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// `dataloader.json` cannot be parsed.
    #[error("{key}: bad dataloader.json: {reason}")]
    BadDataloader {
        /// Its key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor handed in is inconsistent (size vs dtype and shape, duplicate name, …).
    #[error("tensor {name:?}: {reason}")]
    BadTensor {
        /// The tensor's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A committed checkpoint does not match its manifest.
    #[error("checkpoint {name} is damaged: {problems:?}")]
    Damaged {
        /// The checkpoint's name.
        name: String,
        /// Each file that is missing, of the wrong size or hash.
        problems: Vec<String>,
    },
    /// A newer attempt of the run has started; this writer must not commit.
    #[error("attempt {ours} is fenced off by newer attempt {newest}: another trainer of this run started; not committing {name}")]
    Fenced {
        /// The checkpoint that was not committed.
        name: String,
        /// This writer's attempt.
        ours: u64,
        /// The newest attempt seen.
        newest: u64,
    },
    /// The checkpoint already exists (committed).
    #[error("checkpoint {name} is already committed; saves never overwrite one")]
    AlreadyCommitted {
        /// The checkpoint's name.
        name: String,
    },
    /// No such checkpoint.
    #[error("checkpoint {name} not found in run {run}")]
    NotFound {
        /// The checkpoint's name.
        name: String,
        /// The run searched.
        run: String,
    },
    /// The operation does not apply to this kind of checkpoint.
    #[error("checkpoint {name} is {kinds}: {reason}")]
    WrongKind {
        /// The checkpoint's name.
        name: String,
        /// Its kinds, comma-separated.
        kinds: String,
        /// Why that is a problem and what to do.
        reason: String,
    },
    /// A delta checkpoint's base is gone or differs from what the delta was made against.
    #[error("delta checkpoint {name} needs base {base}: {reason}")]
    DeltaBase {
        /// The delta checkpoint.
        name: String,
        /// Its base.
        base: String,
        /// What is wrong.
        reason: String,
    },
    /// A collective with the other ranks of a save failed (their store unreachable, a rank gone).
    #[error("{op} with the other ranks failed: {reason}")]
    Peers {
        /// The collective (its name).
        op: String,
        /// Why it failed.
        reason: String,
    },
    /// The committer (rank 0) did not commit a save this rank took part in.
    #[error("rank 0 could not commit {name}: {reason}")]
    NotCommitted {
        /// The checkpoint.
        name: String,
        /// Rank 0's error.
        reason: String,
    },
    /// A record could not be serialised (never written as empty bytes).
    #[error("serialising {what}: {source}")]
    Serialize {
        /// What was being serialised.
        what: &'static str,
        /// Why it failed.
        source: serde_json::Error,
    },
    /// An argument is malformed (e.g. `init_from_checkpoint` not `run_id:step-N`).
    #[error("{0}")]
    Invalid(String),
}

impl CheckpointError {
    /// Whether this says the checkpoint itself is damaged (a bad or missing manifest or blob, a size or
    /// hash that does not match), as opposed to a failure that may pass (storage unreachable, fenced).
    /// Resume passes over a damaged checkpoint; it never passes over one it merely could not read.
    pub fn is_damage(&self) -> bool {
        match self {
            Self::BadBlob { .. }
            | Self::BadManifest { .. }
            | Self::Damaged { .. }
            | Self::BadTensor { .. }
            | Self::DeltaBase { .. }
            | Self::NotFound { .. } => true,
            Self::Storage(e) => matches!(e, StorageError::NotFound { .. }),
            _ => false,
        }
    }
}

/// `value` as pretty JSON, or the error naming `what`.
pub(crate) fn to_json_pretty<T: serde::Serialize + ?Sized>(
    what: &'static str,
    value: &T,
) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(value).map_err(|source| CheckpointError::Serialize { what, source })
}

/// Result alias of the checkpoint crate.
pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;
