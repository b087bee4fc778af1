//! `tokenwarden index …`: indexer status and reconciliation against the chain.

use clap::Subcommand;

/// `tokenwarden index` subcommands.
#[derive(Debug, Subcommand)]
pub enum IndexCommand {
    /// Per token: checkpoint, chain head, lag.
    Status,
    /// Compare stored balances and owners with balanceOf/ownerOf at the checkpoint block;
    /// exits non-zero on any mismatch.
    Reconcile {
        #[arg(long)]
        chain_id: Option<u64>,
    },
}

/// Why a `chain` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("not implemented yet")]
    NotImplemented,
}

/// Runs one command and prints its result on stdout.
pub async fn run(cmd: IndexCommand, cfg: &crate::config::Config) -> Result<(), CliError> {
    let _ = (cmd, cfg);
    Err(CliError::NotImplemented)
}
