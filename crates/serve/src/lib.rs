//! waypoint-serve: `waypoint serve`, a service-mode trainer that clients drive call by call over
//! HTTP, speaking the REST protocol of Thinking Machines' Tinker SDK (`tinker==0.38.0`; read from
//! its source in `docs/tinker-protocol.md`), so unmodified SDK code trains on waypoint.
//!
//! The rooms, each importing only those before it:
//! - `error`: what goes wrong, each with what to do (and the HTTP status it answers with);
//! - `names`: each client's run, and the names clients give its checkpoints (`tinker://` paths);
//! - [`proto`]: the protobuf messages of the wire (prost derives);
//! - [`api`]: the JSON bodies of the routes;
//! - [`futures`]: each request's outcome, which clients long-poll;
//! - `catalog`: the runs and named checkpoints under the base, read back from storage (what
//!   `RestClient` lists);
//! - [`engine`]: sessions, models, and each model's requests in the client's order, run on one
//!   trainer thread over `waypoint_trainer::service` (the only part that knows libtorch);
//! - `http`: the routes, the key check, and errors as the SDK reads them;
//! - `server`: the command's flags and the server's start and stop (this file only re-exports).
//!
//! Served: sessions (freed when closed or silent), LoRA training clients (attention, MLP,
//! `lm_head`) over one shared copy of each base model, `forward`, `forward_backward` with
//! `cross_entropy` (one or several targets a position), `importance_sampling`, `ppo`, `cispo` and
//! `dro`, `optim_step` with Adam's parameters, futures, checkpoints (`save_state`, `load_state`,
//! named sampler weights, listing every run's) as `step-N` checkpoints of a run per client
//! uploaded in the background, and sampling (a KV cache, a request's samples and the requests
//! queued on one sampler decoded together, stop tokens or strings) from saved or live weights or a
//! base model. Not served: `gspo`, `stable_reinforce`, losses run
//! server-side, and the rest `docs/serve.md` lists.

mod api;
mod catalog;
mod engine;
mod error;
mod futures;
mod http;
mod names;
mod proto;
mod server;

pub use error::ServeError;
pub use server::{base_models, run, ServeArgs};
