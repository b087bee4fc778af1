//! `tokenwarden anomalies …`: review and resolve usage anomalies.

use clap::Subcommand;

/// `tokenwarden anomalies` subcommands.
#[derive(Debug, Subcommand)]
pub enum AnomaliesCommand {
    /// List open anomalies (or all with --all).
    List {
        #[arg(long)]
        all: bool,
    },
    /// Mark an anomaly resolved, lifting any block it imposed.
    Resolve { id: i64 },
}

/// Why a `maintenance` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("not implemented yet")]
    NotImplemented,
}

/// Runs one command and prints its result on stdout.
pub async fn run(cmd: AnomaliesCommand, cfg: &crate::config::Config) -> Result<(), CliError> {
    let _ = (cmd, cfg);
    Err(CliError::NotImplemented)
}
