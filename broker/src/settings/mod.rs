//! Settings: `rumqttd.toml` (rumqttd's own sections plus our `[co2]` section), layered with
//! `CO2_*` environment variables, parsed into types and validated once at start.
//!
//! Every key of `[co2]` can be overridden by the environment variable `CO2_<KEY>` in upper
//! case, e.g. `CO2_DATABASE_URL` for `database_url` or `CO2_BATCH_MAX_ROWS` for
//! `batch_max_rows`. A key of rumqttd's sections that the file sets can be overridden by
//! `CO2_<SECTION>__<KEY>…`, levels joined by `__`, e.g. `CO2_V4__1__LISTEN=0.0.0.0:1883` for
//! `listen` of `[v4.1]`. An invalid value fails the start with one line that names the key.

mod ingest;

use std::path::Path;

pub use ingest::IngestSettings;
// Which file and which database: shared with the migration CLI, which must find the same.
use migration::config_source::env_key;
pub use migration::config_source::{
    ConfigSource, MissingConfig, BUILT_IN_CONFIG, DEFAULT_CONFIG_PATH,
};
pub use migration::database_url::{masked as masked_url, DatabaseUrl, DEFAULT_DATABASE_URL};

/// Most rows one INSERT may carry: a row binds at most 9 values (7 without temperature and
/// humidity, see `storage::database`), so 3000 rows stay below SQLite's limit of 32,766 bound
/// variables (MySQL allows 65,535).
pub const MAX_BATCH_ROWS: usize = 3000;

/// Everything the broker needs, loaded and checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// rumqttd's configuration, passed through unchanged (listeners, router, limits).
    pub mqtt: rumqttd::Config,
    pub ingest: IngestSettings,
    /// Where all this came from, for the start log (built-in defaults deserve a warning).
    pub source: ConfigSource,
    /// `CO2_*` environment variables that name no setting (typos, or another program's
    /// variables such as the edge agent's `CO2_EDGE__…`): ignored, and reported at start.
    pub ignored_env: Vec<String>,
}

/// A setting that cannot be used, with the key that holds it.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(transparent)]
    Missing(#[from] MissingConfig),
    #[error("config {source_name}: {source}")]
    Load {
        source_name: String,
        source: config::ConfigError,
    },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("config key `{key}`: {reason}")]
    Value { key: String, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key,
        reason: reason.into(),
    }
}

impl Settings {
    /// Loads the file at `path`, applies `CO2_*` from `env`, and validates.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        Self::load_from(ConfigSource::File(path.to_owned()), env)
    }

    /// Reads `source`, applies `CO2_*` from `env`, parses into types and validates. The one
    /// place that decides what the broker and `co2-broker migrate` run with; the database URL
    /// comes from [`migration::database_url::resolve`], which the migration CLI uses too:
    /// `database_url_file` (from `CO2_DATABASE_URL_FILE` or the file) wins over
    /// `database_url` (from `CO2_DATABASE_URL` or the file), else [`DEFAULT_DATABASE_URL`].
    pub fn load_from(
        source: ConfigSource,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let load_err = |source_err| SettingsError::Load {
            source_name: source.describe(),
            source: source_err,
        };
        let file = source.read().map_err(load_err)?;
        let env: Vec<(String, String)> = env.into_iter().collect();
        let co2_keys = ingest::keys();
        let mut builder = config::Config::builder().add_source(file.clone());
        let mut ignored_env = Vec::new();
        for (name, value) in &env {
            let Some(suffix) = env_key(name) else {
                continue;
            };
            let key = if suffix.contains("__") {
                // rumqttd's keys: only those the file sets, so that another program's
                // variables (the edge agent's CO2_EDGE__MQTT__HOST) and typos are reported,
                // not silently added as sections rumqttd ignores.
                let key = suffix.replace("__", ".");
                file.get::<config::Value>(&key).is_ok().then_some(key)
            } else {
                co2_keys
                    .contains(&suffix.as_str())
                    .then(|| format!("co2.{suffix}"))
            };
            match key {
                Some(key) => {
                    builder = builder
                        .set_override(key, value.as_str())
                        .map_err(load_err)?
                }
                None => ignored_env.push(name.clone()),
            }
        }
        let layered = builder.build().map_err(load_err)?;
        let mqtt: rumqttd::Config = layered.clone().try_deserialize().map_err(load_err)?;
        let mut ingest: IngestSettings = match layered.get::<config::Value>("co2") {
            // Through serde_path_to_error, so that a bad value names its own key rather
            // than the whole section.
            Ok(section) => serde_path_to_error::deserialize(section).map_err(|e| {
                let key = match e.path().to_string().as_str() {
                    "." => "co2".to_owned(),
                    path => format!("co2.{path}"),
                };
                SettingsError::Value {
                    key,
                    reason: e.into_inner().to_string(),
                }
            })?,
            Err(config::ConfigError::NotFound(_)) => IngestSettings::default(),
            Err(e) => return Err(load_err(e)),
        };
        ingest.database_url =
            migration::database_url::resolve(&file, &env).map_err(|e| SettingsError::Invalid {
                key: e.key,
                reason: e.reason,
            })?;
        let settings = Self {
            mqtt,
            ingest,
            source,
            ignored_env,
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what types cannot: ranges, relations between keys, and rumqttd values that
    /// would panic its router.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let i = &self.ingest;
        if !(1..=MAX_BATCH_ROWS).contains(&i.batch_max_rows) {
            return Err(invalid(
                "co2.batch_max_rows",
                format!("must be 1..={MAX_BATCH_ROWS}"),
            ));
        }
        if i.queue_capacity == 0 {
            return Err(invalid("co2.queue_capacity", "must be at least 1"));
        }
        if i.db_writers == 0 {
            return Err(invalid("co2.db_writers", "must be at least 1"));
        }
        if (i.db_pool_size as usize) < i.db_writers {
            return Err(invalid(
                "co2.db_pool_size",
                "must be at least co2.db_writers",
            ));
        }
        if i.min_co2_ppm.partial_cmp(&i.max_co2_ppm) != Some(std::cmp::Ordering::Less) {
            return Err(invalid(
                "co2.max_co2_ppm",
                "must be greater than co2.min_co2_ppm",
            ));
        }
        // Dashboards read raw readings for ranges up to 6 hours and minute rollups up to 3 days
        // (grafana/README.md); the limits leave a day beyond each.
        let retention = [
            (
                "co2.raw_retention_days",
                i.raw_retention_days,
                2,
                "6 hours of raw readings",
            ),
            (
                "co2.minute_rollup_retention_days",
                i.minute_rollup_retention_days,
                4,
                "3 days of minute rollups",
            ),
            (
                "co2.hour_rollup_retention_days",
                i.hour_rollup_retention_days,
                1,
                "hour rollups",
            ),
        ];
        for (key, days, least, reads) in retention {
            if days != 0 && days < least {
                return Err(invalid(
                    key,
                    format!(
                        "must be 0 (keep forever) or at least {least}: dashboards read {reads}"
                    ),
                ));
            }
        }
        let router = &self.mqtt.router;
        if router.max_segment_size < 1024 {
            return Err(invalid("router.max_segment_size", "must be at least 1024"));
        }
        if router.max_segment_count < 1 {
            return Err(invalid("router.max_segment_count", "must be at least 1"));
        }
        if router.max_connections < 2 {
            return Err(invalid(
                "router.max_connections",
                "must be at least 2 (one is the ingest link)",
            ));
        }
        let unsupported = [
            ("ws", self.mqtt.ws.is_some()),
            ("console", self.mqtt.console.is_some()),
            ("prometheus", self.mqtt.prometheus.is_some()),
            ("bridge", self.mqtt.bridge.is_some()),
            ("cluster", self.mqtt.cluster.is_some()),
            ("metrics", self.mqtt.metrics.is_some()),
        ];
        if let Some((section, _)) = unsupported.iter().find(|(_, present)| *present) {
            return Err(invalid(
                section,
                "this rumqttd section is not supported by co2-broker; remove it",
            ));
        }
        if self.listeners().next().is_none() {
            return Err(invalid(
                "v4",
                "configure at least one [v4.*] or [v5.*] listener",
            ));
        }
        if i.credentials_file.is_none() && !i.allow_anonymous_remote {
            if let Some((_, open)) = self.listeners().find(|(_, l)| !l.listen.ip().is_loopback()) {
                return Err(invalid(
                    "co2.credentials_file",
                    format!(
                        "listener {} listens on {}, beyond this machine, but no device credentials are configured: \
                         set co2.credentials_file (see `co2-broker passwd add`), or co2.allow_anonymous_remote = true \
                         to run an open broker on purpose",
                        open.name, open.listen
                    ),
                ));
            }
        }
        for (_, listener) in self.listeners() {
            if listener.connections.auth.is_some() {
                return Err(invalid(
                    "v4/v5.*.connections.auth",
                    format!(
                        "listener {}: plain-text passwords in the config are not supported; \
                         use co2.credentials_file (co2-broker passwd add <device>)",
                        listener.name
                    ),
                ));
            }
            if let Some(rumqttd::TlsConfig::NativeTls { .. }) = &listener.tls {
                return Err(invalid(
                    "v4/v5.*.tls",
                    format!(
                        "listener {}: pkcs12 is not supported; use certpath and keypath (PEM)",
                        listener.name
                    ),
                ));
            }
            if let Some(tls) = &listener.tls {
                if !tls.validate_paths() {
                    return Err(invalid(
                        "v4/v5.*.tls",
                        format!(
                            "listener {}: a certificate, key or CA file does not exist",
                            listener.name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Listeners reachable from other machines while anyone may connect: the operator's
    /// explicit choice (`co2.allow_anonymous_remote`), warned about at start.
    pub fn open_to_the_network(&self) -> Vec<&rumqttd::ServerSettings> {
        if self.ingest.credentials_file.is_some() {
            return Vec::new();
        }
        self.listeners()
            .filter(|(_, l)| !l.listen.ip().is_loopback())
            .map(|(_, l)| l)
            .collect()
    }

    /// Every MQTT listener with its protocol version (4 = MQTT 3.1.1, 5 = MQTT 5).
    pub fn listeners(&self) -> impl Iterator<Item = (u8, &rumqttd::ServerSettings)> {
        let v4 = self.mqtt.v4.iter().flat_map(|m| m.values()).map(|s| (4, s));
        let v5 = self.mqtt.v5.iter().flat_map(|m| m.values()).map(|s| (5, s));
        v4.chain(v5)
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
    fn the_built_in_defaults_are_valid() {
        let settings = Settings::load_from(ConfigSource::BuiltIn, env(&[])).unwrap();
        let listeners: Vec<String> = settings
            .listeners()
            .map(|(_, l)| l.listen.to_string())
            .collect();
        assert_eq!(listeners, ["127.0.0.1:1883", "127.0.0.1:1884"]);
        assert_eq!(settings.ingest.database_url.expose(), DEFAULT_DATABASE_URL);
        assert_eq!(settings.ingest.legacy_timezone, chrono_tz::Tz::UTC);
        assert_eq!(
            settings.ingest.http_listen,
            Some("127.0.0.1:9883".parse().unwrap())
        );
    }

    #[test]
    fn the_environment_overrides_co2_keys_and_keys_the_file_sets() {
        let settings = Settings::load_from(
            ConfigSource::BuiltIn,
            env(&[
                ("CO2_V4__1__LISTEN", "127.0.0.1:2883"),
                ("CO2_ROUTER__MAX_CONNECTIONS", "50"),
                ("CO2_LEGACY_TIMEZONE", "Europe/Berlin"),
                ("CO2_HTTP_LISTEN", ""),
                ("CO2_EDGE__MQTT__HOST", "elsewhere"),
                ("CO2_V4__1__NO_SUCH_KEY", "1"),
                ("CO2_CONFIG", "ignored.toml"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        let v4 = settings.listeners().find(|(v, _)| *v == 4).unwrap().1;
        assert_eq!(v4.listen.to_string(), "127.0.0.1:2883");
        assert_eq!(settings.mqtt.router.max_connections, 50);
        assert_eq!(
            settings.ingest.legacy_timezone,
            chrono_tz::Tz::Europe__Berlin
        );
        assert_eq!(settings.ingest.http_listen, None);
        assert_eq!(
            settings.ignored_env,
            ["CO2_EDGE__MQTT__HOST", "CO2_V4__1__NO_SUCH_KEY"]
        );
    }

    #[test]
    fn typed_values_name_their_key() {
        for (name, value, key) in [
            ("CO2_LEGACY_TIMEZONE", "Mars/Olympus", "co2.legacy_timezone"),
            ("CO2_HTTP_LISTEN", "localhost", "co2.http_listen"),
            ("CO2_DATABASE_URL", "postgres://x", "co2.database_url"),
        ] {
            let err = Settings::load_from(ConfigSource::BuiltIn, env(&[(name, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(&format!("config key `{key}`: ")), "{err}");
            assert!(err.contains(value) || key == "co2.database_url", "{err}");
        }
    }

    #[test]
    fn a_database_url_file_wins_and_stays_masked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("url");
        std::fs::write(&file, "mysql://co2:s3cret@db:3306/sheroDB\n").unwrap();
        let settings = Settings::load_from(
            ConfigSource::BuiltIn,
            env(&[
                ("CO2_DATABASE_URL", "sqlite://elsewhere.db"),
                ("CO2_DATABASE_URL_FILE", file.to_str().unwrap()),
            ]),
        )
        .unwrap();
        let url = &settings.ingest.database_url;
        assert_eq!(url.expose(), "mysql://co2:s3cret@db:3306/sheroDB");
        assert!(!format!("{settings:?}").contains("s3cret"));
    }
}
