//! The audit of access checks (the seed's VerificationAuditService): every decision any door
//! gives is one row of `access_checks` (migration `20261202010000_access_audit.sql`).
//!
//! The queue door records through an [`AuditRecorder`]: one task per process that drains the
//! decisions handlers hand it (up to `access.audit.max_batch`, with no artificial delay, like
//! the ledger's batcher), writes them with one multi-row INSERT (a few INSERTs in flight at
//! once, so commits overlap), and only then lets the handlers resolve, so a reply is sent after
//! its decision is durable. The SQL doors record their own
//! decision in SQL (`tw_access_record`). This module is the one gateway to the table from Rust:
//! the recording, retention (`prune`) and the `verification_storm` anomaly rule read or write
//! it here.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::decision::{Decision, DenyReason, Source};
use crate::config::{AnomaliesConfig, AuditConfig};
use crate::ledger::anomalies::{AnomalyRule, WindowCountRule};

/// Longest user agent stored (characters); longer ones are cut. The table checks it too.
pub const MAX_USER_AGENT_CHARS: usize = 512;
/// Longest user agent accepted at all (characters): beyond it the request is rejected.
pub const MAX_USER_AGENT_INPUT_CHARS: usize = 8192;

/// Name of the anomaly rule over the audit (stored in `token_anomalies.rule`).
pub const VERIFICATION_STORM: &str = "verification_storm";

/// How long the head clock of `held … for_secs` is kept: the longest duration a rule may name
/// (366 days) and a day to spare.
const BLOCK_CLOCK_KEEP_DAYS: i32 = 367;

/// Which door answered a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// The `verify_access` job.
    Queue,
    /// `tokenwarden access check`.
    Cli,
}

impl Door {
    /// The value stored in `access_checks.door`.
    pub fn as_str(self) -> &'static str {
        match self {
            Door::Queue => "queue",
            Door::Cli => "cli",
        }
    }
}

/// The value stored in `access_checks.reason` (the decision's JSON spelling).
fn reason_str(r: DenyReason) -> &'static str {
    match r {
        DenyReason::NoRule => "no_rule",
        DenyReason::NoWallet => "no_wallet",
        DenyReason::Stale => "stale",
        DenyReason::NotMet => "not_met",
    }
}

/// The value stored in `access_checks.source`.
fn source_str(s: Source) -> &'static str {
    s.as_str()
}

/// Who asked, when the caller says so: bounded and checked before it reaches the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    ip: Option<IpAddr>,
    user_agent: Option<String>,
}

impl Caller {
    /// `ip` must be an IPv4 or IPv6 address (an error names it otherwise); `user_agent` must
    /// be at most [`MAX_USER_AGENT_INPUT_CHARS`] long, loses its control characters and is cut
    /// to [`MAX_USER_AGENT_CHARS`].
    pub fn new(ip: Option<&str>, user_agent: Option<&str>) -> Result<Self, String> {
        if user_agent.is_some_and(|ua| ua.chars().count() > MAX_USER_AGENT_INPUT_CHARS) {
            return Err(format!(
                "user_agent is longer than {MAX_USER_AGENT_INPUT_CHARS} characters"
            ));
        }
        let ip = ip
            .map(|s| {
                s.trim().parse::<IpAddr>().map_err(|_| {
                    let shown: String = s.chars().take(60).collect();
                    format!("caller_ip {shown:?} is not an IPv4 or IPv6 address")
                })
            })
            .transpose()?;
        let user_agent = user_agent
            .map(|ua| {
                ua.chars()
                    .filter(|c| !c.is_control())
                    .take(MAX_USER_AGENT_CHARS)
                    .collect::<String>()
            })
            .filter(|ua| !ua.is_empty());
        Ok(Self { ip, user_agent })
    }

    pub fn ip(&self) -> Option<IpAddr> {
        self.ip
    }

    pub fn user_agent(&self) -> Option<&str> {
        self.user_agent.as_deref()
    }
}

/// One row of `access_checks`.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    checked_at: DateTime<Utc>,
    decided_at: DateTime<Utc>,
    user_id: Uuid,
    creator_id: String,
    feature: String,
    rule_version: Option<i32>,
    allowed: bool,
    reason: Option<DenyReason>,
    source: Source,
    door: Door,
    as_of_block: Option<u64>,
    stale: bool,
    /// The evidence as JSON text: written straight from the typed decision (no `Value` tree
    /// per check), parsed once by Postgres into the `jsonb` column.
    evidence: String,
    request_id: Option<Uuid>,
    caller_ip: Option<String>,
    user_agent: Option<String>,
}

impl AuditEntry {
    /// The record of `decision` answered now through `door`.
    pub fn new(decision: &Decision, door: Door, request_id: Option<Uuid>, caller: &Caller) -> Self {
        Self {
            checked_at: Utc::now(),
            decided_at: decision.checked_at,
            user_id: decision.user_id,
            creator_id: decision.creator_id.clone(),
            feature: decision.feature.clone(),
            rule_version: decision.rule_version,
            allowed: decision.allowed,
            reason: decision.reason,
            source: decision.source,
            door,
            as_of_block: decision.as_of_block,
            stale: decision.stale,
            evidence: serde_json::to_string(&decision.evidence).unwrap_or_else(|_| "[]".into()),
            request_id,
            caller_ip: caller.ip.map(|ip| ip.to_string()),
            user_agent: caller.user_agent.clone(),
        }
    }
}

/// Recording or pruning the audit failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("{what}: {source}")]
    Db {
        what: &'static str,
        #[source]
        source: Arc<sqlx::Error>,
    },
    #[error("the audit recorder has stopped")]
    Stopped,
}

impl AuditError {
    /// Postgres refused a value of the row (SQLSTATE class 22, or a CHECK constraint): a retry
    /// cannot help.
    pub fn is_bad_data(&self) -> bool {
        match self {
            AuditError::Db { source, .. } => match source.as_ref() {
                sqlx::Error::Database(db) => db
                    .code()
                    .is_some_and(|c| c.starts_with("22") || c == "23514"),
                _ => false,
            },
            AuditError::Stopped => false,
        }
    }
}

fn db(what: &'static str) -> impl FnOnce(sqlx::Error) -> AuditError {
    move |source| AuditError::Db {
        what,
        source: Arc::new(source),
    }
}

/// Writes `entries` in one INSERT (one statement, so one commit for the batch): one array
/// parameter per column, unnested side by side.
pub async fn insert(pool: &PgPool, entries: &[AuditEntry]) -> Result<u64, AuditError> {
    if entries.is_empty() {
        return Ok(0);
    }
    let col = |f: fn(&AuditEntry) -> Option<String>| entries.iter().map(f).collect::<Vec<_>>();
    let done = sqlx::query(
        "INSERT INTO public.access_checks (checked_at, decided_at, user_id, creator_id, feature, \
           rule_version, allowed, reason, source, door, as_of_block, stale, evidence, request_id, \
           caller_ip, user_agent) \
         SELECT x.checked_at, x.decided_at, x.user_id, x.creator_id, x.feature, x.rule_version, \
                x.allowed, x.reason, x.source, x.door, x.as_of_block, x.stale, x.evidence::jsonb, \
                x.request_id, x.caller_ip::inet, x.user_agent \
           FROM unnest($1::timestamptz[], $2::timestamptz[], $3::uuid[], $4::text[], $5::text[], \
                       $6::integer[], $7::boolean[], $8::text[], $9::text[], $10::text[], \
                       $11::bigint[], $12::boolean[], $13::text[], $14::uuid[], $15::text[], \
                       $16::text[]) \
             AS x(checked_at, decided_at, user_id, creator_id, feature, rule_version, allowed, \
                  reason, source, door, as_of_block, stale, evidence, request_id, caller_ip, \
                  user_agent)",
    )
    .bind(entries.iter().map(|e| e.checked_at).collect::<Vec<_>>())
    .bind(entries.iter().map(|e| e.decided_at).collect::<Vec<_>>())
    .bind(entries.iter().map(|e| e.user_id).collect::<Vec<_>>())
    .bind(
        entries
            .iter()
            .map(|e| e.creator_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        entries
            .iter()
            .map(|e| e.feature.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(entries.iter().map(|e| e.rule_version).collect::<Vec<_>>())
    .bind(entries.iter().map(|e| e.allowed).collect::<Vec<_>>())
    .bind(
        entries
            .iter()
            .map(|e| e.reason.map(reason_str))
            .collect::<Vec<_>>(),
    )
    .bind(
        entries
            .iter()
            .map(|e| source_str(e.source))
            .collect::<Vec<_>>(),
    )
    .bind(entries.iter().map(|e| e.door.as_str()).collect::<Vec<_>>())
    .bind(
        entries
            .iter()
            .map(|e| e.as_of_block.map(|b| i64::try_from(b).unwrap_or(i64::MAX)))
            .collect::<Vec<_>>(),
    )
    .bind(entries.iter().map(|e| e.stale).collect::<Vec<_>>())
    .bind(
        entries
            .iter()
            .map(|e| e.evidence.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(entries.iter().map(|e| e.request_id).collect::<Vec<_>>())
    .bind(col(|e| e.caller_ip.clone()))
    .bind(col(|e| e.user_agent.clone()))
    .execute(pool)
    .await
    .map_err(db("record access checks"))?;
    Ok(done.rows_affected())
}

type Pending = (AuditEntry, oneshot::Sender<Result<(), AuditError>>);

/// Hands decisions to the recording task and waits until they are committed. Cheap to clone.
#[derive(Clone)]
pub struct AuditRecorder {
    tx: mpsc::Sender<Pending>,
}

impl AuditRecorder {
    /// Starts the recording task over `pool`. It ends when every recorder is dropped.
    pub fn spawn(pool: PgPool, cfg: &AuditConfig) -> (AuditRecorder, tokio::task::JoinHandle<()>) {
        let max_batch = cfg.max_batch.max(1);
        let (tx, rx) = mpsc::channel(max_batch * 4);
        let task = tokio::spawn(super::batches::serve_in_batches(
            rx,
            max_batch,
            INSERTS_IN_FLIGHT,
            move |buf| {
                let pool = pool.clone();
                async move { record_batch(&pool, buf).await }
            },
        ));
        (AuditRecorder { tx }, task)
    }

    /// Records `entry` with the next batch; resolves once the batch is committed.
    pub async fn record(&self, entry: AuditEntry) -> Result<(), AuditError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((entry, tx))
            .await
            .map_err(|_| AuditError::Stopped)?;
        rx.await.map_err(|_| AuditError::Stopped)?
    }
}

/// INSERTs of the recorder in flight at once. While one waits for its commit's WAL flush, the
/// next batch forms and is written: commits overlap (Postgres flushes them together) instead of
/// queueing one flush after the other.
const INSERTS_IN_FLIGHT: usize = 3;

async fn record_batch(pool: &PgPool, buf: Vec<Pending>) {
    let (entries, waiters): (Vec<AuditEntry>, Vec<_>) = buf.into_iter().unzip();
    match insert(pool, &entries).await {
        Ok(_) => {
            for w in waiters {
                let _ = w.send(Ok(()));
            }
        }
        // One row Postgres refuses must not fail the others: record them one by one.
        Err(e) if e.is_bad_data() && entries.len() > 1 => {
            tracing::warn!(error = %e, batch = entries.len(), "an access check was refused; recording the batch row by row");
            for (entry, w) in entries.iter().zip(waiters) {
                let one = insert(pool, std::slice::from_ref(entry)).await.map(|_| ());
                let _ = w.send(one);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, batch = entries.len(), "access checks not recorded; their jobs will be redelivered");
            for w in waiters {
                let _ = w.send(Err(e.clone()));
            }
        }
    }
}

/// What one retention pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// `access_checks` rows older than `access.audit.retention_days`.
    pub checks: u64,
    /// Head-clock samples older than the longest `held … for_secs` window.
    pub clock_samples: u64,
}

/// Deletes checks older than the retention, `prune_batch_rows` per statement (oldest first)
/// until none is left, and head-clock samples no rule can need any more.
pub async fn prune(pool: &PgPool, cfg: &AuditConfig) -> Result<Pruned, AuditError> {
    let batch = i64::from(cfg.prune_batch_rows.max(1));
    let days = i32::try_from(cfg.retention_days).unwrap_or(i32::MAX);
    let mut out = Pruned::default();
    loop {
        let n = sqlx::query(
            "DELETE FROM public.access_checks WHERE id IN ( \
               SELECT id FROM public.access_checks \
                WHERE checked_at < now() - make_interval(days => $1) \
                ORDER BY checked_at LIMIT $2)",
        )
        .bind(days)
        .bind(batch)
        .execute(pool)
        .await
        .map_err(db("prune access checks"))?
        .rows_affected();
        out.checks += n;
        if n < batch as u64 {
            break;
        }
    }
    out.clock_samples = sqlx::query(
        "DELETE FROM public.tw_access_block_clock \
          WHERE observed_at < now() - make_interval(days => $1)",
    )
    .bind(BLOCK_CLOCK_KEEP_DAYS)
    .execute(pool)
    .await
    .map_err(db("prune the head clock"))?
    .rows_affected();
    Ok(out)
}

/// Access checks as events of the storm rule (`$2` is not needed).
const CHECK_EVENTS: &str = "SELECT user_id, checked_at AS at FROM public.access_checks \
     WHERE checked_at >= $1 AND cardinality($2::text[]) >= 0";

/// The `verification_storm` rule of `[maintenance.anomalies.verification_storm]` (the seed's
/// "more than 20 checks in 5 minutes for one user"), when enabled: a window count over
/// `access_checks`, evaluated, stored and alerted by the detection job like the ledger's rules.
pub fn anomaly_rules(cfg: &AnomaliesConfig) -> Vec<Arc<dyn AnomalyRule>> {
    if !cfg.verification_storm.enabled {
        return Vec::new();
    }
    vec![Arc::new(WindowCountRule::new(
        VERIFICATION_STORM,
        CHECK_EVENTS,
        Vec::new(),
        &cfg.verification_storm,
        Duration::from_secs(cfg.lookback_secs),
    ))]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_is_bounded_and_checked() {
        let c = Caller::new(Some(" 2001:db8::1 "), Some("curl/8\u{0}\n")).expect("valid");
        assert_eq!(c.ip(), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(c.user_agent(), Some("curl/8"));
        let long = "a".repeat(2000);
        let c = Caller::new(None, Some(&long)).expect("valid");
        assert_eq!(c.user_agent().map(str::len), Some(MAX_USER_AGENT_CHARS));
        let e = Caller::new(Some("10.0.0.300"), None).expect_err("not an address");
        assert!(e.contains("caller_ip"), "{e}");
        assert_eq!(Caller::new(None, Some("\u{7}")).unwrap().user_agent(), None);
        let huge = "a".repeat(MAX_USER_AGENT_INPUT_CHARS + 1);
        assert!(Caller::new(None, Some(&huge)).is_err());
    }
}
