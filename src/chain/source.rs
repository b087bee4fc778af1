//! What the indexer asks of a chain, as a trait: [`super::rpc::Rpc`] is the real source, and
//! tests put a scripted chain behind it to drive the fork search and the adaptive backfill
//! without a node.

use std::time::Duration;

use alloy::primitives::{Address, Bytes};
use alloy::rpc::types::{BlockId, Filter, Log};

use super::rpc::{HeaderInfo, Rpc, RpcError};

/// The calls the indexer makes. Every call fails with a classified [`RpcError`]: its class
/// decides whether the indexer splits a range, waits, or gives up.
pub(crate) trait ChainSource: Clone + Send + Sync + 'static {
    /// The latest block number.
    fn head(&self) -> impl Future<Output = Result<u64, RpcError>> + Send;

    /// The header of block `number`; `None` if the chain does not have it (yet).
    fn header(
        &self,
        number: u64,
    ) -> impl Future<Output = Result<Option<HeaderInfo>, RpcError>> + Send;

    /// The logs of one block by hash (EIP-234), retried on retryable failures.
    fn block_logs(
        &self,
        filter: &Filter,
    ) -> impl Future<Output = Result<Vec<Log>, RpcError>> + Send;

    /// One attempt at the logs of a block range: the caller adapts the range to the failure.
    fn range_logs(
        &self,
        filter: &Filter,
    ) -> impl Future<Output = Result<Vec<Log>, RpcError>> + Send;

    /// `eth_call` at `block` (token metadata), retried; a revert is `Rejected`.
    fn call(
        &self,
        to: Address,
        data: Bytes,
        block: BlockId,
    ) -> impl Future<Output = Result<Bytes, RpcError>> + Send;

    /// Notes a failed attempt the caller handles itself (metrics, endpoint failover).
    fn record_error(&self, e: &RpcError);

    /// Waits before the next attempt after `e` (its `Retry-After`, else the next step of
    /// `schedule`); `Cancelled` on shutdown.
    fn wait_after(
        &self,
        e: &RpcError,
        schedule: &mut (impl Iterator<Item = Duration> + Send),
    ) -> impl Future<Output = Result<(), RpcError>> + Send;
}

impl ChainSource for Rpc {
    fn head(&self) -> impl Future<Output = Result<u64, RpcError>> + Send {
        Rpc::head(self)
    }

    fn header(
        &self,
        number: u64,
    ) -> impl Future<Output = Result<Option<HeaderInfo>, RpcError>> + Send {
        Rpc::header(self, number)
    }

    fn block_logs(
        &self,
        filter: &Filter,
    ) -> impl Future<Output = Result<Vec<Log>, RpcError>> + Send {
        self.logs_retrying(filter)
    }

    fn range_logs(
        &self,
        filter: &Filter,
    ) -> impl Future<Output = Result<Vec<Log>, RpcError>> + Send {
        self.logs_once(filter)
    }

    fn call(
        &self,
        to: Address,
        data: Bytes,
        block: BlockId,
    ) -> impl Future<Output = Result<Bytes, RpcError>> + Send {
        Rpc::call(self, to, data, block)
    }

    fn record_error(&self, e: &RpcError) {
        Rpc::record_error(self, e)
    }

    fn wait_after(
        &self,
        e: &RpcError,
        schedule: &mut (impl Iterator<Item = Duration> + Send),
    ) -> impl Future<Output = Result<(), RpcError>> + Send {
        Rpc::wait_after(self, e, schedule)
    }
}

/// A scripted chain for tests of the fork search and the backfill fetch.
#[cfg(test)]
pub(crate) mod fake {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use alloy::primitives::{Address, B256, Bytes};
    use alloy::rpc::types::{BlockId, Filter, Log};

    use super::ChainSource;
    use crate::chain::rpc::{HeaderInfo, RpcError};

    /// A scripted chain: headers by number, logs per block, range limits and a call log.
    #[derive(Clone, Default)]
    pub(crate) struct FakeChain {
        pub headers: Arc<Mutex<HashMap<u64, HeaderInfo>>>,
        pub logs: Arc<Mutex<Vec<Log>>>,
        /// `range_logs` refuses ranges longer than this (like a provider's limit).
        pub max_range: Option<u64>,
        pub asked_headers: Arc<Mutex<Vec<u64>>>,
        pub asked_ranges: Arc<Mutex<Vec<(u64, u64)>>>,
        pub errors: Arc<Mutex<Vec<&'static str>>>,
    }

    pub(crate) fn hash(n: u64, fork: u8) -> B256 {
        let mut b = B256::with_last_byte(fork);
        b.0[..8].copy_from_slice(&n.to_be_bytes());
        b
    }

    impl FakeChain {
        /// Adds an ERC-20 `Transfer` log of `token` in block `block` (on the chain as it is).
        pub(crate) fn push_transfer(
            &self,
            block: u64,
            log_index: u64,
            token: Address,
            (from, to, value): (Address, Address, u64),
        ) {
            let block_hash = self.headers.lock().unwrap().get(&block).map(|h| h.hash);
            let topics = vec![
                crate::chain::decode::TRANSFER_TOPIC,
                from.into_word(),
                to.into_word(),
            ];
            let data = alloy::primitives::U256::from(value)
                .to_be_bytes::<32>()
                .to_vec();
            self.logs.lock().unwrap().push(Log {
                inner: alloy::primitives::Log::new_unchecked(token, topics, data.into()),
                block_hash,
                block_number: Some(block),
                transaction_hash: Some(B256::with_last_byte(1)),
                log_index: Some(log_index),
                ..Log::default()
            });
        }

        /// Blocks `0..=tip`, those from `fork_at` on carrying fork tag `fork`.
        pub(crate) fn with_blocks(tip: u64, fork_at: u64, fork: u8) -> FakeChain {
            let chain = FakeChain::default();
            {
                let mut h = chain.headers.lock().unwrap();
                for n in 0..=tip {
                    let tag = |n: u64| if n >= fork_at { fork } else { 0 };
                    h.insert(
                        n,
                        HeaderInfo {
                            number: n,
                            hash: hash(n, tag(n)),
                            parent_hash: hash(n.saturating_sub(1), tag(n.saturating_sub(1))),
                        },
                    );
                }
            }
            chain
        }
    }

    impl ChainSource for FakeChain {
        async fn head(&self) -> Result<u64, RpcError> {
            Ok(self
                .headers
                .lock()
                .unwrap()
                .keys()
                .max()
                .copied()
                .unwrap_or(0))
        }

        async fn header(&self, number: u64) -> Result<Option<HeaderInfo>, RpcError> {
            self.asked_headers.lock().unwrap().push(number);
            Ok(self.headers.lock().unwrap().get(&number).copied())
        }

        async fn block_logs(&self, filter: &Filter) -> Result<Vec<Log>, RpcError> {
            let hash = filter.get_block_hash();
            Ok(self
                .logs
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.block_hash == hash)
                .cloned()
                .collect())
        }

        async fn range_logs(&self, filter: &Filter) -> Result<Vec<Log>, RpcError> {
            let from = filter.get_from_block().unwrap_or(0);
            let to = filter.get_to_block().unwrap_or(u64::MAX);
            self.asked_ranges.lock().unwrap().push((from, to));
            if let Some(max) = self.max_range
                && to - from + 1 > max
            {
                return Err(RpcError::RangeLimit {
                    method: "eth_getLogs",
                    suggested: Some(max),
                    message: format!("block range is too wide (maximum {max})"),
                });
            }
            Ok(self
                .logs
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.block_number.is_some_and(|n| (from..=to).contains(&n)))
                .cloned()
                .collect())
        }

        async fn call(&self, _: Address, _: Bytes, _: BlockId) -> Result<Bytes, RpcError> {
            Err(RpcError::Rejected {
                method: "eth_call",
                message: "the fake chain has no contracts".into(),
            })
        }

        fn record_error(&self, e: &RpcError) {
            self.errors.lock().unwrap().push(e.kind());
        }

        async fn wait_after(
            &self,
            _: &RpcError,
            _: &mut (impl Iterator<Item = Duration> + Send),
        ) -> Result<(), RpcError> {
            Ok(())
        }
    }
}
