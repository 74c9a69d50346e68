//! The token cache under the real `waypoint` binary: a builder killed at random moments leaves
//! nothing a later run trains on (the next run removes the leftovers and builds the same bytes a
//! clean build does); a corrupt cache is rebuilt with a warning; a cache is read through for its
//! checksums once per version of the file, not on every start; two ranks of one node build one
//! cache, not two; a second run reuses the cache instead of tokenizing again.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use waypoint_data::cache::open_checked;

/// A JSONL file of `rows` text rows of pseudo-random words (the same for the same arguments).
fn write_dataset(path: &Path, rows: usize) {
    let words = [
        "checkpoint",
        "resume",
        "the",
        "weights",
        "optimizer",
        "a",
        "step",
        "of",
        "data",
        "token",
        "cache",
        "rank",
        "node",
        "storage",
        "manifest",
        "train",
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut out = String::new();
    for _ in 0..rows {
        let n = rng.random_range(20..200);
        let text: Vec<&str> = (0..n)
            .map(|_| words[rng.random_range(0..words.len())])
            .collect();
        out.push_str(&serde_json::json!({ "text": text.join(" ") }).to_string());
        out.push('\n');
    }
    std::fs::write(path, out).unwrap();
}

fn train_args(base: &Path, cache: &Path, data: &Path, run: &str) -> Vec<String> {
    let flags = [
        "--max_steps",
        "1",
        "--save_steps",
        "0",
        "--data_cache_dir",
        cache.to_str().unwrap(),
        "--dataset_uri",
        data.to_str().unwrap(),
    ];
    common::runs::train_args("cpu", 1, &flags, run, base.to_str().unwrap())
}

fn train(base: &Path, cache: &Path, data: &Path, run: &str) -> String {
    let out = common::waypoint()
        .args(train_args(base, cache, data, run))
        .output()
        .unwrap();
    common::train_log(&out)
}

/// The files of `dir`, by kind: published caches and a builder's temporary files.
fn cache_files(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let (mut published, mut partial) = (Vec::new(), Vec::new());
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.ends_with(".tokens") {
            published.push(e.path());
        } else if name.contains(".tokens.tmp-") {
            partial.push(e.path());
        }
    }
    (published, partial)
}

fn key_of(path: &Path) -> String {
    path.file_stem().unwrap().to_string_lossy().to_string()
}

#[test]
fn a_killed_builder_is_never_trained_on_and_a_corrupt_cache_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("big.jsonl");
    write_dataset(&data, 60_000);
    let (base, cache) = (dir.path().join("runs"), dir.path().join("cache"));

    // The reference: a clean build in its own directory (the key does not depend on it).
    let clean = dir.path().join("clean-cache");
    let log = train(&base, &clean, &data, "clean");
    assert!(log.contains("token cache built cache="), "{log}");
    let (published, _) = cache_files(&clean);
    assert_eq!(published.len(), 1);
    let want = std::fs::read(&published[0]).unwrap();

    let mut rng = rand::rng();
    let mut mid_build = 0;
    for attempt in 0..4 {
        let mut child = common::waypoint()
            .args(train_args(
                &base,
                &cache,
                &data,
                &format!("killed-{attempt}"),
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait for the build to start, then kill it a random moment later.
        let start = Instant::now();
        while cache_files(&cache).1.is_empty() && start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let delay = rng.random_range(0..400);
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap();
        child.wait().unwrap();
        let (published, partial) = cache_files(&cache);
        println!(
            "attempt {attempt}: killed {delay} ms into the build; published {}, partial {}",
            published.len(),
            partial.len()
        );
        for p in &published {
            // Whatever was published is whole.
            open_checked(p, &key_of(p), 2).expect("a published cache is complete");
        }
        if published.is_empty() {
            mid_build += 1;
        } else {
            std::fs::remove_file(&published[0]).unwrap();
        }
    }
    assert!(mid_build > 0, "no kill landed during a build");

    // The next run removes what the killed builders left and builds the same bytes.
    let log = train(&base, &cache, &data, "after");
    assert!(
        log.contains("removing a partial token cache") && log.contains("token cache built cache="),
        "{log}"
    );
    let (published, partial) = cache_files(&cache);
    assert!(partial.is_empty(), "{partial:?}");
    assert_eq!(std::fs::read(&published[0]).unwrap(), want);

    // A second run reuses it, without reading it through again.
    let log = train(&base, &cache, &data, "again");
    assert!(
        log.contains("cache_hit=true")
            && !log.contains("token cache built cache=")
            && !log.contains("checksums verified"),
        "{log}"
    );

    // A flipped byte: the run warns, rebuilds, and trains on the same bytes as before.
    let mut bytes = want.clone();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x55;
    std::fs::write(&published[0], &bytes).unwrap();
    let log = train(&base, &cache, &data, "corrupt");
    assert!(
        log.contains("token cache corrupt") && log.contains("token cache built cache="),
        "{log}"
    );
    // Replaced by a copy (a new inode, same bytes): checked once, then trusted again.
    let copy = dir.path().join("copy");
    std::fs::copy(&published[0], &copy).unwrap();
    std::fs::rename(&copy, &published[0]).unwrap();
    let log = train(&base, &cache, &data, "copied");
    assert!(
        log.contains("checksums verified") && log.contains("cache_hit=true"),
        "{log}"
    );
    let log = train(&base, &cache, &data, "trusted");
    assert!(!log.contains("checksums verified"), "{log}");
    assert_eq!(std::fs::read(&published[0]).unwrap(), want);
}

#[test]
fn two_ranks_on_one_node_build_one_cache() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    write_dataset(&data, 20_000);
    let (base, cache) = (dir.path().join("runs"), dir.path().join("cache"));
    let exe = env!("CARGO_BIN_EXE_waypoint");
    let out = common::waypoint()
        .args(common::runs::launch_flags(
            2,
            &["--max_restarts", "0", "--", exe],
        ))
        .args(train_args(&base, &cache, &data, "two"))
        .args(["--dist_timeout_secs", "120"])
        .output()
        .unwrap();
    let mut log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "launch failed:\n{log}");
    // Rank 1 logs to its own file.
    log.push_str(
        &std::fs::read_to_string(base.join("two/framework=waypoint/logs/ranks/rank-00001.log"))
            .unwrap(),
    );
    assert_eq!(log.matches("token cache built cache=").count(), 1, "{log}");
    // The other rank waited for it, or came after it was published.
    assert_eq!(
        log.matches("token cache built by another process").count()
            + log.matches("cache_hit=true").count(),
        if log.contains("built by another process") {
            2
        } else {
            1
        },
        "{log}"
    );
    assert_eq!(log.matches("dataset ready").count(), 2, "{log}");
    let (published, partial) = cache_files(&cache);
    assert_eq!((published.len(), partial.len()), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_on_s3_streams_into_the_same_samples_as_local_files() {
    let Some(s3) = common::s3_base() else {
        return;
    };
    use waypoint_data::tokenizer::Tokenizer;
    use waypoint_data::{list_sources, DataOptions, Dataset};
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    std::fs::create_dir_all(&local).unwrap();
    // Two files, each several reader chunks long.
    write_dataset(&local.join("a.jsonl"), 6_000);
    write_dataset(&local.join("b.jsonl"), 3_000);
    let base = format!("{s3}/{}", common::unique("data-cache"));
    let store = waypoint_storage::Store::open(&base).unwrap();
    for name in ["a.jsonl", "b.jsonl"] {
        let bytes = std::fs::read(local.join(name)).unwrap();
        store
            .put(&format!("data/{name}"), bytes.into())
            .await
            .unwrap();
    }
    let opts = DataOptions {
        text_field: "text".into(),
        max_seq_len: 63,
        packing: true,
        pairs: None,
        skip_bad_lines: false,
        cache_dir: dir.path().join("cache"),
        threads: 2,
    };
    let rt = tokio::runtime::Handle::current();
    let remote = list_sources(&format!("{base}/data/")).await.unwrap();
    let here = list_sources(local.to_str().unwrap()).await.unwrap();
    assert_eq!(remote.len(), 2);
    let from_s3 = Dataset::load(&remote, &Tokenizer::Bytes, &opts, rt.clone()).unwrap();
    let from_disk = Dataset::load(&here, &Tokenizer::Bytes, &opts, rt.clone()).unwrap();
    assert!(from_s3.built_cache && from_disk.built_cache);
    assert_ne!(from_s3.cache_path, from_disk.cache_path);
    assert_eq!((from_s3.len(), from_s3.documents), (from_disk.len(), 9_000));
    for i in (0..from_s3.len()).step_by(97) {
        assert_eq!(from_s3.sample(i), from_disk.sample(i), "sample {i}");
    }
    // The same listing again finds the cache.
    let again = Dataset::load(&remote, &Tokenizer::Bytes, &opts, rt).unwrap();
    assert!(!again.built_cache);
}
