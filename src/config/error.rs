//! The one error type of configuration loading and validation.

/// A configuration problem, naming the key and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The sources could not be read or did not match the expected types.
    #[error("configuration could not be loaded: {0}")]
    Load(#[from] config::ConfigError),
    /// The merged sources parsed but do not fit the settings tree (an unknown key, a wrong
    /// type). The message names every source, because config-rs cannot tell which one held the
    /// offending key.
    #[error("configuration from {sources} does not fit: {source}")]
    Mismatch {
        sources: String,
        #[source]
        source: config::ConfigError,
    },
    /// A value has the right type but is not acceptable.
    #[error("invalid configuration key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

impl ConfigError {
    /// Shorthand for [`ConfigError::Invalid`].
    pub fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}
