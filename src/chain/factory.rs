//! Factories: contracts whose creation event announces new tokens (Story's RoyaltyModule
//! announces each IP Royalty Vault with `IpRoyaltyVaultDeployed(address ipId, address
//! ipRoyaltyVault)`, both arguments in the data). Pure: the configured rules, parsed once, and
//! the decoding of one creation log. The indexer fetches factory logs with the tokens' own and
//! the chain store adds each created token to the catalogue in the batch's transaction.

use std::collections::HashMap;

use alloy::primitives::{Address, B256, keccak256};
use alloy::rpc::types::Log;

use crate::config::{FactoryConfig, TokenArg, TokenStandard};

/// One configured factory event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FactoryRule {
    pub address: Address,
    pub topic0: B256,
    pub arg: TokenArg,
    pub standard: TokenStandard,
    pub start_block: u64,
}

/// A `chain.factories` entry that does not parse.
#[derive(Debug, Clone, thiserror::Error)]
#[error("chain.factories: the factory {address:?} on chain {chain_id} is misconfigured: {reason}")]
pub struct BadFactory {
    pub chain_id: u64,
    pub address: String,
    pub reason: String,
}

/// The rules of `factories`, keyed by (factory address, topic0).
pub(crate) fn rules(
    factories: &[FactoryConfig],
) -> Result<HashMap<(Address, B256), FactoryRule>, BadFactory> {
    factories
        .iter()
        .map(|f| {
            let bad = |reason: String| BadFactory {
                chain_id: f.chain_id,
                address: f.address.clone(),
                reason,
            };
            let address = f
                .address
                .parse::<Address>()
                .map_err(|e| bad(e.to_string()))?;
            let arg = f
                .token_arg()
                .ok_or_else(|| bad(format!("token_arg {:?}", f.token_arg)))?;
            let topic0 = keccak256(f.event.as_bytes());
            Ok((
                (address, topic0),
                FactoryRule {
                    address,
                    topic0,
                    arg,
                    standard: f.standard,
                    start_block: f.start_block,
                },
            ))
        })
        .collect()
}

/// A token a factory created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CreatedToken {
    pub address: Address,
    pub standard: TokenStandard,
    pub block: u64,
}

/// The created token of `log` under `rule`; an error names what is wrong with the log.
pub(crate) fn decode_creation(log: &Log, rule: &FactoryRule) -> Result<CreatedToken, String> {
    let block = log
        .block_number
        .ok_or_else(|| "creation log without a block number".to_string())?;
    let word: B256 = match rule.arg {
        TokenArg::Topic(n) => *log
            .topics()
            .get(n)
            .ok_or_else(|| format!("creation log has no topic {n}"))?,
        TokenArg::Data(n) => {
            let data = &log.data().data;
            let w = data
                .get(32 * n..32 * n + 32)
                .ok_or_else(|| format!("creation log data has no word {n}"))?;
            B256::from_slice(w)
        }
    };
    if word[..12].iter().any(|b| *b != 0) {
        return Err(format!("creation argument {word} is not an address"));
    }
    Ok(CreatedToken {
        address: Address::from_slice(&word[12..]),
        standard: rule.standard,
        block,
    })
}

#[cfg(test)]
mod tests {
    use alloy::primitives::{Bytes, LogData};

    use super::*;

    fn log(topics: Vec<B256>, data: Vec<u8>) -> Log {
        Log {
            inner: alloy::primitives::Log {
                address: Address::with_last_byte(0xf0),
                data: LogData::new_unchecked(topics, Bytes::from(data)),
            },
            block_number: Some(9),
            ..Log::default()
        }
    }

    #[test]
    fn story_royalty_vaults_come_from_the_second_data_word() {
        let cfg = FactoryConfig {
            chain_id: 1514,
            address: "0x00000000000000000000000000000000000000f0".into(),
            event: "IpRoyaltyVaultDeployed(address,address)".into(),
            token_arg: "data1".into(),
            standard: TokenStandard::Erc20,
            start_block: 0,
        };
        let rules = rules(&[cfg]).unwrap();
        let (key, rule) = rules.iter().next().unwrap();
        assert_eq!(
            key.1,
            keccak256("IpRoyaltyVaultDeployed(address,address)".as_bytes())
        );
        let (ip, vault) = (Address::with_last_byte(1), Address::with_last_byte(2));
        let mut data = vec![0u8; 12];
        data.extend_from_slice(ip.as_slice());
        data.extend_from_slice(&[0u8; 12]);
        data.extend_from_slice(vault.as_slice());
        let created = decode_creation(&log(vec![rule.topic0], data.clone()), rule).unwrap();
        assert_eq!((created.address, created.block), (vault, 9));
        let e = decode_creation(&log(vec![rule.topic0], data[..40].to_vec()), rule).unwrap_err();
        assert!(e.contains("no word 1"), "{e}");
        let topic_rule = FactoryRule {
            arg: TokenArg::Topic(1),
            ..*rule
        };
        let t = B256::left_padding_from(vault.as_slice());
        let created = decode_creation(&log(vec![rule.topic0, t], vec![]), &topic_rule).unwrap();
        assert_eq!(created.address, vault);
    }
}
