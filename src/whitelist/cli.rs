//! `tokenwarden whitelist open|close|list|export`: the creators' door for operators.

use std::io::Write;

use chrono::{DateTime, Utc};
use clap::{Subcommand, ValueEnum};
use uuid::Uuid;

use super::export::{self, ExportError};
use super::store::{OpenRequest, WhitelistError, WhitelistStore};

/// `tokenwarden whitelist` subcommands.
#[derive(Debug, Subcommand)]
pub enum WhitelistCommand {
    /// Open a list: users ask for places while it is open, within [opens-at, closes-at).
    /// Prints its id. RULE is an access rule `{condition, per_wallet?, stale_policy?}`
    /// (docs/access.md), refused with the JSON path of the bad node when invalid.
    Open {
        #[arg(long)]
        creator: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        rule: String,
        /// RFC 3339; default now.
        #[arg(long)]
        opens_at: Option<DateTime<Utc>>,
        /// RFC 3339.
        #[arg(long)]
        closes_at: DateTime<Utc>,
        /// Places; no limit when absent.
        #[arg(long)]
        capacity: Option<u32>,
        #[arg(long, default_value = "cli")]
        actor: String,
    },
    /// Close a list: its entries are frozen.
    Close {
        id: Uuid,
        #[arg(long, default_value = "cli")]
        actor: String,
    },
    /// Lists (of one creator with --creator), as JSON.
    List {
        #[arg(long)]
        creator: Option<String>,
    },
    /// A list's granted places: csv (any time), or for a closed list `tree` (the
    /// StandardMerkleTree.dump() JSON) or `allowlist` (root and a proof per address).
    Export {
        id: Uuid,
        #[arg(long, value_enum, default_value = "csv")]
        format: ExportFormat,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    Csv,
    Tree,
    Allowlist,
}

/// Why a `whitelist` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Store(#[from] WhitelistError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

fn json(v: &impl serde::Serialize) -> Result<String, CliError> {
    serde_json::to_string_pretty(v)
        .map(|s| s + "\n")
        .map_err(|e| CliError::Invalid(format!("cannot encode the output: {e}")))
}

/// Runs one command and prints its result on stdout.
pub async fn run(cmd: WhitelistCommand, pool: &sqlx::PgPool) -> Result<(), CliError> {
    let store = WhitelistStore::new(pool.clone());
    let out = match cmd {
        WhitelistCommand::Open {
            creator,
            name,
            rule,
            opens_at,
            closes_at,
            capacity,
            actor,
        } => {
            let rule: serde_json::Value = serde_json::from_str(&rule)
                .map_err(|e| CliError::Invalid(format!("--rule is not JSON: {e}")))?;
            let id = store
                .open(&OpenRequest {
                    creator_id: creator,
                    name,
                    rule,
                    opens_at: opens_at.unwrap_or_else(Utc::now),
                    closes_at,
                    capacity,
                    actor,
                })
                .await?;
            format!("{id}\n")
        }
        WhitelistCommand::Close { id, actor } => {
            if store.close(id, &actor).await? {
                format!("whitelist {id} closed\n")
            } else {
                format!("whitelist {id} was already closed\n")
            }
        }
        WhitelistCommand::List { creator } => json(&store.list(creator.as_deref()).await?)?,
        WhitelistCommand::Export { id, format } => {
            let list = store.get(id).await?;
            let places = store.places(id).await?;
            match format {
                ExportFormat::Csv => export::csv(&places),
                ExportFormat::Tree => json(&export::dump(&list, &places)?)?,
                ExportFormat::Allowlist => json(&export::allowlist(&list, &places)?)?,
            }
        }
    };
    std::io::stdout().lock().write_all(out.as_bytes())?;
    Ok(())
}
