//! The `run` command: connects to the stores, starts every part enabled in config (queue
//! consumers, chain indexers, scheduler, operations endpoint) and stops them on SIGTERM/SIGINT.

use std::sync::Arc;

use crate::app::AppContext;
use crate::config::Config;

/// Why the worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] crate::infra::StoreError),
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error(transparent)]
    AccessSettings(#[from] crate::access::settings::SettingsError),
    #[error(transparent)]
    Ops(#[from] crate::maintenance::http::HttpError),
    #[error(transparent)]
    Queue(#[from] crate::queue::QueueError),
}

/// The job handlers this process serves: one line per handler. A job type without a line
/// here is not consumed (its stream just grows).
pub fn job_registry(
    ctx: &AppContext,
    maintenance: &crate::maintenance::MaintenanceJobs,
    decisions: &Arc<crate::access::cache::DecisionCache>,
) -> crate::queue::JobRegistry {
    let mut jobs = crate::queue::JobRegistry::new();
    let ledger = crate::ledger::Ledger::new(ctx.pool.clone(), ctx.cfg.ledger.clone());
    let (batcher, _) = crate::ledger::batcher::Batcher::spawn(
        std::sync::Arc::new(ledger),
        ctx.cfg.ledger.max_batch,
    );
    crate::ledger::jobs::register(&mut jobs, &batcher);
    match crate::snapshots::SnapshotService::from_config(ctx.pool.clone(), &ctx.cfg.snapshots) {
        Ok(service) => {
            jobs.register(crate::snapshots::SnapshotCreateHandler::new(Arc::new(
                service,
            )));
        }
        Err(e) => tracing::error!(error = %e, "snapshot_create jobs are not served"),
    }
    jobs.register(crate::chain::job::IndexTokenHandler::new(ctx.pool.clone()));
    let wallets = crate::access::WalletStore::new(ctx.pool.clone());
    match crate::access::WalletLinker::from_config(wallets, &ctx.cfg, ctx.shutdown.clone()) {
        Ok(linker) => {
            crate::access::jobs::register(&mut jobs, Arc::new(linker), Some(decisions.clone()))
        }
        Err(e) => tracing::error!(error = %e, "link_wallet and unlink_wallet jobs are not served"),
    }
    jobs.register(crate::access::rule_job::AccessRuleHandler::new(Arc::new(
        crate::access::RuleStore::new(ctx.pool.clone()),
    )));
    let (audit, _) =
        crate::access::audit::AuditRecorder::spawn(ctx.pool.clone(), &ctx.cfg.access.audit);
    let mut checker = crate::access::AccessChecker::new(ctx.pool.clone());
    match crate::access::verifiers::Verifiers::from_config(&ctx.cfg.access) {
        Ok(v) => checker = checker.with_verifiers(Arc::new(v)),
        Err(e) => {
            tracing::error!(error = %e, "external verifiers unavailable; external leaves use the fallback")
        }
    }
    jobs.register(crate::access::check_job::VerifyAccessHandler::new(
        Arc::new(crate::access::service::AccessService::new(
            checker,
            Some(decisions.clone()),
        )),
        audit,
    ));
    jobs.register(crate::whitelist::RequestWhitelistHandler::new(Arc::new(
        crate::whitelist::WhitelistStore::new(ctx.pool.clone()),
    )));
    for handler in maintenance.handlers() {
        jobs.register_arc(handler);
    }
    jobs
}

/// Runs the worker until a shutdown signal arrives, then stops taking new work, lets in-flight
/// jobs finish within `queue.shutdown_grace_secs` and returns.
pub async fn run(cfg: Config) -> Result<(), WorkerError> {
    let ctx = AppContext::connect(cfg).await?;
    // Before anything is served: both ledger doors enforce the bounds of this config.
    crate::ledger::Ledger::new(ctx.pool.clone(), ctx.cfg.ledger.clone())
        .write_settings()
        .await?;
    // The SQL side of access (nonce door, staleness) enforces the bounds of this config.
    crate::access::settings::write_settings(&ctx.pool, &ctx.cfg.access).await?;
    let indexers = crate::chain::spawn_indexers(&ctx);
    let head_watchers = crate::access::heads::spawn(&ctx);
    // Decisions cached by this replica are evicted by balance and rule changes in every replica.
    let decisions = Arc::new(crate::access::cache::DecisionCache::new(
        ctx.redis.clone(),
        &ctx.cfg.redis.prefix,
        &ctx.cfg.access,
    ));
    let invalidator = crate::access::invalidation::spawn(&ctx, decisions.clone());
    // Grants and revocations: one replica acts (its own lease), the others stand by.
    let monitor = ctx
        .cfg
        .access
        .monitor_enabled
        .then(|| crate::access::monitor::spawn(&ctx));
    let maintenance = crate::maintenance::MaintenanceJobs::new(&ctx);
    let ops = crate::maintenance::http::spawn(ctx.clone()).await?;
    let scheduler = ctx.cfg.maintenance.enabled.then(|| {
        let mut scheduled = maintenance.handlers();
        scheduled.push(Arc::new(crate::access::recheck::AccessRecheck::new(
            crate::access::transitions::TransitionStore::new(ctx.pool.clone()),
            ctx.cfg.access.recheck_batch,
        )));
        crate::maintenance::scheduler::spawn(ctx.clone(), scheduled)
    });
    tracing::info!("tokenwarden worker started");
    let signal_token = ctx.shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown signal received");
        signal_token.cancel();
    });
    let registry = job_registry(&ctx, &maintenance, &decisions);
    let queue = crate::queue::run_consumers(&ctx, registry).await;
    ctx.shutdown.cancel();
    for h in indexers
        .into_iter()
        .chain(head_watchers)
        .chain(invalidator.tasks)
        .chain(monitor.map(|m| m.task))
    {
        let _ = h.await;
    }
    if let Some(scheduler) = scheduler {
        let _ = scheduler.await;
    }
    // Everything has drained; the endpoint (answering readyz = 503 since the signal) goes too.
    ops.abort();
    queue?;
    tracing::info!("tokenwarden worker stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C will stop the worker");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
