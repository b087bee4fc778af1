//! The monitoring files in `deploy/` speak the worker's metrics: every metric the Prometheus
//! alert rules and the Grafana dashboard query is one `src/` registers (the scan of
//! `scripts/gen-metrics-doc.py --json`, the same that generates `docs/metrics.md`), with label
//! names it records and, where the code only uses literal values, one of those values; the rules
//! and the Prometheus config pass `promtool check` and the rules' unit tests
//! (`deploy/prometheus/alerts.test.yml`) pass `promtool test rules`; every dashboard query is
//! valid PromQL; docker-compose.yml runs Prometheus and Grafana with these files.
//!
//! Reads files and runs `python3` and `promtool` only (no Postgres, Redis or Docker). promtool
//! comes with the Debian package `prometheus`, which `make test` installs
//! (`scripts/ops-tools.sh`); without it these tests fail, they never skip.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Labels every scraped series carries besides the worker's own (target labels), and the
/// histogram bucket bound.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// Metrics queried that the worker does not export: Prometheus's own per-target series.
const PROMETHEUS_SERIES: [&str; 1] = ["up"];

const RULES: &str = "deploy/prometheus/alerts.yml";
const RULE_TESTS: &str = "deploy/prometheus/alerts.test.yml";
const PROMETHEUS_CONFIG: &str = "deploy/prometheus/prometheus.yml";
const DASHBOARD: &str = "deploy/grafana/dashboards/tokenwarden.json";

#[derive(Debug)]
struct Metric {
    kind: String,
    /// label key -> (literal values, whether a value is computed at run time)
    labels: BTreeMap<String, (BTreeSet<String>, bool)>,
}

/// The metrics `src/` registers, from the scan that generates docs/metrics.md.
fn exported_metrics() -> BTreeMap<String, Metric> {
    let out = Command::new("python3")
        .arg(root().join("scripts/gen-metrics-doc.py"))
        .arg("--json")
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 scripts/gen-metrics-doc.py --json: {e}"));
    assert!(
        out.status.success(),
        "scripts/gen-metrics-doc.py --json failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scan: Value =
        serde_json::from_slice(&out.stdout).expect("gen-metrics-doc.py --json prints JSON");
    let scan = scan.as_object().expect("the scan is an object");
    assert!(
        scan.len() > 20,
        "the scan found only {} metrics: {scan:?}",
        scan.len()
    );
    scan.iter()
        .map(|(name, m)| {
            let labels = m["labels"]
                .as_object()
                .expect("labels is an object")
                .iter()
                .map(|(k, l)| {
                    let values = l["values"]
                        .as_array()
                        .expect("values is an array")
                        .iter()
                        .map(|v| v.as_str().expect("a label value is a string").to_string())
                        .collect();
                    (
                        k.clone(),
                        (values, l["dynamic"].as_bool().expect("dynamic is a bool")),
                    )
                })
                .collect();
            let kind = m["type"].as_str().expect("type is a string").to_string();
            (name.clone(), Metric { kind, labels })
        })
        .collect()
}

/// `promtool` from PATH; a clear failure (never a skip) when it is missing.
fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): install it with scripts/ops-tools.sh (Debian package \
                 `prometheus`; `make test` runs it)"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {} failed:\n{text}",
        args.join(" ")
    );
    text
}

/// The `expr:` values of a Prometheus rule file with the alert/record name each belongs to. A
/// reader for the shape of rule files: `- alert: X` / `- record: X` items whose `expr:` is a
/// plain one-line scalar or a `|` / `>` block. promtool checks the YAML itself.
fn rule_exprs(text: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut name = String::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start().trim_start_matches("- ");
        if let Some(n) = trimmed
            .strip_prefix("alert:")
            .or_else(|| trimmed.strip_prefix("record:"))
        {
            name = n.trim().to_string();
        }
        if let Some(value) = trimmed.strip_prefix("expr:") {
            let value = value.trim();
            let indent = line.len() - line.trim_start().len();
            if value.starts_with('|') || value.starts_with('>') {
                let mut block = Vec::new();
                while i + 1 < lines.len()
                    && (lines[i + 1].trim().is_empty()
                        || lines[i + 1].len() - lines[i + 1].trim_start().len() > indent)
                {
                    i += 1;
                    block.push(lines[i].trim());
                }
                out.push((name.clone(), block.join(" ")));
            } else {
                assert!(
                    !value.starts_with('"') && !value.starts_with('\''),
                    "{name}: write the expr as a plain or block scalar, not quoted"
                );
                out.push((name.clone(), value.to_string()));
            }
        }
        i += 1;
    }
    out
}

/// Every `"expr"` of the dashboard's panel targets, with the panel title.
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(v: &Value, title: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(map) => {
                let title = map.get("title").and_then(Value::as_str).unwrap_or(title);
                if let Some(expr) = map.get("expr").and_then(Value::as_str) {
                    out.push((title.to_string(), expr.to_string()));
                }
                for child in map.values() {
                    walk(child, title, out);
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, title, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dashboard, "", &mut out);
    out
}

/// What one PromQL expression refers to: metric selectors (name, label matchers) and the
/// label names of its `by` / `without` / `on` / `ignoring` / `group_left` / `group_right`
/// clauses. A tokenizer, not a parser: promtool checks the syntax.
/// (label, operator, value) of one label matcher.
type Matcher = (String, String, String);

#[derive(Debug, Default)]
struct Refs {
    /// (metric name, its label matchers)
    selectors: Vec<(String, Vec<Matcher>)>,
    grouping: BTreeSet<String>,
}

/// Words that are not metric names: aggregation operators (which may be followed by `by`
/// before their parenthesis), set and binary operator keywords, modifiers.
const KEYWORDS: [&str; 20] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "atan2",
];

/// Clauses followed by a list of label names.
const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn promql_refs(expr: &str) -> Refs {
    let chars: Vec<char> = expr.chars().collect();
    let mut refs = Refs::default();
    let mut i = 0;
    let ident_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let ident_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let skip_ws = |mut j: usize| {
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        j
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            continue;
        }
        if c == '[' {
            // A range or subquery duration: `[5m]`, `[30m:1m]`, `[$__rate_interval]`.
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
            continue;
        }
        if c == '$' {
            // A Grafana variable such as $__rate_interval.
            i += 1;
            while i < chars.len() && ident_char(chars[i]) {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_digit() {
            // A number or a duration (`1h`, `30m`, `1e3`).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        if !ident_start(c) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && ident_char(chars[i]) {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        let next = skip_ws(i);
        let next_char = chars.get(next).copied();
        let lower = word.to_ascii_lowercase();
        if GROUPING.contains(&lower.as_str()) && next_char == Some('(') {
            let close = chars[next..]
                .iter()
                .position(|&c| c == ')')
                .map(|p| next + p)
                .unwrap_or(chars.len());
            let inner: String = chars[next + 1..close].iter().collect();
            refs.grouping.extend(
                inner
                    .split(',')
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string),
            );
            i = close + 1;
            continue;
        }
        if KEYWORDS.contains(&lower.as_str())
            || GROUPING.contains(&lower.as_str())
            || next_char == Some('(')
        {
            // A keyword, or a function / aggregation call.
            continue;
        }
        let mut matchers = Vec::new();
        if next_char == Some('{') {
            let close = chars[next..]
                .iter()
                .position(|&c| c == '}')
                .map(|p| next + p)
                .expect("a label selector is closed");
            let inner: String = chars[next + 1..close].iter().collect();
            matchers = label_matchers(&inner);
            i = close + 1;
        }
        refs.selectors.push((word, matchers));
    }
    refs
}

/// `a="x", b=~"y|z"` → [(a, =, x), (b, =~, y|z)].
fn label_matchers(inner: &str) -> Vec<Matcher> {
    let mut out = Vec::new();
    let mut rest = inner.trim();
    while !rest.is_empty() {
        let op_at = rest
            .find(['=', '!'])
            .unwrap_or_else(|| panic!("no operator in label matchers `{inner}`"));
        let label = rest[..op_at].trim().to_string();
        let after = &rest[op_at..];
        let op_len =
            if after.starts_with("=~") || after.starts_with("!~") || after.starts_with("!=") {
                2
            } else {
                1
            };
        let op = after[..op_len].to_string();
        let value_part = after[op_len..].trim_start();
        let quote = value_part
            .chars()
            .next()
            .unwrap_or_else(|| panic!("no value in label matchers `{inner}`"));
        let end = value_part[1..]
            .find(quote)
            .unwrap_or_else(|| panic!("unclosed value in label matchers `{inner}`"))
            + 1;
        out.push((label, op, value_part[1..end].to_string()));
        rest = value_part[end + 1..]
            .trim_start()
            .trim_start_matches(',')
            .trim();
    }
    out
}

/// The exported metric a series name belongs to: itself, or a histogram's `_bucket` / `_sum`
/// / `_count` series.
fn base_metric<'a>(
    series: &str,
    metrics: &'a BTreeMap<String, Metric>,
) -> Option<(&'a str, &'a Metric, bool)> {
    if let Some((name, m)) = metrics.get_key_value(series) {
        return Some((name, m, false));
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = series.strip_suffix(suffix)
            && let Some((name, m)) = metrics.get_key_value(base)
            && m.kind == "histogram"
        {
            return Some((name, m, suffix == "_bucket"));
        }
    }
    None
}

/// Problems of one expression against the exported metrics (empty when it is right).
fn check_expr(
    origin: &str,
    expr: &str,
    metrics: &BTreeMap<String, Metric>,
    used: &mut BTreeSet<String>,
) -> Vec<String> {
    let refs = promql_refs(expr);
    let mut problems = Vec::new();
    let mut known_labels: BTreeSet<String> = TARGET_LABELS.iter().map(|s| s.to_string()).collect();
    if refs.selectors.is_empty() {
        problems.push(format!("{origin}: `{expr}` queries no metric"));
    }
    for (series, matchers) in &refs.selectors {
        if PROMETHEUS_SERIES.contains(&series.as_str()) {
            continue;
        }
        let Some((name, metric, bucket)) = base_metric(series, metrics) else {
            problems.push(format!(
                "{origin}: `{series}` is not a metric the worker exports (docs/metrics.md)"
            ));
            continue;
        };
        used.insert(name.to_string());
        known_labels.extend(metric.labels.keys().cloned());
        if bucket {
            known_labels.insert("le".into());
        }
        for (label, op, value) in matchers {
            if TARGET_LABELS.contains(&label.as_str()) || (bucket && label == "le") {
                continue;
            }
            let Some((values, dynamic)) = metric.labels.get(label) else {
                problems.push(format!(
                    "{origin}: `{name}` has no label `{label}` (it has {:?})",
                    metric.labels.keys().collect::<Vec<_>>()
                ));
                continue;
            };
            if *dynamic {
                continue;
            }
            // Plain alternatives of a regex matcher (`a|b`) are checked like `=` values.
            let alternatives: Vec<&str> = match op.as_str() {
                "=" | "!=" => vec![value.as_str()],
                _ if value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_|".contains(c)) =>
                {
                    value.split('|').collect()
                }
                _ => Vec::new(),
            };
            for v in alternatives {
                if !values.contains(v) {
                    problems.push(format!(
                        "{origin}: `{name}` never has {label}=\"{v}\" (the code records {values:?})"
                    ));
                }
            }
        }
    }
    for label in &refs.grouping {
        if !known_labels.contains(label) {
            problems.push(format!(
                "{origin}: groups by `{label}`, a label none of its metrics has ({known_labels:?})"
            ));
        }
    }
    problems
}

#[test]
fn promql_reader_finds_selectors_labels_and_grouping() {
    let refs = promql_refs(
        r#"sum by (job_type, kind) (rate(tokenwarden_jobs_failed_total{kind="retryable",job_type=~"a|b"}[5m])) / on (job_type) max(tokenwarden_queue_lag offset 1h) > 0 and up{job="x"} == 0"#,
    );
    let names: Vec<&str> = refs.selectors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "tokenwarden_jobs_failed_total",
            "tokenwarden_queue_lag",
            "up"
        ]
    );
    assert_eq!(
        refs.selectors[0].1,
        [
            ("kind".into(), "=".into(), "retryable".into()),
            ("job_type".into(), "=~".into(), "a|b".into())
        ]
    );
    assert_eq!(
        refs.grouping,
        BTreeSet::from(["job_type".to_string(), "kind".to_string()])
    );
    let metrics = exported_metrics();
    let mut used = BTreeSet::new();
    let bad = check_expr(
        "self-test",
        r#"sum by (chain) (rate(tokenwarden_jobs_failed_total{kind="retried"}[5m])) + tokenwarden_no_such_metric + tokenwarden_ledger_batch_seconds_bucket{le="0.1"}"#,
        &metrics,
        &mut used,
    );
    assert_eq!(
        bad.len(),
        3,
        "the check catches each kind of mistake: {bad:#?}"
    );
}

#[test]
fn alert_rules_query_only_exported_metrics_and_labels() {
    let metrics = exported_metrics();
    let exprs = rule_exprs(&read(RULES));
    let mut used = BTreeSet::new();
    let problems: Vec<String> = exprs
        .iter()
        .flat_map(|(name, expr)| check_expr(&format!("{RULES} {name}"), expr, &metrics, &mut used))
        .collect();
    assert!(problems.is_empty(), "{problems:#?}");
    let names: BTreeSet<&str> = exprs.iter().map(|(n, _)| n.as_str()).collect();
    // The alerts issue 13 asks for, each on the metric that shows it.
    for (alert, metric) in [
        (
            "TokenwardenDeadLettersGrowing",
            "tokenwarden_dead_letters_total",
        ),
        (
            "TokenwardenQueueOldestEntryStale",
            "tokenwarden_queue_oldest_age_seconds",
        ),
        (
            "TokenwardenLedgerBatchFailures",
            "tokenwarden_jobs_failed_total",
        ),
        (
            "TokenwardenIndexerLagging",
            "tokenwarden_indexer_head_lag_blocks",
        ),
        ("TokenwardenIndexerStopped", "tokenwarden_indexer_stopped"),
        (
            "TokenwardenGoldRushFailures",
            "tokenwarden_goldrush_requests_total",
        ),
        ("TokenwardenAnomalyFindings", "tokenwarden_anomalies_total"),
    ] {
        assert!(names.contains(alert), "{RULES} has no alert {alert}");
        let expr = &exprs.iter().find(|(n, _)| n == alert).expect("listed").1;
        assert!(expr.contains(metric), "{alert} does not query {metric}");
    }
    // promtool counts the same rules this reader found, so none was overlooked.
    let dir = root().join("deploy/prometheus");
    let out = promtool(&["check", "rules", "alerts.yml"], &dir);
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "promtool and this test disagree on the number of rules ({} read here):\n{out}",
        exprs.len()
    );
}

#[test]
fn alert_rules_and_prometheus_config_pass_promtool() {
    let dir = root().join("deploy/prometheus");
    promtool(&["check", "config", "prometheus.yml"], &dir);
    let out = promtool(&["test", "rules", "alerts.test.yml"], &dir);
    assert!(out.contains("SUCCESS"), "promtool test rules: {out}");
    // Each alert the unit tests name exists in the rules (a renamed alert fails here, not
    // silently as an empty expectation).
    let rules = read(RULES);
    for line in read(RULE_TESTS).lines() {
        if let Some(name) = line.trim().strip_prefix("alertname:") {
            assert!(
                rules.contains(&format!("alert: {}", name.trim())),
                "{RULE_TESTS} tests `{}`, which {RULES} does not define",
                name.trim()
            );
        }
    }
    assert!(
        read(PROMETHEUS_CONFIG).contains("alerts.yml"),
        "{PROMETHEUS_CONFIG} does not load the alert rules"
    );
}

#[test]
fn dashboard_queries_only_exported_metrics_and_is_valid_promql() {
    let metrics = exported_metrics();
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD))
        .unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"));
    assert_eq!(dashboard["uid"], "tokenwarden", "stable dashboard uid");
    let exprs = dashboard_exprs(&dashboard);
    assert!(
        exprs.len() > 20,
        "only {} queries in the dashboard",
        exprs.len()
    );
    let mut used = BTreeSet::new();
    let problems: Vec<String> = exprs
        .iter()
        .flat_map(|(title, expr)| {
            check_expr(
                &format!("{DASHBOARD} panel \"{title}\""),
                expr,
                &metrics,
                &mut used,
            )
        })
        .collect();
    assert!(problems.is_empty(), "{problems:#?}");
    // Every metric the worker exports has a panel.
    let unshown: Vec<&String> = metrics.keys().filter(|m| !used.contains(*m)).collect();
    assert!(
        unshown.is_empty(),
        "{DASHBOARD} shows no panel for {unshown:?}"
    );
    // Panels use the provisioned datasource.
    let text = read(DASHBOARD);
    let datasource = read("deploy/grafana/provisioning/datasources/prometheus.yml");
    assert!(
        datasource.contains("uid: tokenwarden-prometheus")
            && text.contains("\"uid\": \"tokenwarden-prometheus\""),
        "dashboard and provisioned datasource disagree on the datasource uid"
    );
    // PromQL syntax: promtool checks every query as a recording rule (Grafana's
    // $__rate_interval becomes a fixed range).
    let dir = tempfile::tempdir().expect("temp dir");
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in exprs.iter().enumerate() {
        let expr = expr.replace("$__rate_interval", "5m");
        file.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&expr).expect("a string serializes")
        ));
    }
    fs::write(dir.path().join("dashboard.yml"), file).expect("write temp rules");
    let out = promtool(&["check", "rules", "dashboard.yml"], dir.path());
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "{out}"
    );
}

#[test]
fn compose_runs_prometheus_and_grafana_with_these_files() {
    let compose = read("docker-compose.yml");
    for needle in [
        "prometheus:",
        "grafana:",
        "./deploy/prometheus:/etc/prometheus:ro",
        "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro",
        "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro",
        "--config.file=/etc/prometheus/prometheus.yml",
    ] {
        assert!(
            compose.contains(needle),
            "docker-compose.yml lacks `{needle}`"
        );
    }
    let provider = read("deploy/grafana/provisioning/dashboards/tokenwarden.yml");
    assert!(
        provider.contains("path: /var/lib/grafana/dashboards"),
        "the dashboard provider reads where compose mounts the dashboards"
    );
    // The scrape target is the worker service on the port its endpoint listens on.
    let config = read(PROMETHEUS_CONFIG);
    assert!(config.contains("names: [worker]") && config.contains("port: 9464"));
    assert!(compose.contains("TOKENWARDEN__HTTP__LISTEN: 0.0.0.0:9464"));
}
