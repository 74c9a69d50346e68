//! The engine behind the routes: sessions, the training models, and the order of each model's
//! requests. The SDK numbers a training client's requests (`seq_id`, from 1 after the model's
//! creation) and may send them out of order (the chunks of one `forward_backward` go concurrently,
//! the first last); [`Engine::submit`] holds each until those before it have gone, so a model's
//! requests run exactly in the client's order, and a request sent again (a retry) gets the same
//! request id. A request refused at submission keeps its number (the client counts it), so the
//! ones after it are not held forever.
//!
//! The libtorch and checkpoint work runs on one trainer thread, in the order requests are
//! released: a model's requests never overlap, and libtorch's process-wide generator is used by one
//! thread only. Each model is a run of its own under the checkpoint base ([`crate::names`]); its
//! saves are `step-N` checkpoints through the checkpoint crate, named by the client.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::json;
use tokio::runtime::Handle;
use waypoint_checkpoint::{CheckpointManager, ManagerOptions};
use waypoint_data::tokenizer::Tokenizer;
use waypoint_observe::records::{self, JobState, ResumedFrom, Status};
use waypoint_storage::{StorageError, Store};
use waypoint_trainer::service::{
    identity_of, AdamParams, BaseModel, Datum, Identity, Loss, Request, SampleParams, Sampled,
    Sampling, Saving, TextStop, TrainingModel,
};

use crate::error::ServeError;
use crate::futures::{Category, Futures, Outcome};
use crate::names::{self, Kind, Record, TinkerPath};
use crate::proto;

/// Requests a model may hold waiting for an earlier one.
const MAX_WAITING: usize = 1024;

/// What a training request asks of its model.
#[derive(Debug)]
pub(crate) enum Op {
    /// `forward` (`backward: false`) or `forward_backward` with `loss`.
    Forward {
        data: Vec<Datum>,
        loss: Loss,
        backward: bool,
    },
    /// `optim_step`.
    OptimStep(AdamParams),
    /// `save_state` (`Kind::Weights`) or `save_weights_for_sampler` (`Kind::Sampler`) under `name`.
    Save {
        kind: Kind,
        name: String,
        overwrite: bool,
    },
    /// `load_state`, with or without the optimizer's state.
    Load { path: TinkerPath, optimizer: bool },
    /// `save_weights_and_get_sampling_client`: sampler `sampler_id` over the model as it is.
    Sampler { sampler_id: String },
    /// A request refused at submission: its number is used, nothing runs.
    Refused,
}

/// Where a new model's weights come from.
enum Origin {
    /// A new LoRA on a base model.
    New(Identity),
    /// A checkpoint (`create_training_client_from_state`), with or without its optimizer state.
    Checkpoint { path: TinkerPath, optimizer: bool },
}

/// The trainer thread's work.
enum Job {
    Create {
        model_id: String,
        origin: Origin,
        request: String,
    },
    Run {
        model_id: String,
        op: Op,
        request: Option<String>,
    },
    /// Frees models (a finished session's) and samplers.
    Drop {
        model_ids: Vec<String>,
        sampler_ids: Vec<String>,
    },
    /// Makes sampler `sampler_id` over `source`.
    SamplerFrom {
        sampler_id: String,
        source: SamplerSource,
    },
    /// Samples with sampler `sampler_id`: requests (each with its request id) decoded together
    /// (the trainer joins the ones queued one after another).
    Sample {
        sampler_id: String,
        requests: Vec<(String, Sample)>,
    },
}

/// What a sampler of its own samples (`create_sampling_client`).
#[derive(Debug, Clone)]
pub(crate) enum SamplerSource {
    /// A checkpoint's weights (`model_path`).
    Checkpoint(TinkerPath),
    /// A served base model alone (`base_model`), by name.
    Base(String),
}

impl Job {
    /// The clients' requests it answers.
    fn requests(&self) -> Vec<String> {
        match self {
            Job::Create { request, .. } => vec![request.clone()],
            Job::Run { request, .. } => request.iter().cloned().collect(),
            Job::Sample { requests, .. } => requests.iter().map(|(id, _)| id.clone()).collect(),
            Job::Drop { .. } | Job::SamplerFrom { .. } => Vec::new(),
        }
    }

    /// What it is, for the log.
    fn what(&self) -> &'static str {
        match self {
            Job::Create { .. } => "create_model",
            Job::Run { op, .. } => match op {
                Op::Forward { backward: true, .. } => "forward_backward",
                Op::Forward { .. } => "forward",
                Op::OptimStep(_) => "optim_step",
                Op::Save { .. } => "save",
                Op::Load { .. } => "load",
                Op::Sampler { .. } => "sampler_snapshot",
                Op::Refused => "refused",
            },
            Job::Drop { .. } => "free",
            Job::SamplerFrom { .. } => "make_sampler",
            Job::Sample { .. } => "sample",
        }
    }

    /// The models whose uploads in flight must end before it runs: those whose checkpoints it
    /// reads or numbers, and those it frees (their runs record their newest checkpoint).
    fn waits_for(&self) -> Vec<String> {
        match self {
            Job::Create {
                origin: Origin::Checkpoint { path, .. },
                ..
            } => vec![path.model_id.clone()],
            Job::Run {
                model_id,
                op: Op::Save { .. },
                ..
            } => vec![model_id.clone()],
            Job::Run {
                op: Op::Load { path, .. },
                ..
            } => vec![path.model_id.clone()],
            Job::SamplerFrom {
                source: SamplerSource::Checkpoint(path),
                ..
            } => vec![path.model_id.clone()],
            Job::Drop { model_ids, .. } => model_ids.clone(),
            _ => Vec::new(),
        }
    }
}

/// What an `asample` asks.
#[derive(Debug)]
pub(crate) struct Sample {
    pub(crate) prompt: Vec<i64>,
    pub(crate) params: SampleParams,
    /// Stop strings: a sample ends once its text holds one (the base model's tokenizer decodes).
    pub(crate) stop_strings: Vec<String>,
    /// Whether `params.stop` was given (else the model's end-of-sequence tokens stop).
    pub(crate) stop_given: bool,
    pub(crate) samples: usize,
    pub(crate) prompt_logprobs: bool,
}

/// What a sampler samples from: a training client's model with its adapters as they were when
/// the sampler was made, or a model of its own (made from a checkpoint, or a base model alone).
enum Sampler {
    Client {
        model_id: String,
        snapshot: waypoint_trainer::service::Snapshot,
    },
    Own {
        /// The base model it is over, by name (`None` when its making failed).
        base: Option<String>,
        model: Result<Box<dyn Sampling + Send>, String>,
    },
}

/// What `GET samplers/{id}` says of a sampler.
#[derive(Debug, Clone)]
pub(crate) struct SamplerInfo {
    pub(crate) base_model: String,
    pub(crate) model_path: Option<String>,
}

/// What a client may ask of a model without going through the trainer thread.
#[derive(Debug, Clone)]
pub(crate) struct ModelInfo {
    pub(crate) base_model: String,
    pub(crate) lora_rank: i64,
}

struct ModelEntry {
    /// The request that created it (a retried creation gets it again).
    created_by: String,
    /// The next request to release.
    next_seq: i64,
    /// Requests waiting for an earlier one, by number.
    waiting: BTreeMap<i64, (Option<String>, Op)>,
    /// The request id of each number seen (a retry gets the same).
    requests: HashMap<i64, Option<String>>,
}

/// A live session.
struct Session {
    /// Its training models.
    models: Vec<String>,
    /// Its creation or last heartbeat.
    seen: Instant,
}

/// A sampler made or being made.
struct SamplerEntry {
    info: SamplerInfo,
    /// Its creation or last sample.
    used: Instant,
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, Session>,
    /// Sessions that ended (closed, or heartbeats stopped): their heartbeats get 410.
    finished: std::collections::HashSet<String>,
    models: HashMap<String, ModelEntry>,
}

impl State {
    /// A request of the model or sampler `id` (`<session>:train:<n>`, `<session>:sample:<n>`):
    /// its session is alive, as a heartbeat says.
    fn touch(&mut self, id: &str) {
        if let Some(s) = self.sessions.get_mut(names::session_of(id)) {
            s.seen = Instant::now();
        }
    }
}

/// Why `session`, not live, cannot be used: it finished, or it never was.
fn no_session(state: &State, session: &str) -> ServeError {
    match state.finished.contains(session) {
        true => ServeError::Gone(format!(
            "session {session:?} has finished (closed, or no heartbeat for \
             --session_timeout_secs): its models are freed, its checkpoints kept; make a new \
             ServiceClient"
        )),
        false => ServeError::NotFound(format!(
            "session {session:?} is unknown: create one first (create_session)"
        )),
    }
}

/// Samplers freed before they were made, remembered (their making job skips them).
const FREED_UNMADE_REMEMBERED: usize = 65_536;

/// Finished sessions remembered (for their late heartbeats' 410); past it the memory starts over.
const FINISHED_REMEMBERED: usize = 65_536;

/// How much a server holds at once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Training models, over all sessions (`--max_models`).
    pub(crate) models: usize,
    /// Samplers of one session (`--max_samplers_per_session`): beyond it, the least recently
    /// used goes.
    pub(crate) samplers_per_session: usize,
    /// How often a live model's run's `status.json` is written again (`--status_every_secs`).
    pub(crate) status_every: std::time::Duration,
}

/// Sessions, models, and the trainer thread.
pub(crate) struct Engine {
    state: Mutex<State>,
    futures: Arc<Futures>,
    /// The trainer thread's inbox (`None` once stopping) and the thread.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    trainer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Filled by the trainer thread once a model is made.
    info: Arc<Mutex<HashMap<String, ModelInfo>>>,
    /// The samplers made or being made.
    samplers: Mutex<HashMap<String, SamplerEntry>>,
    /// The models whose making failed (they hold no slot of `max_models`).
    failed: Arc<Mutex<std::collections::HashSet<String>>>,
    /// The base models clients may train, by name.
    bases: Arc<BTreeMap<String, PathBuf>>,
    /// The checkpoint base.
    store: Store,
    /// What it holds at most.
    limits: Limits,
}

impl Engine {
    /// An engine serving `bases` (name → Hugging Face directory), its models' runs in `store`,
    /// holding at most `limits`; its trainer thread started (storage calls through `runtime`).
    pub(crate) fn start(
        bases: BTreeMap<String, PathBuf>,
        store: Store,
        limits: Limits,
        runtime: Handle,
    ) -> Result<Arc<Self>, ServeError> {
        let futures = Arc::new(Futures::default());
        let info = Arc::new(Mutex::new(HashMap::new()));
        let failed = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let bases = Arc::new(bases);
        let (jobs, inbox) = mpsc::channel();
        let trainer = Trainer {
            futures: futures.clone(),
            info: info.clone(),
            failed: failed.clone(),
            bases: bases.clone(),
            store: store.clone(),
            runtime,
            loaded: HashMap::new(),
            tokenizers: HashMap::new(),
            models: HashMap::new(),
            samplers: HashMap::new(),
            uploads: Vec::new(),
            freed_unmade: std::collections::HashSet::new(),
            status_every: limits.status_every,
        };
        let thread = std::thread::Builder::new()
            .name("trainer".into())
            .spawn(move || trainer.run(inbox))
            .map_err(|e| ServeError::Start(format!("starting the trainer thread: {e}")))?;
        Ok(Arc::new(Self {
            state: Mutex::default(),
            futures,
            jobs: Mutex::new(Some(jobs)),
            trainer: Mutex::new(Some(thread)),
            info,
            samplers: Mutex::default(),
            failed,
            bases,
            store,
            limits,
        }))
    }

    /// The futures of the requests.
    pub(crate) fn futures(&self) -> &Futures {
        &self.futures
    }

    /// The checkpoint base.
    pub(crate) fn store(&self) -> &Store {
        &self.store
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
        let stopping = || ServeError::Unavailable("the server is stopping".into());
        jobs.as_ref()
            .ok_or_else(stopping)?
            .send(job)
            .map_err(|_| ServeError::Internal("the trainer thread is gone".into()))
    }

    /// Takes no more work, lets the trainer thread finish what it was given (each model's run then
    /// says `CANCELLED`: stopped, its checkpoints there to go on from), and waits for it.
    pub(crate) fn stop(&self) {
        drop(self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take());
        let thread = self
            .trainer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }

    /// A new session's id.
    pub(crate) fn create_session(&self) -> String {
        let id = format!("s{:016x}", rand::random::<u64>());
        let session = Session {
            models: Vec::new(),
            seen: Instant::now(),
        };
        self.state().sessions.insert(id.clone(), session);
        id
    }

    /// A heartbeat of `session`: it is alive.
    pub(crate) fn beat(&self, session: &str) -> Result<(), ServeError> {
        let mut state = self.state();
        if let Some(s) = state.sessions.get_mut(session) {
            s.seen = Instant::now();
            return Ok(());
        }
        Err(no_session(&state, session))
    }

    /// Finishes the sessions without a heartbeat for `timeout` (their client is gone: its
    /// models and samplers would be held forever); their ids.
    pub(crate) fn expire_sessions(&self, timeout: std::time::Duration) -> Vec<String> {
        let silent: Vec<String> = self
            .state()
            .sessions
            .iter()
            .filter(|(_, s)| s.seen.elapsed() > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &silent {
            tracing::warn!(session = %id, timeout_s = timeout.as_secs(), "no heartbeat: the session is finished, its models and samplers freed");
            if let Err(e) = self.finish_session(id) {
                tracing::warn!(session = %id, "finishing it: {e}");
            }
        }
        silent
    }

    /// Ends `session`: its models and samplers are freed (their checkpoints stay), and the
    /// requests its models held waiting fail.
    pub(crate) fn finish_session(&self, session: &str) -> Result<(), ServeError> {
        let mut state = self.state();
        let Some(Session {
            models: model_ids, ..
        }) = state.sessions.remove(session)
        else {
            return Ok(());
        };
        if state.finished.len() >= FINISHED_REMEMBERED {
            state.finished.clear();
        }
        state.finished.insert(session.to_string());
        for m in &model_ids {
            let Some(entry) = state.models.remove(m) else {
                continue;
            };
            for (request, _) in entry.waiting.into_values() {
                if let Some(request) = request {
                    let error = format!("model {m} was freed: its session finished");
                    self.futures.post(&request, failed(Category::User, error));
                }
            }
        }
        self.info
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|m, _| !model_ids.contains(m));
        // Under the state lock: a sampler registered for this session cannot slip in after.
        let mut samplers = self.samplers.lock().unwrap_or_else(|e| e.into_inner());
        let sampler_ids: Vec<String> = samplers
            .keys()
            .filter(|id| names::is_sampler_of(id, session))
            .cloned()
            .collect();
        samplers.retain(|id, _| !names::is_sampler_of(id, session));
        drop(samplers);
        drop(state);
        self.send(Job::Drop {
            model_ids,
            sampler_ids,
        })
    }

    /// Fails unless base model `name` is served here.
    pub(crate) fn check_base(&self, name: &str) -> Result<(), ServeError> {
        match self.bases.contains_key(name) {
            true => Ok(()),
            false => Err(ServeError::BadRequest(format!(
                "base_model {name:?} is not served here; served: {:?} (each given to `waypoint \
                 serve` as --base_model NAME=DIR)",
                self.bases.keys().collect::<Vec<_>>()
            ))),
        }
    }

    /// Starts making model `<session>:train:<seq>`, from a base model (`identity`) or from a
    /// checkpoint (`path`); its request id and model id. The same creation sent again gets the same
    /// request id.
    fn create(
        &self,
        session: &str,
        model_seq_id: i64,
        origin: Origin,
    ) -> Result<(String, String), ServeError> {
        if let Origin::New(identity) = &origin {
            self.check_base(&identity.base_model)?;
        }
        let mut state = self.state();
        let model_id = names::model_id(session, model_seq_id);
        if let Some(m) = state.models.get(&model_id) {
            return Ok((m.created_by.clone(), model_id));
        }
        if !state.sessions.contains_key(session) {
            return Err(no_session(&state, session));
        }
        let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        let held = state.models.keys().filter(|m| !failed.contains(*m)).count();
        drop(failed);
        if held >= self.limits.models {
            return Err(ServeError::BadRequest(format!(
                "this server holds {} training clients, its --max_models: close a ServiceClient \
                 (its session's models are freed), or start the server with a larger \
                 --max_models",
                self.limits.models
            )));
        }
        let request = self.futures.open();
        state.models.insert(
            model_id.clone(),
            ModelEntry {
                created_by: request.clone(),
                next_seq: 1,
                waiting: BTreeMap::new(),
                requests: HashMap::new(),
            },
        );
        if let Some(s) = state.sessions.get_mut(session) {
            s.models.push(model_id.clone());
        }
        // Sent under the lock: the model's first request cannot overtake its creation.
        self.send(Job::Create {
            model_id: model_id.clone(),
            origin,
            request: request.clone(),
        })?;
        Ok((request, model_id))
    }

    /// `create_model`: a new LoRA on a served base.
    pub(crate) fn create_model(
        &self,
        session: &str,
        model_seq_id: i64,
        identity: Identity,
    ) -> Result<(String, String), ServeError> {
        self.create(session, model_seq_id, Origin::New(identity))
    }

    /// `load_weights` with a session: a model made from checkpoint `path`.
    pub(crate) fn create_from(
        &self,
        session: &str,
        model_seq_id: i64,
        path: TinkerPath,
        optimizer: bool,
    ) -> Result<(String, String), ServeError> {
        self.create(
            session,
            model_seq_id,
            Origin::Checkpoint { path, optimizer },
        )
    }

    /// Registers sampler `<session>:sample:<seq>` (on base `base_model`, `model_path` a
    /// checkpoint's when made from one); its id, and whether it is new (the same one asked
    /// again keeps its id).
    pub(crate) fn register_sampler(
        &self,
        session: &str,
        seq: i64,
        info: SamplerInfo,
    ) -> Result<(String, bool), ServeError> {
        // The session cannot end between the check and the registration (finish_session takes
        // the same locks in the same order).
        let state = self.state();
        if !state.sessions.contains_key(session) {
            return Err(no_session(&state, session));
        }
        let id = names::sampler_id(session, seq);
        let mut samplers = self.samplers.lock().unwrap_or_else(|e| e.into_inner());
        let new = !samplers.contains_key(&id);
        samplers.entry(id.clone()).or_insert(SamplerEntry {
            info,
            used: Instant::now(),
        });
        // A loop makes a sampler per round and never says when it is done with one: past the
        // limit, the session's least recently used go.
        let of_session = samplers
            .iter()
            .filter(|(s, _)| names::is_sampler_of(s, session))
            .map(|(s, e)| (s.clone(), e.used));
        let evicted = least_recently_used(of_session, self.limits.samplers_per_session);
        samplers.retain(|s, _| !evicted.contains(s));
        drop(samplers);
        drop(state);
        if !evicted.is_empty() {
            tracing::info!(
                session,
                ?evicted,
                "samplers freed (--max_samplers_per_session)"
            );
            self.send(Job::Drop {
                model_ids: Vec::new(),
                sampler_ids: evicted,
            })?;
        }
        Ok((id, new))
    }

    /// Starts making sampler `sampler_id` over `source`.
    pub(crate) fn make_sampler(
        &self,
        sampler_id: String,
        source: SamplerSource,
    ) -> Result<(), ServeError> {
        self.send(Job::SamplerFrom { sampler_id, source })
    }

    /// What sampler `id` samples; `use_it` counts as a use (the least recently used go first).
    fn sampler_entry(&self, id: &str, use_it: bool) -> Result<SamplerInfo, ServeError> {
        let found = {
            let mut samplers = self.samplers.lock().unwrap_or_else(|e| e.into_inner());
            samplers.get_mut(id).map(|entry| {
                if use_it {
                    entry.used = Instant::now();
                }
                entry.info.clone()
            })
        };
        // (The samplers' lock is let go first: the state's is taken before it elsewhere.)
        found.ok_or_else(|| {
            unknown(&self.state(), id, || {
                format!(
                    "sampler {id:?} is unknown here (a session's samplers are freed when it ends, \
                     and its least recently used beyond --max_samplers_per_session): make it again"
                )
            })
        })
    }

    /// What sampler `id` samples.
    pub(crate) fn sampler_info(&self, id: &str) -> Result<SamplerInfo, ServeError> {
        self.sampler_entry(id, false)
    }

    /// Starts `request` on sampler `sampler_id`; the request id.
    pub(crate) fn sample(&self, sampler_id: &str, request: Sample) -> Result<String, ServeError> {
        self.sampler_entry(sampler_id, true)?;
        self.state().touch(sampler_id);
        let id = self.futures.open();
        self.send(Job::Sample {
            sampler_id: sampler_id.to_string(),
            requests: vec![(id.clone(), request)],
        })?;
        Ok(id)
    }

    /// The base model and LoRA rank of model `model_id`, once it is made.
    pub(crate) fn model_info(&self, model_id: &str) -> Result<ModelInfo, ServeError> {
        let found = self
            .info
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(model_id)
            .cloned();
        found.ok_or_else(|| unknown_model(&self.state(), model_id))
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
        state.touch(model_id);
        let Some(m) = state.models.get_mut(model_id) else {
            return Err(unknown_model(&state, model_id));
        };
        if let Some(request) = m.requests.get(&seq) {
            return Ok(request.clone());
        }
        if seq < m.next_seq {
            return Err(ServeError::BadRequest(format!(
                "seq_id {seq} of model {model_id} is behind the requests already run (next: {})",
                m.next_seq
            )));
        }
        // The one released next is always taken: it lets the others go.
        if seq != m.next_seq && m.waiting.len() >= MAX_WAITING {
            m.requests.insert(seq, None);
            m.waiting.insert(seq, (None, Op::Refused));
            return Err(ServeError::BadRequest(format!(
                "model {model_id} holds {MAX_WAITING} requests waiting for seq_id {}: send it \
                 first",
                m.next_seq
            )));
        }
        let request = (!matches!(op, Op::Refused)).then(|| self.futures.open());
        m.requests.insert(seq, request.clone());
        // Numbers long run are not sent again (a retry comes within moments): forgotten.
        let horizon = m.next_seq - MAX_WAITING as i64;
        m.requests.retain(|&s, _| s >= horizon);
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

/// Why model `model_id` cannot be used: its session finished (410), or it is unknown.
fn unknown_model(state: &State, model_id: &str) -> ServeError {
    unknown(state, model_id, || {
        format!(
            "model {model_id:?} is unknown here (made by create_model or load_weights in this \
             server's life, and not freed by its session's end)"
        )
    })
}

/// Why the model or sampler `id` cannot be used: its session finished (410), else `why` (404).
fn unknown(state: &State, id: &str, why: impl FnOnce() -> String) -> ServeError {
    let session = names::session_of(id);
    match state.finished.contains(session) {
        true => no_session(state, session),
        false => ServeError::NotFound(why()),
    }
}

fn failed(category: Category, error: String) -> Outcome {
    Outcome::Failed { error, category }
}

/// A served model and its run's checkpoints.
struct Served {
    model: TrainingModel,
    manager: CheckpointManager,
    /// The newest checkpoint of its run, and the one it was made from (another run's).
    checkpoint: Option<String>,
    made_from: Option<ResumedFrom>,
    /// When its `status.json` was last written, and the write in flight (see
    /// [`Served::refresh`]).
    recorded: std::cell::Cell<Instant>,
    refreshing: std::cell::Cell<Option<tokio::task::JoinHandle<()>>>,
}

impl Served {
    /// The run's `status.json` as the model stands: `state`, its step, its newest checkpoint.
    fn status(&self, state: JobState) -> Status {
        let mut status = Status::new(state, self.model.steps(), 0);
        status.checkpoint = self.checkpoint.clone();
        status.attempt = self.manager.attempt();
        status.resumed_from = self.made_from.clone();
        status
    }

    /// Writes the run's `status.json` (what `waypoint status` reads), after the refresh in
    /// flight (which must not land after it). A failure is a warning: the model goes on.
    fn record(&self, state: JobState, rt: &Handle) {
        if let Some(refresh) = self.refreshing.take() {
            let _ = rt.block_on(refresh);
        }
        let layout = self.manager.layout();
        let written = rt.block_on(records::write_status(
            self.manager.store(),
            layout,
            &self.status(state),
        ));
        if let Err(e) = written {
            tracing::warn!(run = %layout.run_id(), "writing status.json: {e}");
        }
        self.recorded.set(Instant::now());
    }

    /// Writes `status.json` again (`RUNNING`, the step now) when it is `every` old, in the
    /// background (a slow store never holds the trainer), one write at a time.
    fn refresh(&self, every: std::time::Duration, rt: &Handle) {
        let inflight = self.refreshing.take();
        let busy = inflight.as_ref().is_some_and(|w| !w.is_finished());
        if busy || self.recorded.get().elapsed() < every {
            self.refreshing.set(inflight);
            return;
        }
        let (store, layout) = (self.manager.store().clone(), self.manager.layout().clone());
        let status = self.status(JobState::Running);
        self.refreshing.set(Some(rt.spawn(async move {
            if let Err(e) = records::write_status(&store, &layout, &status).await {
                tracing::warn!(run = %layout.run_id(), "writing status.json: {e}");
            }
        })));
        self.recorded.set(Instant::now());
    }
}

/// The trainer thread: runs the jobs in order and posts their outcomes.
struct Trainer {
    futures: Arc<Futures>,
    info: Arc<Mutex<HashMap<String, ModelInfo>>>,
    failed: Arc<Mutex<std::collections::HashSet<String>>>,
    bases: Arc<BTreeMap<String, PathBuf>>,
    store: Store,
    runtime: Handle,
    /// The base models loaded so far, by name: each is in memory once, shared by every model
    /// and sampler over it.
    loaded: HashMap<String, BaseModel>,
    /// The base models' tokenizers loaded so far (for stop strings), by name.
    tokenizers: HashMap<String, Tokenizer>,
    models: HashMap<String, Result<Served, String>>,
    samplers: HashMap<String, Sampler>,
    /// Saves uploading in the background, oldest first.
    uploads: Vec<Upload>,
    /// Samplers freed before the job that makes them ran: it makes nothing.
    freed_unmade: std::collections::HashSet<String>,
    /// How often a live model's `status.json` is written again.
    status_every: std::time::Duration,
}

/// A save whose state is on the host, uploading and then named by a thread of its own (which
/// posts the client's outcome; the checkpoint crate's save is not `Send`, so not a tokio task);
/// `true` once its checkpoint is committed.
struct Upload {
    model_id: String,
    step: u64,
    /// The client's request (posted by the thread, or here if the thread died).
    request: Option<String>,
    task: std::thread::JoinHandle<bool>,
}

/// The trainer's inbox, and the jobs taken from it ahead of their turn and held back.
struct Queue {
    inbox: mpsc::Receiver<Job>,
    held: VecDeque<Job>,
}

/// Rows decoded together at most (the samples of the requests joined)...
const MAX_SAMPLE_ROWS: usize = 256;

/// ... and places of their cache at most (rows × (the longest prompt + the most tokens asked)): a
/// request beyond it alone is decoded alone.
const MAX_SAMPLE_PLACES: usize = 1 << 16;

/// How long a sampling request waits for another to decode with, when none is queued (a loop's
/// requests, sent together, arrive a few milliseconds apart): joining goes on while each next one
/// comes within this of the one before...
const SAMPLE_QUIET: std::time::Duration = std::time::Duration::from_millis(10);

/// ... up to this in all.
const SAMPLE_LINGER: std::time::Duration = std::time::Duration::from_millis(50);

impl Queue {
    /// The next job: a held one, else the inbox's (waiting up to `wait`).
    fn next(&mut self, wait: std::time::Duration) -> Result<Job, mpsc::RecvTimeoutError> {
        match self.held.pop_front() {
            Some(job) => Ok(job),
            None => self.inbox.recv_timeout(wait),
        }
    }

    /// `job`, and when it samples, the sampling requests of the same sampler queued right after
    /// it — or arriving while it waits ([`SAMPLE_QUIET`], [`SAMPLE_LINGER`]) — joined to it as
    /// [`joins`] says: they are decoded together. The first other job stops the joining and keeps
    /// its turn.
    fn with_samples_after(&mut self, job: Job) -> Job {
        let Job::Sample {
            sampler_id,
            mut requests,
        } = job
        else {
            return job;
        };
        let until = Instant::now() + SAMPLE_LINGER;
        loop {
            let wait = SAMPLE_QUIET.min(until.saturating_duration_since(Instant::now()));
            let next = match self.held.pop_front() {
                Some(job) => job,
                None => match self.inbox.recv_timeout(wait) {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            match next {
                Job::Sample {
                    sampler_id: other,
                    requests: more,
                } if joins(&sampler_id, &requests, &other, &more) => {
                    requests.extend(more);
                }
                other => {
                    self.held.push_front(other);
                    break;
                }
            }
        }
        Job::Sample {
            sampler_id,
            requests,
        }
    }
}

/// Whether sampling requests `more` on sampler `other` join `batch`, requests on sampler
/// `sampler`: the same sampler, and rows and cache places within [`MAX_SAMPLE_ROWS`] and
/// [`MAX_SAMPLE_PLACES`].
fn joins(
    sampler: &str,
    batch: &[(String, Sample)],
    other: &str,
    more: &[(String, Sample)],
) -> bool {
    let all = || batch.iter().chain(more).map(|(_, r)| r);
    let rows: usize = all().map(|r| r.samples).sum();
    let longest = all().map(|r| r.prompt.len()).max().unwrap_or(0);
    let tokens = all().map(|r| r.params.max_tokens).max().unwrap_or(0);
    other == sampler
        && rows <= MAX_SAMPLE_ROWS
        && rows.saturating_mul(longest + tokens) <= MAX_SAMPLE_PLACES
}

impl Trainer {
    fn run(mut self, inbox: mpsc::Receiver<Job>) {
        let mut queue = Queue {
            inbox,
            held: VecDeque::new(),
        };
        loop {
            let job = match queue.next(std::time::Duration::from_millis(500)) {
                Ok(job) => queue.with_samples_after(job),
                // Idle: an upload that ended is recorded (status.json) without waiting for work.
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.settle_uploads(|_| false);
                    self.refresh_records();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            // What reads or writes a run's checkpoints waits for that run's uploads in flight (a
            // load finds every checkpoint saved before it; step numbers follow the committed
            // ones); the rest goes on while they upload.
            let wait_for = job.waits_for();
            self.settle_uploads(|m| wait_for.iter().any(|w| w == m));
            let (what, started) = (job.what(), Instant::now());
            // A panic is a bug, but it must not take the trainer thread (and every client) with
            // it: the request fails, the thread goes on.
            let requests = job.requests();
            let handled =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.handle(job)));
            if let Err(panic) = handled {
                let why = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("a panic");
                tracing::error!(job = what, "the trainer failed unexpectedly: {why}");
                for request in &requests {
                    let error = format!("the server failed unexpectedly running {what}: {why}");
                    self.futures.post(request, failed(Category::Server, error));
                }
            }
            tracing::debug!(
                job = what,
                requests = requests.len(),
                ms = started.elapsed().as_secs_f64() * 1e3,
                "job done"
            );
            self.refresh_records();
        }
        // The server is stopping: the uploads end first, then every model still held was
        // stopped, not finished.
        self.settle_uploads(|_| true);
        for served in self.models.values().flatten() {
            served.record(JobState::Cancelled, &self.runtime);
        }
    }

    /// Writes again the `status.json` of each live model that has not been written for
    /// `status_every` (its step; that it lives).
    fn refresh_records(&mut self) {
        for served in self.models.values().flatten() {
            served.refresh(self.status_every, &self.runtime);
        }
    }

    /// Runs one job and posts its outcome.
    fn handle(&mut self, job: Job) {
        match job {
            Job::Create {
                model_id,
                origin,
                request,
            } => {
                let made = self.make(&model_id, origin);
                let outcome = match &made {
                    Ok(served) => {
                        let identity = served.model.identity();
                        tracing::info!(model = %model_id, base = %identity.base_model, rank = identity.lora.rank, "training client made");
                        self.info.lock().unwrap_or_else(|e| e.into_inner()).insert(
                            model_id.clone(),
                            ModelInfo {
                                base_model: identity.base_model.clone(),
                                lora_rank: identity.lora.rank,
                            },
                        );
                        Outcome::Json(json!({"model_id": model_id}))
                    }
                    Err(e) => {
                        tracing::warn!(model = %model_id, "making a training client failed: {e}");
                        self.failed
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(model_id.clone());
                        failed(Category::User, format!("making model {model_id}: {e}"))
                    }
                };
                if let Ok(served) = &made {
                    served.record(JobState::Running, &self.runtime);
                }
                self.futures.post(&request, outcome);
                self.models.insert(model_id, made);
            }
            Job::Run {
                model_id,
                op:
                    Op::Save {
                        kind,
                        name,
                        overwrite,
                    },
                request,
            } => {
                if let Some(outcome) = self.save(&model_id, kind, &name, overwrite, &request) {
                    if let Some(request) = request {
                        self.futures.post(&request, outcome);
                    }
                }
            }
            Job::Run {
                model_id,
                op,
                request,
            } => {
                let outcome = match (self.models.get_mut(&model_id), op) {
                    (_, Op::Sampler { sampler_id }) if self.freed_unmade.remove(&sampler_id) => {
                        failed(Category::User, freed_sampler(&sampler_id))
                    }
                    (Some(Ok(served)), Op::Sampler { sampler_id }) => {
                        match served.model.snapshot() {
                            Ok(snapshot) => {
                                let sampler = Sampler::Client {
                                    model_id: model_id.clone(),
                                    snapshot,
                                };
                                self.samplers.insert(sampler_id.clone(), sampler);
                                Outcome::Json(json!({"sampling_session_id": sampler_id}))
                            }
                            Err(e) => failed(Category::Server, format!("{e:#}")),
                        }
                    }
                    (Some(Ok(served)), op) => {
                        run(served, &model_id, op, &self.store, &self.runtime)
                    }
                    (Some(Err(e)), _) => failed(
                        Category::User,
                        format!("model {model_id} could not be made: {e}"),
                    ),
                    (None, _) => failed(Category::User, format!("model {model_id} was freed")),
                };
                if let Some(request) = request {
                    self.futures.post(&request, outcome);
                }
            }
            Job::SamplerFrom { sampler_id, source } => {
                if self.freed_unmade.remove(&sampler_id) {
                    return;
                }
                let (base, model) = match source {
                    SamplerSource::Checkpoint(path) => {
                        let made = resolve(&self.store, &self.runtime, &path)
                            .map_err(|e| e.to_string())
                            // A sampler's own model has no run: it saves nothing.
                            .and_then(|(source, step)| self.checkpoint_model(&source, step, false));
                        let base = made.as_ref().ok().map(|m| m.identity().base_model.clone());
                        (base, made.map(|m| Box::new(m) as Box<dyn Sampling + Send>))
                    }
                    SamplerSource::Base(name) => {
                        let made = self
                            .base(&name)
                            .and_then(|b| b.share().map_err(|e| format!("{e:#}")));
                        let model = made.map(|m| Box::new(m) as Box<dyn Sampling + Send>);
                        (Some(name), model)
                    }
                };
                self.samplers
                    .insert(sampler_id, Sampler::Own { base, model });
            }
            Job::Sample {
                sampler_id,
                requests,
            } => {
                let outcomes = self.sample(&sampler_id, &requests);
                for ((id, _), outcome) in requests.iter().zip(outcomes) {
                    self.futures.post(id, outcome);
                }
            }
            Job::Drop {
                model_ids,
                sampler_ids,
            } => {
                for s in sampler_ids {
                    if self.samplers.remove(&s).is_none() {
                        // Its making may still be queued; a lost few are forgotten in bulk.
                        if self.freed_unmade.len() >= FREED_UNMADE_REMEMBERED {
                            self.freed_unmade.clear();
                        }
                        self.freed_unmade.insert(s);
                    }
                }
                // A creation still queued at the session's end put its model's info back.
                self.info
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|m, _| !model_ids.contains(m));
                for m in model_ids {
                    if let Some(Ok(served)) = self.models.remove(&m) {
                        served.record(JobState::Finished, &self.runtime);
                    }
                }
            }
        }
    }

    /// `save_state`/`save_weights_for_sampler` on model `model_id`: the state is copied to the host
    /// now, then uploaded and named `name` in the background (the client's outcome posted then);
    /// the outcome when it is known at once.
    fn save(
        &mut self,
        model_id: &str,
        kind: Kind,
        name: &str,
        overwrite: bool,
        request: &Option<String>,
    ) -> Option<Outcome> {
        let served = match self.models.get_mut(model_id) {
            Some(Ok(served)) => served,
            Some(Err(e)) => {
                return Some(failed(
                    Category::User,
                    format!("model {model_id} could not be made: {e}"),
                ))
            }
            None => {
                return Some(failed(
                    Category::User,
                    format!("model {model_id} was freed"),
                ))
            }
        };
        let rt = &self.runtime;
        let path = TinkerPath::of(model_id, kind, name);
        let key = names::record_key(served.manager.layout(), kind, name);
        // A name taken is refused before anything uploads.
        if !overwrite && rt.block_on(self.store.exists(&key)).unwrap_or(false) {
            return Some(name_taken(&path));
        }
        match served.model.begin_save(&served.manager, rt) {
            Err(e) => Some(failed(Category::Server, format!("saving: {e:#}"))),
            Ok(Saving::Done(checkpoint)) => Some(rt.block_on(name_checkpoint(
                &self.store,
                &key,
                &path,
                checkpoint,
                overwrite,
            ))),
            Ok(Saving::Upload {
                request: save,
                step,
            }) => {
                let (manager, store) = (served.manager.clone(), self.store.clone());
                let (futures, posted) = (self.futures.clone(), request.clone());
                let rt = rt.clone();
                let upload = move || {
                    let (committed, outcome) = match rt.block_on(manager.save(*save)) {
                        Ok(m) => {
                            let named = name_checkpoint(&store, &key, &path, m.name, overwrite);
                            (true, rt.block_on(named))
                        }
                        Err(e) => (false, failed(Category::Server, format!("saving: {e}"))),
                    };
                    if let Some(request) = posted {
                        futures.post(&request, outcome);
                    }
                    committed
                };
                let task = match std::thread::Builder::new()
                    .name("upload".into())
                    .spawn(upload)
                {
                    Ok(task) => task,
                    Err(e) => {
                        served.model.save_failed(step);
                        return Some(failed(
                            Category::Server,
                            format!("starting the upload: {e}"),
                        ));
                    }
                };
                self.uploads.push(Upload {
                    model_id: model_id.to_string(),
                    step,
                    request: request.clone(),
                    task,
                });
                None
            }
        }
    }

    /// Takes in the uploads that ended, and waits for those of the models `wait_for` names: a
    /// committed one is its run's newest checkpoint (in `status.json`), a failed one leaves its
    /// state unsaved.
    fn settle_uploads(&mut self, wait_for: impl Fn(&str) -> bool) {
        let (ended, running): (Vec<Upload>, Vec<Upload>) = std::mem::take(&mut self.uploads)
            .into_iter()
            .partition(|u| wait_for(&u.model_id) || u.task.is_finished());
        self.uploads = running;
        for u in ended {
            let committed = match u.task.join() {
                Ok(committed) => committed,
                Err(_) => {
                    // The thread died before answering: the client must not wait forever.
                    if let Some(request) = &u.request {
                        let why = "the upload of this save stopped unexpectedly; save again";
                        self.futures
                            .post(request, failed(Category::Server, why.into()));
                    }
                    false
                }
            };
            if let Some(Ok(served)) = self.models.get_mut(&u.model_id) {
                if committed {
                    served.checkpoint =
                        Some(waypoint_checkpoint::StepName::new(u.step).to_string());
                    served.record(JobState::Running, &self.runtime);
                } else {
                    served.model.save_failed(u.step);
                }
            }
        }
    }

    /// Base model `name`, loaded from its directory the first time.
    fn base(&mut self, name: &str) -> Result<&BaseModel, String> {
        if !self.loaded.contains_key(name) {
            let dir = self.bases.get(name).ok_or_else(|| {
                format!(
                    "the base model {name:?} is not served here (served: {:?})",
                    self.bases.keys().collect::<Vec<_>>()
                )
            })?;
            let base = BaseModel::load(dir).map_err(|e| format!("{e:#}"))?;
            tracing::info!(base = name, dir = %dir.display(), "base model loaded");
            self.loaded.insert(name.to_string(), base);
        }
        Ok(&self.loaded[name])
    }

    /// A new LoRA model as `identity` says, over its base model.
    fn model_of(&mut self, identity: Identity) -> Result<TrainingModel, String> {
        let base = self.base(&identity.base_model)?;
        TrainingModel::lora(base, identity).map_err(|e| format!("{e:#}"))
    }

    /// The model checkpoint `step` of `source`'s run holds (its base and LoRA read from the
    /// manifest), with or without its optimizer state.
    fn checkpoint_model(
        &mut self,
        source: &CheckpointManager,
        step: waypoint_checkpoint::StepName,
        optimizer: bool,
    ) -> Result<TrainingModel, String> {
        let identity = identity_of(source, &self.runtime, step).map_err(|e| format!("{e:#}"))?;
        let mut model = self.model_of(identity)?;
        model
            .load(source, &self.runtime, step, optimizer)
            .map_err(|e| format!("{e:#}"))?;
        Ok(model)
    }

    /// Runs sampling requests on their sampler, decoded together; each one's outcome (the
    /// protobuf `SampleResponse`), in order.
    fn sample(&mut self, sampler_id: &str, batch: &[(String, Sample)]) -> Vec<Outcome> {
        let all = |outcome: Outcome| batch.iter().map(|_| outcome.clone()).collect();
        let Some(sampler) = self.samplers.get(sampler_id) else {
            return all(failed(Category::User, freed_sampler(sampler_id)));
        };
        // Stop strings are looked for in the text of the tokens sampled so far, as the sampler's
        // base model's tokenizer decodes them.
        let wants_text = batch.iter().any(|(_, r)| !r.stop_strings.is_empty());
        let tokenizer = match (wants_text, sampler_base(sampler, &self.models)) {
            (true, Some(base)) => {
                let config = self
                    .loaded
                    .get(&base)
                    .map(|b| &b.sampled_model().config.raw);
                Some(tokenizer_of(
                    &mut self.tokenizers,
                    &self.bases,
                    &base,
                    config,
                ))
            }
            _ => None,
        };
        // A request with stop strings fails alone when the tokenizer did not load.
        let mut refused: Vec<Option<Outcome>> = batch
            .iter()
            .map(|(_, r)| match &tokenizer {
                Some(Err(e)) if !r.stop_strings.is_empty() => {
                    Some(failed(Category::User, e.clone()))
                }
                _ => None,
            })
            .collect();
        let runs: Vec<&Sample> = batch
            .iter()
            .zip(&refused)
            .filter(|(_, no)| no.is_none())
            .map(|((_, r), _)| r)
            .collect();
        let tokenizer = tokenizer.and_then(Result::ok);
        let stops: Vec<_> = runs
            .iter()
            .map(|r| {
                tokenizer
                    .filter(|_| !r.stop_strings.is_empty())
                    .map(|t| move |tokens: &[i64]| holds_stop(t, tokens, &r.stop_strings))
            })
            .collect();
        let text_stops: Vec<Option<TextStop<'_>>> = stops
            .iter()
            .map(|stop| stop.as_ref().map(|f| f as TextStop<'_>))
            .collect();
        let sampled = match sampler {
            Sampler::Own { model, .. } => match model {
                Ok(model) => Ok(sample_all(model.as_ref(), &runs, &text_stops)),
                Err(e) => Err(format!("sampler {sampler_id}: {e}")),
            },
            Sampler::Client { model_id, snapshot } => {
                match self.models.get_mut(model_id.as_str()) {
                    Some(Ok(served)) => served
                        .model
                        .with_snapshot(Some(snapshot), |m| Ok(sample_all(m, &runs, &text_stops)))
                        .map_err(|e| format!("{e:#}")),
                    _ => Err(format!("sampler {sampler_id}: its training client is gone")),
                }
            }
        };
        let mut sampled = match sampled {
            Ok(each) => each,
            Err(e) => return all(failed(Category::User, e)),
        }
        .into_iter();
        refused
            .iter_mut()
            .map(|no| match no.take() {
                Some(outcome) => outcome,
                None => match sampled.next() {
                    Some(Ok(response)) => Outcome::Proto(prost::Message::encode_to_vec(&response)),
                    Some(Err(e)) => failed(Category::User, format!("{e:#}")),
                    None => failed(Category::Server, "no samples came back".into()),
                },
            })
            .collect()
    }

    /// Model `model_id` from `origin`, its run's attempt taken (its record holds what the model
    /// is, which `catalog` lists).
    fn make(&mut self, model_id: &str, origin: Origin) -> Result<Served, String> {
        let layout = names::run_of(model_id).map_err(|e| e.to_string())?;
        let (model, made_from) = match origin {
            Origin::New(identity) => (self.model_of(identity)?, None),
            Origin::Checkpoint { path, optimizer } => {
                let (source, step) =
                    resolve(&self.store, &self.runtime, &path).map_err(|e| e.to_string())?;
                let model = self.checkpoint_model(&source, step, optimizer)?;
                let made_from = ResumedFrom {
                    checkpoint: format!("{}:{step}", source.layout().run_id()),
                    tier: "durable".into(),
                };
                (model, Some(made_from))
            }
        };
        let mut manager =
            CheckpointManager::new(self.store.clone(), layout, ManagerOptions::default());
        let info = json!({"served_model": model_id, "identity": model.identity()});
        self.runtime
            .block_on(manager.start_attempt(&info))
            .map_err(|e| format!("taking the run's attempt: {e}"))?;
        Ok(Served {
            model,
            manager,
            checkpoint: None,
            made_from,
            recorded: std::cell::Cell::new(Instant::now()),
            refreshing: std::cell::Cell::new(None),
        })
    }
}

/// The model the checkpoint `path` names was saved from (read from storage: call off the async
/// runtime's workers).
pub(crate) fn identity_at(
    store: &Store,
    rt: &Handle,
    path: &TinkerPath,
) -> Result<Identity, ServeError> {
    let (source, step) = resolve(store, rt, path)?;
    identity_of(&source, rt, step).map_err(|e| ServeError::BadRequest(format!("{e:#}")))
}

/// The run and checkpoint that `path` names (its name record read).
fn resolve(
    store: &Store,
    rt: &Handle,
    path: &TinkerPath,
) -> Result<(CheckpointManager, waypoint_checkpoint::StepName), ServeError> {
    let layout = names::run_of(&path.model_id)?;
    let key = names::record_key(&layout, path.kind, &path.name);
    let bytes = rt.block_on(store.get(&key)).map_err(|e| match e {
        StorageError::NotFound { .. } => ServeError::BadRequest(format!(
            "no checkpoint is named {}",
            TinkerPath::of(&path.model_id, path.kind, &path.name)
        )),
        e => ServeError::Internal(format!("reading {key}: {e}")),
    })?;
    let record: Record = serde_json::from_slice(&bytes)
        .map_err(|e| ServeError::Internal(format!("{key} is not a name record: {e}")))?;
    let manager = CheckpointManager::new(store.clone(), layout, ManagerOptions::default());
    Ok((manager, record.step()?))
}

/// One request on its model.
fn run(served: &mut Served, model_id: &str, op: Op, store: &Store, rt: &Handle) -> Outcome {
    let model = &mut served.model;
    match op {
        Op::Forward {
            data,
            loss,
            backward,
        } => {
            if let Err(e) = model.check(&data, loss) {
                return failed(Category::User, format!("{e:#}"));
            }
            match model.forward(&data, loss, backward) {
                Ok(out) => {
                    // Several targets a position come back `[positions, width]` a datum.
                    let trailing = match out.width {
                        1 => Vec::new(),
                        k => vec![k as i64],
                    };
                    let logprobs = proto::batched_f32(&out.logprobs, trailing);
                    let record = proto::ArrayRecord {
                        type_tag: String::new(),
                        fields: [("logprobs".to_string(), logprobs)].into(),
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
        Op::Save { .. } => failed(Category::Server, "a save is the trainer's".into()),
        Op::Load { path, optimizer } => {
            let loaded = resolve(store, rt, &path).and_then(|(source, step)| {
                model
                    .load(&source, rt, step, optimizer)
                    .map_err(|e| ServeError::BadRequest(format!("{e:#}")))
            });
            let full = TinkerPath::of(&path.model_id, path.kind, &path.name);
            match loaded {
                Ok(()) => Outcome::Json(json!({"path": full, "model_id": model_id})),
                Err(e) => failed(Category::User, format!("loading {full}: {e}")),
            }
        }
        Op::Refused => failed(Category::User, "refused at submission".into()),
        Op::Sampler { .. } => failed(Category::Server, "a sampler is made by the trainer".into()),
    }
}

/// Names `checkpoint` (`step-N` of the run) as `path` says: the record at `key`, create-only
/// unless `overwrite`; the client's outcome.
async fn name_checkpoint(
    store: &Store,
    key: &str,
    path: &str,
    checkpoint: String,
    overwrite: bool,
) -> Outcome {
    let record = Record {
        checkpoint,
        time: chrono::Utc::now().to_rfc3339(),
    };
    let body = bytes::Bytes::from(serde_json::to_vec(&record).unwrap_or_default());
    let put = match overwrite {
        true => store.put(key, body).await,
        false => store.put_create(key, body).await,
    };
    match put {
        Ok(()) => {
            tracing::info!(%path, checkpoint = %record.checkpoint, "checkpoint named");
            Outcome::Json(json!({"path": path}))
        }
        Err(StorageError::AlreadyExists { .. }) => name_taken(path),
        Err(e) => failed(Category::Server, format!("naming {path}: {e}")),
    }
}

/// The outcome of a save under a name taken already.
fn name_taken(path: &str) -> Outcome {
    failed(
        Category::User,
        format!("{path} exists already: save under another name, or pass overwrite=True"),
    )
}

/// The base model `sampler` samples over, by name (`None` when it is not made).
fn sampler_base(
    sampler: &Sampler,
    models: &HashMap<String, Result<Served, String>>,
) -> Option<String> {
    match sampler {
        Sampler::Own { base, .. } => base.clone(),
        Sampler::Client { model_id, .. } => match models.get(model_id) {
            Some(Ok(served)) => Some(served.model.identity().base_model.clone()),
            _ => None,
        },
    }
}

/// Base model `name`'s tokenizer, read from its directory the first time, with the `config.json`
/// its loaded model holds (`config`).
fn tokenizer_of<'a>(
    tokenizers: &'a mut HashMap<String, Tokenizer>,
    bases: &BTreeMap<String, PathBuf>,
    name: &str,
    config: Option<&serde_json::Value>,
) -> Result<&'a Tokenizer, String> {
    if !tokenizers.contains_key(name) {
        let (Some(dir), Some(config)) = (bases.get(name), config) else {
            return Err(format!("the base model {name:?} is not loaded here"));
        };
        // A failure is not kept: a mended directory serves the next request.
        let tokenizer = Tokenizer::from_hf_dir(dir, config).map_err(|e| {
            format!(
                "stop strings need the base model's tokenizer, which did not load ({e:#}); \
                 pass stop token ids instead"
            )
        })?;
        tokenizers.insert(name.to_string(), tokenizer);
    }
    Ok(&tokenizers[name])
}

/// Whether the text of `tokens`' last tokens holds one of `strings`: a string that the newest
/// token completes lies within its last bytes, each token at least one, so the text of the last
/// (longest string's bytes + a margin of 8) tokens holds it.
fn holds_stop(tokenizer: &Tokenizer, tokens: &[i64], strings: &[String]) -> bool {
    let window = strings.iter().map(String::len).max().unwrap_or(0) + 8;
    let recent = &tokens[tokens.len().saturating_sub(window)..];
    let ids: Vec<u32> = recent.iter().map(|&t| t as u32).collect();
    tokenizer
        .decode(&ids)
        .is_ok_and(|text| strings.iter().any(|s| text.contains(s.as_str())))
}

/// The requests `batch` sampled with `model`, decoded together, each stopping also when its
/// `text_stops` says so: each one's response.
fn sample_all(
    model: &dyn Sampling,
    batch: &[&Sample],
    text_stops: &[Option<TextStop<'_>>],
) -> Vec<anyhow::Result<proto::SampleResponse>> {
    let params: Vec<SampleParams> = batch
        .iter()
        .map(|r| {
            let mut params = r.params.clone();
            if !r.stop_given {
                params.stop = model.eos_tokens();
            }
            params
        })
        .collect();
    let requests: Vec<Request<'_>> = batch
        .iter()
        .zip(&params)
        .zip(text_stops)
        .map(|((r, params), &text_stop)| Request {
            prompt: &r.prompt,
            params,
            n: r.samples,
            text_stop,
        })
        .collect();
    let sampled = model.sample_together(&requests);
    batch
        .iter()
        .zip(sampled)
        .map(|(r, sequences)| {
            let sequences = sequences?;
            let prompt = match r.prompt_logprobs {
                true => Some(model.prompt_logprobs(&r.prompt)?),
                false => None,
            };
            Ok(response(&sequences, prompt.as_deref()))
        })
        .collect()
}

/// The protobuf `SampleResponse` of `sequences`, with the prompt's log-probs when asked.
fn response(sequences: &[Sampled], prompt: Option<&[f32]>) -> proto::SampleResponse {
    let le_f32 = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    proto::SampleResponse {
        sequences: sequences
            .iter()
            .map(|s| proto::SampledSequence {
                stop_reason: match s.stopped {
                    true => proto::StopReason::Stop as i32,
                    false => proto::StopReason::Length as i32,
                },
                tokens: s
                    .tokens
                    .iter()
                    .flat_map(|&t| (t as i32).to_le_bytes())
                    .collect(),
                logprobs: Some(le_f32(&s.logprobs)),
            })
            .collect(),
        prompt_logprobs: prompt.map(le_f32),
        prompt_cache_hit_tokens: 0,
    }
}

/// What a request on a sampler freed (or never made) is told.
fn freed_sampler(sampler_id: &str) -> String {
    format!(
        "sampler {sampler_id} is freed (its session ended, or --max_samplers_per_session) or was \
         never made: make it again"
    )
}

/// Of `samplers` (id, last use), those beyond the `keep` most recently used, oldest first.
fn least_recently_used(
    samplers: impl Iterator<Item = (String, Instant)>,
    keep: usize,
) -> Vec<String> {
    let mut all: Vec<(String, Instant)> = samplers.collect();
    all.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    let over = all.len().saturating_sub(keep);
    all.into_iter().take(over).map(|(id, _)| id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Sampling requests queued one after another on one sampler are decoded together, up to
    /// the rows' and the cache places' limits; another sampler's request or any other job stops
    /// the joining and keeps its turn.
    #[test]
    fn queued_sampling_requests_of_a_sampler_join() {
        let sample = |sampler: &str, id: &str, samples| Job::Sample {
            sampler_id: sampler.into(),
            requests: vec![(
                id.into(),
                Sample {
                    prompt: vec![1],
                    params: SampleParams {
                        max_tokens: 1,
                        temperature: 0.0,
                        top_k: -1,
                        top_p: 1.0,
                        seed: None,
                        stop: Vec::new(),
                    },
                    stop_strings: Vec::new(),
                    stop_given: false,
                    samples,
                    prompt_logprobs: false,
                },
            )],
        };
        // A request whose cache alone fills the places decodes alone.
        let long = |sampler: &str, id: &str| match sample(sampler, id, 2) {
            Job::Sample {
                sampler_id,
                mut requests,
            } => {
                requests[0].1.prompt = vec![1; MAX_SAMPLE_PLACES / 2];
                Job::Sample {
                    sampler_id,
                    requests,
                }
            }
            other => other,
        };
        let (tx, inbox) = mpsc::channel();
        let mut queue = Queue {
            inbox,
            held: VecDeque::new(),
        };
        let jobs = [
            sample("a", "1", 1),
            sample("a", "2", 4),
            sample("b", "3", 1),
            sample("b", "4", 1),
            Job::Drop {
                model_ids: Vec::new(),
                sampler_ids: Vec::new(),
            },
            sample("b", "5", 1),
            sample("b", "6", MAX_SAMPLE_ROWS),
            sample("c", "7", 1),
            long("c", "8"),
        ];
        for job in jobs {
            tx.send(job).unwrap();
        }
        let mut taken = Vec::new();
        while let Ok(job) = queue.next(Duration::from_millis(1)) {
            taken.push(queue.with_samples_after(job).requests());
        }
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            taken,
            [
                ids(&["1", "2"]),
                ids(&["3", "4"]),
                ids(&[]),
                ids(&["5"]),
                ids(&["6"]),
                ids(&["7"]),
                ids(&["8"])
            ]
        );
    }

    /// A stop string is found when the token completing it comes, not before, however long the
    /// sample before it, and a character cut by the window's edge matches nothing.
    #[test]
    fn a_stop_string_is_found_in_the_last_tokens_text() {
        let bytes = waypoint_data::tokenizer::Tokenizer::Bytes;
        let tokens: Vec<i64> = "ééééééééééééééééé then the end."
            .bytes()
            .map(i64::from)
            .collect();
        let strings = ["the end".to_string(), "é then".to_string()];
        let ends: Vec<usize> = (1..=tokens.len())
            .filter(|&n| holds_stop(&bytes, &tokens[..n], &strings[..1]))
            .collect();
        let at = tokens.len() - 1; // "…the end" completes with its last letter, before the dot.
        assert_eq!(ends.first(), Some(&at), "found when its last token comes");
        // The multi-byte "é then" ends 9 tokens in from a window of 15: found too.
        let first = (1..=tokens.len())
            .find(|&n| holds_stop(&bytes, &tokens[..n], &strings[1..]))
            .unwrap();
        assert_eq!(first, "ééééééééééééééééé then".len());
    }

    #[test]
    fn the_least_recently_used_samplers_go_beyond_the_limit() {
        let t0 = Instant::now();
        let at = |id: &str, s: u64| (id.to_string(), t0 + Duration::from_secs(s));
        let samplers = [at("c", 3), at("a", 1), at("d", 4), at("b", 2)];
        assert_eq!(
            least_recently_used(samplers.clone().into_iter(), 2),
            ["a", "b"],
            "the two used longest ago, oldest first"
        );
        assert!(least_recently_used(samplers.clone().into_iter(), 4).is_empty());
        assert!(least_recently_used(samplers.into_iter(), 9).is_empty());
    }
}
