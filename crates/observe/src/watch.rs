//! What people watch of a run, written by rank 0 beside `logs/metrics.jsonl`: `logs/train.log`, the
//! TensorBoard event files (`logs/tensorboard/`, one per attempt; on object stores in parts of about
//! [`EVENT_PART_BYTES`]), `logs/loss.svg` and `logs/progress.json` (what `waypoint status` reads while
//! the run goes on).
//!
//! On a local store the log and the event files are written in place, line by line and event by
//! event. On an object store they are written to a local copy (under the temp folder:
//! `$TMPDIR/waypoint-logs/<run>/attempt-N/`) and uploaded whole at every checkpoint and at the end;
//! so a run killed without warning loses from the store's copy at most what it logged since its last
//! checkpoint (the local copy keeps it). `train.log` is appended per attempt (an object store's copy is
//! read back at the start). The plot is drawn after every checkpoint's commit (the final one
//! included); `progress.json` is written at most every [`PROGRESS_EVERY`], in the background.
//!
//! Nothing here may stop training: a failure to write these files is a warning.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use waypoint_checkpoint::{now_ms, RunLayout};
use waypoint_storage::Store;

use crate::goodput::{process_start_ms, Goodput, PreviousProgress};
use crate::plot::{render_svg, Curves};
use crate::tensorboard::{scalars_of, EventFile, SAVE_SECS_TAG};
use crate::trainlog;

/// How often `logs/progress.json` is rewritten while steps run.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// On an object store, an event file that reached this size at an upload is closed and the attempt
/// goes on in a new part, so that each checkpoint uploads at most about this much of events (sealed
/// parts go up once), however long the run.
pub const EVENT_PART_BYTES: u64 = 8 << 20;

/// This attempt's event files: the one being written and the sealed parts not yet uploaded.
struct Events {
    /// `None` once writing failed.
    file: Option<EventFile>,
    /// The file being written, under `tensorboard/`.
    name: String,
    /// Sealed parts (written no more) whose last upload is still to do.
    sealed: Vec<String>,
    /// Parts started after the first.
    parts: u32,
}

/// Where the progress of this attempt stands, for `logs/progress.json`.
struct Pace {
    started: Instant,
    first_step: u64,
    last_write: Option<Instant>,
    inflight: Option<JoinHandle<()>>,
    /// The newest loss, lr, tokens/s and eval loss seen.
    last: Value,
    /// The run's goodput over its attempts, this one's steps included.
    goodput: Goodput,
    /// This attempt's first step was seen.
    stepped: bool,
}

/// The watched outputs of one attempt (rank 0).
pub struct Watch {
    store: Store,
    layout: RunLayout,
    handle: Handle,
    attempt: u64,
    total_steps: u64,
    /// The folder of this attempt's `train.log` and `tensorboard/`: the run's `logs/` itself on a
    /// local store, else the local copy.
    dir: PathBuf,
    /// The store is not local: the files are uploaded at checkpoints and at the end.
    upload: bool,
    /// The event files, under `dir/tensorboard/`.
    events: Mutex<Events>,
    /// The size at which an event file is sealed ([`EVENT_PART_BYTES`]).
    part_bytes: u64,
    /// `logs/metrics.jsonl` as of the save in flight.
    metrics: Mutex<String>,
    pace: Mutex<Pace>,
}

impl Watch {
    /// Starts the outputs of attempt `attempt`, which resumes after step `resumed_step` (0 for a
    /// fresh start): attaches `train.log` and creates this attempt's event file.
    pub async fn start(
        store: &Store,
        layout: &RunLayout,
        attempt: u64,
        resumed_step: u64,
        total_steps: u64,
    ) -> Result<Self> {
        let logs = format!("{}/logs", layout.root());
        let (dir, upload) = match store.local_path(&logs) {
            Some(dir) => (dir, false),
            None => (
                std::env::temp_dir()
                    .join("waypoint-logs")
                    .join(layout.root())
                    .join(format!("attempt-{attempt:06}")),
                true,
            ),
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log_path = dir.join("train.log");
        if upload {
            // Appended per attempt: this copy starts from what the store holds.
            let earlier = store
                .get_if_exists(&layout.train_log())
                .await
                .context("reading logs/train.log")?
                .unwrap_or_default();
            std::fs::write(&log_path, &earlier)
                .with_context(|| format!("writing {}", log_path.display()))?;
        }
        trainlog::attach(&log_path).with_context(|| format!("opening {}", log_path.display()))?;
        // The previous attempt's last progress: what this restart costs (see `goodput`).
        let previous = match store.get(&layout.progress()).await {
            Ok(b) => serde_json::from_slice::<Value>(&b)
                .ok()
                .and_then(|v| PreviousProgress::parse(&v)),
            Err(_) => None,
        };
        let goodput = Goodput::start(attempt, resumed_step, process_start_ms(), previous.as_ref());
        let name = event_file_name(attempt, 0);
        let path = dir.join("tensorboard").join(&name);
        let note = format!("attempt {attempt} resumes after step {resumed_step}");
        let file = EventFile::create(&path, Some((resumed_step + 1, &note)))
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(Self {
            store: store.clone(),
            layout: layout.clone(),
            handle: Handle::current(),
            attempt,
            total_steps,
            dir,
            upload,
            events: Mutex::new(Events {
                file: Some(file),
                name,
                sealed: Vec::new(),
                parts: 0,
            }),
            part_bytes: EVENT_PART_BYTES,
            metrics: Mutex::new(String::new()),
            pace: Mutex::new(Pace {
                started: Instant::now(),
                first_step: resumed_step,
                last_write: None,
                inflight: None,
                last: json!({}),
                goodput,
                stepped: false,
            }),
        })
    }

    /// After a step: its scalars into the event file, and `progress.json` when due.
    pub fn step(&self, step: u64, line: &Value) {
        self.scalars(step, &scalars_of(line));
        let mut pace = self.pace.lock().unwrap_or_else(|e| e.into_inner());
        let step_s = line["step_s"].as_f64().unwrap_or(0.0);
        if !pace.stepped {
            pace.stepped = true;
            let ended = line["time_unix_ms"].as_u64().unwrap_or_else(now_ms);
            let began = ended.saturating_sub((step_s * 1000.0) as u64);
            pace.goodput.first_step(process_start_ms(), began);
        }
        pace.goodput.step(step_s);
        for field in ["loss", "lr", "tokens_per_s", "eval_loss"] {
            if let Some(v) = line.get(field) {
                pace.last[field] = v.clone();
            }
        }
        let due = pace
            .last_write
            .is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
        let busy = pace.inflight.as_ref().is_some_and(|h| !h.is_finished());
        if !due || busy {
            return;
        }
        let body = self.progress(&mut pace, step);
        let g = &pace.goodput;
        let scalars = [
            ("goodput/goodput", g.goodput.unwrap_or(0.0) as f32),
            ("goodput/steps_redone", g.steps_redone as f32),
            ("goodput/lost_s", g.lost_s as f32),
        ];
        self.scalars(step, &scalars);
        pace.last_write = Some(Instant::now());
        let (store, key) = (self.store.clone(), self.layout.progress());
        pace.inflight = Some(self.handle.spawn(async move {
            if let Err(e) = store.put(&key, body).await {
                tracing::warn!("could not write logs/progress.json: {e}");
            }
        }));
    }

    /// A save begins: `metrics` is `logs/metrics.jsonl` as of its step (drawn once it commits).
    pub fn saving(&self, metrics: &str) {
        *self.metrics.lock().unwrap_or_else(|e| e.into_inner()) = metrics.to_string();
    }

    /// After the commit of `step`, whose save took `secs`: its save time into the events, the plot
    /// drawn from the metrics as of the save and, on an object store, the log and the event file
    /// uploaded. (After the commit, so that none of this delays it.)
    pub async fn committed(&self, step: u64, secs: f64) {
        self.scalars(step, &[(SAVE_SECS_TAG, secs as f32)]);
        let title = format!("{} — {} steps", self.layout.run_id(), self.total_steps);
        let curves = Curves::from_metrics(&self.metrics.lock().unwrap_or_else(|e| e.into_inner()));
        let drawn = render_svg(&curves, &title);
        let plot = match drawn {
            Ok(svg) => self
                .store
                .put(&self.layout.loss_plot(), Bytes::from(svg))
                .await
                .map_err(anyhow::Error::from),
            Err(e) => Err(e),
        };
        if let Err(e) = plot {
            tracing::warn!("could not draw logs/loss.svg: {e:#}");
        }
        if let Err(e) = self.upload().await {
            tracing::warn!("could not upload the run's logs: {e:#}");
        }
    }

    /// At the end of the attempt (finished, stopped or failed): the last `progress.json`, then the
    /// log closed and uploaded.
    pub async fn close(&self, step: u64) {
        let inflight = {
            let mut pace = self.pace.lock().unwrap_or_else(|e| e.into_inner());
            pace.inflight.take()
        };
        if let Some(h) = inflight {
            let _ = h.await;
        }
        let body = {
            let mut pace = self.pace.lock().unwrap_or_else(|e| e.into_inner());
            self.progress(&mut pace, step)
        };
        if let Err(e) = self.store.put(&self.layout.progress(), body).await {
            tracing::warn!("could not write logs/progress.json: {e}");
        }
        trainlog::detach();
        if let Err(e) = self.upload().await {
            tracing::warn!("could not upload the run's logs: {e:#}");
        }
    }

    fn scalars(&self, step: u64, scalars: &[(&str, f32)]) {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(file) = events.file.as_mut() {
            if let Err(e) = file.scalars(step, scalars) {
                tracing::warn!(
                    "could not write the TensorBoard event file {}: {e}; no more events this attempt",
                    events.name
                );
                events.file = None;
            }
        }
    }

    /// The event files to upload now (name, bytes): the sealed parts not yet uploaded and the one
    /// being written, read under the lock (so they hold whole records); the latter is sealed and a
    /// new part begun when it reached `part_bytes`.
    fn event_files_to_upload(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let dir = self.dir.join("tensorboard");
        let mut out = Vec::new();
        for name in &events.sealed {
            out.push((name.clone(), std::fs::read(dir.join(name))?));
        }
        let current = std::fs::read(dir.join(&events.name)).context("reading the event file")?;
        let full = current.len() as u64 >= self.part_bytes && events.file.is_some();
        out.push((events.name.clone(), current));
        if full {
            let name = event_file_name(self.attempt, events.parts + 1);
            match EventFile::create(&dir.join(&name), None) {
                Ok(file) => {
                    let old = std::mem::replace(&mut events.name, name);
                    events.sealed.push(old);
                    events.file = Some(file);
                    events.parts += 1;
                }
                Err(e) => tracing::warn!("could not start a new TensorBoard event file: {e}"),
            }
        }
        Ok(out)
    }

    /// The body of `progress.json` at `step` (the goodput updated to now).
    fn progress(&self, pace: &mut Pace, step: u64) -> Bytes {
        pace.goodput.update(now_ms());
        let secs = pace.started.elapsed().as_secs_f64();
        let done = step.saturating_sub(pace.first_step);
        let steps_per_s = (done > 0 && secs > 0.0).then(|| done as f64 / secs);
        let eta_s = steps_per_s.map(|r| self.total_steps.saturating_sub(step) as f64 / r);
        let mut body = json!({
            "attempt": self.attempt,
            "step": step,
            "total_steps": self.total_steps,
            "steps_per_s": steps_per_s,
            "eta_s": eta_s,
            "updated_unix_ms": now_ms(),
            "goodput": serde_json::to_value(&pace.goodput).unwrap_or(Value::Null),
        });
        if let (Some(body), Some(last)) = (body.as_object_mut(), pace.last.as_object()) {
            body.extend(last.clone());
        }
        Bytes::from(body.to_string())
    }

    /// On an object store: puts the local copies of `train.log` and this attempt's event file.
    async fn upload(&self) -> Result<()> {
        if !self.upload {
            return Ok(());
        }
        let log =
            std::fs::read(self.dir.join("train.log")).context("reading the local train.log")?;
        self.store
            .put(&self.layout.train_log(), Bytes::from(log))
            .await?;
        for (name, bytes) in self.event_files_to_upload()? {
            let key = format!("{}/{name}", self.layout.tensorboard_dir());
            self.store.put(&key, Bytes::from(bytes)).await?;
            let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
            events.sealed.retain(|n| *n != name);
        }
        Ok(())
    }
}

/// The name of part `part` of attempt `attempt`'s event file, made now: TensorBoard reads the files
/// of a folder in name order, which is the order they were begun (the time first, then the attempt,
/// then the part).
fn event_file_name(attempt: u64, part: u32) -> String {
    let secs = now_ms() / 1000;
    let base = format!("events.out.tfevents.{secs:010}.waypoint.{attempt:06}");
    if part == 0 {
        base
    } else {
        format!("{base}.{part:04}")
    }
}

/// A local file to append a log object `key` of the run to: the object itself on a local store
/// (`false`: nothing to upload), else `temp` under the system's temp folder holding the object's
/// bytes so far (`true`: upload it when done).
async fn appendable_copy(
    store: &Store,
    layout: &RunLayout,
    key: &str,
    temp: &str,
) -> Result<(PathBuf, bool)> {
    if let Some(path) = store.local_path(key) {
        return Ok((path, false));
    }
    let path = std::env::temp_dir()
        .join("waypoint-logs")
        .join(layout.root())
        .join(temp);
    let earlier = store
        .get_if_exists(key)
        .await
        .with_context(|| format!("reading {key}"))?
        .unwrap_or_default();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, &earlier).with_context(|| format!("writing {}", path.display()))?;
    Ok((path, true))
}

/// The whole log of a rank other than 0 (which prints only its warnings and errors on stderr):
/// `logs/ranks/rank-0000N.log`, appended attempt after attempt. On a local store the file is the
/// run's; on object storage a local copy is uploaded when the attempt ends.
pub struct RankLog {
    store: Store,
    key: String,
    path: PathBuf,
    upload: bool,
}

impl RankLog {
    /// Sends this process's log lines (those so far included) to rank `rank`'s file.
    pub async fn start(store: &Store, layout: &RunLayout, rank: u32) -> Result<Self> {
        let key = layout.rank_log(rank);
        let temp = format!("rank-{rank:05}-{}.log", std::process::id());
        let (path, upload) = appendable_copy(store, layout, &key, &temp).await?;
        trainlog::attach(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            store: store.clone(),
            key,
            path,
            upload,
        })
    }

    /// Closes the file (later lines are dropped) and uploads it when the store is remote.
    pub async fn close(self) {
        trainlog::detach();
        if !self.upload {
            return;
        }
        let uploaded = match std::fs::read(&self.path) {
            Ok(body) => self
                .store
                .put(&self.key, Bytes::from(body))
                .await
                .map_err(anyhow::Error::from),
            Err(e) => Err(e.into()),
        };
        match uploaded {
            Ok(()) => {
                let _ = std::fs::remove_file(&self.path);
            }
            Err(e) => tracing::warn!("could not upload {}: {e:#}", self.key),
        }
    }
}

/// A start that failed before its attempt's outputs began (loading the model or the data, say): its
/// log lines so far and `error` are appended to `logs/train.log` all the same.
pub async fn log_failed_start(store: &Store, layout: &RunLayout, error: &str) -> Result<()> {
    let key = layout.train_log();
    let temp = format!("failed-start-{}/train.log", std::process::id());
    let (path, upload) = appendable_copy(store, layout, &key, &temp).await?;
    trainlog::attach(&path).with_context(|| format!("opening {}", path.display()))?;
    trainlog::note(error);
    trainlog::detach();
    if upload {
        store.put(&key, Bytes::from(std::fs::read(&path)?)).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensorboard::{read_events, What};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_an_object_store_events_go_up_in_parts_that_read_as_one_curve() {
        let store = Store::open("memory://watch-parts").unwrap();
        let run_id = format!("parts-{}-{}", std::process::id(), now_ms());
        let layout = RunLayout::new(&run_id, "waypoint").unwrap();
        let mut watch = Watch::start(&store, &layout, 1, 0, 300).await.unwrap();
        watch.part_bytes = 2000;
        for step in 1..=300u64 {
            watch.step(step, &json!({"step": step, "loss": step as f64, "lr": 0.1}));
            if step % 50 == 0 {
                watch.saving(&format!("{{\"step\":{step},\"loss\":1.0,\"lr\":0.1}}\n"));
                watch.committed(step, 0.5).await;
            }
        }
        watch.close(300).await;

        let mut keys: Vec<String> = store
            .list(&layout.tensorboard_dir())
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        keys.sort();
        // 300 steps of ~50 bytes in parts of ~2000 bytes, each sealed at a checkpoint (every 50).
        assert!(keys.len() >= 5, "{keys:?}");
        let (mut losses, mut starts) = (Vec::new(), Vec::new());
        for key in &keys {
            let bytes = store.get(key).await.unwrap();
            let local = std::fs::read(
                watch
                    .dir
                    .join("tensorboard")
                    .join(key.rsplit('/').next().unwrap()),
            );
            assert_eq!(
                local.unwrap(),
                bytes.to_vec(),
                "{key}: the stored part is not the whole file"
            );
            let events = read_events(&bytes);
            assert_eq!(
                events[0].what,
                Some(What::FileVersion("brain.Event:2".into()))
            );
            for e in events {
                match e.what {
                    Some(What::Summary(s)) => losses.extend(
                        s.value
                            .iter()
                            .filter(|v| v.tag == "train/loss")
                            .filter_map(|v| Some((e.step, v.simple_value?))),
                    ),
                    Some(What::SessionLog(l)) => starts.push((e.step, l.status)),
                    _ => {}
                }
            }
        }
        // One session start, in the first part; every step once, in order, across the parts.
        assert_eq!(starts, [(1, 1)]);
        let expected: Vec<(i64, f32)> = (1..=300).map(|s| (s, s as f32)).collect();
        assert_eq!(losses, expected);
        assert!(store.exists(&layout.loss_plot()).await.unwrap());
        assert!(store.exists(&layout.train_log()).await.unwrap());
        let progress: Value =
            serde_json::from_slice(&store.get(&layout.progress()).await.unwrap()).unwrap();
        assert_eq!(
            (progress["step"].as_u64(), progress["loss"].as_f64()),
            (Some(300), Some(300.0))
        );
        let _ = std::fs::remove_dir_all(&watch.dir);
    }
}
