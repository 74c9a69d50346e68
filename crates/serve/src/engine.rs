//! The engine behind the routes: sessions, the training models, and the order of each model's
//! requests. The SDK numbers a training client's requests (`seq_id`, from 1 after the model's
//! creation) and may send them out of order (the chunks of one `forward_backward` go concurrently,
//! the first last); [`Engine::submit`] holds each until those before it have gone, so a model's
//! requests run exactly in the client's order, and a request sent again (a retry) gets the same
//! request id. A request refused at submission keeps its number (the client counts it), so the
//! ones after it are not held forever.
//!
//! The libtorch work runs on one trainer thread, in the order requests are released: a model's
//! requests never overlap, and libtorch's process-wide generator is used by one thread only.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use serde_json::json;
use waypoint_trainer::service::{AdamParams, Datum, LoraSpec, TrainingModel};

use crate::error::ServeError;
use crate::futures::{Category, Futures, Outcome};
use crate::proto;

/// Requests a model may hold waiting for an earlier one.
const MAX_WAITING: usize = 4096;

/// What a training request asks of its model.
#[derive(Debug)]
pub(crate) enum Op {
    /// `forward` (`backward: false`) or `forward_backward` with cross-entropy.
    CrossEntropy { data: Vec<Datum>, backward: bool },
    /// `optim_step`.
    OptimStep(AdamParams),
    /// A request refused at submission: its number is used, nothing runs.
    Refused,
}

/// The trainer thread's work.
enum Job {
    Create {
        model_id: String,
        dir: PathBuf,
        spec: LoraSpec,
        request: String,
    },
    Run {
        model_id: String,
        op: Op,
        request: Option<String>,
    },
}

struct ModelEntry {
    base: String,
    lora_rank: i64,
    /// The next request to release.
    next_seq: i64,
    /// Requests waiting for an earlier one, by number.
    waiting: BTreeMap<i64, (Option<String>, Op)>,
    /// The request id of each number seen (a retry gets the same).
    requests: HashMap<i64, Option<String>>,
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, ()>,
    models: HashMap<String, ModelEntry>,
}

/// Sessions, models, and the trainer thread.
pub(crate) struct Engine {
    state: Mutex<State>,
    futures: Arc<Futures>,
    jobs: Mutex<mpsc::Sender<Job>>,
    /// The base models clients may train, by name.
    bases: BTreeMap<String, PathBuf>,
}

impl Engine {
    /// An engine serving `bases` (name → Hugging Face directory), its trainer thread started.
    pub(crate) fn start(bases: BTreeMap<String, PathBuf>) -> Result<Arc<Self>, ServeError> {
        let futures = Arc::new(Futures::default());
        let (jobs, inbox) = mpsc::channel();
        let posted = futures.clone();
        std::thread::Builder::new()
            .name("trainer".into())
            .spawn(move || train(inbox, &posted))
            .map_err(|e| ServeError::Start(format!("starting the trainer thread: {e}")))?;
        Ok(Arc::new(Self {
            state: Mutex::default(),
            futures,
            jobs: Mutex::new(jobs),
            bases,
        }))
    }

    /// The futures of the requests.
    pub(crate) fn futures(&self) -> &Futures {
        &self.futures
    }

    /// The base models served, by name.
    pub(crate) fn bases(&self) -> impl Iterator<Item = &str> {
        self.bases.keys().map(String::as_str)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, job: Job) -> Result<(), ServeError> {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.send(job)
            .map_err(|_| ServeError::Internal("the trainer thread is gone".into()))
    }

    /// A new session's id.
    pub(crate) fn create_session(&self) -> String {
        let id = format!("s{:016x}", random_u64());
        self.state().sessions.insert(id.clone(), ());
        id
    }

    /// Whether `session` was created here.
    pub(crate) fn has_session(&self, session: &str) -> bool {
        self.state().sessions.contains_key(session)
    }

    /// Starts creating the LoRA model `<session>:train:<seq>` on base `base`; its request id and
    /// model id.
    pub(crate) fn create_model(
        &self,
        session: &str,
        model_seq_id: i64,
        base: &str,
        spec: LoraSpec,
    ) -> Result<(String, String), ServeError> {
        let dir = self.bases.get(base).cloned().ok_or_else(|| {
            ServeError::BadRequest(format!(
                "base_model {base:?} is not served here; served: {:?} (each given to `waypoint \
                 serve` as --base_model NAME=DIR)",
                self.bases.keys().collect::<Vec<_>>()
            ))
        })?;
        let mut state = self.state();
        if !state.sessions.contains_key(session) {
            return Err(ServeError::NotFound(format!(
                "session {session:?} is unknown: create one first (create_session)"
            )));
        }
        let model_id = format!("{session}:train:{model_seq_id}");
        if state.models.contains_key(&model_id) {
            return Err(ServeError::BadRequest(format!(
                "model {model_id} exists already: model_seq_id {model_seq_id} was used in this \
                 session"
            )));
        }
        let request = self.futures.open();
        state.models.insert(
            model_id.clone(),
            ModelEntry {
                base: base.to_string(),
                lora_rank: spec.rank,
                next_seq: 1,
                waiting: BTreeMap::new(),
                requests: HashMap::new(),
            },
        );
        // Sent under the lock: the model's first request cannot overtake its creation.
        self.send(Job::Create {
            model_id: model_id.clone(),
            dir,
            spec,
            request: request.clone(),
        })?;
        Ok((request, model_id))
    }

    /// The base model and LoRA rank of model `model_id`.
    pub(crate) fn model_info(&self, model_id: &str) -> Result<(String, i64), ServeError> {
        let state = self.state();
        let m = state
            .models
            .get(model_id)
            .ok_or_else(|| unknown_model(model_id))?;
        Ok((m.base.clone(), m.lora_rank))
    }

    /// Takes request `seq` of model `model_id`: released to the trainer once every earlier one
    /// was; its request id (`None` for [`Op::Refused`], which only uses its number). A number
    /// seen before gets the request id it got then, and nothing runs again.
    pub(crate) fn submit(
        &self,
        model_id: &str,
        seq: i64,
        op: Op,
    ) -> Result<Option<String>, ServeError> {
        let mut state = self.state();
        let m = state
            .models
            .get_mut(model_id)
            .ok_or_else(|| unknown_model(model_id))?;
        if let Some(request) = m.requests.get(&seq) {
            return Ok(request.clone());
        }
        if seq < m.next_seq {
            return Err(ServeError::BadRequest(format!(
                "seq_id {seq} of model {model_id} is behind the requests already run (next: {})",
                m.next_seq
            )));
        }
        if m.waiting.len() >= MAX_WAITING {
            return Err(ServeError::BadRequest(format!(
                "model {model_id} holds {MAX_WAITING} requests waiting for seq_id {}: send it",
                m.next_seq
            )));
        }
        let request = (!matches!(op, Op::Refused)).then(|| self.futures.open());
        m.requests.insert(seq, request.clone());
        m.waiting.insert(seq, (request.clone(), op));
        while let Some((request, op)) = m.waiting.remove(&m.next_seq) {
            m.next_seq += 1;
            self.send(Job::Run {
                model_id: model_id.to_string(),
                op,
                request,
            })?;
        }
        Ok(request)
    }
}

fn unknown_model(model_id: &str) -> ServeError {
    ServeError::NotFound(format!(
        "model {model_id:?} is unknown here (created by create_model in this server's life)"
    ))
}

/// The trainer thread: runs the jobs in order and posts their outcomes.
fn train(inbox: mpsc::Receiver<Job>, futures: &Futures) {
    let mut models: HashMap<String, Result<TrainingModel, String>> = HashMap::new();
    while let Ok(job) = inbox.recv() {
        match job {
            Job::Create {
                model_id,
                dir,
                spec,
                request,
            } => {
                let made = TrainingModel::lora(&dir, spec).map_err(|e| format!("{e:#}"));
                let outcome = match &made {
                    Ok(_) => {
                        tracing::info!(model = %model_id, rank = spec.rank, "training client created");
                        Outcome::Json(json!({"model_id": model_id, "type": "create_model"}))
                    }
                    Err(e) => {
                        tracing::warn!(model = %model_id, "creating a training client failed: {e}");
                        failed(Category::User, format!("creating model {model_id}: {e}"))
                    }
                };
                futures.post(&request, outcome);
                models.insert(model_id, made);
            }
            Job::Run {
                model_id,
                op,
                request,
            } => {
                let outcome = match models.get_mut(&model_id) {
                    Some(Ok(model)) => run(model, op),
                    Some(Err(e)) => failed(
                        Category::User,
                        format!("model {model_id} could not be created: {e}"),
                    ),
                    None => failed(Category::Server, format!("model {model_id} is not here")),
                };
                if let Some(request) = request {
                    futures.post(&request, outcome);
                }
            }
        }
    }
}

fn failed(category: Category, error: String) -> Outcome {
    Outcome::Failed { error, category }
}

/// One request on its model.
fn run(model: &mut TrainingModel, op: Op) -> Outcome {
    match op {
        Op::CrossEntropy { data, backward } => {
            if let Err(e) = model.check(&data) {
                return failed(Category::User, format!("{e:#}"));
            }
            match model.forward(&data, backward) {
                Ok(out) => {
                    let record = proto::ArrayRecord {
                        type_tag: String::new(),
                        fields: [("logprobs".to_string(), proto::batched_f32(&out.logprobs))]
                            .into(),
                        num_datums: out.logprobs.len() as i64,
                    };
                    let output = proto::ForwardBackwardOutput {
                        loss_fn_output_type: "ArrayRecord".into(),
                        loss_fn_outputs: vec![record],
                        metrics: [("loss:sum".to_string(), out.loss_sum)].into(),
                    };
                    Outcome::Proto(prost::Message::encode_to_vec(&output))
                }
                Err(e) => failed(Category::Server, format!("{e:#}")),
            }
        }
        Op::OptimStep(p) => match model.optim_step(p) {
            Ok(s) => Outcome::Json(json!({"metrics": {"grad_norm": s.grad_norm}})),
            Err(e) => failed(Category::User, format!("{e:#}")),
        },
        Op::Refused => failed(Category::User, "refused at submission".into()),
    }
}

/// A number no client guesses (ids of sessions).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}
