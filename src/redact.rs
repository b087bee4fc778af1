//! Making connection strings safe to show: one place for every log line and error message
//! that names a database, a Redis or an RPC endpoint.

/// Strips a password from a connection URL so it can be logged or shown in an error.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable url>".to_string(),
    }
}

/// An endpoint for display where its path, query or user info may hold a secret (RPC
/// providers put the API key in the path, e.g. `…/v2/KEY`): `scheme://host[:port]/…` only.
pub fn redact_endpoint(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => {
            let host = u.host_str().unwrap_or("");
            match u.port() {
                Some(p) => format!("{}://{host}:{p}/…", u.scheme()),
                None => format!("{}://{host}/…", u.scheme()),
            }
        }
        Err(_) => "<unparseable url>".to_string(),
    }
}

/// Replaces every occurrence of each of `urls` in `message` by its [`redact_endpoint`] form:
/// reqwest and alloy put the full URL (API key included) in their messages, and these reach
/// logs, fault rows and the CLI.
/// Both the configured spelling and the parsed one (`url` adds a trailing `/` to a bare host
/// and lowercases the host) are replaced, as error messages quote the latter.
pub fn scrub_endpoints(message: &str, urls: &[String]) -> String {
    // Two passes through markers, so a redacted form (which starts like a bare-host URL) is
    // never matched again by a shorter spelling.
    let mut out = message.to_string();
    let mut redacted = Vec::with_capacity(urls.len());
    for (i, u) in urls.iter().enumerate() {
        let mut spellings = vec![u.clone()];
        if let Ok(parsed) = url::Url::parse(u) {
            spellings.push(parsed.as_str().to_string());
            spellings.push(parsed.as_str().trim_end_matches('/').to_string());
        }
        // Longest first, so a prefix spelling does not leave the tail of a longer one behind.
        spellings.sort_by_key(|s| std::cmp::Reverse(s.len()));
        spellings.dedup();
        let marker = format!("\u{0}{i}\u{0}");
        for sp in spellings.iter().filter(|s| !s.is_empty()) {
            out = out.replace(sp.as_str(), &marker);
        }
        redacted.push((marker, redact_endpoint(u)));
    }
    for (marker, r) in redacted {
        out = out.replace(&marker, &r);
    }
    out
}

#[cfg(test)]
mod redact_tests {
    use super::{redact_endpoint, scrub_endpoints};

    #[test]
    fn redact_endpoint_keeps_only_scheme_host_and_port() {
        assert_eq!(
            redact_endpoint("https://eth-mainnet.g.alchemy.com/v2/SECRETKEY?x=1"),
            "https://eth-mainnet.g.alchemy.com/…"
        );
        assert_eq!(
            redact_endpoint("https://eth-mainnet.g.alchemy.com/v2/SECRETKEY"),
            "https://eth-mainnet.g.alchemy.com/…"
        );
        assert_eq!(
            redact_endpoint("wss://user:pass@rpc.example.org:8546/ws/KEY#frag"),
            "wss://rpc.example.org:8546/…"
        );
        assert_eq!(
            redact_endpoint("http://127.0.0.1:8545"),
            "http://127.0.0.1:8545/…"
        );
        assert_eq!(
            redact_endpoint("https://user:pw@rpc.example:8545/path?apikey=SECRET"),
            "https://rpc.example:8545/…"
        );
        assert_eq!(
            redact_endpoint("wss://node.example/ws/KEY"),
            "wss://node.example/…"
        );
        assert_eq!(redact_endpoint("not a url KEY"), "<unparseable url>");
        for out in [
            redact_endpoint("https://h/v2/SECRETKEY"),
            redact_endpoint("https://SECRETKEY@h/"),
            redact_endpoint("https://h/?key=SECRETKEY"),
        ] {
            assert!(!out.contains("SECRETKEY"), "{out}");
        }
    }

    #[test]
    fn configured_urls_are_scrubbed_from_messages() {
        let urls = vec![
            "https://eth.example/v2/SECRETKEY".to_string(),
            "http://127.0.0.1:1?key=QSECRET".to_string(),
            "https://Bare.Example".to_string(),
        ];
        let msg = "error sending request for url (https://eth.example/v2/SECRETKEY): boom; \
                   http://127.0.0.1:1/?key=QSECRET refused; https://bare.example/ down";
        let out = scrub_endpoints(msg, &urls);
        assert!(!out.contains("SECRETKEY"), "{out}");
        assert!(!out.contains("QSECRET"), "{out}");
        assert!(out.contains("https://eth.example/…"), "{out}");
        assert!(out.contains("http://127.0.0.1:1/…"), "{out}");
        assert!(out.contains("https://bare.example/… down"), "{out}");
    }
}
