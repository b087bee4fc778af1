//! `tokenwarden credits …`: operator access to balances, grants and history.

use clap::Subcommand;

use sqlx::PgPool;

use super::{Credits, Ledger, LedgerError, LedgerOp, OutcomeStatus, RequestId, UserId};

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

/// Why a `credits` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("amount must be a positive integer, got {0}")]
    Amount(i64),
    #[error("grant {request_id} was not applied: {status}{}", reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default())]
    GrantRefused {
        request_id: uuid::Uuid,
        status: OutcomeStatus,
        reason: Option<String>,
    },
}

/// Runs one command and prints its result on stdout.
pub async fn run(
    cmd: CreditsCommand,
    pool: &PgPool,
    cfg: &crate::config::Config,
) -> Result<(), CliError> {
    let ledger = Ledger::new(pool.clone(), cfg.ledger.clone());
    match cmd {
        CreditsCommand::Balance { user_id } => match ledger.balance(UserId(user_id)).await? {
            Some(a) => {
                println!("user              {}", a.user_id);
                println!("balance           {}", a.balance);
                println!("held              {}", a.held);
                println!("lifetime granted  {}", a.lifetime_granted);
                println!("lifetime consumed {}", a.lifetime_consumed);
                println!("updated at        {}", a.updated_at.to_rfc3339());
            }
            None => println!("user {user_id} has no credits account (balance 0)"),
        },
        CreditsCommand::Grant {
            user_id,
            amount,
            reason,
            request_id,
        } => {
            let amount = Credits::new(amount).ok_or(CliError::Amount(amount))?;
            let request_id = RequestId(request_id.unwrap_or_else(uuid::Uuid::new_v4));
            let op = LedgerOp::Grant {
                request_id,
                user_id: UserId(user_id),
                amount,
                reason,
                metadata: serde_json::json!({"source": "cli"}),
            };
            let outcome = ledger
                .apply(std::slice::from_ref(&op))
                .await?
                .into_iter()
                .next();
            match outcome {
                Some(o) if o.status == OutcomeStatus::Granted => {
                    println!(
                        "granted {} to {user_id} (request {}): balance {}, held {}",
                        amount.get(),
                        request_id.0,
                        o.balance.unwrap_or_default(),
                        o.held.unwrap_or_default()
                    );
                }
                Some(o) => {
                    return Err(CliError::GrantRefused {
                        request_id: request_id.0,
                        status: o.status,
                        reason: o.reason,
                    });
                }
                None => {
                    return Err(CliError::Ledger(LedgerError::OutcomeCount {
                        expected: 1,
                        got: 0,
                    }));
                }
            }
        }
        CreditsCommand::History { user_id, limit } => {
            let rows = ledger.history(UserId(user_id), limit).await?;
            if rows.is_empty() {
                println!("no history for user {user_id}");
            }
            println!(
                "{:<25} {:<8} {:>12} {:>14} {:>12}  {:<36}  operation",
                "time", "kind", "amount", "balance after", "held after", "request id"
            );
            for r in rows {
                println!(
                    "{:<25} {:<8} {:>12} {:>14} {:>12}  {:<36}  {}",
                    r.created_at.format("%Y-%m-%d %H:%M:%S%.3f"),
                    r.kind,
                    r.amount,
                    r.balance_after,
                    r.held_after,
                    r.request_id,
                    r.operation_type.unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}
