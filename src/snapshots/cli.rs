//! `tokenwarden snapshot …`: create, inspect, check and compare holder snapshots.

use clap::Subcommand;

use sqlx::PgPool;

use super::goldrush::GoldRushError;
use super::service::{
    InvalidRequest, SnapshotError, SnapshotRequest, SnapshotService, SnapshotSource,
};
use super::store::{self, CheckError, SnapshotStatus};

/// `tokenwarden snapshot` subcommands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot now, in this process (source `goldrush` or `index`), and print its outcome.
    Create {
        /// `goldrush` (the GoldRush API; key in the env var named by
        /// snapshots.goldrush_api_key_env) or `index` (the own Transfer index).
        #[arg(long)]
        source: String,
        /// GoldRush chain name (eth-mainnet) or numeric chain id; index snapshots need the id.
        #[arg(long)]
        chain: String,
        #[arg(long)]
        token: String,
        /// Block to snapshot at (default: GoldRush's latest / the index's finalized block).
        #[arg(long)]
        block_height: Option<u64>,
    },
    /// Show a snapshot's summary and its largest holders.
    Show {
        id: uuid::Uuid,
        /// How many of the largest holders to list.
        #[arg(long, default_value_t = 10)]
        top: i64,
    },
    /// Does `wallet` hold at least `min_amount` whole tokens in the snapshot? Prints true/false;
    /// an unknown or incomplete snapshot is an error.
    Check {
        id: uuid::Uuid,
        wallet: String,
        /// Whole tokens, e.g. "100" or "1.5", converted with the token's own decimals.
        min_amount: String,
    },
    /// Holders that joined, left or changed between two snapshots.
    Diff { from: uuid::Uuid, to: uuid::Uuid },
}

/// Why a `snapshots` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error(transparent)]
    Request(#[from] InvalidRequest),
    #[error("--source must be goldrush or index, got {0:?}")]
    UnknownSource(String),
    #[error(transparent)]
    GoldRush(#[from] GoldRushError),
    #[error("snapshot {0} does not exist")]
    NotFound(uuid::Uuid),
    #[error("snapshot {id} failed: {reason}")]
    Failed { id: uuid::Uuid, reason: String },
    #[error("snapshot {id} is {status}, not complete: a diff needs two complete snapshots")]
    NotComplete {
        id: uuid::Uuid,
        status: &'static str,
    },
}

/// Runs one command and prints its result on stdout.
pub async fn run(
    cmd: SnapshotCommand,
    pool: &PgPool,
    cfg: &crate::config::Config,
) -> Result<(), CliError> {
    match cmd {
        SnapshotCommand::Create {
            source,
            chain,
            token,
            block_height,
        } => {
            let source = match source.as_str() {
                "goldrush" => SnapshotSource::GoldRush,
                "index" => SnapshotSource::Index,
                other => return Err(CliError::UnknownSource(other.to_string())),
            };
            let req = SnapshotRequest::new(None, source, &chain, &token, block_height)?;
            let service = SnapshotService::from_config(pool.clone(), &cfg.snapshots)?;
            let outcome = service.create(&req).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&outcome).unwrap_or_default()
            );
            if outcome.status == SnapshotStatus::Failed {
                return Err(CliError::Failed {
                    id: outcome.snapshot_id,
                    reason: outcome.error.unwrap_or_default(),
                });
            }
        }
        SnapshotCommand::Show { id, top } => {
            let row = store::get(pool, id).await?.ok_or(CliError::NotFound(id))?;
            println!("snapshot      {}", row.id);
            println!("source        {}", row.source);
            println!("chain         {}", row.chain);
            println!("token         {}", row.token);
            println!("status        {}", row.status.as_str());
            if let Some(e) = &row.error {
                println!("error         {e}");
            }
            println!("block_height  {}", opt(row.block_height));
            println!("decimals      {}", opt(row.decimals));
            println!("holders       {}", opt(row.holder_count));
            println!("total_supply  {}", opt(row.total_supply.as_ref()));
            println!("created_at    {}", row.created_at.to_rfc3339());
            println!(
                "completed_at  {}",
                opt(row.completed_at.map(|t| t.to_rfc3339()))
            );
            if row.status == SnapshotStatus::Complete && top > 0 {
                println!("top holders:");
                for (holder, balance) in store::top_holders(pool, id, top).await? {
                    println!("  {holder}  {balance}");
                }
            }
        }
        SnapshotCommand::Check {
            id,
            wallet,
            min_amount,
        } => {
            let ok = store::verify(pool, id, &wallet, &min_amount).await?;
            println!("{ok}");
        }
        SnapshotCommand::Diff { from, to } => {
            for id in [from, to] {
                let row = store::get(pool, id).await?.ok_or(CliError::NotFound(id))?;
                if row.status != SnapshotStatus::Complete {
                    return Err(CliError::NotComplete {
                        id,
                        status: row.status.as_str(),
                    });
                }
            }
            let rows = store::diff(pool, from, to).await?;
            let (mut joined, mut left, mut changed) = (0, 0, 0);
            for r in &rows {
                match r.change.as_str() {
                    "joined" => joined += 1,
                    "left" => left += 1,
                    _ => changed += 1,
                }
                println!(
                    "{:<8} {}  {} -> {}",
                    r.change,
                    r.holder,
                    r.from_balance.as_deref().unwrap_or("0"),
                    r.to_balance.as_deref().unwrap_or("0")
                );
            }
            println!("joined {joined}, left {left}, changed {changed}");
        }
    }
    Ok(())
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".to_string())
}
