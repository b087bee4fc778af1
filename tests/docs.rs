//! The documentation keeps up with the code: every configuration key of `config/default.toml`
//! is in `docs/configuration.md`, every metric the code registers is in `docs/metrics.md`, and
//! the README stays a short guide with the two commands. Reads files only (no Postgres, Redis).
//!
//! `scripts/gen-config-doc.py` and `scripts/gen-metrics-doc.py` (`make docs`) regenerate the
//! tables this test checks.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The leaf keys of a TOML file as `section.key` (nested sections dotted; arrays, inline arrays
/// and inline tables count as one key; an array of tables `[[s]]` is the key `s`, and its
/// entries' keys are `s[].key`). A line-based walker: `[section]` / `[[section]]` headers and
/// `key = value` lines; multi-line arrays and strings are skipped over.
fn toml_keys(text: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut section = String::new();
    let mut lines = text.lines();
    while let Some(raw) = lines.next() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            let name = line
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim();
            section = name
                .split('.')
                .map(|p| p.trim().trim_matches('"'))
                .collect::<Vec<_>>()
                .join(".");
            if line.starts_with("[[") {
                // An array of tables is a key itself; its entries' keys read `section[].key`.
                keys.insert(section.clone());
                section.push_str("[]");
            }
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim().trim_matches('"');
        keys.insert(if section.is_empty() {
            key.to_string()
        } else {
            format!("{section}.{key}")
        });
        // Skip the rest of a value that spans several lines.
        let value = value.trim();
        if value.starts_with("\"\"\"") || value.starts_with("'''") {
            let quote = &value[..3];
            if !value[3..].contains(quote) {
                for more in lines.by_ref() {
                    if more.contains(quote) {
                        break;
                    }
                }
            }
        } else if value.starts_with('[') || value.starts_with('{') {
            let mut depth = bracket_depth(value);
            while depth > 0 {
                match lines.next() {
                    Some(more) => depth += bracket_depth(more),
                    None => break,
                }
            }
        }
    }
    keys
}

/// Opening minus closing brackets/braces outside strings and comments.
fn bracket_depth(s: &str) -> i32 {
    let mut depth = 0;
    let mut in_str: Option<char> = None;
    let mut escaped = false;
    for c in s.chars() {
        match in_str {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' && q == '"' {
                    escaped = true;
                } else if c == q {
                    in_str = None;
                }
            }
            None => match c {
                '"' | '\'' => in_str = Some(c),
                '#' => break,
                '[' | '{' => depth += 1,
                ']' | '}' => depth -= 1,
                _ => {}
            },
        }
    }
    depth
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// Source text with `//` comment lines blanked (doc comments may mention the macros); line
/// numbers are kept.
fn code_of(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("//") {
                ""
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A string literal at the start of `s` (after whitespace), without its quotes.
fn string_literal(s: &str) -> Option<&str> {
    let s = s.trim_start().strip_prefix('"')?;
    let end = s.find('"')?;
    Some(&s[..end])
}

/// An identifier (possibly a path like `names::X`) at the start of `s`; its last segment.
fn identifier(s: &str) -> Option<&str> {
    let s = s.trim_start();
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(s.len());
    let path = &s[..end];
    let last = path.rsplit("::").next()?;
    (!last.is_empty() && !last.starts_with(|c: char| c.is_ascii_digit())).then_some(last)
}

/// Every metric name the code registers: the first argument of `counter!(`, `gauge!(`,
/// `histogram!(` (and so `describe_counter!(` etc.) under src/, as a string literal or as a
/// `const NAME: &str = "…"` defined somewhere under src/. Returns (names, unresolved calls).
fn registered_metrics() -> (BTreeMap<String, String>, Vec<String>) {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    files.sort();
    let sources: Vec<(String, String)> = files
        .iter()
        .map(|p| {
            let rel = p.strip_prefix(root()).unwrap_or(p).display().to_string();
            (rel, code_of(p))
        })
        .collect();
    let mut consts = BTreeMap::new();
    for (_, code) in &sources {
        for (i, _) in code.match_indices("const ") {
            let rest = &code[i + "const ".len()..];
            let Some((name, rest)) = rest.split_once(':') else {
                continue;
            };
            let Some(rest) = rest.trim_start().strip_prefix("&str") else {
                continue;
            };
            let Some(rest) = rest.trim_start().strip_prefix('=') else {
                continue;
            };
            if let Some(value) = string_literal(rest) {
                consts.insert(name.trim().to_string(), value.to_string());
            }
        }
    }
    let mut names = BTreeMap::new();
    let mut unresolved = Vec::new();
    for (file, code) in &sources {
        for mac in ["counter!(", "gauge!(", "histogram!("] {
            for (i, _) in code.match_indices(mac) {
                let args = &code[i + mac.len()..];
                let line = code[..i].matches('\n').count() + 1;
                let name = match string_literal(args) {
                    Some(lit) => Some(lit.to_string()),
                    None => identifier(args).and_then(|id| consts.get(id).cloned()),
                };
                match name {
                    Some(n) => {
                        names.entry(n).or_insert_with(|| format!("{file}:{line}"));
                    }
                    None => unresolved.push(format!("{file}:{line}")),
                }
            }
        }
    }
    (names, unresolved)
}

#[test]
fn every_config_key_is_in_the_configuration_reference() {
    let keys = toml_keys(&read("config/default.toml"));
    assert!(
        keys.len() > 20,
        "the TOML walker found only {} keys in config/default.toml: {keys:?}",
        keys.len()
    );
    for expected in [
        "database.url",
        "chain.chains",
        "chain.tokens",
        "maintenance.anomalies.request_burst.severity",
    ] {
        assert!(
            keys.contains(expected),
            "the TOML walker missed `{expected}`: {keys:?}"
        );
    }
    let doc = read("docs/configuration.md");
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| !doc.contains(&format!("`{k}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not document these keys of config/default.toml \
         (run `make docs`): {missing:?}"
    );
}

#[test]
fn every_registered_metric_is_in_the_metrics_reference() {
    let (names, unresolved) = registered_metrics();
    assert!(
        unresolved.is_empty(),
        "metric macros whose name is neither a string literal nor a `const …: &str` under src/ \
         (the docs check cannot see them): {unresolved:?}"
    );
    assert!(
        names.len() > 20,
        "the scan found only {} metric names under src/: {names:?}",
        names.len()
    );
    let doc = read("docs/metrics.md");
    let missing: Vec<String> = names
        .iter()
        .filter(|(n, _)| !doc.contains(&format!("`{n}`")))
        .map(|(n, at)| format!("{n} ({at})"))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/metrics.md does not list these metrics the code registers (run `make docs`): \
         {missing:?}"
    );
}

#[test]
fn readme_is_a_short_guide_with_the_two_commands() {
    let readme = read("README.md");
    assert!(
        readme.len() < 16_000,
        "README.md is {} bytes; keep it a guide under 16,000 bytes and move reference into docs/",
        readme.len()
    );
    for cmd in ["make run", "make test"] {
        assert!(readme.contains(cmd), "README.md does not mention `{cmd}`");
    }
}

#[test]
fn toml_walker_handles_arrays_of_tables_and_multiline_values() {
    let keys = toml_keys(
        "top = 1\n[a]\nx = [\n  1,\n  2, # ]\n]\ny = \"\"\"\nz = 3\n\"\"\"\n[a.\"b\"]\nc = {d = 1}\n\
         [[a.list]]\ne = \"[\"\n",
    );
    let want: BTreeSet<String> = ["top", "a.x", "a.y", "a.b.c", "a.list", "a.list[].e"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(keys, want);
}
