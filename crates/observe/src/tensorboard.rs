//! TensorBoard event files: the record framing and the few protobuf messages scalars need.
//!
//! A file is a sequence of records — `u64` length, masked CRC32C of the length, the bytes, masked
//! CRC32C of the bytes (little-endian) — each holding an `Event` (tensorflow/core/util/event.proto).
//! The first event names the format (`brain.Event:2`); the second is a `SessionLog` `START` at the
//! first step this attempt runs, which tells readers (TensorBoard's `EventAccumulator`) to drop what
//! earlier files recorded from that step on: a resumed run redoes the steps after its checkpoint, and
//! each step then shows once, with the values of the attempt that kept it. One file per attempt.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::metrics::RECIPE_METRICS;

/// `tensorflow.Event`: the fields waypoint writes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// Seconds since the Unix epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// The global step.
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// What the event holds.
    #[prost(oneof = "What", tags = "3, 5, 7")]
    pub what: Option<What>,
}

/// `Event.what`: the kinds of event waypoint writes.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    /// The format version, in the first event of a file.
    #[prost(string, tag = "3")]
    FileVersion(String),
    /// Scalars.
    #[prost(message, tag = "5")]
    Summary(Summary),
    /// A session start (a new attempt).
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    /// The values.
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with a `simple_value` (a scalar).
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    /// The tag (the curve's name).
    #[prost(string, tag = "1")]
    pub tag: String,
    /// The scalar. In TensorFlow's proto it is a member of the `value` oneof, so it is encoded
    /// whenever set — 0.0 included (a plain proto3 float would drop a zero: an lr of 0 at the
    /// first warmup step would vanish from the curve).
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// `tensorflow.SessionLog`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionLog {
    /// 1 = `START`.
    #[prost(int32, tag = "1")]
    pub status: i32,
    /// A note.
    #[prost(string, tag = "3")]
    pub msg: String,
}

/// `SessionLog.SessionStatus.START`.
const SESSION_START: i32 = 1;

/// The event format version written first in every file.
pub const FILE_VERSION: &str = "brain.Event:2";

/// CRC32C masked as the TFRecord format does.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One record of an event file around `data`.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// The record of `event`.
pub fn event_record(event: &Event) -> Vec<u8> {
    record(&prost::Message::encode_to_vec(event))
}

/// The scalars of one line of `logs/metrics.jsonl`, as TensorBoard tags. Fields absent from the line
/// (eval loss between evaluations, the save stall of steps no save held up) give no scalar.
pub fn scalars_of(line: &serde_json::Value) -> Vec<(&'static str, f32)> {
    const TAGS: [(&str, &str); 11] = [
        ("loss", "train/loss"),
        ("lr", "train/lr"),
        ("grad_norm", "train/grad_norm"),
        ("tokens_per_s", "train/tokens_per_s"),
        ("eval_loss", "eval/loss"),
        ("save_stall_s", "checkpoint/save_stall_s"),
        ("save_snapshot_s", "checkpoint/snapshot_s"),
        ("save_upload_s", "checkpoint/upload_s"),
        ("save_commit_latency_s", "checkpoint/commit_latency_s"),
        ("save_overlap_slowdown", "checkpoint/overlap_slowdown"),
        ("pairs_per_s", "train/pairs_per_s"),
    ];
    /// [`RECIPE_METRICS`] under `train/`, in the same order.
    const RECIPE_TAGS: [&str; 9] = [
        "train/rewards/chosen",
        "train/rewards/rejected",
        "train/rewards/accuracies",
        "train/rewards/margins",
        "train/logps/chosen",
        "train/logps/rejected",
        "train/nll_loss",
        "train/log_odds_ratio",
        "train/log_odds_chosen",
    ];
    let recipe = RECIPE_METRICS.iter().zip(RECIPE_TAGS);
    TAGS.iter()
        .map(|(field, tag)| (*field, *tag))
        .chain(recipe.map(|(field, tag)| (*field, tag)))
        .filter_map(|(field, tag)| line[field].as_f64().map(|v| (tag, v as f32)))
        .collect()
}

/// The tag of a checkpoint's save time (start of the write to commit), at the checkpoint's step.
pub const SAVE_SECS_TAG: &str = "checkpoint/save_s";

/// An event file being written: every event is written whole and at once, so a killed process
/// leaves complete records (the operating system keeps what was written).
#[derive(Debug)]
pub struct EventFile {
    file: File,
}

impl EventFile {
    /// Creates `path` (never overwriting) and writes the version event, then — for the first file of
    /// an attempt — a session start at `start.0`, the first step the attempt runs, noted `start.1`.
    pub fn create(path: &Path, start: Option<(u64, &str)>) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().write(true).create_new(true).open(path)?;
        let mut this = Self { file };
        let now = wall_time();
        this.write(&Event {
            wall_time: now,
            step: 0,
            what: Some(What::FileVersion(FILE_VERSION.into())),
        })?;
        if let Some((first_step, note)) = start {
            this.write(&Event {
                wall_time: now,
                step: first_step as i64,
                what: Some(What::SessionLog(SessionLog {
                    status: SESSION_START,
                    msg: note.to_string(),
                })),
            })?;
        }
        Ok(this)
    }

    /// Writes the scalars at `step`.
    pub fn scalars(&mut self, step: u64, scalars: &[(&str, f32)]) -> std::io::Result<()> {
        if scalars.is_empty() {
            return Ok(());
        }
        let value = scalars
            .iter()
            .map(|(tag, v)| SummaryValue {
                tag: tag.to_string(),
                simple_value: Some(*v),
            })
            .collect();
        self.write(&Event {
            wall_time: wall_time(),
            step: step as i64,
            what: Some(What::Summary(Summary { value })),
        })
    }

    fn write(&mut self, event: &Event) -> std::io::Result<()> {
        self.file.write_all(&event_record(event))
    }
}

/// Seconds since the Unix epoch.
fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Test builds: the events of an event file's bytes, every checksum checked.
#[cfg(test)]
pub(crate) fn read_events(mut bytes: &[u8]) -> Vec<Event> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len_bytes: [u8; 8] = bytes[..8].try_into().unwrap();
        let len = u64::from_le_bytes(len_bytes) as usize;
        assert_eq!(
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
            masked_crc(&len_bytes)
        );
        let data = &bytes[12..12 + len];
        assert_eq!(
            u32::from_le_bytes(bytes[12 + len..16 + len].try_into().unwrap()),
            masked_crc(data)
        );
        out.push(<Event as prost::Message>::decode(data).unwrap());
        bytes = &bytes[16 + len..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_frame_and_checksum_as_tfrecord_does() {
        // The masked CRC of the empty string and a known TFRecord length header.
        let r = record(b"");
        assert_eq!(r.len(), 16);
        assert_eq!(&r[..8], &0u64.to_le_bytes());
        assert_eq!(
            u32::from_le_bytes(r[8..12].try_into().unwrap()),
            masked_crc(&0u64.to_le_bytes())
        );
        // crc32c("123456789") = 0xE3069283 (the standard check value), masked.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(
            masked_crc(b"123456789"),
            0xE306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8)
        );
    }

    #[test]
    fn metrics_fields_become_tags_and_absent_fields_none() {
        let line = serde_json::json!({"step": 3, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5,
            "tokens_per_s": 1000.0, "data_consumed": 24});
        let tags: Vec<_> = scalars_of(&line).into_iter().map(|(t, _)| t).collect();
        assert_eq!(
            tags,
            [
                "train/loss",
                "train/lr",
                "train/grad_norm",
                "train/tokens_per_s"
            ]
        );
        let line = serde_json::json!({"eval_loss": 1.5, "save_stall_s": 0.25});
        assert_eq!(
            scalars_of(&line),
            vec![("eval/loss", 1.5), ("checkpoint/save_stall_s", 0.25)]
        );
    }

    #[test]
    fn a_zero_scalar_is_written_not_dropped() {
        use prost::Message;
        let v = SummaryValue {
            tag: "train/lr".into(),
            simple_value: Some(0.0),
        };
        let bytes = v.encode_to_vec();
        // Field 2, fixed32: tag byte 0x15, then four zero bytes.
        assert!(bytes.ends_with(&[0x15, 0, 0, 0, 0]), "{bytes:?}");
        assert_eq!(SummaryValue::decode(&bytes[..]).unwrap(), v);
    }
}
