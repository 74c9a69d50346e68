//! Errors of the dist crate.

use std::time::Duration;

/// What can go wrong talking to a store or to other ranks.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// The socket failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done (and with which address).
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No store answered at the address in time.
    #[error("could not reach the TCPStore at {addr} within {timeout:?}: {last}; is MASTER_ADDR/MASTER_PORT right and the store up?")]
    Unreachable {
        /// host:port.
        addr: String,
        /// How long we tried.
        timeout: Duration,
        /// The last error seen.
        last: String,
    },
    /// Keys did not appear in time.
    #[error(
        "timed out after {timeout:?} waiting for keys {keys:?} (a rank died, or is much slower?)"
    )]
    Timeout {
        /// The keys waited for (as the caller named them).
        keys: Vec<String>,
        /// The timeout.
        timeout: Duration,
    },
    /// The peer broke the protocol.
    #[error("TCPStore protocol error: {0}")]
    Protocol(String),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, DistError>;

impl DistError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}
