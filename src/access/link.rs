//! Linking a wallet to a user: the SIWE message's static checks ([`super::siwe`]), the nonce
//! ([`super::wallets`]), then the signature: an EOA by recovering its signer, a contract wallet
//! by ERC-1271 `isValidSignature` on the message's chain. Only then is the nonce used and the
//! link stored, in one transaction.

use std::collections::HashMap;

use alloy::primitives::{Address, Bytes, FixedBytes, Signature, eip191_hash_message};
use alloy::rpc::types::BlockId;
use alloy::sol;
use alloy::sol_types::SolCall;
use chrono::Utc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::message::{CheckedMessage, SiwePolicy};
use super::refusal::{LinkRefusal, Refused};
use super::wallets::{LinkMethod, NonceState, WalletLink, WalletStore, WalletStoreError};
use crate::chain::rpc::{Rpc, RpcError};
use crate::config::Config;

sol! {
    /// ERC-1271: a contract wallet vouches for a signature over `hash`.
    interface IERC1271 {
        function isValidSignature(bytes32 hash, bytes signature) external view returns (bytes4);
    }
}

/// What `isValidSignature` returns for a valid signature (its own selector).
const ERC1271_MAGIC: [u8; 4] = [0x16, 0x26, 0xba, 0x7e];

/// Why a link could not be decided now (a refusal is an outcome, not an error).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Store(#[from] WalletStoreError),
    #[error("checking the contract wallet {address} on chain {chain_id}: {source}")]
    Rpc {
        chain_id: u64,
        address: Address,
        #[source]
        source: RpcError,
    },
    #[error("chain {0} has no RPC endpoint configured")]
    NoRpc(u64),
    #[error("cannot build the chain client of chain {chain_id}: {source}")]
    Client {
        chain_id: u64,
        #[source]
        source: RpcError,
    },
}

/// A `link_wallet` request.
#[derive(Debug, Clone)]
pub struct LinkRequest {
    pub request_id: Uuid,
    pub user_id: Uuid,
    /// The EIP-4361 message, exactly as the wallet signed it.
    pub message: String,
    /// The signature, 0x-prefixed hex (65 bytes for an EOA; any length for a contract wallet).
    pub signature: String,
}

/// What became of a link request.
#[derive(Debug, Clone)]
pub enum LinkOutcome {
    Linked {
        link: WalletLink,
        /// The user who held the wallet before, if another one.
        moved_from: Option<Uuid>,
    },
    Refused(Refused),
}

/// Verifies and stores wallet links.
#[derive(Clone)]
pub struct WalletLinker {
    policy: SiwePolicy,
    store: WalletStore,
    rpcs: HashMap<u64, Rpc>,
}

impl WalletLinker {
    /// A linker for the chains of `cfg.chain.chains` and the SIWE rules of `cfg.access`.
    pub fn from_config(
        store: WalletStore,
        cfg: &Config,
        cancel: CancellationToken,
    ) -> Result<Self, LinkError> {
        let mut rpcs = HashMap::new();
        for c in &cfg.chain.chains {
            let rpc = Rpc::new(c, cancel.clone()).map_err(|source| LinkError::Client {
                chain_id: c.chain_id,
                source,
            })?;
            rpcs.insert(c.chain_id, rpc);
        }
        let policy = SiwePolicy {
            domains: cfg.access.siwe_domains.iter().cloned().collect(),
            chains: rpcs.keys().copied().collect(),
            clock_skew_secs: i64::from(cfg.access.siwe_clock_skew_secs),
        };
        Ok(Self {
            policy,
            store,
            rpcs,
        })
    }

    pub fn store(&self) -> &WalletStore {
        &self.store
    }

    /// Checks `req` and stores the link, or says why not. A redelivered request whose nonce
    /// it already used answers with the stored link.
    pub async fn link(&self, req: &LinkRequest) -> Result<LinkOutcome, LinkError> {
        let msg = match self.policy.check(&req.message, Utc::now()) {
            Ok(m) => m,
            Err(r) => return Ok(LinkOutcome::Refused(r)),
        };
        match self
            .store
            .nonce_state(req.user_id, &msg.nonce, req.request_id)
            .await?
        {
            Err(r) => return Ok(LinkOutcome::Refused(r)),
            Ok(NonceState::UsedByThisRequest) => {
                if let Some(link) = self.store.link(req.user_id, msg.address).await? {
                    return Ok(LinkOutcome::Linked {
                        link,
                        moved_from: None,
                    });
                }
                return Ok(LinkOutcome::Refused(Refused::new(
                    LinkRefusal::NonceUsed,
                    "this request used the nonce, but the wallet has been unlinked since",
                )));
            }
            Ok(NonceState::Fresh) => {}
        }
        let method = match self.verify_signature(&msg, &req.signature).await? {
            Ok(m) => m,
            Err(r) => return Ok(LinkOutcome::Refused(r)),
        };
        Ok(
            match self
                .store
                .consume_and_link(
                    req.user_id,
                    &msg.nonce,
                    req.request_id,
                    msg.address,
                    msg.chain_id,
                    method,
                )
                .await?
            {
                Ok(l) => LinkOutcome::Linked {
                    link: l.link,
                    moved_from: l.moved_from,
                },
                Err(r) => LinkOutcome::Refused(r),
            },
        )
    }

    /// EOA first (no RPC call): the signer recovered from a 65-byte signature. Otherwise the
    /// address must be a contract on the message's chain that vouches for it (ERC-1271).
    async fn verify_signature(
        &self,
        msg: &CheckedMessage,
        signature: &str,
    ) -> Result<Result<LinkMethod, Refused>, LinkError> {
        let hex_sig = signature.strip_prefix("0x").unwrap_or(signature);
        let Ok(sig_bytes) = hex::decode(hex_sig) else {
            return Ok(Err(Refused::new(
                LinkRefusal::MalformedSignature,
                "the signature is not hex",
            )));
        };
        let recovered = Signature::from_raw(&sig_bytes)
            .ok()
            .and_then(|s| s.recover_address_from_msg(msg.text.as_bytes()).ok());
        if recovered == Some(msg.address) {
            return Ok(Ok(LinkMethod::Eoa));
        }
        let rpc = self
            .rpcs
            .get(&msg.chain_id)
            .ok_or(LinkError::NoRpc(msg.chain_id))?;
        let rpc_err = |source| LinkError::Rpc {
            chain_id: msg.chain_id,
            address: msg.address,
            source,
        };
        let code = rpc
            .code(msg.address, BlockId::latest())
            .await
            .map_err(rpc_err)?;
        if code.is_empty() {
            return Ok(Err(match recovered {
                Some(other) => Refused::new(
                    LinkRefusal::WrongSigner,
                    format!("the signature was made by {other}, not by {}", msg.address),
                ),
                None if sig_bytes.len() != 65 => Refused::new(
                    LinkRefusal::MalformedSignature,
                    format!(
                        "{} bytes: an account signature has 65, and {} is not a contract",
                        sig_bytes.len(),
                        msg.address
                    ),
                ),
                None => Refused::new(
                    LinkRefusal::WrongSigner,
                    "no signer can be recovered from the signature",
                ),
            }));
        }
        let call = IERC1271::isValidSignatureCall {
            hash: eip191_hash_message(msg.text.as_bytes()),
            signature: Bytes::from(sig_bytes),
        };
        let answer = match rpc
            .call(
                msg.address,
                Bytes::from(call.abi_encode()),
                BlockId::latest(),
            )
            .await
        {
            Ok(a) => a,
            Err(RpcError::Rejected { message, .. }) => {
                return Ok(Err(Refused::new(
                    LinkRefusal::WrongSigner,
                    format!(
                        "contract wallet {} rejected the signature: {message}",
                        msg.address
                    ),
                )));
            }
            Err(e) => return Err(rpc_err(e)),
        };
        let valid = IERC1271::isValidSignatureCall::abi_decode_returns(&answer)
            .is_ok_and(|v: FixedBytes<4>| v.0 == ERC1271_MAGIC);
        Ok(if valid {
            Ok(LinkMethod::Erc1271)
        } else {
            Err(Refused::new(
                LinkRefusal::WrongSigner,
                format!(
                    "contract wallet {} did not return the ERC-1271 magic value",
                    msg.address
                ),
            ))
        })
    }

    /// Removes `user`'s link of `address`; `false` if there was none.
    pub async fn unlink(&self, user: Uuid, address: Address) -> Result<bool, LinkError> {
        Ok(self.store.unlink(user, address).await?)
    }
}
