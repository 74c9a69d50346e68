//! What people read of an error: its text with secrets masked, and a hint where one helps; and the
//! writer that masks secrets in every log line.

/// The text of an error as it is printed and persisted (stderr, `status.json`, the torchrun error
/// file): secrets inside URIs masked, and a hint for errors people can act on (CUDA running out of
/// memory says what to lower).
pub fn explain(error: &anyhow::Error) -> String {
    let text = waypoint_storage::redact_text(&format!("{error:#}"));
    if text.contains("out of memory") {
        format!(
            "{text}\nhint: the GPU ran out of memory; lower --batch_size or --max_seq_len (raise \
             --gradient_accumulation to keep the global batch), or use --lora_rank"
        )
    } else {
        text
    }
}

/// A writer that starts every write (one log event) with a prefix: a worker's rank on the stderr it
/// shares with the other workers of a launcher.
pub struct Prefixed<W>(pub std::sync::Arc<str>, pub W);

impl<W: std::io::Write> std::io::Write for Prefixed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut line = Vec::with_capacity(self.0.len() + buf.len());
        line.extend_from_slice(self.0.as_bytes());
        line.extend_from_slice(buf);
        // One write, so lines of workers sharing a pipe do not interleave mid-line.
        self.1.write_all(&line)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.1.flush()
    }
}

/// A writer that masks secrets inside URIs ([`waypoint_storage::redact_text`]) in what passes
/// through it; the log goes through one, so no line of it carries a credential.
pub struct Redacting<W>(pub W);

impl<W: std::io::Write> std::io::Write for Redacting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The log writes each event whole, so a URI is never split between two writes.
        let text = String::from_utf8_lossy(buf);
        if text.contains("//") {
            self.0
                .write_all(waypoint_storage::redact_text(&text).as_bytes())?;
        } else {
            self.0.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}
