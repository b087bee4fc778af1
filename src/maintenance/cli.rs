//! `tokenwarden anomalies …`: review and resolve usage anomalies.

use clap::Subcommand;

use super::anomalies::AnomalyRow;

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

/// Why a `maintenance` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Store(#[from] crate::infra::StoreError),
    #[error("database error while {action}: {source}")]
    Database {
        action: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("anomaly {0} does not exist")]
    NotFound(i64),
    #[error("anomaly {id} was already resolved at {at}")]
    AlreadyResolved {
        id: i64,
        at: chrono::DateTime<chrono::Utc>,
    },
    #[error("--limit must be between 1 and 10000, got {0}")]
    BadLimit(i64),
}

/// Runs one command and prints its result on stdout.
pub async fn run(cmd: AnomaliesCommand, cfg: &crate::config::Config) -> Result<(), CliError> {
    let pool = crate::infra::connect_postgres(&cfg.database).await?;
    match cmd {
        AnomaliesCommand::List { all, limit } => {
            if !(1..=10_000).contains(&limit) {
                return Err(CliError::BadLimit(limit));
            }
            for row in list(&pool, all, limit).await? {
                let line = serde_json::to_string(&row).unwrap_or_else(|e| format!("{e}"));
                println!("{line}");
            }
        }
        AnomaliesCommand::Resolve { id } => {
            let row = resolve(&pool, id).await?;
            println!(
                "resolved anomaly {} ({} for user {}, severity {})",
                row.id, row.rule, row.user_id, row.severity
            );
        }
    }
    Ok(())
}

/// Open anomalies (or all), newest first.
pub async fn list(pool: &sqlx::PgPool, all: bool, limit: i64) -> Result<Vec<AnomalyRow>, CliError> {
    sqlx::query_as(
        "SELECT id, user_id, rule, severity, window_start, window_end, details, detected_at, \
                resolved_at \
           FROM public.token_anomalies \
          WHERE $1 OR resolved_at IS NULL \
          ORDER BY detected_at DESC, id DESC LIMIT $2",
    )
    .bind(all)
    .bind(limit)
    .fetch_all(pool)
    .await
    .map_err(|source| CliError::Database {
        action: "listing anomalies",
        source,
    })
}

/// Sets `resolved_at` on an open anomaly.
pub async fn resolve(pool: &sqlx::PgPool, id: i64) -> Result<AnomalyRow, CliError> {
    let db = |source| CliError::Database {
        action: "resolving an anomaly",
        source,
    };
    let updated: Option<AnomalyRow> = sqlx::query_as(
        "UPDATE public.token_anomalies SET resolved_at = now() \
          WHERE id = $1 AND resolved_at IS NULL \
          RETURNING id, user_id, rule, severity, window_start, window_end, details, \
                    detected_at, resolved_at",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(db)?;
    if let Some(row) = updated {
        return Ok(row);
    }
    let existing: Option<Option<chrono::DateTime<chrono::Utc>>> =
        sqlx::query_scalar("SELECT resolved_at FROM public.token_anomalies WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await
            .map_err(db)?;
    match existing {
        None => Err(CliError::NotFound(id)),
        Some(Some(at)) => Err(CliError::AlreadyResolved { id, at }),
        // Resolved concurrently between the two statements.
        Some(None) => Err(CliError::NotFound(id)),
    }
}
