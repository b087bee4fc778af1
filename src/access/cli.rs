//! `tokenwarden access …`: rules (set, delete, list, history), checks, and a user's wallets.

use alloy::primitives::Address;
use clap::Subcommand;
use uuid::Uuid;

use super::checks::{AccessChecker, CheckError, Question};
use super::rules::{RuleError, RuleStore};
use super::wallets::{WalletStore, WalletStoreError};

/// `tokenwarden access` subcommands.
#[derive(Debug, Subcommand)]
pub enum AccessCommand {
    /// Access rules per creator and feature.
    #[command(subcommand)]
    Rule(RuleCommand),
    /// Decide now whether USER may use FEATURE of CREATOR (or, with --chain and --token, of a
    /// token: the seed's form). Prints the decision as JSON; exits 0 either way.
    Check {
        user: Uuid,
        /// The creator; omit with --chain/--token.
        #[arg(long)]
        creator: Option<String>,
        #[arg(long)]
        feature: String,
        #[arg(long)]
        chain: Option<u64>,
        #[arg(long)]
        token: Option<String>,
    },
    /// The wallets USER has proven.
    Wallets { user: Uuid },
}

/// `tokenwarden access rule` subcommands.
#[derive(Debug, Subcommand)]
pub enum RuleCommand {
    /// Set or replace a rule: RULE is JSON `{condition, per_wallet?, stale_policy?}`
    /// (docs/access.md). Refused with the JSON path of the bad node when invalid.
    Set {
        creator: String,
        feature: String,
        rule: String,
        /// Who makes the change (recorded in access_rule_changes).
        #[arg(long, default_value = "cli")]
        actor: String,
    },
    /// Delete a rule.
    Delete {
        creator: String,
        feature: String,
        #[arg(long, default_value = "cli")]
        actor: String,
    },
    /// List rules (of one creator with --creator).
    List {
        #[arg(long)]
        creator: Option<String>,
    },
    /// Every change of one rule: who, when, old, new.
    History { creator: String, feature: String },
}

/// Why an `access` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error(transparent)]
    Audit(#[from] super::audit::AuditError),
    #[error(transparent)]
    Wallets(#[from] WalletStoreError),
    #[error("{0}")]
    Invalid(String),
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Runs one command and prints its result on stdout.
pub async fn run(cmd: AccessCommand, pool: &sqlx::PgPool) -> Result<(), CliError> {
    let pool = pool.clone();
    match cmd {
        AccessCommand::Rule(RuleCommand::Set {
            creator,
            feature,
            rule,
            actor,
        }) => {
            let rule: serde_json::Value = serde_json::from_str(&rule)
                .map_err(|e| CliError::Invalid(format!("RULE is not JSON: {e}")))?;
            let version = RuleStore::new(pool)
                .set(&creator, &feature, &rule, &actor)
                .await?;
            println!("rule {creator}/{feature} set: version {version}");
        }
        AccessCommand::Rule(RuleCommand::Delete {
            creator,
            feature,
            actor,
        }) => {
            if RuleStore::new(pool)
                .delete(&creator, &feature, &actor)
                .await?
            {
                println!("rule {creator}/{feature} deleted");
            } else {
                return Err(CliError::Invalid(format!("no rule {creator}/{feature}")));
            }
        }
        AccessCommand::Rule(RuleCommand::List { creator }) => {
            print_json(&RuleStore::new(pool).list(creator.as_deref()).await?);
        }
        AccessCommand::Rule(RuleCommand::History { creator, feature }) => {
            print_json(&RuleStore::new(pool).history(&creator, &feature).await?);
        }
        AccessCommand::Check {
            user,
            creator,
            feature,
            chain,
            token,
        } => {
            let question = match (creator, chain, token) {
                (Some(creator_id), None, None) => Question::Creator {
                    creator_id,
                    feature,
                },
                (None, Some(chain_id), Some(token)) => Question::Token {
                    chain_id,
                    token: token.parse::<Address>().map_err(|e| {
                        CliError::Invalid(format!("--token {token:?} is not an address: {e}"))
                    })?,
                    feature,
                },
                _ => {
                    return Err(CliError::Invalid(
                        "give either --creator, or --chain and --token".into(),
                    ));
                }
            };
            let decision = AccessChecker::new(pool.clone())
                .evaluate(user, &question)
                .await?;
            super::audit::insert(
                &pool,
                &[super::audit::AuditEntry::new(
                    &decision,
                    super::audit::Door::Cli,
                    None,
                    &super::audit::Caller::default(),
                )],
            )
            .await?;
            print_json(&decision);
        }
        AccessCommand::Wallets { user } => {
            let links = WalletStore::new(pool).links(user).await?;
            for l in links {
                println!(
                    "{}  {:<7}  chains {:?}  verified {}",
                    l.address,
                    l.method,
                    l.chains,
                    l.verified_at.to_rfc3339()
                );
            }
        }
    }
    Ok(())
}
