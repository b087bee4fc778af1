//! `tokenwarden snapshot …`: create, inspect, check and compare holder snapshots.

use clap::Subcommand;

/// `tokenwarden snapshot` subcommands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot now (source `goldrush` or `index`).
    Create {
        #[arg(long)]
        source: String,
        #[arg(long)]
        chain: String,
        #[arg(long)]
        token: String,
        #[arg(long)]
        block_height: Option<u64>,
    },
    /// Show a snapshot's summary.
    Show { id: uuid::Uuid },
    /// Does `wallet` hold at least `min_amount` whole tokens in the snapshot?
    Check {
        id: uuid::Uuid,
        wallet: String,
        min_amount: String,
    },
    /// Holders that joined, left or changed between two snapshots.
    Diff { from: uuid::Uuid, to: uuid::Uuid },
}

/// Why a `snapshots` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("not implemented yet")]
    NotImplemented,
}

/// Runs one command and prints its result on stdout.
pub async fn run(cmd: SnapshotCommand, cfg: &crate::config::Config) -> Result<(), CliError> {
    let _ = (cmd, cfg);
    Err(CliError::NotImplemented)
}
