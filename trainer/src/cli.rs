//! The `waypoint` command line.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::device::parse_device;
use crate::smoke::{self, SmokeConfig};

/// waypoint: the trainer-side checkpoint and resume runtime.
#[derive(Debug, Parser)]
#[command(name = "waypoint", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train. For now a small smoke run on libtorch, recorded under the run layout.
    Train(TrainArgs),
}

#[derive(Debug, clap::Args)]
struct TrainArgs {
    /// Where runs live: a local path, file://, s3://, gs://, az:// or memory://.
    #[arg(long = "checkpoint_base_uri", default_value = "./runs")]
    checkpoint_base_uri: String,
    /// The run's id (a safe name: letters, digits, `.`, `_`, `-`).
    #[arg(long = "run_id", default_value = "demo")]
    run_id: String,
    /// The framework segment of the run layout.
    #[arg(long = "framework", default_value = "waypoint")]
    framework: String,
    /// Optimizer steps.
    #[arg(long = "max_steps", default_value_t = 50)]
    max_steps: u64,
    /// Learning rate.
    #[arg(long = "lr", default_value_t = 1e-2)]
    lr: f64,
    /// Rows per batch.
    #[arg(long = "batch_size", default_value_t = 64)]
    batch_size: i64,
    /// Seed.
    #[arg(long = "seed", default_value_t = 0)]
    seed: i64,
    /// auto, cpu, cuda or cuda:<index>.
    #[arg(long = "device", default_value = "auto")]
    device: String,
}

/// Entry point of the binary: parses arguments, runs, and maps errors to an exit code.
pub fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Train(args) => {
            let device = parse_device(&args.device)?;
            let config = SmokeConfig {
                checkpoint_base_uri: args.checkpoint_base_uri,
                run_id: args.run_id,
                framework: args.framework,
                max_steps: args.max_steps,
                lr: args.lr,
                batch_size: args.batch_size,
                seed: args.seed,
            };
            tracing::info!(?device, run_id = %config.run_id, "smoke training run");
            let outcome = runtime.block_on(smoke::run(&config, device))?;
            println!(
                "trained {} steps on {device:?}: loss {:.4} -> {:.4}; run recorded under {}/{}",
                outcome.steps,
                outcome.first_loss,
                outcome.last_loss,
                config.checkpoint_base_uri.trim_end_matches('/'),
                config.run_id
            );
            Ok(())
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
