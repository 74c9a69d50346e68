//! `logs/train.log`: the process's log lines, as printed on stderr but without colour codes, kept in
//! a file of the run.
//!
//! The command line's log subscriber writes every line twice: to stderr and to [`writer`] (both
//! through the one redaction). Until the run knows its folder (rank 0, once the attempt is taken),
//! lines wait in memory (at most [`BUFFER_LIMIT`] bytes); [`attach`] then appends them to the file and
//! every later line goes straight to it, one `write` per line, so a killed process leaves every line
//! it logged (the operating system keeps what was written). Other ranks never attach.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

/// The target of log lines meant for the file only: the step lines a progress bar stands for on a
/// terminal (the command line's stderr layer leaves this target out).
pub const FILE_ONLY: &str = "waypoint::train_log";

/// Bytes of log kept in memory before the file is attached; later lines are not kept.
pub const BUFFER_LIMIT: usize = 1 << 20;

enum Sink {
    /// Not attached yet: the lines so far.
    Buffer(Vec<u8>),
    /// Attached: every line is written through.
    File(File),
    /// Detached at the end (or after a write failed): lines are dropped.
    Closed,
}

static SINK: Mutex<Sink> = Mutex::new(Sink::Buffer(Vec::new()));

/// The writer of log lines into `train.log` (give it to the subscriber's file layer).
#[derive(Debug, Clone, Copy, Default)]
pub struct Writer;

/// The log file's writer.
pub fn writer() -> Writer {
    Writer
}

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut sink = SINK.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *sink {
            Sink::Buffer(b) => {
                if b.len() + buf.len() <= BUFFER_LIMIT {
                    b.extend_from_slice(buf);
                }
            }
            Sink::File(f) => {
                if f.write_all(buf).is_err() {
                    // A full disk must not stop training; the run's other records still tell.
                    *sink = Sink::Closed;
                }
            }
            Sink::Closed => {}
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Appends the lines so far to `path` (created with its folder if missing) and sends every later
/// line there.
pub fn attach(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = OpenOptions::new().create(true).append(true).open(path)?;
    let mut sink = SINK.lock().unwrap_or_else(|e| e.into_inner());
    if let Sink::Buffer(b) = &*sink {
        file.write_all(b)?;
    }
    *sink = Sink::File(file);
    Ok(())
}

/// Writes one line to the file only (what the process prints outside the log, such as its final
/// error), redacted like every log line.
pub fn note(line: &str) {
    let text = waypoint_storage::redact_text(line);
    let _ = Writer.write_all(format!("{}\n", text.trim_end()).as_bytes());
}

/// Stops writing to the file (before its last upload); later lines are dropped.
pub fn detach() {
    *SINK.lock().unwrap_or_else(|e| e.into_inner()) = Sink::Closed;
}
