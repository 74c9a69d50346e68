//! `waypoint status [<run>] [--json]`: where a run stands, on one screen — state, step / total,
//! progress and ETA, last loss, tokens/s, the newest resumable and promotable checkpoints, the last
//! error — read from the run's records (`status.json`, `logs/progress.json`, `logs/metrics.jsonl`,
//! the checkpoint manifests), so it works during and after a run, on any store. The run is named as
//! [`crate::runs`] says; with none named, the runs under `--checkpoint_base_uri` (`./runs`) are
//! listed with their states.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;
use waypoint_checkpoint::{now_ms, CheckpointInfo, CheckpointManager, ManagerOptions, RunLayout};
use waypoint_observe::goodput::Goodput;
use waypoint_observe::metrics::RECIPE_METRICS;
use waypoint_observe::records::{JobState, ResumedFrom, Status};
use waypoint_storage::Store;

/// A running run whose records have not changed for this long is reported as possibly gone.
pub const STALE_AFTER_S: f64 = 600.0;

/// `waypoint status` arguments.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// `<base>/<run_id>/framework=<framework>`, or a run folder `<base>/<run_id>` holding one
    /// framework; without it, the run the flags below name, or every run under the base.
    run: Option<String>,
    #[command(flatten)]
    flags: crate::runs::RunFlags,
    /// Print one JSON object instead of the screen.
    #[arg(long)]
    json: bool,
}

/// Where a run stands (what `--json` prints).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The run URI.
    pub run: String,
    /// The job state of `status.json`.
    pub state: JobState,
    /// The attempt the records are from.
    pub attempt: Option<u64>,
    /// Optimizer steps done.
    pub step: u64,
    /// Steps the run takes.
    pub total_steps: u64,
    /// `step / total_steps`.
    pub progress: f64,
    /// Seconds left at the current pace (running runs).
    pub eta_s: Option<f64>,
    /// Optimizer steps per second of this attempt.
    pub steps_per_s: Option<f64>,
    /// The last train loss recorded.
    pub loss: Option<f64>,
    /// The last eval loss recorded.
    pub eval_loss: Option<f64>,
    /// The last learning rate recorded.
    pub lr: Option<f64>,
    /// Tokens per second of the last step recorded.
    pub tokens_per_s: Option<f64>,
    /// A preference run's statistics at the last step recorded (TRL's names: `rewards/margins`,
    /// …); empty for a supervised run.
    pub preference: BTreeMap<String, f64>,
    /// The newest committed checkpoint a restart resumes from.
    pub resumable_checkpoint: Option<String>,
    /// The newest committed checkpoint that can be promoted.
    pub promotable_checkpoint: Option<String>,
    /// The error of a failed run (the reason, for a cancelled one).
    pub error: Option<String>,
    /// When the records last changed (ms since the Unix epoch).
    pub updated_unix_ms: u64,
    /// Seconds since then.
    pub updated_s_ago: f64,
    /// Running, but no record changed for [`STALE_AFTER_S`]: the process may be gone.
    pub stale: bool,
    /// Where this attempt resumed from: the checkpoint and its tier (`memory`, `peer`, `durable`).
    pub resumed_from: Option<ResumedFrom>,
    /// What failures cost the run over its attempts (from the newest `progress.json`, whichever
    /// attempt wrote it).
    pub goodput: Option<Goodput>,
}

/// The report from the records: `status.json`, `logs/progress.json` (if any), the last line of
/// `logs/metrics.jsonl` (if any) and the committed checkpoints, at time `now` (ms).
pub fn report(
    run: &str,
    status: &Status,
    progress: Option<&Value>,
    last_metrics: Option<&Value>,
    checkpoints: &[CheckpointInfo],
    now: u64,
) -> Report {
    let goodput = progress.and_then(|p| serde_json::from_value(p["goodput"].clone()).ok());
    // Progress counts only when it is this attempt's (an older attempt's is history).
    let progress = progress.filter(|p| p["attempt"].as_u64() == status.attempt);
    let progress_step = progress.and_then(|p| p["step"].as_u64()).unwrap_or(0);
    let progress_updated = progress
        .and_then(|p| p["updated_unix_ms"].as_u64())
        .unwrap_or(0);
    let step = if status.state == JobState::Finished {
        status.total_steps.max(status.step)
    } else {
        status.step.max(progress_step)
    };
    let updated = status.updated_unix_ms.max(progress_updated);
    let updated_s_ago = now.saturating_sub(updated) as f64 / 1000.0;
    let running = matches!(status.state, JobState::Running | JobState::Pending);
    let steps_per_s = progress.and_then(|p| p["steps_per_s"].as_f64());
    let eta_s = match (running, steps_per_s) {
        (true, Some(rate)) if rate > 0.0 => {
            let since = now.saturating_sub(progress_updated) as f64 / 1000.0;
            Some((status.total_steps.saturating_sub(step) as f64 / rate - since).max(0.0))
        }
        _ => None,
    };
    // The newest values: the live progress, else the last line of metrics.jsonl.
    let field = |name: &str| {
        progress
            .and_then(|p| p[name].as_f64())
            .or_else(|| last_metrics.and_then(|m| m[name].as_f64()))
    };
    let newest = |pick: fn(&CheckpointInfo) -> bool| {
        checkpoints
            .iter()
            .filter(|c| pick(c))
            .max_by_key(|c| c.step)
            .map(|c| c.name.clone())
    };
    Report {
        run: run.to_string(),
        state: status.state,
        attempt: status.attempt,
        step,
        total_steps: status.total_steps,
        progress: if status.total_steps > 0 {
            (step as f64 / status.total_steps as f64).min(1.0)
        } else {
            0.0
        },
        eta_s,
        steps_per_s,
        loss: field("loss"),
        eval_loss: field("eval_loss"),
        lr: field("lr"),
        tokens_per_s: field("tokens_per_s"),
        preference: RECIPE_METRICS
            .iter()
            .filter_map(|&name| {
                let v = last_metrics.and_then(|m| m[name].as_f64())?;
                Some((name.to_string(), v))
            })
            .collect(),
        resumable_checkpoint: newest(|c| c.resumable),
        promotable_checkpoint: newest(|c| c.promotable),
        error: status.error.clone(),
        updated_unix_ms: updated,
        updated_s_ago,
        goodput,
        resumed_from: status.resumed_from.clone(),
        stale: running && updated_s_ago > STALE_AFTER_S,
    }
}

/// Seconds as `1h02m`, `3m05s` or `12s`.
fn duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// A job state as the control plane spells it (`FINISHED`).
fn state_name(state: JobState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The screen of a report.
pub fn render(r: &Report) -> String {
    let opt = |v: Option<f64>, f: fn(f64) -> String| v.map_or("-".to_string(), f);
    let state = state_name(r.state);
    let attempt = r
        .attempt
        .map_or(String::new(), |a| format!(" (attempt {a})"));
    let resumed = r.resumed_from.as_ref().map_or(String::new(), |f| {
        format!(", resumed from {} ({} tier)", f.checkpoint, f.tier)
    });
    let mut lines = vec![
        format!("run         {}", r.run),
        format!("state       {state}{attempt}{resumed}"),
        format!(
            "step        {} / {} ({:.1}%)  eta {}  ({} steps/s)",
            r.step,
            r.total_steps,
            r.progress * 100.0,
            opt(r.eta_s, duration),
            opt(r.steps_per_s, |v| format!("{v:.3}"))
        ),
        format!(
            "loss        {}  eval {}  lr {}  tokens/s {}",
            opt(r.loss, |v| format!("{v:.4}")),
            opt(r.eval_loss, |v| format!("{v:.4}")),
            opt(r.lr, |v| format!("{v:.2e}")),
            opt(r.tokens_per_s, |v| format!("{v:.0}"))
        ),
    ];
    // A preference run's statistics, in the recipe's order, four to a line.
    let stats: Vec<String> = RECIPE_METRICS
        .iter()
        .filter_map(|&name| Some(format!("{name} {:.4}", r.preference.get(name)?)))
        .collect();
    for (i, chunk) in stats.chunks(4).enumerate() {
        let head = if i == 0 { "preference" } else { "" };
        lines.push(format!("{head:<12}{}", chunk.join("  ")));
    }
    lines.extend([
        format!(
            "checkpoint  resumable {}  promotable {}",
            r.resumable_checkpoint.as_deref().unwrap_or("-"),
            r.promotable_checkpoint.as_deref().unwrap_or("-")
        ),
        format!("updated     {} ago", duration(r.updated_s_ago)),
    ]);
    if let Some(g) = &r.goodput {
        lines.push(format!("goodput     {}", g.describe()));
    }
    if r.stale {
        lines.push(format!(
            "warning     RUNNING but nothing recorded for {}: the process may be gone; the same \
             command resumes from {}",
            duration(r.updated_s_ago),
            r.resumable_checkpoint.as_deref().unwrap_or("the start")
        ));
    }
    if let Some(e) = &r.error {
        lines.push(format!("error       {e}"));
    }
    lines.join("\n")
}

/// The bytes at `key`, `None` if absent.
async fn read_json(store: &Store, key: &str) -> Result<Option<Vec<u8>>> {
    let bytes = store.get_if_exists(key).await;
    Ok(bytes
        .with_context(|| format!("reading {key}"))?
        .map(|b| b.to_vec()))
}

/// Reads the run's records and builds its report.
pub async fn gather(run: &str) -> Result<Report> {
    let (base, layout) = RunLayout::from_uri(run)?;
    let store = Store::open(&base).with_context(|| format!("opening {base}"))?;
    let status = read_json(&store, &layout.status())
        .await?
        .with_context(|| {
            format!("no run at {run}: it has no status.json (not started yet, or a wrong URI?)")
        })?;
    let status: Status = serde_json::from_slice(&status).context("status.json is not valid")?;
    let progress = read_json(&store, &layout.progress())
        .await?
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    let last_metrics = read_json(&store, &layout.metrics()).await?.and_then(|b| {
        String::from_utf8_lossy(&b)
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
    });
    let manager = CheckpointManager::new(store, layout, ManagerOptions::default());
    let checkpoints = manager.list().await.context("listing checkpoints")?;
    Ok(report(
        run,
        &status,
        progress.as_ref(),
        last_metrics.as_ref(),
        &checkpoints,
        now_ms(),
    ))
}

/// Runs `waypoint status`.
pub async fn run(args: StatusArgs) -> Result<ExitCode> {
    use std::io::Write as _;
    let Some(run) = crate::runs::resolve(args.run.as_deref(), &args.flags).await? else {
        return list_runs(args.flags.base(), args.json).await;
    };
    let report = gather(&run).await?;
    let text = if args.json {
        serde_json::to_string(&report)?
    } else {
        render(&report)
    };
    let text = waypoint_storage::redact_text(&text);
    writeln!(std::io::stdout().lock(), "{text}").context("writing to stdout")?;
    Ok(ExitCode::SUCCESS)
}

/// `waypoint status` with no run named: each run under `base` with its state and step (one JSON
/// object per line with `--json`).
async fn list_runs(base: &str, json: bool) -> Result<ExitCode> {
    use std::io::Write as _;
    let runs = crate::runs::list(base).await?;
    let mut lines = Vec::new();
    if runs.is_empty() {
        lines.push(format!(
            "no runs under {base}; name one with --checkpoint_base_uri/--run_id, or a run URI"
        ));
    }
    for run in &runs {
        let line = match gather(run).await {
            Ok(r) if json => serde_json::to_string(&r)?,
            Ok(r) => format!(
                "{run}  {}  step {}/{}",
                state_name(r.state),
                r.step,
                r.total_steps
            ),
            Err(e) if json => {
                serde_json::json!({"run": run, "error": format!("{e:#}")}).to_string()
            }
            Err(e) => format!("{run}  ({e:#})"),
        };
        lines.push(line);
    }
    let text = waypoint_storage::redact_text(&lines.join("\n"));
    writeln!(std::io::stdout().lock(), "{text}").context("writing to stdout")?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(state: JobState, step: u64, attempt: u64) -> Status {
        let mut s = Status::new(state, step, 100);
        s.attempt = Some(attempt);
        s.updated_unix_ms = 1_000_000;
        s
    }

    fn ckpt(step: u64, resumable: bool, promotable: bool) -> CheckpointInfo {
        CheckpointInfo {
            name: format!("step-{step:06}"),
            step,
            kinds: vec![],
            resumable,
            promotable,
            bytes: 1,
            data_consumed: step,
            created_unix_ms: 0,
        }
    }

    #[test]
    fn a_running_run_reports_its_live_progress_and_eta() {
        let progress = json!({"attempt": 2, "step": 40, "steps_per_s": 2.0, "loss": 1.5,
            "tokens_per_s": 900.0, "updated_unix_ms": 1_010_000});
        let cks = [
            ckpt(20, true, false),
            ckpt(30, true, false),
            ckpt(10, true, true),
        ];
        let r = report(
            "r",
            &status(JobState::Running, 30, 2),
            Some(&progress),
            None,
            &cks,
            1_012_000,
        );
        assert_eq!((r.step, r.progress), (40, 0.4));
        // 60 steps left at 2/s, as of 2 s ago.
        assert_eq!(r.eta_s, Some(28.0));
        assert_eq!((r.loss, r.tokens_per_s), (Some(1.5), Some(900.0)));
        assert_eq!(r.resumable_checkpoint.as_deref(), Some("step-000030"));
        assert_eq!(r.promotable_checkpoint.as_deref(), Some("step-000010"));
        assert!(!r.stale);
        let screen = render(&r);
        assert!(screen.contains("RUNNING (attempt 2)") && screen.contains("40 / 100 (40.0%)"));
        // Where a restarted attempt came from.
        let mut restarted = status(JobState::Running, 30, 2);
        restarted.resumed_from = Some(ResumedFrom {
            checkpoint: "step-000029".into(),
            tier: "peer".into(),
        });
        let screen = render(&report(
            "r",
            &restarted,
            Some(&progress),
            None,
            &cks,
            1_012_000,
        ));
        assert!(
            screen.contains("RUNNING (attempt 2), resumed from step-000029 (peer tier)"),
            "{screen}"
        );
        assert!(screen.contains("eta 28s"), "{screen}");
    }

    #[test]
    fn a_preference_run_shows_its_statistics_and_a_supervised_one_none() {
        let last = json!({"step": 30, "loss": 0.4, "rewards/accuracies": 0.75,
            "rewards/margins": 1.25, "logps/chosen": -40.0, "tokens": 100});
        let r = report(
            "r",
            &status(JobState::Finished, 30, 1),
            None,
            Some(&last),
            &[],
            0,
        );
        assert_eq!(r.preference.len(), 3);
        assert_eq!(r.preference["rewards/margins"], 1.25);
        let screen = render(&r);
        assert!(
            screen.contains("preference  rewards/accuracies 0.7500  rewards/margins 1.2500"),
            "{screen}"
        );
        let sft = json!({"step": 30, "loss": 0.4});
        let r = report(
            "r",
            &status(JobState::Finished, 30, 1),
            None,
            Some(&sft),
            &[],
            0,
        );
        assert!(r.preference.is_empty() && !render(&r).contains("preference"));
    }

    #[test]
    fn an_older_attempts_progress_is_ignored_and_silence_is_stale() {
        let progress = json!({"attempt": 1, "step": 90, "steps_per_s": 2.0, "loss": 9.0,
            "updated_unix_ms": 1_000_000});
        let last = json!({"step": 30, "loss": 2.5});
        let r = report(
            "r",
            &status(JobState::Running, 30, 2),
            Some(&progress),
            Some(&last),
            &[],
            1_000_000 + 3_600_000,
        );
        assert_eq!((r.step, r.loss, r.eta_s), (30, Some(2.5), None));
        assert!(r.stale);
        assert!(render(&r).contains("the process may be gone"));
    }

    #[test]
    fn finished_and_failed_runs_report_their_end() {
        let r = report("r", &status(JobState::Finished, 100, 3), None, None, &[], 0);
        assert_eq!(
            (r.step, r.progress, r.eta_s, r.stale),
            (100, 1.0, None, false)
        );
        let mut failed = status(JobState::Failed, 12, 1);
        failed.error = Some("loss became NaN".into());
        let r = report("r", &failed, None, None, &[], 2_000_000);
        assert_eq!(r.error.as_deref(), Some("loss became NaN"));
        assert!(!r.stale);
        assert!(render(&r).contains("error       loss became NaN"));
    }
}
