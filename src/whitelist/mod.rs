//! Whitelists (issue 11, the second seed's flows 2 and 3): a creator opens a list with an
//! access rule, a window and an optional capacity; users ask for a place and are granted or
//! refused with the reason and the access decision; a closed list exports as CSV and as an
//! allowlist in OpenZeppelin's `StandardMerkleTree` format. The list rules live in SQL
//! (`tw_whitelist_request`: one decision for the job, the user's SQL door and the CLI); the
//! rule is evaluated by the access area's tree evaluation.
//!
//! | module | concern |
//! |---|---|
//! | [`store`] | the `whitelists` and `whitelist_entries` tables, through the SQL functions |
//! | [`merkle`] | `StandardMerkleTree` for `(address, uint256)`: root, proofs, dump |
//! | [`export`] | CSV, the tree dump and the root-and-proofs allowlist of a closed list |
//! | [`job`] | the `request_whitelist` job handler |
//! | [`cli`] | `tokenwarden whitelist open|close|list|export` |

pub mod cli;
pub mod export;
pub mod job;
pub mod merkle;
pub mod store;

pub use job::RequestWhitelistHandler;
pub use store::{
    ListStatus, OpenRequest, Place, PlaceRefusal, PlaceStatus, Placement, Whitelist,
    WhitelistError, WhitelistStore,
};
