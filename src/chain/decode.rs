//! Transfer logs → transfer rows. ERC-20 and ERC-721 share topic0 but differ in shape (3
//! topics and a 32-byte value vs 4 topics and no data), so the token's configured standard
//! decides the decoder; a log that does not have its token's shape is rejected with a reason,
//! never guessed. ERC-1155 tokens emit `TransferSingle` (one transfer) and `TransferBatch`
//! (one transfer per element of its `ids` / `values` arrays, which must be as long as each
//! other).

use std::collections::HashMap;

use alloy::primitives::{Address, B256, U256};
use alloy::rpc::types::Log;
use alloy::sol;
use alloy::sol_types::SolEvent;

use crate::config::TokenStandard;

sol! {
    /// ERC-20 `Transfer` (3 topics).
    interface IERC20 {
        event Transfer(address indexed from, address indexed to, uint256 value);
        function balanceOf(address owner) external view returns (uint256);
        function decimals() external view returns (uint8);
        function symbol() external view returns (string);
        function name() external view returns (string);
    }
    /// ERC-721 `Transfer` (4 topics).
    interface IERC721 {
        event Transfer(address indexed from, address indexed to, uint256 indexed tokenId);
        function ownerOf(uint256 tokenId) external view returns (address);
    }
    /// ERC-1155 transfers: `TransferSingle` and `TransferBatch` (ids and values in the data).
    interface IERC1155 {
        event TransferSingle(address indexed operator, address indexed from, address indexed to, uint256 id, uint256 value);
        event TransferBatch(address indexed operator, address indexed from, address indexed to, uint256[] ids, uint256[] values);
        function balanceOfBatch(address[] accounts, uint256[] ids) external view returns (uint256[]);
    }
}

/// keccak256("Transfer(address,address,uint256)").
pub const TRANSFER_TOPIC: B256 = IERC20::Transfer::SIGNATURE_HASH;

/// keccak256("TransferSingle(address,address,address,uint256,uint256)").
pub const TRANSFER_SINGLE_TOPIC: B256 = IERC1155::TransferSingle::SIGNATURE_HASH;
/// keccak256("TransferBatch(address,address,address,uint256[],uint256[])").
pub const TRANSFER_BATCH_TOPIC: B256 = IERC1155::TransferBatch::SIGNATURE_HASH;

/// Every topic0 the indexer asks the chain for tokens (factories add their own).
pub const TOKEN_TOPICS: [B256; 3] = [TRANSFER_TOPIC, TRANSFER_SINGLE_TOPIC, TRANSFER_BATCH_TOPIC];

/// One decoded `Transfer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRow {
    pub block_number: u64,
    pub block_hash: B256,
    pub log_index: u64,
    pub tx_hash: B256,
    pub token: Address,
    pub from: Address,
    pub to: Address,
    /// ERC-20 amount; 1 for ERC-721.
    pub value: U256,
    /// ERC-721 token id.
    pub token_id: Option<U256>,
}

/// One ERC-1155 transfer: a `TransferSingle` log, or one element of a `TransferBatch` log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultiTransferRow {
    pub block_number: u64,
    pub block_hash: B256,
    pub log_index: u64,
    /// 0 for `TransferSingle`; the index in the arrays for `TransferBatch`.
    pub position: u32,
    pub tx_hash: B256,
    pub token: Address,
    pub operator: Address,
    pub from: Address,
    pub to: Address,
    pub token_id: U256,
    pub value: U256,
}

/// What one log decodes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// An ERC-20 or ERC-721 `Transfer`.
    Transfer(TransferRow),
    /// The transfers of an ERC-1155 `TransferSingle` (one) or `TransferBatch` (one per id;
    /// none for empty arrays).
    Multi(Vec<MultiTransferRow>),
}

/// A log that was rejected, as kept in `chain_rejected_logs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedLog {
    pub block_number: u64,
    pub block_hash: B256,
    pub log_index: u64,
    pub tx_hash: B256,
    pub token: Address,
    pub topics: Vec<B256>,
    pub data: alloy::primitives::Bytes,
    pub reason: String,
}

impl RejectedLog {
    /// The row to keep for `log` rejected with `e`; `None` when the log lacks the fields that
    /// identify it (the reply is then invalid, not the log) or was marked removed.
    pub fn of(log: &Log, e: &DecodeError) -> Option<RejectedLog> {
        if matches!(e, DecodeError::Removed(_) | DecodeError::Missing(_)) {
            return None;
        }
        Some(RejectedLog {
            block_number: log.block_number?,
            block_hash: log.block_hash?,
            log_index: log.log_index?,
            tx_hash: log.transaction_hash?,
            token: log.address(),
            topics: log.topics().to_vec(),
            data: log.data().data.clone(),
            reason: e.to_string(),
        })
    }
}

/// Why a log was not turned into a row.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DecodeError {
    #[error("log is missing {0}")]
    Missing(&'static str),
    #[error("log from {0} is not a tracked token")]
    Untracked(Address),
    #[error(
        "log of {token} at block {block} index {index} does not match {standard:?} Transfer: {reason}"
    )]
    Shape {
        token: Address,
        block: u64,
        index: u64,
        standard: TokenStandard,
        reason: String,
    },
    #[error("log at block {0} was marked removed")]
    Removed(u64),
}

/// Decodes one RPC log for a token of the given standards map; `None` for a log of a tracked
/// token that is not a transfer event of its standard (e.g. an ERC-1155 token's `Transfer`).
pub fn decode(
    log: &Log,
    tokens: &HashMap<Address, TokenStandard>,
) -> Result<Option<Decoded>, DecodeError> {
    let block_number = log
        .block_number
        .ok_or(DecodeError::Missing("blockNumber"))?;
    if log.removed {
        return Err(DecodeError::Removed(block_number));
    }
    let block_hash = log.block_hash.ok_or(DecodeError::Missing("blockHash"))?;
    let log_index = log.log_index.ok_or(DecodeError::Missing("logIndex"))?;
    let tx_hash = log
        .transaction_hash
        .ok_or(DecodeError::Missing("transactionHash"))?;
    let token = log.address();
    let standard = *tokens.get(&token).ok_or(DecodeError::Untracked(token))?;
    let shape = |reason: String| DecodeError::Shape {
        token,
        block: block_number,
        index: log_index,
        standard,
        reason,
    };
    let topic0 = log.topics().first().copied();
    if standard == TokenStandard::Erc1155 {
        let multi = |position: u32, operator, from, to, token_id, value| MultiTransferRow {
            block_number,
            block_hash,
            log_index,
            position,
            tx_hash,
            token,
            operator,
            from,
            to,
            token_id,
            value,
        };
        return match topic0 {
            Some(TRANSFER_SINGLE_TOPIC) => {
                let t = IERC1155::TransferSingle::decode_log_data(log.data())
                    .map_err(|e| shape(e.to_string()))?;
                Ok(Some(Decoded::Multi(vec![multi(
                    0, t.operator, t.from, t.to, t.id, t.value,
                )])))
            }
            Some(TRANSFER_BATCH_TOPIC) => {
                let t = IERC1155::TransferBatch::decode_log_data(log.data())
                    .map_err(|e| shape(e.to_string()))?;
                if t.ids.len() != t.values.len() {
                    return Err(shape(format!(
                        "TransferBatch has {} ids but {} values",
                        t.ids.len(),
                        t.values.len()
                    )));
                }
                let rows = t
                    .ids
                    .iter()
                    .zip(&t.values)
                    .enumerate()
                    .map(|(i, (id, value))| {
                        let position = u32::try_from(i)
                            .map_err(|_| shape(format!("TransferBatch has {} ids", t.ids.len())))?;
                        Ok(multi(position, t.operator, t.from, t.to, *id, *value))
                    })
                    .collect::<Result<Vec<_>, DecodeError>>()?;
                Ok(Some(Decoded::Multi(rows)))
            }
            _ => Ok(None),
        };
    }
    if topic0 != Some(TRANSFER_TOPIC) {
        return Ok(None);
    }
    let (from, to, value, token_id) = match standard {
        TokenStandard::Erc20 => {
            let t =
                IERC20::Transfer::decode_log_data(log.data()).map_err(|e| shape(e.to_string()))?;
            (t.from, t.to, t.value, None)
        }
        TokenStandard::Erc721 => {
            let t =
                IERC721::Transfer::decode_log_data(log.data()).map_err(|e| shape(e.to_string()))?;
            (t.from, t.to, U256::from(1u8), Some(t.tokenId))
        }
        TokenStandard::Erc1155 => return Ok(None),
    };
    Ok(Some(Decoded::Transfer(TransferRow {
        block_number,
        block_hash,
        log_index,
        tx_hash,
        token,
        from,
        to,
        value,
        token_id,
    })))
}

/// Lowercase 0x hex, the form every chain table stores.
pub fn addr_hex(a: &Address) -> String {
    format!("{a:#x}")
}

/// Lowercase 0x hex of a 32-byte hash.
pub fn hash_hex(h: &B256) -> String {
    format!("{h:#x}")
}

#[cfg(test)]
mod tests {
    use alloy::primitives::{Address, B256, U256};
    use alloy::rpc::types::Log;
    use alloy::sol_types::SolEvent;

    use super::*;

    fn log_of(token: Address, data: alloy::primitives::LogData) -> Log {
        Log {
            inner: alloy::primitives::Log {
                address: token,
                data,
            },
            block_hash: Some(B256::with_last_byte(7)),
            block_number: Some(7),
            block_timestamp: None,
            transaction_hash: Some(B256::with_last_byte(8)),
            transaction_index: Some(0),
            log_index: Some(3),
            removed: false,
        }
    }

    fn a(n: u8) -> Address {
        Address::with_last_byte(n)
    }

    fn batch(ids: &[u64], values: &[u64]) -> Log {
        let e = IERC1155::TransferBatch {
            operator: a(1),
            from: a(2),
            to: a(3),
            ids: ids.iter().map(|i| U256::from(*i)).collect(),
            values: values.iter().map(|v| U256::from(*v)).collect(),
        };
        log_of(a(9), e.encode_log_data())
    }

    #[test]
    fn a_transfer_batch_is_one_row_per_id_with_its_position() {
        let tokens = HashMap::from([(a(9), TokenStandard::Erc1155)]);
        let Some(Decoded::Multi(rows)) = decode(&batch(&[5, 6], &[10, 20]), &tokens).unwrap()
        else {
            panic!("a TransferBatch decodes to ERC-1155 rows");
        };
        let got: Vec<_> = rows
            .iter()
            .map(|r| (r.position, r.token_id, r.value, r.from, r.to, r.operator))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, U256::from(5u8), U256::from(10u8), a(2), a(3), a(1)),
                (1, U256::from(6u8), U256::from(20u8), a(2), a(3), a(1)),
            ]
        );
        assert!(rows.iter().all(|r| r.log_index == 3 && r.block_number == 7));
    }

    #[test]
    fn a_transfer_single_is_one_row_at_position_zero() {
        let tokens = HashMap::from([(a(9), TokenStandard::Erc1155)]);
        let e = IERC1155::TransferSingle {
            operator: a(1),
            from: Address::ZERO,
            to: a(3),
            id: U256::from(4u8),
            value: U256::MAX,
        };
        let Some(Decoded::Multi(rows)) =
            decode(&log_of(a(9), e.encode_log_data()), &tokens).unwrap()
        else {
            panic!("a TransferSingle decodes to one ERC-1155 row");
        };
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].position, rows[0].token_id, rows[0].value),
            (0, U256::from(4u8), U256::MAX)
        );
    }

    #[test]
    fn mismatched_batch_arrays_are_rejected_with_a_reason() {
        let tokens = HashMap::from([(a(9), TokenStandard::Erc1155)]);
        let log = batch(&[5, 6, 7], &[10, 20]);
        let e = decode(&log, &tokens).unwrap_err();
        assert!(
            e.to_string()
                .contains("TransferBatch has 3 ids but 2 values"),
            "{e}"
        );
        let kept = RejectedLog::of(&log, &e).expect("kept with its reason");
        assert_eq!(kept.log_index, 3);
        assert_eq!(kept.topics[0], TRANSFER_BATCH_TOPIC);
    }

    #[test]
    fn each_standard_reads_only_its_own_events() {
        // An ERC-1155 token's ERC-20-shaped Transfer and an ERC-20 token's TransferBatch are
        // not transfers of their standard: ignored, not rejected.
        let t = IERC20::Transfer {
            from: a(1),
            to: a(2),
            value: U256::from(1u8),
        };
        let as1155 = HashMap::from([(a(9), TokenStandard::Erc1155)]);
        assert_eq!(
            decode(&log_of(a(9), t.encode_log_data()), &as1155).unwrap(),
            None
        );
        let as20 = HashMap::from([(a(9), TokenStandard::Erc20)]);
        assert_eq!(decode(&batch(&[1], &[1]), &as20).unwrap(), None);
    }
}

/// Bad input, generated: any log (random topics, data bytes and missing fields, for any
/// standard) decodes or is refused with a reason, and a refused log that identifies itself is
/// kept with that same reason. Never a panic.
#[cfg(test)]
mod generated {
    use std::collections::HashMap;

    use alloy::primitives::{Address, B256, Bytes, LogData};
    use alloy::rpc::types::Log;
    use proptest::prelude::*;

    use super::*;

    /// Cases per property (the report's "cases run").
    const CASES: u32 = 3000;

    fn topic() -> impl Strategy<Value = B256> {
        prop_oneof![
            Just(TRANSFER_TOPIC),
            Just(TRANSFER_SINGLE_TOPIC),
            Just(TRANSFER_BATCH_TOPIC),
            any::<[u8; 32]>().prop_map(B256::from),
            any::<u8>().prop_map(B256::with_last_byte),
        ]
    }

    /// Data bytes: random, whole ABI words, or words with huge offsets / lengths (the
    /// `TransferBatch` arrays are dynamic).
    fn data() -> impl Strategy<Value = Vec<u8>> {
        let word = prop_oneof![
            any::<[u8; 32]>(),
            any::<u64>().prop_map(|n| {
                let mut w = [0u8; 32];
                w[24..].copy_from_slice(&n.to_be_bytes());
                w
            }),
            (0u8..8).prop_map(|n| {
                let mut w = [0u8; 32];
                w[31] = n * 32;
                w
            }),
        ];
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            proptest::collection::vec(word, 0..12).prop_map(|ws| ws.concat()),
        ]
    }

    fn standard() -> impl Strategy<Value = TokenStandard> {
        prop_oneof![
            Just(TokenStandard::Erc20),
            Just(TokenStandard::Erc721),
            Just(TokenStandard::Erc1155),
        ]
    }

    prop_compose! {
        fn log()(
            token in 0u8..3,
            topics in proptest::collection::vec(topic(), 0..6),
            data in data(),
            block_number in proptest::option::weighted(0.9, any::<u64>()),
            block_hash in proptest::option::weighted(0.9, any::<[u8; 32]>()),
            log_index in proptest::option::weighted(0.9, any::<u64>()),
            tx_hash in proptest::option::weighted(0.9, any::<[u8; 32]>()),
            removed in proptest::bool::weighted(0.1),
        ) -> Log {
            Log {
                inner: alloy::primitives::Log {
                    address: Address::with_last_byte(token),
                    data: LogData::new_unchecked(topics, Bytes::from(data)),
                },
                block_hash: block_hash.map(B256::from),
                block_number,
                block_timestamp: None,
                transaction_hash: tx_hash.map(B256::from),
                transaction_index: Some(0),
                log_index,
                removed,
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn any_log_decodes_or_is_refused_with_a_reason(log in log(), s1 in standard(), s2 in standard()) {
            // Token 0 is untracked; 1 and 2 are tracked with random standards.
            let tokens = HashMap::from([(Address::with_last_byte(1), s1), (Address::with_last_byte(2), s2)]);
            match decode(&log, &tokens) {
                Ok(Some(Decoded::Multi(rows))) => {
                    prop_assert!(rows.iter().enumerate().all(|(i, r)| r.position as usize == i));
                }
                Ok(_) => {}
                Err(e) => {
                    let reason = e.to_string();
                    prop_assert!(!reason.trim().is_empty());
                    if let DecodeError::Shape { token, .. } = &e {
                        prop_assert!(reason.contains(&addr_hex(token)) || reason.contains(&format!("{token}")), "{}", reason);
                    }
                    if let Some(kept) = RejectedLog::of(&log, &e) {
                        prop_assert_eq!(&kept.reason, &reason);
                        prop_assert_eq!(&kept.topics[..], log.topics());
                        prop_assert_eq!(&kept.data, &log.data().data);
                    }
                }
            }
        }
    }
}
