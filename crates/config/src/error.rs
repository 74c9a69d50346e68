//! The two ways a configuration is refused before any work (the command exits with code 2).

use std::path::PathBuf;

/// A setting that cannot be used, found before any work. The message names the flag or config key
/// and says what is accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    /// The setting at fault: a key of [`crate::TrainConfig`] (the flag without its dashes), or
    /// `config_path` when the file itself is at fault.
    pub key: String,
    /// What is wrong and what is accepted; it names the flag (`--key`) or the file and key.
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(key: &str, message: impl Into<String>) -> Self {
        Self {
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// A configuration problem found when its inputs are opened (a model directory, a tokenizer, a
/// storage URI): like [`ConfigError`], the command exits with code 2 and writes nothing.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Where overriding values come from, for naming them in errors.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// Command-line flags: a key is named `--key`.
    Flags,
    /// A `--config_path` file: a key is named by the file and the key.
    File(PathBuf),
}

impl Origin {
    /// How `key` is named in an error.
    pub(crate) fn name(&self, key: &str) -> String {
        match self {
            Self::Flags => format!("--{key}"),
            Self::File(path) => format!("--config_path {}: `{key}`", path.display()),
        }
    }
}
