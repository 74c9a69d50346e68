//! Streaming write and read of a 1 GiB blob through `waypoint-storage`, against raw `std::fs` on the
//! same bytes in the same run: on tmpfs (/dev/shm) and on the work disk, fsync'd, then S3 on loopback
//! when the bench script has started the test server. Prints each figure beside its anchor as a ratio
//! (target ≥ 0.9×).
//!
//! Sizes: WAYPOINT_BENCH_MIB (default 1024) for local, WAYPOINT_BENCH_S3_MIB (default 256) for S3.
//!
//! Hashing is part digests on all cores (as checkpoints record them), sha256 and, for the memory
//! tier's store, CRC32C (its write and verified read are printed beside sha256's); the bench also measures what
//! sha256 alone does on one core and on all of them, and prints it beside the raw figures: where
//! hashing on every core is slower than the raw I/O, no verified path can reach the raw figure on
//! this machine, and the line says so. On S3 the anchor is boto3's managed transfer
//! (`upload_file`/`download_file`, default TransferConfig) against the same server in the same run.

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::Criterion;
use support::{criterion_and_runtime, env_or, io_group, median, timed};
use waypoint_storage::{Store, StoreOptions};

fn data(len: usize) -> Vec<u8> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

const CHUNK: usize = 8 << 20;

async fn waypoint_write(store: &Store, key: &str, data: &[u8]) {
    let mut w = waypoint_storage::BlobWriter::new(store, key).unwrap();
    for c in data.chunks(CHUNK) {
        w.write(c).await.unwrap();
    }
    w.finish().await.unwrap();
}

async fn waypoint_write_bytes(store: &Store, key: &str, data: &bytes::Bytes) {
    let mut w = waypoint_storage::BlobWriter::new(store, key).unwrap();
    w.write_bytes(data.clone()).await.unwrap();
    w.finish().await.unwrap();
}

async fn waypoint_read(store: &Store, key: &str, hash: bool) -> u64 {
    let r = waypoint_storage::BlobReader::open(store, key, None)
        .await
        .unwrap();
    let part = store.options().part_size as u64;
    let r = if hash {
        r.with_digest(waypoint_storage::DigestScheme::parts(
            part,
            store.options().checksum,
        ))
    } else {
        r.without_hash()
    };
    r.drain().await.unwrap().0
}

fn raw_write(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn raw_read(path: &Path) -> u64 {
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).unwrap();
        if k == 0 {
            return n;
        }
        n += k as u64;
    }
}

fn local_group(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    label: &str,
    dir: PathBuf,
    data: &bytes::Bytes,
) {
    std::fs::create_dir_all(&dir).unwrap();
    let mut options = StoreOptions::default();
    options.part_size = env_or("WAYPOINT_BENCH_PART_MIB", options.part_size >> 20) << 20;
    let store = Store::open_with(dir.to_str().unwrap(), options).unwrap();
    // The memory tier's checksum: the same store with CRC32C part digests.
    let crc = Store::open_with(
        dir.to_str().unwrap(),
        StoreOptions {
            checksum: waypoint_storage::digest::Checksum::Crc32c,
            ..options
        },
    )
    .unwrap();
    let raw_path = dir.join("raw.bin");
    let bytes = data.len() as u64;
    let mut g = io_group(
        c,
        format!("storage/{label}"),
        bytes,
        Duration::from_millis(500),
    );
    let names = [
        format!("{label}/write/raw"),
        format!("{label}/write/waypoint"),
        format!("{label}/read/raw"),
        format!("{label}/read/waypoint"),
        format!("{label}/read/waypoint+sha256"),
        format!("{label}/write/waypoint-copying"),
        format!("{label}/write/waypoint-crc32c"),
        format!("{label}/read/waypoint+crc32c"),
    ];
    g.bench_function("write/raw std::fs+fsync", |b| {
        b.iter_custom(|n| timed(&names[0], n, || raw_write(&raw_path, data)))
    });
    g.bench_function("write/waypoint (sha256, fsync)", |b| {
        b.iter_custom(|n| {
            timed(&names[1], n, || {
                rt.block_on(waypoint_write_bytes(&store, "wp.bin", data))
            })
        })
    });
    g.bench_function("write/waypoint copying 8 MiB writes (sha256, fsync)", |b| {
        b.iter_custom(|n| {
            timed(&names[5], n, || {
                rt.block_on(waypoint_write(&store, "wp.bin", data))
            })
        })
    });
    g.bench_function("write/waypoint (crc32c, fsync)", |b| {
        b.iter_custom(|n| {
            timed(&names[6], n, || {
                rt.block_on(waypoint_write_bytes(&crc, "crc.bin", data))
            })
        })
    });
    g.bench_function("read/raw std::fs", |b| {
        b.iter_custom(|n| {
            timed(&names[2], n, || {
                assert_eq!(raw_read(&raw_path), data.len() as u64)
            })
        })
    });
    g.bench_function("read/waypoint", |b| {
        b.iter_custom(|n| {
            timed(&names[3], n, || {
                assert_eq!(
                    rt.block_on(waypoint_read(&store, "wp.bin", false)),
                    data.len() as u64
                )
            })
        })
    });
    g.bench_function("read/waypoint+sha256", |b| {
        b.iter_custom(|n| {
            timed(&names[4], n, || {
                assert_eq!(
                    rt.block_on(waypoint_read(&store, "wp.bin", true)),
                    data.len() as u64
                )
            })
        })
    });
    g.bench_function("read/waypoint+crc32c", |b| {
        b.iter_custom(|n| {
            timed(&names[7], n, || {
                assert_eq!(
                    rt.block_on(waypoint_read(&crc, "crc.bin", true)),
                    data.len() as u64
                )
            })
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

fn s3_group(c: &mut Criterion, rt: &tokio::runtime::Runtime, data: &bytes::Bytes) -> bool {
    let Ok(base) = std::env::var("WAYPOINT_TEST_S3_URI") else {
        eprintln!("S3: skipped (no WAYPOINT_TEST_S3_URI; scripts/bench.sh starts the server)");
        return false;
    };
    let store = Store::open(&format!("{base}/bench")).unwrap();
    let bytes = data.len() as u64;
    let mut g = io_group(
        c,
        "storage/s3-loopback".into(),
        bytes,
        Duration::from_millis(200),
    );
    g.bench_function("write/waypoint", |b| {
        b.iter_custom(|n| {
            timed("s3/write", n, || {
                rt.block_on(waypoint_write_bytes(&store, "wp.bin", data))
            })
        })
    });
    g.bench_function("read/waypoint+sha256", |b| {
        b.iter_custom(|n| {
            timed("s3/read", n, || {
                assert_eq!(
                    rt.block_on(waypoint_read(&store, "wp.bin", true)),
                    data.len() as u64
                )
            })
        })
    });
    g.finish();
    rt.block_on(store.delete("wp.bin")).unwrap();
    true
}

/// boto3's managed transfer of the same bytes to the same server: (upload s, download s), medians.
fn boto3_anchor(data: &[u8]) -> Option<(f64, f64)> {
    let base = std::env::var("WAYPOINT_TEST_S3_URI").ok()?;
    let bucket = base
        .trim_start_matches("s3://")
        .split('/')
        .next()?
        .to_string();
    let dir = PathBuf::from("/dev/shm").join(format!("waypoint-boto3-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let src = dir.join("src.bin");
    std::fs::write(&src, data).ok()?;
    let out = std::process::Command::new(support::python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/anchors/s3_anchor.py"
        ))
        .args([src.to_str()?, &bucket, "bench/boto3.bin", "5"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .ok();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last()?).ok()?;
    Some((v["upload"].as_f64()?, v["download"].as_f64()?))
}

fn main() {
    let (mut c, rt) = criterion_and_runtime();
    let mib = env_or("WAYPOINT_BENCH_MIB", 1024);
    let bytes = bytes::Bytes::from(data(mib << 20));
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("storage-bench");
    let shm = PathBuf::from("/dev/shm").join(format!("waypoint-bench-{}", std::process::id()));
    let mut labels = vec![];
    if Path::new("/dev/shm").is_dir() {
        local_group(&mut c, &rt, "tmpfs", shm, &bytes);
        labels.push("tmpfs");
    }
    local_group(&mut c, &rt, "disk", work, &bytes);
    labels.push("disk");
    let s3_mib = env_or("WAYPOINT_BENCH_S3_MIB", 256);
    let s3_data = bytes.slice(..(s3_mib << 20).min(bytes.len()));
    let s3 = s3_group(&mut c, &rt, &s3_data);
    let boto3 = if s3 { boto3_anchor(&s3_data) } else { None };
    let part = StoreOptions::default().part_size as u64;
    let limits = support::HashLimits::measure(&bytes, part);
    c.final_summary();

    println!(
        "\nwaypoint-storage vs raw std::fs, {mib} MiB, median of each (target ratio >= 0.90):"
    );
    let gbps = |secs: f64, len: usize| len as f64 / secs / 1e9;
    for label in labels {
        for (op, ours, anchor) in [
            (
                "write (sha256+fsync vs write+fsync)",
                "write/waypoint",
                "write/raw",
            ),
            (
                "write, copying 8 MiB slices",
                "write/waypoint-copying",
                "write/raw",
            ),
            ("read", "read/waypoint", "read/raw"),
            ("read +sha256 verify", "read/waypoint+sha256", "read/raw"),
            (
                "write (crc32c+fsync, the memory tier's)",
                "write/waypoint-crc32c",
                "write/raw",
            ),
            ("read +crc32c verify", "read/waypoint+crc32c", "read/raw"),
        ] {
            let (Some(w), Some(r)) = (
                median(&format!("{label}/{ours}")),
                median(&format!("{label}/{anchor}")),
            ) else {
                continue;
            };
            println!(
                "  {label:5} {op:36} waypoint {:6.2} GB/s   raw {:6.2} GB/s   ratio {:.2}x",
                gbps(w, bytes.len()),
                gbps(r, bytes.len()),
                r / w
            );
        }
        for (what, raw) in [("write", "write/raw"), ("read", "read/raw")] {
            if let Some(r) = median(&format!("{label}/{raw}")) {
                println!(
                    "  {label:5} {}",
                    limits.line(what, gbps(r, bytes.len())).trim_start()
                );
            }
        }
    }
    if s3 {
        let len = (s3_mib << 20).min(bytes.len());
        for (op, name) in [("write", "s3/write"), ("read+sha256", "s3/read")] {
            if let Some(t) = median(name) {
                println!(
                    "  s3 loopback (s3s-fs) {op:12} {s3_mib} MiB: {:.2} GB/s",
                    gbps(t, len)
                );
            }
        }
        match boto3 {
            Some((up, down)) => {
                for (op, name, anchor) in [
                    ("write vs boto3 upload_file", "s3/write", up),
                    ("read+verify vs boto3 download_file", "s3/read", down),
                ] {
                    if let Some(t) = median(name) {
                        println!(
                            "  s3 {op:38} waypoint {:6.2} GB/s   boto3 {:6.2} GB/s   ratio {:.2}x (target >= 1.0)",
                            gbps(t, len),
                            gbps(anchor, len),
                            anchor / t
                        );
                    }
                }
            }
            None => println!(
                "  s3 boto3 anchor: skipped (no boto3 in the venv? see scripts/requirements.txt)"
            ),
        }
    }
}
