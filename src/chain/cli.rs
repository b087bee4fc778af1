//! `tokenwarden index …`: indexer status and reconciliation against the chain.

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
use super::store::{ChainStore, ChainStoreError};
use super::tokens::{self, BadTokenAddress};
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
    #[error(transparent)]
    Store(#[from] crate::infra::StoreError),
    #[error(transparent)]
    Index(#[from] ChainStoreError),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error(transparent)]
    TokenAddress(#[from] BadTokenAddress),
    #[error("chain {0} is not configured")]
    UnknownChain(u64),
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
        let store = ChainStore::new(c.chain_id)?;
        let cp = store.checkpoint(pool).await?.map(|cp| cp.number);
        let symbols = store.token_symbols(pool).await?;
        let rpc = Rpc::new(c, CancellationToken::new())?;
        let head = rpc.head().await.ok();
        for t in tokens::tracked(&cfg.chain.tokens_of(c.chain_id))? {
            let symbol = symbols.get(&t.address).cloned().flatten();
            let lag = match (cp, head) {
                (Some(cp), Some(h)) => (h as i64 - cp as i64).to_string(),
                _ => "-".into(),
            };
            println!(
                "{:<8} {:<44} {:<7} {:<10} {:>12} {:>12} {:>8}",
                c.chain_id,
                addr_hex(&t.address),
                t.standard.as_str(),
                symbol.unwrap_or_else(|| "-".into()),
                cp.map_or("-".into(), |n| n.to_string()),
                head.map_or("unreachable".into(), |n| n.to_string()),
                lag
            );
        }
        if let Some(reason) = store.fault(pool).await? {
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
    let store = ChainStore::new(chain.chain_id)?;
    let Some(cp) = store.checkpoint(pool).await?.map(|cp| cp.number) else {
        return Ok(ReconcileReport::default());
    };
    let block = BlockId::number(cp);
    let rpc = Rpc::new(chain, CancellationToken::new())?;
    let multicall = !rpc.code(MULTICALL3, block).await?.is_empty();
    let mut report = ReconcileReport {
        block: Some(cp),
        multicall,
        ..ReconcileReport::default()
    };
    for t in tokens::tracked(tokens)? {
        let token = t.address;
        let token_hex = addr_hex(&token);
        // (what, calldata, expected answer)
        let mut checks: Vec<(String, Vec<u8>, Expected)> = Vec::new();
        match t.standard {
            TokenStandard::Erc20 => {
                for (holder, balance) in store.holder_balances(pool, token).await? {
                    checks.push((
                        format!(
                            "{token_hex} balanceOf({}) stored {balance}",
                            addr_hex(&holder)
                        ),
                        IERC20::balanceOfCall { owner: holder }.abi_encode(),
                        Expected::Amount(balance),
                    ));
                }
            }
            TokenStandard::Erc721 => {
                for (id, owner) in store.nft_owners(pool, token).await? {
                    checks.push((
                        format!("{token_hex} ownerOf({id}) stored {}", addr_hex(&owner)),
                        IERC721::ownerOfCall { tokenId: id }.abi_encode(),
                        Expected::Owner(owner),
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
