//! One chain's indexer: takes the chain's lease, then backfills with concurrent, adaptive
//! `eth_getLogs` ranges and follows the head block by block (parent-hash checked), undoing
//! reorgs within `reorg_depth` and stopping loudly on deeper ones.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use alloy::eips::BlockNumberOrTag;
use alloy::primitives::{Address, B256, Bytes};
use alloy::providers::{Provider, ProviderBuilder, WsConnect};
use alloy::rpc::types::{BlockId, Filter};
use alloy::sol_types::SolCall;
use futures::StreamExt;
use sqlx::{Connection, PgConnection};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::catalogue::{self, CatalogueToken, TokenStatus, Transition};
use super::decode::{
    self, Decoded, IERC20, MultiTransferRow, RejectedLog, TOKEN_TOPICS, TransferRow,
};
use super::factory::{self, BadFactory, CreatedToken, FactoryRule};
use super::lease::Lease;
use super::netting::Changes;
use super::reorg::{self, Window};
use super::rpc::{HeaderInfo, Rpc, RpcError};
use super::source::ChainSource;
use super::store::{Batch, ChainStore, ChainStoreError, Checkpoint, Finality, TokenMeta};
use super::tokens::{self, BadTokenAddress, TrackedToken};
use crate::config::{ChainConfig, TokenConfig, TokenStandard};

/// How often the leader looks for catalogue changes (`chain_tokens`).
const CATALOGUE_POLL: Duration = Duration::from_secs(1);

/// How often the leader reads the chain's `finalized` block tag.
const FINALIZED_POLL: Duration = Duration::from_secs(5);

/// Logs one step of a token's own backfill aims for. A step runs between two head blocks on
/// the lease connection, so its fetch and its commit delay the next head block of the live
/// tokens: small steps keep that delay to tens of milliseconds, at the price of more commits
/// (and more requests) per token backfilled.
const TOKEN_STEP_LOGS: u64 = 2_000;

/// Most transfers one backfill commit takes by merging ranges that are already fetched
/// (bounds the commit's memory: about 30 MB of rows and COPY text).
const MAX_COMMIT_ROWS: usize = 50_000;

/// Everything one chain's indexer needs.
pub struct IndexerParams {
    pub chain: ChainConfig,
    pub tokens: Vec<TokenConfig>,
    pub factories: Vec<crate::config::FactoryConfig>,
    pub database_url: secrecy::SecretString,
    pub redis: redis::aio::ConnectionManager,
    pub redis_prefix: String,
    pub shutdown: CancellationToken,
}

/// Why an indexing pass stopped.
#[derive(Debug, thiserror::Error)]
pub enum IndexerError {
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error(transparent)]
    Store(#[from] ChainStoreError),
    #[error(transparent)]
    TokenAddress(#[from] BadTokenAddress),
    #[error(transparent)]
    Factory(#[from] BadFactory),
    #[error(
        "reorg deeper than reorg_depth ({depth}) detected at block {at}: no stored block hash within the window matches the chain; the index of this chain is left at its last good checkpoint and this chain's indexer is STOPPED (raise reorg_depth or rebuild the index)"
    )]
    DeepReorg { at: u64, depth: u64 },
    #[error("fetch task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("batch starts at {from} but the next block is {expected}")]
    OutOfOrder { from: u64, expected: u64 },
    #[error("stopped by a recorded fault: {0}")]
    Stopped(String),
}

/// What the chain says of the committed tip.
enum Tip {
    /// The chain has it, same hash.
    OnChain,
    /// The chain has another block there: the dropped part was undone.
    Undone,
    /// The node does not have the block (it lags): nothing can be said yet.
    Unknown,
}

impl IndexerError {
    fn is_fatal(&self) -> bool {
        matches!(
            self,
            IndexerError::DeepReorg { .. }
                | IndexerError::Store(ChainStoreError::NegativeBalance { .. })
        )
    }
}

/// Runs the chain's indexer until shutdown (or a reorg deeper than `reorg_depth`).
pub async fn run_chain(p: IndexerParams) {
    let chain_id = p.chain.chain_id;
    let label = chain_id.to_string();
    metrics::gauge!("tokenwarden_indexer_stopped", "chain_id" => label.clone()).set(0.0);
    'lease: loop {
        let Some(mut lease) = Lease::acquire(
            secrecy::ExposeSecret::expose_secret(&p.database_url),
            chain_id,
            &p.shutdown,
        )
        .await
        else {
            return;
        };
        let mut ix = match Rpc::new(&p.chain, p.shutdown.clone())
            .map_err(IndexerError::from)
            .and_then(|rpc| Indexer::new(&p, rpc))
        {
            Ok(ix) => ix,
            Err(e) => {
                tracing::error!(chain_id, error = %e, "chain indexer cannot start");
                lease.release().await;
                return;
            }
        };
        let mut schedule = Rpc::backoff();
        loop {
            match ix.run(&mut lease).await {
                Ok(()) => {
                    lease.release().await;
                    return;
                }
                Err(e) if e.is_fatal() => {
                    if matches!(e, IndexerError::DeepReorg { .. }) {
                        metrics::counter!("tokenwarden_indexer_deep_reorgs_total", "chain_id" => label.clone())
                            .increment(1);
                    } else {
                        metrics::counter!("tokenwarden_indexer_negative_balances_total", "chain_id" => label.clone())
                            .increment(1);
                    }
                    metrics::gauge!("tokenwarden_indexer_stopped", "chain_id" => label.clone())
                        .set(1.0);
                    tracing::error!(chain_id, error = %e, "CHAIN INDEXER STOPPED");
                    let at = match &e {
                        IndexerError::DeepReorg { at, .. } => *at,
                        IndexerError::Store(ChainStoreError::NegativeBalance { block, .. }) => {
                            *block
                        }
                        _ => 0,
                    };
                    // Recorded so no replica resumes from a state known to disagree with the
                    // chain; balances stay at the last good checkpoint.
                    if let Err(db) = ix
                        .store
                        .record_fault(lease.conn(), at, &e.to_string())
                        .await
                    {
                        tracing::error!(chain_id, error = %db, "cannot record the indexer fault");
                    }
                    lease.release().await;
                    return;
                }
                Err(IndexerError::Stopped(reason)) => {
                    metrics::gauge!("tokenwarden_indexer_stopped", "chain_id" => label.clone())
                        .set(1.0);
                    tracing::error!(
                        chain_id,
                        reason,
                        "chain indexer is stopped by a recorded fault (chain_indexer_faults); not indexing"
                    );
                    lease.release().await;
                    return;
                }
                Err(IndexerError::Rpc(RpcError::Cancelled)) => {
                    lease.release().await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(chain_id, error = %e, "indexing pass failed; resuming from the checkpoint");
                    let d = schedule.next().unwrap_or(Duration::from_secs(5));
                    tokio::select! {
                        _ = p.shutdown.cancelled() => { lease.release().await; return; }
                        _ = tokio::time::sleep(d.min(Duration::from_secs(5))) => {}
                    }
                    if !lease.alive().await {
                        tracing::warn!(chain_id, "lost the indexer lease connection; re-acquiring");
                        continue 'lease;
                    }
                }
            }
        }
    }
}

struct Indexer<S: ChainSource> {
    chain: ChainConfig,
    label: String,
    source: S,
    store: ChainStore,
    /// The configured tokens: they seed the catalogue at start.
    configured: Vec<TrackedToken>,
    /// The catalogue as last read, and its fingerprint.
    catalogue: Vec<CatalogueToken>,
    catalogue_version: Option<(Option<String>, i64)>,
    catalogue_checked: Instant,
    /// Set when a backfill pass ended early on a catalogue change: the next refresh reads it.
    catalogue_stale: bool,
    /// Every catalogue token (a reorg undoes the dropped blocks of all of them).
    all_addresses: Vec<Address>,
    /// The live tokens: those that move with the chain checkpoint.
    tokens: Vec<TrackedToken>,
    standards: Arc<HashMap<Address, TokenStandard>>,
    /// The configured factories' creation events, by (factory, topic0).
    factories: Arc<FactoryMap>,
    addresses: Vec<Address>,
    base_filter: Filter,
    start_block: u64,
    /// Committed changes go to the announcer task, so Redis work is off the commit path
    /// (announcements keep commit order).
    announcer: tokio::sync::mpsc::UnboundedSender<Changes>,
    _announcer_task: AbortOnDropHandle<()>,
    cancel: CancellationToken,
    /// Where the backfill's writer connections connect to.
    database_url: secrecy::SecretString,
    /// Blocks per `eth_getLogs` (adapts).
    range: Arc<AtomicU64>,
    /// Blocks per `eth_getLogs` of a token's own backfill step (adapts toward
    /// [`TOKEN_STEP_LOGS`]).
    token_range: Arc<AtomicU64>,
    /// Largest range a provider said it accepts.
    cap: Arc<AtomicU64>,
    wake: Arc<Notify>,
    ws_task: Option<AbortOnDropHandle<()>>,
    cp: Option<Checkpoint>,
    metadata_done: bool,
    /// The chain's `finalized` block as last read (`None`: not served), and when.
    chain_finalized: Option<u64>,
    finalized_checked: Option<Instant>,
}

impl<S: ChainSource> Indexer<S> {
    fn new(p: &IndexerParams, source: S) -> Result<Indexer<S>, IndexerError> {
        let configured = tokens::tracked(&p.tokens)?;
        let factories = factory::rules(&p.factories)?;
        let initial = p.chain.max_block_range.clamp(1, 100);
        let (announcer, mut queue) = tokio::sync::mpsc::unbounded_channel::<Changes>();
        let (mut redis, prefix, chain_id) =
            (p.redis.clone(), p.redis_prefix.clone(), p.chain.chain_id);
        let announcer_task = tokio::spawn(async move {
            while let Some(changes) = queue.recv().await {
                super::notify::announce(&mut redis, &prefix, chain_id, &changes).await;
            }
        });
        Ok(Indexer {
            label: p.chain.chain_id.to_string(),
            chain: p.chain.clone(),
            source,
            store: ChainStore::new(p.chain.chain_id)?,
            configured,
            catalogue: Vec::new(),
            catalogue_version: None,
            catalogue_checked: Instant::now(),
            catalogue_stale: false,
            all_addresses: Vec::new(),
            tokens: Vec::new(),
            standards: Arc::new(HashMap::new()),
            factories: Arc::new(factories),
            base_filter: Filter::new().event_signature(TOKEN_TOPICS.to_vec()),
            addresses: Vec::new(),
            start_block: 0,
            announcer,
            _announcer_task: AbortOnDropHandle::new(announcer_task),
            cancel: p.shutdown.clone(),
            database_url: p.database_url.clone(),
            range: Arc::new(AtomicU64::new(initial)),
            token_range: Arc::new(AtomicU64::new(initial)),
            cap: Arc::new(AtomicU64::new(p.chain.max_block_range)),
            wake: Arc::new(Notify::new()),
            ws_task: None,
            cp: None,
            metadata_done: false,
            chain_finalized: None,
            finalized_checked: None,
        })
    }

    fn chain_id(&self) -> u64 {
        self.chain.chain_id
    }

    fn announce(&self, changes: Changes) {
        if self.announcer.send(changes).is_err() {
            tracing::warn!(
                chain_id = self.chain_id(),
                "announcer stopped; balance changes not announced"
            );
        }
    }

    async fn run(&mut self, lease: &mut Lease) -> Result<(), IndexerError> {
        if let Some(reason) = self.store.fault(lease.conn()).await? {
            return Err(IndexerError::Stopped(reason));
        }
        if !self.metadata_done {
            let metas = self.read_metadata(&self.configured).await;
            self.store.upsert_tokens(lease.conn(), &metas).await?;
            self.metadata_done = true;
        }
        if self.ws_task.is_none()
            && let Some(ws) = self.chain.ws_url.clone()
        {
            self.ws_task = Some(AbortOnDropHandle::new(tokio::spawn(watch_heads(
                ws,
                self.chain_id(),
                self.wake.clone(),
                self.cancel.clone(),
            ))));
        }
        self.cp = self.store.checkpoint(lease.conn()).await?;
        let dropped = self
            .store
            .drop_transfers_above(lease.conn(), self.cp)
            .await?;
        if dropped > 0 {
            tracing::warn!(
                chain_id = self.chain_id(),
                dropped,
                "dropped the transfers an interrupted backfill commit left above the checkpoint"
            );
        }
        self.refresh_catalogue(lease, true).await?;
        // A reorg may have happened while no replica was running.
        if let Some(cp) = self.cp {
            self.verify_tip(lease, cp).await?;
        }
        loop {
            if self.cancel.is_cancelled() {
                return Ok(());
            }
            self.refresh_catalogue(lease, false).await?;
            let watching = !self.addresses.is_empty() || !self.factories.is_empty();
            if (self.all_addresses.is_empty() && self.factories.is_empty())
                || (self.cp.is_none() && !watching)
            {
                // Nothing tracked yet: wait for the catalogue, ask the chain nothing.
                self.wait_for_block().await;
                continue;
            }
            let next = self.cp.map_or(self.start_block, |c| c.number + 1);
            let head = self.source.head().await?;
            self.report_lag(head);
            let target = head.saturating_sub(self.chain.confirmations);
            if next > target {
                if let Some(cp) = self.cp {
                    self.verify_tip(lease, cp).await?;
                }
                if !self.token_backfill_step(lease, head).await? {
                    self.wait_for_block().await;
                }
                continue;
            }
            if target - next >= self.chain.reorg_depth {
                // The range starts right after the checkpoint, which may have been reorged
                // out while it was near the head (before the head moved this far): only a
                // checkpoint the chain still has may be built on. Once the backfill starts,
                // the checkpoint is deeper than `reorg_depth` and stays.
                if let Some(cp) = self.cp {
                    match self.verify_tip(lease, cp).await? {
                        Tip::OnChain => {}
                        Tip::Undone => continue,
                        Tip::Unknown => {
                            self.wait_for_block().await;
                            continue;
                        }
                    }
                }
                let safe = target - self.chain.reorg_depth;
                self.backfill(lease, next, safe, head).await?;
                continue;
            }
            for n in next..=target {
                if !self.step_block(lease, n, head).await? {
                    break;
                }
            }
        }
    }

    fn report_lag(&self, head: u64) {
        let done = self.cp.map_or(0, |c| c.number);
        metrics::gauge!("tokenwarden_indexer_head_lag_blocks", "chain_id" => self.label.clone())
            .set(head.saturating_sub(done) as f64);
    }

    async fn wait_for_block(&self) {
        let poll = Duration::from_millis(self.chain.poll_interval_ms);
        let wait = if self.ws_task.is_some() {
            poll * 5
        } else {
            poll
        };
        tokio::select! {
            _ = self.cancel.cancelled() => {}
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }

    /// decimals / symbol / name from the chain; `None` where the contract does not answer.
    async fn read_metadata(&self, tokens: &[TrackedToken]) -> Vec<TokenMeta> {
        let mut out = Vec::new();
        let latest = BlockId::Number(BlockNumberOrTag::Latest);
        for t in tokens {
            let address = t.address;
            let call = |data: Vec<u8>| self.source.call(address, Bytes::from(data), latest);
            let decimals = if t.standard == TokenStandard::Erc20 {
                match call(IERC20::decimalsCall {}.abi_encode()).await {
                    Ok(b) => IERC20::decimalsCall::abi_decode_returns(&b)
                        .ok()
                        .map(i32::from),
                    Err(e) => {
                        tracing::warn!(token = %decode::addr_hex(&address), error = %e, "cannot read decimals");
                        None
                    }
                }
            } else {
                None
            };
            let symbol = match call(IERC20::symbolCall {}.abi_encode()).await {
                Ok(b) => IERC20::symbolCall::abi_decode_returns(&b).ok(),
                Err(_) => None,
            };
            let name = match call(IERC20::nameCall {}.abi_encode()).await {
                Ok(b) => IERC20::nameCall::abi_decode_returns(&b).ok(),
                Err(_) => None,
            };
            out.push(TokenMeta {
                address,
                standard: t.standard,
                decimals,
                symbol: symbol.map(|s| s.chars().take(64).collect()),
                name: name.map(|s| s.chars().take(128).collect()),
                start_block: t.start_block,
            });
        }
        out
    }

    /// Checks that the committed tip is still on the chain; undoes the dropped part if not.
    /// Only a block with another hash is a reorg: a node that does not have the tip block
    /// (`null`: it lags behind, e.g. a load-balanced provider's backend) is asked again at the
    /// next poll. Taking that `null` for a reorg undid canonical blocks, and stopped the chain
    /// for good when the node lagged deeper than `reorg_depth`.
    async fn verify_tip(&mut self, lease: &mut Lease, cp: Checkpoint) -> Result<Tip, IndexerError> {
        match self.source.header(cp.number).await? {
            None => Ok(Tip::Unknown),
            Some(h) if h.hash == cp.hash => Ok(Tip::OnChain),
            Some(_) => {
                self.handle_reorg(lease, cp.number + 1).await?;
                Ok(Tip::Undone)
            }
        }
    }

    /// Finds the newest stored block still on the chain (below `detected_at`) and undoes every
    /// committed block after it.
    async fn handle_reorg(
        &mut self,
        lease: &mut Lease,
        detected_at: u64,
    ) -> Result<(), IndexerError> {
        let chain_id = self.chain_id();
        let depth = self.chain.reorg_depth;
        let Some(cp) = self.cp else { return Ok(()) };
        let remembered = self
            .store
            .recent_blocks(lease.conn(), detected_at, depth + 1)
            .await?;
        let window = Window {
            checkpoint: cp,
            depth,
            start_block: self.start_block,
        };
        let base = reorg::find_fork_base(&self.source, &remembered, &window).await?;
        let Some((fork, back_to)) = base.undo(self.start_block) else {
            return Err(IndexerError::DeepReorg {
                at: detected_at,
                depth,
            });
        };
        tracing::warn!(
            chain_id,
            fork,
            undone = (cp.number + 1).saturating_sub(fork),
            "reorg: undoing dropped blocks"
        );
        let changes = self
            .store
            .undo_from(lease.conn(), &self.all_addresses, fork, back_to, depth)
            .await?;
        metrics::counter!("tokenwarden_indexer_reorgs_total", "chain_id" => self.label.clone())
            .increment(1);
        self.cp = back_to;
        self.announce(changes);
        Ok(())
    }

    /// Indexes block `n` at the head. Returns false when the loop must re-evaluate (reorg
    /// handled, or the block is not there).
    async fn step_block(
        &mut self,
        lease: &mut Lease,
        n: u64,
        head: u64,
    ) -> Result<bool, IndexerError> {
        let Some(h) = self.source.header(n).await? else {
            return Ok(false);
        };
        if let Some(cp) = self.cp
            && cp.number + 1 == n
            && h.parent_hash != cp.hash
        {
            self.handle_reorg(lease, n).await?;
            return Ok(false);
        }
        let logs = if self.addresses.is_empty() && self.factories.is_empty() {
            // No live token (all paused or backfilling) and no factory: the chain moves on,
            // nothing to fetch.
            Vec::new()
        } else {
            let filter = self.base_filter.clone().at_block_hash(h.hash);
            self.source.block_logs(&filter).await?
        };
        let mut rows = Vec::with_capacity(logs.len());
        let mut side = Side::default();
        for log in &logs {
            if let Some(r) = self.decode_checked(log, n, n, &mut side)? {
                if r.block_hash != h.hash {
                    return Err(RpcError::InvalidReply {
                        method: "eth_getLogs",
                        message: format!(
                            "log of block {n} has hash {} not {}",
                            r.block_hash, h.hash
                        ),
                    }
                    .into());
                }
                rows.push(r);
            }
        }
        if let Some(bad) = side.off_branch(n, h.hash) {
            return Err(RpcError::InvalidReply {
                method: "eth_getLogs",
                message: format!("log of block {n} has hash {bad} not {}", h.hash),
            }
            .into());
        }
        rows.sort_by_key(|r| r.log_index);
        side.sort();
        let batch = Batch {
            from_block: n,
            rows,
            multi: side.multi,
            rejected: side.rejected,
            created: side.created,
            headers: vec![h],
            last: h,
        };
        self.commit(lease, &mut [], batch, head).await?;
        Ok(true)
    }

    fn decode_checked(
        &self,
        log: &alloy::rpc::types::Log,
        from: u64,
        to: u64,
        side: &mut Side,
    ) -> Result<Option<TransferRow>, IndexerError> {
        decode_in_range(
            log,
            &self.standards,
            &self.factories,
            from,
            to,
            &self.label,
            side,
        )
    }

    /// Commits `batch` after the checkpoint: on the lease connection alone, or with its
    /// transfer rows on `writers` (backfill only: every block of the batch is below the reorg
    /// window) once there is a checkpoint to fall back to.
    async fn commit(
        &mut self,
        lease: &mut Lease,
        writers: &mut [PgConnection],
        batch: Batch,
        head: u64,
    ) -> Result<(), IndexerError> {
        let expected = self.cp.map(|c| c.number);
        let expected_from = expected.map_or(self.start_block, |n| n + 1);
        if batch.from_block != expected_from {
            return Err(IndexerError::OutOfOrder {
                from: batch.from_block,
                expected: expected_from,
            });
        }
        let finality = self.finality().await;
        // Tokens a factory created in this batch join the catalogue in its transaction; the
        // next loop turn gives them their own backfill from their creation block.
        self.catalogue_stale |= !batch.created.is_empty();
        let changes = match expected {
            Some(cp) if !writers.is_empty() && !batch.rows.is_empty() => {
                self.store
                    .commit_backfill_batch(lease.conn(), writers, finality, cp, &batch)
                    .await?
            }
            _ => {
                self.store
                    .commit_batch(lease.conn(), finality, expected, &batch)
                    .await?
            }
        };
        self.cp = Some(Checkpoint {
            number: batch.last.number,
            hash: batch.last.hash,
        });
        metrics::counter!("tokenwarden_indexer_logs_total", "chain_id" => self.label.clone())
            .increment((batch.rows.len() + batch.multi.len()) as u64);
        self.report_lag(head);
        self.announce(changes);
        Ok(())
    }

    /// The finality of the next commit: the chain's `finalized` tag (read at most every
    /// [`FINALIZED_POLL`]; a chain that does not serve it, or a failed read, leaves only the
    /// reorg window).
    async fn finality(&mut self) -> Finality {
        if self
            .finalized_checked
            .is_none_or(|t| t.elapsed() >= FINALIZED_POLL)
        {
            self.finalized_checked = Some(Instant::now());
            self.chain_finalized = match self.source.finalized().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(chain_id = self.chain_id(), error = %e, "no finalized block tag; finality from reorg_depth");
                    None
                }
            };
        }
        Finality {
            reorg_depth: self.chain.reorg_depth,
            chain_finalized: self.chain_finalized,
        }
    }

    /// A backfill range fetch over `filter` (the live tokens, or one backfilling token).
    fn fetch_job(
        &self,
        filter: Filter,
        standards: Arc<HashMap<Address, TokenStandard>>,
    ) -> FetchJob<S> {
        FetchJob {
            source: self.source.clone(),
            filter,
            standards,
            factories: self.factories.clone(),
            range: self.range.clone(),
            cap: self.cap.clone(),
            max_range: self.chain.max_block_range,
            target_logs: self.chain.target_logs_per_request,
            max_failures: self.chain.rpc_max_retries,
            label: self.label.clone(),
        }
    }

    /// Applies the catalogue's pending requests (at most every [`CATALOGUE_POLL`], or now when
    /// `force`), then rebuilds the live token set. Runs between commits only, so the filter a
    /// batch was fetched with is the set its commit belongs to.
    async fn refresh_catalogue(
        &mut self,
        lease: &mut Lease,
        force: bool,
    ) -> Result<(), IndexerError> {
        let force = force || std::mem::take(&mut self.catalogue_stale);
        if !force && self.catalogue_checked.elapsed() < CATALOGUE_POLL {
            return Ok(());
        }
        self.catalogue_checked = Instant::now();
        let version = self.store.catalogue_version(lease.conn()).await?;
        if !force && self.catalogue_version.as_ref() == Some(&version) {
            return Ok(());
        }
        let cp = self.cp.map(|c| c.number);
        let mut rows = self.store.catalogue(lease.conn()).await?;
        let mut changed = false;
        for t in &rows {
            let step = catalogue::transition(t, cp);
            if step == Transition::None {
                continue;
            }
            if t.status == TokenStatus::Pending
                && t.symbol.is_none()
                && matches!(step, Transition::GoLive | Transition::Backfill)
            {
                let tracked = TrackedToken {
                    address: t.address,
                    standard: t.standard,
                    start_block: t.start_block,
                };
                for m in self.read_metadata(&[tracked]).await {
                    self.store
                        .set_token_metadata(
                            lease.conn(),
                            m.address,
                            m.decimals,
                            m.symbol.as_deref(),
                            m.name.as_deref(),
                        )
                        .await?;
                }
            }
            self.store
                .apply_transition(lease.conn(), t.address, step)
                .await?;
            tracing::info!(
                chain_id = self.chain_id(),
                token = %decode::addr_hex(&t.address),
                from = t.status.as_str(),
                transition = ?step,
                "token catalogue change applied"
            );
            changed = true;
        }
        if changed {
            rows = self.store.catalogue(lease.conn()).await?;
        }
        self.catalogue_version = Some(self.store.catalogue_version(lease.conn()).await?);
        self.set_catalogue(rows);
        Ok(())
    }

    /// Rebuilds the live token set (filter, decoders) from the catalogue.
    fn set_catalogue(&mut self, rows: Vec<CatalogueToken>) {
        let live: Vec<TrackedToken> = rows
            .iter()
            .filter(|t| t.status == TokenStatus::Live)
            .map(|t| TrackedToken {
                address: t.address,
                standard: t.standard,
                start_block: t.start_block,
            })
            .collect();
        self.all_addresses = rows.iter().map(|t| t.address).collect();
        self.addresses = live.iter().map(|t| t.address).collect();
        self.standards = Arc::new(live.iter().map(|t| (t.address, t.standard)).collect());
        let mut watched = self.addresses.clone();
        let mut topics = TOKEN_TOPICS.to_vec();
        for rule in self.factories.values() {
            watched.push(rule.address);
            topics.push(rule.topic0);
        }
        self.base_filter = Filter::new().address(watched).event_signature(topics);
        self.start_block = live
            .iter()
            .map(|t| t.start_block)
            .chain(self.factories.values().map(|f| f.start_block))
            .min()
            .unwrap_or(0);
        self.tokens = live;
        let per_status = |s: TokenStatus| rows.iter().filter(|t| t.status == s).count() as f64;
        for s in [
            TokenStatus::Backfilling,
            TokenStatus::Live,
            TokenStatus::Paused,
            TokenStatus::Stopped,
        ] {
            metrics::gauge!("tokenwarden_indexer_tokens", "chain_id" => self.label.clone(), "status" => s.as_str())
                .set(per_status(s));
        }
        self.catalogue = rows;
    }

    /// One step of the own backfill of the backfilling token that is furthest behind, run
    /// between head blocks: its logs from where it stands up to the chain checkpoint, by range
    /// below the reorg window and by the stored block hashes inside it (so the seam is exactly
    /// the chain's own blocks). When the step reaches the checkpoint the token goes live in
    /// the same transaction. Returns false when no token backfills.
    async fn token_backfill_step(
        &mut self,
        lease: &mut Lease,
        head: u64,
    ) -> Result<bool, IndexerError> {
        let Some(cp) = self.cp else { return Ok(false) };
        let Some(t) = self
            .catalogue
            .iter()
            .filter(|t| t.status == TokenStatus::Backfilling)
            .min_by_key(|t| t.next_block())
            .cloned()
        else {
            return Ok(false);
        };
        let from = t.next_block();
        let final_top = head.saturating_sub(self.chain.confirmations + self.chain.reorg_depth);
        let filter = Filter::new()
            .address(t.address)
            .event_signature(TOKEN_TOPICS.to_vec());
        let standards = Arc::new(HashMap::from([(t.address, t.standard)]));
        let mut seam = Vec::new();
        let batch = if from <= cp.number.min(final_top) {
            let size = self
                .token_range
                .load(Ordering::Relaxed)
                .clamp(1, self.chain.max_block_range);
            let end = from.saturating_add(size - 1).min(cp.number.min(final_top));
            let mut job = self.fetch_job(filter, standards);
            job.factories = Arc::new(FactoryMap::new());
            job.range = self.token_range.clone();
            job.target_logs = TOKEN_STEP_LOGS.min(self.chain.target_logs_per_request);
            job.fetch(from, end).await?
        } else {
            // Inside the reorg window: by the hashes the chain's own data was indexed at.
            if from <= cp.number {
                seam = self
                    .store
                    .stored_blocks(lease.conn(), from, cp.number)
                    .await?;
                let contiguous = seam.len() as u64 == cp.number - from + 1
                    && seam.iter().zip(from..).all(|(b, n)| b.number == n);
                if !contiguous {
                    return Err(ChainStoreError::TokenMoved {
                        token: decode::addr_hex(&t.address),
                    }
                    .into());
                }
            }
            let mut rows = Vec::new();
            let mut side = Side::default();
            let no_factories = FactoryMap::new();
            for b in &seam {
                let logs = self
                    .source
                    .block_logs(&filter.clone().at_block_hash(b.hash))
                    .await?;
                for log in &logs {
                    if let Some(r) = decode_in_range(
                        log,
                        &standards,
                        &no_factories,
                        b.number,
                        b.number,
                        &self.label,
                        &mut side,
                    )? {
                        if r.block_hash != b.hash {
                            return Err(RpcError::InvalidReply {
                                method: "eth_getLogs",
                                message: format!(
                                    "log of block {} has hash {} not {}",
                                    b.number, r.block_hash, b.hash
                                ),
                            }
                            .into());
                        }
                        rows.push(r);
                    }
                }
                if let Some(bad) = side.off_branch(b.number, b.hash) {
                    return Err(RpcError::InvalidReply {
                        method: "eth_getLogs",
                        message: format!("log of block {} has hash {bad} not {}", b.number, b.hash),
                    }
                    .into());
                }
            }
            rows.sort_by_key(|r| (r.block_number, r.log_index));
            side.sort();
            let last = HeaderInfo {
                number: cp.number,
                hash: cp.hash,
                parent_hash: B256::ZERO,
            };
            Batch {
                from_block: from,
                rows,
                multi: side.multi,
                rejected: side.rejected,
                created: Vec::new(),
                headers: Vec::new(),
                last,
            }
        };
        let logs = (batch.rows.len() + batch.multi.len()) as u64;
        let token = decode::addr_hex(&t.address);
        match self
            .store
            .commit_token_batch(lease.conn(), t.address, cp.number, &seam, &batch)
            .await
        {
            Ok(changes) => {
                metrics::counter!("tokenwarden_indexer_logs_total", "chain_id" => self.label.clone())
                    .increment(logs);
                self.announce(changes);
                if batch.last.number == cp.number {
                    tracing::info!(
                        chain_id = self.chain_id(),
                        token,
                        joined_at = cp.number,
                        "token backfill joined the chain"
                    );
                } else {
                    tracing::debug!(
                        chain_id = self.chain_id(),
                        token,
                        to = batch.last.number,
                        logs,
                        "token backfill step committed"
                    );
                }
            }
            Err(e @ ChainStoreError::NegativeBalance { .. }) => {
                // This token's history is incomplete (start_block after its first transfer):
                // it stops, the chain and the other tokens go on.
                tracing::error!(chain_id = self.chain_id(), token, error = %e, "TOKEN BACKFILL STOPPED");
                self.store
                    .stop_token(lease.conn(), t.address, &e.to_string())
                    .await?;
            }
            Err(
                e @ (ChainStoreError::TokenMoved { .. }
                | ChainStoreError::CheckpointMismatch { .. }),
            ) => {
                tracing::info!(chain_id = self.chain_id(), token, reason = %e, "token backfill step dropped; planning again");
            }
            Err(e) => return Err(e.into()),
        }
        self.refresh_catalogue(lease, true).await?;
        Ok(true)
    }

    /// Backfills `[from, to]` (all below the reorg window): ranges fetched concurrently,
    /// committed in order.
    async fn backfill(
        &mut self,
        lease: &mut Lease,
        from: u64,
        to: u64,
        head: u64,
    ) -> Result<(), IndexerError> {
        let started = Instant::now();
        let mut last_report = Instant::now();
        let mut logs_done = 0u64;
        let mut next = from;
        let mut inflight: VecDeque<AbortOnDropHandle<Result<Batch, IndexerError>>> =
            VecDeque::new();
        tracing::info!(chain_id = self.chain_id(), from, to, "backfill started");
        let mut writers = self.open_writers().await;
        // Fetched ranges that may wait for the next commit: far behind, the commit is the
        // bottleneck, and a commit of MAX_COMMIT_ROWS transfers pays the balance upsert (one row
        // per holder it touches, most of them when holders are many) once for all of them.
        let ahead = (MAX_COMMIT_ROWS as u64 / self.chain.target_logs_per_request.max(1))
            .clamp(1, 16) as usize;
        let mut catalogue_changed = false;
        loop {
            if !catalogue_changed && self.catalogue_checked.elapsed() >= CATALOGUE_POLL {
                // A catalogue change ends this pass after the ranges in flight (fetched with
                // the old token set) are committed; the loop then applies it.
                self.catalogue_checked = Instant::now();
                let version = self.store.catalogue_version(lease.conn()).await?;
                catalogue_changed = self.catalogue_version.as_ref() != Some(&version);
                self.catalogue_stale = catalogue_changed;
            }
            // Up to `fetch_concurrency` requests in flight, and fetched ranges waiting beside
            // them for up to one more commit (`ahead`).
            while !catalogue_changed
                && next <= to
                && inflight.len() < self.chain.fetch_concurrency + ahead
                && inflight.iter().filter(|t| !t.is_finished()).count()
                    < self.chain.fetch_concurrency
            {
                let size = self
                    .range
                    .load(Ordering::Relaxed)
                    .clamp(1, self.chain.max_block_range);
                let end = next.saturating_add(size - 1).min(to);
                let job = self.fetch_job(self.base_filter.clone(), self.standards.clone());
                inflight.push_back(AbortOnDropHandle::new(tokio::spawn(job.fetch(next, end))));
                next = end + 1;
            }
            let Some(task) = inflight.pop_front() else {
                break;
            };
            let waited = Instant::now();
            let mut batch = task.await??;
            let wait_ms = waited.elapsed().as_millis() as u64;
            // Far behind, the in-order commit is the bottleneck and the ranges after this one
            // are fetched while it runs: the ones already here join this commit, so a commit
            // carries up to `fetch_concurrency` ranges. Fewer, larger commits net more
            // transfers per holder (one balance upsert per holder per commit) and pay the
            // per-commit statements once. Near the head nothing is waiting and batches stay
            // one range each.
            while batch.rows.len() + batch.multi.len() < MAX_COMMIT_ROWS
                && inflight.front().is_some_and(|t| t.is_finished())
            {
                let Some(task) = inflight.pop_front() else {
                    break;
                };
                batch.append(task.await??)?;
            }
            logs_done += (batch.rows.len() + batch.multi.len()) as u64;
            let at = batch.last.number;
            let rows = batch.rows.len() + batch.multi.len();
            let committing = Instant::now();
            self.commit(lease, &mut writers, batch, head).await?;
            tracing::debug!(
                chain_id = self.chain_id(),
                block = at,
                rows,
                wait_ms,
                commit_ms = committing.elapsed().as_millis() as u64,
                "backfill batch committed"
            );
            if last_report.elapsed() >= Duration::from_secs(5) {
                last_report = Instant::now();
                let secs = started.elapsed().as_secs_f64().max(0.001);
                tracing::info!(
                    chain_id = self.chain_id(),
                    block = at,
                    to,
                    percent = format!(
                        "{:.1}",
                        (at - from + 1) as f64 * 100.0 / (to - from + 1) as f64
                    ),
                    logs = logs_done,
                    logs_per_sec = (logs_done as f64 / secs) as u64,
                    "backfill progress"
                );
            }
        }
        tracing::info!(
            chain_id = self.chain_id(),
            to,
            logs = logs_done,
            secs = started.elapsed().as_secs_f64(),
            "backfill reached the reorg window"
        );
        for w in writers {
            let _ = w.close().await;
        }
        Ok(())
    }

    /// The backfill's writer connections (`backfill_writers`, see
    /// [`ChainStore::commit_backfill_batch`]: far behind, one backend inserting the transfer
    /// rows was the backfill's bound while the second core idled); fewer (none) when Postgres
    /// refuses them, and the backfill then commits on the lease connection alone: slower, the
    /// same result.
    async fn open_writers(&self) -> Vec<PgConnection> {
        if self.chain.backfill_writers == 0 {
            return Vec::new();
        }
        let opts = match secrecy::ExposeSecret::expose_secret(&self.database_url)
            .parse::<sqlx::postgres::PgConnectOptions>()
        {
            Ok(o) => o.application_name(&format!(
                "tokenwarden-indexer-{}-writer-pid{}",
                self.chain_id(),
                std::process::id()
            )),
            Err(e) => {
                tracing::warn!(chain_id = self.chain_id(), error = %e, "backfill commits on one connection");
                return Vec::new();
            }
        };
        let mut writers = Vec::with_capacity(self.chain.backfill_writers);
        for _ in 0..self.chain.backfill_writers {
            match PgConnection::connect_with(&opts).await {
                Ok(c) => writers.push(c),
                Err(e) => {
                    tracing::warn!(chain_id = self.chain_id(), error = %e, "cannot open a backfill writer connection; committing on fewer");
                    break;
                }
            }
        }
        writers
    }
}

/// The configured factory events, by (factory address, topic0).
type FactoryMap = HashMap<(Address, B256), FactoryRule>;

/// What a range's logs yield besides ERC-20/721 transfers: ERC-1155 transfers, rejected logs
/// and factory creations.
#[derive(Debug, Default)]
struct Side {
    multi: Vec<MultiTransferRow>,
    rejected: Vec<RejectedLog>,
    created: Vec<CreatedToken>,
}

impl Side {
    /// The first ERC-1155 transfer or rejected log of block `number` whose block hash is not
    /// `hash` (a reply mixing two branches).
    fn off_branch(&self, number: u64, hash: B256) -> Option<B256> {
        self.multi
            .iter()
            .filter(|r| r.block_number == number)
            .map(|r| r.block_hash)
            .chain(
                self.rejected
                    .iter()
                    .filter(|r| r.block_number == number)
                    .map(|r| r.block_hash),
            )
            .find(|h| *h != hash)
    }

    /// Sorts the ERC-1155 transfers into chain order.
    fn sort(&mut self) {
        self.multi
            .sort_by_key(|r| (r.block_number, r.log_index, r.position));
    }
}

fn decode_in_range(
    log: &alloy::rpc::types::Log,
    standards: &HashMap<Address, TokenStandard>,
    factories: &FactoryMap,
    from: u64,
    to: u64,
    label: &str,
    side: &mut Side,
) -> Result<Option<TransferRow>, IndexerError> {
    if let Some(rule) = log
        .topics()
        .first()
        .and_then(|t| factories.get(&(log.address(), *t)))
    {
        match factory::decode_creation(log, rule) {
            Ok(c) if c.block < from || c.block > to => {
                return Err(RpcError::InvalidReply {
                    method: "eth_getLogs",
                    message: format!("log of block {} outside asked range {from}..={to}", c.block),
                }
                .into());
            }
            Ok(c) => side.created.push(c),
            Err(reason) => {
                tracing::warn!(chain_id = label, factory = %decode::addr_hex(&rule.address), reason, "factory creation log not understood; no token added");
            }
        }
        return Ok(None);
    }
    let rejected = &mut side.rejected;
    let outside = |block: u64| -> IndexerError {
        RpcError::InvalidReply {
            method: "eth_getLogs",
            message: format!("log of block {block} outside asked range {from}..={to}"),
        }
        .into()
    };
    match decode::decode(log, standards) {
        Ok(Some(Decoded::Transfer(r))) => {
            if r.block_number < from || r.block_number > to {
                return Err(outside(r.block_number));
            }
            Ok(Some(r))
        }
        Ok(Some(Decoded::Multi(rows))) => {
            if let Some(r) = rows
                .iter()
                .find(|r| r.block_number < from || r.block_number > to)
            {
                return Err(outside(r.block_number));
            }
            side.multi.extend(rows);
            Ok(None)
        }
        Ok(None) => Ok(None),
        Err(e) => {
            // A log that is not a well-formed Transfer of its token's standard changes no
            // balance; it is kept with its reason (`chain_rejected_logs`), not guessed at.
            metrics::counter!("tokenwarden_indexer_rejected_logs_total", "chain_id" => label.to_string())
                .increment(1);
            tracing::warn!(chain_id = label, error = %e, "log rejected");
            if let Some(r) = RejectedLog::of(log, &e) {
                if r.block_number < from || r.block_number > to {
                    return Err(RpcError::InvalidReply {
                        method: "eth_getLogs",
                        message: format!(
                            "log of block {} outside asked range {from}..={to}",
                            r.block_number
                        ),
                    }
                    .into());
                }
                rejected.push(r);
            }
            Ok(None)
        }
    }
}

/// One backfill range fetch, run as its own task.
struct FetchJob<S: ChainSource> {
    source: S,
    filter: Filter,
    standards: Arc<HashMap<Address, TokenStandard>>,
    factories: Arc<FactoryMap>,
    range: Arc<AtomicU64>,
    cap: Arc<AtomicU64>,
    max_range: u64,
    target_logs: u64,
    max_failures: u32,
    label: String,
}

impl<S: ChainSource> FetchJob<S> {
    /// Fetches every Transfer log of `[from, to]` (splitting the range as the provider asks)
    /// and the header of `to`.
    async fn fetch(self, from: u64, to: u64) -> Result<Batch, IndexerError> {
        let mut rows = Vec::new();
        let mut side = Side::default();
        let mut cur = from;
        let mut schedule = Rpc::backoff();
        let mut failures = 0u32;
        // No token to ask for (every token paused or backfilling): an address-less filter
        // would return every Transfer of the chain, so only the header is read.
        if self.standards.is_empty() && self.factories.is_empty() {
            cur = to + 1;
        }
        while cur <= to {
            let size = self.range.load(Ordering::Relaxed).clamp(1, self.max_range);
            let end = cur.saturating_add(size - 1).min(to);
            let span = end - cur + 1;
            let filter = self.filter.clone().from_block(cur).to_block(end);
            match self.source.range_logs(&filter).await {
                Ok(logs) => {
                    for log in &logs {
                        if let Some(r) = decode_in_range(
                            log,
                            &self.standards,
                            &self.factories,
                            cur,
                            end,
                            &self.label,
                            &mut side,
                        )? {
                            rows.push(r);
                        }
                    }
                    self.grow(span, logs.len() as u64);
                    cur = end + 1;
                    failures = 0;
                    schedule = Rpc::backoff();
                }
                Err(RpcError::Cancelled) => return Err(RpcError::Cancelled.into()),
                Err(e) => {
                    self.source.record_error(&e);
                    failures += 1;
                    if failures > self.max_failures.saturating_mul(2) {
                        return Err(e.into());
                    }
                    match &e {
                        RpcError::RangeLimit { suggested, .. } => {
                            let n = suggested
                                .unwrap_or(span / 2)
                                .clamp(1, span.saturating_sub(1).max(1));
                            self.range.store(n, Ordering::Relaxed);
                            if let Some(s) = suggested {
                                self.cap.fetch_min((*s).max(1), Ordering::Relaxed);
                            }
                            tracing::debug!(from = cur, to = end, next_range = n, error = %e, "getLogs range limited");
                            if span == 1 {
                                self.source.wait_after(&e, &mut schedule).await?;
                            }
                        }
                        RpcError::Retryable { .. } => {
                            self.source.wait_after(&e, &mut schedule).await?;
                        }
                        _ => {
                            // Timeouts and unknown errors: halve, then back off at one block.
                            if span > 1 {
                                self.range.store((span / 2).max(1), Ordering::Relaxed);
                            } else {
                                self.source.wait_after(&e, &mut schedule).await?;
                            }
                        }
                    }
                }
            }
        }
        rows.sort_by_key(|r| (r.block_number, r.log_index));
        let header = self
            .source
            .header(to)
            .await?
            .ok_or_else(|| RpcError::InvalidReply {
                method: "eth_getBlockByNumber",
                message: format!("block {to} below the head is missing"),
            })?;
        if let Some(bad) = rows
            .iter()
            .find(|r| r.block_number == to && r.block_hash != header.hash)
        {
            return Err(RpcError::InvalidReply {
                method: "eth_getLogs",
                message: format!(
                    "log of block {to} has hash {} but the block is {}",
                    bad.block_hash, header.hash
                ),
            }
            .into());
        }
        if let Some(bad) = side.off_branch(to, header.hash) {
            return Err(RpcError::InvalidReply {
                method: "eth_getLogs",
                message: format!(
                    "log of block {to} has hash {bad} but the block is {}",
                    header.hash
                ),
            }
            .into());
        }
        side.sort();
        Ok(Batch {
            from_block: from,
            rows,
            multi: side.multi,
            rejected: side.rejected,
            created: side.created,
            headers: vec![header],
            last: header,
        })
    }

    /// After a success: aim for `target_logs` per request, at most doubling, within the cap.
    fn grow(&self, span: u64, logs: u64) {
        let ideal = span
            .saturating_mul(self.target_logs)
            .checked_div(logs)
            .unwrap_or(span.saturating_mul(2));
        let next = ideal
            .clamp((span / 2).max(1), span.saturating_mul(2))
            .min(self.cap.load(Ordering::Relaxed))
            .min(self.max_range)
            .max(1);
        self.range.store(next, Ordering::Relaxed);
    }
}

/// Wakes the indexer on every new head announced over WebSocket; reconnects on failure.
async fn watch_heads(url: String, chain_id: u64, wake: Arc<Notify>, cancel: CancellationToken) {
    let mut schedule = Rpc::backoff();
    loop {
        let attempt = async {
            let provider = ProviderBuilder::new()
                .connect_ws(WsConnect::new(url.clone()))
                .await?;
            metrics::counter!("tokenwarden_rpc_requests_total",
                "chain_id" => chain_id.to_string(), "method" => "eth_subscribe")
            .increment(1);
            let mut stream = provider.subscribe_blocks().await?.into_stream();
            while stream.next().await.is_some() {
                wake.notify_one();
            }
            Ok::<(), alloy::transports::TransportError>(())
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = attempt => {
                if let Err(e) = r {
                    tracing::warn!(chain_id, url = %crate::redact::redact_endpoint(&url), error = %crate::redact::scrub_endpoints(&e.to_string(), std::slice::from_ref(&url)), "new-heads subscription failed; polling until it is back");
                }
            }
        }
        let d = schedule.next().unwrap_or(Duration::from_secs(10));
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(d.min(Duration::from_secs(10))) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    use alloy::primitives::{Address, U256};
    use alloy::rpc::types::Filter;

    use super::FetchJob;
    use crate::chain::decode::TRANSFER_TOPIC;
    use crate::chain::source::fake::FakeChain;
    use crate::config::TokenStandard;

    /// A provider that refuses ranges over 10 blocks: the backfill fetch splits to what it
    /// names, remembers that cap, and still returns every log of the range in chain order
    /// with the header of its last block.
    #[tokio::test]
    async fn a_range_limit_splits_the_fetch_without_losing_logs() {
        let chain = FakeChain {
            max_range: Some(10),
            ..FakeChain::with_blocks(100, 101, 0)
        };
        let token = Address::with_last_byte(0x77);
        let (a, b) = (Address::with_last_byte(1), Address::with_last_byte(2));
        chain.push_transfer(99, 0, token, (a, b, 3));
        chain.push_transfer(5, 1, token, (Address::ZERO, a, 10));
        chain.push_transfer(50, 0, token, (a, b, 4));
        let job = FetchJob {
            source: chain.clone(),
            filter: Filter::new().address(token).event_signature(TRANSFER_TOPIC),
            standards: Arc::new(HashMap::from([(token, TokenStandard::Erc20)])),
            factories: Arc::new(HashMap::new()),
            range: Arc::new(AtomicU64::new(100)),
            cap: Arc::new(AtomicU64::new(2000)),
            max_range: 2000,
            target_logs: 10_000,
            max_failures: 3,
            label: "31337".into(),
        };
        let cap = job.cap.clone();
        let batch = job.fetch(0, 100).await.unwrap();
        let blocks: Vec<u64> = batch.rows.iter().map(|r| r.block_number).collect();
        assert_eq!(blocks, vec![5, 50, 99]);
        assert_eq!(batch.rows[0].value, U256::from(10u64));
        assert_eq!(batch.from_block, 0);
        assert_eq!(batch.last.number, 100);
        assert_eq!(batch.headers, vec![batch.last]);
        assert_eq!(cap.load(std::sync::atomic::Ordering::Relaxed), 10);
        let ranges = chain.asked_ranges.lock().unwrap().clone();
        assert_eq!(ranges[0], (0, 99));
        assert!(ranges[1..].iter().all(|(f, t)| t - f < 10), "{ranges:?}");
        assert_eq!(ranges.last().map(|r| r.1), Some(100));
        assert_eq!(*chain.errors.lock().unwrap(), vec!["range_limit"]);
    }
}
