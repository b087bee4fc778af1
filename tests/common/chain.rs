//! Shared helpers for tests that run the chain indexer against anvil: a chain entry for
//! anvil, a config with tokens, the indexer in the test process, the checkpoint, and waiting
//! until the index reaches the chain head.

use std::time::Duration;

use alloy::providers::Provider;
use tokenwarden::app::AppContext;
use tokenwarden::config::{ChainConfig, Config, TokenConfig};

use super::anvil::Anvil;
use super::{TestEnv, wait_until};

/// anvil's chain id.
pub const ANVIL_CHAIN_ID: u64 = 31337;

/// A chain entry for anvil at `rpc` (fast polling, small ranges), with `extra` keys on top.
pub fn anvil_chain(rpc: &str, extra: serde_json::Value) -> ChainConfig {
    let mut v = serde_json::json!({
        "chain_id": ANVIL_CHAIN_ID,
        "name": "anvil",
        "rpc_urls": [rpc],
        "poll_interval_ms": 50,
        "reorg_depth": 8,
        "max_block_range": 4,
        "fetch_concurrency": 3,
        "rpc_timeout_ms": 2000,
    });
    if let serde_json::Value::Object(m) = extra {
        for (k, x) in m {
            v[k] = x;
        }
    }
    serde_json::from_value(v).expect("chain config")
}

/// The test environment's config with the chain indexer on, one chain and `tokens`.
pub fn indexer_config(env: &TestEnv, chain: ChainConfig, tokens: Vec<TokenConfig>) -> Config {
    let mut cfg = env.config();
    cfg.chain.enabled = true;
    cfg.chain.chains = vec![chain];
    cfg.chain.tokens = tokens;
    cfg.validate().expect("valid config");
    cfg
}

/// The indexer running inside the test process.
pub struct InProcIndexer {
    pub ctx: AppContext,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl InProcIndexer {
    pub async fn start(cfg: Config) -> InProcIndexer {
        let ctx = AppContext::connect(cfg).await.expect("connect");
        let handles = tokenwarden::chain::spawn_indexers(&ctx);
        assert_eq!(handles.len(), 1);
        InProcIndexer { ctx, handles }
    }

    /// Waits for the indexer tasks to end by themselves (a stopped indexer), within `within`.
    pub async fn ended(self, within: Duration) {
        for h in self.handles {
            tokio::time::timeout(within, h)
                .await
                .expect("stopped indexer task ends")
                .expect("indexer task");
        }
    }

    pub async fn stop(self) {
        self.ctx.shutdown.cancel();
        for h in self.handles {
            tokio::time::timeout(Duration::from_secs(15), h)
                .await
                .expect("indexer stops on shutdown")
                .expect("indexer task");
        }
    }
}

/// The committed checkpoint of anvil's chain: (block, hash).
pub async fn anvil_checkpoint(env: &TestEnv) -> Option<(u64, String)> {
    sqlx::query_as::<_, (i64, String)>(
        "SELECT block_number, block_hash FROM chain_checkpoints WHERE chain_id = $1",
    )
    .bind(ANVIL_CHAIN_ID as i64)
    .fetch_optional(&env.pool)
    .await
    .expect("read checkpoint")
    .map(|(n, h)| (n as u64, h))
}

/// Waits until the committed checkpoint is anvil's current head block (same hash).
pub async fn wait_head_indexed(env: &TestEnv, anvil: &Anvil, timeout: Duration) {
    wait_until(timeout, "index reaches the chain head", || async {
        let head = anvil.head().await;
        let block = anvil
            .provider
            .get_block_by_number(head.into())
            .await
            .ok()??;
        let cp = anvil_checkpoint(env).await?;
        (cp.0 == head && cp.1 == format!("{:#x}", block.header.hash)).then_some(())
    })
    .await;
}
