//! OpenZeppelin's `StandardMerkleTree` for `(address, uint256)` leaves, as
//! `@openzeppelin/merkle-tree` 1.x builds it (`src/core.ts`, `src/merkletree.ts`), so a mint
//! contract checks our proofs with OpenZeppelin's `MerkleProof` and
//! `StandardMerkleTree.load(dump)` reads our dump:
//!
//! - leaf = `keccak256(bytes.concat(keccak256(abi.encode(address, amount))))` (double hash:
//!   no 64-byte leaf can pass for an inner node);
//! - leaves sorted by hash (the library's default `sortLeaves: true`);
//! - a complete binary tree in an array: leaf `i` of the sorted order at `len - 1 - i`, node
//!   `i`'s children at `2i + 1` and `2i + 2`, each inner node `keccak256` of its children
//!   sorted (commutative, as `MerkleProof` expects);
//! - a proof is the siblings from the leaf up to the root.
//!
//! No crate builds this exact layout (the `rs_merkle` family orders and pads differently), so
//! it is written here with alloy's keccak and ABI encoding; a test holds it to the root of the
//! library's README example.

use alloy::primitives::{Address, B256, U256, keccak256};
use alloy::sol_types::SolValue;
use serde::Serialize;

/// The leaf of `(address, amount)`.
pub fn leaf_hash(address: Address, amount: U256) -> B256 {
    keccak256(keccak256((address, amount).abi_encode_params()))
}

/// `keccak256` of the two nodes in ascending byte order.
fn node_hash(a: &B256, b: &B256) -> B256 {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut buf = [0u8; 64];
    buf[..32].copy_from_slice(lo.as_slice());
    buf[32..].copy_from_slice(hi.as_slice());
    keccak256(buf)
}

/// A tree needs at least one leaf (the library refuses an empty one too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a Merkle tree needs at least one leaf (the list has no granted place)")]
pub struct EmptyTree;

/// A built tree: its nodes and where each value's leaf sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandardTree {
    tree: Vec<B256>,
    /// In the order given: (address, amount, index of its leaf in `tree`).
    values: Vec<(Address, U256, usize)>,
}

/// `StandardMerkleTree.dump()`'s JSON: `{format, leafEncoding, tree, values}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TreeDump {
    pub format: &'static str,
    pub leaf_encoding: [&'static str; 2],
    pub tree: Vec<B256>,
    pub values: Vec<DumpValue>,
}

/// One value of the dump: `[address, amount]` (checksummed address, decimal amount) and its
/// leaf's index in `tree`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DumpValue {
    pub value: (String, String),
    pub tree_index: usize,
}

impl StandardTree {
    /// Builds the tree of `values` (kept in this order in the dump).
    pub fn build(values: &[(Address, U256)]) -> Result<Self, EmptyTree> {
        if values.is_empty() {
            return Err(EmptyTree);
        }
        let mut hashed: Vec<(usize, B256)> = values
            .iter()
            .enumerate()
            .map(|(i, (a, v))| (i, leaf_hash(*a, *v)))
            .collect();
        hashed.sort_by_key(|x| x.1);
        let len = 2 * values.len() - 1;
        let mut tree = vec![B256::ZERO; len];
        let mut at = vec![0usize; values.len()];
        for (leaf_index, (value_index, hash)) in hashed.iter().enumerate() {
            tree[len - 1 - leaf_index] = *hash;
            at[*value_index] = len - 1 - leaf_index;
        }
        for i in (0..len - values.len()).rev() {
            tree[i] = node_hash(&tree[2 * i + 1], &tree[2 * i + 2]);
        }
        Ok(StandardTree {
            tree,
            values: values
                .iter()
                .zip(at)
                .map(|((a, v), i)| (*a, *v, i))
                .collect(),
        })
    }

    pub fn root(&self) -> B256 {
        self.tree[0]
    }

    /// The values in the order given, with their proofs.
    pub fn entries(&self) -> impl Iterator<Item = (Address, U256, Vec<B256>)> + '_ {
        self.values
            .iter()
            .map(|(a, v, i)| (*a, *v, self.proof_at(*i)))
    }

    fn proof_at(&self, mut index: usize) -> Vec<B256> {
        let mut proof = Vec::new();
        while index > 0 {
            let sibling = if index % 2 == 1 { index + 1 } else { index - 1 };
            proof.push(self.tree[sibling]);
            index = (index - 1) / 2;
        }
        proof
    }

    /// The JSON `StandardMerkleTree.load` accepts.
    pub fn dump(&self) -> TreeDump {
        TreeDump {
            format: "standard-v1",
            leaf_encoding: ["address", "uint256"],
            tree: self.tree.clone(),
            values: self
                .values
                .iter()
                .map(|(a, v, i)| DumpValue {
                    value: (a.to_checksum(None), v.to_string()),
                    tree_index: *i,
                })
                .collect(),
        }
    }
}

/// What `MerkleProof.verify` computes: folds the proof into the leaf and compares with `root`.
pub fn verify(root: B256, leaf: B256, proof: &[B256]) -> bool {
    proof.iter().fold(leaf, |acc, p| node_hash(&acc, p)) == root
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(b: u8) -> Address {
        Address::repeat_byte(b)
    }

    /// The @openzeppelin/merkle-tree README's example values
    /// (`[["0x1111…1111", "5000000000000000000"], ["0x2222…2222", "2500000000000000000"]]`,
    /// `["address", "uint256"]`): the library gives root 0xd4de…bd77, and the proof of 0x1111…
    /// is the other leaf 0xb92c…cafc (the values published with that example).
    #[test]
    fn the_readme_example_has_the_librarys_root_and_proof() {
        let five = U256::from(5_000_000_000_000_000_000u128);
        let two_and_a_half = U256::from(2_500_000_000_000_000_000u128);
        let t = StandardTree::build(&[(addr(0x11), five), (addr(0x22), two_and_a_half)]).unwrap();
        assert_eq!(
            format!("{:#x}", leaf_hash(addr(0x11), five)),
            "0xeb02c421cfa48976e66dfb29120745909ea3a0f843456c263cf8f1253483e283"
        );
        assert_eq!(
            format!("{:#x}", t.root()),
            "0xd4dee0beab2d53f2cc83e567171bd2820e49898130a22622b10ead383e90bd77"
        );
        let (a, _, proof) = t.entries().next().unwrap();
        assert_eq!(a, addr(0x11));
        assert_eq!(
            proof.iter().map(|p| format!("{p:#x}")).collect::<Vec<_>>(),
            ["0xb92c48e9d7abe27fd8dfd6b5dfdbfb1c9a463f80c712b66f3a5180a090cccafc"]
        );
    }

    #[test]
    fn every_proof_verifies_and_a_changed_amount_does_not() {
        for n in 1..=17u8 {
            let values: Vec<_> = (1..=n).map(|i| (addr(i), U256::from(i))).collect();
            let t = StandardTree::build(&values).unwrap();
            let dump = t.dump();
            assert_eq!(dump.tree.len(), 2 * n as usize - 1);
            for (a, v, proof) in t.entries() {
                assert!(verify(t.root(), leaf_hash(a, v), &proof), "n={n} {a}");
                assert!(!verify(t.root(), leaf_hash(a, v + U256::from(1)), &proof));
            }
        }
        assert_eq!(StandardTree::build(&[]), Err(EmptyTree));
    }

    /// The layout of `makeMerkleTree`: leaves sorted by hash from the array's end, values
    /// pointing at their own leaf.
    #[test]
    fn the_dump_points_each_value_at_its_leaf_in_the_librarys_layout() {
        let values: Vec<_> = (1..=5u8).map(|i| (addr(i), U256::from(1))).collect();
        let t = StandardTree::build(&values).unwrap();
        let dump = t.dump();
        let mut leaves: Vec<_> = values.iter().map(|(a, v)| leaf_hash(*a, *v)).collect();
        leaves.sort();
        for (i, l) in leaves.iter().enumerate() {
            assert_eq!(dump.tree[dump.tree.len() - 1 - i], *l);
        }
        for (v, (a, amount)) in dump.values.iter().zip(&values) {
            assert_eq!(dump.tree[v.tree_index], leaf_hash(*a, *amount));
        }
        let json = serde_json::to_value(&dump).unwrap();
        assert_eq!(json["format"], "standard-v1");
        assert_eq!(
            json["leafEncoding"],
            serde_json::json!(["address", "uint256"])
        );
        assert_eq!(json["values"][0]["value"][1], "1");
        assert!(json["values"][0]["treeIndex"].is_u64());
    }
}
