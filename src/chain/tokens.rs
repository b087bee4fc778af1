//! The configured tokens of a chain, parsed once for the indexer and the index CLI. A bad
//! address here is a configuration fault, reported as one (naming the key and the address),
//! never as an RPC or database error.

use alloy::primitives::Address;

use crate::config::{TokenConfig, TokenStandard};

/// A `chain.tokens` entry whose address does not parse.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "chain.tokens: the address {address:?} of a token on chain {chain_id} is not a 0x-prefixed 20-byte hex address: {reason}"
)]
pub struct BadTokenAddress {
    pub chain_id: u64,
    pub address: String,
    pub reason: String,
}

/// One configured token, its address parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TrackedToken {
    pub address: Address,
    pub standard: TokenStandard,
    pub start_block: u64,
}

impl TryFrom<&TokenConfig> for TrackedToken {
    type Error = BadTokenAddress;

    fn try_from(t: &TokenConfig) -> Result<TrackedToken, BadTokenAddress> {
        let address = t.address.parse::<Address>().map_err(|e| BadTokenAddress {
            chain_id: t.chain_id,
            address: t.address.clone(),
            reason: e.to_string(),
        })?;
        Ok(TrackedToken {
            address,
            standard: t.standard,
            start_block: t.start_block,
        })
    }
}

/// Parses every entry of `tokens`; the first bad one fails the lot.
pub(crate) fn tracked(tokens: &[TokenConfig]) -> Result<Vec<TrackedToken>, BadTokenAddress> {
    tokens.iter().map(TrackedToken::try_from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(address: &str) -> TokenConfig {
        TokenConfig {
            chain_id: 1514,
            address: address.to_string(),
            standard: TokenStandard::Erc20,
            start_block: 3,
        }
    }

    #[test]
    fn a_bad_configured_address_names_the_key_and_the_address() {
        let good = cfg("0x00000000000000000000000000000000000000AB");
        let bad = cfg("0xnot-an-address");
        let e = tracked(&[good.clone(), bad]).unwrap_err();
        assert_eq!(e.chain_id, 1514);
        assert_eq!(e.address, "0xnot-an-address");
        let text = e.to_string();
        assert!(text.starts_with("chain.tokens:"), "{text}");
        assert!(text.contains("\"0xnot-an-address\""), "{text}");
        let ok = tracked(&[good]).unwrap();
        assert_eq!(ok[0].address, Address::with_last_byte(0xab));
        assert_eq!(ok[0].start_block, 3);
    }
}
