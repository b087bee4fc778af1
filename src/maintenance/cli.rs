//! `tokenwarden anomalies …`: review and resolve usage anomalies.

use clap::Subcommand;
use sqlx::PgPool;

use crate::ledger::anomalies::{self, AnomalyError};

/// `tokenwarden anomalies` subcommands.
#[derive(Debug, Subcommand)]
pub enum AnomaliesCommand {
    /// List open anomalies (or all with --all), newest first, one JSON object per line.
    List {
        #[arg(long)]
        all: bool,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Mark an anomaly resolved, lifting any block it imposed.
    Resolve { id: i64 },
}

/// Why an `anomalies` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Anomaly(#[from] AnomalyError),
    #[error("--limit must be between 1 and 10000, got {0}")]
    BadLimit(i64),
}

/// Runs one command and prints its result on stdout.
pub async fn run(cmd: AnomaliesCommand, pool: &PgPool) -> Result<(), CliError> {
    match cmd {
        AnomaliesCommand::List { all, limit } => {
            if !(1..=10_000).contains(&limit) {
                return Err(CliError::BadLimit(limit));
            }
            for row in anomalies::list(pool, all, limit).await? {
                let line = serde_json::to_string(&row).unwrap_or_else(|e| format!("{e}"));
                println!("{line}");
            }
        }
        AnomaliesCommand::Resolve { id } => {
            let row = anomalies::resolve(pool, id).await?;
            println!(
                "resolved anomaly {} ({} for user {}, severity {})",
                row.id, row.rule, row.user_id, row.severity
            );
        }
    }
    Ok(())
}
