//! The job catalogue in `jobs/` is a public contract: callers validate against its JSON Schemas
//! and copy its examples. This test keeps it honest: every job type of the wire format has a
//! schema that is valid draft 2020-12, its example validates against it, the schema rejects the
//! bad payloads the worker rejects, and the worker's own payload parser accepts the example.

mod common;

use std::path::PathBuf;

use serde_json::{Value, json};

/// Every job type of the wire format (brief WIRE.md), i.e. every stream a caller may XADD to.
const JOB_TYPES: &[&str] = &[
    "consume_tokens",
    "grant_tokens",
    "hold_tokens",
    "settle_hold",
    "release_hold",
    "snapshot_create",
    "index_token",
    "cleanup_locks",
    "detect_anomalies",
    "prune",
    "link_wallet",
    "unlink_wallet",
    "access_rule",
    "verify_access",
    "request_whitelist",
];

fn jobs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("jobs")
}

fn read_json(name: &str) -> Value {
    let path = jobs_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn schema(job_type: &str) -> Value {
    read_json(&format!("{job_type}.schema.json"))
}

fn example(job_type: &str) -> Value {
    read_json(&format!("{job_type}.example.json"))
}

fn validator(job_type: &str) -> jsonschema::Validator {
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema(job_type))
        .unwrap_or_else(|e| panic!("{job_type}.schema.json does not compile: {e}"))
}

fn errors(job_type: &str, instance: &Value) -> Vec<String> {
    validator(job_type)
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

#[test]
fn catalogue_lists_exactly_the_wire_job_types() {
    let mut found: Vec<String> = std::fs::read_dir(jobs_dir())
        .expect("jobs/ exists")
        .filter_map(|e| {
            let name = e.expect("dir entry").file_name().into_string().ok()?;
            name.strip_suffix(".schema.json").map(str::to_owned)
        })
        .collect();
    found.sort();
    let mut expected: Vec<String> = JOB_TYPES.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(found, expected, "one schema per job type, no strays");
    for t in JOB_TYPES {
        assert!(
            jobs_dir().join(format!("{t}.example.json")).is_file(),
            "{t} has an example"
        );
    }
}

#[test]
fn schemas_are_valid_draft_2020_12_and_closed() {
    for t in JOB_TYPES {
        let s = schema(t);
        if let Err(e) = jsonschema::meta::validate(&s) {
            panic!("{t}.schema.json is not a valid JSON Schema: {e}");
        }
        assert_eq!(
            s["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{t}: draft 2020-12"
        );
        assert_eq!(s["type"], "object", "{t}: payload is an object");
        assert_eq!(
            s["additionalProperties"],
            json!(false),
            "{t}: unknown payload fields are rejected by the worker, so the schema is closed"
        );
    }
}

#[test]
fn every_example_validates_against_its_schema() {
    for t in JOB_TYPES {
        let errs = errors(t, &example(t));
        assert!(errs.is_empty(), "{t}.example.json is invalid: {errs:?}");
    }
}

/// Mutates a copy of `job_type`'s example.
fn variant(job_type: &str, f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut v = example(job_type);
    f(v.as_object_mut().expect("example is an object"));
    v
}

/// The bad payloads the worker rejects are rejected by the schemas too, so a caller validating
/// client-side learns the same thing earlier.
#[test]
fn schemas_reject_what_the_worker_rejects() {
    let cases: Vec<(&str, &str, Value)> = vec![
        (
            "consume_tokens",
            "extra field",
            variant("consume_tokens", |m| {
                m.insert("surprise".into(), json!(1));
            }),
        ),
        (
            "consume_tokens",
            "zero amount",
            variant("consume_tokens", |m| {
                m.insert("amount".into(), json!(0));
            }),
        ),
        (
            "consume_tokens",
            "negative amount",
            variant("consume_tokens", |m| {
                m.insert("amount".into(), json!(-5));
            }),
        ),
        (
            "consume_tokens",
            "amount above i64::MAX",
            variant("consume_tokens", |m| {
                m.insert("amount".into(), json!(9_223_372_036_854_775_808u64));
            }),
        ),
        (
            "consume_tokens",
            "fractional amount",
            variant("consume_tokens", |m| {
                m.insert("amount".into(), json!(1.5));
            }),
        ),
        (
            "consume_tokens",
            "amount as string",
            variant("consume_tokens", |m| {
                m.insert("amount".into(), json!("10"));
            }),
        ),
        (
            "consume_tokens",
            "missing user_id",
            variant("consume_tokens", |m| {
                m.remove("user_id");
            }),
        ),
        (
            "consume_tokens",
            "request_id not a uuid",
            variant("consume_tokens", |m| {
                m.insert("request_id".into(), json!("req-1"));
            }),
        ),
        (
            "consume_tokens",
            "empty operation_type",
            variant("consume_tokens", |m| {
                m.insert("operation_type".into(), json!(""));
            }),
        ),
        (
            "consume_tokens",
            "operation_type over 100 chars",
            variant("consume_tokens", |m| {
                m.insert("operation_type".into(), json!("x".repeat(101)));
            }),
        ),
        (
            "consume_tokens",
            "metadata not an object",
            variant("consume_tokens", |m| {
                m.insert("metadata".into(), json!([1, 2]));
            }),
        ),
        (
            "grant_tokens",
            "reason over 200 chars",
            variant("grant_tokens", |m| {
                m.insert("reason".into(), json!("r".repeat(201)));
            }),
        ),
        (
            "grant_tokens",
            "missing reason",
            variant("grant_tokens", |m| {
                m.remove("reason");
            }),
        ),
        (
            "hold_tokens",
            "ttl_secs zero",
            variant("hold_tokens", |m| {
                m.insert("ttl_secs".into(), json!(0));
            }),
        ),
        (
            "settle_hold",
            "missing amount",
            variant("settle_hold", |m| {
                m.remove("amount");
            }),
        ),
        (
            "release_hold",
            "hold_id not a uuid",
            variant("release_hold", |m| {
                m.insert("hold_id".into(), json!(42));
            }),
        ),
        (
            "snapshot_create",
            "unknown source",
            variant("snapshot_create", |m| {
                m.insert("source".into(), json!("etherscan"));
            }),
        ),
        (
            "snapshot_create",
            "token not an address",
            variant("snapshot_create", |m| {
                m.insert("token".into(), json!("0x1234"));
            }),
        ),
        (
            "cleanup_locks",
            "extra field",
            variant("cleanup_locks", |m| {
                m.insert("force".into(), json!(true));
            }),
        ),
        (
            "prune",
            "request_id not a uuid",
            variant("prune", |m| {
                m.insert("request_id".into(), json!("yesterday"));
            }),
        ),
        (
            "link_wallet",
            "no signature",
            variant("link_wallet", |m| {
                m.remove("signature");
            }),
        ),
        (
            "link_wallet",
            "signature not hex",
            variant("link_wallet", |m| {
                m.insert("signature".into(), json!("0xnothex"));
            }),
        ),
        (
            "link_wallet",
            "message too long",
            variant("link_wallet", |m| {
                m.insert("message".into(), json!("x".repeat(4097)));
            }),
        ),
        (
            "verify_access",
            "both creator_id and token",
            variant("verify_access", |m| {
                m.insert("chain_id".into(), json!(1514));
                m.insert(
                    "token".into(),
                    json!("0x1514000000000000000000000000000000000000"),
                );
            }),
        ),
        (
            "verify_access",
            "caller_ip not an address",
            variant("verify_access", |m| {
                m.insert("caller_ip".into(), json!("999.1.1.1"));
            }),
        ),
        (
            "verify_access",
            "user_agent too long",
            variant("verify_access", |m| {
                m.insert("user_agent".into(), json!("x".repeat(8193)));
            }),
        ),
        (
            "verify_access",
            "neither creator_id nor token",
            variant("verify_access", |m| {
                m.remove("creator_id");
            }),
        ),
        (
            "access_rule",
            "set without a rule",
            variant("access_rule", |m| {
                m.remove("rule");
            }),
        ),
        (
            "access_rule",
            "delete with a rule",
            variant("access_rule", |m| {
                m.insert("action".into(), json!("delete"));
            }),
        ),
        (
            "request_whitelist",
            "address not an address",
            variant("request_whitelist", |m| {
                m.insert("address".into(), json!("0x1234"));
            }),
        ),
        (
            "request_whitelist",
            "no whitelist",
            variant("request_whitelist", |m| {
                m.remove("whitelist_id");
            }),
        ),
        (
            "unlink_wallet",
            "address not an address",
            variant("unlink_wallet", |m| {
                m.insert("address".into(), json!("0x1234"));
            }),
        ),
    ];
    for (t, what, payload) in cases {
        assert!(
            !errors(t, &payload).is_empty(),
            "{t}: schema accepts a payload with {what}: {payload}"
        );
    }
}

#[test]
fn snapshot_chain_accepts_names_and_numeric_ids() {
    for chain in [json!("eth-mainnet"), json!("1514"), json!(1315)] {
        let p = variant("snapshot_create", |m| {
            m.insert("chain".into(), chain.clone());
        });
        let errs = errors("snapshot_create", &p);
        assert!(errs.is_empty(), "chain {chain} rejected: {errs:?}");
    }
}

/// The worker's wallet-job parsers accept the examples and refuse what the schemas refuse.
#[test]
fn wallet_job_parsers_agree_with_the_schemas() {
    use tokenwarden::access::jobs::{parse_link, parse_unlink};

    let link = parse_link(example("link_wallet")).expect("worker accepts link_wallet.example.json");
    assert_eq!(
        link.request_id.to_string(),
        example("link_wallet")["request_id"].as_str().expect("id")
    );
    let (_, _, address) =
        parse_unlink(example("unlink_wallet")).expect("worker accepts unlink_wallet.example.json");
    assert_eq!(
        format!("{address:#x}"),
        example("unlink_wallet")["address"]
            .as_str()
            .expect("address")
    );
    let refused = [
        parse_link(variant("link_wallet", |m| {
            m.remove("signature");
        }))
        .err(),
        parse_link(variant("link_wallet", |m| {
            m.insert("message".into(), json!("x".repeat(4097)));
        }))
        .err(),
        parse_link(variant("link_wallet", |m| {
            m.insert("surprise".into(), json!(1));
        }))
        .err(),
        parse_unlink(variant("unlink_wallet", |m| {
            m.insert("address".into(), json!("0x1234"));
        }))
        .err(),
    ];
    for (i, r) in refused.iter().enumerate() {
        assert!(
            r.is_some(),
            "case {i}: the worker accepts a payload its schema refuses"
        );
    }
}

/// The worker's `request_whitelist` parser accepts the example and refuses what the schema
/// refuses.
#[test]
fn whitelist_job_parser_agrees_with_the_schema() {
    use tokenwarden::whitelist::job::parse_request;

    let req = parse_request(example("request_whitelist")).expect("worker accepts the example");
    assert_eq!(
        req.address.map(|a| a.to_checksum(None)).as_deref(),
        example("request_whitelist")["address"].as_str()
    );
    for (what, bad) in [
        (
            "address",
            variant("request_whitelist", |m| {
                m.insert("address".into(), json!("0x1234"));
            }),
        ),
        (
            "no whitelist",
            variant("request_whitelist", |m| {
                m.remove("whitelist_id");
            }),
        ),
        (
            "unknown field",
            variant("request_whitelist", |m| {
                m.insert("surprise".into(), json!(1));
            }),
        ),
    ] {
        assert!(
            !errors("request_whitelist", &bad).is_empty(),
            "schema: {what}"
        );
        assert!(parse_request(bad).is_err(), "worker: {what}");
    }
}

/// The worker parses ledger payloads with `ledger::jobs::parse`; every ledger example must pass
/// it, with the values the example shows.
#[test]
fn worker_parser_accepts_every_ledger_example() {
    use tokenwarden::ledger::LedgerOp;
    use tokenwarden::ledger::jobs::{LedgerJobKind, parse};

    for kind in LedgerJobKind::ALL {
        let t = kind.job_type();
        assert!(JOB_TYPES.contains(&t), "{t} is in the catalogue");
        let ex = example(t);
        let op = parse(kind, ex.clone())
            .unwrap_or_else(|e| panic!("worker rejects {t}.example.json: {e}"));
        assert_eq!(
            op.request_id().0.to_string(),
            ex["request_id"].as_str().expect("example has a request_id"),
            "{t}"
        );
        match (&op, kind) {
            (LedgerOp::Consume { amount, .. }, LedgerJobKind::Consume)
            | (LedgerOp::Grant { amount, .. }, LedgerJobKind::Grant)
            | (LedgerOp::Hold { amount, .. }, LedgerJobKind::Hold)
            | (LedgerOp::Settle { amount, .. }, LedgerJobKind::Settle) => {
                assert_eq!(Some(amount.get()), ex["amount"].as_i64(), "{t} amount");
            }
            (LedgerOp::Release { hold_id, .. }, LedgerJobKind::Release) => {
                assert_eq!(Some(hold_id.0.to_string().as_str()), ex["hold_id"].as_str());
            }
            (op, kind) => panic!("{kind:?} parsed into the wrong operation: {op:?}"),
        }
    }
}

/// Payloads the schemas reject are rejected by the worker as well, so schema and worker agree
/// on both sides of the line. The worker is its ledger job handler over a real database: a
/// shape error is refused by its parser, a broken bound (operation_type length, ttl_secs range)
/// by the SQL rules, and both end as a rejected job.
#[tokio::test]
async fn worker_rejects_what_the_schemas_reject() {
    use std::sync::Arc;
    use tokenwarden::ledger::Ledger;
    use tokenwarden::ledger::batcher::Batcher;
    use tokenwarden::ledger::jobs::{LedgerJob, LedgerJobKind};
    use tokenwarden::queue::{JobError, JobHandler};

    let env = common::TestEnv::new().await;
    let cfg = env.config().ledger;
    let (batcher, _task) = Batcher::spawn(
        Arc::new(Ledger::new(env.pool.clone(), cfg.clone())),
        cfg.max_batch,
    );
    let cases: Vec<(LedgerJobKind, Value)> = vec![
        (
            LedgerJobKind::Consume,
            variant("consume_tokens", |m| {
                m.insert("surprise".into(), json!(1));
            }),
        ),
        (
            LedgerJobKind::Consume,
            variant("consume_tokens", |m| {
                m.insert("amount".into(), json!(0));
            }),
        ),
        (
            LedgerJobKind::Consume,
            variant("consume_tokens", |m| {
                m.insert("operation_type".into(), json!("x".repeat(101)));
            }),
        ),
        (
            LedgerJobKind::Grant,
            variant("grant_tokens", |m| {
                m.remove("reason");
            }),
        ),
        (
            LedgerJobKind::Hold,
            variant("hold_tokens", |m| {
                m.insert("ttl_secs".into(), json!(0));
            }),
        ),
        (
            LedgerJobKind::Settle,
            variant("settle_hold", |m| {
                m.insert("amount".into(), json!(-1));
            }),
        ),
        (
            LedgerJobKind::Release,
            variant("release_hold", |m| {
                m.insert("hold_id".into(), json!(42));
            }),
        ),
    ];
    for (kind, payload) in cases {
        assert!(
            !errors(kind.job_type(), &payload).is_empty(),
            "schema accepts {payload}"
        );
        // A request id of its own: the examples share one, and a second use of an id with
        // other fields would be a request_id_conflict, not a rejection.
        let mut job = payload.clone();
        job["request_id"] = json!(uuid::Uuid::new_v4());
        let handled = LedgerJob::new(kind, batcher.clone()).handle(job).await;
        assert!(
            matches!(handled, Err(JobError::Rejected(_))),
            "worker accepts {payload}: {handled:?}"
        );
    }
}

/// The worker parses `index_token` with `chain::job::parse_payload`: it accepts the example,
/// and the schema refuses an `add` without a standard as the worker does.
#[test]
fn worker_parser_accepts_the_index_token_example() {
    let ex = example("index_token");
    let job = tokenwarden::chain::job::parse_payload(ex.clone())
        .unwrap_or_else(|e| panic!("worker rejects index_token.example.json: {e}"));
    assert_eq!(job.chain_id, 1514);
    let bad = variant("index_token", |m| {
        m.remove("standard");
    });
    assert!(!errors("index_token", &bad).is_empty());
    assert!(tokenwarden::chain::job::parse_payload(bad).is_err());
}

/// What the worker does with a payload of `job_type` arriving as the text `payload`: the queue
/// door (`StreamEntry::payload`) then the job type's parser. `None` for a job type whose
/// parser is not public (`access_rule` validates inside its handler, against the database).
fn worker_accepts(job_type: &str, payload: &str) -> Option<Result<(), String>> {
    use tokenwarden::ledger::jobs::{LedgerJobKind, parse};
    use tokenwarden::queue::entry::StreamEntry;
    let entry = StreamEntry {
        job_type: job_type.into(),
        stream: format!("tw:jobs:{job_type}").into(),
        id: "1700000000000-0".into(),
        fields: vec![(b"payload".to_vec(), payload.as_bytes().to_vec())],
        deliveries: 1,
    };
    let v = match entry.payload() {
        Ok(p) => p.value,
        Err(m) => return Some(Err(m.reason)),
    };
    if let Some(kind) = LedgerJobKind::ALL
        .into_iter()
        .find(|k| k.job_type() == job_type)
    {
        let request_id = tokenwarden::queue::entry::request_id_of(&v);
        let general = parse(kind, v);
        // The worker's hot path (bytes straight into the typed payload) must never accept
        // what the general path refuses, nor read it differently.
        if let Some((rid, op)) = tokenwarden::ledger::jobs::parse_raw(kind, payload.as_bytes()) {
            assert_eq!(general.as_ref().ok(), Some(&op), "{job_type}: {payload}");
            assert_eq!(request_id.as_deref(), Some(rid.as_str()), "{payload}");
        }
        return Some(general.map(|_| ()).map_err(|e| e.reason));
    }
    Some(match job_type {
        "link_wallet" => tokenwarden::access::jobs::parse_link(v).map(|_| ()),
        "unlink_wallet" => tokenwarden::access::jobs::parse_unlink(v).map(|_| ()),
        "verify_access" => tokenwarden::access::check_job::parse_check(v).map(|_| ()),
        "index_token" => tokenwarden::chain::job::parse_payload(v)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        "snapshot_create" => tokenwarden::snapshots::parse_snapshot_payload(v)
            .map(|_| ())
            .map_err(|e| e.reason),
        "cleanup_locks" | "detect_anomalies" | "prune" => {
            tokenwarden::maintenance::parse_maintenance_payload(job_type, v)
                .map(|_| ())
                .map_err(|e| e.reason)
        }
        _ => return None,
    })
}

/// `job_type`'s example with `field` set to the JSON text `literal` (e.g. `1e2`, which a
/// `serde_json::Value` would write as `100.0`).
fn with_literal(job_type: &str, field: &str, literal: &str) -> String {
    let mut v = example(job_type);
    v[field] = json!("__LITERAL__");
    v.to_string().replace("\"__LITERAL__\"", literal)
}

/// The schemas and the worker are one truth: every example and a set of counter-examples
/// (request id spellings, integral numbers written as floats or with an exponent, fractions,
/// unknown fields, UUID fields in other spellings) get the same verdict from the JSON Schema
/// and from the worker (queue door + parser). Before issue 13, `amount` 2.0 / 1e2 passed the
/// schema and were refused, and braced / `urn:uuid:` / 32-digit ids failed the schema and were
/// accepted.
#[test]
fn schemas_and_the_worker_give_every_payload_the_same_verdict() {
    let id = "6f1c2a9e-3b7d-4e2f-9a41-0c5d8e7b1a01";
    let spellings = [
        format!("\"{id}\""),
        format!("\"{}\"", id.to_uppercase()),
        format!("\"{{{id}}}\""),
        format!("\"urn:uuid:{id}\""),
        format!("\"{}\"", id.replace('-', "")),
        "\"req-1\"".to_string(),
        "42".to_string(),
    ];
    let mut checked = 0;
    let mut disagreements = Vec::new();
    for t in JOB_TYPES {
        let s = schema(t);
        let ex = example(t);
        let mut cases: Vec<(String, String)> = vec![("example".into(), ex.to_string())];
        for sp in &spellings {
            cases.push((
                format!("request_id {sp}"),
                with_literal(t, "request_id", sp),
            ));
        }
        for field in ["user_id", "hold_id"] {
            if ex.get(field).is_some() {
                for sp in &spellings[2..5] {
                    cases.push((format!("{field} {sp}"), with_literal(t, field, sp)));
                }
            }
        }
        let props = s["properties"].as_object().expect("properties");
        for (field, p) in props {
            let Some(n) = ex.get(field).and_then(Value::as_i64) else {
                continue;
            };
            if p["type"] != "integer" {
                continue;
            }
            for literal in [
                format!("{n}.0"),
                format!("{n}e0"),
                format!("{}e1", n * 10),
                format!("{n}.5"),
            ] {
                cases.push((
                    format!("{field} {literal}"),
                    with_literal(t, field, &literal),
                ));
            }
        }
        cases.push(("unknown field".into(), with_literal(t, "surprise", "1")));
        for (what, text) in cases {
            let instance: Value = serde_json::from_str(&text).expect("case is JSON");
            let schema_errors = errors(t, &instance);
            let Some(worker) = worker_accepts(t, &text) else {
                continue;
            };
            checked += 1;
            if schema_errors.is_empty() != worker.is_ok() {
                disagreements.push(format!(
                    "{t} {what}: schema {} / worker {:?}",
                    if schema_errors.is_empty() {
                        "accepts".to_string()
                    } else {
                        format!("refuses ({})", schema_errors.join("; "))
                    },
                    worker
                ));
            }
        }
    }
    assert!(checked > 150, "only {checked} payloads checked");
    assert!(
        disagreements.is_empty(),
        "schema and worker disagree on {} of {checked} payloads:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
}

/// Bad input, generated: random JSON payloads, built from each schema's property names (and
/// off them) with values of every JSON kind (NUL in strings, huge and fractional numbers,
/// nested arrays and objects), through the queue door and every public job parser: zero panics,
/// and every refusal carries a reason.
mod generated {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::{JOB_TYPES, schema, worker_accepts};

    /// Cases per job type (the report's "cases run": this times the job types with a parser).
    const CASES: u32 = 1000;

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::String),
            "[a-f0-9-]{30,40}".prop_map(Value::String),
            Just(Value::String("6f1c2a9e-3b7d-4e2f-9a41-0c5d8e7b1a01".into())),
            Just(Value::String("a\u{0}b".into())),
            Just(Value::String(
                "0x1514000000000000000000000000000000000000".into()
            )),
        ];
        leaf.prop_recursive(3, 32, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("\\PC{0,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn payload(names: Vec<String>) -> impl Strategy<Value = String> {
        let name = prop_oneof![
            4 => proptest::sample::select(names),
            1 => "\\PC{0,8}",
        ];
        prop_oneof![
            8 => proptest::collection::btree_map(name, json(), 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect()).to_string()),
            1 => json().prop_map(|v| v.to_string()),
            1 => "\\PC{0,40}",
        ]
    }

    #[test]
    fn random_payloads_never_panic_and_every_refusal_has_a_reason() {
        let mut ran = 0u32;
        for t in JOB_TYPES {
            if worker_accepts(t, "{}").is_none() {
                continue;
            }
            let names: Vec<String> = schema(t)["properties"]
                .as_object()
                .expect("properties")
                .keys()
                .cloned()
                .collect();
            let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
                cases: CASES,
                failure_persistence: None,
                ..ProptestConfig::default()
            });
            runner
                .run(&payload(names), |text| {
                    if let Some(Err(reason)) = worker_accepts(t, &text) {
                        prop_assert!(!reason.trim().is_empty(), "{t}: {text}");
                    }
                    Ok(())
                })
                .unwrap_or_else(|e| panic!("{t}: {e}"));
            ran += CASES;
        }
        eprintln!("random payloads: {ran} cases run");
        assert!(ran >= 13 * CASES, "{ran}");
    }
}
