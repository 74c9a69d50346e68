//! waypoint-testkit: what the test suites of several crates share (dev-only, never shipped): the
//! storage backends every suite runs against (local, memory, the S3 test server), deterministic test
//! data, a store that fails on purpose ([`flaky`]), a real S3 server behind a fault proxy that kills,
//! freezes or throttles it at a chosen kind of call ([`s3fault`]), bf16 weights ([`weights`]), and the venv's Python.

#![forbid(unsafe_code)]

pub mod flaky;
pub mod s3fault;
pub mod weights;

use std::sync::atomic::{AtomicU64, Ordering};

use waypoint_storage::{Store, StoreOptions};

/// A store under test, with whatever must live as long as it does.
pub struct Backend {
    /// "local", "memory" or "s3".
    pub name: &'static str,
    /// The store, rooted at a prefix no other test uses.
    pub store: Store,
    _dir: Option<tempfile::TempDir>,
}

/// A prefix no other test of this process or of an earlier run uses.
pub fn unique(label: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{label}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The venv's Python (the one `scripts/env.sh` activates), with torch, transformers and peft.
pub fn python() -> String {
    match std::env::var("VIRTUAL_ENV") {
        Ok(venv) => format!("{venv}/bin/python"),
        Err(_) => {
            panic!("VIRTUAL_ENV is not set: run `source scripts/env.sh` (or scripts/test.sh) first")
        }
    }
}

/// Runs the Python script at `path` with `args` in the venv; fails the test with its stderr unless
/// it succeeds; returns its stdout.
pub fn python_script(path: &str, args: &[&str]) -> String {
    python_script_with(path, args, &[])
}

/// [`python_script`] with the environment variables `env` set.
pub fn python_script_with(path: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let script = path.rsplit('/').next().unwrap_or(path);
    let out = std::process::Command::new(python())
        .arg(path)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Fails the test, showing the exit code and stderr, unless the process succeeded; returns stdout.
pub fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "process failed ({:?}):\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The steps of a run's committed checkpoints, newest first.
pub async fn committed_steps(m: &waypoint_checkpoint::CheckpointManager) -> Vec<u64> {
    m.committed_steps()
        .await
        .expect("list committed checkpoints")
        .iter()
        .map(|s| s.step())
        .collect()
}

/// Whether checkpoint `step` of `m`'s run re-hashes clean against its manifest (`verify` finds no
/// problem).
pub async fn intact(m: &waypoint_checkpoint::CheckpointManager, step: u64) -> bool {
    m.verify(waypoint_checkpoint::StepName::new(step))
        .await
        .expect("verify a checkpoint")
        .problems
        .is_empty()
}

/// The commit of step `step` by one rank, `step * 64` samples in, as the checkpoint suites save it.
pub fn commit(step: u64) -> waypoint_checkpoint::Commit {
    waypoint_checkpoint::Commit {
        step,
        data_consumed: step * 64,
        epoch: 0,
        world_size: 1,
        config_fingerprint: "c".repeat(64),
        delta_base: None,
        training: None,
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago, never the same twice in one process: a
/// test server that lets its port go during an outage (the fault proxy, `s3s-fs` restarted) gets
/// it back, not a server another test started meanwhile (whose clients would then reach the wrong
/// store).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
}

/// The S3 base URI of the test server, if one is running. When `WAYPOINT_REQUIRE_S3` is set (as the
/// README's test command sets it) a missing server is a failure, not a skip.
pub fn s3_base() -> Option<String> {
    match std::env::var("WAYPOINT_TEST_S3_URI") {
        Ok(uri) if !uri.is_empty() => Some(uri),
        _ => {
            assert!(
                std::env::var_os("WAYPOINT_REQUIRE_S3").is_none(),
                "WAYPOINT_REQUIRE_S3 is set but WAYPOINT_TEST_S3_URI is not: start the server with scripts/test.sh"
            );
            eprintln!("note: no S3 test server (WAYPOINT_TEST_S3_URI unset); run scripts/test.sh to include it");
            None
        }
    }
}

/// Local FS, memory and (when running) the S3-compatible server, each under a fresh prefix.
pub fn backends(label: &str, options: StoreOptions) -> Vec<Backend> {
    let dir = tempfile::tempdir().expect("temp dir");
    let local = Store::open_with(dir.path().to_str().expect("utf-8 temp path"), options)
        .expect("open local store");
    let mut out = vec![
        Backend {
            name: "local",
            store: local,
            _dir: Some(dir),
        },
        Backend {
            name: "memory",
            store: Store::open_with(&format!("memory://{}", unique(label)), options)
                .expect("open memory store"),
            _dir: None,
        },
    ];
    if let Some(base) = s3_base() {
        let uri = format!("{}/{}", base.trim_end_matches('/'), unique(label));
        out.push(Backend {
            name: "s3",
            store: Store::open_with(&uri, options).expect("open s3 store"),
            _dir: None,
        });
    }
    out
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Lower-case hex sha256.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// S3's digest of a multipart object, computed by hand as S3 documents it: the sha256 of the
/// concatenated sha256s of the parts of `part_size` bytes, then `-N`; a blob of one part has its plain
/// sha256.
pub fn part_digest_hex(data: &[u8], part_size: usize) -> String {
    use sha2::Digest;
    if data.len() <= part_size {
        return sha256_hex(data);
    }
    let mut concat = Vec::new();
    for c in data.chunks(part_size) {
        concat.extend_from_slice(&sha2::Sha256::digest(c));
    }
    format!(
        "{}-{}",
        hex::encode(sha2::Sha256::digest(&concat)),
        data.len().div_ceil(part_size)
    )
}

/// A small training state under DCP names, deterministic in `seed`: two parameters (bf16, f32) with
/// AdamW state and a step counter.
pub fn training_state(seed: u64) -> Vec<waypoint_checkpoint::Tensor> {
    use waypoint_checkpoint::{dcp, Dtype, Tensor};
    let mut out = Vec::new();
    for (i, (fqn, dtype, shape)) in [
        ("model.embed_tokens.weight", Dtype::BF16, vec![64usize, 32]),
        (
            "model.layers.0.mlp.up_proj.weight",
            Dtype::F32,
            vec![48, 32],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let n: usize = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        let s = seed * 10 + i as u64;
        out.push(
            Tensor::new(
                dcp::model_key(fqn),
                dtype,
                shape.clone(),
                pattern(n, s).into(),
            )
            .unwrap(),
        );
        let n32 = shape.iter().product::<usize>() * 4;
        for (j, field) in ["exp_avg", "exp_avg_sq"].iter().enumerate() {
            out.push(
                Tensor::new(
                    dcp::optim_key(fqn, field),
                    Dtype::F32,
                    shape.clone(),
                    pattern(n32, s + 100 * (j as u64 + 1)).into(),
                )
                .unwrap(),
            );
        }
        out.push(
            Tensor::new(
                dcp::optim_key(fqn, "step"),
                Dtype::F32,
                vec![],
                (seed as f32).to_le_bytes().to_vec().into(),
            )
            .unwrap(),
        );
    }
    out
}
