//! Balance-change announcements after each commit.
//!
//! Contract for other components and apps:
//! - `PUBLISH {prefix}:balance_changes` with JSON
//!   `{"chain_id": 1514, "token": "0x…", "holders": ["0x…", …], "block": 123, "reorg": false}`,
//!   one message per token per committed batch or reorg undo (`reorg: true`, `block` the new
//!   checkpoint: the holders' balances went back to what they were there);
//! - `DEL {prefix}:holding:{chain_id}:{token}:{holder}` for every changed holder, so holdings
//!   cached under that key are re-read from the index.
//!
//! Announcements are best effort: the commit is already durable, a Redis failure is logged and
//! counted, and caches must carry a TTL as a backstop.

use redis::aio::ConnectionManager;

use alloy::primitives::Address;

use super::decode::addr_hex;
use super::netting::Changes;

/// Largest number of keys deleted per Redis command.
const DEL_CHUNK: usize = 1000;

/// The pub/sub channel of balance changes.
pub fn channel(prefix: &str) -> String {
    format!("{prefix}:balance_changes")
}

/// The cache key of one holding.
pub fn holding_key(prefix: &str, chain_id: u64, token: &str, holder: &str) -> String {
    format!("{prefix}:holding:{chain_id}:{token}:{holder}")
}

/// Publishes `changes` and deletes the cache keys of the changed holders.
pub async fn announce(
    redis: &mut ConnectionManager,
    prefix: &str,
    chain_id: u64,
    changes: &Changes,
) {
    for (token, holders) in &changes.holders {
        if holders.is_empty() {
            continue;
        }
        let token = addr_hex(token);
        if let Err(e) = announce_token(
            redis,
            prefix,
            chain_id,
            &token,
            holders,
            changes.block,
            changes.reorg,
        )
        .await
        {
            metrics::counter!("tokenwarden_indexer_announce_errors_total",
                "chain_id" => chain_id.to_string())
            .increment(1);
            tracing::warn!(chain_id, token, error = %e, "cannot announce balance changes");
        }
    }
}

async fn announce_token(
    redis: &mut ConnectionManager,
    prefix: &str,
    chain_id: u64,
    token: &str,
    holders: &std::collections::BTreeSet<Address>,
    block: u64,
    reorg: bool,
) -> Result<(), redis::RedisError> {
    let list: Vec<String> = holders.iter().map(addr_hex).collect();
    for chunk in list.chunks(DEL_CHUNK) {
        let keys: Vec<String> = chunk
            .iter()
            .map(|h| holding_key(prefix, chain_id, token, h))
            .collect();
        let _: i64 = redis::cmd("DEL").arg(&keys).query_async(redis).await?;
    }
    let msg = serde_json::json!({
        "chain_id": chain_id,
        "token": token,
        "holders": list,
        "block": block,
        "reorg": reorg,
    });
    let _: i64 = redis::cmd("PUBLISH")
        .arg(channel(prefix))
        .arg(msg.to_string())
        .query_async(redis)
        .await?;
    Ok(())
}
