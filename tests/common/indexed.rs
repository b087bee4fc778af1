//! The chain indexer running inside the test process on a real anvil, with one ERC-20
//! (`TestToken20`, 18 decimals) and one ERC-721 (`TestNft721`) indexed from block 0: what the
//! access tests stand on.

use alloy::primitives::{Address, U256};
use serde_json::json;
use tokenwarden::config::{TokenConfig, TokenStandard};
use uuid::Uuid;

use super::anvil::Anvil;
use super::{DbKind, TestEnv};

/// anvil's chain id.
pub const CHAIN: u64 = 31337;
/// The SIWE domain the indexed environment accepts.
pub const SIWE_DOMAIN: &str = "localhost:3000";

/// The indexer running inside the test process, on anvil.
pub struct Indexed {
    pub anvil: Anvil,
    pub env: TestEnv,
    pub t20: Address,
    pub t721: Address,
    pub ctx: tokenwarden::app::AppContext,
}

impl Indexed {
    pub async fn start(kind: DbKind) -> Indexed {
        let env = TestEnv::on(kind).await;
        let anvil = Anvil::spawn().await;
        let t20 = anvil.deploy("TestToken20").await;
        let t721 = anvil.deploy("TestNft721").await;
        let mut cfg = env.config();
        cfg.access.siwe_domains = vec![SIWE_DOMAIN.to_string()];
        cfg.chain.enabled = true;
        cfg.chain.chains = vec![
            serde_json::from_value(json!({
                "chain_id": CHAIN, "name": "anvil", "rpc_urls": [anvil.url],
                "poll_interval_ms": 50, "reorg_depth": 2, "rpc_timeout_ms": 2000,
            }))
            .expect("chain config"),
        ];
        cfg.chain.tokens = [(t20, TokenStandard::Erc20), (t721, TokenStandard::Erc721)]
            .into_iter()
            .map(|(a, standard)| TokenConfig {
                chain_id: CHAIN,
                address: format!("{a:#x}"),
                standard,
                start_block: 0,
            })
            .collect();
        cfg.validate().expect("valid config");
        let ctx = tokenwarden::app::AppContext::connect(cfg)
            .await
            .expect("connect");
        let _ = tokenwarden::chain::spawn_indexers(&ctx);
        let me = Indexed {
            anvil,
            env,
            t20,
            t721,
            ctx,
        };
        me.synced().await;
        me
    }

    /// Waits until the index has every mined block.
    pub async fn synced(&self) {
        use alloy::providers::Provider;
        let head = self.anvil.provider.get_block_number().await.expect("head");
        let pool = self.env.pool.clone();
        super::wait_until(
            std::time::Duration::from_secs(30),
            "the index reaches the head",
            || {
                let pool = pool.clone();
                async move {
                    let cp: Option<i64> = sqlx::query_scalar(
                        "SELECT block_number FROM public.chain_checkpoints WHERE chain_id = $1",
                    )
                    .bind(CHAIN as i64)
                    .fetch_optional(&pool)
                    .await
                    .ok()
                    .flatten();
                    cp.filter(|c| *c as u64 >= head).map(|_| ())
                }
            },
        )
        .await;
    }

    pub async fn erc20(&self, ops: &[(Address, Address, u128)]) {
        let ops: Vec<_> = ops
            .iter()
            .map(|(f, t, v)| (*f, *t, U256::from(*v)))
            .collect();
        self.anvil.send(self.t20, Anvil::erc20_batch(&ops)).await;
        self.synced().await;
    }

    pub async fn erc721(&self, ops: &[(Address, Address, u64)]) {
        let ops: Vec<_> = ops
            .iter()
            .map(|(f, t, v)| (*f, *t, U256::from(*v)))
            .collect();
        self.anvil.send(self.t721, Anvil::erc721_batch(&ops)).await;
        self.synced().await;
    }

    pub async fn link(&self, user: Uuid, wallet: Address) {
        sqlx::query(
            "INSERT INTO public.user_wallets (user_id, address, chains, method) VALUES ($1, $2, ARRAY[$3::bigint], 'eoa')",
        )
        .bind(user)
        .bind(format!("{wallet:#x}"))
        .bind(CHAIN as i64)
        .execute(&self.env.pool)
        .await
        .expect("link");
    }
}
