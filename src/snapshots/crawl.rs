//! A GoldRush crawl streamed into Postgres: page N is COPYed while page N+1 is fetched, so at
//! most two pages are in memory whatever the holder count.
//!
//! Pagination rules (see the README, "GoldRush crawl rules"):
//! - follow `has_more` from page 0;
//! - pin `block-height`: the caller's, or else the first page's items' `block_height`, sent on
//!   every later page (Foundational chains only; elsewhere GoldRush refuses `block-height`, so
//!   pages are checked to carry the same `block_height` instead and a mismatch fails the crawl);
//! - `total_count`, when not null, is cross-checked: a disagreement is logged as a warning and
//!   counted. When `has_more` is false but `total_count` says holders are still missing (the
//!   2021-era answers did that), the crawl warns and keeps fetching pages until an empty page or
//!   until `total_count` items were seen.

use sqlx::PgPool;
use uuid::Uuid;

use super::chains::GoldRushChain;
use super::goldrush::{GoldRushClient, GoldRushError, HolderPage};
use super::store::{self, Completion};

/// Refuse to follow more pages than this (100 million holders at 1000 per page): a server that
/// says `has_more` forever must not keep a job alive forever.
const MAX_PAGES: u32 = 100_000;

/// Why a crawl stopped.
#[derive(Debug, thiserror::Error)]
pub enum CrawlError {
    /// The API refused or answered badly: the snapshot fails with this reason.
    #[error(transparent)]
    Api(#[from] GoldRushError),
    /// The answers do not form one consistent snapshot: the snapshot fails with this reason.
    #[error("inconsistent GoldRush answers: {0}")]
    Inconsistent(String),
    /// Postgres failed: the job may be retried.
    #[error("database error while storing holders: {0}")]
    Db(sqlx::Error),
}

/// What a finished crawl stored.
#[derive(Debug, Clone)]
pub struct CrawlSummary {
    pub completion: Completion,
    pub pages: u32,
    pub items_seen: u64,
    pub holders_stored: u64,
}

fn db_error(e: sqlx::Error, page: u32) -> CrawlError {
    if let sqlx::Error::Database(d) = &e
        && d.code().as_deref() == Some("23505")
    {
        return CrawlError::Inconsistent(format!(
            "page {page} repeats a holder already stored from an earlier page ({})",
            d.message()
        ));
    }
    CrawlError::Db(e)
}

/// Crawls every page of `token` on `chain` into snapshot `id` (which must be `pending`).
/// Does not mark the snapshot complete: the caller does, once this returns `Ok`.
pub async fn crawl_into(
    client: &GoldRushClient,
    pool: &PgPool,
    id: Uuid,
    chain: &GoldRushChain,
    token: &str,
    requested_block: Option<u64>,
) -> Result<CrawlSummary, CrawlError> {
    let first = client.fetch_page(chain, token, requested_block, 0).await?;
    if let (Some(req), Some(got)) = (requested_block, first.block_height)
        && req != got
    {
        return Err(CrawlError::Inconsistent(format!(
            "asked for block {req} but page 0 describes block {got}"
        )));
    }
    let block = requested_block.or(first.block_height);
    // Only Foundational chains accept `block-height`; elsewhere pages are checked instead.
    let pin = if chain.foundational { block } else { None };
    let total_count = first.total_count;
    let mut summary = CrawlSummary {
        completion: Completion {
            block_height: block,
            decimals: None,
            total_supply: None,
        },
        pages: 0,
        items_seen: 0,
        holders_stored: 0,
    };
    let mut warned_has_more = false;
    let mut page = first;
    loop {
        check_page(&page, block)?;
        if summary.completion.decimals.is_none() {
            summary.completion.decimals = page.decimals;
        }
        if summary.completion.total_supply.is_none() {
            summary.completion.total_supply = page.total_supply.map(|t| t.to_string());
        }
        summary.items_seen += page.item_count as u64;
        summary.pages += 1;
        let more = if page.has_more {
            if page.item_count == 0 {
                return Err(CrawlError::Inconsistent(format!(
                    "page {} is empty but says has_more",
                    page.page_number
                )));
            }
            true
        } else {
            match total_count {
                Some(t) if page.item_count > 0 && summary.items_seen < t => {
                    if !warned_has_more {
                        warned_has_more = true;
                        metrics::counter!("tokenwarden_goldrush_total_count_mismatch_total")
                            .increment(1);
                        tracing::warn!(
                            token,
                            chain = chain.path_segment(),
                            page = page.page_number,
                            total_count = t,
                            items_seen = summary.items_seen,
                            "GoldRush says has_more=false but total_count is larger; \
                             fetching further pages until an empty page"
                        );
                    }
                    true
                }
                _ => false,
            }
        };
        let next_number = page.page_number + 1;
        if more && next_number >= MAX_PAGES {
            return Err(CrawlError::Inconsistent(format!(
                "more than {MAX_PAGES} pages; refusing to continue"
            )));
        }
        let write = store::copy_holders(pool, id, &page.holders);
        let fetch = async {
            if more {
                Some(client.fetch_page(chain, token, pin, next_number).await)
            } else {
                None
            }
        };
        let (written, next) = tokio::join!(write, fetch);
        let written = written.map_err(|e| db_error(e, page.page_number))?;
        summary.holders_stored += written;
        metrics::counter!("tokenwarden_snapshot_holders_stored_total", "source" => "goldrush")
            .increment(written);
        match next {
            None => break,
            Some(next) => page = next?,
        }
    }
    if let Some(t) = total_count
        && t != summary.items_seen
    {
        metrics::counter!("tokenwarden_goldrush_total_count_mismatch_total").increment(1);
        tracing::warn!(
            token,
            chain = chain.path_segment(),
            total_count = t,
            items_seen = summary.items_seen,
            "GoldRush total_count disagrees with the items received"
        );
    }
    Ok(summary)
}

/// Every page must describe the snapshot's block.
fn check_page(page: &HolderPage, block: Option<u64>) -> Result<(), CrawlError> {
    match (block, page.block_height) {
        (Some(want), Some(got)) if want != got => Err(CrawlError::Inconsistent(format!(
            "page {} describes block {got}, not block {want}: pages must describe one block",
            page.page_number
        ))),
        _ => Ok(()),
    }
}
