//! Typed settings: `rumqttd.toml` (rumqttd's own sections plus our `[co2]` section), layered
//! with `CO2_*` environment variables, validated once at start.
//!
//! Every key of `[co2]` can be overridden by the environment variable `CO2_<KEY>` in upper
//! case, e.g. `CO2_DATABASE_URL` for `database_url` or `CO2_BATCH_MAX_ROWS` for
//! `batch_max_rows`. An invalid value fails the start with one line that names the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

pub use migration::database_url::{
    masked as masked_url, DEFAULT_CONFIG_PATH, DEFAULT_DATABASE_URL,
};

/// Most rows one INSERT may carry: 10 bound values a row must stay below SQLite's limit of
/// 32,766 variables (MySQL allows 65,535).
pub const MAX_BATCH_ROWS: usize = 3000;

/// Everything the broker needs, loaded and checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// rumqttd's configuration, passed through unchanged (listeners, router, limits).
    pub mqtt: rumqttd::Config,
    pub ingest: IngestSettings,
    /// `CO2_*` environment variables that name no `[co2]` key (typos, or another program's
    /// variables such as the edge agent's `CO2_EDGE__…`): ignored, and reported at start.
    pub ignored_env: Vec<String>,
}

/// The `[co2]` section: storage and ingest. Durations are in milliseconds.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestSettings {
    /// `sqlite://path?mode=rwc` (embedded default) or `mysql://user:password@host/db`.
    pub database_url: DatabaseUrl,
    /// Apply pending migrations at start; turn off where schema changes are rolled out by hand.
    pub run_migrations: bool,
    /// Where the broker keeps its on-disk spool.
    pub data_dir: PathBuf,
    /// IANA zone of the wall-clock times in legacy `Y-M-D h:m:s|value` payloads.
    pub legacy_timezone: String,
    /// A batch is written once it holds this many readings...
    pub batch_max_rows: usize,
    /// ...or once its first reading has waited this long.
    pub batch_max_delay_ms: u64,
    /// Readings parsed but not yet written. When full, the MQTT link waits and rumqttd's
    /// commit log buffers instead (see `router.max_segment_*`).
    pub queue_capacity: usize,
    /// A database write slower than this counts as failed and the batch goes to the spool.
    pub db_write_timeout_ms: u64,
    /// How often to retry the database while the spool holds readings.
    pub db_retry_interval_ms: u64,
    /// Batches written concurrently (each on its own connection).
    pub db_writers: usize,
    /// Connections in the database pool; at least `db_writers`.
    pub db_pool_size: u32,
    /// Upper bound of the spool on disk; at the bound new batches are refused (and not acked).
    pub spool_max_bytes: u64,
    /// Plausible CO2 range in ppm; readings outside are rejected.
    pub min_co2_ppm: f64,
    pub max_co2_ppm: f64,
    /// Readings timestamped further than this into the future are rejected.
    pub max_future_skew_ms: u64,
    /// On SIGTERM, how long at most to keep draining what clients already sent (connections
    /// that stay open keep sending, so the drain may never go quiet on its own).
    pub shutdown_grace_ms: u64,
    /// Address of the `/metrics`, `/healthz` and `/readyz` endpoint; empty turns it off.
    pub http_listen: String,
    /// Device credentials (`<device>:<argon2 hash>` lines, edited with `co2-broker passwd`).
    /// Set: every MQTT client must log in as a device, with client id = username, and may only
    /// use its own topics. Unset: anonymous, and only loopback listeners are allowed.
    pub credentials_file: Option<PathBuf>,
    /// Let listeners on other interfaces than loopback run without credentials: an open broker
    /// anyone on the network can use. Off by default; logged as a warning at every start.
    pub allow_anonymous_remote: bool,
    /// A file holding the database URL (e.g. a secret mounted outside git); when set it wins
    /// over `database_url`.
    pub database_url_file: Option<PathBuf>,
}

impl Default for IngestSettings {
    fn default() -> Self {
        Self {
            database_url: DatabaseUrl(DEFAULT_DATABASE_URL.into()),
            run_migrations: true,
            data_dir: PathBuf::from("data"),
            legacy_timezone: "UTC".into(),
            batch_max_rows: 1000,
            batch_max_delay_ms: 10,
            queue_capacity: 65_536,
            db_write_timeout_ms: 5_000,
            db_retry_interval_ms: 1_000,
            db_writers: 3,
            db_pool_size: 4,
            spool_max_bytes: 1 << 30,
            min_co2_ppm: 0.0,
            max_co2_ppm: 100_000.0,
            max_future_skew_ms: 24 * 3600 * 1000,
            shutdown_grace_ms: 3_000,
            http_listen: "127.0.0.1:9883".into(),
            credentials_file: None,
            allow_anonymous_remote: false,
            database_url_file: None,
        }
    }
}

impl IngestSettings {
    pub fn batch_max_delay(&self) -> Duration {
        Duration::from_millis(self.batch_max_delay_ms)
    }
    pub fn db_write_timeout(&self) -> Duration {
        Duration::from_millis(self.db_write_timeout_ms)
    }
    pub fn db_retry_interval(&self) -> Duration {
        Duration::from_millis(self.db_retry_interval_ms)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
    /// The metrics endpoint's address, already checked by [`Settings::validate`].
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http_listen.parse().ok()
    }
    pub fn spool_dir(&self) -> PathBuf {
        self.data_dir.join("spool")
    }
    /// The zone, already checked by [`Settings::validate`].
    pub fn legacy_zone(&self) -> Tz {
        self.legacy_timezone.parse().unwrap_or(Tz::UTC)
    }
}

/// A database URL that never prints its password.
#[derive(Clone, Deserialize, Serialize)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }
    /// The full URL, password included: only for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&masked_url(&self.0))
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&masked_url(&self.0))
    }
}

/// A setting that cannot be used, with the key that holds it.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("config {path}: {source}")]
    Load {
        path: String,
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
    /// Loads `path`, applies `CO2_*` from `env`, and validates.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let load_err = |source| SettingsError::Load {
            path: path.display().to_string(),
            source,
        };
        let mut builder = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml));
        let known_keys = match serde_json::to_value(IngestSettings::default()) {
            Ok(serde_json::Value::Object(fields)) => fields.keys().cloned().collect(),
            _ => Vec::new(),
        };
        let mut ignored_env = Vec::new();
        for (name, value) in env {
            // CO2_CONFIG names the file itself; it is not a key of [co2].
            let Some(key) = name.strip_prefix("CO2_").filter(|k| *k != "CONFIG") else {
                continue;
            };
            let key = key.to_lowercase();
            if known_keys.contains(&key) {
                builder = builder
                    .set_override(format!("co2.{key}"), value)
                    .map_err(load_err)?;
            } else {
                ignored_env.push(name);
            }
        }
        let layered = builder.build().map_err(load_err)?;
        let mqtt: rumqttd::Config = layered.clone().try_deserialize().map_err(load_err)?;
        let ingest = match layered.get::<config::Value>("co2") {
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
        let mut ingest: IngestSettings = ingest;
        if let Some(file) = &ingest.database_url_file {
            let url = std::fs::read_to_string(file).map_err(|e| {
                invalid(
                    "co2.database_url_file",
                    format!("cannot read {}: {e}", file.display()),
                )
            })?;
            ingest.database_url = DatabaseUrl::new(url.trim());
        }
        let settings = Self {
            mqtt,
            ingest,
            ignored_env,
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what serde cannot: ranges, zones, and rumqttd values that would panic its router.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let i = &self.ingest;
        i.legacy_timezone.parse::<Tz>().map_err(|_| {
            invalid(
                "co2.legacy_timezone",
                format!("unknown time zone {:?}", i.legacy_timezone),
            )
        })?;
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
        if !i.http_listen.is_empty() && i.http_listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "co2.http_listen",
                format!(
                    "{:?} is not an address like 127.0.0.1:9883 (empty turns it off)",
                    i.http_listen
                ),
            ));
        }
        let url = i.database_url.expose();
        if !(url.starts_with("sqlite:")
            || url.starts_with("mysql://")
            || url.starts_with("mariadb://"))
        {
            return Err(invalid(
                "co2.database_url",
                "must start with sqlite:, mysql:// or mariadb://",
            ));
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
