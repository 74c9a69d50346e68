//! The manifest, `checkpoints/step-XXXXXX.json`: written last and create-only, its existence is the
//! commit. It lists every file of the checkpoint with size and digest, and the counters resume needs.
//!
//! Format 2 records each file's digest as sha256s of fixed-size parts combined S3's way, with the
//! part size (`part_size`); format 1 (still read) recorded the plain sha256 of each whole file.

use crate::StepName;
use serde::{Deserialize, Serialize};

use crate::error::{CheckpointError, Result};
use crate::file_entry::FileEntry;
use crate::kind::CheckpointKind;

/// The manifest format this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 2;

/// What a delta sampler checkpoint was made against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaBase {
    /// The base checkpoint (an INFERENCE_BASE one of the same run).
    pub name: String,
    /// The base's sampler files it was computed against, with their sha256.
    pub files: Vec<FileEntry>,
}

/// A committed checkpoint's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version.
    pub format_version: u32,
    /// `step-XXXXXX`.
    pub name: String,
    /// Optimizer steps done.
    pub step: u64,
    /// Samples consumed from the dataset, counted globally across ranks.
    pub data_consumed: u64,
    /// Epoch the data position is in.
    #[serde(default)]
    pub epoch: u64,
    /// Kinds recorded at save time (for people; tools re-detect them from the blobs).
    pub kinds: Vec<CheckpointKind>,
    /// Ranks that wrote it.
    pub world_size: u32,
    /// The fencing token of the writer.
    pub attempt: u64,
    /// sha256 of the configuration that decides whether a resume is sound.
    pub config_fingerprint: String,
    /// Milliseconds since the Unix epoch when it was committed.
    pub created_unix_ms: u64,
    /// Every file of the checkpoint.
    pub files: Vec<FileEntry>,
    /// For a delta sampler checkpoint: its base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_base: Option<DeltaBase>,
    /// Everything that decided the trajectory up to this step, by name (model and LoRA, AdamW,
    /// clipping, schedule, batch, sequence length, seed, the data's content fingerprint, the
    /// recipe): what a restart is compared with, and what a PyTorch loop continues with. Absent in
    /// checkpoints older than it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<serde_json::Value>,
}

impl Manifest {
    /// The step name.
    pub fn step_name(&self) -> StepName {
        StepName::new(self.step)
    }

    /// Files under `dcp/`.
    pub fn dcp_files(&self) -> impl Iterator<Item = &FileEntry> {
        self.files.iter().filter(|f| f.is_dcp())
    }

    /// Files under `sampler/`.
    pub fn sampler_files(&self) -> impl Iterator<Item = &FileEntry> {
        self.files.iter().filter(|f| f.is_sampler())
    }

    /// Total bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }

    /// Serializes (pretty JSON).
    pub fn to_json(&self) -> Result<Vec<u8>> {
        crate::error::to_json_pretty("a manifest", self)
    }

    /// Parses and validates a manifest read from `key`.
    pub fn parse(key: &str, bytes: &[u8]) -> Result<Self> {
        let bad = |reason: String| CheckpointError::BadManifest {
            key: key.to_string(),
            reason,
        };
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(format!("{e}")))?;
        if m.format_version == 0 || m.format_version > FORMAT_VERSION {
            return Err(bad(format!(
                "format_version {} is not one this waypoint reads (1..={FORMAT_VERSION}); upgrade waypoint",
                m.format_version
            )));
        }
        let name: StepName = m.name.parse().map_err(|e| bad(format!("{e}")))?;
        if name.step() != m.step {
            return Err(bad(format!("name {} but step {}", m.name, m.step)));
        }
        // The manifest's own name must be the name of the object it is stored as: a manifest
        // copied under another step's name is not that checkpoint.
        if let Some(stem) = key
            .rsplit('/')
            .next()
            .and_then(|f| f.strip_suffix(".json"))
            .filter(|stem| stem.starts_with("step-"))
        {
            if stem != m.name {
                return Err(bad(format!(
                    "it says it is {} but is stored as {stem}; a manifest copied or renamed is not \
                     that checkpoint",
                    m.name
                )));
            }
        }
        if m.data_consumed > i64::MAX as u64 || m.epoch > m.data_consumed {
            return Err(bad(format!(
                "data_consumed {} / epoch {} are impossible counters",
                m.data_consumed, m.epoch
            )));
        }
        if m.world_size == 0 {
            return Err(bad("world_size is 0".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for f in m
            .files
            .iter()
            .chain(m.delta_base.iter().flat_map(|d| d.files.iter()))
        {
            check_file_path(&f.path).map_err(bad)?;
            check_digest(f).map_err(bad)?;
        }
        for f in &m.files {
            if !seen.insert(f.path.as_str()) {
                return Err(bad(format!("{} is listed twice", f.path)));
            }
        }
        Ok(m)
    }
}

/// A file's digest: 64 hex digits, or with a part size `<64 hex>-N` where N is the number of parts
/// of that size the file has.
fn check_digest(f: &FileEntry) -> std::result::Result<(), String> {
    use waypoint_storage::digest::{parse_digest, part_count};
    let Some(parts) = parse_digest(&f.sha256) else {
        return Err(format!(
            "{}: sha256 {:?} is not 64 hex digits (or 64 hex digits, `-` and a part count)",
            f.path, f.sha256
        ));
    };
    match f.part_size {
        Some(0) => Err(format!("{}: part_size 0", f.path)),
        Some(p) if parts != 1 && parts != part_count(f.bytes, p) => Err(format!(
            "{}: digest of {parts} parts, but {} bytes in parts of {p} make {}",
            f.path,
            f.bytes,
            part_count(f.bytes, p)
        )),
        None if parts != 1 => Err(format!(
            "{}: a digest of {parts} parts needs the part_size",
            f.path
        )),
        _ => Ok(()),
    }
}

/// A file path inside a checkpoint: `dcp/` or `sampler/` then safe segments.
fn check_file_path(path: &str) -> std::result::Result<(), String> {
    let mut parts = path.split('/');
    match parts.next() {
        Some("dcp" | "sampler") => {}
        _ => return Err(format!("file {path:?} is not under dcp/ or sampler/")),
    }
    let rest: Vec<&str> = parts.collect();
    if rest.is_empty() {
        return Err(format!("file {path:?} names a folder"));
    }
    for seg in rest {
        crate::validate_name("file name", seg).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            name: "step-000100".into(),
            step: 100,
            data_consumed: 6400,
            epoch: 0,
            kinds: vec![CheckpointKind::Training],
            world_size: 1,
            attempt: 3,
            config_fingerprint: "f".repeat(64),
            created_unix_ms: 1,
            files: vec![FileEntry {
                path: "dcp/model-00001-of-00001.safetensors".into(),
                bytes: 10,
                sha256: format!("{}-3", "a".repeat(64)),
                rank: 0,
                part_size: Some(4),
            }],
            delta_base: None,
            training: None,
        }
    }

    #[test]
    fn round_trips() {
        let m = sample();
        assert_eq!(Manifest::parse("k", &m.to_json().unwrap()).unwrap(), m);
    }

    #[test]
    fn reads_format_1_manifests() {
        // As waypoint wrote them before part digests: no part_size, a plain sha256 per file.
        let mut m = sample();
        m.format_version = 1;
        m.files[0].sha256 = "b".repeat(64);
        m.files[0].part_size = None;
        let json = String::from_utf8(m.to_json().unwrap()).unwrap();
        assert!(!json.contains("part_size"), "{json}");
        assert_eq!(Manifest::parse("k", json.as_bytes()).unwrap(), m);
    }

    #[test]
    fn rejects_inconsistent_manifests_naming_the_problem() {
        type Mutation = Box<dyn Fn(&mut Manifest)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|m| m.step = 5), "name step-000100 but step 5"),
            (Box::new(|m| m.name = "step-1".into()), "at least 6 digits"),
            (Box::new(|m| m.format_version = 99), "upgrade waypoint"),
            (Box::new(|m| m.world_size = 0), "world_size"),
            (
                Box::new(|m| m.files[0].path = "../x".into()),
                "not under dcp/",
            ),
            (Box::new(|m| m.files[0].path = "dcp/../../x".into()), "`..`"),
            (Box::new(|m| m.files[0].sha256 = "zz".into()), "64 hex"),
            (Box::new(|m| m.files[0].part_size = Some(3)), "make 4"),
            (
                Box::new(|m| m.files[0].part_size = None),
                "needs the part_size",
            ),
            (Box::new(|m| m.files[0].part_size = Some(0)), "part_size 0"),
            (
                Box::new(|m| m.files.push(m.files[0].clone())),
                "listed twice",
            ),
            (
                Box::new(|m| m.data_consumed = u64::MAX),
                "impossible counters",
            ),
            (Box::new(|m| m.epoch = 7000), "impossible counters"),
        ];
        for (mutate, want) in cases {
            let mut m = sample();
            mutate(&mut m);
            let e = Manifest::parse("checkpoints/step-000100.json", &m.to_json().unwrap())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(want) && e.contains("step-000100.json"),
                "{want}: {e}"
            );
        }
        // A manifest copied under another step's name is not that checkpoint.
        let e = Manifest::parse(
            "run/checkpoints/step-000008.json",
            &sample().to_json().unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("stored as step-000008"), "{e}");
        let e = Manifest::parse("k", b"{\"format_version\": 1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad manifest"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = Manifest::parse("fuzz", &bytes);
        }

        #[test]
        fn mutated_manifests_never_panic(i in 0usize..2000, b in proptest::num::u8::ANY) {
            let mut json = sample().to_json().unwrap();
            let at = i % json.len();
            json[at] = b;
            let _ = Manifest::parse("fuzz", &json);
        }
    }
}
