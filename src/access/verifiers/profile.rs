//! The wire formats of the verifier profiles: what one call sends and how its answer is read.
//! A body that does not match the format is an error naming what is wrong, never a denial.

use alloy::primitives::U256;
use serde_json::{Value, json};

use crate::config::VerifierProfile;

/// What a verifier said about one wallet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// The balance in base units (`alchemy`).
    Amount(U256),
    /// Whether the wallet holds at least the minimum asked (`tomo`).
    HasTokens(bool),
}

/// One question to a verifier.
#[derive(Debug, Clone)]
pub struct Ask<'a> {
    pub chain_id: u64,
    /// Lowercase 0x address.
    pub wallet: &'a str,
    pub contract: &'a str,
    pub min: U256,
}

/// The JSON body of the call (the key is never in it: it goes in a header).
pub fn request_body(profile: VerifierProfile, ask: &Ask<'_>) -> Value {
    match profile {
        // The seed's TomoIntegrationService.verifyTokenOwnership, without its `api_key` field.
        // `min_amount` is a JSON number (the seed's type) while it is exact in a JavaScript
        // number (2^53), else a decimal string.
        VerifierProfile::Tomo => {
            let min = match u64::try_from(ask.min) {
                Ok(m) if m <= (1u64 << 53) => json!(m),
                _ => json!(ask.min.to_string()),
            };
            json!({
                "wallet_address": ask.wallet,
                "contract_address": ask.contract,
                "chain_id": ask.chain_id,
                "min_amount": min,
            })
        }
        // https://www.alchemy.com/docs/data/token-api/token-api-endpoints/alchemy-get-token-balances
        VerifierProfile::Alchemy => json!({
            "jsonrpc": "2.0",
            "method": "alchemy_getTokenBalances",
            "params": [ask.wallet, [ask.contract]],
            "id": 1,
        }),
    }
}

/// Reads a 2xx body. `Err` says what does not match the profile's format.
pub fn parse_response(
    profile: VerifierProfile,
    ask: &Ask<'_>,
    body: &[u8],
) -> Result<Holding, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    match profile {
        VerifierProfile::Tomo => match v.get("has_tokens") {
            Some(Value::Bool(b)) => Ok(Holding::HasTokens(*b)),
            Some(other) => Err(format!("has_tokens is {other}, not a boolean")),
            None => Err("no has_tokens field".into()),
        },
        VerifierProfile::Alchemy => parse_alchemy(&v, ask),
    }
}

/// `{"jsonrpc":"2.0","result":{"address":…,"tokenBalances":[{"contractAddress":…,
/// "tokenBalance":"0x…","error":null}]},"id":1}`; one of `tokenBalance` or `error` is null.
fn parse_alchemy(v: &Value, ask: &Ask<'_>) -> Result<Holding, String> {
    if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
        return Err(format!("JSON-RPC error {err}"));
    }
    let balances = v
        .pointer("/result/tokenBalances")
        .and_then(Value::as_array)
        .ok_or("no result.tokenBalances array")?;
    let entry = balances
        .iter()
        .find(|b| {
            b.get("contractAddress")
                .and_then(Value::as_str)
                .is_some_and(|a| a.eq_ignore_ascii_case(ask.contract))
        })
        .ok_or_else(|| format!("no balance for contract {}", ask.contract))?;
    if let Some(err) = entry.get("error").filter(|e| !e.is_null()) {
        return Err(format!("balance error {err}"));
    }
    let hex = entry
        .get("tokenBalance")
        .and_then(Value::as_str)
        .ok_or("tokenBalance is not a string")?;
    let digits = hex
        .strip_prefix("0x")
        .ok_or_else(|| format!("tokenBalance {hex:?} is not 0x-hex"))?;
    if digits.is_empty() || digits.len() > 64 {
        return Err(format!("tokenBalance {hex:?} is not a uint256"));
    }
    U256::from_str_radix(digits, 16)
        .map(Holding::Amount)
        .map_err(|e| format!("tokenBalance {hex:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WALLET: &str = "0xd8da6bf26964af9d7eed9e03e53415d37aa96045";
    const USDC: &str = "0xa0b86991c6218b36c1d19d4a2e9eb0ce3606eb48";

    fn ask() -> Ask<'static> {
        Ask {
            chain_id: 1,
            wallet: WALLET,
            contract: USDC,
            min: U256::from(1u8),
        }
    }

    #[test]
    fn alchemy_request_and_response_are_the_documented_ones() {
        // Verbatim from Alchemy's docs page (cited above), kept in tests/fixtures/alchemy/.
        let fixture = |text: &str| -> Value { serde_json::from_str(text).expect("fixture JSON") };
        let mut want = fixture(include_str!(
            "../../../tests/fixtures/alchemy/alchemy_getTokenBalances.request.json"
        ));
        // The fixture's wallet is checksummed; tokenwarden sends lowercase addresses.
        want["params"][0] = json!(WALLET);
        assert_eq!(request_body(VerifierProfile::Alchemy, &ask()), want);
        let resp = fixture(include_str!(
            "../../../tests/fixtures/alchemy/alchemy_getTokenBalances.response.json"
        ));
        let body = serde_json::to_vec(&resp).expect("bytes");
        assert_eq!(
            parse_response(VerifierProfile::Alchemy, &ask(), &body),
            Ok(Holding::Amount(U256::ZERO))
        );
    }

    #[test]
    fn garbage_is_an_error_naming_what_is_wrong() {
        let a = ask();
        for (profile, body, want) in [
            (VerifierProfile::Tomo, &b"<html>"[..], "not JSON"),
            (VerifierProfile::Tomo, br#"{"has_tokens":"yes"}"#, "not a boolean"),
            (VerifierProfile::Tomo, br#"{}"#, "no has_tokens"),
            (VerifierProfile::Alchemy, br#"{"result":{}}"#, "tokenBalances"),
            (
                VerifierProfile::Alchemy,
                br#"{"result":{"tokenBalances":[{"contractAddress":"0xa0b86991c6218b36c1d19d4a2e9eb0ce3606eb48","tokenBalance":"12"}]}}"#,
                "0x-hex",
            ),
            (
                VerifierProfile::Alchemy,
                br#"{"error":{"code":-32602,"message":"bad"}}"#,
                "JSON-RPC error",
            ),
        ] {
            let err = parse_response(profile, &a, body).expect_err("garbage");
            assert!(err.contains(want), "{err}");
        }
        assert_eq!(
            parse_response(VerifierProfile::Tomo, &a, br#"{"has_tokens":true}"#),
            Ok(Holding::HasTokens(true))
        );
    }

    #[test]
    fn tomo_body_is_the_seed_shape_without_the_key() {
        let body = request_body(VerifierProfile::Tomo, &ask());
        assert_eq!(
            body,
            json!({"wallet_address": WALLET, "contract_address": USDC, "chain_id": 1, "min_amount": 1})
        );
        let big = Ask {
            min: U256::from(10u8).pow(U256::from(30u8)),
            ..ask()
        };
        assert_eq!(
            request_body(VerifierProfile::Tomo, &big)["min_amount"],
            json!("1000000000000000000000000000000")
        );
    }
}
