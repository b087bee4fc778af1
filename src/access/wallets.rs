//! The proven-wallet tables' gateway: `tw_access_settings`, `access_siwe_nonces` and
//! `user_wallets` (migration `20261201095500_access_wallets.sql`). The nonce rules (lifetime,
//! open-nonce bound) live in SQL (`tw_access_issue_nonce`), so the `authenticated` door and the
//! worker issue nonces alike.

use alloy::primitives::Address;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::refusal::{LinkRefusal, Refused};
use crate::chain::decode::addr_hex;

/// A Postgres failure of the wallet tables.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct WalletStoreError {
    what: &'static str,
    #[source]
    source: sqlx::Error,
}

fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> WalletStoreError {
    move |source| WalletStoreError { what, source }
}

/// How a wallet's signature was verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMethod {
    /// The signer recovered from the signature is the address.
    Eoa,
    /// The address is a contract whose `isValidSignature` returned the ERC-1271 magic value.
    Erc1271,
}

impl LinkMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkMethod::Eoa => "eoa",
            LinkMethod::Erc1271 => "erc1271",
        }
    }
}

/// An issued nonce.
#[derive(Debug, Clone)]
pub struct Nonce {
    pub nonce: String,
    pub expires_at: DateTime<Utc>,
}

/// One stored link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalletLink {
    pub user_id: Uuid,
    pub address: String,
    pub chains: Vec<i64>,
    pub method: String,
    pub verified_at: DateTime<Utc>,
}

/// A nonce that may still serve a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NonceState {
    /// Issued to this user, unused, unexpired.
    Fresh,
    /// This very request already used it: a redelivery, whose link is stored.
    UsedByThisRequest,
}

/// The result of storing a proven link.
#[derive(Debug, Clone)]
pub(crate) struct Linked {
    pub link: WalletLink,
    /// The user the wallet was linked to before, if another one (the link moved).
    pub moved_from: Option<Uuid>,
}

/// Reads and writes the wallet tables.
#[derive(Debug, Clone)]
pub struct WalletStore {
    pool: PgPool,
}

impl WalletStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// A fresh nonce for `user` (the same rules as `access_wallet_nonce()`).
    pub async fn issue_nonce(&self, user: Uuid) -> Result<Nonce, WalletStoreError> {
        let (nonce, expires_at) =
            sqlx::query_as("SELECT nonce, expires_at FROM public.tw_access_issue_nonce($1)")
                .bind(user)
                .fetch_one(&self.pool)
                .await
                .map_err(db("issue a SIWE nonce"))?;
        Ok(Nonce { nonce, expires_at })
    }

    /// Whether `nonce` may still be used by `user`'s `request`, or why not.
    pub(crate) async fn nonce_state(
        &self,
        user: Uuid,
        nonce: &str,
        request: Uuid,
    ) -> Result<Result<NonceState, Refused>, WalletStoreError> {
        let row: Option<(Uuid, bool, Option<Uuid>)> = sqlx::query_as(
            "SELECT user_id, expires_at < now(), used_by_request \
             FROM public.access_siwe_nonces WHERE nonce = $1",
        )
        .bind(nonce)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("read a SIWE nonce"))?;
        Ok(match row {
            None => Err(unknown_nonce(nonce)),
            Some((owner, _, _)) if owner != user => Err(unknown_nonce(nonce)),
            Some((_, _, Some(used))) if used == request => Ok(NonceState::UsedByThisRequest),
            Some((_, _, Some(_))) => Err(Refused::new(
                LinkRefusal::NonceUsed,
                format!("nonce {nonce} was already used"),
            )),
            Some((_, true, None)) => Err(Refused::new(
                LinkRefusal::NonceExpired,
                format!("nonce {nonce} has expired; ask for a new one"),
            )),
            Some((_, false, None)) => Ok(NonceState::Fresh),
        })
    }

    /// Uses `nonce` for `request` and stores the link, in one transaction. The nonce is taken
    /// only if it is still unused and unexpired, so two requests racing with one nonce link
    /// once.
    pub(crate) async fn consume_and_link(
        &self,
        user: Uuid,
        nonce: &str,
        request: Uuid,
        address: Address,
        chain_id: u64,
        method: LinkMethod,
    ) -> Result<Result<Linked, Refused>, WalletStoreError> {
        let mut tx = self.pool.begin().await.map_err(db("begin a wallet link"))?;
        let taken = sqlx::query(
            "UPDATE public.access_siwe_nonces SET used_at = now(), used_by_request = $3 \
             WHERE nonce = $1 AND user_id = $2 AND used_at IS NULL AND expires_at >= now()",
        )
        .bind(nonce)
        .bind(user)
        .bind(request)
        .execute(&mut *tx)
        .await
        .map_err(db("use a SIWE nonce"))?
        .rows_affected();
        if taken == 0 {
            return Ok(Err(Refused::new(
                LinkRefusal::NonceUsed,
                format!("nonce {nonce} was used or expired while the signature was checked"),
            )));
        }
        let address = addr_hex(&address);
        let previous: Option<Uuid> = sqlx::query_scalar(
            "SELECT user_id FROM public.user_wallets WHERE address = $1 FOR UPDATE",
        )
        .bind(&address)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("read a wallet's link"))?;
        let chain = i64::try_from(chain_id).unwrap_or(i64::MAX);
        let row: LinkRow = sqlx::query_as(
            "INSERT INTO public.user_wallets AS w (user_id, address, chains, method, verified_at) \
             VALUES ($1, $2, ARRAY[$3::bigint], $4, now()) \
             ON CONFLICT (address) DO UPDATE SET \
               chains = CASE WHEN w.user_id = EXCLUDED.user_id AND w.method = EXCLUDED.method \
                             THEN (SELECT array_agg(DISTINCT c ORDER BY c) FROM unnest(w.chains || EXCLUDED.chains) c) \
                             ELSE EXCLUDED.chains END, \
               user_id = EXCLUDED.user_id, method = EXCLUDED.method, verified_at = now() \
             RETURNING user_id, address, chains, method, verified_at",
        )
        .bind(user)
        .bind(&address)
        .bind(chain)
        .bind(method.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(db("store a wallet link"))?;
        tx.commit().await.map_err(db("commit a wallet link"))?;
        Ok(Ok(Linked {
            link: link_of(row),
            moved_from: previous.filter(|p| *p != user),
        }))
    }

    /// The link of `address` if `user` holds it.
    pub async fn link(
        &self,
        user: Uuid,
        address: Address,
    ) -> Result<Option<WalletLink>, WalletStoreError> {
        let row: Option<LinkRow> = sqlx::query_as(
            "SELECT user_id, address, chains, method, verified_at FROM public.user_wallets \
             WHERE user_id = $1 AND address = $2",
        )
        .bind(user)
        .bind(addr_hex(&address))
        .fetch_optional(&self.pool)
        .await
        .map_err(db("read a wallet link"))?;
        Ok(row.map(link_of))
    }

    /// Every wallet `user` has proven, oldest proof first.
    pub async fn links(&self, user: Uuid) -> Result<Vec<WalletLink>, WalletStoreError> {
        let rows: Vec<LinkRow> = sqlx::query_as(
            "SELECT user_id, address, chains, method, verified_at FROM public.user_wallets \
             WHERE user_id = $1 ORDER BY verified_at, address",
        )
        .bind(user)
        .fetch_all(&self.pool)
        .await
        .map_err(db("read a user's wallet links"))?;
        Ok(rows.into_iter().map(link_of).collect())
    }

    /// The users holding any of `addresses` (lowercase 0x hex, as announced).
    pub async fn users_of(&self, addresses: &[String]) -> Result<Vec<Uuid>, WalletStoreError> {
        sqlx::query_scalar(
            "SELECT DISTINCT user_id FROM public.user_wallets WHERE address = ANY($1)",
        )
        .bind(addresses)
        .fetch_all(&self.pool)
        .await
        .map_err(db("map wallets to users"))
    }

    /// Removes `user`'s link of `address`; `false` if there was none.
    pub async fn unlink(&self, user: Uuid, address: Address) -> Result<bool, WalletStoreError> {
        let n = sqlx::query("DELETE FROM public.user_wallets WHERE user_id = $1 AND address = $2")
            .bind(user)
            .bind(addr_hex(&address))
            .execute(&self.pool)
            .await
            .map_err(db("delete a wallet link"))?
            .rows_affected();
        Ok(n > 0)
    }
}

fn unknown_nonce(nonce: &str) -> Refused {
    Refused::new(
        LinkRefusal::UnknownNonce,
        format!("nonce {nonce} was not issued to this user (or expired long ago)"),
    )
}

/// A `user_wallets` row: user_id, address, chains, method, verified_at.
type LinkRow = (Uuid, String, Vec<i64>, String, DateTime<Utc>);

fn link_of((user_id, address, chains, method, verified_at): LinkRow) -> WalletLink {
    WalletLink {
        user_id,
        address,
        chains,
        method,
        verified_at,
    }
}
