//! The agent's typed configuration: one TOML file, then `CO2_EDGE__SECTION__KEY` environment
//! variables, then command-line flags, loaded and validated once at start.
//!
//! Every setting has a default except what only the operator knows (the broker host has a
//! default of `localhost` for tests). Validation errors name the offending key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::FixedOffset;
use co2_proto::DeviceId;
use serde::Deserialize;

use crate::brokers::BrokerAddress;

/// Prefix of environment overrides: `CO2_EDGE__MQTT__HOST=broker.lan`.
pub const ENV_PREFIX: &str = "CO2_EDGE";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// MQTT client id and topic level; defaults to the host name.
    #[serde(default)]
    pub device_id: Option<String>,
    /// Where the outbox lives (`<data_dir>/outbox/`); systemd's StateDirectory on the Pi.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// `tracing` filter, overridden by `RUST_LOG`.
    #[serde(default = "default_log")]
    pub log: String,
    #[serde(default)]
    pub sensor: SensorConfig,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub publish: PublishConfig,
    #[serde(default)]
    pub outbox: OutboxConfig,
    #[serde(default)]
    pub clock: ClockConfig,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/co2-edge")
}

fn default_log() -> String {
    "info".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SensorKind {
    Mhz19,
    SenseairS8,
    Scd4x,
    Simulated,
    Command,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SensorConfig {
    pub kind: SensorKind,
    /// Time between samples. MH-Z19 sensors polled faster than every 5 s have been reported to
    /// stop answering; tests use the simulated source at e.g. 100 ms.
    pub interval_ms: u64,
    /// Readings are discarded until the system has been up this long (a proxy for sensor
    /// power-on, so an agent restart does not restart the warm-up). Default per sensor.
    pub warmup_secs: Option<u64>,
    /// Publish the median of the last N samples (1 = no filtering): one spike cannot move it.
    pub median_window: usize,
    /// Samples outside [min_ppm, max_ppm] are discarded as implausible.
    pub min_ppm: f64,
    pub max_ppm: f64,
    pub serial: SerialConfig,
    pub mhz19: Mhz19Config,
    pub scd4x: Scd4xConfig,
    pub simulated: SimulatedConfig,
    pub command: CommandConfig,
}

impl Default for SensorConfig {
    fn default() -> Self {
        Self {
            kind: SensorKind::Simulated,
            interval_ms: 5000,
            warmup_secs: None,
            median_window: 3,
            min_ppm: 1.0,
            max_ppm: 40_000.0,
            serial: SerialConfig::default(),
            mhz19: Mhz19Config::default(),
            scd4x: Scd4xConfig::default(),
            simulated: SimulatedConfig::default(),
            command: CommandConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SerialConfig {
    /// `/dev/serial0` is the Pi's primary UART on GPIO14/15; `/dev/ttyUSB0` for USB adapters.
    pub path: PathBuf,
}

impl Default for SerialConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/dev/serial0"),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mhz19Config {
    /// Detection range to set at start (2000, 5000 or 10000); unset leaves the sensor's own.
    pub range_ppm: Option<u32>,
    /// Automatic baseline correction; unset leaves the sensor's setting (on from the factory).
    pub abc: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scd4xConfig {
    /// `/dev/i2c-<bus>`; bus 1 is GPIO2/GPIO3.
    pub i2c_bus: u8,
    /// Self-heating compensation in °C (sensor default 4 °C); set at every start, not persisted.
    pub temperature_offset_c: Option<f64>,
    /// Altitude above sea level in metres, for pressure compensation.
    pub altitude_m: Option<u16>,
}

impl Default for Scd4xConfig {
    fn default() -> Self {
        Self {
            i2c_bus: 1,
            temperature_offset_c: None,
            altitude_m: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimulatedConfig {
    pub seed: u64,
    pub baseline_ppm: f64,
    /// Also report temperature and humidity.
    pub with_climate: bool,
}

impl Default for SimulatedConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            baseline_ppm: 420.0,
            with_climate: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommandConfig {
    /// Program to run (no shell); its stdout is `<ppm> [temperature [humidity]]`.
    pub program: String,
    pub args: Vec<String>,
    pub timeout_ms: u64,
}

impl Default for CommandConfig {
    fn default() -> Self {
        Self {
            program: String::new(),
            args: Vec::new(),
            timeout_ms: 5000,
        }
    }
}

/// A secret that never shows up in logs or `Debug` output.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// The broker, when there is one; ignored when `brokers` is set.
    pub host: String,
    /// 1883, or 8883 with TLS; also the port of `brokers` entries that name none.
    pub port: u16,
    /// Several brokers writing to one database cluster, `"host[:port]"` each: the agent uses
    /// the first and fails over to the next when a connection fails (see [`crate::brokers`]).
    /// Wins over `host`/`port`.
    pub brokers: Vec<String>,
    /// Defaults to the device id; with a persistent session it must stay stable.
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub keep_alive_secs: u64,
    /// Wait between reconnect attempts.
    pub reconnect_delay_ms: u64,
    pub tls: TlsConfig,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: "localhost".into(),
            port: 1883,
            brokers: Vec::new(),
            client_id: None,
            username: None,
            password: None,
            keep_alive_secs: 30,
            reconnect_delay_ms: 2000,
            tls: TlsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub enabled: bool,
    /// PEM file with the CA(s) to trust; unset uses the system store (/etc/ssl/certs).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and key, for brokers that require client authentication.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    /// `co2_proto::Payload::to_json`, with `seq`; removed from the outbox on the broker's
    /// storage ack.
    Json,
    /// `Y-M-D h:m:s|value` for old servers; no seq, so removed on PUBACK (at-most-once beyond
    /// the broker).
    Legacy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PublishConfig {
    pub format: PayloadFormat,
    /// Zone of the legacy wall-clock time, e.g. `+09:00` (KST); fixed offset, no DST.
    pub legacy_utc_offset: String,
    /// Readings published but not yet acknowledged, at most.
    pub max_in_flight: usize,
    /// Backlog drain rate after a reconnect, readings per second.
    pub max_rate_per_sec: f64,
    /// Resend everything unacknowledged when no ack came for this long.
    pub ack_timeout_secs: u64,
    /// How often the backlog size is logged while it is not empty.
    pub backlog_log_secs: u64,
}

impl Default for PublishConfig {
    fn default() -> Self {
        Self {
            format: PayloadFormat::Json,
            legacy_utc_offset: "+09:00".into(),
            max_in_flight: 16,
            max_rate_per_sec: 20.0,
            ack_timeout_secs: 30,
            backlog_log_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxConfig {
    /// Unacknowledged readings kept at most; beyond it the oldest are dropped and counted.
    /// 500 000 readings ≈ 29 days at one per 5 s ≈ 40 MB.
    pub max_records: u64,
    /// Records per segment file; fully acknowledged segments are deleted whole.
    pub segment_records: u64,
    /// fsync after this many appended readings...
    pub fsync_every: u64,
    /// ...or this long after the first unsynced one, whichever comes first.
    pub fsync_interval_ms: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            max_records: 500_000,
            segment_records: 8192,
            fsync_every: 12,
            fsync_interval_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClockConfig {
    /// Trust the wall clock only once the kernel says NTP synchronised it (adjtimex). Turn off
    /// on machines with an RTC, or in containers where the flag is never set.
    pub require_ntp_sync: bool,
    /// A reading whose time cannot be established is held this long at most, then published
    /// with the best-guess time (and a warning).
    pub max_hold_secs: u64,
    /// Wall clocks before this year are never trusted (a Pi without RTC boots in 1970).
    pub min_year: i32,
}

impl Default for ClockConfig {
    fn default() -> Self {
        Self {
            require_ntp_sync: true,
            max_hold_secs: 600,
            min_year: 2025,
        }
    }
}

/// Command-line values that override the file and the environment.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub device_id: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub broker: Option<String>,
    pub sensor: Option<String>,
    pub interval_ms: Option<u64>,
    pub log: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(#[from] config::ConfigError),
    #[error("config key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// The validated settings the agent runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub device_id: DeviceId,
    /// `mqtt.brokers`, or the one `mqtt.host:port`; never empty.
    pub brokers: Vec<BrokerAddress>,
    pub raw: Config,
    pub legacy_offset: FixedOffset,
}

impl Settings {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.raw.sensor.interval_ms)
    }

    pub fn outbox_dir(&self) -> PathBuf {
        self.raw.data_dir.join("outbox")
    }
}

/// Loads `file` (optional when `required` is false), the environment and `overrides`, then
/// validates.
pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Settings, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(file) = file {
        builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
    }
    builder = builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .list_separator(" ")
            .with_list_parse_key("sensor.command.args")
            .with_list_parse_key("mqtt.brokers")
            .try_parsing(true),
    );
    if let Some(v) = &overrides.device_id {
        builder = builder.set_override("device_id", v.as_str())?;
    }
    if let Some(v) = &overrides.data_dir {
        builder = builder.set_override("data_dir", v.display().to_string())?;
    }
    if let Some(v) = &overrides.broker {
        let (host, port) = match v.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (v.as_str(), None),
        };
        builder = builder.set_override("mqtt.host", host)?;
        if let Some(port) = port {
            let port: u16 = port.parse().map_err(|_| {
                invalid(
                    "mqtt.port",
                    format!("--broker port {port:?} is not a number"),
                )
            })?;
            builder = builder.set_override("mqtt.port", port)?;
        }
    }
    if let Some(v) = &overrides.sensor {
        builder = builder.set_override("sensor.kind", v.as_str())?;
    }
    if let Some(v) = overrides.interval_ms {
        builder = builder.set_override("sensor.interval_ms", v)?;
    }
    if let Some(v) = &overrides.log {
        builder = builder.set_override("log", v.as_str())?;
    }
    let mut raw: Config = builder.build()?.try_deserialize()?;
    if overrides.broker.is_some() {
        // `--broker` names the one broker to use, whatever list the file has.
        raw.mqtt.brokers.clear();
    }
    validate(raw)
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn validate(raw: Config) -> Result<Settings, ConfigError> {
    let id = match &raw.device_id {
        Some(id) => id.clone(),
        None => hostname().ok_or_else(|| invalid("device_id", "not set and no host name found"))?,
    };
    let device_id =
        DeviceId::new(id.clone()).map_err(|e| invalid("device_id", format!("{id:?}: {e}")))?;
    let legacy_offset: FixedOffset = raw.publish.legacy_utc_offset.parse().map_err(|_| {
        invalid(
            "publish.legacy_utc_offset",
            "expected an offset like +09:00",
        )
    })?;
    let s = &raw.sensor;
    if s.interval_ms == 0 {
        return Err(invalid("sensor.interval_ms", "must be > 0"));
    }
    if s.median_window == 0 || s.median_window > 99 {
        return Err(invalid("sensor.median_window", "must be 1..=99"));
    }
    if !s.min_ppm.is_finite() || !s.max_ppm.is_finite() || s.min_ppm >= s.max_ppm {
        return Err(invalid("sensor.min_ppm", "must be below sensor.max_ppm"));
    }
    if s.kind == SensorKind::Command && s.command.program.is_empty() {
        return Err(invalid(
            "sensor.command.program",
            "required when sensor.kind = \"command\"",
        ));
    }
    if let Some(range) = s.mhz19.range_ppm {
        if ![2000, 5000, 10000].contains(&range) {
            return Err(invalid(
                "sensor.mhz19.range_ppm",
                "must be 2000, 5000 or 10000",
            ));
        }
    }
    let p = &raw.publish;
    if p.max_in_flight == 0 || p.max_in_flight > 1000 {
        return Err(invalid("publish.max_in_flight", "must be 1..=1000"));
    }
    if !p.max_rate_per_sec.is_finite() || p.max_rate_per_sec <= 0.0 {
        return Err(invalid("publish.max_rate_per_sec", "must be > 0"));
    }
    if p.ack_timeout_secs == 0 {
        return Err(invalid("publish.ack_timeout_secs", "must be > 0"));
    }
    if raw.mqtt.keep_alive_secs < 5 {
        return Err(invalid("mqtt.keep_alive_secs", "must be >= 5"));
    }
    let brokers = if raw.mqtt.brokers.is_empty() {
        if raw.mqtt.host.is_empty() {
            return Err(invalid("mqtt.host", "must not be empty"));
        }
        vec![BrokerAddress {
            host: raw.mqtt.host.clone(),
            port: raw.mqtt.port,
        }]
    } else {
        raw.mqtt
            .brokers
            .iter()
            .map(|b| BrokerAddress::parse(b, raw.mqtt.port))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("mqtt.brokers", e))?
    };
    if raw.mqtt.password.is_some() && raw.mqtt.username.is_none() {
        return Err(invalid(
            "mqtt.username",
            "required when mqtt.password is set",
        ));
    }
    let tls = &raw.mqtt.tls;
    if tls.client_cert_file.is_some() != tls.client_key_file.is_some() {
        return Err(invalid(
            "mqtt.tls.client_key_file",
            "set both client_cert_file and client_key_file, or neither",
        ));
    }
    let o = &raw.outbox;
    if o.max_records == 0 {
        return Err(invalid("outbox.max_records", "must be > 0"));
    }
    if o.segment_records == 0 {
        return Err(invalid("outbox.segment_records", "must be > 0"));
    }
    if o.fsync_every == 0 {
        return Err(invalid(
            "outbox.fsync_every",
            "must be > 0 (1 = fsync every reading)",
        ));
    }
    Ok(Settings {
        device_id,
        brokers,
        raw,
        legacy_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_text(text: &str, overrides: &Overrides) -> Result<Settings, ConfigError> {
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        load(Some(file.path()), overrides)
    }

    #[test]
    fn file_and_overrides() {
        let text = r#"
            device_id = "pi-01"
            data_dir = "/tmp/x"
            [sensor]
            kind = "mhz19"
            [sensor.mhz19]
            range_ppm = 5000
            [mqtt]
            host = "broker.lan"
            password = "hunter2"
            username = "pi"
            [publish]
            format = "legacy"
        "#;
        let s = load_text(text, &Overrides::default()).unwrap();
        assert_eq!(s.device_id.as_str(), "pi-01");
        assert_eq!(s.raw.sensor.kind, SensorKind::Mhz19);
        assert_eq!(s.raw.sensor.mhz19.range_ppm, Some(5000));
        assert_eq!(s.raw.publish.format, PayloadFormat::Legacy);
        assert_eq!(s.legacy_offset.local_minus_utc(), 9 * 3600);
        assert!(!format!("{:?}", s.raw.mqtt).contains("hunter2"));

        let overrides = Overrides {
            broker: Some("10.0.0.2:1884".into()),
            sensor: Some("simulated".into()),
            interval_ms: Some(100),
            ..Overrides::default()
        };
        let s = load_text(text, &overrides).unwrap();
        assert_eq!(
            (s.raw.mqtt.host.as_str(), s.raw.mqtt.port),
            ("10.0.0.2", 1884)
        );
        assert_eq!(s.raw.sensor.kind, SensorKind::Simulated);
        assert_eq!(s.interval(), Duration::from_millis(100));
    }

    #[test]
    fn a_broker_list_or_the_single_host() {
        let single = load_text(
            "device_id = \"a\"\n[mqtt]\nhost = \"b.lan\"\nport = 1884",
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            single.brokers,
            [BrokerAddress {
                host: "b.lan".into(),
                port: 1884
            }]
        );
        let text = "device_id = \"a\"\n[mqtt]\nport = 8883\nbrokers = [\"b1.lan\", \"b2.lan:1884\", \"[::1]\"]";
        let listed = load_text(text, &Overrides::default()).unwrap();
        let names: Vec<String> = listed.brokers.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["b1.lan:8883", "b2.lan:1884", "[::1]:8883"]);
        // `--broker` names the one broker, whatever the file lists.
        let overrides = Overrides {
            broker: Some("10.0.0.9:1999".into()),
            ..Overrides::default()
        };
        let one = load_text(text, &overrides).unwrap();
        let names: Vec<String> = one.brokers.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["10.0.0.9:1999"]);
        let err = load_text(
            "device_id = \"a\"\n[mqtt]\nbrokers = [\"b1.lan\", \"b2:x\"]",
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`mqtt.brokers`") && err.contains("b2:x"),
            "{err}"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let err = |text: &str| {
            load_text(text, &Overrides::default())
                .unwrap_err()
                .to_string()
        };
        assert!(err("device_id = \"a/b\"").contains("`device_id`"));
        assert!(err("device_id = \"a\"\n[sensor]\nkind = \"command\"")
            .contains("sensor.command.program"));
        assert!(
            err("device_id = \"a\"\n[publish]\nlegacy_utc_offset = \"KST\"")
                .contains("legacy_utc_offset")
        );
        assert!(err("device_id = \"a\"\n[sensor]\nkind = \"bme680\"").contains("bme680"));
        assert!(err("device_id = \"a\"\ntypo = 1").contains("typo"));
    }
}
