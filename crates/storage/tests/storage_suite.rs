//! The storage suite, run against local FS, memory and the S3-compatible server on 127.0.0.1.

use waypoint_testkit as common;

use bytes::Bytes;
use common::{backends, part_digest_hex, pattern, sha256_hex, Backend};
use waypoint_storage::{StorageError, StoreOptions};

/// Small parts so that multipart paths run with little data (S3's minimum part is 5 MiB).
fn options() -> StoreOptions {
    StoreOptions {
        part_size: 5 << 20,
        max_concurrency: 2,
        ..StoreOptions::default()
    }
}

fn each(label: &str) -> Vec<Backend> {
    backends(label, options())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_head_delete_round_trip() {
    for b in each("roundtrip") {
        let s = &b.store;
        let data = Bytes::from(pattern(1000, 1));
        s.put("a/b/c.bin", data.clone()).await.unwrap();
        assert_eq!(s.get("a/b/c.bin").await.unwrap(), data, "{}", b.name);
        let info = s.head("a/b/c.bin").await.unwrap();
        assert_eq!(
            (info.key.as_str(), info.size),
            ("a/b/c.bin", 1000),
            "{}",
            b.name
        );
        assert!(s.exists("a/b/c.bin").await.unwrap());
        assert_eq!(
            s.get_if_exists("a/b/c.bin").await.unwrap(),
            Some(data.clone())
        );
        assert_eq!(
            s.get_if_exists("a/b/none").await.unwrap(),
            None,
            "{}",
            b.name
        );
        assert_eq!(
            s.get_range("a/b/c.bin", 10..20).await.unwrap(),
            data.slice(10..20)
        );
        // Overwrite with put.
        s.put("a/b/c.bin", Bytes::from_static(b"new"))
            .await
            .unwrap();
        assert_eq!(
            s.get("a/b/c.bin").await.unwrap(),
            Bytes::from_static(b"new")
        );
        s.delete("a/b/c.bin").await.unwrap();
        assert!(!s.exists("a/b/c.bin").await.unwrap(), "{}", b.name);
        // Deleting what is gone is fine; reading it is a typed NotFound naming the key.
        s.delete("a/b/c.bin").await.unwrap();
        match s.get("a/b/c.bin").await {
            Err(StorageError::NotFound { key, .. }) => assert_eq!(key, "a/b/c.bin"),
            other => panic!("{}: expected NotFound, got {other:?}", b.name),
        }
        assert!(matches!(
            s.head("missing").await,
            Err(StorageError::NotFound { .. })
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_only_put_refuses_a_second_create() {
    for b in each("create") {
        let s = &b.store;
        s.put_create("checkpoints/step-000001.json", Bytes::from_static(b"first"))
            .await
            .unwrap();
        let second = s
            .put_create(
                "checkpoints/step-000001.json",
                Bytes::from_static(b"second"),
            )
            .await;
        match second {
            Err(StorageError::AlreadyExists { key, .. }) => {
                assert_eq!(key, "checkpoints/step-000001.json", "{}", b.name)
            }
            other => panic!("{}: expected AlreadyExists, got {other:?}", b.name),
        }
        assert_eq!(
            s.get("checkpoints/step-000001.json").await.unwrap(),
            Bytes::from_static(b"first"),
            "{}: the first create must survive",
            b.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_recursively_and_one_level() {
    for b in each("list") {
        let s = &b.store;
        for k in [
            "r/checkpoints/step-000002.json",
            "r/checkpoints/step-000002/dcp/0.safetensors",
            "r/checkpoints/step-000002/dcp/1.safetensors",
            "r/status.json",
            "other/x",
        ] {
            s.put(k, Bytes::from(k.to_string())).await.unwrap();
        }
        let all: Vec<String> = s
            .list("r")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(
            all,
            [
                "r/checkpoints/step-000002.json",
                "r/checkpoints/step-000002/dcp/0.safetensors",
                "r/checkpoints/step-000002/dcp/1.safetensors",
                "r/status.json"
            ],
            "{}",
            b.name
        );
        let level = s.list_dir("r/checkpoints").await.unwrap();
        let objects: Vec<&str> = level.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(objects, ["r/checkpoints/step-000002.json"], "{}", b.name);
        assert_eq!(level.prefixes, ["r/checkpoints/step-000002"], "{}", b.name);
        assert!(s.list("nothing-here").await.unwrap().is_empty());
        assert_eq!(s.delete_prefix("r/checkpoints").await.unwrap().len(), 3);
        assert_eq!(s.list("r").await.unwrap().len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_a_multipart_blob_with_its_sha256() {
    let data = pattern(23 * 1024 * 1024 + 12345, 7); // 4 full parts and a tail
    let want = part_digest_hex(&data, 5 << 20);
    for b in each("stream") {
        let s = &b.store;
        let mut w = waypoint_storage::BlobWriter::new(s, "blobs/big.bin").unwrap();
        // Odd-sized copies, then a zero-copy tail that straddles part boundaries.
        let split = 11 * 1024 * 1024 + 7;
        for chunk in data[..split].chunks(999_983) {
            w.write(chunk).await.unwrap();
        }
        w.write_bytes(Bytes::copy_from_slice(&data[split..]))
            .await
            .unwrap();
        assert!(
            !s.exists("blobs/big.bin").await.unwrap(),
            "{}: visible before finish",
            b.name
        );
        let info = w.finish().await.unwrap();
        assert_eq!(info.key, "blobs/big.bin");
        assert_eq!(info.bytes, data.len() as u64, "{}", b.name);
        // The digest is S3's composite of the 5 MiB parts' sha256s.
        assert_eq!(info.part_size, 5 << 20);
        assert_eq!(info.sha256, want, "{}", b.name);
        assert!(info
            .sha256
            .ends_with(&format!("-{}", data.len().div_ceil(5 << 20))));

        assert_eq!(
            sha256_hex(&s.get("blobs/big.bin").await.unwrap()),
            sha256_hex(&data),
            "{}",
            b.name
        );
        let reader = waypoint_storage::BlobReader::open(s, "blobs/big.bin", None)
            .await
            .unwrap();
        assert_eq!(reader.len(), data.len() as u64);
        assert_eq!(
            reader.drain().await.unwrap(),
            (data.len() as u64, sha256_hex(&data)),
            "{}",
            b.name
        );
        let range = 5_000_000u64..14_000_123;
        let mut r = waypoint_storage::BlobReader::open(s, "blobs/big.bin", Some(range.clone()))
            .await
            .unwrap();
        let mut got = Vec::new();
        while let Some(chunk) = r.next_chunk().await.unwrap() {
            got.extend_from_slice(&chunk);
        }
        assert_eq!(
            got,
            &data[range.start as usize..range.end as usize],
            "{}",
            b.name
        );
        let ranged = s.get_range("blobs/big.bin", range.clone()).await.unwrap();
        assert_eq!(ranged.as_ref(), got.as_slice(), "{}", b.name);
        // Listing shows exactly the one finished object, no staging leftovers.
        let keys: Vec<String> = s
            .list("blobs")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, ["blobs/big.bin"], "{}", b.name);
    }
}

/// The digest of `blob` by the streaming path and by the read-it-all path (which must agree), and
/// the bytes.
async fn read_both(
    s: &waypoint_storage::Store,
    name: &str,
    scheme: waypoint_storage::DigestScheme,
) -> (Bytes, String) {
    let r = waypoint_storage::BlobReader::open(s, "blob", None)
        .await
        .unwrap();
    let len = r.len();
    let (n, streamed) = r.with_digest(scheme).drain().await.unwrap();
    assert_eq!(n, len);
    let r = waypoint_storage::BlobReader::open(s, "blob", None)
        .await
        .unwrap();
    let (all, whole) = r.with_digest(scheme).read_all().await.unwrap();
    assert_eq!(streamed, whole, "{name}: both paths agree");
    (all, whole)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn part_digests_catch_a_flipped_byte_in_every_part_position() {
    use waypoint_storage::DigestScheme;
    // Small parts in the reader (the digest scheme is the reader's, not the store's), so a 1 MiB blob
    // has 8 parts; a byte flipped at the start, middle and end of each is caught, on every backend,
    // by the streaming path (drain) and the read-it-all path (read_all).
    let part = 128u64 << 10;
    let data = pattern((1 << 20) + 777, 9);
    let want = part_digest_hex(&data, part as usize);
    for b in each("flip") {
        let s = &b.store;
        s.put("blob", Bytes::from(data.clone())).await.unwrap();
        let (all, got) = read_both(s, b.name, DigestScheme::Parts(part)).await;
        assert_eq!(
            (all.as_ref(), got.as_str()),
            (data.as_slice(), want.as_str()),
            "{}",
            b.name
        );
        let (_, whole) = read_both(s, b.name, DigestScheme::Whole).await;
        assert_eq!(
            whole,
            sha256_hex(&data),
            "{}: older manifests' scheme",
            b.name
        );
        let parts = data.len().div_ceil(part as usize);
        let mut positions = Vec::new();
        for p in 0..parts {
            let start = p * part as usize;
            let end = (start + part as usize).min(data.len());
            positions.extend([start, (start + end) / 2, end - 1]);
        }
        for at in positions {
            let mut bad = data.clone();
            bad[at] ^= 0x01;
            s.put("blob", Bytes::from(bad)).await.unwrap();
            let (_, got) = read_both(s, b.name, DigestScheme::Parts(part)).await;
            assert_ne!(got, want, "{}: byte {at} flipped went unnoticed", b.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_and_empty_blobs_are_single_puts() {
    for b in each("small") {
        let s = &b.store;
        let mut w = waypoint_storage::BlobWriter::new(s, "cfg/config.json").unwrap();
        w.write(b"{\"a\":").await.unwrap();
        w.write(b"1}").await.unwrap();
        let info = w.finish().await.unwrap();
        assert_eq!(info.sha256, sha256_hex(b"{\"a\":1}"));
        assert_eq!(
            s.get("cfg/config.json").await.unwrap(),
            Bytes::from_static(b"{\"a\":1}")
        );
        let empty = waypoint_storage::BlobWriter::new(s, "cfg/empty")
            .unwrap()
            .finish()
            .await
            .unwrap();
        assert_eq!(
            (empty.bytes, empty.sha256.as_str()),
            (0, sha256_hex(b"").as_str()),
            "{}",
            b.name
        );
        assert_eq!(s.head("cfg/empty").await.unwrap().size, 0, "{}", b.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_and_dropped_writes_leave_nothing_visible() {
    let data = pattern(12 * 1024 * 1024, 3); // two parts sent before the abort
    for b in each("abort") {
        let s = &b.store;
        let mut w = waypoint_storage::BlobWriter::new(s, "blobs/aborted.bin").unwrap();
        w.write(&data).await.unwrap();
        w.abort().await.unwrap();
        let mut w = waypoint_storage::BlobWriter::new(s, "blobs/dropped.bin").unwrap();
        w.write(&data).await.unwrap();
        drop(w);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        for key in ["blobs/aborted.bin", "blobs/dropped.bin"] {
            assert!(!s.exists(key).await.unwrap(), "{}: {key} visible", b.name);
        }
        assert!(
            s.list("blobs").await.unwrap().is_empty(),
            "{}: leftovers listed",
            b.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_objects() {
    for b in each("copy") {
        let s = &b.store;
        s.put(
            "checkpoints/step-000001/sampler/model.safetensors",
            Bytes::from_static(b"weights"),
        )
        .await
        .unwrap();
        s.copy(
            "checkpoints/step-000001/sampler/model.safetensors",
            "models/m/model.safetensors",
        )
        .await
        .unwrap();
        assert_eq!(
            s.get("models/m/model.safetensors").await.unwrap(),
            Bytes::from_static(b"weights")
        );
        let sub = s.sub_store("models/m").unwrap();
        assert_eq!(
            sub.get("model.safetensors").await.unwrap(),
            Bytes::from_static(b"weights"),
            "{}",
            b.name
        );
        let keys: Vec<String> = sub
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, ["model.safetensors"], "{}", b.name);
    }
}
