//! Logging (tracing) set-up.
//!
//! Human-readable lines by default; one JSON object per line when `telemetry.format = "json"`,
//! for log collectors. Metrics are recorded with the `metrics` crate throughout the code and
//! served by the operations endpoint (`maintenance::http`).

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::{LogFormat, TelemetryConfig};

/// Installs the global tracing subscriber. `RUST_LOG`, when set, wins over `telemetry.level`.
pub fn init(cfg: &TelemetryConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    // `try_init` fails only if a subscriber is already installed (tests); that one stays.
    let _ = match cfg.format {
        LogFormat::Human => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
}
