//! Command-line arguments (clap): the few flags the agent has. Everything else lives in the
//! config file; the flags here only override it.

use std::path::PathBuf;

use clap::Parser;

use crate::config::Overrides;

pub const DEFAULT_CONFIG: &str = "/etc/co2-edge/config.toml";

/// co2-edge: reads a CO2 sensor and publishes every reading to the co2 broker
#[derive(Debug, Parser)]
#[command(
    name = "co2-edge",
    version,
    after_help = "Environment: CO2_EDGE__<SECTION>__<KEY> overrides the file, e.g. CO2_EDGE__MQTT__HOST=broker.lan"
)]
pub struct Args {
    /// TOML config (default /etc/co2-edge/config.toml if it exists)
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print one reading as JSON and exit (wiring check)
    #[arg(long)]
    pub once: bool,
    /// Overrides device_id
    #[arg(long, value_name = "ID")]
    device_id: Option<String>,
    /// Overrides data_dir (the outbox lives in <DIR>/outbox)
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The one broker to use: replaces mqtt.brokers (or mqtt.host / mqtt.port)
    #[arg(long, value_name = "HOST[:PORT]")]
    broker: Option<String>,
    /// Overrides sensor.kind (mhz19, senseair_s8, scd4x, simulated, command)
    #[arg(long, value_name = "KIND")]
    sensor: Option<String>,
    /// Overrides sensor.interval_ms
    #[arg(long, value_name = "MS")]
    interval_ms: Option<u64>,
    /// Overrides log (e.g. info, co2_edge=debug); RUST_LOG wins
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
}

impl Args {
    /// The config file to load: the one given, else the default if it exists.
    pub fn config_file(&self) -> Option<PathBuf> {
        self.config.clone().or_else(|| {
            let default = PathBuf::from(DEFAULT_CONFIG);
            default.exists().then_some(default)
        })
    }

    /// The values that override the file and the environment.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            device_id: self.device_id.clone(),
            data_dir: self.data_dir.clone(),
            broker: self.broker.clone(),
            sensor: self.sensor.clone(),
            interval_ms: self.interval_ms,
            log: self.log.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;

    use super::*;

    fn args(list: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("co2-edge").chain(list.iter().copied()))
    }

    #[test]
    fn flags_and_values() {
        let a = args(&[
            "--config",
            "/tmp/c.toml",
            "--once",
            "--broker=h:1884",
            "--interval-ms",
            "100",
            "--device-id",
            "pi-7",
        ])
        .unwrap();
        assert_eq!(a.config, Some(PathBuf::from("/tmp/c.toml")));
        assert!(a.once);
        let overrides = a.overrides();
        assert_eq!(overrides.broker.as_deref(), Some("h:1884"));
        assert_eq!(overrides.interval_ms, Some(100));
        assert_eq!(overrides.device_id.as_deref(), Some("pi-7"));
        assert_eq!(overrides.sensor, None);
        assert_eq!(
            args(&["-c", "x.toml"]).unwrap().config,
            Some(PathBuf::from("x.toml"))
        );
    }

    #[test]
    fn mistakes_exit_2_and_help_exits_0() {
        for wrong in [
            &["--config"][..],
            &["--interval-ms", "x"],
            &["--frobnicate"],
        ] {
            let e = args(wrong).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{wrong:?}: {e}");
        }
        let e = args(&["--interval-ms", "x"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
        let help = args(&["--help"]).unwrap_err();
        assert_eq!(help.kind(), ErrorKind::DisplayHelp);
        assert_eq!(help.exit_code(), 0);
        let text = help.to_string();
        assert!(text.contains("--interval-ms <MS>"), "{text}");
        assert!(text.contains("CO2_EDGE__MQTT__HOST"), "{text}");
        let version = args(&["-V"]).unwrap_err();
        assert_eq!(version.kind(), ErrorKind::DisplayVersion);
        assert_eq!(version.exit_code(), 0);
    }
}
