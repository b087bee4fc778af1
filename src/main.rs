//! The `tokenwarden` binary: the worker and its operator commands.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use tokenwarden::cli::OperatorCommand;
use tokenwarden::config::Config;

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
    #[command(flatten)]
    Operator(OperatorCommand),
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
        Command::Operator(cmd) => tokenwarden::cli::run(cmd, &cfg).await?,
    }
    Ok(())
}
