//! Balances at any block (`ChainStore::balance_at`, `min_balance_between`, `holders_at_block`)
//! against a brute-force model of a random stored history, on real Postgres; and the refusals
//! for blocks the index does not hold.

mod common;

use std::collections::HashMap;

use alloy::primitives::{Address, U256};
use common::TestEnv;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokenwarden::chain::store::{ChainStore, ChainStoreError};

const CHAIN: i64 = 1514;

fn addr(i: u8) -> Address {
    Address::with_last_byte(i)
}

/// (block, log index, from, to, value), in chain order.
type Move = (u64, u64, Address, Address, U256);

fn random_history(seed: u64, blocks: u64) -> Vec<Move> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut bal: HashMap<Address, U256> = HashMap::new();
    let mut out = Vec::new();
    for b in 1..=blocks {
        for li in 0..rng.random_range(0..4u64) {
            let a = addr(rng.random_range(1..=5));
            let c = addr(rng.random_range(1..=5));
            let have = bal.get(&a).copied().unwrap_or_default();
            let (f, t, v) = if have.is_zero() || rng.random_bool(0.3) {
                (Address::ZERO, a, U256::from(rng.random_range(1..1000u64)))
            } else {
                let m: u64 = have.try_into().unwrap_or(u64::MAX);
                let v = U256::from(rng.random_range(1..=m));
                if rng.random_bool(0.15) {
                    (a, Address::ZERO, v)
                } else {
                    (a, c, v)
                }
            };
            if f != Address::ZERO {
                *bal.entry(f).or_default() -= v;
            }
            if t != Address::ZERO {
                *bal.entry(t).or_default() += v;
            }
            out.push((b, li, f, t, v));
        }
    }
    out
}

fn model_balance(h: &[Move], holder: Address, block: u64) -> U256 {
    let mut b = U256::ZERO;
    for (n, _, f, t, v) in h {
        if *n > block {
            break;
        }
        if *t == holder {
            b += *v;
        }
        if *f == holder {
            b -= *v;
        }
    }
    b
}

fn model_min(h: &[Move], holder: Address, from: u64, to: u64) -> U256 {
    let mut b = model_balance(h, holder, from.saturating_sub(1));
    if from == 0 {
        b = U256::ZERO;
    }
    let mut min = b;
    for (n, _, f, t, v) in h {
        if *n < from || *n > to {
            continue;
        }
        if *t == holder {
            b += *v;
        }
        if *f == holder {
            b -= *v;
        }
        min = min.min(b);
    }
    min
}

async fn store_history(env: &TestEnv, token: Address, h: &[Move], checkpoint: u64) {
    sqlx::query(
        "INSERT INTO chain_tokens (chain_id, address, standard, start_block, status) \
         VALUES ($1, $2, 'erc20', 0, 'live')",
    )
    .bind(CHAIN)
    .bind(format!("{token:#x}"))
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO chain_checkpoints (chain_id, block_number, block_hash, finalized_block) \
         VALUES ($1, $2, '0x00', 0)",
    )
    .bind(CHAIN)
    .bind(checkpoint as i64)
    .execute(&env.pool)
    .await
    .unwrap();
    for (n, li, f, t, v) in h {
        sqlx::query(
            "INSERT INTO chain_transfers (chain_id, block_number, block_hash, log_index, tx_hash, \
             token, from_address, to_address, value) VALUES ($1, $2, $3, $4, '0x', $5, $6, $7, $8::numeric)",
        )
        .bind(CHAIN)
        .bind(*n as i64)
        .bind(format!("0x{n:064x}"))
        .bind(*li as i32)
        .bind(format!("{token:#x}"))
        .bind(format!("{f:#x}"))
        .bind(format!("{t:#x}"))
        .bind(v.to_string())
        .execute(&env.pool)
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balances_at_any_block_match_a_brute_force_model() {
    let env = TestEnv::new().await;
    let token = addr(0xaa);
    let blocks = 60;
    let h = random_history(5, blocks);
    store_history(&env, token, &h, blocks).await;
    let store = ChainStore::new(CHAIN as u64).unwrap();
    let mut rng = StdRng::seed_from_u64(9);
    for holder in (1..=5).map(addr) {
        for block in 0..=blocks {
            assert_eq!(
                store
                    .balance_at(&env.pool, token, holder, block)
                    .await
                    .unwrap(),
                model_balance(&h, holder, block),
                "balance of {holder} at {block}"
            );
        }
        for _ in 0..30 {
            let from = rng.random_range(0..=blocks);
            let to = rng.random_range(from..=blocks);
            assert_eq!(
                store
                    .min_balance_between(&env.pool, token, holder, from, to)
                    .await
                    .unwrap(),
                model_min(&h, holder, from, to),
                "min balance of {holder} over {from}..={to}"
            );
        }
    }
    for block in [0, 1, 17, 42, blocks] {
        let holders = store
            .holders_at_block(&env.pool, token, block)
            .await
            .unwrap();
        let mut want: Vec<(Address, U256)> = (1..=5)
            .map(addr)
            .map(|a| (a, model_balance(&h, a, block)))
            .filter(|(_, b)| !b.is_zero())
            .collect();
        want.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
        assert_eq!(holders, want, "holders at {block}");
    }

    // Blocks the index does not hold, and untracked tokens, are errors, never zero.
    let e = store
        .balance_at(&env.pool, token, addr(1), blocks + 1)
        .await
        .unwrap_err();
    assert!(
        matches!(e, ChainStoreError::NotIndexed { covered: Some(c), .. } if c == blocks),
        "{e}"
    );
    let e = store
        .balance_at(&env.pool, addr(0xbb), addr(1), 3)
        .await
        .unwrap_err();
    assert!(matches!(e, ChainStoreError::NotTracked { .. }), "{e}");
    sqlx::query("UPDATE chain_tokens SET status = 'backfilling', indexed_to = 30")
        .execute(&env.pool)
        .await
        .unwrap();
    assert!(
        store
            .balance_at(&env.pool, token, addr(1), 30)
            .await
            .is_ok()
    );
    assert!(
        store
            .min_balance_between(&env.pool, token, addr(1), 10, 31)
            .await
            .is_err()
    );
}
