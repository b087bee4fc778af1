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
