//! The routes, under `/api/v1`, as the Tinker SDK 0.38 calls them: each parses its body (JSON,
//! or protobuf for `forward_backward`), hands the work to the [`Engine`] and answers — at once
//! with a request id for training calls, whose outcome the client long-polls at
//! `retrieve_future`. Every request but `healthz` must carry the server's key in `X-API-Key`.
//! Errors are 4xx with a JSON body saying what was wrong (the SDK retries 408, 409, 429 and 5xx
//! for minutes, so a client's mistake is never one of those); a route not served is a 404 that
//! says so.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prost::Message;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use waypoint_trainer::service::{AdamParams, Datum, Identity, LoraSpec, Loss, SampleParams};

use crate::api;
use crate::catalog::{self, Named, Page};
use crate::engine::{self, Engine, Op, Sample, SamplerInfo, SamplerSource};
use crate::error::ServeError;
use crate::futures::{Outcome, Polled};
use crate::names::{self, Kind, TinkerPath};
use crate::proto;

/// The key clients must present, compared in constant time.
pub(crate) struct ApiKey(Vec<u8>);

impl ApiKey {
    /// The key in `file` (surrounding whitespace ignored).
    pub(crate) fn read(file: &std::path::Path) -> Result<Self, ServeError> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| ServeError::Start(format!("--api_key_file {}: {e}", file.display())))?;
        let key = text.trim();
        if !key.starts_with("tml-") || key.len() < 8 {
            return Err(ServeError::Start(format!(
                "--api_key_file {}: the key must start with `tml-` and be at least 8 characters \
                 (the Tinker SDK refuses any other before sending it)",
                file.display()
            )));
        }
        Ok(Self(key.as_bytes().to_vec()))
    }

    fn matches(&self, given: &[u8]) -> bool {
        self.0.ct_eq(given).into()
    }
}

/// The largest request body taken (a `forward_backward` chunk is at most ~5 MB).
pub(crate) const MAX_BODY: usize = 64 << 20;

/// How long a `retrieve_future` waits for its outcome before answering "try again" (the SDK
/// gives the call 45 s).
const LONG_POLL: Duration = Duration::from_secs(30);

/// The server's routes.
pub(crate) fn router(engine: Arc<Engine>, key: Arc<ApiKey>) -> Router {
    let api = Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/client/config", post(client_config))
        .route("/client/dynamic_config", post(|| async { Json(json!({})) }))
        .route("/create_session", post(create_session))
        .route("/session_heartbeat", post(heartbeat))
        .route(
            "/telemetry",
            post(|| async { Json(json!({"status": "accepted"})) }),
        )
        .route("/sessions/{session}/finish", post(finish_session))
        .route("/get_server_capabilities", get(capabilities))
        .route("/create_model", post(create_model))
        .route("/get_info", post(get_info))
        .route("/forward_backward", post(forward_backward))
        .route("/optim_step", post(optim_step))
        .route("/save_weights", post(save_weights))
        .route("/save_weights_for_sampler", post(save_weights_for_sampler))
        .route("/load_weights", post(load_weights))
        .route("/training_runs", get(list_training_runs))
        .route("/training_runs/{model_id}", get(get_training_run))
        .route(
            "/training_runs/{model_id}/checkpoints",
            get(list_checkpoints),
        )
        .route("/checkpoints", get(list_user_checkpoints))
        .route("/weights_info", post(weights_info))
        .route("/retrieve_future", post(retrieve_future))
        .route("/create_sampling_session", post(create_sampling_session))
        .route("/samplers/{sampler_id}", get(sampler))
        .route("/asample", post(asample))
        .fallback(not_served)
        .layer(middleware::from_fn_with_state(key, authenticate))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(engine);
    Router::new().nest("/api/v1", api).fallback(not_served)
}

impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        let status = match &self {
            ServeError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ServeError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ServeError::NotFound(_) => StatusCode::NOT_FOUND,
            ServeError::Gone(_) => StatusCode::GONE,
            ServeError::Unsupported(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ServeError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ServeError::Start(_) | ServeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Json(json!({"detail": self.to_string()}))).into_response()
    }
}

async fn authenticate(State(key): State<Arc<ApiKey>>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if path.ends_with("/healthz") {
        return next.run(request).await;
    }
    let given = request.headers().get("x-api-key").map(|v| v.as_bytes());
    if given.is_some_and(|g| key.matches(g)) {
        return next.run(request).await;
    }
    let why = match given {
        None => "no X-API-Key header: set TINKER_API_KEY to this server's key",
        Some(_) => "the X-API-Key is not this server's key (see its --api_key_file)",
    };
    ServeError::Unauthorized(why.into()).into_response()
}

async fn not_served(request: Request) -> ServeError {
    ServeError::NotFound(format!(
        "{} {} is not served by waypoint serve (see docs/serve.md for what is)",
        request.method(),
        request.uri().path()
    ))
}

/// `body` as the JSON of `route`'s request.
fn parse<T: DeserializeOwned>(route: &str, body: &Bytes) -> Result<T, ServeError> {
    serde_json::from_slice(body).map_err(|e| {
        ServeError::BadRequest(format!("{route}: the body is not a valid request: {e}"))
    })
}

async fn client_config() -> Json<Value> {
    // The SDK's defaults, but its plain httpx transport, and none of the optional server-side
    // features (custom losses, sampling sessions, batched futures).
    Json(json!({"use_pyqwest_transport": false}))
}

async fn create_session(
    State(engine): State<Arc<Engine>>,
    body: Bytes,
) -> Result<Json<Value>, ServeError> {
    let _: api::CreateSession = parse("create_session", &body)?;
    let id = engine.create_session();
    tracing::info!(session = %id, "session created");
    Ok(Json(json!({"session_id": id, "type": "create_session"})))
}

async fn heartbeat(
    State(engine): State<Arc<Engine>>,
    body: Bytes,
) -> Result<Json<Value>, ServeError> {
    let beat: api::SessionHeartbeat = parse("session_heartbeat", &body)?;
    engine.beat(&beat.session_id)?;
    Ok(Json(json!({"type": "session_heartbeat"})))
}

async fn capabilities(State(engine): State<Arc<Engine>>) -> Json<Value> {
    let models: Vec<Value> = engine
        .bases()
        .map(|name| json!({"model_name": name, "trainable": true, "sampleable": false}))
        .collect();
    Json(json!({"supported_models": models}))
}

async fn create_model(
    State(engine): State<Arc<Engine>>,
    body: Bytes,
) -> Result<Json<Value>, ServeError> {
    let req: api::CreateModel = parse("create_model", &body)?;
    let lora = req.lora_config.ok_or_else(|| {
        ServeError::BadRequest(
            "create_model without lora_config (full-parameter training) is not served yet: \
             create a LoRA training client"
                .into(),
        )
    })?;
    if let Some(kind) = req
        .optimizer_config
        .as_ref()
        .and_then(|c| c.get("type"))
        .and_then(Value::as_str)
        .filter(|t| *t != "adamw")
    {
        return Err(ServeError::BadRequest(format!(
            "optimizer {kind:?} is not served: only adamw"
        )));
    }
    let spec = LoraSpec {
        rank: lora.rank,
        attn: lora.train_attn,
        mlp: lora.train_mlp,
        unembed: lora.train_unembed,
        seed: lora.seed.unwrap_or(0),
    };
    if spec.rank <= 0 || !(spec.attn || spec.mlp || spec.unembed) {
        return Err(ServeError::BadRequest(format!(
            "lora_config: rank must be positive (got {}) and one of train_attn, train_mlp, \
             train_unembed set",
            spec.rank
        )));
    }
    let identity = Identity {
        base_model: req.base_model,
        lora: spec,
    };
    let (request, model_id) = engine.create_model(&req.session_id, req.model_seq_id, identity)?;
    Ok(Json(json!({"request_id": request, "model_id": model_id})))
}

async fn get_info(
    State(engine): State<Arc<Engine>>,
    body: Bytes,
) -> Result<Json<Value>, ServeError> {
    let req: api::GetInfo = parse("get_info", &body)?;
    let info = engine.model_info(&req.model_id)?;
    let base = info.base_model;
    Ok(Json(json!({
        "model_id": req.model_id,
        "model_data": {"model_name": base, "tokenizer_id": base},
        "is_lora": true,
        "lora_rank": info.lora_rank,
        "optimizer_config": {"type": "adamw"},
        "type": "get_info",
    })))
}

async fn forward_backward(
    State(engine): State<Arc<Engine>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ServeError> {
    if headers.contains_key(header::CONTENT_ENCODING) {
        return Err(ServeError::Unsupported(
            "forward_backward: a compressed body is not taken (this server leaves \
             proto_compress_fwdbwd off)"
                .into(),
        ));
    }
    let req = proto::ForwardBackwardRequest::decode(body).map_err(|e| {
        ServeError::BadRequest(format!(
            "forward_backward: the body is not a tinker_public.ForwardBackwardRequest: {e}"
        ))
    })?;
    let seq = i64::from(req.seq_id);
    let op = match forward_op(&req) {
        Ok(op) => op,
        Err(e) => {
            // The client counted this request: its number is used.
            engine.submit(&req.model_id, seq, Op::Refused)?;
            return Err(e);
        }
    };
    let request = engine.submit(&req.model_id, seq, op)?;
    Ok(Json(
        json!({"request_id": request, "model_id": req.model_id}),
    ))
}

/// The losses the SDK 0.38 defines.
const SDK_LOSSES: [&str; 8] = [
    "cross_entropy",
    "importance_sampling",
    "ppo",
    "cispo",
    "dro",
    "gspo",
    "stable_reinforce",
    "custom",
];

/// A number of the request's `loss_fn_config` (its typed map first, then the legacy one).
fn config_number(req: &proto::ForwardBackwardRequest, key: &str) -> Option<f64> {
    let typed = req.loss_fn_config_v2.get(key).and_then(|v| match &v.value {
        Some(proto::loss_config_value::Value::Number(n)) => Some(*n),
        _ => None,
    });
    typed.or_else(|| req.loss_fn_config.get(key).copied())
}

/// The loss a request names, with its settings (the SDK's defaults where it has them).
fn loss_of(req: &proto::ForwardBackwardRequest) -> Result<Loss, ServeError> {
    let clip = || Loss::Ppo {
        low: config_number(req, "clip_low_threshold").unwrap_or(0.8),
        high: config_number(req, "clip_high_threshold").unwrap_or(1.2),
    };
    Ok(match req.loss_fn.as_str() {
        "cross_entropy" => Loss::CrossEntropy,
        "importance_sampling" => Loss::ImportanceSampling,
        "ppo" => clip(),
        "cispo" => match clip() {
            Loss::Ppo { low, high } => Loss::Cispo { low, high },
            other => other,
        },
        "dro" => Loss::Dro {
            beta: config_number(req, "beta").ok_or_else(|| {
                ServeError::BadRequest(
                    "loss_fn dro needs loss_fn_config {\"beta\": …} (e.g. 0.05)".into(),
                )
            })?,
        },
        other if SDK_LOSSES.contains(&other) => {
            return Err(ServeError::BadRequest(format!(
                "loss_fn {other:?} is not served yet (served: cross_entropy, \
                 importance_sampling, ppo, cispo, dro)"
            )))
        }
        other => {
            return Err(ServeError::BadRequest(format!(
                "loss_fn {other:?} is unknown (the SDK's: {SDK_LOSSES:?})"
            )))
        }
    })
}

/// Whether `loss`'s settings make sense: finite, the clip's bounds ordered, β not negative.
fn check_settings(loss: Loss) -> Result<(), ServeError> {
    let ok = match loss {
        Loss::Ppo { low, high } | Loss::Cispo { low, high } => {
            low.is_finite() && high.is_finite() && 0.0 <= low && low <= high
        }
        Loss::Dro { beta } => beta.is_finite() && beta >= 0.0,
        Loss::CrossEntropy | Loss::ImportanceSampling => true,
    };
    match ok {
        true => Ok(()),
        false => Err(ServeError::BadRequest(format!(
            "loss_fn_config {loss:?}: clip thresholds must be finite with 0 <= low <= high, \
             beta finite and >= 0"
        ))),
    }
}

/// The work a `forward`/`forward_backward` request asks for.
fn forward_op(req: &proto::ForwardBackwardRequest) -> Result<Op, ServeError> {
    let loss = loss_of(req)?;
    check_settings(loss)?;
    if req.data.is_empty() {
        return Err(ServeError::BadRequest("forward_backward: no datums".into()));
    }
    let data = req
        .data
        .iter()
        .enumerate()
        .map(|(i, d)| datum(i, d, loss))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Op::Forward {
        data,
        loss,
        backward: !req.forward_only,
    })
}

/// Datum `i` of a request as the trainer takes it: the input's tokens, `target_tokens`, and what
/// `loss` reads — `weights` (all ones when absent), or `logprobs` and `advantages`.
fn datum(i: usize, d: &proto::Datum, loss: Loss) -> Result<Datum, ServeError> {
    let bad = |what: String| ServeError::BadRequest(format!("datum {i}: {what}"));
    let mut tokens = Vec::new();
    for chunk in &d.model_input {
        match &chunk.chunk {
            Some(proto::chunk::Kind::EncodedText(t)) => tokens.extend(
                proto::unpack(&t.tokens, i32::from_le_bytes)
                    .ok_or_else(|| bad("an encoded_text chunk's tokens are not int32s".into()))?
                    .into_iter()
                    .map(i64::from),
            ),
            None => {
                return Err(bad(
                    "only encoded_text chunks are served (not images or audio)".into(),
                ))
            }
        }
    }
    let input = |name: &str| {
        d.loss_fn_inputs
            .get(name)
            .ok_or_else(|| bad(format!("loss_fn_inputs lacks {name}")))
    };
    let (target_bytes, target_dtype, shape) =
        dense(input("target_tokens")?, "target_tokens", 2).map_err(&bad)?;
    let width = width_of("target_tokens", shape, tokens.len()).map_err(&bad)?;
    let targets = match (target_bytes, target_dtype) {
        (bytes, proto::DType::Int64) => proto::unpack(bytes, i64::from_le_bytes),
        (bytes, proto::DType::Int32) => {
            proto::unpack(bytes, i32::from_le_bytes).map(|v| v.into_iter().map(i64::from).collect())
        }
        (_, other) => {
            return Err(bad(format!(
                "target_tokens of dtype {other:?}: int64 wanted"
            )))
        }
    }
    .ok_or_else(|| bad("target_tokens' bytes do not split into its dtype".into()))?;
    // `weights` may have several a position, as the targets; the policy-gradient inputs one.
    let n = tokens.len();
    let floats = |name: &str, dims: usize| -> Result<Vec<f32>, ServeError> {
        let (bytes, dtype, shape) = dense(input(name)?, name, dims).map_err(&bad)?;
        let w = width_of(name, shape, n).map_err(&bad)?;
        if w != width {
            return Err(bad(format!(
                "{name} of shape {shape:?}: as many values a position as target_tokens ({width})"
            )));
        }
        match dtype {
            proto::DType::Float32 => proto::unpack(bytes, f32::from_le_bytes)
                .ok_or_else(|| bad(format!("{name}' bytes do not split into float32s"))),
            other => Err(bad(format!("{name} of dtype {other:?}: float32 wanted"))),
        }
    };
    let mut datum = Datum {
        tokens,
        targets,
        width,
        ..Datum::default()
    };
    if loss.is_policy_gradient() {
        datum.sampler_logprobs = floats("logprobs", 1)?;
        datum.advantages = floats("advantages", 1)?;
        // A datum may carry its own clip bounds, one a position (ppo, cispo).
        if loss.clip().is_some() {
            for (name, into) in [
                ("clip_low_threshold", &mut datum.clip_low),
                ("clip_high_threshold", &mut datum.clip_high),
            ] {
                if d.loss_fn_inputs.contains_key(name) {
                    *into = floats(name, 1)?;
                }
            }
        }
    } else if d.loss_fn_inputs.contains_key("weights") {
        datum.weights = floats("weights", 2)?;
    } else {
        datum.weights = vec![1.0; datum.targets.len()];
    }
    Ok(datum)
}

/// A dense tensor of at most `dims` dimensions: its bytes, dtype and shape.
fn dense<'a>(
    t: &'a proto::Tensor,
    name: &str,
    dims: usize,
) -> Result<(&'a [u8], proto::DType, &'a [i64]), String> {
    if t.shape.len() > dims {
        return Err(format!(
            "{name} of shape {:?}: at most {dims} dimension{} here",
            t.shape,
            if dims == 1 { "" } else { "s" }
        ));
    }
    let dtype = proto::DType::try_from(t.dtype).unwrap_or(proto::DType::Unspecified);
    match &t.encoding {
        Some(proto::tensor::Encoding::Dense(bytes)) => Ok((bytes, dtype, &t.shape)),
        Some(proto::tensor::Encoding::SparseCsr(_)) => Err(format!(
            "{name} is sparse: only dense one-dimensional tensors are served"
        )),
        None => Err(format!("{name} holds no data")),
    }
}

/// Targets a position taken at most (distillation sends a teacher's top few).
const MAX_TARGETS_A_POSITION: i64 = 4096;

/// Values a position of an input shaped `[positions]` or `[positions, K]` (no shape: one) for a
/// datum of `n` input tokens.
fn width_of(name: &str, shape: &[i64], n: usize) -> Result<usize, String> {
    match *shape {
        [] => Ok(1),
        [rows] | [rows, _] if rows != n as i64 => Err(format!(
            "{name} of shape {shape:?}: {n} rows wanted, one a model_input token"
        )),
        [_] => Ok(1),
        [_, k] if (1..=MAX_TARGETS_A_POSITION).contains(&k) => Ok(k as usize),
        _ => Err(format!(
            "{name} of shape {shape:?}: [positions] or [positions, K] with 1 <= K <= \
             {MAX_TARGETS_A_POSITION}"
        )),
    }
}

async fn optim_step(
    State(engine): State<Arc<Engine>>,
    body: Bytes,
) -> Result<Json<Value>, ServeError> {
    let req: api::OptimStep = parse("optim_step", &body)?;
    let Some(p) = req.adam_params else {
        engine.submit(&req.model_id, req.seq_id, Op::Refused)?;
        let kind = req
            .optimizer_params
            .as_ref()
            .and_then(|o| o.get("type"))
            .cloned()
            .unwrap_or(Value::Null);
        return Err(ServeError::BadRequest(format!(
            "optim_step: optimizer {kind} is not served: only Adam (adam_params)"
        )));
    };
    let params = AdamParams {
        learning_rate: p.learning_rate,
        beta1: p.beta1,
        beta2: p.beta2,
        eps: p.eps,
        weight_decay: p.weight_decay,
        grad_clip_norm: p.grad_clip_norm,
    };
    let request = engine.submit(&req.model_id, req.seq_id, Op::OptimStep(params))?;
    Ok(Json(
        json!({"request_id": request, "model_id": req.model_id}),
    ))
}

async fn finish_session(
    State(engine): State<Arc<Engine>>,
    axum::extract::Path(session): axum::extract::Path<String>,
) -> Result<Json<Value>, ServeError> {
    engine.finish_session(&session)?;
    tracing::info!(session = %session, "session finished: its models are freed");
    Ok(Json(json!({})))
}

/// The name a save asks for, checked; a refusal uses the request's number.
fn save_name(
    engine: &Engine,
    model_id: &str,
    seq: i64,
    path: Option<&str>,
    missing: &str,
) -> Result<String, ServeError> {
    let named = path
        .ok_or_else(|| ServeError::BadRequest(missing.to_string()))
        .and_then(|name| names::check_name(name).map(|()| name.to_string()));
    if named.is_err() {
        engine.submit(model_id, seq, Op::Refused)?;
    }
    named
}

/// A save's submission: the name checked (a refusal uses the request's number), then the save.
fn submit_save(
    engine: &Engine,
    (model_id, seq): (&str, i64),
    name: Option<&str>,
    kind: Kind,
    overwrite: bool,
    unnamed: &str,
) -> Result<Json<Value>, ServeError> {
    let name = save_name(engine, model_id, seq, name, unnamed)?;
    let op = Op::Save {
        kind,
        name,
        overwrite,
    };
    let request = engine.submit(model_id, seq, op)?;
    Ok(Json(json!({"request_id": request, "model_id": model_id})))
}

async fn save_weights(
    State(engine): State<Arc<Engine>>,
    body: Bytes,
) -> Result<Json<Value>, ServeError> {
    let req: api::SaveWeights = parse("save_weights", &body)?;
    let unnamed = "save_state needs a name";
    let at = (req.model_id.as_str(), req.seq_id);
    submit_save(
        &engine,
        at,
        req.path.as_deref(),
        Kind::Weights,
        req.overwrite,
        unnamed,
    )
}

async fn save_weights_for_sampler(
    State(engine): State<Arc<Engine>>,
    body: Bytes,
) -> Result<Json<Value>, ServeError> {
    let req: api::SaveWeightsForSampler = parse("save_weights_for_sampler", &body)?;
    if let (None, Some(seq)) = (&req.path, req.sampling_session_seq_id) {
        // save_weights_and_get_sampling_client: a sampler over the model as it is, in the
        // client's session.
        let session = names::session_of(&req.model_id);
        let base_model = engine.model_info(&req.model_id)?.base_model;
        let info = SamplerInfo {
            base_model,
            model_path: None,
        };
        let registered = engine.register_sampler(session, seq, info);
        let (sampler_id, _) = match registered {
            Ok(r) => r,
            Err(e) => {
                engine.submit(&req.model_id, req.seq_id, Op::Refused)?;
                return Err(e);
            }
        };
        let op = Op::Sampler { sampler_id };
        let request = engine.submit(&req.model_id, req.seq_id, op)?;
        return Ok(Json(
            json!({"request_id": request, "model_id": req.model_id}),
        ));
    }
    let unnamed = "save_weights_for_sampler needs a name (or a sampling_session_seq_id, as \
         save_weights_and_get_sampling_client sends)";
    let at = (req.model_id.as_str(), req.seq_id);
    submit_save(
        &engine,
        at,
        req.path.as_deref(),
        Kind::Sampler,
        false,
        unnamed,
    )
}

async fn load_weights(
    State(engine): State<Arc<Engine>>,
    body: Bytes,
) -> Result<Json<Value>, ServeError> {
    let req: api::LoadWeights = parse("load_weights", &body)?;
    match (&req.model_id, req.seq_id, &req.session_id, req.model_seq_id) {
        (Some(model_id), Some(seq), _, _) => {
            let op = match TinkerPath::parse(&req.path) {
                Ok(path) => Op::Load {
                    path,
                    optimizer: req.optimizer,
                },
                Err(e) => {
                    engine.submit(model_id, seq, Op::Refused)?;
                    return Err(e);
                }
            };
            let request = engine.submit(model_id, seq, op)?;
            Ok(Json(json!({"request_id": request, "model_id": model_id})))
        }
        (None, _, Some(session), Some(model_seq_id)) => {
            let path = TinkerPath::parse(&req.path)?;
            let (request, model_id) =
                engine.create_from(session, model_seq_id, path, req.optimizer)?;
            Ok(Json(json!({"request_id": request, "model_id": model_id})))
        }
        _ => Err(ServeError::BadRequest(
            "load_weights: give model_id and seq_id (load_state), or session_id and \
             model_seq_id (create_training_client_from_state)"
                .into(),
        )),
    }
}

async fn list_checkpoints(
    State(engine): State<Arc<Engine>>,
    axum::extract::Path(model_id): axum::extract::Path<String>,
) -> Result<Json<Value>, ServeError> {
    let named = catalog::named_checkpoints(engine.store(), &model_id).await?;
    let checkpoints: Vec<Value> = named.iter().map(Named::to_json).collect();
    Ok(Json(json!({"checkpoints": checkpoints})))
}

/// Every run's named checkpoints, newest first, a page of them (`tinker checkpoint list`).
async fn list_user_checkpoints(
    State(engine): State<Arc<Engine>>,
    page: Result<Query<Page>, QueryRejection>,
) -> Result<Json<Value>, ServeError> {
    let page = page_of(page)?;
    let named = catalog::all_named(engine.store()).await?;
    let (named, cursor) = page.of(named, 100)?;
    let checkpoints: Vec<Value> = named.iter().map(Named::to_json).collect();
    Ok(Json(json!({"checkpoints": checkpoints, "cursor": cursor})))
}

/// The training runs, newest request first, a page of them (`tinker run list`).
async fn list_training_runs(
    State(engine): State<Arc<Engine>>,
    page: Result<Query<Page>, QueryRejection>,
) -> Result<Json<Value>, ServeError> {
    let page = page_of(page)?;
    let runs = catalog::training_runs(engine.store()).await?;
    let (runs, cursor) = page.of(runs, 20)?;
    Ok(Json(json!({"training_runs": runs, "cursor": cursor})))
}

/// One training run (`tinker run info`).
async fn get_training_run(
    State(engine): State<Arc<Engine>>,
    axum::extract::Path(model_id): axum::extract::Path<String>,
) -> Result<Json<Value>, ServeError> {
    catalog::training_run(engine.store(), &model_id)
        .await?
        .map(Json)
        .ok_or_else(|| {
            ServeError::NotFound(format!(
                "no training run {model_id:?} under this server's --checkpoint_base_uri \
                 (list_training_runs, or `tinker run list`, lists them)"
            ))
        })
}

/// What a checkpoint was saved from: its base model and LoRA.
async fn weights_info(
    State(engine): State<Arc<Engine>>,
    body: Bytes,
) -> Result<Json<Value>, ServeError> {
    let req: api::WeightsInfo = parse("weights_info", &body)?;
    let path = TinkerPath::parse(&req.tinker_path)?;
    let identity = identity_at(&engine, &path).await?;
    Ok(Json(json!({
        "base_model": identity.base_model,
        "is_lora": true,
        "lora_rank": identity.lora.rank,
        "train_attn": identity.lora.attn,
        "train_mlp": identity.lora.mlp,
        "train_unembed": identity.lora.unembed,
    })))
}

/// The model the checkpoint `path` was saved from (read off the async runtime's workers).
async fn identity_at(engine: &Engine, path: &TinkerPath) -> Result<Identity, ServeError> {
    let (store, rt, path) = (
        engine.store().clone(),
        tokio::runtime::Handle::current(),
        path.clone(),
    );
    tokio::task::spawn_blocking(move || engine::identity_at(&store, &rt, &path))
        .await
        .map_err(|e| ServeError::Internal(format!("reading the checkpoint: {e}")))?
}

/// A page's query (`limit`, `offset`), or a 400 that says what is wrong with it.
fn page_of(page: Result<Query<Page>, QueryRejection>) -> Result<Page, ServeError> {
    page.map(|Query(p)| p).map_err(|e| {
        ServeError::BadRequest(format!(
            "the query: {e}; limit and offset are whole numbers ≥ 0"
        ))
    })
}

async fn create_sampling_session(
    State(engine): State<Arc<Engine>>,
    body: Bytes,
) -> Result<Json<Value>, ServeError> {
    let req: api::CreateSamplingSession = parse("create_sampling_session", &body)?;
    let (info, source) =
        match (req.model_path, req.base_model) {
            // Saved sampler weights: their base read from the checkpoint.
            (Some(model_path), _) => {
                let path = TinkerPath::parse(&model_path)?;
                let base_model = identity_at(&engine, &path).await?.base_model;
                let info = SamplerInfo {
                    base_model,
                    model_path: Some(model_path),
                };
                (info, SamplerSource::Checkpoint(path))
            }
            // A base model alone.
            (None, Some(name)) => {
                engine.check_base(&name)?;
                let info = SamplerInfo {
                    base_model: name.clone(),
                    model_path: None,
                };
                (info, SamplerSource::Base(name))
            }
            (None, None) => return Err(ServeError::BadRequest(
                "create_sampling_session: give model_path (saved sampler weights) or base_model"
                    .into(),
            )),
        };
    let (id, new) = engine.register_sampler(&req.session_id, req.sampling_session_seq_id, info)?;
    if new {
        engine.make_sampler(id.clone(), source)?;
    }
    Ok(Json(json!({"sampling_session_id": id})))
}

async fn sampler(
    State(engine): State<Arc<Engine>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, ServeError> {
    let info = engine.sampler_info(&id)?;
    Ok(Json(json!({
        "sampler_id": id,
        "base_model": info.base_model,
        "model_path": info.model_path,
    })))
}

/// Tokens a sample takes when the request sets no `max_tokens`.
const DEFAULT_MAX_TOKENS: usize = 64;

/// Stop strings a request may give, and their length.
const MAX_STOP_STRINGS: usize = 64;
const MAX_STOP_STRING_BYTES: usize = 1024;

/// Samples a request may ask for at once.
const MAX_SAMPLES: usize = 128;

async fn asample(
    State(engine): State<Arc<Engine>>,
    body: Bytes,
) -> Result<Json<Value>, ServeError> {
    let req: api::ASample = parse("asample", &body)?;
    let bad = |what: String| ServeError::BadRequest(format!("asample: {what}"));
    let mut prompt = Vec::new();
    for chunk in &req.prompt.chunks {
        if chunk.kind != "encoded_text" {
            return Err(bad(format!(
                "a {:?} chunk: only encoded_text chunks are served",
                chunk.kind
            )));
        }
        prompt.extend(&chunk.tokens);
    }
    if !(1..=MAX_SAMPLES).contains(&req.num_samples) {
        return Err(bad(format!(
            "num_samples {}: between 1 and {MAX_SAMPLES}",
            req.num_samples
        )));
    }
    let p = &req.sampling_params;
    // Token ids replace the model's end-of-sequence tokens; strings come on top of them.
    let (stop, stop_strings): (Option<Vec<i64>>, Vec<String>) = match &p.stop {
        None => (None, Vec::new()),
        Some(Value::String(s)) => (None, vec![s.clone()]),
        Some(Value::Array(items)) if items.iter().all(Value::is_i64) => (
            Some(items.iter().filter_map(Value::as_i64).collect()),
            Vec::new(),
        ),
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
            let strings = items.iter().filter_map(Value::as_str).map(String::from);
            (None, strings.collect())
        }
        Some(other) => {
            return Err(bad(format!(
                "stop {other}: a string, a list of strings or a list of token ids"
            )))
        }
    };
    if let Some(s) = stop_strings.iter().find(|s| s.is_empty()) {
        return Err(bad(format!(
            "stop {s:?}: an empty stop string would stop at once"
        )));
    }
    // Each is looked for in every sample at every step.
    if stop_strings.len() > MAX_STOP_STRINGS
        || stop_strings.iter().any(|s| s.len() > MAX_STOP_STRING_BYTES)
    {
        return Err(bad(format!(
            "stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_STRING_BYTES} bytes"
        )));
    }
    let request = Sample {
        prompt,
        params: SampleParams {
            max_tokens: p.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            seed: p.seed,
            stop: stop.clone().unwrap_or_default(),
        },
        stop_given: stop.is_some(),
        stop_strings,
        samples: req.num_samples,
        prompt_logprobs: req.prompt_logprobs,
    };
    let id = engine.sample(&req.sampling_session_id, request)?;
    let sequences: Vec<String> = (0..req.num_samples).map(|i| format!("{id}-{i}")).collect();
    Ok(Json(
        json!({"request_id": id, "sample_sequence_ids": sequences}),
    ))
}

async fn retrieve_future(
    State(engine): State<Arc<Engine>>,
    body: Bytes,
) -> Result<Response, ServeError> {
    let req: api::RetrieveFuture = parse("retrieve_future", &body)?;
    Ok(
        match engine.futures().poll(&req.request_id, LONG_POLL).await {
            Polled::Done(outcome) => match outcome.as_ref() {
                Outcome::Json(v) => Json(v.clone()).into_response(),
                Outcome::Proto(bytes) => (
                    [(header::CONTENT_TYPE, "application/x-protobuf")],
                    bytes.clone(),
                )
                    .into_response(),
                Outcome::Failed { error, category } => {
                    Json(json!({"error": error, "category": category.as_str()})).into_response()
                }
            },
            Polled::Pending => Json(json!({
                "type": "try_again",
                "request_id": req.request_id,
                "queue_state": "active",
            }))
            .into_response(),
            Polled::Unknown => {
                return Err(ServeError::NotFound(format!(
                "request {:?} is unknown (or its outcome was dropped, 10 minutes after it came)",
                req.request_id
            )))
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inputs_shape_must_fit_its_datum() {
        assert_eq!(width_of("weights", &[], 4), Ok(1));
        assert_eq!(width_of("weights", &[4], 4), Ok(1));
        assert_eq!(width_of("target_tokens", &[4, 3], 4), Ok(3));
        for (shape, says) in [
            (vec![5], "4 rows wanted"),
            (vec![3, 2], "4 rows wanted"),
            (vec![4, 0], "1 <= K <= 4096"),
            (vec![4, -2], "1 <= K <= 4096"),
            (vec![4, 4_611_686_018_427_387_905], "1 <= K <= 4096"),
        ] {
            let err = width_of("target_tokens", &shape, 4).unwrap_err();
            assert!(err.contains(says), "{shape:?}: {err}");
        }
    }

    #[test]
    fn the_key_is_read_checked_and_compared_without_echoing_it() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "tml-secret-1\n").unwrap();
        let k = ApiKey::read(&key).unwrap();
        assert!(k.matches(b"tml-secret-1") && !k.matches(b"tml-secret-2") && !k.matches(b""));
        std::fs::write(&key, "not-a-tinker-key").unwrap();
        let err = ApiKey::read(&key).err().unwrap().to_string();
        assert!(err.contains("must start with `tml-`"), "{err}");
        assert!(
            !err.contains("not-a-tinker-key"),
            "the key is never echoed: {err}"
        );
    }
}
