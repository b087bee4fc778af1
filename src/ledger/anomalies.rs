//! Usage anomalies: the rules that flag a user's suspicious window, their findings in
//! `token_anomalies`, and the reads and resolution operators use.
//!
//! They sit beside the ledger because they gate it: an open finding with severity `block` makes
//! `tw_ledger_apply` answer `rate_limited` to that user's consume and hold (both doors) until an
//! operator resolves it. A rule ([`AnomalyRule`]) looks at Postgres and returns [`Finding`]s;
//! [`Detector::run`] evaluates every rule and stores each finding unless the same user already
//! has a finding of that rule whose window overlaps (so one burst is one row however often
//! detection runs). Running it on a schedule and alerting are the maintenance job's business.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::config::{AnomaliesConfig, BurstRuleConfig, Severity, SpendSpikeConfig};

/// One user's suspicious window as seen by one rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub user_id: Uuid,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    /// Rule-specific figures (counts, thresholds, baselines), stored as `details`.
    pub details: serde_json::Value,
}

/// What [`AnomalyRule::evaluate`] returns.
pub type RuleFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<Finding>, sqlx::Error>> + Send + 'a>>;

/// A detection rule. Other modules implement it (or configure a [`WindowCountRule`]) and pass
/// it to the detection job (`maintenance::MaintenanceJobs::with_extra_rules`); storage,
/// de-duplication, metrics, enforcement and alerts are not the rule's business.
pub trait AnomalyRule: Send + Sync + 'static {
    /// The value stored in `token_anomalies.rule`; stable, since de-duplication keys on it.
    fn name(&self) -> &str;
    fn severity(&self) -> Severity;
    /// Looks for findings now. Re-reporting a window already stored is fine (it is ignored).
    fn evaluate<'a>(&'a self, pool: &'a PgPool) -> RuleFuture<'a>;
}

/// "At least `threshold` events of one user within `window`", over any event source.
///
/// `events_sql` is a SELECT yielding `(user_id uuid, at timestamptz)`; it receives `$1` = the
/// start of the lookback (timestamptz) and `$2` = `extra` (text[]; ignore it if not needed).
/// Windows slide: every event starts a candidate window `[at, at + window]`, and
/// non-overlapping qualifying windows are reported, earliest first. The access module's
/// "more than 20 verifications in 5 minutes" is one of these over its audit table.
pub struct WindowCountRule {
    name: String,
    events_sql: &'static str,
    extra: Vec<String>,
    window: Duration,
    lookback: Duration,
    threshold: u32,
    severity: Severity,
}

impl WindowCountRule {
    /// A rule named `name` over `events_sql`, with window, threshold and severity from `cfg`.
    pub fn new(
        name: impl Into<String>,
        events_sql: &'static str,
        extra: Vec<String>,
        cfg: &BurstRuleConfig,
        lookback: Duration,
    ) -> Self {
        Self {
            name: name.into(),
            events_sql,
            extra,
            window: Duration::from_secs(cfg.window_secs),
            lookback,
            threshold: cfg.threshold,
            severity: cfg.severity,
        }
    }

    async fn find(&self, pool: &PgPool) -> Result<Vec<Finding>, sqlx::Error> {
        let window_us = i64::try_from(self.window.as_micros()).unwrap_or(i64::MAX);
        let lookback_us = i64::try_from(self.lookback.as_micros()).unwrap_or(i64::MAX);
        // `events_sql` is a `&'static str` written in code, never input; values are bound.
        let sql = format!(
            "WITH ev AS ({events}), \
             w AS ( \
               SELECT user_id, at AS window_start, \
                      count(*) OVER (PARTITION BY user_id ORDER BY at \
                        RANGE BETWEEN CURRENT ROW AND make_interval(secs => $3::double precision / 1e6) FOLLOWING) AS n \
                 FROM ev \
             ) \
             SELECT user_id, window_start, n FROM w WHERE n >= $4 ORDER BY user_id, window_start",
            events = self.events_sql
        );
        let since: DateTime<Utc> =
            sqlx::query_scalar("SELECT now() - make_interval(secs => $1::double precision / 1e6)")
                .bind(lookback_us)
                .fetch_one(pool)
                .await?;
        let rows: Vec<(Uuid, DateTime<Utc>, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(since)
            .bind(&self.extra)
            .bind(window_us)
            .bind(i64::from(self.threshold))
            .fetch_all(pool)
            .await?;
        let window = chrono::Duration::microseconds(window_us);
        let mut out: Vec<Finding> = Vec::new();
        for (user_id, start, n) in rows {
            let end = start + window;
            if let Some(prev) = out.last()
                && prev.user_id == user_id
                && prev.window_end >= start
            {
                continue;
            }
            out.push(Finding {
                user_id,
                window_start: start,
                window_end: end,
                details: serde_json::json!({
                    "count": n,
                    "threshold": self.threshold,
                    "window_secs": self.window.as_secs_f64(),
                }),
            });
        }
        Ok(out)
    }
}

impl AnomalyRule for WindowCountRule {
    fn name(&self) -> &str {
        &self.name
    }

    fn severity(&self) -> Severity {
        self.severity
    }

    fn evaluate<'a>(&'a self, pool: &'a PgPool) -> RuleFuture<'a> {
        Box::pin(self.find(pool))
    }
}

/// Name of the built-in burst rule.
pub const REQUEST_BURST: &str = "request_burst";
/// Name of the built-in spend-spike rule.
pub const SPEND_SPIKE: &str = "spend_spike";

/// Ledger requests of the configured kinds (`$2`), whatever their outcome.
const LEDGER_REQUEST_EVENTS: &str = "SELECT user_id, created_at AS at FROM public.ledger_requests \
     WHERE created_at >= $1 AND kind = ANY($2::text[]) AND user_id IS NOT NULL";

/// Spend in the current clock hour against the user's average hourly spend over the baseline.
///
/// Windows are clock hours, so one hour's spike is one finding; a spike straddling an hour
/// boundary is judged in two halves (documented trade-off of a deterministic window).
pub struct SpendSpikeRule {
    cfg: SpendSpikeConfig,
}

impl SpendSpikeRule {
    pub fn new(cfg: SpendSpikeConfig) -> Self {
        Self { cfg }
    }

    async fn find(&self, pool: &PgPool) -> Result<Vec<Finding>, sqlx::Error> {
        let rows: Vec<(Uuid, DateTime<Utc>, i64, i64)> = sqlx::query_as(
            "WITH spend AS ( \
               SELECT user_id, \
                 coalesce(sum(abs(amount)) FILTER (WHERE created_at >= date_trunc('hour', now())), 0) AS hour_spend, \
                 coalesce(sum(abs(amount)) FILTER (WHERE created_at < date_trunc('hour', now())), 0) AS base_spend \
               FROM public.token_balance_history \
               WHERE kind IN ('consume', 'settle') \
                 AND created_at >= date_trunc('hour', now()) - make_interval(days => $1) \
               GROUP BY user_id) \
             SELECT user_id, date_trunc('hour', now()), hour_spend::bigint, base_spend::bigint \
               FROM spend \
              WHERE hour_spend >= $2 AND hour_spend * ($1 * 24) > $3 * base_spend",
        )
        .bind(self.cfg.baseline_days as i32)
        .bind(self.cfg.min_spend)
        .bind(i64::from(self.cfg.factor))
        .fetch_all(pool)
        .await?;
        let hours = i64::from(self.cfg.baseline_days) * 24;
        Ok(rows
            .into_iter()
            .map(|(user_id, start, hour_spend, base_spend)| Finding {
                user_id,
                window_start: start,
                window_end: start + chrono::Duration::hours(1),
                details: serde_json::json!({
                    "hour_spend": hour_spend,
                    "baseline_spend": base_spend,
                    "baseline_hours": hours,
                    "baseline_hourly_avg": base_spend as f64 / hours as f64,
                    "factor": self.cfg.factor,
                    "min_spend": self.cfg.min_spend,
                }),
            })
            .collect())
    }
}

impl AnomalyRule for SpendSpikeRule {
    fn name(&self) -> &str {
        SPEND_SPIKE
    }

    fn severity(&self) -> Severity {
        self.cfg.severity
    }

    fn evaluate<'a>(&'a self, pool: &'a PgPool) -> RuleFuture<'a> {
        Box::pin(self.find(pool))
    }
}

/// The rules enabled in `[maintenance.anomalies]`.
pub fn builtin_rules(cfg: &AnomaliesConfig) -> Vec<Arc<dyn AnomalyRule>> {
    let mut rules: Vec<Arc<dyn AnomalyRule>> = Vec::new();
    if cfg.request_burst.enabled {
        rules.push(Arc::new(WindowCountRule::new(
            REQUEST_BURST,
            LEDGER_REQUEST_EVENTS,
            cfg.request_kinds.clone(),
            &cfg.request_burst,
            Duration::from_secs(cfg.lookback_secs),
        )));
    }
    if cfg.spend_spike.enabled {
        rules.push(Arc::new(SpendSpikeRule::new(cfg.spend_spike.clone())));
    }
    rules
}

/// A stored finding, as listed by the CLI and posted to the webhook.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AnomalyRow {
    pub id: i64,
    pub user_id: Uuid,
    pub rule: String,
    pub severity: String,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    pub details: serde_json::Value,
    pub detected_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
}

/// Why part of a detection pass failed; the other rules and findings still ran.
#[derive(Debug, thiserror::Error)]
pub enum DetectionFailure {
    #[error("{rule}: {source}")]
    Rule {
        rule: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("{rule} storing {user}: {source}")]
    Store {
        rule: String,
        user: Uuid,
        #[source]
        source: sqlx::Error,
    },
}

/// What one detection pass did.
#[derive(Debug, Default)]
pub struct Detection {
    /// Findings this pass stored (new windows), in rule order.
    pub new: Vec<AnomalyRow>,
    /// What failed; stored findings stay, and a rerun de-duplicates them.
    pub failures: Vec<DetectionFailure>,
}

/// The rules a detection job evaluates. Building it exports every rule's counter at zero, so
/// a rule that never fired is visible in `/metrics`.
pub struct Detector {
    rules: Vec<Arc<dyn AnomalyRule>>,
}

impl Detector {
    pub fn new(rules: Vec<Arc<dyn AnomalyRule>>) -> Self {
        for r in &rules {
            metrics::counter!("tokenwarden_anomalies_total", "rule" => r.name().to_string(), "severity" => r.severity().as_str())
                .increment(0);
        }
        Self { rules }
    }

    /// Evaluates every rule once and stores its new findings.
    pub async fn run(&self, pool: &PgPool) -> Detection {
        let mut out = Detection::default();
        for rule in &self.rules {
            let findings = match rule.evaluate(pool).await {
                Ok(f) => f,
                Err(source) => {
                    tracing::error!(rule = rule.name(), error = %source, "anomaly rule failed");
                    out.failures.push(DetectionFailure::Rule {
                        rule: rule.name().to_string(),
                        source,
                    });
                    continue;
                }
            };
            for f in findings {
                match store(pool, rule.as_ref(), &f).await {
                    Ok(Some(row)) => {
                        tracing::warn!(
                            id = row.id, user = %row.user_id, rule = %row.rule,
                            severity = %row.severity, details = %row.details,
                            "usage anomaly detected"
                        );
                        metrics::counter!("tokenwarden_anomalies_total", "rule" => row.rule.clone(), "severity" => rule.severity().as_str())
                            .increment(1);
                        out.new.push(row);
                    }
                    Ok(None) => {}
                    Err(source) => {
                        tracing::error!(rule = rule.name(), user = %f.user_id, error = %source, "cannot store finding");
                        out.failures.push(DetectionFailure::Store {
                            rule: rule.name().to_string(),
                            user: f.user_id,
                            source,
                        });
                    }
                }
            }
        }
        out
    }
}

/// Inserts a finding unless an overlapping one of the same user and rule exists.
async fn store(
    pool: &PgPool,
    rule: &dyn AnomalyRule,
    f: &Finding,
) -> Result<Option<AnomalyRow>, sqlx::Error> {
    sqlx::query_as(
        "INSERT INTO public.token_anomalies \
           (user_id, rule, severity, window_start, window_end, details) \
         SELECT $1, $2, $3, $4, $5, $6 \
          WHERE NOT EXISTS ( \
            SELECT 1 FROM public.token_anomalies a \
             WHERE a.user_id = $1 AND a.rule = $2 \
               AND a.window_start <= $5 AND a.window_end >= $4) \
         ON CONFLICT (user_id, rule, window_start) DO NOTHING \
         RETURNING id, user_id, rule, severity, window_start, window_end, details, \
                   detected_at, resolved_at",
    )
    .bind(f.user_id)
    .bind(rule.name())
    .bind(rule.severity().as_str())
    .bind(f.window_start)
    .bind(f.window_end)
    .bind(&f.details)
    .fetch_optional(pool)
    .await
}

/// Why an operator's anomaly command failed.
#[derive(Debug, thiserror::Error)]
pub enum AnomalyError {
    #[error("database error while {action}: {source}")]
    Database {
        action: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("anomaly {0} does not exist")]
    NotFound(i64),
    #[error("anomaly {id} was already resolved at {at}")]
    AlreadyResolved { id: i64, at: DateTime<Utc> },
}

/// Open anomalies (or all), newest first.
pub async fn list(pool: &PgPool, all: bool, limit: i64) -> Result<Vec<AnomalyRow>, AnomalyError> {
    sqlx::query_as(
        "SELECT id, user_id, rule, severity, window_start, window_end, details, detected_at, \
                resolved_at \
           FROM public.token_anomalies \
          WHERE $1 OR resolved_at IS NULL \
          ORDER BY detected_at DESC, id DESC LIMIT $2",
    )
    .bind(all)
    .bind(limit)
    .fetch_all(pool)
    .await
    .map_err(|source| AnomalyError::Database {
        action: "listing anomalies",
        source,
    })
}

/// Sets `resolved_at` on an open anomaly, lifting any block it imposed.
pub async fn resolve(pool: &PgPool, id: i64) -> Result<AnomalyRow, AnomalyError> {
    let db = |source| AnomalyError::Database {
        action: "resolving an anomaly",
        source,
    };
    let updated: Option<AnomalyRow> = sqlx::query_as(
        "UPDATE public.token_anomalies SET resolved_at = now() \
          WHERE id = $1 AND resolved_at IS NULL \
          RETURNING id, user_id, rule, severity, window_start, window_end, details, \
                    detected_at, resolved_at",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(db)?;
    if let Some(row) = updated {
        return Ok(row);
    }
    let existing: Option<Option<DateTime<Utc>>> =
        sqlx::query_scalar("SELECT resolved_at FROM public.token_anomalies WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await
            .map_err(db)?;
    match existing {
        None => Err(AnomalyError::NotFound(id)),
        Some(Some(at)) => Err(AnomalyError::AlreadyResolved { id, at }),
        // Resolved concurrently between the two statements.
        Some(None) => Err(AnomalyError::NotFound(id)),
    }
}
