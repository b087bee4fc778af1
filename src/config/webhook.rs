//! Webhook URLs in configuration: secrets, checked without ever being repeated.

/// Parses a webhook URL held as a secret: `Ok(None)` when empty, an error that does not repeat
/// the URL (it carries a secret) when it is not an http(s) URL.
pub fn parse_webhook_url(raw: &secrecy::SecretString) -> Result<Option<url::Url>, &'static str> {
    use secrecy::ExposeSecret;
    let raw = raw.expose_secret().trim();
    if raw.is_empty() {
        return Ok(None);
    }
    match url::Url::parse(raw) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(Some(u)),
        _ => Err("not a valid http(s) URL"),
    }
}
