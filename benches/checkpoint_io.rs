//! Checkpoint save and load of a ~1 GiB state (many tensors of mixed sizes) through the
//! CheckpointManager, against:
//! - raw sequential `std::fs` write+fsync / read of the same bytes, in the same run (target ≥ 0.9×),
//!   on tmpfs and on the work disk;
//! - PyTorch's own tools on the same tensors (benches/anchors/checkpoint_anchors.py): `torch.save`,
//!   Python safetensors, DCP `FileSystemWriter` and `HuggingFaceStorageWriter` (targets ≥ 2× DCP,
//!   ≥ 1× torch.save);
//! - peak RSS during a save, above the state itself (target ≤ 256 MiB);
//! - the size of a bf16 delta after one AdamW step at lr 1e-5 against the full weights (target ≤ 1/4).
//!
//! WAYPOINT_BENCH_MIB sets the state size (default 1024); WAYPOINT_BENCH_TMPFS=0 skips tmpfs and
//! WAYPOINT_BENCH_ANCHORS=0 the PyTorch anchors (for a 4 GiB state on a machine whose memory cannot
//! hold the state, its tmpfs copies and PyTorch's at once).
//!
//! Loads verify part digests on all cores; the bench also measures what sha256 alone does on one
//! core and on all of them and prints it beside the raw figures (see support::HashLimits).

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use criterion::Criterion;
use support::{criterion_and_runtime, env_or, io_group, median, timed};
use waypoint_checkpoint::{
    CheckpointManager, Commit, Dtype, ManagerOptions, SamplerPart, SaveRequest, Tensor,
};
use waypoint_checkpoint::{RunLayout, StepName};
use waypoint_storage::Store;

/// A state of about `mib` MiB: a few large tensors, many medium ones, many small ones (f32 and bf16).
fn state(mib: usize) -> Vec<Tensor> {
    let mut out = Vec::new();
    let budget = mib << 20;
    let mut used = 0usize;
    let mut i = 0usize;
    let mut x = 0x1234_5678_9abc_def1u64;
    while used < budget {
        let (dtype, elems) = match i % 10 {
            0 => (Dtype::BF16, 16 << 20),    // 32 MiB
            1..=4 => (Dtype::F32, 1 << 20),  // 4 MiB
            5..=7 => (Dtype::F32, 64 << 10), // 256 KiB
            _ => (Dtype::BF16, 2048),        // 4 KiB
        };
        let bytes = elems * dtype.bitsize() / 8;
        let bytes = bytes.min(budget - used).max(dtype.bitsize() / 8) / (dtype.bitsize() / 8)
            * (dtype.bitsize() / 8);
        let mut data = vec![0u8; bytes];
        for c in data.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            c.copy_from_slice(&b[..c.len()]);
        }
        let n = bytes / (dtype.bitsize() / 8);
        out.push(
            Tensor::new(
                format!("model.layers.{i}.weight"),
                dtype,
                vec![n],
                Bytes::from(data),
            )
            .unwrap(),
        );
        used += bytes;
        i += 1;
    }
    out
}

fn commit(step: u64) -> Commit {
    Commit {
        step,
        data_consumed: step,
        epoch: 0,
        world_size: 1,
        config_fingerprint: "0".repeat(64),
        delta_base: None,
        training: None,
    }
}

fn raw_write(path: &Path, state: &[Tensor]) {
    let mut f = std::fs::File::create(path).unwrap();
    for t in state {
        f.write_all(&t.data).unwrap();
    }
    f.sync_all().unwrap();
}

fn raw_read(path: &Path) -> usize {
    let mut f = std::fs::File::open(path).unwrap();
    let mut all = Vec::new();
    f.read_to_end(&mut all).unwrap();
    all.len()
}

/// The memory figure of `/proc/self/status` on the line starting `field` (`VmRSS:`, `VmHWM:`), in
/// bytes.
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

fn group(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    label: &str,
    dir: &Path,
    state: &[Tensor],
    step: &mut u64,
) {
    std::fs::create_dir_all(dir).unwrap();
    let store = Store::open(dir.to_str().unwrap()).unwrap();
    let mut m = CheckpointManager::new(
        store,
        RunLayout::new("bench", "hf").unwrap(),
        ManagerOptions {
            keep_last: Some(1),
            verify_on_load: false,
            ..Default::default()
        },
    );
    rt.block_on(m.start_attempt(&serde_json::json!({})))
        .unwrap();
    let verifying = CheckpointManager::new(
        m.store().clone(),
        m.layout().clone(),
        ManagerOptions {
            verify_on_load: true,
            ..Default::default()
        },
    );
    let bytes: u64 = state.iter().map(|t| t.data.len() as u64).sum();
    let raw = dir.join("raw.bin");
    let mut g = io_group(
        c,
        format!("checkpoint/{label}"),
        bytes,
        Duration::from_millis(500),
    );
    g.bench_function("save/raw write+fsync", |b| {
        b.iter_custom(|n| timed(&format!("{label}/save/raw"), n, || raw_write(&raw, state)))
    });
    g.bench_function("save/waypoint", |b| {
        b.iter_custom(|n| {
            timed(&format!("{label}/save/waypoint"), n, || {
                *step += 1;
                let req = SaveRequest {
                    commit: commit(*step),
                    dcp: Some(state.to_vec()),
                    sampler: None,
                };
                rt.block_on(m.save(req)).unwrap();
            })
        })
    });
    g.bench_function("load/raw read", |b| {
        b.iter_custom(|n| {
            timed(&format!("{label}/load/raw"), n, || {
                assert_eq!(raw_read(&raw) as u64, bytes)
            })
        })
    });
    let latest = rt.block_on(m.latest_resumable(false)).unwrap().unwrap();
    g.bench_function("load/waypoint", |b| {
        b.iter_custom(|n| {
            timed(&format!("{label}/load/waypoint"), n, || {
                assert_eq!(
                    rt.block_on(m.load_tensors(&latest, "dcp/", &|_| true))
                        .unwrap()
                        .len(),
                    state.len()
                )
            })
        })
    });
    g.bench_function("load/waypoint+sha256", |b| {
        b.iter_custom(|n| {
            timed(&format!("{label}/load/waypoint+sha256"), n, || {
                assert_eq!(
                    rt.block_on(verifying.load_tensors(&latest, "dcp/", &|_| true))
                        .unwrap()
                        .len(),
                    state.len()
                )
            })
        })
    });
    g.finish();

    // Peak RSS of one more save, above what the process held before it.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = proc_status_bytes("VmRSS:").unwrap_or(0);
    *step += 1;
    rt.block_on(m.save(SaveRequest {
        commit: commit(*step),
        dcp: Some(state.to_vec()),
        sampler: None,
    }))
    .unwrap();
    if let Some(hwm) = proc_status_bytes("VmHWM:") {
        support::TIMES.lock().unwrap().insert(
            format!("{label}/rss_extra"),
            vec![hwm.saturating_sub(before) as f64],
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn anchors(state: &[Tensor], dir: &Path) -> Option<serde_json::Value> {
    let venv = std::env::var("VIRTUAL_ENV").ok()?;
    std::fs::create_dir_all(dir).ok()?;
    let spec: Vec<serde_json::Value> = state
        .iter()
        .map(|t| serde_json::json!([t.name, format!("{:?}", t.dtype), t.shape]))
        .collect();
    let spec_path = dir.join("spec.json");
    std::fs::write(&spec_path, serde_json::to_vec(&spec).ok()?).ok()?;
    let out = std::process::Command::new(format!("{venv}/bin/python"))
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/anchors/checkpoint_anchors.py"
        ))
        .arg(&spec_path)
        .arg(dir)
        .arg("3")
        .stderr(std::process::Stdio::inherit())
        .output()
        .ok()?;
    let _ = std::fs::remove_dir_all(dir);
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last()?).ok()
}

fn delta_ratio(rt: &tokio::runtime::Runtime) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().to_str().unwrap()).unwrap();
    let mut m = CheckpointManager::new(
        store,
        RunLayout::new("delta", "hf").unwrap(),
        ManagerOptions::default(),
    );
    rt.block_on(m.start_attempt(&serde_json::json!({})))
        .unwrap();
    let n = 32 << 20; // 32 Mi bf16 weights = 64 MiB
    let base_w = waypoint_testkit::weights::bf16_weights(n, 1);
    let next_w = waypoint_testkit::weights::adamw_step_bf16(&base_w, 1e-5, 2);
    let t = |w: Vec<u8>| {
        vec![Tensor::new(
            "model.layers.0.mlp.up_proj.weight",
            Dtype::BF16,
            vec![n / 4096, 4096],
            w.into(),
        )
        .unwrap()]
    };
    let cfg = Bytes::from_static(b"{}");
    let full = SamplerPart::Full {
        config_json: cfg.clone(),
        tensors: t(base_w),
        extra_files: vec![],
    };
    let base = rt
        .block_on(m.save(SaveRequest {
            commit: commit(1),
            dcp: None,
            sampler: Some(full),
        }))
        .unwrap();
    let delta = SamplerPart::Delta {
        base: StepName::new(1),
        config_json: cfg,
        tensors: t(next_w),
    };
    let d = rt
        .block_on(m.save(SaveRequest {
            commit: commit(2),
            dcp: None,
            sampler: Some(delta),
        }))
        .unwrap();
    let full_bytes = base
        .sampler_files()
        .filter(|f| f.path.ends_with(".safetensors"))
        .map(|f| f.bytes)
        .sum();
    let delta_bytes = d
        .sampler_files()
        .filter(|f| f.path.ends_with(".xor.zst"))
        .map(|f| f.bytes)
        .sum();
    (delta_bytes, full_bytes)
}

fn main() {
    let (mut c, rt) = criterion_and_runtime();
    let mib = env_or("WAYPOINT_BENCH_MIB", 1024);
    let st = state(mib);
    let bytes: u64 = st.iter().map(|t| t.data.len() as u64).sum();
    let mut step = 0;
    let mut labels = Vec::new();
    let on = |name: &str| std::env::var(name).map_or(true, |v| v != "0");
    if Path::new("/dev/shm").is_dir() && on("WAYPOINT_BENCH_TMPFS") {
        group(
            &mut c,
            &rt,
            "tmpfs",
            &PathBuf::from(format!(
                "/dev/shm/waypoint-ckpt-bench-{}",
                std::process::id()
            )),
            &st,
            &mut step,
        );
        labels.push("tmpfs");
    }
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("checkpoint-bench");
    group(&mut c, &rt, "disk", &work, &st, &mut step);
    labels.push("disk");
    let anchor = if on("WAYPOINT_BENCH_ANCHORS") {
        anchors(
            &st,
            &PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("checkpoint-anchors"),
        )
    } else {
        None
    };
    let limits = {
        let sample: Vec<u8> = st
            .iter()
            .flat_map(|t| t.data.iter().copied())
            .take(512 << 20)
            .collect();
        support::HashLimits::measure(
            &sample,
            Store::open("memory://").map_or(16 << 20, |s| s.options().part_size as u64),
        )
    };
    let (delta, full) = delta_ratio(&rt);
    c.final_summary();

    let gbs = |s: f64| bytes as f64 / s / 1e9;
    println!(
        "\ncheckpoint save/load, {} tensors, {:.0} MiB (median):",
        st.len(),
        bytes as f64 / (1 << 20) as f64
    );
    for label in &labels {
        for (op, ours, raw, target) in [
            ("save", "save/waypoint", "save/raw", 0.9),
            ("load", "load/waypoint", "load/raw", 0.9),
            ("load+sha256", "load/waypoint+sha256", "load/raw", 0.9),
        ] {
            if let (Some(w), Some(r)) = (
                median(&format!("{label}/{ours}")),
                median(&format!("{label}/{raw}")),
            ) {
                println!("  {label:5} {op:12} waypoint {:5.2} GB/s  raw {:5.2} GB/s  ratio {:.2}x (target >= {target})", gbs(w), gbs(r), r / w);
            }
        }
        for (what, raw) in [("save", "save/raw"), ("load", "load/raw")] {
            if let Some(r) = median(&format!("{label}/{raw}")) {
                println!("  {label:5} {}", limits.line(what, gbs(r)).trim_start());
            }
        }
        if let Some(extra) = median(&format!("{label}/rss_extra")) {
            println!(
                "  {label:5} peak RSS during save above the state: {:.0} MiB (target <= 256)",
                extra / (1 << 20) as f64
            );
        }
    }
    match anchor {
        None => {
            println!("  anchors: skipped (WAYPOINT_BENCH_ANCHORS=0, or no VIRTUAL_ENV with torch: run through scripts/bench.sh)")
        }
        Some(a) => {
            let (ws, wl) = (
                median("disk/save/waypoint").unwrap_or(f64::NAN),
                median("disk/load/waypoint").unwrap_or(f64::NAN),
            );
            println!(
                "  anchors on the work disk (same tensors; ratio = anchor time / waypoint time):"
            );
            for (name, v) in a.as_object().into_iter().flatten() {
                let (s, l) = (
                    v["save"].as_f64().unwrap_or(f64::NAN),
                    v["load"].as_f64().unwrap_or(f64::NAN),
                );
                println!(
                    "    {name:30} save {s:6.2}s ({:5.2}x)   load {l:6.2}s ({:5.2}x)",
                    s / ws,
                    l / wl
                );
            }
            println!("    waypoint                       save {ws:6.2}s           load {wl:6.2}s");
        }
    }
    println!("  bf16 delta after one AdamW step (lr 1e-5): {delta} of {full} bytes = 1/{:.1} (target <= 1/4)", full as f64 / delta.max(1) as f64);
}
