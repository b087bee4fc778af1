//! `tokenwarden dead-letters …`: inspect and replay what the queue rejected.

use clap::Subcommand;

/// `tokenwarden dead-letters` subcommands.
#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// List dead letters, newest first.
    List {
        #[arg(long)]
        job_type: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Put a dead letter back on its stream.
    Retry { id: i64 },
    /// Delete dead letters older than the given number of days.
    Purge {
        #[arg(long)]
        older_than_days: u32,
    },
}

/// Why a `queue` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("not implemented yet")]
    NotImplemented,
}

/// Runs one command and prints its result on stdout.
pub async fn run(cmd: DeadLettersCommand, cfg: &crate::config::Config) -> Result<(), CliError> {
    let _ = (cmd, cfg);
    Err(CliError::NotImplemented)
}

/// `tokenwarden enqueue <job-type> <json> [--wait <ms>]`: XADD one job; with `wait`, block up to
/// that many milliseconds for the reply and print it.
pub async fn enqueue(
    cfg: &crate::config::Config,
    job_type: &str,
    json: &str,
    wait_ms: Option<u64>,
) -> Result<(), CliError> {
    let _ = (cfg, job_type, json, wait_ms);
    Err(CliError::NotImplemented)
}
