//! Holder snapshots against a wiremock GoldRush serving the real response formats (built from
//! the captured samples in tests/fixtures/covalent/), real Postgres, and the own index.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokenwarden::queue::job::{JobError, JobHandler};
use tokenwarden::snapshots::claim::CrawlClaim;
use tokenwarden::snapshots::goldrush::{ApiKey, GoldRushClient};
use tokenwarden::snapshots::store::{self, CheckError, SnapshotStatus};
use tokenwarden::snapshots::{
    SnapshotCreateHandler, SnapshotOutcome, SnapshotRequest, SnapshotService, SnapshotSource,
};
use uuid::Uuid;
use wiremock::matchers::{bearer_token, method, path, query_param, query_param_is_missing};
use wiremock::{Mock, MockServer, ResponseTemplate};

use common::{DbKind, TestEnv};

const KEY: &str = "cqt_wFtestkeytestkeytestkeytestke";
/// The INDEX token of the 2021 capture.
const INDEX_TOKEN: &str = "0x0954906da0bf32d5479e25f46056d22f08464cab";
const TOKEN: &str = "0x7c58d971a5dabd46bc85e81fdae87b511431452e";

fn fixture(name: &str) -> Value {
    let p = common::repo_root()
        .join("tests/fixtures/covalent")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).expect("fixture exists"))
        .expect("fixture is JSON")
}

fn fixture_text(name: &str) -> String {
    let p = common::repo_root()
        .join("tests/fixtures/covalent")
        .join(name);
    std::fs::read_to_string(&p).expect("fixture exists")
}

fn holder(n: u64) -> String {
    format!("0x{:040x}", n + 0x1000)
}

/// Options of one generated page.
#[derive(Clone)]
struct PageSpec {
    token: &'static str,
    holders: Vec<(String, String)>,
    block: u64,
    page_number: u32,
    has_more: bool,
    total_count: Option<u64>,
    decimals: Option<i64>,
    total_supply: &'static str,
    nulls: bool,
}

/// A token_holders_v2 answer shaped like the 2024 matic capture (envelope, updated_at, chain
/// fields), with items shaped like the 2021 capture's items (every field present).
fn page(spec: &PageSpec) -> Value {
    let mut env = fixture("token_holders_v2.matic_mainnet_2024_excerpt.json");
    let legacy = fixture("token_holders.index_eth_mainnet_2021_excerpt.json");
    let template = legacy["data"]["items"][0].clone();
    let items: Vec<Value> = spec
        .holders
        .iter()
        .map(|(addr, bal)| {
            let mut it = template.clone();
            it["contract_address"] = json!(spec.token);
            it["address"] = json!(addr);
            it["balance"] = json!(bal);
            it["total_supply"] = json!(spec.total_supply);
            it["block_height"] = json!(spec.block);
            it["contract_decimals"] = json!(spec.decimals);
            if spec.nulls {
                it["supports_erc"] = Value::Null;
                it["contract_name"] = Value::Null;
                it["contract_ticker_symbol"] = Value::Null;
                it["logo_url"] = Value::Null;
            } else {
                it["supports_erc"] = json!(["erc20"]);
            }
            it
        })
        .collect();
    env["data"]["items"] = Value::Array(items);
    env["data"]["chain_id"] = json!(1);
    env["data"]["chain_name"] = json!("eth-mainnet");
    env["data"]["pagination"] = json!({
        "has_more": spec.has_more,
        "page_number": spec.page_number,
        "page_size": 1000,
        "total_count": spec.total_count,
    });
    env
}

fn spec(token: &'static str, holders: Vec<(String, String)>, block: u64) -> PageSpec {
    PageSpec {
        token,
        holders,
        block,
        page_number: 0,
        has_more: false,
        total_count: None,
        decimals: Some(18),
        total_supply: "1000000000000000000000000",
        nulls: false,
    }
}

fn holders_path(chain: &str, token: &str) -> String {
    format!("/v1/{chain}/tokens/{token}/token_holders_v2/")
}

fn service(env: &TestEnv, server: &MockServer) -> SnapshotService {
    let mut cfg = env.config().snapshots;
    cfg.goldrush_base_url = server.uri();
    cfg.goldrush_retry_min_delay_ms = 10;
    cfg.goldrush_retry_max_delay_ms = 50;
    cfg.goldrush_max_retries = 3;
    cfg.goldrush_requests_per_sec = 1000;
    cfg.goldrush_timeout_secs = 5;
    let client = GoldRushClient::new(&cfg, ApiKey::new(KEY)).expect("client");
    SnapshotService::new(env.pool.clone(), Arc::new(client))
}

fn goldrush_req(chain: &str, token: &str, block: Option<u64>) -> SnapshotRequest {
    SnapshotRequest::new(None, SnapshotSource::GoldRush, chain, token, block)
        .expect("valid request")
}

async fn holder_rows(env: &TestEnv, id: Uuid) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT holder, balance::text FROM snapshot_holders WHERE snapshot_id = $1 ORDER BY holder",
    )
    .bind(id)
    .fetch_all(&env.pool)
    .await
    .expect("read holders")
}

fn assert_failed(outcome: &SnapshotOutcome, needles: &[&str]) {
    assert_eq!(outcome.status, SnapshotStatus::Failed, "{outcome:?}");
    let err = outcome
        .error
        .as_deref()
        .expect("failed snapshot has a reason");
    for n in needles {
        assert!(err.contains(n), "reason {err:?} should mention {n:?}");
    }
}

#[tokio::test]
async fn multi_page_crawl_stores_every_holder_pinned_to_the_first_pages_block() {
    let env = TestEnv::new().await;
    let server = MockServer::start().await;
    let block = 19_000_000u64;
    let all: Vec<(String, String)> = (0..2500u64)
        .map(|i| (holder(i), (1_000_000 + i).to_string()))
        .collect();
    for (n, chunk) in all.chunks(1000).enumerate() {
        let mut s = spec(TOKEN, chunk.to_vec(), block);
        s.page_number = n as u32;
        s.has_more = n < 2;
        s.total_count = Some(2500);
        let m = Mock::given(method("GET"))
            .and(path(holders_path("eth-mainnet", TOKEN)))
            .and(bearer_token(KEY))
            .and(query_param("page-size", "1000"))
            .and(query_param("page-number", n.to_string()));
        // Page 0 asks for the latest block; every later page must be pinned to page 0's block.
        let m = if n == 0 {
            m.and(query_param_is_missing("block-height"))
        } else {
            m.and(query_param("block-height", block.to_string()))
        };
        m.respond_with(ResponseTemplate::new(200).set_body_json(page(&s)))
            .expect(1)
            .mount(&server)
            .await;
    }
    let out = service(&env, &server)
        .create(&goldrush_req("eth-mainnet", TOKEN, None))
        .await
        .expect("crawl runs");
    assert_eq!(out.status, SnapshotStatus::Complete, "{out:?}");
    assert_eq!(out.holder_count, Some(2500));
    assert_eq!(out.block_height, Some(block as i64));
    let row = store::get(&env.pool, out.snapshot_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.decimals, Some(18));
    assert_eq!(
        row.total_supply.as_deref(),
        Some("1000000000000000000000000")
    );
    let mut stored = holder_rows(&env, out.snapshot_id).await;
    let mut expected = all.clone();
    stored.sort();
    expected.sort();
    assert_eq!(
        stored, expected,
        "every holder stored once with its exact balance"
    );
    server.verify().await;
}

#[tokio::test]
async fn caller_block_height_is_sent_on_every_page() {
    let env = TestEnv::new().await;
    let server = MockServer::start().await;
    let block = 17_000_000u64;
    for n in 0..2u32 {
        let mut s = spec(TOKEN, vec![(holder(n as u64), "5".into())], block);
        s.page_number = n;
        s.has_more = n == 0;
        Mock::given(method("GET"))
            .and(path(holders_path("1", TOKEN)))
            .and(query_param("page-number", n.to_string()))
            .and(query_param("block-height", block.to_string()))
            .respond_with(ResponseTemplate::new(200).set_body_json(page(&s)))
            .expect(1)
            .mount(&server)
            .await;
    }
    let out = service(&env, &server)
        .create(&goldrush_req("1", TOKEN, Some(block)))
        .await
        .unwrap();
    assert_eq!(out.status, SnapshotStatus::Complete, "{out:?}");
    assert_eq!(out.holder_count, Some(2));
    server.verify().await;
}

#[tokio::test]
async fn legacy_has_more_false_with_larger_total_count_keeps_fetching_until_an_empty_page() {
    let env = TestEnv::new().await;
    let server = MockServer::start().await;
    let p = holders_path("eth-mainnet", INDEX_TOKEN);
    // Page 0: the 2021 capture verbatim (4 items, has_more false, total_count 4171).
    Mock::given(method("GET"))
        .and(path(p.clone()))
        .and(query_param("page-number", "0"))
        .respond_with(ResponseTemplate::new(200).set_body_string(fixture_text(
            "token_holders.index_eth_mainnet_2021_excerpt.json",
        )))
        .expect(1)
        .mount(&server)
        .await;
    let mut s1 = spec(
        INDEX_TOKEN,
        (0..3).map(|i| (holder(i), "7".into())).collect(),
        13_579_721,
    );
    s1.page_number = 1;
    s1.total_count = Some(4171);
    Mock::given(method("GET"))
        .and(path(p.clone()))
        .and(query_param("page-number", "1"))
        .and(query_param("block-height", "13579721"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page(&s1)))
        .expect(1)
        .mount(&server)
        .await;
    let mut s2 = spec(INDEX_TOKEN, vec![], 13_579_721);
    s2.page_number = 2;
    s2.total_count = Some(4171);
    Mock::given(method("GET"))
        .and(path(p.clone()))
        .and(query_param("page-number", "2"))
        .and(query_param("block-height", "13579721"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page(&s2)))
        .expect(1)
        .mount(&server)
        .await;
    let out = service(&env, &server)
        .create(&goldrush_req("eth-mainnet", INDEX_TOKEN, None))
        .await
        .unwrap();
    assert_eq!(out.status, SnapshotStatus::Complete, "{out:?}");
    assert_eq!(out.holder_count, Some(7));
    assert_eq!(out.block_height, Some(13_579_721));
    let rows = holder_rows(&env, out.snapshot_id).await;
    assert!(rows.contains(&(
        "0xf64d061106054fe63b0aca68916266182e77e9bc".to_string(),
        "1399994361998985286656520".to_string()
    )));
    server.verify().await;
}

async fn mount_single_page(server: &MockServer, chain: &str, token: &'static str, priority: u8) {
    let s = spec(
        token,
        vec![(holder(1), "10".into()), (holder(2), "20".into())],
        100,
    );
    Mock::given(method("GET"))
        .and(path(holders_path(chain, token)))
        .respond_with(ResponseTemplate::new(200).set_body_json(page(&s)))
        .with_priority(priority)
        .expect(1)
        .mount(server)
        .await;
}

#[tokio::test]
async fn rate_limited_429_without_retry_after_is_retried_with_backoff() {
    let env = TestEnv::new().await;
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path(holders_path("eth-mainnet", TOKEN)))
        .respond_with(ResponseTemplate::new(429).set_body_json(json!({
            "data": null, "error": true, "error_message": "Too many requests", "error_code": 429
        })))
        .up_to_n_times(2)
        .with_priority(1)
        .expect(2)
        .mount(&server)
        .await;
    mount_single_page(&server, "eth-mainnet", TOKEN, 5).await;
    let out = service(&env, &server)
        .create(&goldrush_req("eth-mainnet", TOKEN, None))
        .await
        .unwrap();
    assert_eq!(out.status, SnapshotStatus::Complete, "{out:?}");
    assert_eq!(out.holder_count, Some(2));
    server.verify().await;
}

#[tokio::test]
async fn rate_limited_429_honours_retry_after() {
    let env = TestEnv::new().await;
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path(holders_path("eth-mainnet", TOKEN)))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("Retry-After", "1")
                .set_body_json(json!({
                    "data": null, "error": true, "error_message": "Too many requests", "error_code": "429"
                })),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .expect(1)
        .mount(&server)
        .await;
    mount_single_page(&server, "eth-mainnet", TOKEN, 5).await;
    let started = Instant::now();
    let out = service(&env, &server)
        .create(&goldrush_req("eth-mainnet", TOKEN, None))
        .await
        .unwrap();
    // Backoff alone is 10-50 ms in this configuration: a ≥ 1 s wait is the Retry-After.
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited only {:?}",
        started.elapsed()
    );
    assert_eq!(out.status, SnapshotStatus::Complete, "{out:?}");
    server.verify().await;
}

#[tokio::test]
async fn server_errors_are_retried_then_fail_with_the_last_reason() {
    let env = TestEnv::new().await;
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(503).set_body_json(json!({
            "data": null, "error": true, "error_message": "Service unavailable", "error_code": 503
        })))
        // 1 attempt + goldrush_max_retries (3).
        .expect(4)
        .mount(&server)
        .await;
    let out = service(&env, &server)
        .create(&goldrush_req("eth-mainnet", TOKEN, None))
        .await
        .unwrap();
    assert_failed(&out, &["4 attempts", "HTTP 503", "Service unavailable"]);
    server.verify().await;
}

#[tokio::test]
async fn client_errors_fail_the_snapshot_with_the_reason_and_are_not_retried() {
    let env = TestEnv::new().await;
    let cases: Vec<(u16, String, Vec<&str>)> = vec![
        (
            401,
            fixture_text("error_401_no_api_key_2021.json"),
            vec!["HTTP 401", "error_code 401", "No API key given"],
        ),
        (
            401,
            fixture_text("error_401_docs_example.json"),
            vec!["HTTP 401", "error_code 401", "No valid API key was provided."],
        ),
        (
            402,
            json!({"data": null, "error": true, "error_message": "Credits exhausted: enable Flex Credits or upgrade", "error_code": 402}).to_string(),
            vec!["HTTP 402", "Credits exhausted"],
        ),
        (
            403,
            json!({"data": null, "error": true, "error_message": "Key not authorized", "error_code": 403}).to_string(),
            vec!["HTTP 403"],
        ),
        (
            404,
            json!({"data": null, "error": true, "error_message": "Unsupported chain", "error_code": 404}).to_string(),
            vec!["HTTP 404", "Unsupported chain"],
        ),
        (400, "<html>bad request</html>".to_string(), vec!["HTTP 400"]),
    ];
    for (status, body, needles) in cases {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(
                ResponseTemplate::new(status)
                    .insert_header("content-type", "application/json")
                    .set_body_string(body),
            )
            .expect(1)
            .mount(&server)
            .await;
        let out = service(&env, &server)
            .create(&goldrush_req("eth-mainnet", TOKEN, None))
            .await
            .unwrap();
        assert_failed(&out, &needles);
        assert!(holder_rows(&env, out.snapshot_id).await.is_empty());
        server.verify().await;
    }
}

#[tokio::test]
async fn malformed_answers_fail_the_snapshot_and_leave_no_holder_rows() {
    let env = TestEnv::new().await;
    // (page 1 body, words the reason must contain). Page 0 is valid and gets stored first.
    let mut bad_balance = spec(TOKEN, vec![(holder(9), "12abc".into())], 50);
    bad_balance.page_number = 1;
    let mut bad_address = spec(TOKEN, vec![("0x1234".into(), "1".into())], 50);
    bad_address.page_number = 1;
    let mut other_block = spec(TOKEN, vec![(holder(9), "1".into())], 51);
    other_block.page_number = 1;
    let mut dup = spec(TOKEN, vec![(holder(1), "1".into())], 50);
    dup.page_number = 1;
    let cases: Vec<(String, Vec<&str>)> = vec![
        ("{\"data\": {\"items\": [".to_string(), vec!["not JSON"]),
        (
            page(&bad_balance).to_string(),
            vec!["page 1 item 0", "balance", "12abc"],
        ),
        (page(&bad_address).to_string(), vec!["address", "0x1234"]),
        (
            page(&other_block).to_string(),
            vec!["block 51", "not block 50"],
        ),
        (page(&dup).to_string(), vec!["repeats a holder"]),
    ];
    for (body, needles) in cases {
        let server = MockServer::start().await;
        let mut first = spec(
            TOKEN,
            vec![(holder(1), "10".into()), (holder(2), "20".into())],
            50,
        );
        first.has_more = true;
        Mock::given(method("GET"))
            .and(query_param("page-number", "0"))
            .respond_with(ResponseTemplate::new(200).set_body_json(page(&first)))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(query_param("page-number", "1"))
            .respond_with(ResponseTemplate::new(200).set_body_string(body))
            .expect(1)
            .mount(&server)
            .await;
        let out = service(&env, &server)
            .create(&goldrush_req("eth-mainnet", TOKEN, None))
            .await
            .unwrap();
        assert_failed(&out, &needles);
        assert!(
            holder_rows(&env, out.snapshot_id).await.is_empty(),
            "rows of page 0 are deleted when the crawl fails"
        );
        server.verify().await;
    }
}

#[tokio::test]
async fn a_page_with_null_fields_is_accepted() {
    let env = TestEnv::new().await;
    let server = MockServer::start().await;
    let mut s = spec(
        TOKEN,
        vec![(holder(1), "10".into()), (holder(2), "0".into())],
        77,
    );
    s.nulls = true;
    s.decimals = None;
    s.total_count = None;
    let mut body = page(&s);
    body["error"] = Value::Null;
    body["data"]["items"][0]["total_supply"] = Value::Null;
    body["data"]["items"][1]["total_supply"] = Value::Null;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_json(body))
        .expect(1)
        .mount(&server)
        .await;
    let out = service(&env, &server)
        .create(&goldrush_req("eth-mainnet", TOKEN, None))
        .await
        .unwrap();
    assert_eq!(out.status, SnapshotStatus::Complete, "{out:?}");
    // The zero balance is not a holder.
    assert_eq!(out.holder_count, Some(1));
    let row = store::get(&env.pool, out.snapshot_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.decimals, None);
    assert_eq!(row.total_supply, None);
    // Without decimals, whole-token thresholds cannot be converted: an error, not a guess.
    let err = store::verify(&env.pool, out.snapshot_id, &holder(1), "1")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("decimals"), "{err}");
    server.verify().await;
}

#[tokio::test]
async fn story_and_non_foundational_history_fail_before_any_http_call() {
    let env = TestEnv::new().await;
    let server = MockServer::start().await;
    let svc = service(&env, &server);
    for chain in ["1514", "1315", "story-mainnet"] {
        let out = svc.create(&goldrush_req(chain, TOKEN, None)).await.unwrap();
        assert_failed(&out, &["does not serve Story", "source \"index\""]);
    }
    let out = svc
        .create(&goldrush_req("arbitrum-mainnet", TOKEN, Some(100)))
        .await
        .unwrap();
    assert_failed(&out, &["Foundational", "arbitrum-mainnet"]);
    assert!(server.received_requests().await.unwrap().is_empty());
}

#[tokio::test]
async fn missing_api_key_fails_with_the_variable_name() {
    let env = TestEnv::new().await;
    let server = MockServer::start().await;
    let mut cfg = env.config().snapshots;
    cfg.goldrush_base_url = server.uri();
    cfg.goldrush_api_key_env = "TW_TEST_SURELY_UNSET_GOLDRUSH_KEY".into();
    let svc = SnapshotService::from_config(env.pool.clone(), &cfg).unwrap();
    let out = svc
        .create(&goldrush_req("eth-mainnet", TOKEN, None))
        .await
        .unwrap();
    assert_failed(&out, &["TW_TEST_SURELY_UNSET_GOLDRUSH_KEY"]);
    assert!(server.received_requests().await.unwrap().is_empty());
}

/// Takes a one-page GoldRush snapshot of `holders` with `decimals`.
async fn snapshot_of(env: &TestEnv, holders: Vec<(String, String)>, decimals: i64) -> Uuid {
    let server = MockServer::start().await;
    let mut s = spec(TOKEN, holders, 1234);
    s.decimals = Some(decimals);
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page(&s)))
        .mount(&server)
        .await;
    let out = service(env, &server)
        .create(&goldrush_req("eth-mainnet", TOKEN, None))
        .await
        .unwrap();
    assert_eq!(out.status, SnapshotStatus::Complete, "{out:?}");
    out.snapshot_id
}

async fn verify_sql(env: &TestEnv, id: Uuid, wallet: &str, min: &str) -> Result<bool, String> {
    sqlx::query_scalar::<_, bool>("SELECT verify_address_in_snapshot($1, $2, $3)")
        .bind(id)
        .bind(wallet)
        .bind(min)
        .fetch_one(&env.pool)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn verify_converts_whole_tokens_with_the_tokens_own_decimals() {
    for kind in DbKind::ALL {
        verify_converts_on(TestEnv::on(kind).await).await;
    }
}

async fn verify_converts_on(env: TestEnv) {
    let w = "0xAbCdEf0000000000000000000000000000000001";
    let wl = w.to_lowercase();
    // 6 decimals: 1.5 tokens = 1_500_000 base units.
    let six = snapshot_of(&env, vec![(wl.clone(), "1500000".into())], 6).await;
    assert_eq!(verify_sql(&env, six, w, "1.5").await, Ok(true));
    assert_eq!(verify_sql(&env, six, &wl, "1.500000").await, Ok(true));
    assert_eq!(verify_sql(&env, six, w, "1.500001").await, Ok(false));
    assert_eq!(verify_sql(&env, six, w, "2").await, Ok(false));
    let err = verify_sql(&env, six, w, "1.5000001").await.unwrap_err();
    assert!(
        err.contains("7 fractional digits") && err.contains("6 decimals"),
        "{err}"
    );
    // 0 decimals: whole units only.
    let zero = snapshot_of(&env, vec![(wl.clone(), "3".into())], 0).await;
    assert_eq!(verify_sql(&env, zero, w, "3").await, Ok(true));
    assert_eq!(verify_sql(&env, zero, w, "4").await, Ok(false));
    assert!(verify_sql(&env, zero, w, "0.5").await.is_err());
    // 18 decimals: 2.5 tokens.
    let eighteen = snapshot_of(&env, vec![(wl.clone(), "2500000000000000000".into())], 18).await;
    assert_eq!(verify_sql(&env, eighteen, w, "2.5").await, Ok(true));
    assert_eq!(
        verify_sql(&env, eighteen, w, "2.500000000000000001").await,
        Ok(false)
    );
    assert_eq!(
        verify_sql(&env, eighteen, &holder(99), "0.000001").await,
        Ok(false)
    );
    // Bad input is an error, not false.
    for bad in ["-1", "1e3", "", "abc"] {
        assert!(verify_sql(&env, six, w, bad).await.is_err(), "{bad:?}");
    }
    assert!(verify_sql(&env, six, "0x1234", "1").await.is_err());
    // Same answers through the Rust entry point the CLI uses.
    assert!(store::verify(&env.pool, six, w, "1.5").await.unwrap());
    assert!(!store::verify(&env.pool, six, w, "1.6").await.unwrap());
}

/// "Holds at least 0" is true of everyone: the check refuses it instead of answering `true`
/// for an address that holds nothing.
#[tokio::test]
async fn verify_refuses_a_minimum_of_zero_on_both_databases() {
    for kind in DbKind::ALL {
        let env = TestEnv::on(kind).await;
        let id = snapshot_of(&env, vec![(holder(1), "10".into())], 6).await;
        for zero in ["0", "0.0", "0.000000", " 0 "] {
            let err = verify_sql(&env, id, &holder(2), zero)
                .await
                .expect_err("a zero minimum is refused");
            assert!(
                err.contains("must be greater than zero"),
                "{kind:?} {zero:?}: {err}"
            );
        }
        assert_eq!(verify_sql(&env, id, &holder(1), "0.000001").await, Ok(true));
        assert_eq!(
            verify_sql(&env, id, &holder(2), "0.000001").await,
            Ok(false)
        );
    }
}

#[tokio::test]
async fn verify_refuses_unknown_pending_and_failed_snapshots() {
    for kind in DbKind::ALL {
        verify_refuses_on(TestEnv::on(kind).await).await;
    }
}

async fn verify_refuses_on(env: TestEnv) {
    let unknown = Uuid::new_v4();
    let err = store::verify(&env.pool, unknown, &holder(1), "1")
        .await
        .unwrap_err();
    assert!(
        matches!(err, CheckError::Refused(ref m) if m.contains("does not exist")),
        "{err}"
    );

    let pending: Uuid = sqlx::query_scalar(
        "INSERT INTO snapshots (id, source, chain, token) VALUES ($1, 'goldrush', 'eth-mainnet', $2) RETURNING id",
    )
    .bind(Uuid::new_v4())
    .bind(TOKEN)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO snapshot_holders VALUES ($1, $2, 100)")
        .bind(pending)
        .bind(holder(1))
        .execute(&env.pool)
        .await
        .unwrap();
    let err = verify_sql(&env, pending, &holder(1), "1")
        .await
        .unwrap_err();
    assert!(err.contains("is pending, not complete"), "{err}");

    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({
            "data": null, "error": true, "error_message": "Not found", "error_code": 404
        })))
        .mount(&server)
        .await;
    let failed = service(&env, &server)
        .create(&goldrush_req("eth-mainnet", TOKEN, None))
        .await
        .unwrap();
    let err = verify_sql(&env, failed.snapshot_id, &holder(1), "0")
        .await
        .unwrap_err();
    assert!(
        err.contains("is failed, not complete") && err.contains("HTTP 404"),
        "{err}"
    );

    // Public readers (anon) see no holder rows of a pending snapshot, and the check refuses too.
    assert_eq!(holder_rows_visible_to_anon(&env, pending).await, 0);
}

/// How many holder rows of `id` the public `anon` role can read (RLS applied).
async fn holder_rows_visible_to_anon(env: &TestEnv, id: uuid::Uuid) -> i64 {
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE anon")
        .execute(&mut *tx)
        .await
        .unwrap();
    let visible: i64 =
        sqlx::query_scalar("SELECT count(*) FROM snapshot_holders WHERE snapshot_id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    tx.rollback().await.unwrap();
    visible
}

#[tokio::test]
async fn anon_can_read_complete_snapshots_and_call_verify() {
    let env = TestEnv::new().await;
    let id = snapshot_of(&env, vec![(holder(5), "1000000".into())], 6).await;
    assert_eq!(holder_rows_visible_to_anon(&env, id).await, 1);
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE anon")
        .execute(&mut *tx)
        .await
        .unwrap();
    let ok: bool = sqlx::query_scalar("SELECT verify_address_in_snapshot($1, $2, '1')")
        .bind(id)
        .bind(holder(5).to_uppercase().replace("0X", "0x"))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert!(ok);
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn diff_lists_joined_left_and_changed_holders() {
    let env = TestEnv::new().await;
    let a = snapshot_of(
        &env,
        vec![
            (holder(1), "10".into()),
            (holder(2), "20".into()),
            (holder(3), "30".into()),
        ],
        0,
    )
    .await;
    let b = snapshot_of(
        &env,
        vec![
            (holder(2), "20".into()),
            (holder(3), "31".into()),
            (holder(4), "40".into()),
        ],
        0,
    )
    .await;
    let rows = store::diff(&env.pool, a, b).await.unwrap();
    let got: Vec<(String, String, Option<String>, Option<String>)> = rows
        .into_iter()
        .map(|r| (r.change, r.holder, r.from_balance, r.to_balance))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "changed".into(),
                holder(3),
                Some("30".into()),
                Some("31".into())
            ),
            ("joined".into(), holder(4), None, Some("40".into())),
            ("left".into(), holder(1), Some("10".into()), None),
        ]
    );
}

#[tokio::test]
async fn top_holders_are_ordered_by_the_numeric_balance_not_its_text() {
    let env = TestEnv::new().await;
    let id = snapshot_of(
        &env,
        vec![
            (holder(1), "9".into()),
            (holder(2), "10".into()),
            (holder(3), "100000000000000000000000".into()),
            (holder(4), "2".into()),
        ],
        0,
    )
    .await;
    let top = store::top_holders(&env.pool, id, 3).await.unwrap();
    assert_eq!(
        top,
        vec![
            (holder(3), "100000000000000000000000".to_string()),
            (holder(2), "10".to_string()),
            (holder(1), "9".to_string()),
        ]
    );
}

#[tokio::test]
async fn snapshot_create_job_replies_and_is_idempotent_per_request_id() {
    let env = TestEnv::new().await;
    let server = MockServer::start().await;
    mount_single_page(&server, "eth-mainnet", TOKEN, 1).await;
    let handler = SnapshotCreateHandler::new(Arc::new(service(&env, &server)));
    assert_eq!(handler.job_type(), "snapshot_create");
    let request_id = Uuid::new_v4();
    let payload = json!({
        "request_id": request_id, "source": "goldrush", "chain": "eth-mainnet",
        "token": TOKEN.to_uppercase().replace("0X", "0x"),
    });
    let reply = handler.handle(payload.clone()).await.expect("job succeeds");
    assert_eq!(reply["request_id"], json!(request_id));
    assert_eq!(reply["status"], json!("complete"));
    assert_eq!(reply["holder_count"], json!(2));
    assert_eq!(reply["block_height"], json!(100));
    let id = reply["snapshot_id"]
        .as_str()
        .expect("snapshot id")
        .to_string();
    // The same request again: the stored outcome, no second crawl (the mock expects 1 call).
    let again = handler.handle(payload).await.unwrap();
    assert_eq!(again, reply);
    let row = store::get(&env.pool, id.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.request_id, Some(request_id));
    server.verify().await;

    // Same request id, different token: rejected, not a second snapshot.
    let conflict = handler
        .handle(json!({
            "request_id": request_id, "source": "goldrush", "chain": "eth-mainnet", "token": INDEX_TOKEN
        }))
        .await;
    assert!(matches!(conflict, Err(JobError::Rejected(ref m)) if m.contains("already created")));
    // Schema violations are rejected with the reason.
    for bad in [
        json!({"request_id": Uuid::new_v4(), "source": "goldrush", "chain": "eth-mainnet", "token": TOKEN, "extra": 1}),
        json!({"request_id": Uuid::new_v4(), "source": "moralis", "chain": "eth-mainnet", "token": TOKEN}),
        json!({"request_id": Uuid::new_v4(), "source": "index", "chain": 1514, "token": "0x12"}),
        json!({"source": "index", "chain": 1514, "token": TOKEN}),
    ] {
        let res = handler.handle(bad.clone()).await;
        assert!(
            matches!(res, Err(JobError::Rejected(_))),
            "{bad} gave {res:?}"
        );
    }
    // Numeric chain ids are accepted as integers: a Story index snapshot of an unindexed token
    // is a durable failed outcome with the reason.
    let reply = handler
        .handle(
            json!({"request_id": Uuid::new_v4(), "source": "index", "chain": 1514, "token": TOKEN}),
        )
        .await
        .unwrap();
    assert_eq!(reply["status"], json!("failed"));
    assert!(
        reply["error"].as_str().unwrap().contains("not indexed"),
        "{reply}"
    );
}

// ---- One crawler per snapshot: repeated requests while a crawl runs ----

/// Mounts a two-page crawl of `TOKEN` at block 100: page 0 answers at once the first time and
/// slowly after that; page 1 answers after `page1_delay` (so a crawl is mid-flight meanwhile).
async fn mount_slow_two_page_crawl(
    server: &MockServer,
    page0: &[(String, String)],
    page1: &[(String, String)],
    page1_delay: Duration,
) {
    let mut s0 = spec(TOKEN, page0.to_vec(), 100);
    s0.has_more = true;
    s0.total_count = Some((page0.len() + page1.len()) as u64);
    let mut s1 = spec(TOKEN, page1.to_vec(), 100);
    s1.page_number = 1;
    s1.total_count = s0.total_count;
    Mock::given(method("GET"))
        .and(path(holders_path("eth-mainnet", TOKEN)))
        .and(query_param("page-number", "0"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page(&s0)))
        .up_to_n_times(1)
        .with_priority(1)
        .expect(1)
        .mount(server)
        .await;
    // A second crawl (the bug) re-fetches page 0; it gets it after crawl 1 finished page 1.
    Mock::given(method("GET"))
        .and(path(holders_path("eth-mainnet", TOKEN)))
        .and(query_param("page-number", "0"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(page(&s0))
                .set_delay(page1_delay * 2),
        )
        .with_priority(2)
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path(holders_path("eth-mainnet", TOKEN)))
        .and(query_param("page-number", "1"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(page(&s1))
                .set_delay(page1_delay),
        )
        .with_priority(1)
        .mount(server)
        .await;
}

async fn holder_count_of_request(env: &TestEnv, request_id: Uuid) -> Option<(Uuid, i64)> {
    sqlx::query_as(
        "SELECT s.id, (SELECT count(*) FROM snapshot_holders h WHERE h.snapshot_id = s.id) \
         FROM snapshots s WHERE s.request_id = $1",
    )
    .bind(request_id)
    .fetch_optional(&env.pool)
    .await
    .expect("read snapshot")
}

#[tokio::test]
async fn a_repeated_request_during_a_crawl_does_not_reset_it_and_the_snapshot_is_whole() {
    let env = TestEnv::new().await;
    let server = MockServer::start().await;
    let page0: Vec<(String, String)> = (0..300u64)
        .map(|i| (holder(i), (1000 + i).to_string()))
        .collect();
    let page1: Vec<(String, String)> = (300..400u64)
        .map(|i| (holder(i), (1000 + i).to_string()))
        .collect();
    mount_slow_two_page_crawl(&server, &page0, &page1, Duration::from_millis(1500)).await;
    let handler = SnapshotCreateHandler::new(Arc::new(service(&env, &server)));
    let request_id = Uuid::new_v4();
    let payload = json!({
        "request_id": request_id, "source": "goldrush", "chain": "eth-mainnet", "token": TOKEN,
    });
    // Crawl 1 starts; the caller "times out" once page 0 is stored and page 1 is in flight.
    let first = tokio::spawn({
        let handler = handler.clone();
        let payload = payload.clone();
        async move { handler.handle(payload).await }
    });
    let (id, _) = common::wait_until(Duration::from_secs(10), "page 0 stored", || async {
        holder_count_of_request(&env, request_id)
            .await
            .filter(|(_, n)| *n == page0.len() as i64)
    })
    .await;
    // The same request again (caller retry / queue redelivery) while crawl 1 is mid-flight: it
    // must not touch crawl 1's rows, and says "retry later" rather than a final answer.
    let again = handler.handle(payload.clone()).await;
    match &again {
        Err(JobError::Retryable(m)) => assert!(m.contains("being crawled"), "{m}"),
        other => panic!("a repeated request during the crawl gave {other:?}"),
    }
    assert_eq!(
        holder_count_of_request(&env, request_id).await,
        Some((id, page0.len() as i64)),
        "the repeated request left crawl 1's rows alone"
    );
    let reply = first
        .await
        .expect("crawl 1 task")
        .expect("crawl 1 succeeds");
    assert_eq!(reply["status"], json!("complete"), "{reply}");
    assert_eq!(reply["snapshot_id"], json!(id));
    assert_eq!(reply["holder_count"], json!(400));
    let mut expected: Vec<(String, String)> = page0.iter().chain(&page1).cloned().collect();
    expected.sort();
    assert_eq!(
        holder_rows(&env, id).await,
        expected,
        "every holder of both pages"
    );
    // Once crawl 1 is done, the redelivered request gets the stored outcome.
    let later = handler.handle(payload).await.expect("redelivery succeeds");
    assert_eq!(later, reply);
    server.verify().await;
}

#[tokio::test]
async fn a_pending_snapshot_whose_crawler_died_is_restarted_by_the_redelivery() {
    let env = TestEnv::new().await;
    let server = MockServer::start().await;
    mount_single_page(&server, "eth-mainnet", TOKEN, 1).await;
    let request_id = Uuid::new_v4();
    // What a crashed worker leaves behind: a pending row with part of a crawl (a stale holder),
    // and no claim (its session ended with it).
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO snapshots (id, request_id, source, chain, token) \
         VALUES ($1, $2, 'goldrush', 'eth-mainnet', $3)",
    )
    .bind(id)
    .bind(request_id)
    .bind(TOKEN)
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO snapshot_holders VALUES ($1, $2, 7)")
        .bind(id)
        .bind(holder(99))
        .execute(&env.pool)
        .await
        .unwrap();
    let handler = SnapshotCreateHandler::new(Arc::new(service(&env, &server)));
    let reply = handler
        .handle(json!({
            "request_id": request_id, "source": "goldrush", "chain": "eth-mainnet", "token": TOKEN,
        }))
        .await
        .expect("the redelivery takes over");
    assert_eq!(reply["status"], json!("complete"), "{reply}");
    assert_eq!(reply["snapshot_id"], json!(id));
    assert_eq!(reply["holder_count"], json!(2));
    assert_eq!(
        holder_rows(&env, id).await,
        vec![(holder(1), "10".into()), (holder(2), "20".into())],
        "the dead crawl's rows were reset"
    );
    server.verify().await;
}

#[tokio::test]
async fn a_claim_excludes_other_sessions_until_released_or_its_session_ends() {
    let env = TestEnv::new().await;
    let id = Uuid::now_v7();
    let claim = CrawlClaim::try_claim(&env.pool, id)
        .await
        .unwrap()
        .expect("free");
    assert!(
        CrawlClaim::try_claim(&env.pool, id)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        CrawlClaim::try_claim(&env.pool, Uuid::now_v7())
            .await
            .unwrap()
            .is_some(),
        "claims are per snapshot"
    );
    claim.release().await;
    let claim = CrawlClaim::try_claim(&env.pool, id)
        .await
        .unwrap()
        .expect("released");
    // A crawler that vanishes without releasing (its session closes): the claim is free again.
    drop(claim);
    common::wait_until(
        Duration::from_secs(10),
        "the dropped claim's session ends",
        || async {
            CrawlClaim::try_claim(&env.pool, id)
                .await
                .unwrap()
                .map(drop)
        },
    )
    .await;
}

#[tokio::test]
async fn complete_refuses_when_the_stored_rows_are_not_the_crawls_own() {
    let env = TestEnv::new().await;
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO snapshots (id, source, chain, token) VALUES ($1, 'goldrush', 'eth-mainnet', $2)",
    )
    .bind(id)
    .bind(TOKEN)
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO snapshot_holders VALUES ($1, $2, 7)")
        .bind(id)
        .bind(holder(1))
        .execute(&env.pool)
        .await
        .unwrap();
    let mut conn = env.pool.acquire().await.unwrap();
    let c = store::Completion::default();
    assert_eq!(
        store::complete(&mut conn, id, &c, 2).await.unwrap(),
        store::Completed::CountMismatch {
            stored: 1,
            expected: 2
        }
    );
    let row = store::get(&env.pool, id).await.unwrap().unwrap();
    assert_eq!(row.status, SnapshotStatus::Pending, "not marked complete");
    assert_eq!(
        store::complete(&mut conn, id, &c, 1).await.unwrap(),
        store::Completed::Complete(1)
    );
    assert_eq!(
        store::complete(&mut conn, id, &c, 1).await.unwrap(),
        store::Completed::NotPending
    );
}

// ---- Own-index snapshots computed from chain_transfers rows ----

const ZERO: &str = "0x0000000000000000000000000000000000000000";

async fn insert_transfer(
    env: &TestEnv,
    (chain_id, block, log_index): (i64, i64, i32),
    token: &str,
    from: &str,
    to: &str,
    value: &str,
    token_id: Option<&str>,
) {
    sqlx::query(
        "INSERT INTO chain_transfers (chain_id, block_number, block_hash, log_index, tx_hash, token, \
         from_address, to_address, value, token_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::numeric, $10::numeric)",
    )
    .bind(chain_id)
    .bind(block)
    .bind(format!("0x{:064x}", block))
    .bind(log_index)
    .bind(format!("0x{:064x}", block * 1000 + log_index as i64))
    .bind(token)
    .bind(from)
    .bind(to)
    .bind(value)
    .bind(token_id)
    .execute(&env.pool)
    .await
    .expect("insert transfer");
}

fn index_req(chain: &str, token: &str, block: Option<u64>) -> SnapshotRequest {
    SnapshotRequest::new(None, SnapshotSource::Index, chain, token, block).unwrap()
}

#[tokio::test]
async fn own_index_snapshots_from_transfer_rows() {
    let env = TestEnv::new().await;
    let server = MockServer::start().await;
    let svc = service(&env, &server);
    let erc20 = "0x00000000000000000000000000000000000000e2";
    let nft = "0x00000000000000000000000000000000000000e7";
    let (a, b, c) = (holder(1), holder(2), holder(3));
    sqlx::query(
        "INSERT INTO chain_tokens (chain_id, address, standard, decimals, start_block) VALUES \
         (31337, $1, 'erc20', 6, 1), (31337, $2, 'erc721', NULL, 1)",
    )
    .bind(erc20)
    .bind(nft)
    .execute(&env.pool)
    .await
    .unwrap();
    // ERC-20: block 2 mint 100 to a; block 3 a→b 40; block 4 b→c 40, a burns 10.
    insert_transfer(&env, (31337, 2, 0), erc20, ZERO, &a, "100000000", None).await;
    insert_transfer(&env, (31337, 3, 0), erc20, &a, &b, "40000000", None).await;
    insert_transfer(&env, (31337, 4, 0), erc20, &b, &c, "40000000", None).await;
    insert_transfer(&env, (31337, 4, 1), erc20, &a, ZERO, "10000000", None).await;
    // ERC-721: block 2 mint #1,#2 to a; block 3 #1 a→b; block 4 #2 burned, #3 minted to b.
    insert_transfer(&env, (31337, 2, 1), nft, ZERO, &a, "1", Some("1")).await;
    insert_transfer(&env, (31337, 2, 2), nft, ZERO, &a, "1", Some("2")).await;
    insert_transfer(&env, (31337, 3, 1), nft, &a, &b, "1", Some("1")).await;
    insert_transfer(&env, (31337, 4, 2), nft, &a, ZERO, "1", Some("2")).await;
    insert_transfer(&env, (31337, 4, 3), nft, ZERO, &b, "1", Some("3")).await;
    // Nothing indexed yet: no checkpoint.
    let out = svc
        .create(&index_req("31337", erc20, Some(3)))
        .await
        .unwrap();
    assert_failed(&out, &["no indexer checkpoint"]);
    sqlx::query(
        "INSERT INTO chain_checkpoints (chain_id, block_number, block_hash, finalized_block) \
         VALUES (31337, 6, '0x06', 4)",
    )
    .execute(&env.pool)
    .await
    .unwrap();

    let expect20 = [
        (3u64, vec![(a.clone(), "60000000"), (b.clone(), "40000000")]),
        (4, vec![(a.clone(), "50000000"), (c.clone(), "40000000")]),
    ];
    for (block, want) in expect20 {
        let out = svc
            .create(&index_req("31337", erc20, Some(block)))
            .await
            .unwrap();
        assert_eq!(out.status, SnapshotStatus::Complete, "{out:?}");
        let want: Vec<(String, String)> =
            want.into_iter().map(|(h, v)| (h, v.to_string())).collect();
        assert_eq!(
            holder_rows(&env, out.snapshot_id).await,
            want,
            "block {block}"
        );
        let row = store::get(&env.pool, out.snapshot_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.decimals, Some(6));
        assert!(
            store::verify(&env.pool, out.snapshot_id, &a, "50")
                .await
                .unwrap()
        );
    }
    // Default block: the finalized one (4).
    let out = svc.create(&index_req("31337", erc20, None)).await.unwrap();
    assert_eq!(out.block_height, Some(4));
    assert_eq!(out.holder_count, Some(2));

    let out = svc.create(&index_req("31337", nft, Some(3))).await.unwrap();
    assert_eq!(
        holder_rows(&env, out.snapshot_id).await,
        vec![(a.clone(), "1".to_string()), (b.clone(), "1".to_string())]
    );
    let out = svc.create(&index_req("31337", nft, Some(4))).await.unwrap();
    assert_eq!(
        holder_rows(&env, out.snapshot_id).await,
        vec![(b.clone(), "2".to_string())]
    );
    assert!(
        store::verify(&env.pool, out.snapshot_id, &b, "2")
            .await
            .unwrap()
    );

    // Above the finalized block (5 is committed but not final): refused with the reason.
    let out = svc
        .create(&index_req("31337", erc20, Some(5)))
        .await
        .unwrap();
    assert_failed(&out, &["above the index's finalized block 4"]);
    let out = svc
        .create(&index_req("31337", erc20, Some(0)))
        .await
        .unwrap();
    assert_failed(&out, &["before the index's start block 1"]);
    let out = svc
        .create(&index_req(
            "31337",
            "0x00000000000000000000000000000000000000ff",
            None,
        ))
        .await
        .unwrap();
    assert_failed(&out, &["not indexed"]);
    let out = svc
        .create(&index_req("eth-mainnet", erc20, None))
        .await
        .unwrap();
    assert_failed(&out, &["not a numeric chain id"]);

    // Missing history (an outgoing transfer with no incoming one) is refused, not published.
    insert_transfer(&env, (31337, 4, 9), erc20, &holder(7), &a, "5", None).await;
    let out = svc
        .create(&index_req("31337", erc20, Some(4)))
        .await
        .unwrap();
    assert_failed(&out, &["negative balance", &holder(7)]);
    assert!(holder_rows(&env, out.snapshot_id).await.is_empty());
}

#[tokio::test]
async fn cli_check_and_diff_print_answers_and_refuse_unknown_snapshots() {
    let env = TestEnv::new().await;
    let a = snapshot_of(&env, vec![(holder(1), "1500000".into())], 6).await;
    let b = snapshot_of(&env, vec![(holder(2), "1".into())], 6).await;
    let run = |args: Vec<String>| {
        let mut cmd = std::process::Command::new(common::tokenwarden_bin());
        cmd.args(&args);
        for (k, v) in env.env_vars() {
            cmd.env(k, v);
        }
        cmd.output().expect("run tokenwarden")
    };
    let out = run(vec![
        "snapshot".into(),
        "check".into(),
        a.to_string(),
        holder(1).to_uppercase().replace("0X", "0x"),
        "1.5".into(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "true");
    let out = run(vec![
        "snapshot".into(),
        "check".into(),
        a.to_string(),
        holder(1),
        "1.6".into(),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "false");
    let out = run(vec![
        "snapshot".into(),
        "check".into(),
        Uuid::new_v4().to_string(),
        holder(1),
        "1".into(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    let out = run(vec![
        "snapshot".into(),
        "diff".into(),
        a.to_string(),
        b.to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("joined   {}", holder(2))), "{text}");
    assert!(text.contains(&format!("left     {}", holder(1))), "{text}");
    assert!(text.contains("joined 1, left 1, changed 0"), "{text}");
    let out = run(vec!["snapshot".into(), "show".into(), a.to_string()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("status        complete"));
}

// ---- Own-index snapshots on anvil: the real indexer, checked against balanceOf at each block ----

mod onchain {
    use alloy::primitives::{Address, U256};
    use alloy::providers::{Provider, ProviderBuilder};
    use alloy::rpc::types::BlockId;
    use alloy::sol;

    // TestNft721 has the same `batch` and `balanceOf` signatures, so one binding serves both.
    sol! {
        #[sol(rpc)]
        contract TestToken20 {
            function batch(address[] from, address[] to, uint256[] value) external;
            function balanceOf(address) external view returns (uint256);
        }
    }

    /// anvil's first dev account (unlocked: anvil signs eth_sendTransaction for it).
    pub const DEV: Address =
        alloy::primitives::address!("f39Fd6e51aad88F6F4ce6aB8827279cffFb92266");

    pub fn provider(url: &str) -> impl Provider + Clone {
        ProviderBuilder::new().connect_http(url.parse().unwrap())
    }

    /// Sends one `batch` (same signature on TestToken20 and TestNft721: (from, to, value or
    /// token id) triples) and returns its block number.
    pub async fn batch(
        p: &impl Provider,
        token: Address,
        moves: &[(Address, Address, u64)],
    ) -> u64 {
        let c = TestToken20::new(token, p);
        let r = c
            .batch(
                moves.iter().map(|m| m.0).collect(),
                moves.iter().map(|m| m.1).collect(),
                moves.iter().map(|m| U256::from(m.2)).collect(),
            )
            .from(DEV)
            .send()
            .await
            .expect("batch sent")
            .get_receipt()
            .await
            .expect("batch mined");
        assert!(r.status());
        r.block_number.expect("block number")
    }

    /// balanceOf(holder) at `block`, through eth_call (same selector on both contracts).
    pub async fn balance_at(
        p: &impl Provider,
        token: Address,
        holder: Address,
        block: u64,
    ) -> U256 {
        TestToken20::new(token, p)
            .balanceOf(holder)
            .block(BlockId::number(block))
            .call()
            .await
            .expect("balanceOf at block")
    }
}

#[tokio::test]
async fn own_index_snapshots_on_anvil_equal_balance_of_at_each_block() {
    use alloy::primitives::Address;
    use alloy::providers::Provider;

    let env = TestEnv::new().await;
    let anvil = common::anvil::Anvil::spawn().await;
    let p = onchain::provider(&anvil.url);
    let erc20 = anvil.deploy("TestToken20").await;
    let nft = anvil.deploy("TestNft721").await;
    let deployed_at = p.get_block_number().await.unwrap();
    let h: Vec<Address> = (1..=6u64)
        .map(|i| {
            Address::from_word(alloy::primitives::B256::from(
                alloy::primitives::U256::from(0xabc000 + i),
            ))
        })
        .collect();
    let z = Address::ZERO;
    let mut blocks = vec![deployed_at];
    // ERC-20 history: mints, transfers, burns, a self-transfer and a zero-value transfer.
    blocks.push(onchain::batch(&p, erc20, &[(z, h[0], 1000), (z, h[1], 500), (z, h[2], 10)]).await);
    blocks.push(
        onchain::batch(
            &p,
            erc20,
            &[(h[0], h[1], 300), (h[2], h[3], 10), (h[1], z, 100)],
        )
        .await,
    );
    blocks.push(
        onchain::batch(
            &p,
            erc20,
            &[(h[3], h[4], 5), (h[1], h[0], 700), (z, h[4], 1)],
        )
        .await,
    );
    blocks.push(
        onchain::batch(
            &p,
            erc20,
            &[(h[0], h[0], 50), (h[4], h[2], 0), (h[0], h[5], 1400)],
        )
        .await,
    );
    // ERC-721 history: mints, transfers, a burn.
    blocks.push(onchain::batch(&p, nft, &[(z, h[0], 1), (z, h[0], 2), (z, h[0], 3)]).await);
    blocks.push(onchain::batch(&p, nft, &[(h[0], h[1], 1), (h[0], z, 2)]).await);
    blocks.push(onchain::batch(&p, nft, &[(h[0], h[2], 3), (z, h[1], 4), (h[1], h[3], 1)]).await);
    let last = *blocks.last().unwrap();
    // Bury the history under enough blocks that it is final whatever the finality rule.
    let _: serde_json::Value = p
        .raw_request("anvil_mine".into(), (200u64,))
        .await
        .expect("anvil_mine");

    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("chain.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[chain]\nenabled = true\n\n[[chain.chains]]\nchain_id = 31337\nname = \"anvil\"\n\
             rpc_urls = [\"{}\"]\npoll_interval_ms = 100\n\n\
             [[chain.tokens]]\nchain_id = 31337\naddress = \"{erc20:#x}\"\nstandard = \"erc20\"\nstart_block = 0\n\n\
             [[chain.tokens]]\nchain_id = 31337\naddress = \"{nft:#x}\"\nstandard = \"erc721\"\nstart_block = 0\n",
            anvil.url
        ),
    )
    .unwrap();
    let _worker = common::Child::spawn(&env, &["--config", cfg_path.to_str().unwrap(), "run"], &[]);
    common::wait_until(
        Duration::from_secs(60),
        "indexer finalizes the history",
        || async {
            let f: Option<i64> = sqlx::query_scalar(
                "SELECT finalized_block FROM chain_checkpoints WHERE chain_id = 31337",
            )
            .fetch_optional(&env.pool)
            .await
            .ok()
            .flatten();
            f.filter(|f| *f as u64 >= last).map(|_| ())
        },
    )
    .await;

    let server = MockServer::start().await;
    let svc = service(&env, &server);
    let mut checked = 0;
    for token in [erc20, nft] {
        let token_hex = format!("{token:#x}");
        for &block in &blocks {
            let out = svc
                .create(&index_req("31337", &token_hex, Some(block)))
                .await
                .unwrap();
            assert_eq!(out.status, SnapshotStatus::Complete, "{out:?}");
            let rows = holder_rows(&env, out.snapshot_id).await;
            for (holder, balance) in &rows {
                let addr: Address = holder.parse().unwrap();
                assert!(h.contains(&addr), "unexpected holder {holder}");
                assert_ne!(balance, "0");
            }
            for addr in &h {
                let want = onchain::balance_at(&p, token, *addr, block).await;
                let got = rows
                    .iter()
                    .find(|(holder, _)| holder == &format!("{addr:#x}"))
                    .map(|(_, b)| b.clone())
                    .unwrap_or_else(|| "0".to_string());
                assert_eq!(
                    got,
                    want.to_string(),
                    "{token_hex} holder {addr:#x} at block {block}"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 2 * blocks.len() * h.len());
    // Above the finalized block: refused.
    let out = svc
        .create(&index_req(
            "31337",
            &format!("{erc20:#x}"),
            Some(1_000_000_000),
        ))
        .await
        .unwrap();
    assert_failed(&out, &["above the index's finalized block"]);
}
