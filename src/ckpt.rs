//! `waypoint ckpt list|verify|promote|gc <run uri>`: the checkpoint crate, for people.
//!
//! A run is `<checkpoint_base_uri>/<run_id>/framework=<framework>`, the folder the run layout puts
//! a run in (what `waypoint train` prints at the end), or its run folder `<base>/<run_id>` when one
//! framework is inside (see [`crate::runs`]).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use waypoint_checkpoint::{CheckpointManager, ManagerOptions};
use waypoint_checkpoint::{RunLayout, StepName};
use waypoint_storage::Store;

/// `println!` that reports a failed write (a full disk) as an error instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).context("writing to stdout")?
    }};
}

/// The `ckpt` subcommands.
#[derive(Debug, Subcommand)]
pub enum CkptCommand {
    /// List committed checkpoints: step, kinds, resumable/promotable, size, data consumed.
    List {
        /// `<base>/<run_id>/framework=<framework>`, or the run folder `<base>/<run_id>`.
        run: String,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash checkpoints against their manifests (all when no name is given). Exit code 3 on damage.
    Verify {
        /// `<base>/<run_id>/framework=<framework>`, or the run folder `<base>/<run_id>`.
        run: String,
        /// Checkpoint names (`step-000100`).
        names: Vec<String>,
    },
    /// Copy a promotable checkpoint to `<base>/models/<model_id>/`.
    Promote {
        /// `<base>/<run_id>/framework=<framework>`, or the run folder `<base>/<run_id>`.
        run: String,
        /// The checkpoint (`step-000100`).
        name: String,
        /// The model id to create (never overwritten).
        model_id: String,
    },
    /// Remove blobs of uncommitted saves older than a grace period.
    Gc {
        /// `<base>/<run_id>/framework=<framework>`, or the run folder `<base>/<run_id>`.
        run: String,
        /// Leave uncommitted blobs younger than this many seconds (a save may be in flight).
        #[arg(long = "grace_secs", default_value_t = 3600)]
        grace_secs: u64,
    },
}

async fn open(given: &str) -> Result<CheckpointManager> {
    let uri = crate::runs::run_of(given).await?;
    let (base, layout) = RunLayout::from_uri(&uri)?;
    let store = Store::open(&base).with_context(|| format!("opening {base}"))?;
    Ok(CheckpointManager::new(
        store,
        layout,
        ManagerOptions::default(),
    ))
}

/// Runs a `ckpt` subcommand.
pub async fn run(command: CkptCommand) -> Result<ExitCode> {
    match command {
        CkptCommand::List { run, json } => {
            let manager = open(&run).await?;
            let list = manager.list().await?;
            if json {
                for c in &list {
                    out!(
                        "{}",
                        serde_json::json!({
                            "name": c.name, "step": c.step, "kinds": c.kinds,
                            "resumable": c.resumable, "promotable": c.promotable,
                            "bytes": c.bytes, "data_consumed": c.data_consumed,
                            "created_unix_ms": c.created_unix_ms,
                        })
                    );
                }
            } else {
                out!(
                    "{:<14} {:>8} {:<32} {:>9} {:>10} {:>12} {:>14}",
                    "NAME",
                    "STEP",
                    "KINDS",
                    "RESUMABLE",
                    "PROMOTABLE",
                    "BYTES",
                    "DATA_CONSUMED"
                );
                for c in &list {
                    let kinds: Vec<&str> = c.kinds.iter().map(|k| k.as_str()).collect();
                    out!(
                        "{:<14} {:>8} {:<32} {:>9} {:>10} {:>12} {:>14}",
                        c.name,
                        c.step,
                        kinds.join(","),
                        c.resumable,
                        c.promotable,
                        c.bytes,
                        c.data_consumed
                    );
                }
                if list.is_empty() {
                    out!("(no committed checkpoint in {run})");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CkptCommand::Verify { run, names } => {
            let manager = open(&run).await?;
            let steps: Vec<StepName> = if names.is_empty() {
                manager.committed_steps().await?
            } else {
                names
                    .iter()
                    .map(|n| n.parse().with_context(|| format!("checkpoint name {n:?}")))
                    .collect::<Result<_>>()?
            };
            if steps.is_empty() {
                out!("(no committed checkpoint in {run})");
            }
            let mut damaged = 0;
            for step in steps {
                // Every checkpoint is checked and reported, whatever an earlier one showed.
                let report = match manager.verify(step).await {
                    Ok(report) => report,
                    Err(e @ waypoint_checkpoint::CheckpointError::NotFound { .. }) => {
                        return Err(anyhow::Error::new(e).context("verify"))
                    }
                    Err(e) if e.is_damage() => {
                        damaged += 1;
                        out!("{step}: DAMAGED: {e}");
                        continue;
                    }
                    Err(e) => {
                        return Err(anyhow::Error::new(e).context(format!("verifying {step}")))
                    }
                };
                if report.problems.is_empty() {
                    out!(
                        "{}: ok ({} files, {} bytes)",
                        report.name,
                        report.files,
                        report.bytes
                    );
                } else {
                    damaged += 1;
                    for p in &report.problems {
                        out!("{}: DAMAGED: {p}", report.name);
                    }
                }
            }
            Ok(if damaged > 0 {
                ExitCode::from(3)
            } else {
                ExitCode::SUCCESS
            })
        }
        CkptCommand::Promote {
            run,
            name,
            model_id,
        } => {
            let manager = open(&run).await?;
            let step: StepName = name
                .parse()
                .with_context(|| format!("checkpoint name {name:?}"))?;
            let at = manager.promote(step, &model_id).await?;
            out!("promoted {name} to {at}");
            Ok(ExitCode::SUCCESS)
        }
        CkptCommand::Gc { run, grace_secs } => {
            let manager = open(&run).await?;
            let removed = manager.gc(Duration::from_secs(grace_secs)).await?;
            for key in &removed {
                out!("removed {key}");
            }
            out!("{} orphan blob(s) removed", removed.len());
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// Every `ckpt` subcommand, on hostile run ids, frameworks, checkpoint names and model ids,
        /// answers with a result or an error, never a panic. (No `/` in the run id or framework, so
        /// the base stays the temporary folder that gc may clean.)
        #[test]
        fn ckpt_commands_never_panic_on_hostile_input(
            run_id in "[^/]{0,24}",
            framework in "[^/]{0,12}",
            name in proptest::prop_oneof![
                "\\PC{0,24}",
                proptest::strategy::Just("step-18446744073709551615".to_string()),
                proptest::strategy::Just("step-99999999999999999999999".to_string()),
                proptest::strategy::Just("step-000001".to_string()),
            ],
            model_id in "\\PC{0,24}",
        ) {
            let dir = tempfile::tempdir().unwrap();
            let uri = format!("{}/{run_id}/framework={framework}", dir.path().display());
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let commands = [
                CkptCommand::List { run: uri.clone(), json: true },
                CkptCommand::Verify { run: uri.clone(), names: vec![name.clone()] },
                CkptCommand::Promote { run: uri.clone(), name: name.clone(), model_id },
                CkptCommand::Gc { run: uri, grace_secs: 0 },
            ];
            for command in commands {
                let _ = rt.block_on(run(command));
            }
        }
    }
}
