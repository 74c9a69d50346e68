//! What the end-to-end benches share: a Hugging Face model made by the test venv's transformers, a
//! JSONL dataset, and running processes.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Whether cargo only probes the bench (`cargo bench -- --list`, `cargo test --benches`): then it
/// runs nothing.
pub(crate) fn probed() -> bool {
    std::env::args().any(|a| a == "--list")
}

/// An environment variable as a number, or `default`.
pub(crate) fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The venv's Python.
pub(crate) fn python() -> String {
    std::env::var("VIRTUAL_ENV")
        .map(|v| format!("{v}/bin/python"))
        .expect("VIRTUAL_ENV unset: run scripts/bench.sh (or source scripts/env.sh)")
}

/// Runs `cmd`, fails loudly, returns stdout.
pub(crate) fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("start process");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Runs `cmd`, fails loudly, returns stderr (the log).
pub(crate) fn run_log(cmd: &mut Command) -> String {
    let out = cmd.output().expect("start process");
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{cmd:?} failed:\n{log}");
    log
}

/// A random Llama (`WAYPOINT_BENCH_HIDDEN`, default 512; `WAYPOINT_BENCH_LAYERS`, default 6) in
/// `dir`; returns (hidden, layers).
pub(crate) fn make_model(dir: &Path) -> (usize, usize) {
    let hidden = env_or("WAYPOINT_BENCH_HIDDEN", 512);
    let layers = env_or("WAYPOINT_BENCH_LAYERS", 6);
    std::fs::create_dir_all(dir).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/hf_models.py");
    run(Command::new(python()).args([
        script,
        "make",
        dir.to_str().unwrap(),
        "llama",
        "--hidden",
        &hidden.to_string(),
        "--inter",
        &(hidden * 11 / 4).to_string(),
        "--layers",
        &layers.to_string(),
    ]));
    (hidden, layers)
}

/// A bench's temp folder (under the target dir) holding a random model in `model/` (see
/// [`make_model`]) and a dataset in `data.jsonl` (see [`write_dataset`]): (folder, model, dataset,
/// (hidden, layers)).
pub(crate) fn model_and_data() -> (tempfile::TempDir, PathBuf, PathBuf, (usize, usize)) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let model = dir.path().join("model");
    let size = make_model(&model);
    let data = dir.path().join("data.jsonl");
    write_dataset(&data);
    (dir, model, data, size)
}

/// 400 rows of text.
pub(crate) fn write_dataset(path: &Path) {
    let rows: Vec<String> = (0..400)
        .map(|i| {
            format!(
                "{{\"text\": \"row {i}: the trainer writes the weights, the optimizer state and the \
                 data position; a checkpoint is real once its manifest exists, and resume continues \
                 from the newest complete one.\"}}"
            )
        })
        .collect();
    std::fs::write(path, rows.join("\n")).unwrap();
}

/// What hashing alone can do on this machine, over `data`: sha256 GB/s on one core, and on all
/// cores in parts of `part` bytes (storage's own part digest, rayon); and whether the CPU has the
/// SHA extensions (`sha_ni`, which the `sha2` crate detects and uses at run time: software sha256
/// runs at ~0.4 GB/s, SHA-NI at ~1.5-2 GB/s a core).
pub(crate) struct HashLimits {
    pub(crate) cores: usize,
    pub(crate) sha_ni: bool,
    pub(crate) one_core_gbs: f64,
    pub(crate) all_cores_gbs: f64,
}

impl HashLimits {
    pub(crate) fn measure(data: &[u8], part: u64) -> Self {
        use sha2::Digest;
        let best = |f: &dyn Fn()| {
            (0..3)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        };
        let one = best(&|| {
            std::hint::black_box(sha2::Sha256::digest(data));
        });
        let all = best(&|| {
            std::hint::black_box(waypoint_storage::digest::digest_slice(data, part));
        });
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            sha_ni: std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains(" sha_ni")),
            one_core_gbs: data.len() as f64 / one / 1e9,
            all_cores_gbs: data.len() as f64 / all / 1e9,
        }
    }

    /// One line of evidence, with the raw figure it bounds: `raw_gbs` is what the file system does
    /// without hashing. Two bounds: where the I/O needs no CPU (a device doing DMA) hashing on all
    /// cores caps a verified path at `all / raw`; where the I/O is itself a memory copy on the same
    /// cores (tmpfs, the page cache), copying and hashing share them, and the cap is
    /// `1 / (1/raw + 1/all)`, i.e. `all / (raw + all)` of raw.
    pub(crate) fn line(&self, what: &str, raw_gbs: f64) -> String {
        let device = (self.all_cores_gbs / raw_gbs).min(1.0);
        let shared = self.all_cores_gbs / (raw_gbs + self.all_cores_gbs);
        format!(
            "  limit: sha256 {:.2} GB/s on 1 core, {:.2} GB/s on all {} cores (sha_ni: {}); raw {what} \
             {raw_gbs:.2} GB/s -> hashing caps a verified {what} at {device:.2}x raw if the I/O takes no \
             CPU, {shared:.2}x if it is a memory copy on the same cores{}",
            self.one_core_gbs,
            self.all_cores_gbs,
            self.cores,
            if self.sha_ni { "yes" } else { "no" },
            if shared < 0.9 {
                " (the 0.9x target is out of reach on this CPU count whenever the I/O needs the cores)"
            } else {
                ""
            }
        )
    }
}

/// The number after `name=` in a log line.
pub(crate) fn field(line: &str, name: &str) -> Option<f64> {
    let at = line.find(&format!("{name}="))? + name.len() + 1;
    line[at..]
        .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e' || c == '-'))
        .next()?
        .parse()
        .ok()
}

/// Seconds per iteration, by benchmark name, collected as criterion runs.
pub(crate) static TIMES: Mutex<BTreeMap<String, Vec<f64>>> = Mutex::new(BTreeMap::new());

/// Runs `f` `iters` times, recording each time under `name` in [`TIMES`]; returns the total (for
/// criterion's `iter_custom`).
pub(crate) fn timed(name: &str, iters: u64, mut f: impl FnMut()) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let t = Instant::now();
        f();
        let d = t.elapsed();
        TIMES
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_default()
            .push(d.as_secs_f64());
        total += d;
    }
    total
}

/// The median of the times recorded under `name`.
pub(crate) fn median(name: &str) -> Option<f64> {
    let mut v = TIMES.lock().unwrap().get(name)?.clone();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied()
}

/// A criterion group `name` of slow I/O benchmarks moving `bytes` bytes an iteration: flat sampling,
/// 10 samples, `warm_up`, then 5 s of measurement.
pub(crate) fn io_group<'a>(
    c: &'a mut criterion::Criterion,
    name: String,
    bytes: u64,
    warm_up: Duration,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sampling_mode(criterion::SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(warm_up)
        .measurement_time(Duration::from_secs(5))
        .throughput(criterion::Throughput::Bytes(bytes));
    g
}

/// Criterion configured from the command line, and a multi-threaded tokio runtime for the I/O
/// benches' async calls.
pub(crate) fn criterion_and_runtime() -> (criterion::Criterion, tokio::runtime::Runtime) {
    let c = criterion::Criterion::default().configure_from_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    (c, rt)
}
