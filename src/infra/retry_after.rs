//! `Retry-After` (RFC 9110 §10.2.3), read the same way by every HTTP client of the worker
//! (GoldRush, the external verifiers).

use std::str::FromStr;
use std::time::{Duration, SystemTime};

/// Parses `Retry-After`: delta-seconds or an HTTP date (RFC 9110 §10.2.3). A date in the past
/// means "now".
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = u64::from_str(value) {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}
