//! What this server (and any before it over the same storage) has trained, read back from
//! storage: the training runs under `--checkpoint_base_uri` — one a training client — and the
//! checkpoints their clients named, as the SDK's `RestClient` lists them (`list_training_runs`,
//! `get_training_run`, `list_checkpoints`, `list_user_checkpoints`,
//! `get_weights_info_by_tinker_path`; the `tinker run …` and `tinker checkpoint …` commands).
//! Storage is the truth: a restarted server lists what the one before it made.
//!
//! A run's model (base model and LoRA) is in its attempt record, written when its client was
//! made; its last request time is its `status.json`'s (written at its creation, each save, every
//! `--status_every_secs` while it lives, and its end); its checkpoints are its name records
//! (`names`), newest first.

use futures::stream::{self, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use waypoint_checkpoint::RunLayout;
use waypoint_storage::{StorageError, Store};
use waypoint_trainer::service::Identity;

use crate::error::ServeError;
use crate::names::{self, Kind, Record, TinkerPath};

/// The most items one page lists.
pub(crate) const MAX_PAGE: usize = 10_000;

/// Runs read at once when listing.
const READ_AT_ONCE: usize = 16;

/// A page's place in a list: `offset` items skipped, at most `limit` shown.
#[derive(Debug, Clone, Copy, Deserialize)]
pub(crate) struct Page {
    #[serde(default)]
    pub(crate) offset: usize,
    pub(crate) limit: Option<usize>,
}

impl Page {
    /// `items`' page, and the SDK's cursor over them (`limit` defaulting to `default`).
    pub(crate) fn of<T>(
        self,
        items: Vec<T>,
        default: usize,
    ) -> Result<(Vec<T>, Value), ServeError> {
        let limit = self.limit.unwrap_or(default);
        if limit > MAX_PAGE {
            return Err(ServeError::BadRequest(format!(
                "limit {limit}: a page lists at most {MAX_PAGE}; ask for the rest with offset"
            )));
        }
        let total = items.len();
        let page = items.into_iter().skip(self.offset).take(limit).collect();
        let cursor = json!({"offset": self.offset, "limit": limit, "total_count": total});
        Ok((page, cursor))
    }
}

/// A checkpoint a client named: its name, of which kind, and its name record.
#[derive(Debug, Clone)]
pub(crate) struct Named {
    pub(crate) model_id: String,
    pub(crate) kind: Kind,
    pub(crate) name: String,
    pub(crate) record: Record,
}

impl Named {
    /// As the SDK's `Checkpoint` has it.
    pub(crate) fn to_json(&self) -> Value {
        json!({
            "checkpoint_id": format!("{}/{}", self.kind.segment(), self.name),
            "checkpoint_type": self.kind.checkpoint_type(),
            "time": self.record.time,
            "tinker_path": TinkerPath::of(&self.model_id, self.kind, &self.name),
            "public": false,
        })
    }
}

/// The model ids of the training runs under the base, each once.
pub(crate) async fn served_models(store: &Store) -> Result<Vec<String>, ServeError> {
    let top = store.list_dir("").await.map_err(|e| listing("", e))?;
    Ok(top
        .prefixes
        .iter()
        .filter_map(|run_id| names::model_of_run(run_id.trim_end_matches('/')))
        .collect())
}

/// The checkpoints model `model_id`'s client named, newest first.
pub(crate) async fn named_checkpoints(
    store: &Store,
    model_id: &str,
) -> Result<Vec<Named>, ServeError> {
    let run = names::run_of(model_id)?;
    let mut named = Vec::new();
    for kind in [Kind::Weights, Kind::Sampler] {
        let dir = names::records_dir(&run, kind);
        let listed = store
            .list(&format!("{dir}/"))
            .await
            .map_err(|e| listing(&dir, e))?;
        for object in listed {
            let Some(name) = object
                .key
                .rsplit('/')
                .next()
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            // (None: removed since it was listed.)
            let Some(bytes) = read(store, &object.key).await? else {
                continue;
            };
            // (A record being written is not listed yet; anything else there is not a name.)
            let Ok(record) = serde_json::from_slice::<Record>(&bytes) else {
                continue;
            };
            named.push(Named {
                model_id: model_id.to_string(),
                kind,
                name: name.to_string(),
                record,
            });
        }
    }
    newest_first(&mut named);
    Ok(named)
}

/// Newest first (a time that does not parse last), then by model and name.
pub(crate) fn newest_first(named: &mut [Named]) {
    named.sort_by(|a, b| {
        time_of(&b.record.time)
            .cmp(&time_of(&a.record.time))
            .then_with(|| (&a.model_id, &a.name).cmp(&(&b.model_id, &b.name)))
    });
}

/// An RFC 3339 time, if `text` is one.
fn time_of(text: &str) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    chrono::DateTime::parse_from_rfc3339(text).ok()
}

/// The model that run `run` trains as its client was made, and when (its attempt record), if
/// recorded.
async fn made(
    store: &Store,
    run: &RunLayout,
) -> Result<Option<(Identity, Option<String>)>, ServeError> {
    let key = run.attempt(1);
    let Some(bytes) = read(store, &key).await? else {
        return Ok(None);
    };
    let record: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ServeError::Internal(format!("{key} is not an attempt record: {e}")))?;
    let identity = match serde_json::from_value(record["info"]["identity"].clone()) {
        Ok(identity) => identity,
        Err(e) => {
            tracing::warn!(%key, "no served model recorded in the attempt record: {e}");
            return Ok(None);
        }
    };
    Ok(Some((identity, time_ms(&record["started_unix_ms"]))))
}

/// An RFC 3339 time from milliseconds since the epoch, if `ms` is a number of them.
fn time_ms(ms: &Value) -> Option<String> {
    ms.as_i64()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.to_rfc3339())
}

/// When run `run`'s `status.json` was last written (RFC 3339), if it was.
async fn last_recorded(store: &Store, run: &RunLayout) -> Result<Option<String>, ServeError> {
    let key = run.status();
    let Some(bytes) = read(store, &key).await? else {
        return Ok(None);
    };
    let status: Value = serde_json::from_slice(&bytes).unwrap_or_default();
    Ok(time_ms(&status["updated_unix_ms"]))
}

/// Model `model_id`'s run as the SDK's `TrainingRun` has it; `None` when no such run is here.
pub(crate) async fn training_run(
    store: &Store,
    model_id: &str,
) -> Result<Option<Value>, ServeError> {
    let run = names::run_of(model_id)?;
    let Some((identity, started)) = made(store, &run).await? else {
        return Ok(None);
    };
    let named = named_checkpoints(store, model_id).await?;
    let newest = |kind: Kind| {
        named
            .iter()
            .find(|n| n.kind == kind)
            .map(Named::to_json)
            .unwrap_or(Value::Null)
    };
    // (A run just made has its attempt record before its status.json.)
    let last = last_recorded(store, &run)
        .await?
        .or(started)
        .unwrap_or_else(|| chrono::DateTime::UNIX_EPOCH.to_rfc3339());
    Ok(Some(json!({
        "training_run_id": model_id,
        "base_model": identity.base_model,
        "model_owner": "",
        "is_lora": true,
        "corrupted": false,
        "lora_rank": identity.lora.rank,
        "last_request_time": last,
        "last_checkpoint": newest(Kind::Weights),
        "last_sampler_checkpoint": newest(Kind::Sampler),
    })))
}

/// Every training run here, newest request first (one that cannot be read is left out, with a
/// warning: the others are still listed).
pub(crate) async fn training_runs(store: &Store) -> Result<Vec<Value>, ServeError> {
    let read = each_run(store, |model_id| async move {
        training_run(store, &model_id).await
    });
    let mut runs: Vec<Value> = read.await?.into_iter().flatten().collect();
    let time = |r: &Value| time_of(r["last_request_time"].as_str().unwrap_or_default());
    runs.sort_by_key(|r| std::cmp::Reverse(time(r)));
    Ok(runs)
}

/// Every checkpoint named in any run here, newest first (a run that cannot be read is left out,
/// with a warning).
pub(crate) async fn all_named(store: &Store) -> Result<Vec<Named>, ServeError> {
    let read = each_run(store, |model_id| async move {
        named_checkpoints(store, &model_id).await
    });
    let mut named: Vec<Named> = read.await?.into_iter().flatten().collect();
    newest_first(&mut named);
    Ok(named)
}

/// What `read` reads of each served run's model, [`READ_AT_ONCE`] runs at a time; a run that
/// cannot be read is left out, with a warning.
async fn each_run<T, Read>(
    store: &Store,
    read: impl Fn(String) -> Read,
) -> Result<Vec<T>, ServeError>
where
    Read: std::future::Future<Output = Result<T, ServeError>>,
{
    let models = served_models(store).await?;
    let read = stream::iter(models)
        .map(|model_id| {
            let reading = read(model_id.clone());
            async move { (reading.await, model_id) }
        })
        .buffered(READ_AT_ONCE)
        .collect::<Vec<_>>()
        .await;
    Ok(read
        .into_iter()
        .filter_map(|(read, model_id)| {
            read.map_err(|e| tracing::warn!(model = model_id, "left out of the list: {e}"))
                .ok()
        })
        .collect())
}

/// The object at `key`, `None` when there is none.
async fn read(store: &Store, key: &str) -> Result<Option<bytes::Bytes>, ServeError> {
    store
        .get_if_exists(key)
        .await
        .map_err(|e| ServeError::Internal(format!("reading {key}: {e}")))
}

fn listing(dir: &str, e: StorageError) -> ServeError {
    ServeError::Internal(format!("listing {dir:?} under --checkpoint_base_uri: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(model: &str, name: &str, time: &str) -> Named {
        Named {
            model_id: model.into(),
            kind: Kind::Weights,
            name: name.into(),
            record: Record {
                checkpoint: "step-000001".into(),
                time: time.into(),
            },
        }
    }

    #[test]
    fn a_page_and_its_cursor() {
        let page = Page {
            offset: 2,
            limit: Some(2),
        };
        let (items, cursor) = page.of((0..5).collect(), 20).unwrap();
        assert_eq!(items, vec![2, 3]);
        assert_eq!(cursor, json!({"offset": 2, "limit": 2, "total_count": 5}));
        let past = Page {
            offset: 9,
            limit: None,
        };
        let (items, cursor) = past.of((0..5).collect::<Vec<i32>>(), 20).unwrap();
        assert!(items.is_empty());
        assert_eq!(cursor["limit"], 20);
        let huge = Page {
            offset: 0,
            limit: Some(MAX_PAGE + 1),
        };
        let err = huge.of(vec![1], 20).unwrap_err().to_string();
        assert!(err.contains("offset"), "{err}");
    }

    #[test]
    fn checkpoints_are_listed_newest_first() {
        let mut all = vec![
            named("s1:train:0", "a", "2026-12-05T09:00:00.5+00:00"),
            named("s3:train:0", "x", "not a time"),
            named("s1:train:0", "b", "2026-12-05T10:00:00+00:00"),
            named("s2:train:0", "a", "2026-12-05T11:00:00+01:00"),
            named("s1:train:0", "c", "2026-12-05T09:00:00+00:00"),
        ];
        newest_first(&mut all);
        let order: Vec<_> = all
            .iter()
            .map(|n| (n.model_id.as_str(), n.name.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                ("s1:train:0", "b"),
                ("s2:train:0", "a"),
                ("s1:train:0", "a"),
                ("s1:train:0", "c"),
                ("s3:train:0", "x")
            ]
        );
    }
}
