//! Sign-In with Ethereum (EIP-4361) messages: parsed by the `siwe` crate, then held to what
//! tokenwarden accepts (domain, chain, time window). Pure: the nonce and the signature are
//! checked by [`super::link`] against the store and the chain.

use std::collections::BTreeSet;

use alloy::primitives::Address;
use chrono::{DateTime, Utc};

use super::refusal::{LinkRefusal, Refused};

/// A message that parsed and passed the static checks.
#[derive(Debug, Clone)]
pub(crate) struct CheckedMessage {
    /// The message exactly as signed (the signature covers these bytes).
    pub text: String,
    pub address: Address,
    pub chain_id: u64,
    pub nonce: String,
}

/// What a message must satisfy besides its format.
#[derive(Debug, Clone)]
pub(crate) struct SiwePolicy {
    pub domains: BTreeSet<String>,
    pub chains: BTreeSet<u64>,
    pub clock_skew_secs: i64,
}

impl SiwePolicy {
    /// Parses `text` and checks its domain, chain and time window at `now`.
    pub fn check(&self, text: &str, now: DateTime<Utc>) -> Result<CheckedMessage, Refused> {
        let msg: ::siwe::Message = text
            .parse()
            .map_err(|e: ::siwe::ParseError| Refused::new(LinkRefusal::MalformedMessage, e))?;
        let domain = msg.domain.to_string();
        if !self.domains.contains(&domain) {
            return Err(Refused::new(
                LinkRefusal::WrongDomain,
                format!("domain {domain:?} is not one of access.siwe_domains"),
            ));
        }
        if !self.chains.contains(&msg.chain_id) {
            return Err(Refused::new(
                LinkRefusal::WrongChain,
                format!("chain {} is not a chain tokenwarden follows", msg.chain_id),
            ));
        }
        let now_s = now.timestamp();
        let skew = self.clock_skew_secs;
        let issued = msg.issued_at.as_ref().unix_timestamp();
        if issued > now_s + skew {
            return Err(Refused::new(
                LinkRefusal::NotYetValid,
                format!("Issued At {} is in the future", msg.issued_at),
            ));
        }
        if let Some(nbf) = &msg.not_before
            && nbf.as_ref().unix_timestamp() > now_s + skew
        {
            return Err(Refused::new(
                LinkRefusal::NotYetValid,
                format!("Not Before {nbf} has not come"),
            ));
        }
        if let Some(exp) = &msg.expiration_time
            && exp.as_ref().unix_timestamp() + skew < now_s
        {
            return Err(Refused::new(
                LinkRefusal::Expired,
                format!("Expiration Time {exp} has passed"),
            ));
        }
        Ok(CheckedMessage {
            text: text.to_string(),
            address: Address::from(msg.address),
            chain_id: msg.chain_id,
            nonce: msg.nonce,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> SiwePolicy {
        SiwePolicy {
            domains: ["app.example.com".to_string()].into(),
            chains: [1514].into(),
            clock_skew_secs: 60,
        }
    }

    fn message(domain: &str, chain: u64, extra: &str) -> String {
        format!(
            "{domain} wants you to sign in with your Ethereum account:\n\
             0x6Da01670d8fc844e736095918bbE11fE8D564163\n\n\
             Link this wallet\n\n\
             URI: https://{domain}/login\n\
             Version: 1\n\
             Chain ID: {chain}\n\
             Nonce: 0123456789abcdef0123456789abcdef\n\
             Issued At: 2026-12-01T10:00:00Z{extra}"
        )
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().expect("time")
    }

    #[test]
    fn a_good_message_passes_with_its_fields() {
        let m = policy()
            .check(
                &message("app.example.com", 1514, ""),
                at("2026-12-01T10:01:00Z"),
            )
            .expect("valid");
        assert_eq!(m.chain_id, 1514);
        assert_eq!(m.nonce, "0123456789abcdef0123456789abcdef");
        assert_eq!(
            m.address,
            "0x6Da01670d8fc844e736095918bbE11fE8D564163"
                .parse::<Address>()
                .expect("address")
        );
    }

    #[test]
    fn each_bad_field_is_refused_with_its_reason() {
        let now = at("2026-12-01T10:01:00Z");
        let reason = |text: &str| policy().check(text, now).expect_err("refused").reason;
        assert_eq!(reason("hello"), LinkRefusal::MalformedMessage);
        assert_eq!(
            reason(&message("evil.example.com", 1514, "")),
            LinkRefusal::WrongDomain
        );
        assert_eq!(
            reason(&message("app.example.com", 1, "")),
            LinkRefusal::WrongChain
        );
        assert_eq!(
            reason(&message(
                "app.example.com",
                1514,
                "\nExpiration Time: 2026-12-01T09:00:00Z"
            )),
            LinkRefusal::Expired
        );
        assert_eq!(
            reason(&message(
                "app.example.com",
                1514,
                "\nExpiration Time: 2026-12-02T09:00:00Z\nNot Before: 2026-12-01T11:00:00Z"
            )),
            LinkRefusal::NotYetValid
        );
        let early = policy()
            .check(
                &message("app.example.com", 1514, ""),
                at("2026-12-01T09:00:00Z"),
            )
            .expect_err("issued in the future");
        assert_eq!(early.reason, LinkRefusal::NotYetValid);
    }
}
