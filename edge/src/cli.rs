//! Command-line arguments: a tiny hand-written parser (no clap) for the few flags the agent
//! has. Everything else lives in the config file.

use std::path::PathBuf;

use crate::config::Overrides;

pub const DEFAULT_CONFIG: &str = "/etc/co2-edge/config.toml";

pub const USAGE: &str = "\
co2-edge: reads a CO2 sensor and publishes every reading to the co2 broker

USAGE: co2-edge [OPTIONS]

OPTIONS:
  -c, --config <FILE>     TOML config (default /etc/co2-edge/config.toml if it exists)
      --once              print one reading as JSON and exit (wiring check)
      --device-id <ID>    overrides device_id
      --data-dir <DIR>    overrides data_dir (the outbox lives in <DIR>/outbox)
      --broker <HOST[:PORT]>  overrides mqtt.host / mqtt.port
      --sensor <KIND>     overrides sensor.kind (mhz19, senseair_s8, scd4x, simulated, command)
      --interval-ms <MS>  overrides sensor.interval_ms
      --log <FILTER>      overrides log (e.g. info, co2_edge=debug); RUST_LOG wins
  -h, --help              this text
  -V, --version           the version

Environment: CO2_EDGE__<SECTION>__<KEY> overrides the file, e.g. CO2_EDGE__MQTT__HOST=broker.lan
";

#[derive(Debug, Default)]
pub struct Args {
    pub config: Option<PathBuf>,
    pub once: bool,
    pub help: bool,
    pub version: bool,
    pub overrides: Overrides,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ArgsError {
    #[error("{0} needs a value")]
    MissingValue(String),
    #[error("{flag}: {value:?} is not a number")]
    NotANumber { flag: String, value: String },
    #[error("unknown argument {0:?} (try --help)")]
    Unknown(String),
}

/// Parses `args` (without the program name). Accepts `--flag value` and `--flag=value`.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, ArgsError> {
    let mut out = Args::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| ArgsError::MissingValue(flag.clone()))
        };
        match flag.as_str() {
            "-c" | "--config" => out.config = Some(PathBuf::from(value()?)),
            "--once" => out.once = true,
            "-h" | "--help" => out.help = true,
            "-V" | "--version" => out.version = true,
            "--device-id" => out.overrides.device_id = Some(value()?),
            "--data-dir" => out.overrides.data_dir = Some(PathBuf::from(value()?)),
            "--broker" => out.overrides.broker = Some(value()?),
            "--sensor" => out.overrides.sensor = Some(value()?),
            "--log" => out.overrides.log = Some(value()?),
            "--interval-ms" => {
                let v = value()?;
                out.overrides.interval_ms = Some(v.parse().map_err(|_| ArgsError::NotANumber {
                    flag: flag.clone(),
                    value: v,
                })?);
            }
            _ => return Err(ArgsError::Unknown(arg)),
        }
    }
    Ok(out)
}

impl Args {
    /// The config file to load: the one given, else the default if it exists.
    pub fn config_file(&self) -> Option<PathBuf> {
        self.config.clone().or_else(|| {
            let default = PathBuf::from(DEFAULT_CONFIG);
            default.exists().then_some(default)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, ArgsError> {
        parse(list.iter().map(|s| s.to_string()))
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
        ])
        .unwrap();
        assert_eq!(a.config, Some(PathBuf::from("/tmp/c.toml")));
        assert!(a.once);
        assert_eq!(a.overrides.broker.as_deref(), Some("h:1884"));
        assert_eq!(a.overrides.interval_ms, Some(100));
        assert_eq!(
            args(&["--config"]).unwrap_err(),
            ArgsError::MissingValue("--config".into())
        );
        assert!(matches!(
            args(&["--interval-ms", "x"]),
            Err(ArgsError::NotANumber { .. })
        ));
        assert_eq!(
            args(&["--frobnicate"]).unwrap_err(),
            ArgsError::Unknown("--frobnicate".into())
        );
    }
}
