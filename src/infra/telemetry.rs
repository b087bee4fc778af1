//! Logging (tracing) set-up.
//!
//! Human-readable lines by default; one JSON object per line when `telemetry.format = "json"`,
//! for log collectors. Metrics are recorded with the `metrics` crate throughout the code and
//! served by the operations endpoint (`maintenance::http`).

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::{LogFormat, TelemetryConfig};

/// Targets whose spans carry a secret, capped at `info` whatever the configured level:
/// alloy's HTTP transports open a `debug` span with the full RPC URL (providers put the API key
/// in its path), and every event inside it would print that URL.
const SECRET_BEARING_TARGETS: &[&str] = &["alloy_transport_http=info"];

/// Installs the global tracing subscriber. `RUST_LOG`, when set, wins over `telemetry.level`,
/// except for [`SECRET_BEARING_TARGETS`].
pub fn init(cfg: &TelemetryConfig) {
    let mut filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    for directive in SECRET_BEARING_TARGETS {
        if let Ok(d) = directive.parse() {
            filter = filter.add_directive(d);
        }
    }
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
