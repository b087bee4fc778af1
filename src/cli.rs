//! The operator commands (`enqueue`, `credits`, `dead-letters`, `index`, `snapshot`,
//! `anomalies`, `access`, `whitelist`): one dispatch, one Postgres connection for the commands that need it, and one
//! error type for `main`.
//!
//! Each area's `cli` module prints its own data and returns its own refusals; connecting is
//! done here once, so no area repeats the connection failure.

use clap::Subcommand;

use crate::config::Config;
use crate::infra::{StoreError, connect_postgres};

/// The operator subcommands of `tokenwarden` (flattened into the binary's command list).
#[derive(Debug, Subcommand)]
pub enum OperatorCommand {
    /// Put one job on its stream; with --wait, wait up to that many ms for its outcome.
    Enqueue {
        job_type: String,
        json: String,
        #[arg(long)]
        wait: Option<u64>,
    },
    /// Balances, grants and history.
    #[command(subcommand)]
    Credits(crate::ledger::cli::CreditsCommand),
    /// Jobs the queue could not process.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(crate::queue::cli::DeadLettersCommand),
    /// Chain indexer status and reconciliation.
    #[command(subcommand)]
    Index(crate::chain::cli::IndexCommand),
    /// Holder snapshots.
    #[command(subcommand)]
    Snapshot(crate::snapshots::cli::SnapshotCommand),
    /// Usage anomalies.
    #[command(subcommand)]
    Anomalies(crate::maintenance::cli::AnomaliesCommand),
    /// Access rules, checks and proven wallets.
    #[command(subcommand)]
    Access(crate::access::cli::AccessCommand),
    /// Whitelists: open, close, list, export (CSV, Merkle allowlist).
    #[command(subcommand)]
    Whitelist(crate::whitelist::cli::WhitelistCommand),
}

/// Why an operator command failed: the connection, or the area's own refusal.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] crate::queue::cli::CliError),
    #[error(transparent)]
    Credits(#[from] crate::ledger::cli::CliError),
    #[error(transparent)]
    Index(#[from] crate::chain::cli::CliError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshots::cli::CliError),
    #[error(transparent)]
    Anomalies(#[from] crate::maintenance::cli::CliError),
    #[error(transparent)]
    Access(#[from] crate::access::cli::CliError),
    #[error(transparent)]
    Whitelist(#[from] crate::whitelist::cli::CliError),
}

/// Runs one operator command; its result is printed on stdout. Every command but `enqueue`
/// (Redis only: it must work where Postgres is not reachable) connects to Postgres first.
pub async fn run(cmd: OperatorCommand, cfg: &Config) -> Result<(), CliError> {
    let postgres = || connect_postgres(&cfg.database);
    match cmd {
        OperatorCommand::Enqueue {
            job_type,
            json,
            wait,
        } => crate::queue::cli::enqueue(cfg, &job_type, &json, wait).await?,
        OperatorCommand::Credits(c) => crate::ledger::cli::run(c, &postgres().await?, cfg).await?,
        OperatorCommand::DeadLetters(c) => {
            crate::queue::cli::run(c, &postgres().await?, cfg).await?
        }
        OperatorCommand::Index(c) => crate::chain::cli::run(c, &postgres().await?, cfg).await?,
        OperatorCommand::Snapshot(c) => {
            crate::snapshots::cli::run(c, &postgres().await?, cfg).await?
        }
        OperatorCommand::Anomalies(c) => {
            crate::maintenance::cli::run(c, &postgres().await?).await?
        }
        OperatorCommand::Access(c) => crate::access::cli::run(c, &postgres().await?).await?,
        OperatorCommand::Whitelist(c) => crate::whitelist::cli::run(c, &postgres().await?).await?,
    }
    Ok(())
}
