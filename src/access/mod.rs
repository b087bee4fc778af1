//! Access checks: "may this user use this feature of this creator now?" (issue 10, the second
//! seed's TokenVerificationService and friends): wallets a user has proven with Sign-In with
//! Ethereum (EIP-4361), rules per creator and feature, and decisions with their evidence. The
//! rules' validation and the evaluation live in SQL (`tw_access_check_rule`,
//! `tw_access_evaluate`): one evaluation for the SQL, queue and CLI doors.
//!
//! | module | concern |
//! |---|---|
//! | [`refusal`] | the reasons a wallet link is refused |
//! | [`message`] | EIP-4361 messages (parsed by the `siwe` crate) held to domain, chain and time |
//! | [`wallets`] | the `user_wallets`, `access_siwe_nonces` and `tw_access_settings` tables |
//! | [`link`] | link a wallet: message, nonce, signature (EOA recovery or ERC-1271), store |
//! | [`settings`] | the `[access]` values SQL enforces (`tw_access_settings`) |
//! | [`rules`] | set, replace, delete, list rules; their change log |
//! | [`decision`] | the decision and its evidence, typed |
//! | [`heads`] | each chain's head, stored for the staleness measure |
//! | [`checks`] | the Rust door to the evaluation, single and batch |
//! | [`cache`] | decisions cached in memory and Redis, valid while the user's and rule's epochs hold |
//! | [`invalidation`] | balance-change and rule-change listeners that bump those epochs |
//! | [`service`] | the queue door's checks: cache, then evaluation |
//! | [`jobs`] | the `link_wallet` and `unlink_wallet` job handlers |
//! | [`check_job`] | the `verify_access` job handler |
//! | [`audit`] | every decision recorded in `access_checks`; its retention and storm rule |
//! | [`rule_job`] | the `access_rule` job handler |
//! | [`transitions`] | `access_grants` and `access_events`: who passes each rule, every change |
//! | [`monitor`] | the leader that turns announcements into transitions and publishes them |
//! | [`recheck`] | the scheduled full re-check (`access_recheck`), backstop of the monitor |
//! | [`verifiers`] | external verifiers (tomo, alchemy): HTTP, retries, circuit breaker, answers |
//! | [`cli`] | `tokenwarden access rule …`, `access check`, `access wallets` |

pub mod audit;
mod batches;
pub mod cache;
pub mod check_job;
pub mod checks;
pub mod cli;
pub mod decision;
pub mod heads;
pub mod invalidation;
pub mod jobs;
pub mod link;
pub mod message;
pub mod monitor;
pub mod recheck;
pub mod refusal;
pub mod rule_job;
pub mod rules;
pub mod service;
pub mod settings;
pub mod transitions;
pub mod verifiers;
pub mod wallets;

pub use checks::{AccessChecker, CheckError, Question};
pub use decision::{Decision, DenyReason, Evidence, Source};
pub use link::{LinkError, LinkOutcome, LinkRequest, WalletLinker};
pub use refusal::{LinkRefusal, Refused};
pub use rules::{RuleError, RuleStore, StoredRule};
pub use wallets::{LinkMethod, Nonce, WalletLink, WalletStore, WalletStoreError};
