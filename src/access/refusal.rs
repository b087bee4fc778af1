//! Why a wallet link was refused: a closed set of reasons callers branch on, each with a
//! sentence for people.

/// The reason code of a refused `link_wallet` (the reply's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRefusal {
    /// The text is not an EIP-4361 message.
    MalformedMessage,
    /// The signature is not hex, or not 65 bytes for a key that is not a contract.
    MalformedSignature,
    /// The message names a domain that is not in `access.siwe_domains`.
    WrongDomain,
    /// The message's Chain ID is not a chain tokenwarden follows.
    WrongChain,
    /// `Expiration Time` has passed.
    Expired,
    /// `Issued At` is in the future or `Not Before` has not come.
    NotYetValid,
    /// tokenwarden never issued this nonce to this user (or forgot it after it expired).
    UnknownNonce,
    /// The nonce was already used by another request.
    NonceUsed,
    /// The nonce's lifetime (`access.siwe_nonce_ttl_secs`) has passed.
    NonceExpired,
    /// Neither the recovered signer nor the address's ERC-1271 `isValidSignature` vouches for
    /// the message.
    WrongSigner,
}

impl LinkRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkRefusal::MalformedMessage => "malformed_message",
            LinkRefusal::MalformedSignature => "malformed_signature",
            LinkRefusal::WrongDomain => "wrong_domain",
            LinkRefusal::WrongChain => "wrong_chain",
            LinkRefusal::Expired => "expired",
            LinkRefusal::NotYetValid => "not_yet_valid",
            LinkRefusal::UnknownNonce => "unknown_nonce",
            LinkRefusal::NonceUsed => "nonce_used",
            LinkRefusal::NonceExpired => "nonce_expired",
            LinkRefusal::WrongSigner => "wrong_signer",
        }
    }
}

/// A refusal with its reason and what exactly was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", reason.as_str())]
pub struct Refused {
    pub reason: LinkRefusal,
    pub detail: String,
}

impl Refused {
    pub fn new(reason: LinkRefusal, detail: impl ToString) -> Self {
        Refused {
            reason,
            detail: detail.to_string(),
        }
    }
}
