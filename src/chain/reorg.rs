//! Where a reorg forked off our index: the newest remembered block whose hash the chain still
//! has. Kept apart from the indexer loop (the rindexer habit: reorg handling is its own module)
//! so the rule can be tested against a scripted chain; the indexer then undoes every block
//! after the fork base through [`super::store::ChainStore::undo_from`].

use super::rpc::RpcError;
use super::source::ChainSource;
use super::store::Checkpoint;

/// How far back the index may undo by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    /// The committed tip, which the chain no longer has.
    pub checkpoint: Checkpoint,
    /// `reorg_depth`: the deepest reorg undone automatically.
    pub depth: u64,
    /// The first block the index covers (the smallest configured `start_block`).
    pub start_block: u64,
}

impl Window {
    /// Whether remembered block `number` is close enough to the tip to be a fork base.
    fn reaches(&self, number: u64) -> bool {
        self.checkpoint.number.saturating_sub(number) <= self.depth
    }

    /// Whether every indexed block is inside the window, so undoing all of it is a valid
    /// answer when no remembered block survived. A `start_block` above the tip (raised in
    /// the config after indexing) does not qualify: that index is not ours to discard.
    fn holds_everything(&self) -> bool {
        (self.checkpoint.number + 1)
            .checked_sub(self.start_block)
            .is_some_and(|indexed| indexed <= self.depth)
    }
}

/// The outcome of the fork search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ForkBase {
    /// The newest remembered block still on the chain: it stays, everything after goes.
    Block(Checkpoint),
    /// Nothing remembered survived, but everything indexed is inside the window: undo all.
    StartOver,
    /// No fork base within `depth`: deeper than the index may undo by itself.
    TooDeep,
}

impl ForkBase {
    /// The first block to undo and the checkpoint to rewind to (`None`: nothing survives);
    /// `None` for [`ForkBase::TooDeep`].
    pub(crate) fn undo(self, start_block: u64) -> Option<(u64, Option<Checkpoint>)> {
        match self {
            ForkBase::Block(b) => Some((b.number + 1, Some(b))),
            ForkBase::StartOver => Some((start_block, None)),
            ForkBase::TooDeep => None,
        }
    }
}

/// Walks `remembered` (stored blocks below the detection point, newest first) and asks the
/// chain for each one's hash until one matches. Stops at the first match, so a shallow reorg
/// costs one or two header calls.
pub(crate) async fn find_fork_base<S: ChainSource>(
    source: &S,
    remembered: &[Checkpoint],
    window: &Window,
) -> Result<ForkBase, RpcError> {
    for stored in remembered {
        if !window.reaches(stored.number) {
            break;
        }
        // Every remembered block is below a block the chain has shown with another hash, so a
        // node without it is behind, not reorged: fail (retried from the checkpoint) instead
        // of counting the block as dropped.
        let Some(on_chain) = source.header(stored.number).await? else {
            return Err(RpcError::InvalidReply {
                method: "eth_getBlockByNumber",
                message: format!(
                    "no block {} while looking for a reorg's fork base: the node is behind",
                    stored.number
                ),
            });
        };
        if on_chain.hash == stored.hash {
            return Ok(ForkBase::Block(*stored));
        }
    }
    Ok(if window.holds_everything() {
        ForkBase::StartOver
    } else {
        ForkBase::TooDeep
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::source::fake::{FakeChain, hash};

    /// What the index remembers of blocks `from..=to` on the original chain (fork tag 0),
    /// newest first.
    fn remembered(from: u64, to: u64) -> Vec<Checkpoint> {
        (from..=to)
            .rev()
            .map(|n| Checkpoint {
                number: n,
                hash: hash(n, 0),
            })
            .collect()
    }

    fn window(tip: u64, depth: u64, start_block: u64) -> Window {
        Window {
            checkpoint: Checkpoint {
                number: tip,
                hash: hash(tip, 0),
            },
            depth,
            start_block,
        }
    }

    #[tokio::test]
    async fn the_fork_base_is_the_newest_block_the_chain_still_has() {
        // Indexed 0..=20; the chain replaced 18.. (a 3-block reorg).
        let chain = FakeChain::with_blocks(22, 18, 1);
        let w = window(20, 10, 0);
        let base = find_fork_base(&chain, &remembered(10, 20), &w)
            .await
            .unwrap();
        let kept = Checkpoint {
            number: 17,
            hash: hash(17, 0),
        };
        assert_eq!(base, ForkBase::Block(kept));
        // Newest first, stopping at the match.
        assert_eq!(*chain.asked_headers.lock().unwrap(), vec![20, 19, 18, 17]);
        assert_eq!(base.undo(0), Some((18, Some(kept))));
    }

    #[tokio::test]
    async fn a_reorg_of_everything_inside_the_window_starts_over() {
        // Indexed 5..=8 (start_block 5), all replaced; depth 10 covers all of it.
        let chain = FakeChain::with_blocks(9, 0, 1);
        let w = window(8, 10, 5);
        let base = find_fork_base(&chain, &remembered(5, 8), &w).await.unwrap();
        assert_eq!(base, ForkBase::StartOver);
        assert_eq!(base.undo(5), Some((5, None)));
    }

    #[tokio::test]
    async fn no_surviving_block_within_depth_is_a_deep_reorg() {
        // Indexed 0..=30, replaced from 10; depth 5: blocks below 25 are never asked.
        let chain = FakeChain::with_blocks(31, 10, 1);
        let w = window(30, 5, 0);
        let base = find_fork_base(&chain, &remembered(0, 30), &w)
            .await
            .unwrap();
        assert_eq!(base, ForkBase::TooDeep);
        assert_eq!(base.undo(0), None);
        assert_eq!(
            *chain.asked_headers.lock().unwrap(),
            vec![30, 29, 28, 27, 26, 25]
        );
    }

    #[tokio::test]
    async fn a_node_without_a_remembered_block_is_behind_not_reorged() {
        // Indexed 0..=20; the node answers only up to block 14 (it lags): an error to retry,
        // never a fork base below blocks that were not compared (nor a deep reorg).
        let chain = FakeChain::with_blocks(14, 12, 1);
        let w = window(20, 10, 0);
        let err = find_fork_base(&chain, &remembered(10, 20), &w)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("the node is behind"), "{err}");
    }

    #[tokio::test]
    async fn a_start_block_above_the_tip_never_starts_over() {
        let chain = FakeChain::with_blocks(9, 0, 1);
        let w = window(8, 10, 50);
        assert_eq!(
            find_fork_base(&chain, &remembered(5, 8), &w).await.unwrap(),
            ForkBase::TooDeep
        );
    }
}
