//! The one error type of the launch crate.

/// What can go wrong launching workers or reading the worker environment.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Flags that cannot work together or on this machine (the command exits with code 2 before
    /// starting anything).
    #[error("{0}")]
    Usage(String),
    /// A variable of the worker environment is malformed.
    #[error("environment variable {var}={value:?} {reason}")]
    Env {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The TCPStore could not be hosted.
    #[error("hosting the TCPStore on {addr}: {source}")]
    Store {
        /// The address it was to listen on.
        addr: String,
        /// Why not.
        #[source]
        source: waypoint_c10d::DistError,
    },
    /// The nodes could not agree on a round of the worker group (a node missing, the store gone, the
    /// job out of restarts); the message says which and what to do.
    #[error("{0}")]
    Rendezvous(String),
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias of the launch crate.
pub type Result<T, E = LaunchError> = std::result::Result<T, E>;
