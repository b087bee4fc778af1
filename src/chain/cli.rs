//! `tokenwarden index …`: indexer status and reconciliation against the chain.

use alloy::primitives::{Address, Bytes, U256, address};
use alloy::rpc::types::BlockId;
use alloy::sol;
use alloy::sol_types::SolCall;
use clap::Subcommand;
use futures::{StreamExt, TryStreamExt};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::catalogue::{CatalogueToken, TokenStatus};
use super::decode::{IERC20, IERC721, IERC1155, addr_hex};
use super::rpc::{Rpc, RpcError};
use super::store::{ChainStore, ChainStoreError};
use super::store_catalogue::TokenRequest;
use super::tokens::{self, BadTokenAddress};
use crate::config::{ChainConfig, TokenConfig, TokenStandard};

/// `tokenwarden index` subcommands.
#[derive(Debug, Subcommand)]
pub enum IndexCommand {
    /// Per token: state (backfilling with percent and logs/s, live, paused, stopped with its
    /// reason), checkpoint, chain head, lag.
    Status,
    /// The tracked-token catalogue: add, pause, resume, remove, list.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Compare stored balances and owners with balanceOf/ownerOf (ERC-1155: balanceOfBatch)
    /// at the checkpoint block; exits non-zero on any mismatch.
    Reconcile {
        #[arg(long)]
        chain_id: Option<u64>,
    },
}

/// `tokenwarden index token …`: changes the catalogue through `chain_token_request`; the
/// chain's leading indexer applies the change within seconds.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Track a token; on an indexed chain it gets its own backfill from `--start-block`.
    Add {
        #[arg(long)]
        chain_id: u64,
        #[arg(long)]
        address: String,
        /// erc20, erc721 or erc1155.
        #[arg(long)]
        standard: String,
        /// Its deployment block (the first block that can hold a transfer).
        #[arg(long, default_value_t = 0)]
        start_block: u64,
    },
    /// Stop indexing a token; `resume` backfills what it missed.
    Pause {
        #[arg(long)]
        chain_id: u64,
        #[arg(long)]
        address: String,
    },
    /// Index a paused token again.
    Resume {
        #[arg(long)]
        chain_id: u64,
        #[arg(long)]
        address: String,
    },
    /// Stop tracking a token and delete its rows in one transaction (`--keep-rows`: keep them).
    Remove {
        #[arg(long)]
        chain_id: u64,
        #[arg(long)]
        address: String,
        #[arg(long)]
        keep_rows: bool,
    },
    /// The catalogue: every token with its state and requested state.
    List {
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
    #[error("token address {0:?} is not a 0x-prefixed 20-byte hex address")]
    BadAddress(String),
    #[error("standard {0:?} is not erc20, erc721 or erc1155")]
    BadStandard(String),
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

/// (holder, id) pairs per ERC-1155 `balanceOfBatch` call: one call answers this many stored
/// balances, small enough for any node's `eth_call` gas cap.
const BALANCE_BATCH: usize = 200;

/// Runs one command and prints its result on stdout.
pub async fn run(
    cmd: IndexCommand,
    pool: &PgPool,
    cfg: &crate::config::Config,
) -> Result<(), CliError> {
    match cmd {
        IndexCommand::Status => status(pool, cfg).await,
        IndexCommand::Token(cmd) => token(pool, cfg, cmd).await,
        IndexCommand::Reconcile { chain_id } => {
            let mut total = 0usize;
            let mut any = false;
            for c in &cfg.chain.chains {
                if chain_id.is_some_and(|id| id != c.chain_id) {
                    continue;
                }
                any = true;
                let live = live_tokens(pool, c.chain_id).await?;
                let report = reconcile(pool, c, &live).await?;
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

/// The live catalogue tokens of a chain, as token entries (what reconciliation compares).
async fn live_tokens(pool: &PgPool, chain_id: u64) -> Result<Vec<TokenConfig>, CliError> {
    let store = ChainStore::new(chain_id)?;
    Ok(store
        .catalogue(pool)
        .await?
        .into_iter()
        .filter(|t| t.status == TokenStatus::Live)
        .map(|t| TokenConfig {
            chain_id,
            address: addr_hex(&t.address),
            standard: t.standard,
            start_block: t.start_block,
        })
        .collect())
}

/// The state column of `index status` and `index token list`.
fn state_of(t: &CatalogueToken, cp: Option<u64>) -> String {
    match t.status {
        TokenStatus::Backfilling => {
            let rate = match t.backfill_secs {
                Some(s) if s > 0.0 => (t.backfill_logs as f64 / s) as u64,
                _ => 0,
            };
            format!(
                "backfilling {:.1}% {rate} logs/s",
                cp.map_or(0.0, |cp| t.percent(cp))
            )
        }
        TokenStatus::Stopped => format!(
            "stopped: {}",
            t.reason.as_deref().unwrap_or("no reason recorded")
        ),
        s => s.as_str().to_string(),
    }
}

async fn status(pool: &PgPool, cfg: &crate::config::Config) -> Result<(), CliError> {
    println!(
        "{:<8} {:<44} {:<7} {:<10} {:>12} {:>12} {:>8}  state",
        "chain", "token", "std", "symbol", "checkpoint", "head", "lag"
    );
    for c in &cfg.chain.chains {
        let store = ChainStore::new(c.chain_id)?;
        let cp = store.checkpoint(pool).await?.map(|cp| cp.number);
        let rpc = Rpc::new(c, CancellationToken::new())?;
        let head = rpc.head().await.ok();
        for t in store.catalogue(pool).await? {
            if t.status == TokenStatus::Removed {
                continue;
            }
            let lag = match (cp, head) {
                (Some(cp), Some(h)) => (h as i64 - cp as i64).to_string(),
                _ => "-".into(),
            };
            println!(
                "{:<8} {:<44} {:<7} {:<10} {:>12} {:>12} {:>8}  {}",
                c.chain_id,
                addr_hex(&t.address),
                t.standard.as_str(),
                t.symbol.clone().unwrap_or_else(|| "-".into()),
                cp.map_or("-".into(), |n| n.to_string()),
                head.map_or("unreachable".into(), |n| n.to_string()),
                lag,
                state_of(&t, cp)
            );
        }
        if let Some(reason) = store.fault(pool).await? {
            println!("chain {} indexer STOPPED: {reason}", c.chain_id);
        }
    }
    Ok(())
}

/// `index token …`.
async fn token(
    pool: &PgPool,
    cfg: &crate::config::Config,
    cmd: TokenCommand,
) -> Result<(), CliError> {
    let (chain_id, address, request) = match cmd {
        TokenCommand::List { chain_id } => {
            println!(
                "{:<8} {:<44} {:<7} {:>12} {:<10} {:<10} state",
                "chain", "token", "std", "start", "symbol", "requested"
            );
            for c in &cfg.chain.chains {
                if chain_id.is_some_and(|id| id != c.chain_id) {
                    continue;
                }
                let store = ChainStore::new(c.chain_id)?;
                let cp = store.checkpoint(pool).await?.map(|cp| cp.number);
                for t in store.catalogue(pool).await? {
                    let requested = match t.requested {
                        super::catalogue::Requested::Live => "live",
                        super::catalogue::Requested::Paused => "paused",
                        super::catalogue::Requested::Removed if t.keep_rows => {
                            "removed (rows kept)"
                        }
                        super::catalogue::Requested::Removed => "removed",
                    };
                    println!(
                        "{:<8} {:<44} {:<7} {:>12} {:<10} {:<10} {}",
                        c.chain_id,
                        addr_hex(&t.address),
                        t.standard.as_str(),
                        t.start_block,
                        t.symbol.clone().unwrap_or_else(|| "-".into()),
                        requested,
                        state_of(&t, cp)
                    );
                }
            }
            return Ok(());
        }
        TokenCommand::Add {
            chain_id,
            address,
            standard,
            start_block,
        } => {
            let standard = match standard.to_ascii_lowercase().as_str() {
                "erc20" => TokenStandard::Erc20,
                "erc721" => TokenStandard::Erc721,
                "erc1155" => TokenStandard::Erc1155,
                _ => return Err(CliError::BadStandard(standard)),
            };
            (
                chain_id,
                address,
                TokenRequest::Add {
                    standard,
                    start_block,
                },
            )
        }
        TokenCommand::Pause { chain_id, address } => (chain_id, address, TokenRequest::Pause),
        TokenCommand::Resume { chain_id, address } => (chain_id, address, TokenRequest::Resume),
        TokenCommand::Remove {
            chain_id,
            address,
            keep_rows,
        } => (chain_id, address, TokenRequest::Remove { keep_rows }),
    };
    if !cfg.chain.chains.iter().any(|c| c.chain_id == chain_id) {
        return Err(CliError::UnknownChain(chain_id));
    }
    let token: Address = address
        .parse()
        .map_err(|_| CliError::BadAddress(address.clone()))?;
    let store = ChainStore::new(chain_id)?;
    let requested = store.request_token(pool, token, request).await?;
    println!(
        "chain {chain_id} token {}: requested {requested}; the chain's leading indexer applies it within seconds (see `tokenwarden index status`)",
        addr_hex(&token)
    );
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

/// Reads `balanceOf`/`ownerOf` (ERC-1155: `balanceOfBatch`, [`BALANCE_BATCH`] pairs a call) at
/// the checkpoint block for every stored holder / token id and lists the disagreements.
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
            TokenStandard::Erc1155 => {
                let stored = store.erc1155_balances(pool, token).await?;
                for chunk in stored.chunks(BALANCE_BATCH) {
                    let call = IERC1155::balanceOfBatchCall {
                        accounts: chunk.iter().map(|(h, _, _)| *h).collect(),
                        ids: chunk.iter().map(|(_, id, _)| *id).collect(),
                    };
                    let expected = chunk
                        .iter()
                        .map(|(h, id, b)| {
                            let what =
                                format!("{token_hex} balanceOf({}, {id}) stored {b}", addr_hex(h));
                            (what, *b)
                        })
                        .collect();
                    checks.push((
                        format!("{token_hex} balanceOfBatch of {} pairs", chunk.len()),
                        call.abi_encode(),
                        Expected::Amounts(expected),
                    ));
                }
            }
        }
        report.checked += checks
            .iter()
            .map(|(_, _, e)| match e {
                Expected::Amounts(each) => each.len(),
                _ => 1,
            })
            .sum::<usize>();
        let answers = if multicall {
            via_multicall(&rpc, token, block, &checks).await?
        } else {
            via_calls(&rpc, token, block, &checks).await?
        };
        for ((what, _, expected), answer) in checks.iter().zip(answers) {
            if let Expected::Amounts(each) = expected {
                report
                    .mismatches
                    .extend(batch_mismatches(what, each, answer.as_ref()));
                continue;
            }
            let ok = match (expected, &answer) {
                (Expected::Amount(b), Some(data)) => {
                    IERC20::balanceOfCall::abi_decode_returns(data).ok() == Some(*b)
                }
                (Expected::Owner(o), Some(data)) => {
                    IERC721::ownerOfCall::abi_decode_returns(data).ok() == Some(*o)
                }
                (Expected::Amounts(_), Some(_)) | (_, None) => false,
            };
            if !ok {
                let got = match &answer {
                    Some(d) => match expected {
                        Expected::Amount(_) => IERC20::balanceOfCall::abi_decode_returns(d)
                            .map_or_else(|_| format!("undecodable {d}"), |v| v.to_string()),
                        Expected::Owner(_) => IERC721::ownerOfCall::abi_decode_returns(d)
                            .map_or_else(|_| format!("undecodable {d}"), |v| addr_hex(&v)),
                        Expected::Amounts(_) => format!("{d}"),
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
    /// One `balanceOfBatch` call: (what, stored balance) per pair, in call order.
    Amounts(Vec<(String, U256)>),
}

/// The disagreements of one `balanceOfBatch` answer (`None`: the call reverted) with the
/// stored balances `each`, one line per pair.
fn batch_mismatches(what: &str, each: &[(String, U256)], answer: Option<&Bytes>) -> Vec<String> {
    let got = answer.map(|d| IERC1155::balanceOfBatchCall::abi_decode_returns(d));
    match got {
        Some(Ok(values)) if values.len() == each.len() => each
            .iter()
            .zip(values)
            .filter(|((_, stored), chain)| stored != chain)
            .map(|((w, _), chain)| format!("{w}, chain says {chain}"))
            .collect(),
        Some(Ok(values)) => vec![format!(
            "{what}: chain answered {} balances for {} pairs",
            values.len(),
            each.len()
        )],
        Some(Err(e)) => vec![format!("{what}: undecodable answer ({e})")],
        None => vec![format!("{what}: call reverted")],
    }
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
