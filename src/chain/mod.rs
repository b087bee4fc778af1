//! The chain indexer: follows ERC-20 and ERC-721 `Transfer` logs, keeps exact holder balances
//! and NFT owners in Postgres, survives reorgs, RPC faults and restarts, and announces changes.
//!
//! | module | concern |
//! |---|---|
//! | [`rpc`] | JSON-RPC calls, error classification, retries |
//! | [`source`] | the calls the indexer needs, as a trait ([`rpc::Rpc`] implements it) |
//! | [`tokens`] | the configured tokens of a chain, addresses parsed |
//! | [`decode`] | logs → transfer rows |
//! | [`netting`] | a batch's transfers → balance deltas, NFT owners, changed holders (pure) |
//! | [`reorg`] | the fork base of a reorg: newest remembered block still on the chain |
//! | [`store`] | the only reader and writer of the chain tables: batches and reorg undo (one transaction each), checkpoints, faults, holdings |
//! | [`lease`] | one leader per chain across replicas |
//! | [`notify`] | Redis announcements |
//! | [`indexer`] | backfill, head following, reorg detection |
//! | [`cli`] | operator commands |

pub mod cli;
pub(crate) mod decode;
pub(crate) mod indexer;
pub(crate) mod lease;
pub(crate) mod netting;
pub(crate) mod notify;
pub(crate) mod reorg;
pub(crate) mod rpc;
pub(crate) mod source;
pub mod store;
pub(crate) mod tokens;

/// Starts one indexer task per configured chain (each waits for its lease before indexing).
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
        .filter(|c| !section.tokens_of(c.chain_id).is_empty())
        .map(|c| {
            let params = indexer::IndexerParams {
                chain: c.clone(),
                tokens: section.tokens_of(c.chain_id),
                database_url: ctx.cfg.database.url.clone(),
                redis: ctx.redis.clone(),
                redis_prefix: ctx.cfg.redis.prefix.clone(),
                shutdown: ctx.shutdown.clone(),
            };
            tokio::spawn(indexer::run_chain(params))
        })
        .collect()
}
