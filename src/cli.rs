//! The `waypoint` command line: `train`, `launch`, `ckpt`, `status` and `serve`.
//!
//! Exit codes: 0 done; 1 failed (the error is printed, recorded in `status.json` and in
//! `TORCHELASTIC_ERROR_FILE`); 2 bad usage or configuration, found before any work; 3 `ckpt verify`
//! found damage; 128 + N stopped by signal N (SIGTERM: 143) after saving a resumable checkpoint.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use anyhow::Result;
use clap::{Parser, Subcommand};
use serde::Serialize;
use serde_json::{Map, Value};

use waypoint_config::{merge, read_config_file, ConfigError, Origin, TrainConfig};
use waypoint_trainer::run::memory::MemoryPlanError;
use waypoint_trainer::run::{Outcome, UsageError};

/// waypoint: the trainer-side checkpoint and resume runtime.
#[derive(Debug, Parser)]
#[command(name = "waypoint", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train (every flag has a default: `waypoint train` alone runs the embedded demo).
    Train(Box<TrainArgs>),
    /// Start N local workers of a command the way torchrun does (store, environment, restarts).
    Launch(waypoint_launch::LaunchArgs),
    /// Inspect and manage a run's checkpoints.
    Ckpt {
        #[command(subcommand)]
        command: crate::ckpt::CkptCommand,
    },
    /// Where a run stands: state, step / total, ETA, loss, tokens/s, checkpoints, last error.
    Status(crate::status::StatusArgs),
    /// A service-mode trainer that the Tinker SDK drives over HTTP (see docs/serve.md).
    Serve(waypoint_serve::ServeArgs),
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `waypoint train` flags, spelled as the control plane passes them to train.py. Unset flags fall
/// back to `--config_path`, then to the built-in defaults (see `crates/config/src/flags.rs`).
#[derive(Debug, Default, clap::Args, Serialize)]
struct TrainArgs {
    /// A JSON or TOML file of settings with these same names (flags win).
    #[arg(long = "config_path")]
    #[serde(skip)]
    config_path: Option<PathBuf>,
    /// The framework segment of the run layout [default: waypoint].
    #[arg(long = "framework")]
    #[serde(skip_serializing_if = "Option::is_none")]
    framework: Option<String>,
    /// builtin:tiny, or a local Hugging Face model directory [default: builtin:tiny].
    #[arg(long = "model_id")]
    #[serde(skip_serializing_if = "Option::is_none")]
    model_id: Option<String>,
    /// The run's id [default: demo].
    #[arg(long = "run_id")]
    #[serde(skip_serializing_if = "Option::is_none")]
    run_id: Option<String>,
    /// Where runs live: local path, file://, s3://, gs://, az://, memory:// [default: ./runs].
    #[arg(long = "checkpoint_base_uri")]
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint_base_uri: Option<String>,
    /// builtin:demo (builtin:demo_preference for --recipe dpo/orpo), a JSONL file or directory, or a
    /// store URI [default: builtin:demo].
    #[arg(long = "dataset_uri")]
    #[serde(skip_serializing_if = "Option::is_none")]
    dataset_uri: Option<String>,
    /// The JSON field holding a row's text [default: text].
    #[arg(long = "dataset_text_field")]
    #[serde(skip_serializing_if = "Option::is_none")]
    dataset_text_field: Option<String>,
    /// Eval data for --eval_steps (same forms as --dataset_uri).
    #[arg(long = "eval_dataset_uri")]
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_dataset_uri: Option<String>,
    /// Log eval loss every N steps [default: 0, never].
    #[arg(long = "eval_steps")]
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_steps: Option<u64>,
    /// Optimizer steps; 0 means as many as --num_epochs take [default: 0].
    #[arg(long = "max_steps")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_steps: Option<u64>,
    /// Passes over the data when --max_steps is 0 [default: 3].
    #[arg(long = "num_epochs")]
    #[serde(skip_serializing_if = "Option::is_none")]
    num_epochs: Option<u64>,
    /// Peak learning rate [default: 3e-3].
    #[arg(long = "lr")]
    #[serde(skip_serializing_if = "Option::is_none")]
    lr: Option<f64>,
    /// cosine, linear or constant [default: cosine].
    #[arg(long = "lr_scheduler")]
    #[serde(skip_serializing_if = "Option::is_none")]
    lr_scheduler: Option<String>,
    /// Linear warmup steps [default: 10].
    #[arg(long = "warmup_steps")]
    #[serde(skip_serializing_if = "Option::is_none")]
    warmup_steps: Option<u64>,
    /// Final learning rate as a fraction of --lr [default: 0.1].
    #[arg(long = "min_lr_ratio")]
    #[serde(skip_serializing_if = "Option::is_none")]
    min_lr_ratio: Option<f64>,
    /// AdamW weight decay [default: 0.01].
    #[arg(long = "weight_decay")]
    #[serde(skip_serializing_if = "Option::is_none")]
    weight_decay: Option<f64>,
    /// AdamW beta1 [default: 0.9].
    #[arg(long = "adam_beta1")]
    #[serde(skip_serializing_if = "Option::is_none")]
    adam_beta1: Option<f64>,
    /// AdamW beta2 [default: 0.999].
    #[arg(long = "adam_beta2")]
    #[serde(skip_serializing_if = "Option::is_none")]
    adam_beta2: Option<f64>,
    /// AdamW epsilon [default: 1e-8].
    #[arg(long = "adam_epsilon")]
    #[serde(skip_serializing_if = "Option::is_none")]
    adam_epsilon: Option<f64>,
    /// Clip the global gradient norm (0: off) [default: 1.0].
    #[arg(long = "max_grad_norm")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_grad_norm: Option<f64>,
    /// Samples per micro-batch [default: 8].
    #[arg(long = "batch_size")]
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_size: Option<u64>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long = "gradient_accumulation")]
    #[serde(skip_serializing_if = "Option::is_none")]
    gradient_accumulation: Option<u64>,
    /// Tokens per sample [default: 64].
    #[arg(long = "max_seq_len")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_seq_len: Option<u64>,
    /// Pad each document instead of packing documents into full samples.
    #[arg(long = "disable_packing")]
    #[serde(skip_serializing_if = "is_false")]
    disable_packing: bool,
    /// Skip and count malformed dataset rows instead of failing.
    #[arg(long = "skip_bad_lines")]
    #[serde(skip_serializing_if = "is_false")]
    skip_bad_lines: bool,
    /// Accepted for the control plane; data is tokenized once, up front.
    #[arg(long = "dataloader_workers")]
    #[serde(skip_serializing_if = "Option::is_none")]
    dataloader_workers: Option<u64>,
    /// Resumable save every N steps (0: only the final save), or `auto`: the interval Young and
    /// Daly's model gives from the measured cost of a save and --mtbf_hours [default: 50].
    #[arg(long = "save_steps")]
    #[serde(skip_serializing_if = "Option::is_none")]
    save_steps: Option<waypoint_config::SaveSteps>,
    /// The job's mean time between failures in hours, for --save_steps auto.
    #[arg(long = "mtbf_hours")]
    #[serde(skip_serializing_if = "Option::is_none")]
    mtbf_hours: Option<f64>,
    /// The recipe's name for --save_steps.
    #[arg(long = "dcp_save_interval")]
    #[serde(skip_serializing_if = "Option::is_none")]
    dcp_save_interval: Option<u64>,
    /// Keep the newest N resumable checkpoints (0: all) [default: 3].
    #[arg(long = "keep_last")]
    #[serde(skip_serializing_if = "Option::is_none")]
    keep_last: Option<u64>,
    /// A promotable sampler save every N steps: the first a full base, later ones deltas over it
    /// (INFERENCE_ARC_V2) (0: none besides the final save) [default: 0].
    #[arg(long = "sampler_save_steps")]
    #[serde(skip_serializing_if = "Option::is_none")]
    sampler_save_steps: Option<u64>,
    /// A new full sampler base after N deltas, or sooner when a delta would exceed half the full
    /// size (0: every sampler save is a base) [default: 8].
    #[arg(long = "sampler_base_every")]
    #[serde(skip_serializing_if = "Option::is_none")]
    sampler_base_every: Option<u64>,
    /// Wait for every upload instead of saving in the background.
    #[arg(long = "sync_save")]
    #[serde(skip_serializing_if = "is_false")]
    sync_save: bool,
    /// Save the resumable state to the node's memory tier every N steps, so a crash costs at most
    /// N steps (0: off) [default: 1].
    #[arg(long = "memory_save_steps")]
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_save_steps: Option<u64>,
    /// Where the node's memory tier lives (a tmpfs that outlives the worker) [default:
    /// /dev/shm/waypoint].
    #[arg(long = "memory_tier_dir")]
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_tier_dir: Option<String>,
    /// dtype of the promotable weights: bf16, fp16, fp32 [default: bf16].
    #[arg(long = "sampler_dtype")]
    #[serde(skip_serializing_if = "Option::is_none")]
    sampler_dtype: Option<String>,
    /// Promote the final checkpoint to models/<id>/.
    #[arg(long = "output_model_id")]
    #[serde(skip_serializing_if = "Option::is_none")]
    output_model_id: Option<String>,
    /// run_id:step-N — start from another run's weights (ignored once this run has checkpoints).
    #[arg(long = "init_from_checkpoint")]
    #[serde(skip_serializing_if = "Option::is_none")]
    init_from_checkpoint: Option<String>,
    /// Resume although the optimizer, schedule, global batch, LoRA scale or recipe differ from
    /// what the checkpoint was trained with (the change is logged and recorded).
    #[arg(long = "allow_config_change")]
    #[serde(skip_serializing_if = "is_false")]
    allow_config_change: bool,
    /// Accepted as the control plane passes it; resuming is always automatic.
    #[arg(long = "resume_from_checkpoint")]
    #[serde(skip_serializing_if = "is_false")]
    resume_from_checkpoint: bool,
    /// Seed of weights, data order and dropout [default: 42].
    #[arg(long = "seed")]
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    /// LoRA rank; 0 trains all parameters [default: 0].
    #[arg(long = "lora_rank")]
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_rank: Option<u64>,
    /// LoRA alpha [default: 2 × rank].
    #[arg(long = "lora_alpha")]
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_alpha: Option<f64>,
    /// LoRA dropout [default: 0].
    #[arg(long = "lora_dropout")]
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_dropout: Option<f64>,
    /// Comma-separated projections LoRA wraps: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    /// down_proj, and lm_head (the unembedding) [default: the seven of each layer].
    #[arg(long = "lora_target_modules")]
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_target_modules: Option<String>,
    /// auto, cpu, cuda or cuda:<i> [default: auto].
    #[arg(long = "device")]
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    /// libtorch CPU threads (0: libtorch's default) [default: 0].
    #[arg(long = "num_threads")]
    #[serde(skip_serializing_if = "Option::is_none")]
    num_threads: Option<u64>,
    /// Progress line every N steps when not on a terminal [default: 10].
    #[arg(long = "logging_steps")]
    #[serde(skip_serializing_if = "Option::is_none")]
    logging_steps: Option<u64>,
    /// Seconds to wait for the other ranks, at start and in every collective [default: 300].
    #[arg(long = "dist_timeout_secs")]
    #[serde(skip_serializing_if = "Option::is_none")]
    dist_timeout_secs: Option<u64>,
    /// Recompute each decoder layer in the backward pass instead of keeping its activations.
    #[arg(long = "activation_checkpointing")]
    #[serde(skip_serializing_if = "is_false")]
    activation_checkpointing: bool,
    /// When the memory plan exceeds what is available: refuse or warn [default: refuse].
    #[arg(long = "memory_check")]
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_check: Option<String>,
    /// none (replicated), optimizer (AdamW state sharded over the ranks) or full (weights,
    /// gradients and AdamW state sharded; layers gathered as they run) [default: none].
    #[arg(long = "sharding")]
    #[serde(skip_serializing_if = "Option::is_none")]
    sharding: Option<String>,
    /// Where tokenized datasets are cached, shared by runs and ranks of this machine [default:
    /// $XDG_CACHE_HOME/waypoint/data, else ~/.cache/waypoint/data].
    #[arg(long = "data_cache_dir")]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_cache_dir: Option<String>,
    /// The objective: sft (next-token cross-entropy), dpo or orpo (preference pairs: prompt,
    /// chosen, rejected) [default: sft].
    #[arg(long = "recipe")]
    #[serde(skip_serializing_if = "Option::is_none")]
    recipe: Option<String>,
    /// DPO: the KL weight β; ORPO: the weight of the odds-ratio term (TRL's beta) [default: 0.1].
    #[arg(long = "beta")]
    #[serde(skip_serializing_if = "Option::is_none")]
    beta: Option<f64>,
    /// DPO's loss: sigmoid, ipo or hinge (TRL's loss_type) [default: sigmoid].
    #[arg(long = "dpo_loss")]
    #[serde(skip_serializing_if = "Option::is_none")]
    dpo_loss: Option<String>,
    /// DPO: weight of an NLL term on the chosen completions (RPO; TRL's loss_type "sft") [default: 0].
    #[arg(long = "rpo_alpha")]
    #[serde(skip_serializing_if = "Option::is_none")]
    rpo_alpha: Option<f64>,
}

impl TrainArgs {
    /// Defaults ← `--config_path` ← flags, validated.
    fn resolve(&self) -> Result<TrainConfig, ConfigError> {
        let mut config = TrainConfig::default();
        if let Some(path) = &self.config_path {
            let file = read_config_file(path)?;
            config = merge(&config, &file, &Origin::File(path.clone()))?;
        }
        // Non-finite floats serialize as null, which `merge` names as such.
        let flags: Map<String, Value> = match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        let mut config = merge(&config, &flags, &Origin::Flags)?;
        config.validate()?;
        Ok(config)
    }
}

/// Why `waypoint train`'s arguments were refused.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// The command line does not parse (an unknown flag, a value of the wrong type, …); clap's message
    /// names the flag.
    #[error("{0}")]
    Flags(String),
    /// The settings parse but cannot be used.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Resolves `waypoint train`'s arguments (`argv` without the program and subcommand names) as the
/// command does: defaults ← `--config_path` ← flags, validated. Never panics on any input.
pub fn resolve_train_args<I, T>(argv: I) -> std::result::Result<TrainConfig, ArgsError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    #[derive(Parser)]
    #[command(name = "train")]
    struct One {
        #[command(flatten)]
        args: TrainArgs,
    }
    let argv =
        std::iter::once(std::ffi::OsString::from("train")).chain(argv.into_iter().map(Into::into));
    let one = One::try_parse_from(argv).map_err(|e| ArgsError::Flags(e.render().to_string()))?;
    Ok(one.args.resolve()?)
}

/// Entry point of the binary: parses arguments, runs, and maps the result to an exit code.
pub fn main() -> ExitCode {
    init_tracing();
    route_panics_to_the_log();
    // Parse errors echo the offending argument: redacted like every other message.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let text = waypoint_storage::redact_text(&e.render().to_string());
            if e.use_stderr() {
                say_err(format_args!("{}", text.trim_end()));
            } else {
                say(format_args!("{}", text.trim_end()));
            }
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    if matches!(cli.command, Command::Ckpt { .. } | Command::Status(_)) {
        // `waypoint ckpt verify RUN | head -1`: a reader that goes away ends the listing quietly, as
        // it does for any Unix tool. (`train` keeps ignoring SIGPIPE — a closed log pipe must not kill
        // a training job — and writes its few result lines without panicking instead.)
        restore_default_sigpipe();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say_err(format_args!("error: starting the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Train(args) => train(&args, &runtime),
        Command::Launch(args) => match waypoint_launch::run(&args, stop_on_signals()) {
            Ok(code) => code,
            Err(e) => {
                say_err(format_args!(
                    "error: {}",
                    waypoint_storage::redact_text(&e.to_string())
                ));
                if matches!(e, waypoint_launch::LaunchError::Usage(_)) {
                    ExitCode::from(2)
                } else {
                    ExitCode::FAILURE
                }
            }
        },
        Command::Status(args) => exit_of(runtime.block_on(crate::status::run(args))),
        Command::Ckpt { command } => exit_of(runtime.block_on(crate::ckpt::run(command))),
        Command::Serve(args) => serve(args, &runtime),
    }
}

/// `waypoint serve` until SIGTERM or SIGINT: 0 after a clean stop, 2 when a flag or file is
/// wrong, 1 on another failure.
fn serve(args: waypoint_serve::ServeArgs, runtime: &tokio::runtime::Runtime) -> ExitCode {
    let stop = async {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
        tracing::info!("waypoint serve: stopping (signal): no new requests, those in flight end");
    };
    match runtime.block_on(waypoint_serve::run(args, stop)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say_err(format_args!("error: {e}"));
            match e {
                waypoint_serve::ServeError::Start(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// The exit code of a subcommand that reads runs (`status`, `ckpt`): its own, or 1 with the error
/// explained on stderr.
fn exit_of(result: anyhow::Result<ExitCode>) -> ExitCode {
    result.unwrap_or_else(|e| {
        say_err(format_args!("error: {}", waypoint_observe::explain(&e)));
        ExitCode::FAILURE
    })
}

fn train(args: &TrainArgs, runtime: &tokio::runtime::Runtime) -> ExitCode {
    let config = match args.resolve() {
        Ok(c) => c,
        Err(e) => {
            say_err(format_args!(
                "error: {}",
                waypoint_storage::redact_text(&format!("{e:#}"))
            ));
            return ExitCode::from(2);
        }
    };
    let stop = stop_on_signals();
    let base = config
        .run
        .checkpoint_base_uri
        .trim_end_matches('/')
        .to_string();
    // Only printed after a run (whose names were validated); an invalid name fails in `run` first.
    let run = waypoint_checkpoint::RunLayout::new(&config.run.run_id, &config.run.framework)
        .map(|layout| layout.uri_under(&base))
        .unwrap_or_default();
    // Under a launcher the run's outcome is rank 0's to print; the others print only their errors.
    let secondary = secondary_rank();
    match waypoint_trainer::run::run(config, stop, runtime) {
        Ok(Outcome::Finished { .. }) if secondary.is_some() => ExitCode::SUCCESS,
        Ok(Outcome::Finished {
            steps,
            last_loss,
            checkpoint,
            model,
        }) => {
            if last_loss.is_nan() {
                say(format_args!(
                    "already finished: {steps} steps; final checkpoint {checkpoint} in {run}"
                ));
            } else {
                say(format_args!("finished {steps} steps (last loss {last_loss:.4}); final checkpoint {checkpoint} in {run}"));
            }
            if let Some(m) = model {
                say(format_args!("promoted to {base}/{m}"));
            }
            ExitCode::SUCCESS
        }
        Ok(Outcome::Stopped { signal, step }) => {
            if secondary.is_none() {
                say(format_args!("stopped by signal {signal} after step {step}; saved in {run}; run the same command to resume"));
            }
            ExitCode::from((128 + signal).min(255) as u8)
        }
        Err(e) => {
            let message = waypoint_observe::explain(&e);
            say_err(format_args!("error: {message}"));
            if e.downcast_ref::<UsageError>().is_some() {
                return ExitCode::from(2);
            }
            if e.downcast_ref::<MemoryPlanError>().is_some() {
                // Recorded in status.json; retrying the same command cannot help.
                waypoint_launch::write_error_file(&message);
                return ExitCode::from(2);
            }
            waypoint_launch::write_error_file(&message);
            ExitCode::FAILURE
        }
    }
}

/// A panic (tch panics on a libtorch error; the training step catches it and the run ends `FAILED`)
/// is reported through the log — one redacted line with where it happened — instead of the default
/// hook's raw text. With `RUST_BACKTRACE` set, the default hook (and its backtrace) is kept.
fn route_panics_to_the_log() {
    if std::env::var_os("RUST_BACKTRACE").is_some() {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(at, "panic: {}", message.lines().next().unwrap_or(""));
    }));
}

/// Prints a line on stderr, prefixed with the rank on a worker other than rank 0 (as its log lines
/// are); a closed stderr is not an error of the run (the line is dropped).
fn say_err(line: std::fmt::Arguments) {
    use std::io::Write;
    let prefix = secondary_rank().map_or(String::new(), |r| format!("[rank {r}] "));
    // One write, so lines of workers sharing a pipe do not interleave mid-line.
    let text = format!("{prefix}{line}\n");
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Prints a result line on stdout; a closed stdout (a reader that went away) is not an error of the
/// run, so the line is dropped rather than panicking.
fn say(line: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(line).and_then(|()| out.write_all(b"\n"));
}

/// Lets SIGPIPE end the process, as it does a C program (Rust ignores it, so a write to a closed pipe
/// fails and `println!` panics).
fn restore_default_sigpipe() {
    // SAFETY: signal(2) with SIG_DFL installs no handler of ours; nothing else is running yet.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// A flag that holds the signal number once SIGTERM or SIGINT arrives (0 before).
fn stop_on_signals() -> Arc<AtomicUsize> {
    let stop = Arc::new(AtomicUsize::new(0));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register_usize(signal, stop.clone(), signal as usize) {
            tracing::warn!(signal, %e, "could not install the signal handler");
        }
    }
    stop
}

/// This process's rank when it is one of several workers (`WORLD_SIZE` > 1, as a launcher or
/// torchrun sets it) other than rank 0: its stderr carries only its own warnings and errors,
/// prefixed with the rank, and the rest goes to its file (`logs/ranks/`).
fn secondary_rank() -> Option<u32> {
    let var = |name| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
    };
    match (var("RANK"), var("WORLD_SIZE")) {
        (Some(rank), Some(world)) if world > 1 && rank > 0 => Some(rank),
        _ => None,
    }
}

fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let secondary = secondary_rank();
    let prefix: std::sync::Arc<str> = secondary
        .map_or(String::new(), |r| format!("[rank {r}] "))
        .into();
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(move || {
            waypoint_observe::Prefixed(
                prefix.clone(),
                waypoint_observe::Redacting(std::io::stderr()),
            )
        })
        // A closed stderr (`waypoint train 2>&1 | head -1`) must not end the run: the subscriber's
        // own report of a failed write would go to that stderr and panic.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(tracing_subscriber::filter::filter_fn(move |meta| {
            // Run-level events and progress are rank 0's to print, once.
            meta.target() != waypoint_observe::trainlog::FILE_ONLY
                && (secondary.is_none() || *meta.level() <= tracing::Level::WARN)
        }));
    // The same lines, without colour codes, into the run's logs/train.log (crates/observe/src/trainlog.rs).
    let train_log = tracing_subscriber::fmt::layer()
        .with_writer(|| waypoint_observe::Redacting(waypoint_observe::trainlog::writer()))
        .log_internal_errors(false)
        .with_ansi(false);
    // The file first: a line seen on stderr is already in the file.
    tracing_subscriber::registry()
        .with(filter)
        .with(train_log)
        .with(stderr)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve_for_test(argv: &[&str]) -> Result<TrainConfig> {
        Ok(resolve_train_args(argv)?)
    }

    #[test]
    fn every_setting_has_a_flag_and_flags_win() {
        let command = <TrainArgs as clap::Args>::augment_args(clap::Command::new("train"));
        let mut flags: Vec<String> = command
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_string))
            .filter(|f| f != "config_path")
            .collect();
        flags.sort();
        let mut keys = waypoint_config::keys();
        keys.sort();
        assert_eq!(flags, keys);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        std::fs::write(&path, r#"{"lr": 0.5, "max_steps": 9, "sync_save": true}"#).unwrap();
        let c =
            resolve_for_test(&["--config_path", path.to_str().unwrap(), "--lr", "0.1"]).unwrap();
        assert_eq!(
            (c.optim.lr, c.run.max_steps, c.checkpointing.sync_save),
            (0.1, 9, true)
        );
        let c = resolve_for_test(&["--disable_packing"]).unwrap();
        assert!(c.data.disable_packing);
        assert!(resolve_for_test(&["--lr", "0.1", "--lr", "0.2"]).is_err());
    }
}
