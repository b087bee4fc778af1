//! `tokenwarden credits …`: operator access to balances, grants and history.

use clap::Subcommand;

/// `tokenwarden credits` subcommands.
#[derive(Debug, Subcommand)]
pub enum CreditsCommand {
    /// Show a user's balance, held tokens and lifetime totals.
    Balance { user_id: uuid::Uuid },
    /// Grant credits to a user (idempotent with --request-id).
    Grant {
        user_id: uuid::Uuid,
        amount: i64,
        #[arg(long, default_value = "manual grant")]
        reason: String,
        #[arg(long)]
        request_id: Option<uuid::Uuid>,
    },
    /// Show a user's recent balance history, newest first.
    History {
        user_id: uuid::Uuid,
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
}

/// Why a `ledger` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("not implemented yet")]
    NotImplemented,
}

/// Runs one command and prints its result on stdout.
pub async fn run(cmd: CreditsCommand, cfg: &crate::config::Config) -> Result<(), CliError> {
    let _ = (cmd, cfg);
    Err(CliError::NotImplemented)
}
