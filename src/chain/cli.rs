//! `tokenwarden index …`: indexer status and reconciliation against the chain.

use std::str::FromStr;

use alloy::primitives::{Address, Bytes, U256, address};
use alloy::rpc::types::BlockId;
use alloy::sol;
use alloy::sol_types::SolCall;
use clap::Subcommand;
use futures::{StreamExt, TryStreamExt};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::decode::{IERC20, IERC721, addr_hex};
use super::rpc::{Rpc, RpcError};
use crate::config::{ChainConfig, TokenStandard};

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
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("chain {0} is not configured")]
    UnknownChain(u64),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("{0} mismatch(es) between the index and the chain")]
    Mismatches(usize),
}

/// Multicall3, deployed at the same address on most chains (Story included).
pub const MULTICALL3: Address = address!("0xcA11bde05977b3631167028862bE2a173976CA11");

sol! {
    interface IMulticall3 {
        struct Call3 { address target; bool allowFailure; bytes callData; }
        struct Result3 { bool success; bytes returnData; }
        function aggregate3(Call3[] calldata calls) external payable returns (Result3[] memory returnData);
    }
}

/// Calls per Multicall3 request.
const MULTICALL_CHUNK: usize = 500;
/// Concurrent `eth_call`s when Multicall3 is not deployed.
const CALL_CONCURRENCY: usize = 16;

/// Runs one command and prints its result on stdout.
pub async fn run(
    cmd: IndexCommand,
    pool: &PgPool,
    cfg: &crate::config::Config,
) -> Result<(), CliError> {
    match cmd {
        IndexCommand::Status => status(pool, cfg).await,
        IndexCommand::Reconcile { chain_id } => {
            let mut total = 0usize;
            let mut any = false;
            for c in &cfg.chain.chains {
                if chain_id.is_some_and(|id| id != c.chain_id) {
                    continue;
                }
                any = true;
                let report = reconcile(pool, c, &cfg.chain.tokens_of(c.chain_id)).await?;
                println!(
                    "chain {} at block {}: {} checked, {} mismatch(es) (via {})",
                    c.chain_id,
                    report.block.map_or("-".to_string(), |b| b.to_string()),
                    report.checked,
                    report.mismatches.len(),
                    if report.multicall {
                        "Multicall3"
                    } else {
                        "eth_call"
                    }
                );
                for m in &report.mismatches {
                    println!("MISMATCH {m}");
                }
                total += report.mismatches.len();
            }
            if let Some(id) = chain_id
                && !any
            {
                return Err(CliError::UnknownChain(id));
            }
            if total > 0 {
                return Err(CliError::Mismatches(total));
            }
            Ok(())
        }
    }
}

async fn status(pool: &PgPool, cfg: &crate::config::Config) -> Result<(), CliError> {
    println!(
        "{:<8} {:<44} {:<7} {:<10} {:>12} {:>12} {:>8}",
        "chain", "token", "std", "symbol", "checkpoint", "head", "lag"
    );
    for c in &cfg.chain.chains {
        let cid = c.chain_id as i64;
        let cp: Option<i64> = sqlx::query_scalar(
            "SELECT block_number FROM public.chain_checkpoints WHERE chain_id = $1",
        )
        .bind(cid)
        .fetch_optional(pool)
        .await?;
        let rpc = Rpc::new(c, CancellationToken::new())?;
        let head = rpc.head().await.ok();
        for t in cfg.chain.tokens_of(c.chain_id) {
            let symbol: Option<String> = sqlx::query_scalar(
                "SELECT symbol FROM public.chain_tokens WHERE chain_id = $1 AND address = $2",
            )
            .bind(cid)
            .bind(t.address.to_ascii_lowercase())
            .fetch_optional(pool)
            .await?
            .flatten();
            let lag = match (cp, head) {
                (Some(cp), Some(h)) => (h as i64 - cp).to_string(),
                _ => "-".into(),
            };
            println!(
                "{:<8} {:<44} {:<7} {:<10} {:>12} {:>12} {:>8}",
                c.chain_id,
                t.address.to_ascii_lowercase(),
                t.standard.as_str(),
                symbol.unwrap_or_else(|| "-".into()),
                cp.map_or("-".into(), |n| n.to_string()),
                head.map_or("unreachable".into(), |n| n.to_string()),
                lag
            );
        }
        let fault: Option<String> = sqlx::query_scalar(
            "SELECT reason FROM public.chain_indexer_faults WHERE chain_id = $1",
        )
        .bind(cid)
        .fetch_optional(pool)
        .await?;
        if let Some(reason) = fault {
            println!("chain {} indexer STOPPED: {reason}", c.chain_id);
        }
    }
    Ok(())
}

/// The outcome of a reconciliation of one chain.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    /// The checkpoint block the chain was read at (`None`: nothing indexed yet).
    pub block: Option<u64>,
    pub checked: usize,
    pub multicall: bool,
    /// One line per disagreement.
    pub mismatches: Vec<String>,
}

/// Reads `balanceOf`/`ownerOf` at the checkpoint block for every stored holder / token id and
/// lists the disagreements.
pub async fn reconcile(
    pool: &PgPool,
    chain: &ChainConfig,
    tokens: &[crate::config::TokenConfig],
) -> Result<ReconcileReport, CliError> {
    let cid = chain.chain_id as i64;
    let cp: Option<i64> =
        sqlx::query_scalar("SELECT block_number FROM public.chain_checkpoints WHERE chain_id = $1")
            .bind(cid)
            .fetch_optional(pool)
            .await?;
    let Some(cp) = cp else {
        return Ok(ReconcileReport::default());
    };
    let block = BlockId::number(cp as u64);
    let rpc = Rpc::new(chain, CancellationToken::new())?;
    let multicall = !rpc.code(MULTICALL3, block).await?.is_empty();
    let mut report = ReconcileReport {
        block: Some(cp as u64),
        multicall,
        ..ReconcileReport::default()
    };
    for t in tokens {
        let token: Address = t
            .address
            .parse()
            .map_err(|e| CliError::Corrupt(format!("token {}: {e}", t.address)))?;
        let token_hex = addr_hex(&token);
        // (what, calldata, expected answer)
        let mut checks: Vec<(String, Vec<u8>, Expected)> = Vec::new();
        match t.standard {
            TokenStandard::Erc20 => {
                let rows: Vec<(String, String)> = sqlx::query_as(
                    "SELECT holder, balance::text FROM public.token_balances \
                     WHERE chain_id = $1 AND token = $2",
                )
                .bind(cid)
                .bind(&token_hex)
                .fetch_all(pool)
                .await?;
                for (holder, balance) in rows {
                    let h: Address = holder
                        .parse()
                        .map_err(|e| CliError::Corrupt(format!("holder {holder}: {e}")))?;
                    let b = U256::from_str(&balance)
                        .map_err(|e| CliError::Corrupt(format!("balance {balance}: {e}")))?;
                    checks.push((
                        format!("{token_hex} balanceOf({holder}) stored {balance}"),
                        IERC20::balanceOfCall { owner: h }.abi_encode(),
                        Expected::Amount(b),
                    ));
                }
            }
            TokenStandard::Erc721 => {
                let rows: Vec<(String, String)> = sqlx::query_as(
                    "SELECT token_id::text, owner FROM public.nft_owners \
                     WHERE chain_id = $1 AND token = $2",
                )
                .bind(cid)
                .bind(&token_hex)
                .fetch_all(pool)
                .await?;
                for (id, owner) in rows {
                    let i = U256::from_str(&id)
                        .map_err(|e| CliError::Corrupt(format!("token id {id}: {e}")))?;
                    let o: Address = owner
                        .parse()
                        .map_err(|e| CliError::Corrupt(format!("owner {owner}: {e}")))?;
                    checks.push((
                        format!("{token_hex} ownerOf({id}) stored {owner}"),
                        IERC721::ownerOfCall { tokenId: i }.abi_encode(),
                        Expected::Owner(o),
                    ));
                }
            }
        }
        report.checked += checks.len();
        let answers = if multicall {
            via_multicall(&rpc, token, block, &checks).await?
        } else {
            via_calls(&rpc, token, block, &checks).await?
        };
        for ((what, _, expected), answer) in checks.iter().zip(answers) {
            let ok = match (expected, &answer) {
                (Expected::Amount(b), Some(data)) => {
                    IERC20::balanceOfCall::abi_decode_returns(data).ok() == Some(*b)
                }
                (Expected::Owner(o), Some(data)) => {
                    IERC721::ownerOfCall::abi_decode_returns(data).ok() == Some(*o)
                }
                (_, None) => false,
            };
            if !ok {
                let got = match &answer {
                    Some(d) => match expected {
                        Expected::Amount(_) => IERC20::balanceOfCall::abi_decode_returns(d)
                            .map_or_else(|_| format!("undecodable {d}"), |v| v.to_string()),
                        Expected::Owner(_) => IERC721::ownerOfCall::abi_decode_returns(d)
                            .map_or_else(|_| format!("undecodable {d}"), |v| addr_hex(&v)),
                    },
                    None => "call reverted".into(),
                };
                report.mismatches.push(format!("{what}, chain says {got}"));
            }
        }
    }
    Ok(report)
}

enum Expected {
    Amount(U256),
    Owner(Address),
}

async fn via_multicall(
    rpc: &Rpc,
    token: Address,
    block: BlockId,
    checks: &[(String, Vec<u8>, Expected)],
) -> Result<Vec<Option<Bytes>>, CliError> {
    let mut out = Vec::with_capacity(checks.len());
    for chunk in checks.chunks(MULTICALL_CHUNK) {
        let calls = chunk
            .iter()
            .map(|(_, data, _)| IMulticall3::Call3 {
                target: token,
                allowFailure: true,
                callData: Bytes::from(data.clone()),
            })
            .collect();
        let data = IMulticall3::aggregate3Call { calls }.abi_encode();
        let raw = rpc.call(MULTICALL3, Bytes::from(data), block).await?;
        let results = IMulticall3::aggregate3Call::abi_decode_returns(&raw).map_err(|e| {
            RpcError::InvalidReply {
                method: "eth_call",
                message: format!("Multicall3 answer: {e}"),
            }
        })?;
        if results.len() != chunk.len() {
            return Err(RpcError::InvalidReply {
                method: "eth_call",
                message: format!(
                    "Multicall3 returned {} results for {}",
                    results.len(),
                    chunk.len()
                ),
            }
            .into());
        }
        out.extend(
            results
                .into_iter()
                .map(|r| r.success.then_some(r.returnData)),
        );
    }
    Ok(out)
}

async fn via_calls(
    rpc: &Rpc,
    token: Address,
    block: BlockId,
    checks: &[(String, Vec<u8>, Expected)],
) -> Result<Vec<Option<Bytes>>, CliError> {
    futures::stream::iter(checks.iter().map(|(_, data, _)| {
        let data = Bytes::from(data.clone());
        async move {
            match rpc.call(token, data, block).await {
                Ok(b) => Ok(Some(b)),
                Err(RpcError::Rejected { .. }) => Ok(None),
                Err(e) => Err(CliError::from(e)),
            }
        }
    }))
    .buffered(CALL_CONCURRENCY)
    .try_collect()
    .await
}
