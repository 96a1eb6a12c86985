//! Which configuration the broker reads: a file named on purpose, `rumqttd.toml` in the working
//! directory, or the built-in defaults.
//!
//! Like Mosquitto, a broker started without any configuration (an installed binary in a new
//! directory) runs on built-in defaults, which are the shipped `rumqttd.toml` compiled in:
//! loopback listeners on 1883 (MQTT 3.1.1) and 1884 (MQTT 5), a SQLite file under `data/`.
//! A file named with `--config` or `CO2_CONFIG` that does not exist is an error, never a
//! reason to fall back: the operator meant that file.

use std::path::{Path, PathBuf};

use super::SettingsError;

/// The config file read when none is named, relative to the working directory.
pub const DEFAULT_CONFIG_PATH: &str = "rumqttd.toml";

/// The shipped `rumqttd.toml`, the configuration when there is no file.
pub const BUILT_IN_CONFIG: &str = include_str!("../../../rumqttd.toml");

/// Where the settings come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// A file: named with `--config`/`CO2_CONFIG`, or `rumqttd.toml` found in the working
    /// directory.
    File(PathBuf),
    /// No file named and none in the working directory: [`BUILT_IN_CONFIG`].
    BuiltIn,
}

impl ConfigSource {
    /// `--config` wins over `CO2_CONFIG`; a named file must exist. Without either,
    /// `rumqttd.toml` in the working directory if there is one, else the built-in defaults.
    pub fn resolve(
        flag: Option<PathBuf>,
        env: Option<std::ffi::OsString>,
    ) -> Result<Self, SettingsError> {
        let named = match (flag, env) {
            (Some(path), _) => Some((path, "--config")),
            (None, Some(path)) if !path.is_empty() => Some((PathBuf::from(path), "CO2_CONFIG")),
            (None, _) => None,
        };
        match named {
            Some((path, named_by)) if !path.exists() => {
                Err(SettingsError::Missing { path, named_by })
            }
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
    pub(super) fn add_to(
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
}
