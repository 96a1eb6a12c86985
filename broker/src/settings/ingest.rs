//! The `[co2]` section, typed: storage and ingest settings as the rest of the broker uses
//! them. Values that have a type (a time zone, a socket address) are parsed here, while
//! deserializing, so a bad one names its own key and nothing downstream parses again.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chrono_tz::Tz;
use serde::{Deserialize, Deserializer};

use super::DatabaseUrl;

/// The `[co2]` section. Durations are in milliseconds, as in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestSettings {
    /// `sqlite://path?mode=rwc` (embedded default) or `mysql://user:password@host/db`. After
    /// [`super::Settings::load`], the URL [`migration::database_url::resolve`] settled on
    /// (`database_url_file` included).
    pub database_url: DatabaseUrl,
    /// Apply pending migrations at start; turn off where schema changes are rolled out by hand.
    pub run_migrations: bool,
    /// Where the broker keeps its on-disk spool.
    pub data_dir: PathBuf,
    /// IANA zone of the wall-clock times in legacy `Y-M-D h:m:s|value` payloads.
    #[serde(deserialize_with = "time_zone")]
    pub legacy_timezone: Tz,
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
    /// Address of the `/metrics`, `/healthz` and `/readyz` endpoint; `""` in the file (or
    /// `CO2_HTTP_LISTEN=`) turns it off.
    #[serde(deserialize_with = "optional_address")]
    pub http_listen: Option<SocketAddr>,
    /// Device credentials (`<device>:<argon2 hash>` lines, edited with `co2-broker passwd`).
    /// Set: every MQTT client must log in as a device, with client id = username, and may only
    /// use its own topics. Unset: anonymous, and only loopback listeners are allowed.
    pub credentials_file: Option<PathBuf>,
    /// Let listeners on other interfaces than loopback run without credentials: an open broker
    /// anyone on the network can use. Off by default; logged as a warning at every start.
    pub allow_anonymous_remote: bool,
    /// A file holding the database URL (e.g. a secret mounted outside git); when set it wins
    /// over `database_url`, which [`super::Settings::load`] replaces with the file's content.
    pub database_url_file: Option<PathBuf>,
    /// Days raw readings are kept (by measured time); 0 keeps them forever. Rollups outlive
    /// them, so dashboards still draw older ranges. See `storage::retention`.
    pub raw_retention_days: u32,
    /// Days per-minute rollups are kept; 0: forever.
    pub minute_rollup_retention_days: u32,
    /// Days per-hour rollups are kept; 0: forever.
    pub hour_rollup_retention_days: u32,
}

impl Default for IngestSettings {
    fn default() -> Self {
        Self {
            database_url: DatabaseUrl::default(),
            run_migrations: true,
            data_dir: PathBuf::from("data"),
            legacy_timezone: Tz::UTC,
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
            http_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9883))),
            credentials_file: None,
            allow_anonymous_remote: false,
            database_url_file: None,
            raw_retention_days: 0,
            minute_rollup_retention_days: 0,
            hour_rollup_retention_days: 0,
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
    /// The metrics endpoint's address; `None` when it is turned off.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_listen
    }
    pub fn spool_dir(&self) -> PathBuf {
        self.data_dir.join("spool")
    }
}

/// An IANA zone name such as `Europe/Berlin`.
fn time_zone<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Tz, D::Error> {
    let name = String::deserialize(deserializer)?;
    name.parse()
        .map_err(|_| serde::de::Error::custom(format!("unknown time zone {name:?}")))
}

/// `host:port`, or empty for "off".
fn optional_address<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "{text:?} is not an address like 127.0.0.1:9883 (empty turns it off)"
        ))
    })
}

/// The keys `[co2]` accepts, read from the struct's own `Deserialize` (serde hands every
/// deserializer the list of field names), so the list cannot drift from the fields. Used to
/// tell `CO2_<KEY>` overrides from unrelated `CO2_*` variables.
pub(super) fn keys() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    // The probe always fails after recording the names; the error carries nothing.
    let _ = IngestSettings::deserialize(FieldNames(&mut fields));
    fields
}

/// A deserializer that only records the field names of the struct asked of it.
struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> Deserializer<'de> for FieldNames<'_> {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("only field names are read"))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(serde::de::Error::custom("only field names are read"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_list_is_read_from_the_struct() {
        let keys = keys();
        assert_eq!(keys.len(), 23, "{keys:?}");
        for key in [
            "database_url",
            "legacy_timezone",
            "http_listen",
            "database_url_file",
        ] {
            assert!(keys.contains(&key), "{key} in {keys:?}");
        }
    }
}
