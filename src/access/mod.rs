//! Access checks: "may this user use this feature of this creator now?" (issue 10, the second
//! seed's TokenVerificationService and friends). So far: wallets a user has proven with
//! Sign-In with Ethereum (EIP-4361).
//!
//! | module | concern |
//! |---|---|
//! | [`refusal`] | the reasons a wallet link is refused |
//! | [`message`] | EIP-4361 messages (parsed by the `siwe` crate) held to domain, chain and time |
//! | [`wallets`] | the `user_wallets`, `access_siwe_nonces` and `tw_access_settings` tables |
//! | [`link`] | link a wallet: message, nonce, signature (EOA recovery or ERC-1271), store |
//! | [`jobs`] | the `link_wallet` and `unlink_wallet` job handlers |

pub mod jobs;
pub mod link;
pub mod message;
pub mod refusal;
pub mod wallets;

pub use link::{LinkError, LinkOutcome, LinkRequest, WalletLinker};
pub use refusal::{LinkRefusal, Refused};
pub use wallets::{LinkMethod, Nonce, WalletLink, WalletStore, WalletStoreError};
