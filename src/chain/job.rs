//! The `index_token` job: `{request_id?, chain_id, address, action, standard?, start_block?,
//! keep_rows?}` → `{request_id?, chain_id, address, requested}`. It records the request through
//! `chain_token_request` (the same door as the CLI and `service_role`); the chain's leading
//! indexer applies it within seconds.

use alloy::primitives::Address;
use serde::Deserialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::store::{ChainStore, ChainStoreError};
use super::store_catalogue::TokenRequest;
use crate::config::TokenStandard;
use crate::queue::job::{JobError, JobFuture, JobHandler};

/// The job's payload, exactly as `jobs/index_token.schema.json` describes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    #[serde(default, deserialize_with = "crate::queue::entry::hyphenated_uuid_opt")]
    request_id: Option<Uuid>,
    chain_id: u64,
    address: Address,
    action: Action,
    #[serde(default)]
    standard: Option<TokenStandard>,
    #[serde(default)]
    start_block: Option<u64>,
    #[serde(default)]
    keep_rows: bool,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Action {
    Add,
    Pause,
    Resume,
    Remove,
}

/// A parsed `index_token` job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexTokenJob {
    pub request_id: Option<Uuid>,
    pub chain_id: u64,
    pub token: Address,
    pub request: TokenRequest,
}

/// Why an `index_token` payload is refused.
#[derive(Debug, thiserror::Error)]
pub enum IndexTokenPayloadError {
    #[error("invalid index_token payload: {0}")]
    Shape(#[from] serde_json::Error),
    #[error("invalid index_token payload: action add needs a standard (erc20, erc721 or erc1155)")]
    MissingStandard,
}

/// Parses and validates an `index_token` payload.
pub fn parse_payload(payload: serde_json::Value) -> Result<IndexTokenJob, IndexTokenPayloadError> {
    let p: Payload = serde_json::from_value(payload)?;
    let request = match p.action {
        Action::Add => TokenRequest::Add {
            standard: p.standard.ok_or(IndexTokenPayloadError::MissingStandard)?,
            start_block: p.start_block.unwrap_or(0),
        },
        Action::Pause => TokenRequest::Pause,
        Action::Resume => TokenRequest::Resume,
        Action::Remove => TokenRequest::Remove {
            keep_rows: p.keep_rows,
        },
    };
    Ok(IndexTokenJob {
        request_id: p.request_id,
        chain_id: p.chain_id,
        token: p.address,
        request,
    })
}

/// Serves `index_token`.
#[derive(Debug, Clone)]
pub struct IndexTokenHandler {
    pool: PgPool,
}

impl IndexTokenHandler {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

impl JobHandler for IndexTokenHandler {
    fn job_type(&self) -> &'static str {
        "index_token"
    }

    fn handle(&self, payload: serde_json::Value) -> JobFuture {
        let pool = self.pool.clone();
        Box::pin(async move {
            let job = parse_payload(payload).map_err(|e| JobError::Rejected(e.to_string()))?;
            let store =
                ChainStore::new(job.chain_id).map_err(|e| JobError::Rejected(e.to_string()))?;
            match store.request_token(&pool, job.token, job.request).await {
                Ok(requested) => Ok(serde_json::json!({
                    "request_id": job.request_id,
                    "chain_id": job.chain_id,
                    "address": super::decode::addr_hex(&job.token),
                    "requested": requested,
                })),
                // The SQL door refused the request itself (bad value, unknown token): the same
                // answer on every retry.
                Err(ChainStoreError::Request {
                    source: sqlx::Error::Database(db),
                    ..
                }) if db
                    .code()
                    .is_some_and(|c| !c.starts_with("08") && !c.starts_with("57")) =>
                {
                    Err(JobError::Rejected(db.message().to_string()))
                }
                Err(e) => Err(JobError::Retryable(e.to_string())),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_parse_into_requests() {
        let job = parse_payload(serde_json::json!({
            "chain_id": 1514,
            "address": "0x00000000000000000000000000000000000000ab",
            "action": "add",
            "standard": "erc20",
            "start_block": 7
        }))
        .unwrap();
        assert_eq!(
            job.request,
            TokenRequest::Add {
                standard: TokenStandard::Erc20,
                start_block: 7
            }
        );
        let e = parse_payload(serde_json::json!({
            "chain_id": 1514,
            "address": "0x00000000000000000000000000000000000000ab",
            "action": "add"
        }))
        .unwrap_err();
        assert!(matches!(e, IndexTokenPayloadError::MissingStandard), "{e}");
        assert!(
            parse_payload(serde_json::json!({
                "chain_id": 1514, "address": "0xab", "action": "remove"
            }))
            .is_err()
        );
    }
}
