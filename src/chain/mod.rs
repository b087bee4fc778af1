//! The chain indexer: follows ERC-20 and ERC-721 `Transfer` and ERC-1155 `TransferSingle` /
//! `TransferBatch` logs, keeps exact holder balances (per id for ERC-1155) and NFT owners in
//! Postgres, survives reorgs, RPC faults and restarts, and announces changes.
//!
//! | module | concern |
//! |---|---|
//! | [`rpc`] | JSON-RPC calls, error classification, retries |
//! | [`source`] | the calls the indexer needs, as a trait ([`rpc::Rpc`] implements it) |
//! | [`tokens`] | the configured tokens of a chain, addresses parsed |
//! | [`catalogue`] | the tracked-token catalogue: token states and the transitions toward the requested one (pure) |
//! | [`decode`] | logs → transfer rows |
//! | [`factory`] | factory rules and creation logs → created tokens (pure) |
//! | [`netting`] | a batch's transfers → balance deltas, NFT owners, changed holders (pure) |
//! | [`reorg`] | the fork base of a reorg: newest remembered block still on the chain |
//! | [`store`] | the only reader and writer of the chain tables: batches and reorg undo (one transaction each), checkpoints, faults, holdings |
//! | [`history`] | balances at any block and holder lists at a block, from the stored transfers |
//! | [`store_multi`] | the store's ERC-1155 statements: batch writes, reorg undo, balances and holders of an id |
//! | [`store_catalogue`] | the store's catalogue statements: requests, transitions, token backfill commits |
//! | [`lease`] | one leader per chain across replicas |
//! | [`notify`] | Redis announcements |
//! | [`indexer`] | backfill, head following, reorg detection |
//! | [`job`] | the `index_token` job handler |
//! | [`cli`] | operator commands |

pub(crate) mod catalogue;
pub mod cli;
pub(crate) mod decode;
pub(crate) mod factory;
pub(crate) mod history;
pub(crate) mod indexer;
pub mod job;
pub(crate) mod lease;
pub(crate) mod netting;
pub(crate) mod notify;
pub(crate) mod reorg;
pub(crate) mod rpc;
pub(crate) mod source;
pub mod store;
pub(crate) mod store_catalogue;
pub(crate) mod store_multi;
pub(crate) mod tokens;

/// Starts one indexer task per configured chain (each waits for its lease before indexing;
/// a chain whose catalogue is empty waits for its first token without asking the chain).
/// Returns nothing to wait on when `chain.enabled` is false. The tasks stop when
/// `ctx.shutdown` is cancelled.
pub fn spawn_indexers(ctx: &crate::app::AppContext) -> Vec<tokio::task::JoinHandle<()>> {
    let section = &ctx.cfg.chain;
    if !section.enabled {
        return Vec::new();
    }
    section
        .chains
        .iter()
        .map(|c| {
            let params = indexer::IndexerParams {
                chain: c.clone(),
                tokens: section.tokens_of(c.chain_id),
                factories: section.factories_of(c.chain_id),
                database_url: ctx.cfg.database.url.clone(),
                redis: ctx.redis.clone(),
                redis_prefix: ctx.cfg.redis.prefix.clone(),
                shutdown: ctx.shutdown.clone(),
            };
            tokio::spawn(indexer::run_chain(params))
        })
        .collect()
}
