//! waypoint's learning-rate schedules against transformers' (`tests/python/schedules.py`, from the
//! venv): `constant` = `get_constant_schedule_with_warmup`, `linear` (with `--min_lr_ratio 0`) =
//! `get_linear_schedule_with_warmup`, `cosine` = `get_cosine_with_min_lr_schedule_with_warmup`
//! with `min_lr_rate` = `--min_lr_ratio` — the lr of every optimizer step, as a PyTorch loop that
//! calls `scheduler.step()` after `optimizer.step()` sees it (the first warmup step runs at lr 0).

mod common;

use waypoint_config::ScheduleKind;
use waypoint_trainer::optim::Schedule;

fn transformers(lr: f64, warmup: u64, total: u64, min_ratio: f64) -> serde_json::Value {
    let args = [lr, warmup as f64, total as f64, min_ratio].map(|x| x.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    serde_json::from_str(&common::root_python_script("schedules.py", &args)).unwrap()
}

#[test]
fn every_step_runs_at_the_lr_transformers_gives_it() {
    // With and without warmup, a floor, and a warmup as long as the run.
    for (warmup, total, min_ratio) in [(5u64, 23u64, 0.1), (0, 9, 0.0), (3, 3, 0.25), (1, 40, 0.0)]
    {
        let lr = 3e-3;
        let oracle = transformers(lr, warmup, total, min_ratio);
        for (kind, key, floor) in [
            (ScheduleKind::Constant, "constant", min_ratio),
            (ScheduleKind::Linear, "linear", 0.0),
            (ScheduleKind::Cosine, "cosine", min_ratio),
        ] {
            let schedule = Schedule {
                lr,
                warmup_steps: warmup,
                total_steps: total,
                kind,
                min_lr_ratio: floor,
            };
            let want: Vec<f64> = oracle[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(want.len() as u64, total);
            for (step, want) in want.iter().enumerate() {
                let got = schedule.lr_at(step as u64);
                assert!(
                    (got - want).abs() <= 1e-15 * lr,
                    "{key}, warmup {warmup}, total {total}, min ratio {floor}: optimizer step {} \
                     runs at {got}, transformers at {want}",
                    step + 1
                );
            }
        }
    }
}
