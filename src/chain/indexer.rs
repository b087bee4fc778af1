//! One chain's indexer: takes the chain's lease, then backfills with concurrent, adaptive
//! `eth_getLogs` ranges and follows the head block by block (parent-hash checked), undoing
//! reorgs within `reorg_depth` and stopping loudly on deeper ones.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use alloy::eips::BlockNumberOrTag;
use alloy::primitives::{Address, Bytes};
use alloy::providers::{Provider, ProviderBuilder, WsConnect};
use alloy::rpc::types::{BlockId, Filter};
use alloy::sol_types::SolCall;
use futures::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::decode::{self, IERC20, RejectedLog, TRANSFER_TOPIC, TransferRow};
use super::lease::Lease;
use super::netting::Changes;
use super::reorg::{self, Window};
use super::rpc::{Rpc, RpcError};
use super::source::ChainSource;
use super::store::{Batch, ChainStore, ChainStoreError, Checkpoint, TokenMeta};
use super::tokens::{self, BadTokenAddress, TrackedToken};
use crate::config::{ChainConfig, TokenConfig, TokenStandard};

/// Everything one chain's indexer needs.
pub struct IndexerParams {
    pub chain: ChainConfig,
    pub tokens: Vec<TokenConfig>,
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
    tokens: Vec<TrackedToken>,
    standards: Arc<HashMap<Address, TokenStandard>>,
    addresses: Vec<Address>,
    base_filter: Filter,
    start_block: u64,
    /// Committed changes go to the announcer task, so Redis work is off the commit path
    /// (announcements keep commit order).
    announcer: tokio::sync::mpsc::UnboundedSender<Changes>,
    _announcer_task: AbortOnDropHandle<()>,
    cancel: CancellationToken,
    /// Blocks per `eth_getLogs` (adapts).
    range: Arc<AtomicU64>,
    /// Largest range a provider said it accepts.
    cap: Arc<AtomicU64>,
    wake: Arc<Notify>,
    ws_task: Option<AbortOnDropHandle<()>>,
    cp: Option<Checkpoint>,
    metadata_done: bool,
}

impl<S: ChainSource> Indexer<S> {
    fn new(p: &IndexerParams, source: S) -> Result<Indexer<S>, IndexerError> {
        let tokens = tokens::tracked(&p.tokens)?;
        let standards = tokens.iter().map(|t| (t.address, t.standard)).collect();
        let addresses: Vec<Address> = tokens.iter().map(|t| t.address).collect();
        let start_block = tokens.iter().map(|t| t.start_block).min().unwrap_or(0);
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
            tokens,
            standards: Arc::new(standards),
            base_filter: Filter::new()
                .address(addresses.clone())
                .event_signature(TRANSFER_TOPIC),
            addresses,
            start_block,
            announcer,
            _announcer_task: AbortOnDropHandle::new(announcer_task),
            cancel: p.shutdown.clone(),
            range: Arc::new(AtomicU64::new(initial)),
            cap: Arc::new(AtomicU64::new(p.chain.max_block_range)),
            wake: Arc::new(Notify::new()),
            ws_task: None,
            cp: None,
            metadata_done: false,
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
            let metas = self.read_metadata().await;
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
        // A reorg may have happened while no replica was running.
        if let Some(cp) = self.cp {
            self.verify_tip(lease, cp).await?;
        }
        loop {
            if self.cancel.is_cancelled() {
                return Ok(());
            }
            let next = self.cp.map_or(self.start_block, |c| c.number + 1);
            let head = self.source.head().await?;
            self.report_lag(head);
            let target = head.saturating_sub(self.chain.confirmations);
            if next > target {
                if let Some(cp) = self.cp {
                    self.verify_tip(lease, cp).await?;
                }
                self.wait_for_block().await;
                continue;
            }
            if target - next >= self.chain.reorg_depth {
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
    async fn read_metadata(&self) -> Vec<TokenMeta> {
        let mut out = Vec::new();
        let latest = BlockId::Number(BlockNumberOrTag::Latest);
        for t in &self.tokens {
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
    async fn verify_tip(&mut self, lease: &mut Lease, cp: Checkpoint) -> Result<(), IndexerError> {
        let on_chain = self.source.header(cp.number).await?;
        if on_chain.map(|h| h.hash) != Some(cp.hash) {
            self.handle_reorg(lease, cp.number + 1).await?;
        }
        Ok(())
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
            .undo_from(lease.conn(), &self.addresses, fork, back_to, depth)
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
        let filter = self.base_filter.clone().at_block_hash(h.hash);
        let logs = self.source.block_logs(&filter).await?;
        let mut rows = Vec::with_capacity(logs.len());
        let mut rejected = Vec::new();
        for log in &logs {
            if let Some(r) = self.decode_checked(log, n, n, &mut rejected)? {
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
        if let Some(r) = rejected.iter().find(|r| r.block_hash != h.hash) {
            return Err(RpcError::InvalidReply {
                method: "eth_getLogs",
                message: format!("log of block {n} has hash {} not {}", r.block_hash, h.hash),
            }
            .into());
        }
        rows.sort_by_key(|r| r.log_index);
        let batch = Batch {
            from_block: n,
            rows,
            rejected,
            headers: vec![h],
            last: h,
        };
        self.commit(lease, batch, head).await?;
        Ok(true)
    }

    fn decode_checked(
        &self,
        log: &alloy::rpc::types::Log,
        from: u64,
        to: u64,
        rejected: &mut Vec<RejectedLog>,
    ) -> Result<Option<TransferRow>, IndexerError> {
        decode_in_range(log, &self.standards, from, to, &self.label, rejected)
    }

    async fn commit(
        &mut self,
        lease: &mut Lease,
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
        let changes = self
            .store
            .commit_batch(lease.conn(), self.chain.reorg_depth, expected, &batch)
            .await?;
        self.cp = Some(Checkpoint {
            number: batch.last.number,
            hash: batch.last.hash,
        });
        metrics::counter!("tokenwarden_indexer_logs_total", "chain_id" => self.label.clone())
            .increment(batch.rows.len() as u64);
        self.report_lag(head);
        self.announce(changes);
        Ok(())
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
        loop {
            while inflight.len() < self.chain.fetch_concurrency && next <= to {
                let size = self
                    .range
                    .load(Ordering::Relaxed)
                    .clamp(1, self.chain.max_block_range);
                let end = next.saturating_add(size - 1).min(to);
                let job = FetchJob {
                    source: self.source.clone(),
                    filter: self.base_filter.clone(),
                    standards: self.standards.clone(),
                    range: self.range.clone(),
                    cap: self.cap.clone(),
                    max_range: self.chain.max_block_range,
                    target_logs: self.chain.target_logs_per_request,
                    max_failures: self.chain.rpc_max_retries,
                    label: self.label.clone(),
                };
                inflight.push_back(AbortOnDropHandle::new(tokio::spawn(job.fetch(next, end))));
                next = end + 1;
            }
            let Some(task) = inflight.pop_front() else {
                break;
            };
            let waited = Instant::now();
            let batch = task.await??;
            let wait_ms = waited.elapsed().as_millis() as u64;
            logs_done += batch.rows.len() as u64;
            let at = batch.last.number;
            let rows = batch.rows.len();
            let committing = Instant::now();
            self.commit(lease, batch, head).await?;
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
        Ok(())
    }
}

fn decode_in_range(
    log: &alloy::rpc::types::Log,
    standards: &HashMap<Address, TokenStandard>,
    from: u64,
    to: u64,
    label: &str,
    rejected: &mut Vec<RejectedLog>,
) -> Result<Option<TransferRow>, IndexerError> {
    match decode::decode(log, standards) {
        Ok(Some(r)) => {
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
            Ok(Some(r))
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
        let mut rejected = Vec::new();
        let mut cur = from;
        let mut schedule = Rpc::backoff();
        let mut failures = 0u32;
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
                            cur,
                            end,
                            &self.label,
                            &mut rejected,
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
        Ok(Batch {
            from_block: from,
            rows,
            rejected,
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
