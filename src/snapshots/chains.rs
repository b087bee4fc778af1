//! Which chains GoldRush serves, and what it can do on each, checked BEFORE any request so an
//! unsupported chain gets a clear error instead of a 400/404 from upstream.

/// GoldRush's Foundational chains: the only ones where `block-height` (historical holders) works.
/// Elsewhere the API answers `block-height` with 400.
const FOUNDATIONAL: &[(&str, u64)] = &[
    ("eth-mainnet", 1),
    ("matic-mainnet", 137),
    ("bsc-mainnet", 56),
    ("optimism-mainnet", 10),
    ("base-mainnet", 8453),
    ("gnosis-mainnet", 100),
];

/// Story Protocol chain ids (mainnet, Aeneid, and the retired Iliad and Odyssey testnets) and
/// the names other tools use for them. GoldRush serves none of them.
const STORY_IDS: &[u64] = &[1514, 1315, 1513, 1516];

/// A chain as the caller named it, resolved for GoldRush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoldRushChain {
    /// What goes in the URL path: the name, or the decimal id, exactly as given (GoldRush accepts
    /// both).
    segment: String,
    /// Whether historical `block-height` is served.
    pub foundational: bool,
}

impl GoldRushChain {
    /// The first path segment of the request URL.
    pub fn path_segment(&self) -> &str {
        &self.segment
    }
}

/// Why a chain cannot be crawled from GoldRush.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error(
        "GoldRush does not serve Story Protocol (chain {0}): take an own-index snapshot instead (source \"index\", with the token indexed by the chain indexer)"
    )]
    Story(String),
    #[error(
        "GoldRush serves historical block heights only on its Foundational chains (eth-mainnet, matic-mainnet, bsc-mainnet, optimism-mainnet, base-mainnet, gnosis-mainnet), not on {0}: omit block_height to snapshot the latest holders, or take an own-index snapshot (source \"index\") at that block"
    )]
    NoHistory(String),
    #[error(
        "chain {0:?} is not a GoldRush chain name (lowercase letters, digits and '-') or a numeric chain id"
    )]
    Invalid(String),
}

/// Resolves `chain` (a GoldRush name like `eth-mainnet` or a numeric chain id) and checks that
/// GoldRush can answer for it at `block_height`.
pub fn resolve(chain: &str, block_height: Option<u64>) -> Result<GoldRushChain, ChainError> {
    let chain = chain.trim();
    let valid = !chain.is_empty()
        && chain.len() <= 100
        && chain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return Err(ChainError::Invalid(chain.to_string()));
    }
    let id = chain.parse::<u64>().ok();
    if id.is_some_and(|id| STORY_IDS.contains(&id)) || chain.starts_with("story") {
        return Err(ChainError::Story(chain.to_string()));
    }
    let foundational = FOUNDATIONAL
        .iter()
        .any(|(name, cid)| *name == chain || Some(*cid) == id);
    if block_height.is_some() && !foundational {
        return Err(ChainError::NoHistory(chain.to_string()));
    }
    Ok(GoldRushChain {
        segment: chain.to_string(),
        foundational,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn story_is_refused_by_id_and_name() {
        for c in ["1514", "1315", "story-mainnet", "story-aeneid-testnet"] {
            assert!(matches!(resolve(c, None), Err(ChainError::Story(_))), "{c}");
        }
    }

    #[test]
    fn history_only_on_foundational() {
        assert!(resolve("eth-mainnet", Some(1)).unwrap().foundational);
        assert!(resolve("8453", Some(1)).unwrap().foundational);
        assert!(matches!(
            resolve("arbitrum-mainnet", Some(5)),
            Err(ChainError::NoHistory(_))
        ));
        assert!(!resolve("arbitrum-mainnet", None).unwrap().foundational);
        assert!(matches!(
            resolve("Eth Mainnet", None),
            Err(ChainError::Invalid(_))
        ));
    }
}
