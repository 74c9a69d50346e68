//! The one error type of the storage crate.

use std::path::PathBuf;

/// Everything that can go wrong between waypoint and its object store.
///
/// Each variant names the key, URI or setting involved and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The URI could not be understood.
    #[error("invalid storage URI {uri:?}: {reason}")]
    InvalidUri {
        /// The URI as given.
        uri: String,
        /// What is wrong and what would be accepted.
        reason: String,
    },
    /// A setting the backend needs is missing or malformed.
    #[error("cannot open {uri:?}: {setting} {problem}; {hint}")]
    Setting {
        /// The URI being opened.
        uri: String,
        /// The environment variable or option at fault.
        setting: String,
        /// What is wrong with it ("is not set", "must be true or false", …).
        problem: String,
        /// What to set.
        hint: String,
    },
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
    /// The key does not exist.
    #[error("{key} not found in {store}")]
    NotFound {
        /// The store (URI) searched.
        store: String,
        /// The key, relative to the store root.
        key: String,
    },
    /// A create-only put found the key already there.
    #[error("{key} already exists in {store} (create-only write refused to overwrite it)")]
    AlreadyExists {
        /// The store (URI).
        store: String,
        /// The key, relative to the store root.
        key: String,
    },
    /// The backend failed (after retries, where the error was transient).
    #[error("{op} {key} in {store} failed: {source}")]
    Backend {
        /// The operation ("put", "get", "list", …).
        op: &'static str,
        /// The store (URI).
        store: String,
        /// The key or prefix.
        key: String,
        /// The backend's error.
        #[source]
        source: Box<object_store::Error>,
    },
    /// The server lost a multipart upload it had started for us: it answered a part or the
    /// completion as if the upload did not exist (a restart that lost it, or a completion it began
    /// and never finished). Nothing is visible under the key; the write may be made again from its
    /// start.
    #[error("the server lost the multipart upload of {key} in {store}: {source}")]
    UploadLost {
        /// The store (URI).
        store: String,
        /// The key being written.
        key: String,
        /// The backend's answer.
        #[source]
        source: Box<object_store::Error>,
    },
    /// A local file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A background upload or read task died.
    #[error("background storage task failed: {0}")]
    Task(String),
}

/// Result alias of the storage crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
