//! `tw_access_settings`: the `[access]` values the SQL side enforces (nonce bounds, the
//! staleness threshold; the verifiers in `tw_access_verifiers`), written by the worker at start so every door applies the same ones.

use sqlx::PgPool;

use crate::config::AccessConfig;

/// Writing the settings row or the verifiers failed.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("write tw_access_settings: {0}")]
    Settings(#[from] sqlx::Error),
    #[error(transparent)]
    Verifiers(#[from] super::verifiers::RegisterError),
}

/// Puts `cfg`'s SQL-enforced values into `tw_access_settings`.
pub async fn write_settings(pool: &PgPool, cfg: &AccessConfig) -> Result<(), SettingsError> {
    sqlx::query(
        "UPDATE public.tw_access_settings SET nonce_ttl_secs = $1, max_open_nonces = $2, \
         stale_after_blocks = $3, updated_at = now() WHERE id = 1",
    )
    .bind(i32::try_from(cfg.siwe_nonce_ttl_secs).unwrap_or(i32::MAX))
    .bind(i32::try_from(cfg.siwe_max_open_nonces).unwrap_or(i32::MAX))
    .bind(i64::try_from(cfg.stale_after_blocks).unwrap_or(i64::MAX))
    .execute(pool)
    .await?;
    // The verifier names an external leaf may use, and their fallback settings.
    super::verifiers::register(pool, cfg).await?;
    Ok(())
}
