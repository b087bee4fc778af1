//! Usage anomaly detection: rules, the `detect_anomalies` job, and the alert webhook.
//!
//! A rule ([`AnomalyRule`]) looks at Postgres and returns [`Finding`]s (user, window, details).
//! The job stores each finding in `token_anomalies` unless the same user already has a finding
//! of that rule whose window overlaps (so one burst is one row however often detection runs),
//! counts it, and hands new findings to the alert webhook in the background. A finding with
//! severity `block` makes the ledger answer `rate_limited` to that user's consumption until an
//! operator resolves it (`tokenwarden anomalies resolve <id>`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::jobs::parse_payload;
use crate::config::{AlertsConfig, AnomaliesConfig, BurstRuleConfig, Severity, SpendSpikeConfig};
use crate::queue::{JobError, JobFuture, JobHandler};

/// Job type of the detection job.
pub const DETECT_ANOMALIES: &str = "detect_anomalies";

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
/// it to [`super::MaintenanceJobs::with_extra_rules`]; storage, de-duplication, metrics,
/// enforcement and alerts are the detection job's business, not the rule's.
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

/// The `detect_anomalies` job. Reply: `{found: n}` (new findings stored by this run).
pub struct DetectAnomalies {
    pool: PgPool,
    rules: Arc<Vec<Arc<dyn AnomalyRule>>>,
    alerter: Alerter,
}

impl DetectAnomalies {
    pub fn new(pool: PgPool, rules: Vec<Arc<dyn AnomalyRule>>, alerter: Alerter) -> Self {
        for r in &rules {
            metrics::counter!("tokenwarden_anomalies_total", "rule" => r.name().to_string(), "severity" => r.severity().as_str())
                .increment(0);
        }
        Self {
            pool,
            rules: Arc::new(rules),
            alerter,
        }
    }

    /// Runs every rule once; returns the findings that were new.
    pub async fn run(&self) -> Result<Vec<AnomalyRow>, JobError> {
        run_rules(&self.pool, &self.rules, &self.alerter).await
    }
}

async fn run_rules(
    pool: &PgPool,
    rules: &[Arc<dyn AnomalyRule>],
    alerter: &Alerter,
) -> Result<Vec<AnomalyRow>, JobError> {
    let mut new_rows = Vec::new();
    let mut failures = Vec::new();
    for rule in rules {
        let findings = match rule.evaluate(pool).await {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(rule = rule.name(), error = %e, "anomaly rule failed");
                failures.push(format!("{}: {e}", rule.name()));
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
                    alerter.send(&row);
                    new_rows.push(row);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(rule = rule.name(), user = %f.user_id, error = %e, "cannot store finding");
                    failures.push(format!("{} storing {}: {e}", rule.name(), f.user_id));
                }
            }
        }
    }
    if failures.is_empty() {
        Ok(new_rows)
    } else {
        // Stored findings stay; a retry de-duplicates them.
        Err(JobError::Retryable(format!(
            "anomaly detection incomplete: {}",
            failures.join("; ")
        )))
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

impl JobHandler for DetectAnomalies {
    fn job_type(&self) -> &'static str {
        DETECT_ANOMALIES
    }

    fn handle(&self, payload: serde_json::Value) -> JobFuture {
        let pool = self.pool.clone();
        let rules = self.rules.clone();
        let alerter = self.alerter.clone();
        Box::pin(async move {
            parse_payload(DETECT_ANOMALIES, payload)?;
            let found = run_rules(&pool, &rules, &alerter).await?;
            Ok(serde_json::json!({ "found": found.len() }))
        })
    }
}

/// Posts new findings to the alert webhook from a background task, so detection never waits
/// for (or fails because of) the receiver.
#[derive(Clone, Default)]
pub struct Alerter {
    tx: Option<mpsc::Sender<AnomalyRow>>,
}

impl Alerter {
    /// No webhook: findings are only stored and logged.
    pub fn disabled() -> Self {
        Self { tx: None }
    }

    /// Reads the webhook URL from the environment variable named in config; disabled when it
    /// is unset or empty, or not a valid http(s) URL (logged).
    pub fn from_config(cfg: &AlertsConfig) -> Self {
        let raw = std::env::var(&cfg.webhook_url_env).unwrap_or_default();
        if raw.trim().is_empty() {
            return Self::disabled();
        }
        match url::Url::parse(raw.trim()) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => Self::start(u, cfg),
            _ => {
                tracing::error!(
                    var = %cfg.webhook_url_env,
                    "alert webhook URL is not a valid http(s) URL; alerts disabled"
                );
                Self::disabled()
            }
        }
    }

    /// Starts the delivery task for `url`. Must run inside the tokio runtime.
    pub fn start(url: url::Url, cfg: &AlertsConfig) -> Self {
        let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(cfg.timeout_secs))
            .build()
            .unwrap_or_default();
        tokio::spawn(deliver_loop(client, url, cfg.max_retries, rx));
        Self { tx: Some(tx) }
    }

    /// Queues `row` for delivery; drops it (counted, logged) when the queue is full.
    pub fn send(&self, row: &AnomalyRow) {
        let Some(tx) = &self.tx else { return };
        if let Err(e) = tx.try_send(row.clone()) {
            metrics::counter!("tokenwarden_anomaly_alerts_total", "outcome" => "dropped")
                .increment(1);
            tracing::warn!(id = row.id, error = %e, "alert queue full or closed; alert dropped (finding is stored)");
        }
    }
}

#[derive(Debug)]
struct AlertError {
    retryable: bool,
    retry_after: Option<Duration>,
    msg: String,
}

async fn deliver_loop(
    client: reqwest::Client,
    url: url::Url,
    max_retries: u32,
    mut rx: mpsc::Receiver<AnomalyRow>,
) {
    while let Some(row) = rx.recv().await {
        let body = serde_json::json!({ "event": "token_anomaly", "anomaly": row });
        let attempt = || async {
            let resp = client
                .post(url.clone())
                .json(&body)
                .send()
                .await
                .map_err(|e| AlertError {
                    retryable: true,
                    retry_after: None,
                    msg: format!("request failed: {}", e.without_url()),
                })?;
            let status = resp.status();
            if status.is_success() {
                return Ok(());
            }
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            Err(AlertError {
                retryable: status.is_server_error() || status.as_u16() == 429,
                retry_after,
                msg: format!("webhook answered {status}"),
            })
        };
        let policy = ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(30))
            .with_max_times(max_retries as usize);
        let res = attempt
            .retry(policy)
            .when(|e: &AlertError| e.retryable)
            .adjust(|e: &AlertError, d| d.map(|d| e.retry_after.unwrap_or(d)))
            .await;
        match res {
            Ok(()) => {
                metrics::counter!("tokenwarden_anomaly_alerts_total", "outcome" => "delivered")
                    .increment(1);
            }
            Err(e) => {
                metrics::counter!("tokenwarden_anomaly_alerts_total", "outcome" => "failed")
                    .increment(1);
                tracing::error!(id = row.id, error = %e.msg, "alert webhook delivery failed");
            }
        }
    }
}
