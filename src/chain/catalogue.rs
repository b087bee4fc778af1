//! The tracked-token catalogue of a chain (`chain_tokens`, migration
//! `20261201095100_chain_token_catalogue.sql`): what a token's row says, and — pure — what the
//! leading indexer must do to bring a token from its `status` to its `requested` state. The
//! SQL of each transition is in [`super::store_catalogue`]; the indexer applies them between
//! its own commits, so a token's filter membership and its committed data always agree.

use alloy::primitives::Address;

use crate::config::TokenStandard;

/// Where a token is (`chain_tokens.status`, written by the indexer only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenStatus {
    Pending,
    Backfilling,
    Live,
    Paused,
    Stopped,
    Removed,
}

impl TokenStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenStatus::Pending => "pending",
            TokenStatus::Backfilling => "backfilling",
            TokenStatus::Live => "live",
            TokenStatus::Paused => "paused",
            TokenStatus::Stopped => "stopped",
            TokenStatus::Removed => "removed",
        }
    }

    pub fn parse(s: &str) -> Option<TokenStatus> {
        Some(match s {
            "pending" => TokenStatus::Pending,
            "backfilling" => TokenStatus::Backfilling,
            "live" => TokenStatus::Live,
            "paused" => TokenStatus::Paused,
            "stopped" => TokenStatus::Stopped,
            "removed" => TokenStatus::Removed,
            _ => return None,
        })
    }
}

/// What an operator asked for (`chain_tokens.requested`, written by `chain_token_request`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    Live,
    Paused,
    Removed,
}

impl Requested {
    pub fn parse(s: &str) -> Option<Requested> {
        Some(match s {
            "live" => Requested::Live,
            "paused" => Requested::Paused,
            "removed" => Requested::Removed,
            _ => return None,
        })
    }
}

/// One row of the catalogue.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogueToken {
    pub address: Address,
    pub standard: TokenStandard,
    pub start_block: u64,
    pub status: TokenStatus,
    pub requested: Requested,
    pub keep_rows: bool,
    /// The last block whose data of this token is committed, while it does not move with the
    /// chain (backfilling, paused, removed with its rows kept); `None`: nothing yet (or live).
    pub indexed_to: Option<u64>,
    /// Logs committed by the current backfill, and its seconds so far (for logs/s).
    pub backfill_logs: u64,
    pub backfill_secs: Option<f64>,
    pub reason: Option<String>,
    pub symbol: Option<String>,
}

impl CatalogueToken {
    /// The first block the token still lacks, when it does not move with the chain.
    pub fn next_block(&self) -> u64 {
        self.indexed_to.map_or(self.start_block, |n| n + 1)
    }

    /// Percent of its own backfill done against the chain checkpoint `cp`.
    pub fn percent(&self, cp: u64) -> f64 {
        let total = (cp + 1).saturating_sub(self.start_block).max(1) as f64;
        let done = self.next_block().saturating_sub(self.start_block) as f64;
        (done * 100.0 / total).min(100.0)
    }
}

/// The transition that brings a token toward its requested state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing to do (or the backfill loop's work).
    None,
    /// Joins the chain now: nothing before the checkpoint is missing.
    GoLive,
    /// Needs its own backfill from [`CatalogueToken::next_block`] up to the checkpoint.
    Backfill,
    Pause,
    Remove {
        keep_rows: bool,
    },
}

/// What the leader does with `t` when the chain's checkpoint is `cp` (`None`: nothing indexed
/// yet, so every token simply starts with the chain).
pub fn transition(t: &CatalogueToken, cp: Option<u64>) -> Transition {
    use TokenStatus as S;
    match (t.requested, t.status) {
        (Requested::Removed, S::Removed) => Transition::None,
        (Requested::Removed, _) => Transition::Remove {
            keep_rows: t.keep_rows,
        },
        (Requested::Paused, S::Pending | S::Backfilling | S::Live) => Transition::Pause,
        (Requested::Paused, _) => Transition::None,
        (Requested::Live, S::Pending | S::Paused | S::Removed) => match cp {
            None => Transition::GoLive,
            Some(cp) if t.next_block() > cp => Transition::GoLive,
            Some(_) => Transition::Backfill,
        },
        (Requested::Live, S::Backfilling | S::Live | S::Stopped) => Transition::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(status: TokenStatus, requested: Requested, indexed_to: Option<u64>) -> CatalogueToken {
        CatalogueToken {
            address: Address::with_last_byte(1),
            standard: TokenStandard::Erc20,
            start_block: 10,
            status,
            requested,
            keep_rows: false,
            indexed_to,
            backfill_logs: 0,
            backfill_secs: None,
            reason: None,
            symbol: None,
        }
    }

    #[test]
    fn a_new_token_starts_with_the_chain_or_backfills_to_it() {
        let t = token(TokenStatus::Pending, Requested::Live, None);
        assert_eq!(transition(&t, None), Transition::GoLive);
        assert_eq!(
            transition(&t, Some(9)),
            Transition::GoLive,
            "starts after cp"
        );
        assert_eq!(transition(&t, Some(10)), Transition::Backfill);
        assert_eq!(transition(&t, Some(500)), Transition::Backfill);
    }

    #[test]
    fn a_resumed_token_backfills_only_its_gap() {
        let t = token(TokenStatus::Paused, Requested::Live, Some(40));
        assert_eq!(t.next_block(), 41);
        assert_eq!(transition(&t, Some(40)), Transition::GoLive);
        assert_eq!(transition(&t, Some(41)), Transition::Backfill);
        assert!((t.percent(109) - 31.0).abs() < 0.01, "{}", t.percent(109));
    }

    #[test]
    fn pause_and_remove_apply_from_any_indexed_state() {
        for s in [
            TokenStatus::Pending,
            TokenStatus::Backfilling,
            TokenStatus::Live,
        ] {
            assert_eq!(
                transition(&token(s, Requested::Paused, None), Some(5)),
                Transition::Pause
            );
        }
        let mut t = token(TokenStatus::Stopped, Requested::Removed, None);
        t.keep_rows = true;
        assert_eq!(
            transition(&t, Some(5)),
            Transition::Remove { keep_rows: true }
        );
        t.status = TokenStatus::Removed;
        assert_eq!(transition(&t, Some(5)), Transition::None);
        let stopped = token(TokenStatus::Stopped, Requested::Live, Some(3));
        assert_eq!(transition(&stopped, Some(5)), Transition::None);
    }
}
