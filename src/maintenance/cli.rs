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
