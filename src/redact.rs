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

#[cfg(test)]
mod redact_tests {
    use super::redact_endpoint;

    #[test]
    fn redact_endpoint_keeps_only_scheme_host_and_port() {
        assert_eq!(
            redact_endpoint("https://eth-mainnet.g.alchemy.com/v2/SECRETKEY?x=1"),
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
        assert_eq!(redact_endpoint("not a url KEY"), "<unparseable url>");
        for out in [
            redact_endpoint("https://h/v2/SECRETKEY"),
            redact_endpoint("https://SECRETKEY@h/"),
            redact_endpoint("https://h/?key=SECRETKEY"),
        ] {
            assert!(!out.contains("SECRETKEY"), "{out}");
        }
    }
}
