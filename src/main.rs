//! The `tokenwarden` binary: the worker and its operator commands.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use tokenwarden::access::cli::AccessCommand;
use tokenwarden::chain::cli::IndexCommand;
use tokenwarden::config::Config;
use tokenwarden::ledger::cli::CreditsCommand;
use tokenwarden::maintenance::cli::AnomaliesCommand;
use tokenwarden::queue::cli::DeadLettersCommand;
use tokenwarden::snapshots::cli::SnapshotCommand;

#[derive(Debug, Parser)]
#[command(name = "tokenwarden", version, about)]
struct Cli {
    /// Extra TOML configuration file, applied over the built-in defaults and under the
    /// TOKENWARDEN__* environment variables.
    #[arg(long, global = true, env = "TOKENWARDEN_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the worker: queue consumers, indexers, scheduler and the operations endpoint.
    Run,
    /// Apply database migrations, write the `[ledger]` bounds into the database, and exit.
    Migrate,
    /// Put one job on its stream; with --wait, wait up to that many ms for its outcome.
    Enqueue {
        job_type: String,
        json: String,
        #[arg(long)]
        wait: Option<u64>,
    },
    /// Balances, grants and history.
    #[command(subcommand)]
    Credits(CreditsCommand),
    /// Jobs the queue could not process.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLettersCommand),
    /// Chain indexer status and reconciliation.
    #[command(subcommand)]
    Index(IndexCommand),
    /// Holder snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Usage anomalies.
    #[command(subcommand)]
    Anomalies(AnomaliesCommand),
    /// Access rules, checks and proven wallets.
    #[command(subcommand)]
    Access(AccessCommand),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cfg = Config::load(cli.config.as_deref()).context("invalid configuration")?;
    tokenwarden::infra::init_telemetry(&cfg.telemetry);
    match cli.command {
        Command::Run => tokenwarden::worker::run(cfg).await?,
        Command::Migrate => {
            let pool = tokenwarden::infra::connect_postgres(&cfg.database).await?;
            tokenwarden::infra::migrate(&pool).await?;
            // The SQL door enforces the configured bounds even before a worker starts.
            tokenwarden::ledger::Ledger::new(pool.clone(), cfg.ledger.clone())
                .write_settings()
                .await?;
            tokenwarden::access::settings::write_settings(&pool, &cfg.access).await?;
            println!("migrations applied");
        }
        Command::Enqueue {
            job_type,
            json,
            wait,
        } => tokenwarden::queue::cli::enqueue(&cfg, &job_type, &json, wait).await?,
        Command::Credits(cmd) => tokenwarden::ledger::cli::run(cmd, &cfg).await?,
        Command::DeadLetters(cmd) => tokenwarden::queue::cli::run(cmd, &cfg).await?,
        Command::Index(cmd) => tokenwarden::chain::cli::run(cmd, &cfg).await?,
        Command::Snapshot(cmd) => tokenwarden::snapshots::cli::run(cmd, &cfg).await?,
        Command::Access(cmd) => tokenwarden::access::cli::run(cmd, &cfg).await?,
        Command::Anomalies(cmd) => tokenwarden::maintenance::cli::run(cmd, &cfg).await?,
    }
    Ok(())
}
