//! What goes wrong in `waypoint serve`, each with what to do; the routes answer with these as JSON
//! (see `http`), the command exits with them.

/// What can go wrong, each with what to do; the routes answer with these as JSON.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The request is wrong (400).
    #[error("{0}")]
    BadRequest(String),
    /// No key, or another key (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Unknown session, model, request or route (404).
    #[error("{0}")]
    NotFound(String),
    /// A session that has finished (410: the SDK stops its heartbeats).
    #[error("{0}")]
    Gone(String),
    /// A body encoding not taken (415).
    #[error("{0}")]
    Unsupported(String),
    /// The server cannot start: a flag, a file, the address.
    #[error("{0}")]
    Start(String),
    /// The server is stopping (503; the SDK retries, and fails once it is gone).
    #[error("{0}")]
    Unavailable(String),
    /// A fault of the server's own (500).
    #[error("{0}")]
    Internal(String),
}
