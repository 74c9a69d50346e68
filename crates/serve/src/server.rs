//! `waypoint serve`'s flags, and the server's start (key, base models, address) and stop.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;

use crate::error::ServeError;
use crate::http::{self, ApiKey};

/// `waypoint serve` flags.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The address to listen on (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The port to listen on (0: any free one, printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// A base model clients may train: NAME=DIR, DIR a Hugging Face model directory; NAME is
    /// what clients pass as base_model. Repeat for several.
    #[arg(long = "base_model", value_name = "NAME=DIR", required = true)]
    pub base_model: Vec<String>,
    /// A file holding the key clients must send (TINKER_API_KEY; it starts with `tml-`).
    #[arg(long = "api_key_file", value_name = "FILE")]
    pub api_key_file: PathBuf,
    /// Where the training clients' runs and checkpoints go (a local path, file://, s3://, gs://,
    /// az://): each client is a run `<session>-train-<n>` of its own, as `waypoint ckpt` reads.
    #[arg(long = "checkpoint_base_uri", value_name = "URI")]
    pub checkpoint_base_uri: String,
    /// Training clients held at once (a base model is held once, shared by its clients); a
    /// session's end frees its own.
    #[arg(long = "max_models", default_value_t = 4)]
    pub max_models: usize,
    /// Samplers one session holds at once; beyond it, its least recently used are freed (a loop
    /// that makes a sampler per round never says when it is done with one).
    #[arg(long = "max_samplers_per_session", default_value_t = 16)]
    pub max_samplers_per_session: usize,
    /// A session without a heartbeat for this long (the SDK sends one every 10 s) is finished:
    /// its client is gone, and its models and samplers are freed (0: never).
    #[arg(long = "session_timeout_secs", default_value_t = 300)]
    pub session_timeout_secs: u64,
    /// How often each live client's run's status.json is written again (its step, and that it
    /// lives: `waypoint status` calls a running run silent for 10 minutes possibly gone).
    #[arg(long = "status_every_secs", default_value_t = 60)]
    pub status_every_secs: u64,
}

/// `--base_model NAME=DIR` flags as a map, each DIR a model directory.
pub fn base_models(flags: &[String]) -> Result<BTreeMap<String, PathBuf>, ServeError> {
    let mut bases = BTreeMap::new();
    for flag in flags {
        let (name, dir) = flag
            .split_once('=')
            .filter(|(n, d)| !n.is_empty() && !d.is_empty())
            .ok_or_else(|| {
                ServeError::Start(format!(
                    "--base_model {flag:?}: expected NAME=DIR (e.g. Qwen/Qwen3-8B=/models/qwen3-8b)"
                ))
            })?;
        let dir = PathBuf::from(dir);
        if !dir.join("config.json").is_file() {
            return Err(ServeError::Start(format!(
                "--base_model {name}={}: no config.json there; DIR must be a Hugging Face model \
                 directory",
                dir.display()
            )));
        }
        if bases.insert(name.to_string(), dir).is_some() {
            return Err(ServeError::Start(format!(
                "--base_model {name} is given twice"
            )));
        }
    }
    Ok(bases)
}

/// Serves until `stop` resolves; then stops taking connections and finishes the requests in
/// flight.
pub async fn run(
    args: ServeArgs,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let key = std::sync::Arc::new(ApiKey::read(&args.api_key_file)?);
    let bases = base_models(&args.base_model)?;
    let store = waypoint_storage::Store::open(&args.checkpoint_base_uri)
        .map_err(|e| ServeError::Start(format!("--checkpoint_base_uri: {e}")))?;
    let limits = crate::engine::Limits {
        models: args.max_models.max(1),
        samplers_per_session: args.max_samplers_per_session.max(1),
        status_every: std::time::Duration::from_secs(args.status_every_secs.max(1)),
    };
    let engine =
        crate::engine::Engine::start(bases, store, limits, tokio::runtime::Handle::current())?;
    if (1..30).contains(&args.session_timeout_secs) {
        tracing::warn!(
            "--session_timeout_secs {}: the SDK sends a heartbeat every 10 s, so a live client's \
             session may be finished; 30 or more is safe",
            args.session_timeout_secs
        );
    }
    // Sessions whose client is gone are finished.
    let reaper = (args.session_timeout_secs > 0).then(|| {
        let timeout = std::time::Duration::from_secs(args.session_timeout_secs);
        let engine = engine.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(timeout.min(std::time::Duration::from_secs(10)));
            loop {
                tick.tick().await;
                engine.expire_sessions(timeout);
            }
        })
    });
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .map_err(|e| {
            ServeError::Start(format!(
                "listening on {}:{}: {e} (choose another --host or --port)",
                args.host, args.port
            ))
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServeError::Start(format!("the listening address: {e}")))?;
    tracing::info!(
        url = %format!("http://{addr}"),
        base_models = ?engine.bases().collect::<Vec<_>>(),
        checkpoints = %waypoint_storage::redact_text(&args.checkpoint_base_uri),
        "waypoint serve: listening; point TINKER_BASE_URL at the url"
    );
    let served = axum::serve(listener, http::router(engine.clone(), key))
        .with_graceful_shutdown(stop)
        .await
        .map_err(|e| ServeError::Internal(format!("serving: {e}")));
    if let Some(reaper) = reaper {
        reaper.abort();
    }
    // No more requests come: the work already taken is finished, off the async runtime (the
    // trainer thread's storage calls run on it).
    tokio::task::spawn_blocking(move || engine.stop())
        .await
        .map_err(|e| ServeError::Internal(format!("stopping the trainer: {e}")))?;
    tracing::info!("waypoint serve: stopped");
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_checked_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let d = dir.path().display();
        let bases = base_models(&[format!("tiny={d}")]).unwrap();
        assert_eq!(bases["tiny"], dir.path());
        for (flag, says) in [
            ("tiny".to_string(), "expected NAME=DIR"),
            (format!("tiny={d}/none"), "no config.json"),
        ] {
            let err = base_models(&[flag]).unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
        }
        let twice = base_models(&[format!("a={d}"), format!("a={d}")]).unwrap_err();
        assert!(twice.to_string().contains("given twice"));
    }
}
