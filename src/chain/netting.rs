//! The pure half of committing a batch: its transfers netted into one balance delta per
//! (token, holder) (ERC-1155: per (token, id, holder), plus one supply delta per id), one final
//! owner per ERC-721 id, and the holders whose holdings changed.
//! No database here, so these rules are unit-tested on their own; [`super::store`] writes the
//! result. Netting first means the balance upsert gets one row per holder instead of two per
//! transfer, and an id moved several times in a batch is written once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use alloy::primitives::{Address, U256};

use super::decode::{MultiTransferRow, TransferRow, addr_hex};

/// Holders whose balance or NFTs changed, per token, with the block of the change: what
/// [`super::notify`] announces after a commit or a reorg undo.
///
/// Keyed by [`Address`], whose byte order is the order of the lowercase hex that is stored and
/// announced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub block: u64,
    pub holders: BTreeMap<Address, BTreeSet<Address>>,
    /// The changes undo dropped blocks (a reorg): announced so that listeners re-evaluate
    /// instead of trusting what they concluded from those blocks.
    pub reorg: bool,
}

impl Changes {
    /// No change yet, as of `block`.
    pub(crate) fn at(block: u64) -> Changes {
        Changes {
            block,
            holders: BTreeMap::new(),
            reorg: false,
        }
    }

    /// Records a transfer of a non-zero amount: both sides changed, except the zero address
    /// (mint and burn) and a transfer to oneself.
    pub(crate) fn add(&mut self, token: Address, from: Address, to: Address) {
        if from == to {
            return;
        }
        let set = self.holders.entry(token).or_default();
        for a in [from, to] {
            if !a.is_zero() {
                set.insert(a);
            }
        }
    }
}

/// The net ERC-20 change of one holder's balance in a batch. Never zero: holders whose
/// credits and debits cancel out are left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delta {
    Credit(U256),
    Debit(U256),
}

impl fmt::Display for Delta {
    /// Signed decimal, as Postgres `numeric` reads it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Delta::Credit(v) => write!(f, "{v}"),
            Delta::Debit(v) => write!(f, "-{v}"),
        }
    }
}

/// One holder's net balance change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BalanceDelta {
    pub token: Address,
    pub holder: Address,
    pub delta: Delta,
}

/// The owner of an ERC-721 id after a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OwnerChange {
    pub token: Address,
    pub token_id: U256,
    /// `None`: the id was burned (its last transfer went to the zero address).
    pub owner: Option<Address>,
    /// The block of the id's last transfer in the batch.
    pub block: u64,
}

/// A batch netted: what is written besides the transfer rows themselves. `deltas` and
/// `owners` are in no particular order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Netted {
    pub deltas: Vec<BalanceDelta>,
    pub owners: Vec<OwnerChange>,
    pub changes: Changes,
}

/// Why a batch cannot be netted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NettingError {
    #[error("the transfers of {holder:#x} for token {token:#x} in one batch overflow uint256")]
    Overflow { token: Address, holder: Address },
    #[error("the mints or burns of id {id} of token {token:#x} in one batch overflow uint256")]
    SupplyOverflow { token: Address, id: U256 },
}

/// The signed difference of a sum of credits and a sum of debits; `None` when they cancel.
fn signed(plus: U256, minus: U256) -> Option<Delta> {
    match plus.cmp(&minus) {
        std::cmp::Ordering::Equal => None,
        std::cmp::Ordering::Greater => Some(Delta::Credit(plus - minus)),
        std::cmp::Ordering::Less => Some(Delta::Debit(minus - plus)),
    }
}

/// One holder's net change of one ERC-1155 id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MultiDelta {
    pub token: Address,
    pub token_id: U256,
    pub holder: Address,
    pub delta: Delta,
}

/// The net change of one ERC-1155 id's supply (mints − burns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SupplyDelta {
    pub token: Address,
    pub token_id: U256,
    pub delta: Delta,
}

/// A batch's ERC-1155 transfers netted (in no particular order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct MultiNetted {
    pub deltas: Vec<MultiDelta>,
    pub supply: Vec<SupplyDelta>,
}

/// Nets ERC-1155 `rows` (one batch) as [`net`] does ERC-20 ones, per (token, id, holder):
/// the zero address never gets a balance, mints add to and burns take from the id's supply,
/// zero-value and self transfers change nothing. The holders that changed go into `changes`.
pub(crate) fn net_multi(
    rows: &[MultiTransferRow],
    changes: &mut Changes,
) -> Result<MultiNetted, NettingError> {
    // (credited, debited) per (token, id, holder), and (minted, burned) per (token, id).
    let mut sums: HashMap<(Address, U256, Address), (U256, U256)> = HashMap::new();
    let mut supply: HashMap<(Address, U256), (U256, U256)> = HashMap::new();
    for r in rows {
        if r.value.is_zero() || r.from == r.to {
            continue;
        }
        changes.add(r.token, r.from, r.to);
        let overflow = |holder| NettingError::Overflow {
            token: r.token,
            holder,
        };
        let supply_overflow = || NettingError::SupplyOverflow {
            token: r.token,
            id: r.token_id,
        };
        if r.from.is_zero() {
            let s = supply.entry((r.token, r.token_id)).or_default();
            s.0 = s.0.checked_add(r.value).ok_or_else(supply_overflow)?;
        } else {
            let s = sums.entry((r.token, r.token_id, r.from)).or_default();
            s.1 = s.1.checked_add(r.value).ok_or_else(|| overflow(r.from))?;
        }
        if r.to.is_zero() {
            let s = supply.entry((r.token, r.token_id)).or_default();
            s.1 = s.1.checked_add(r.value).ok_or_else(supply_overflow)?;
        } else {
            let s = sums.entry((r.token, r.token_id, r.to)).or_default();
            s.0 = s.0.checked_add(r.value).ok_or_else(|| overflow(r.to))?;
        }
    }
    Ok(MultiNetted {
        deltas: sums
            .into_iter()
            .filter_map(|((token, token_id, holder), (plus, minus))| {
                Some(MultiDelta {
                    token,
                    token_id,
                    holder,
                    delta: signed(plus, minus)?,
                })
            })
            .collect(),
        supply: supply
            .into_iter()
            .filter_map(|((token, token_id), (plus, minus))| {
                Some(SupplyDelta {
                    token,
                    token_id,
                    delta: signed(plus, minus)?,
                })
            })
            .collect(),
    })
}

/// The block of `holder`'s first debit of id `token_id` of ERC-1155 `token` (lowercase hex and
/// decimal, as stored) in `rows`.
pub(crate) fn first_multi_debit_block(
    rows: &[MultiTransferRow],
    token: &str,
    token_id: &str,
    holder: &str,
) -> Option<u64> {
    rows.iter()
        .find(|r| {
            addr_hex(&r.token) == token
                && addr_hex(&r.from) == holder
                && r.token_id.to_string() == token_id
        })
        .map(|r| r.block_number)
}

/// Nets `rows` (one batch, in chain order) whose last block is `last_block`. ERC-20 rows
/// (no token id) add to the receiver's and subtract from the sender's balance, the zero
/// address excepted; zero-value and self transfers change nothing. ERC-721 rows set the id's
/// owner to the receiver, so the last transfer of an id wins.
pub(crate) fn net(rows: &[TransferRow], last_block: u64) -> Result<Netted, NettingError> {
    let mut changes = Changes::at(last_block);
    // (credited, debited) per (token, holder).
    let mut sums: HashMap<(Address, Address), (U256, U256)> = HashMap::new();
    // Final (owner, block) per (token, id).
    let mut owners: HashMap<(Address, U256), (Address, u64)> = HashMap::new();
    for r in rows {
        if !r.value.is_zero() {
            changes.add(r.token, r.from, r.to);
        }
        match r.token_id {
            None => {
                if r.value.is_zero() || r.from == r.to {
                    continue;
                }
                let overflow = |holder| NettingError::Overflow {
                    token: r.token,
                    holder,
                };
                if !r.from.is_zero() {
                    let s = sums.entry((r.token, r.from)).or_default();
                    s.1 = s.1.checked_add(r.value).ok_or_else(|| overflow(r.from))?;
                }
                if !r.to.is_zero() {
                    let s = sums.entry((r.token, r.to)).or_default();
                    s.0 = s.0.checked_add(r.value).ok_or_else(|| overflow(r.to))?;
                }
            }
            Some(id) => {
                owners.insert((r.token, id), (r.to, r.block_number));
            }
        }
    }
    let deltas = sums
        .into_iter()
        .filter_map(|((token, holder), (plus, minus))| {
            Some(BalanceDelta {
                token,
                holder,
                delta: signed(plus, minus)?,
            })
        })
        .collect();
    let owners = owners
        .into_iter()
        .map(|((token, token_id), (owner, block))| OwnerChange {
            token,
            token_id,
            owner: (!owner.is_zero()).then_some(owner),
            block,
        })
        .collect();
    Ok(Netted {
        deltas,
        owners,
        changes,
    })
}

/// The block of `holder`'s first ERC-20 debit of `token` (both lowercase hex, as stored) in
/// `rows`: where the history missing behind a negative balance shows.
pub(crate) fn first_debit_block(rows: &[TransferRow], token: &str, holder: &str) -> Option<u64> {
    rows.iter()
        .find(|r| {
            r.token_id.is_none() && addr_hex(&r.token) == token && addr_hex(&r.from) == holder
        })
        .map(|r| r.block_number)
}

#[cfg(test)]
mod tests {
    use alloy::primitives::{Address, B256, U256};

    use super::*;

    fn a(n: u8) -> Address {
        Address::with_last_byte(n)
    }

    fn row(block: u64, token: u8, from: Address, to: Address, value: u64) -> TransferRow {
        TransferRow {
            block_number: block,
            block_hash: B256::with_last_byte(block as u8),
            log_index: 0,
            tx_hash: B256::ZERO,
            token: a(token),
            from,
            to,
            value: U256::from(value),
            token_id: None,
        }
    }

    fn nft(block: u64, token: u8, from: Address, to: Address, id: u64) -> TransferRow {
        TransferRow {
            token_id: Some(U256::from(id)),
            ..row(block, token, from, to, 1)
        }
    }

    fn sorted_deltas(n: &Netted) -> Vec<(Address, Address, Delta)> {
        let mut d: Vec<_> = n
            .deltas
            .iter()
            .map(|d| (d.token, d.holder, d.delta))
            .collect();
        d.sort_by_key(|(t, h, _)| (*t, *h));
        d
    }

    #[test]
    fn erc20_transfers_net_to_one_delta_per_holder() {
        let z = Address::ZERO;
        let rows = [
            row(1, 9, z, a(1), 100),   // mint 100 to 1
            row(1, 9, a(1), a(2), 30), // 1 → 2: 30
            row(2, 9, a(2), a(1), 30), // 2 → 1: 30 (2 nets to zero)
            row(2, 9, a(1), z, 10),    // burn 10 from 1
            row(2, 9, a(3), a(3), 5),  // self transfer: nothing
            row(2, 9, a(4), a(5), 0),  // zero value: nothing
        ];
        let n = net(&rows, 2).unwrap();
        assert_eq!(
            sorted_deltas(&n),
            vec![(a(9), a(1), Delta::Credit(U256::from(90u64)))]
        );
        assert!(n.owners.is_empty());
        assert_eq!(n.changes.block, 2);
        // 2 changed even though it nets to zero; 3 (self) and 4, 5 (zero value) did not.
        let holders: Vec<_> = n.changes.holders[&a(9)].iter().copied().collect();
        assert_eq!(holders, vec![a(1), a(2)]);
    }

    #[test]
    fn debits_are_negative_deltas() {
        let rows = [row(5, 9, a(1), a(2), 7)];
        let n = net(&rows, 5).unwrap();
        assert_eq!(
            sorted_deltas(&n),
            vec![
                (a(9), a(1), Delta::Debit(U256::from(7u64))),
                (a(9), a(2), Delta::Credit(U256::from(7u64))),
            ]
        );
        assert_eq!(Delta::Debit(U256::from(7u64)).to_string(), "-7");
        assert_eq!(Delta::Credit(U256::from(7u64)).to_string(), "7");
    }

    #[test]
    fn the_last_transfer_of_an_nft_wins_and_burns_have_no_owner() {
        let z = Address::ZERO;
        let rows = [
            nft(1, 8, z, a(1), 1),
            nft(2, 8, a(1), a(2), 1),
            nft(2, 8, z, a(1), 2),
            nft(3, 8, a(1), z, 2),
        ];
        let n = net(&rows, 3).unwrap();
        assert!(n.deltas.is_empty());
        let mut owners = n.owners.clone();
        owners.sort_by_key(|o| o.token_id);
        assert_eq!(
            owners,
            vec![
                OwnerChange {
                    token: a(8),
                    token_id: U256::from(1u64),
                    owner: Some(a(2)),
                    block: 2
                },
                OwnerChange {
                    token: a(8),
                    token_id: U256::from(2u64),
                    owner: None,
                    block: 3
                },
            ]
        );
        let holders: Vec<_> = n.changes.holders[&a(8)].iter().copied().collect();
        assert_eq!(holders, vec![a(1), a(2)]);
    }

    fn multi(block: u64, from: Address, to: Address, id: u64, value: u64) -> MultiTransferRow {
        MultiTransferRow {
            block_number: block,
            block_hash: B256::with_last_byte(block as u8),
            log_index: 0,
            position: 0,
            tx_hash: B256::ZERO,
            token: a(7),
            operator: a(99),
            from,
            to,
            token_id: U256::from(id),
            value: U256::from(value),
        }
    }

    #[test]
    fn erc1155_transfers_net_per_id_and_holder_with_supply() {
        let z = Address::ZERO;
        let rows = [
            multi(1, z, a(1), 5, 100),   // mint 100 of id 5 to 1
            multi(1, z, a(1), 6, 3),     // mint 3 of id 6 to 1
            multi(1, a(1), a(2), 5, 40), // 1 → 2: 40 of id 5
            multi(2, a(2), z, 5, 10),    // burn 10 of id 5 from 2
            multi(2, a(1), a(1), 6, 3),  // self: nothing
            multi(2, a(3), a(4), 6, 0),  // zero value: nothing
            multi(2, a(1), a(2), 6, 3),  // 1 → 2: 3 of id 6
            multi(2, a(2), a(1), 6, 3),  // and back: 1 and 2 net to zero on id 6
        ];
        let mut changes = Changes::at(2);
        let n = net_multi(&rows, &mut changes).unwrap();
        let mut d: Vec<_> = n
            .deltas
            .iter()
            .map(|d| (d.token_id, d.holder, d.delta))
            .collect();
        d.sort_by_key(|(i, h, _)| (*i, *h));
        let u = |v: u64| U256::from(v);
        assert_eq!(
            d,
            vec![
                (u(5), a(1), Delta::Credit(u(60))),
                (u(5), a(2), Delta::Credit(u(30))),
                (u(6), a(1), Delta::Credit(u(3))),
            ]
        );
        let mut s: Vec<_> = n.supply.iter().map(|s| (s.token_id, s.delta)).collect();
        s.sort_by_key(|(i, _)| *i);
        assert_eq!(
            s,
            vec![(u(5), Delta::Credit(u(90))), (u(6), Delta::Credit(u(3)))]
        );
        let holders: Vec<_> = changes.holders[&a(7)].iter().copied().collect();
        assert_eq!(holders, vec![a(1), a(2)]);
        let (t, h) = (addr_hex(&a(7)), addr_hex(&a(2)));
        assert_eq!(first_multi_debit_block(&rows, &t, "5", &h), Some(2));
        assert_eq!(first_multi_debit_block(&rows, &t, "7", &h), None);
    }

    #[test]
    fn an_overflowing_erc1155_mint_names_the_id() {
        let mut big = multi(1, Address::ZERO, a(1), 5, 0);
        big.value = U256::MAX;
        assert_eq!(
            net_multi(&[big.clone(), big], &mut Changes::at(1)),
            Err(NettingError::SupplyOverflow {
                token: a(7),
                id: U256::from(5u8)
            })
        );
    }

    #[test]
    fn an_overflowing_batch_names_the_holder() {
        let big = TransferRow {
            value: U256::MAX,
            ..row(1, 9, Address::ZERO, a(1), 0)
        };
        assert_eq!(
            net(&[big.clone(), big], 1),
            Err(NettingError::Overflow {
                token: a(9),
                holder: a(1)
            })
        );
    }

    #[test]
    fn the_first_debit_block_skips_credits_and_nfts() {
        let rows = [
            row(1, 9, a(2), a(1), 5),
            nft(2, 9, a(1), a(2), 1),
            row(3, 9, a(1), a(2), 5),
            row(4, 9, a(1), a(2), 5),
        ];
        let (t, h) = (addr_hex(&a(9)), addr_hex(&a(1)));
        assert_eq!(first_debit_block(&rows, &t, &h), Some(3));
        assert_eq!(first_debit_block(&rows, &t, &addr_hex(&a(7))), None);
    }
}
