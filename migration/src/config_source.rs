//! Which configuration the broker and the migration CLI read: a file named on purpose,
//! `rumqttd.toml` in the working directory, or the built-in defaults.
//!
//! It lives in this crate, the lowest of the workspace, so that `co2-broker`, `co2-broker
//! migrate` and `cargo run -p migration -- …` find the same file by the same rules.
//!
//! Like Mosquitto, a broker started without any configuration (an installed binary in a new
//! directory) runs on built-in defaults, which are the shipped `rumqttd.toml` compiled in:
//! loopback listeners on 1883 (MQTT 3.1.1) and 1884 (MQTT 5), a SQLite file under `data/`.
//! A file named with `--config` or `CO2_CONFIG` that does not exist is an error, never a
//! reason to fall back: the operator meant that file.

use std::path::{Path, PathBuf};

/// The config file read when none is named, relative to the working directory.
pub const DEFAULT_CONFIG_PATH: &str = "rumqttd.toml";

/// The shipped `rumqttd.toml`, the configuration when there is no file.
pub const BUILT_IN_CONFIG: &str = include_str!("../../rumqttd.toml");

/// Where the settings come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// A file: named with `--config`/`CO2_CONFIG`, or `rumqttd.toml` found in the working
    /// directory.
    File(PathBuf),
    /// No file named and none in the working directory: [`BUILT_IN_CONFIG`].
    BuiltIn,
}

/// A configuration file that was named (`--config`, `CO2_CONFIG`) but does not exist.
#[derive(Debug, thiserror::Error)]
#[error("configuration file {path:?} (named by {named_by}) not found")]
pub struct MissingConfig {
    pub path: PathBuf,
    pub named_by: &'static str,
}

impl ConfigSource {
    /// `--config` wins over `CO2_CONFIG`; a named file must exist. Without either,
    /// `rumqttd.toml` in the working directory if there is one, else the built-in defaults.
    pub fn resolve(
        flag: Option<PathBuf>,
        env: Option<std::ffi::OsString>,
    ) -> Result<Self, MissingConfig> {
        let named = match (flag, env) {
            (Some(path), _) => Some((path, "--config")),
            (None, Some(path)) if !path.is_empty() => Some((PathBuf::from(path), "CO2_CONFIG")),
            (None, _) => None,
        };
        match named {
            Some((path, named_by)) if !path.exists() => Err(MissingConfig { path, named_by }),
            Some((path, _)) => Ok(Self::File(path)),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Ok(Self::File(DEFAULT_CONFIG_PATH.into()))
            }
            None => Ok(Self::BuiltIn),
        }
    }

    /// For messages: the file's path, or "built-in defaults".
    pub fn describe(&self) -> String {
        match self {
            Self::File(path) => path.display().to_string(),
            Self::BuiltIn => "the built-in defaults".into(),
        }
    }

    /// The TOML source for the `config` crate.
    pub fn add_to(
        &self,
        builder: config::ConfigBuilder<config::builder::DefaultState>,
    ) -> config::ConfigBuilder<config::builder::DefaultState> {
        match self {
            Self::File(path) => builder
                .add_source(config::File::from(path.as_path()).format(config::FileFormat::Toml)),
            Self::BuiltIn => builder.add_source(config::File::from_str(
                BUILT_IN_CONFIG,
                config::FileFormat::Toml,
            )),
        }
    }

    /// The file alone, without environment overrides.
    pub fn read(&self) -> Result<config::Config, config::ConfigError> {
        self.add_to(config::Config::builder()).build()
    }
}

/// The `[co2]` key that the environment variable `name` overrides: `CO2_<KEY>` in any case
/// gives `<key>` in lower case (`CO2_DATABASE_URL` → `database_url`). `None` for variables
/// outside `CO2_*`, and for `CO2_CONFIG`, which names the file itself and is not a setting.
/// Keys of rumqttd's sections come back with their `__` separators (`v4__1__listen`).
pub fn env_key(name: &str) -> Option<String> {
    name.strip_prefix("CO2_")
        .filter(|suffix| *suffix != "CONFIG")
        .map(str::to_lowercase)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_file_must_exist() {
        let missing = PathBuf::from("/nonexistent/co2/rumqttd.toml");
        let err = ConfigSource::resolve(Some(missing.clone()), None).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/nonexistent/co2/rumqttd.toml"), "{text}");
        assert!(text.contains("--config"), "{text}");
        let err = ConfigSource::resolve(None, Some(missing.into_os_string())).unwrap_err();
        assert!(err.to_string().contains("CO2_CONFIG"), "{err}");
    }

    #[test]
    fn the_flag_wins_over_the_environment() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let source = ConfigSource::resolve(
            Some(file.path().to_owned()),
            Some("/nonexistent/other.toml".into()),
        )
        .unwrap();
        assert_eq!(source, ConfigSource::File(file.path().to_owned()));
    }

    #[test]
    fn environment_keys() {
        assert_eq!(env_key("CO2_DATABASE_URL").as_deref(), Some("database_url"));
        assert_eq!(
            env_key("CO2_V4__1__LISTEN").as_deref(),
            Some("v4__1__listen")
        );
        assert_eq!(env_key("CO2_CONFIG"), None);
        assert_eq!(env_key("HOME"), None);
        assert_eq!(env_key("co2_database_url"), None);
    }
}
