//! The wallet jobs: `link_wallet` `{request_id, user_id, message, signature}` →
//! `{request_id, status: linked|refused, address?, chains?, method?, verified_at?,
//! moved_from_user?, reason?, detail?}` and `unlink_wallet` `{request_id, user_id, address}` →
//! `{request_id, status: unlinked|not_linked, address}` (schemas in `jobs/`).

use std::sync::Arc;

use alloy::primitives::Address;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::cache::DecisionCache;
use super::link::{LinkError, LinkOutcome, LinkRequest, WalletLinker};
use crate::chain::decode::addr_hex;
use crate::queue::job::{JobError, JobFuture, JobHandler};
use crate::queue::registry::JobRegistry;

/// Longest SIWE message accepted (characters); EIP-4361 messages are a few hundred.
pub const MAX_MESSAGE_CHARS: usize = 4096;
/// Longest signature accepted (hex characters, without `0x`); contract wallets may sign with
/// several owner signatures.
pub const MAX_SIGNATURE_HEX: usize = 8192;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkPayload {
    #[serde(deserialize_with = "crate::queue::entry::hyphenated_uuid")]
    request_id: Uuid,
    #[serde(deserialize_with = "crate::queue::entry::hyphenated_uuid")]
    user_id: Uuid,
    message: String,
    signature: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UnlinkPayload {
    #[serde(deserialize_with = "crate::queue::entry::hyphenated_uuid")]
    request_id: Uuid,
    #[serde(deserialize_with = "crate::queue::entry::hyphenated_uuid")]
    user_id: Uuid,
    address: String,
}

/// Parses a `link_wallet` payload. The message's content is judged by the linker (a bad one
/// is a `refused` reply with its reason); only the shape and the sizes are checked here.
pub fn parse_link(payload: Value) -> Result<LinkRequest, String> {
    let p: LinkPayload =
        serde_json::from_value(payload).map_err(|e| format!("invalid link_wallet payload: {e}"))?;
    if p.message.chars().count() > MAX_MESSAGE_CHARS {
        return Err(format!(
            "invalid link_wallet payload: message is longer than {MAX_MESSAGE_CHARS} characters"
        ));
    }
    if p.signature.trim_start_matches("0x").len() > MAX_SIGNATURE_HEX {
        return Err(format!(
            "invalid link_wallet payload: signature is longer than {MAX_SIGNATURE_HEX} hex characters"
        ));
    }
    Ok(LinkRequest {
        request_id: p.request_id,
        user_id: p.user_id,
        message: p.message,
        signature: p.signature,
    })
}

/// Parses an `unlink_wallet` payload: `(request_id, user_id, address)`.
pub fn parse_unlink(payload: Value) -> Result<(Uuid, Uuid, Address), String> {
    let p: UnlinkPayload = serde_json::from_value(payload)
        .map_err(|e| format!("invalid unlink_wallet payload: {e}"))?;
    let address = p
        .address
        .parse::<Address>()
        .ok()
        .filter(|_| p.address.len() == 42 && p.address.starts_with("0x"))
        .ok_or_else(|| {
            format!(
                "invalid unlink_wallet payload: address {:?} is not a 0x-prefixed 20-byte hex address",
                p.address
            )
        })?;
    Ok((p.request_id, p.user_id, address))
}

/// The reply to a link request.
pub fn link_reply(request_id: Uuid, outcome: &LinkOutcome) -> Value {
    match outcome {
        LinkOutcome::Linked { link, moved_from } => json!({
            "request_id": request_id,
            "status": "linked",
            "address": link.address,
            "chains": link.chains,
            "method": link.method,
            "verified_at": link.verified_at,
            "moved_from_user": moved_from,
        }),
        LinkOutcome::Refused(r) => json!({
            "request_id": request_id,
            "status": "refused",
            "reason": r.reason.as_str(),
            "detail": r.detail,
        }),
    }
}

fn retryable(e: LinkError) -> JobError {
    JobError::Retryable(e.to_string())
}

/// Serves `link_wallet`.
#[derive(Clone)]
pub struct LinkWalletHandler {
    linker: Arc<WalletLinker>,
    cache: Option<Arc<DecisionCache>>,
}

impl JobHandler for LinkWalletHandler {
    fn job_type(&self) -> &'static str {
        "link_wallet"
    }

    fn handle(&self, payload: Value) -> JobFuture {
        let linker = self.linker.clone();
        let cache = self.cache.clone();
        Box::pin(async move {
            let req = parse_link(payload).map_err(JobError::Rejected)?;
            let outcome = linker.link(&req).await.map_err(retryable)?;
            match &outcome {
                LinkOutcome::Refused(r) => {
                    tracing::info!(user_id = %req.user_id, request_id = %req.request_id,
                        reason = r.reason.as_str(), detail = %r.detail, "wallet link refused");
                }
                LinkOutcome::Linked { moved_from, .. } => {
                    let users: Vec<Uuid> =
                        std::iter::once(req.user_id).chain(*moved_from).collect();
                    evict(cache.as_ref(), &users).await?;
                }
            }
            Ok(link_reply(req.request_id, &outcome))
        })
    }
}

/// Serves `unlink_wallet`.
#[derive(Clone)]
pub struct UnlinkWalletHandler {
    linker: Arc<WalletLinker>,
    cache: Option<Arc<DecisionCache>>,
}

/// A link or unlink changes what the user's checks see: drop their cached decisions (and, when
/// a link moved, the previous holder's). The change is committed; a Redis failure here is
/// retried by the queue, and the link repeats idempotently.
async fn evict(cache: Option<&Arc<DecisionCache>>, users: &[Uuid]) -> Result<(), JobError> {
    match cache {
        Some(c) => c
            .evict_users(users)
            .await
            .map_err(|e| JobError::Retryable(e.to_string())),
        None => Ok(()),
    }
}

impl JobHandler for UnlinkWalletHandler {
    fn job_type(&self) -> &'static str {
        "unlink_wallet"
    }

    fn handle(&self, payload: Value) -> JobFuture {
        let linker = self.linker.clone();
        let cache = self.cache.clone();
        Box::pin(async move {
            let (request_id, user, address) = parse_unlink(payload).map_err(JobError::Rejected)?;
            let removed = linker.unlink(user, address).await.map_err(retryable)?;
            if removed {
                evict(cache.as_ref(), &[user]).await?;
            }
            Ok(json!({
                "request_id": request_id,
                "status": if removed { "unlinked" } else { "not_linked" },
                "address": addr_hex(&address),
            }))
        })
    }
}

/// Registers the wallet jobs; with a cache, links and unlinks evict the user's decisions.
pub fn register(
    jobs: &mut JobRegistry,
    linker: Arc<WalletLinker>,
    cache: Option<Arc<DecisionCache>>,
) {
    jobs.register(LinkWalletHandler {
        linker: linker.clone(),
        cache: cache.clone(),
    });
    jobs.register(UnlinkWalletHandler { linker, cache });
}
