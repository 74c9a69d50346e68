//! Peak resident memory of a run's ranks, as the kernel counts it: `VmHWM` of each rank process,
//! polled from `/proc` while it runs, beside what the run logs.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::Child;
use std::time::Duration;

/// Waits for `child` (one `waypoint train`, or a `waypoint launch` of `world` of them), polling the
/// `VmHWM` of each rank process every 10 ms; returns its log (stderr, escape codes removed) and the
/// last `VmHWM` seen of each rank, in MiB. A rank is a process whose environment has `RANK` (the
/// child itself when `world` is 1). Fails the test if the run fails.
pub(crate) fn follow_peaks(mut child: Child, world: u32) -> (String, BTreeMap<u32, u64>) {
    let mut stderr = child.stderr.take().expect("stderr piped");
    let reader = std::thread::spawn(move || {
        let mut log = String::new();
        let _ = stderr.read_to_string(&mut log);
        log
    });
    let mut ranks: BTreeMap<u32, u32> = BTreeMap::new();
    let mut peaks: BTreeMap<u32, u64> = BTreeMap::new();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        let pids = if world == 1 {
            vec![child.id()]
        } else {
            descendants(child.id())
        };
        for pid in pids {
            let rank = match ranks.get(&pid) {
                Some(r) => Some(*r),
                None if world == 1 => Some(0),
                None => rank_of(pid),
            };
            let Some(rank) = rank else { continue };
            ranks.insert(pid, rank);
            if let Some(mb) = vm_hwm_mb(pid) {
                let p = peaks.entry(rank).or_insert(0);
                *p = (*p).max(mb);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let log = super::strip_ansi(&reader.join().unwrap());
    assert!(status.success(), "the run failed:\n{log}");
    (log, peaks)
}

/// The number after `field=` in the line of `message` logged by rank `rank`.
pub(crate) fn logged_mb(log: &str, message: &str, rank: u32, field: &str) -> Option<u64> {
    let rank_field = format!("rank={rank} ");
    log.lines()
        .filter(|l| l.contains(message) && l.contains(&rank_field))
        .find_map(|l| {
            let at = l.find(&format!(" {field}="))? + field.len() + 2;
            l[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
}

fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                out.push(c);
                stack.push(c);
            }
        }
    }
    out
}

/// `RANK` in the environment of `pid` (none before the worker has started).
fn rank_of(pid: u32) -> Option<u32> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"RANK="))
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
}

fn vm_hwm_mb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    waypoint_trainer::run::memory::vm_hwm_kb(&status).map(|kb| kb >> 10)
}
