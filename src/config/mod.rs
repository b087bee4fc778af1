//! Typed configuration.
//!
//! Sources, later ones overriding earlier ones:
//! 1. `config/default.toml`, compiled into the binary so a bare `tokenwarden` works anywhere;
//! 2. an optional file named by `--config`;
//! 3. environment variables `TOKENWARDEN__SECTION__KEY` (double underscores).
//!
//! Secrets are never read from files: sections that need one (database password inside the URL,
//! API keys) take them from the environment. Unknown keys are errors, so a typo fails at start
//! with the key's name instead of being silently ignored.

//!
//! This module is the one owner of every configuration type and of every default: the defaults
//! live in `config/default.toml` only (no serde default functions, except the per-entry keys of
//! `chain.chains[]` / `chain.tokens[]`, which a TOML file cannot default), and each area imports
//! its own section from here. Nothing in this module imports another area, so every layer may
//! depend on it.

mod access;
mod chain;
mod error;
mod ledger;
mod maintenance;
mod process;
mod queue;
mod snapshots;
mod stores;
mod webhook;

use std::path::Path;

use serde::Deserialize;

pub use access::{AccessConfig, AuditConfig, FallbackPolicy, VerifierConfig, VerifierProfile};
pub use chain::{ChainConfig, ChainSection, FactoryConfig, TokenArg, TokenConfig, TokenStandard};
pub use error::ConfigError;
pub use ledger::LedgerConfig;
pub use maintenance::{
    AlertsConfig, AnomaliesConfig, BurstRuleConfig, MaintenanceConfig, ReadinessConfig,
    RetentionConfig, Schedules, Severity, SpendSpikeConfig,
};
pub use process::{HttpConfig, LogFormat, TelemetryConfig, WorkerConfig};
pub use queue::QueueConfig;
pub use snapshots::SnapshotsConfig;
pub use stores::{DatabaseConfig, RedisConfig};
pub use webhook::parse_webhook_url;

/// The default configuration, embedded at build time.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// The whole configuration of one `tokenwarden` process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub worker: WorkerConfig,
    pub queue: QueueConfig,
    pub ledger: LedgerConfig,
    pub chain: ChainSection,
    pub snapshots: SnapshotsConfig,
    pub access: AccessConfig,
    pub maintenance: MaintenanceConfig,
    pub http: HttpConfig,
    pub telemetry: TelemetryConfig,
}

impl Config {
    /// Loads defaults, then `file` if given, then the environment, and validates the result.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    /// Like [`Config::load`], with the environment given explicitly (tests use this).
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let env_map: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("TOKENWARDEN__"))
            .collect();
        let sources = match (file, env_map.is_empty()) {
            (Some(path), true) => format!("the defaults and {}", path.display()),
            (Some(path), false) => format!(
                "the defaults, {} and the TOKENWARDEN__ environment",
                path.display()
            ),
            (None, true) => "the defaults".to_string(),
            (None, false) => "the defaults and the TOKENWARDEN__ environment".to_string(),
        };
        builder = builder.add_source(
            config::Environment::with_prefix("TOKENWARDEN")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("chain.chains")
                .with_list_parse_key("chain.tokens")
                .with_list_parse_key("access.siwe_domains")
                .source(Some(env_map)),
        );
        let cfg: Config = builder
            .build()?
            .try_deserialize()
            .map_err(|source| ConfigError::Mismatch { sources, source })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.database.validate()?;
        self.redis.validate()?;
        self.worker.validate()?;
        if self.http.enabled {
            self.http.listen_addr()?;
        }
        self.queue.validate()?;
        self.ledger.validate()?;
        self.chain.validate()?;
        self.snapshots.validate()?;
        self.access.validate()?;
        self.maintenance.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_and_validate() {
        let cfg = Config::load_with_env(None, env(&[])).expect("defaults are valid");
        assert_eq!(cfg.redis.prefix, "tokenwarden");
        assert_eq!(cfg.telemetry.format, LogFormat::Human);
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let cfg = Config::load_with_env(
            None,
            env(&[
                ("TOKENWARDEN__REDIS__PREFIX", "other"),
                ("TOKENWARDEN__DATABASE__MAX_CONNECTIONS", "3"),
                ("TOKENWARDEN__TELEMETRY__FORMAT", "json"),
            ]),
        )
        .expect("overrides are valid");
        assert_eq!(cfg.redis.prefix, "other");
        assert_eq!(cfg.database.max_connections, 3);
        assert_eq!(cfg.telemetry.format, LogFormat::Json);
    }

    /// An unknown section used to be refused as "unknown field `A`" with no word of where it
    /// came from (found by the random-file property below).
    #[test]
    fn unknown_section_names_the_key_and_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("extra.toml");
        std::fs::write(&path, "[A]\n").expect("write");
        let err = Config::load_with_env(Some(&path), env(&[])).expect_err("unknown section");
        let text = err.to_string();
        assert!(
            text.contains("`A`") && text.contains("extra.toml"),
            "{text}"
        );
        let err = Config::load_with_env(None, env(&[("TOKENWARDEN__A", "1")]))
            .expect_err("unknown variable");
        assert!(
            err.to_string().contains("TOKENWARDEN__ environment"),
            "{err}"
        );
    }

    #[test]
    fn invalid_value_names_the_key() {
        let err = Config::load_with_env(None, env(&[("TOKENWARDEN__DATABASE__URL", "mysql://x")]))
            .expect_err("mysql url is rejected");
        assert!(err.to_string().contains("database.url"), "{err}");
    }

    /// Each backfill writer is a Postgres connection: a number past the bound is refused by
    /// name before any connection is opened.
    #[test]
    fn too_many_backfill_writers_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("chain.toml");
        let chain = |writers: usize| {
            format!(
                "[chain]\nenabled = true\n[[chain.chains]]\nchain_id = 1\nname = \"one\"\n\
                 rpc_urls = [\"http://127.0.0.1:8545\"]\nbackfill_writers = {writers}\n"
            )
        };
        std::fs::write(&path, chain(9)).expect("write");
        let err = Config::load_with_env(Some(&path), env(&[])).expect_err("9 writers");
        assert!(
            err.to_string().contains("chain.chains[0].backfill_writers"),
            "{err}"
        );
        std::fs::write(&path, chain(0)).expect("write");
        let cfg = Config::load_with_env(Some(&path), env(&[])).expect("0 writers is valid");
        assert_eq!(cfg.chain.chains[0].backfill_writers, 0);
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = Config::load_with_env(
            None,
            env(&[("TOKENWARDEN__DATABASE__MAX_CONNECTIONS", "many")]),
        )
        .expect_err("non-numeric is rejected");
        assert!(err.to_string().contains("max_connections"), "{err}");
    }

    #[test]
    fn shipped_example_configs_are_valid() {
        for name in ["production.example.toml", "docker-compose.toml"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("config")
                .join(name);
            if let Err(e) = Config::load_with_env(Some(&path), env(&[])) {
                panic!("config/{name} does not load: {e}");
            }
        }
    }

    #[test]
    fn unknown_key_is_an_error() {
        let err = Config::load_with_env(None, env(&[("TOKENWARDEN__DATABASE__URLL", "x")]))
            .expect_err("typo is rejected");
        assert!(err.to_string().contains("urll"), "{err}");
    }
}

/// Bad input, generated: random values for every key of `config/default.toml`, random TOML
/// text and random environment values go through the loader `tokenwarden` uses; each is
/// accepted (and then valid) or refused with a reason naming the key or the file. Never a
/// panic.
#[cfg(test)]
mod generated {
    use proptest::prelude::*;

    use super::*;

    /// Cases per property (the report's "cases run").
    const CASES: u32 = 400;

    /// Every `(section, key)` of the default file.
    fn known_keys() -> Vec<(String, String)> {
        let mut section = String::new();
        let mut keys = Vec::new();
        for line in DEFAULT_TOML.lines() {
            if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = s.to_string();
            } else if let Some((k, _)) = line.split_once(" = ")
                && !line.starts_with('#')
            {
                keys.push((section.clone(), k.trim().to_string()));
            }
        }
        keys
    }

    /// A TOML value of any type, often the wrong one.
    fn toml_value() -> impl Strategy<Value = String> {
        let text = "\\PC{0,16}".prop_map(|s| serde_json::to_string(&s).unwrap_or_default());
        prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            (-2i64..3).prop_map(|n| n.to_string()),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| format!("{f:?}")),
            any::<bool>().prop_map(|b| b.to_string()),
            text.clone(),
            Just("\"\"".to_string()),
            Just("\"postgres://u@h/db\"".to_string()),
            Just("\"0 */5 * * * *\"".to_string()),
            proptest::collection::vec(text, 0..3).prop_map(|v| format!("[{}]", v.join(", "))),
            Just("{}".to_string()),
        ]
    }

    fn refused_with_a_reason(e: &ConfigError, names: &[&str]) -> Result<(), TestCaseError> {
        let text = e.to_string();
        if let ConfigError::Invalid { key, reason } = e {
            prop_assert!(!key.is_empty() && !reason.trim().is_empty(), "{}", text);
        } else {
            prop_assert!(
                names.iter().any(|n| text.contains(n)),
                "{} does not name {:?}",
                text,
                names
            );
        }
        Ok(())
    }

    fn load_file(
        body: &str,
    ) -> Result<
        (
            tempfile::TempDir,
            std::path::PathBuf,
            Result<Config, ConfigError>,
        ),
        TestCaseError,
    > {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let path = dir.path().join("generated.toml");
        std::fs::write(&path, body).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let got = Config::load_with_env(Some(&path), Vec::new());
        Ok((dir, path, got))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

        /// One known key (or a misspelling of it) set to a random value in a config file.
        #[test]
        fn any_value_for_a_known_key_loads_or_names_the_key(
            pick in any::<proptest::sample::Index>(),
            typo in proptest::bool::weighted(0.1),
            value in toml_value(),
        ) {
            let keys = known_keys();
            let (section, key) = pick.get(&keys);
            let key = if typo { format!("{key}x") } else { key.clone() };
            let (_dir, _path, got) = load_file(&format!("[{section}]\n{key} = {value}\n"))?;
            match got {
                Ok(cfg) => prop_assert!(cfg.validate().is_ok()),
                Err(e) => refused_with_a_reason(&e, &[&key])?,
            }
        }

        /// Random text as the config file: a syntax error names the file.
        #[test]
        fn any_file_text_loads_or_is_refused_with_a_reason(body in "(\\PC|\n|=|\\[|\\]|\"){0,80}") {
            let (_dir, path, got) = load_file(&body)?;
            if let Err(e) = got {
                // config-rs names the file relative to the working directory: its name and
                // the line are what an operator needs.
                let text = e.to_string();
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                prop_assert!(text.contains(&name) || matches!(e, ConfigError::Invalid { .. }), "{}", text);
                if text.contains("parse error") {
                    prop_assert!(text.contains("line"), "{}", text);
                }
            }
        }

        /// A random environment value for a known key.
        #[test]
        fn any_environment_value_loads_or_names_the_key(pick in any::<proptest::sample::Index>(), value in "\\PC{0,20}") {
            let keys = known_keys();
            let (section, key) = pick.get(&keys);
            let var = format!("TOKENWARDEN__{}__{}", section.replace('.', "__"), key).to_uppercase();
            match Config::load_with_env(None, vec![(var, value)]) {
                Ok(cfg) => prop_assert!(cfg.validate().is_ok()),
                Err(e) => refused_with_a_reason(&e, &[key])?,
            }
        }
    }
}
