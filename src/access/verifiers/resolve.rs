//! The verifiers' answers for one check: every external leaf of the rule, asked for every
//! wallet of the user that counts on the leaf's chain, as the JSON `tw_access_evaluate_resolved`
//! takes (`{<leaf path>: {leaf, verified_at, wallets} | {leaf, error}}`). A leaf with an error
//! is decided by the SQL fallback; the error text (never the key) goes in its evidence.

use chrono::Utc;
use futures::future::join_all;
use serde_json::{Map, Value, json};

use super::profile::{Ask, Holding};
use super::{Verifiers, VerifyError, parse_min};

/// One external leaf to ask, as `tw_access_external_questions` lists it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ExternalQuestion {
    pub leaf_path: String,
    pub leaf: Value,
    pub wallets: Vec<String>,
}

/// Asks every leaf (concurrently) and returns the answers keyed by leaf path.
pub async fn answers(verifiers: &Verifiers, questions: &[ExternalQuestion]) -> Value {
    let answered = join_all(questions.iter().map(|q| answer(verifiers, q))).await;
    let mut out = Map::new();
    for (q, a) in questions.iter().zip(answered) {
        out.insert(q.leaf_path.clone(), a);
    }
    Value::Object(out)
}

async fn answer(verifiers: &Verifiers, q: &ExternalQuestion) -> Value {
    let leaf = &q.leaf;
    let error = |e: String| json!({"leaf": leaf, "error": e});
    let name = leaf.get("verifier").and_then(Value::as_str).unwrap_or("");
    let Some(verifier) = verifiers.get(name) else {
        return error(VerifyError::Unknown(name.to_string()).to_string());
    };
    let (Some(chain_id), Some(contract), Some(min)) = (
        leaf.get("chain_id").and_then(Value::as_u64),
        leaf.get("contract")
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase),
        parse_min(leaf.get("min").and_then(Value::as_str)),
    ) else {
        return error(format!("leaf {} cannot be asked: {leaf}", q.leaf_path));
    };
    let asks = q.wallets.iter().map(|wallet| {
        let contract = contract.as_str();
        async move {
            let ask = Ask {
                chain_id,
                wallet,
                contract,
                min,
            };
            verifier.ask(&ask).await
        }
    });
    let results = join_all(asks).await;
    let mut wallets = Vec::with_capacity(results.len());
    for (address, r) in q.wallets.iter().zip(results) {
        match r {
            Ok(Holding::Amount(a)) => {
                wallets.push(json!({"address": address, "amount": a.to_string()}))
            }
            Ok(Holding::HasTokens(b)) => wallets.push(json!({"address": address, "has_tokens": b})),
            Err(e) => return error(e.to_string()),
        }
    }
    json!({"leaf": leaf, "verified_at": Utc::now(), "wallets": wallets})
}
