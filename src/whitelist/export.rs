//! A list's granted places as a creator takes them away: CSV for people, and an allowlist a
//! mint contract checks — the `StandardMerkleTree` dump (for `@openzeppelin/merkle-tree`) or
//! the root with one proof per address (for a dapp that hands each minter their proof).

use alloy::primitives::B256;
use serde::Serialize;
use uuid::Uuid;

use super::merkle::{EmptyTree, StandardTree, TreeDump};
use super::store::{ListStatus, Place, Whitelist};

/// Why an allowlist cannot be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A root of an open list would change with the next grant: close it first.
    #[error(
        "whitelist {0} is still open: close it first (its root would change with the next place)"
    )]
    StillOpen(Uuid),
    #[error("whitelist {id}: {source}")]
    Empty {
        id: Uuid,
        #[source]
        source: EmptyTree,
    },
}

/// `address,amount,user_id,granted_at`, one line per place, by address.
pub fn csv(places: &[Place]) -> String {
    let mut out = String::from("address,amount,user_id,granted_at\n");
    for p in places {
        out.push_str(&format!(
            "{},{},{},{}\n",
            p.address.to_checksum(None),
            p.amount,
            p.user_id,
            p.decided_at.to_rfc3339()
        ));
    }
    out
}

/// The root and each address's proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Allowlist {
    pub whitelist_id: Uuid,
    pub root: B256,
    pub leaf_encoding: [&'static str; 2],
    pub entries: Vec<AllowlistEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllowlistEntry {
    /// Checksummed.
    pub address: String,
    /// Decimal uint256.
    pub amount: String,
    pub proof: Vec<B256>,
}

fn tree(list: &Whitelist, places: &[Place]) -> Result<StandardTree, ExportError> {
    if list.status != ListStatus::Closed {
        return Err(ExportError::StillOpen(list.id));
    }
    let values: Vec<_> = places.iter().map(|p| (p.address, p.amount)).collect();
    StandardTree::build(&values).map_err(|source| ExportError::Empty {
        id: list.id,
        source,
    })
}

/// The `StandardMerkleTree.dump()` JSON of a closed list.
pub fn dump(list: &Whitelist, places: &[Place]) -> Result<TreeDump, ExportError> {
    Ok(tree(list, places)?.dump())
}

/// The root and proofs of a closed list.
pub fn allowlist(list: &Whitelist, places: &[Place]) -> Result<Allowlist, ExportError> {
    let t = tree(list, places)?;
    Ok(Allowlist {
        whitelist_id: list.id,
        root: t.root(),
        leaf_encoding: ["address", "uint256"],
        entries: t
            .entries()
            .map(|(a, v, proof)| AllowlistEntry {
                address: a.to_checksum(None),
                amount: v.to_string(),
                proof,
            })
            .collect(),
    })
}
