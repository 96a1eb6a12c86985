//! The command line, parsed by clap: `co2-broker [--config PATH]` runs the broker,
//! `co2-broker passwd …` manages device credentials, `co2-broker migrate …` the schema and
//! `co2-broker rollups rebuild …` the rollup tables.
//! Every command reads the same settings ([`Settings::load_from`]); a bad argument exits 2
//! (clap's usage error), a bad setting exits 2 with one line naming the key, a failure while
//! running exits 1.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::metrics::IngestMetrics;
use crate::migrate::MigrateArgs;
use crate::passwd::PasswdArgs;
use crate::rollups_cli::{RebuildRange, RollupsAction, RollupsArgs};
use crate::settings::{ConfigSource, Settings, SettingsError, DEFAULT_CONFIG_PATH};

/// Exit code of a configuration the broker cannot start with, as for a bad argument.
const CONFIG_ERROR: u8 = 2;

/// MQTT broker (embedded rumqttd) that stores every CO2 reading published under co2/# in a
/// database.
#[derive(Debug, Parser)]
#[command(name = "co2-broker", version)]
pub struct Cli {
    /// Configuration file [default: $CO2_CONFIG, else ./rumqttd.toml if it exists, else the
    /// built-in defaults: the shipped rumqttd.toml]
    #[arg(short, long, value_name = "PATH", global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Passwd(PasswdArgs),
    Migrate(MigrateArgs),
    Rollups(RollupsArgs),
}

impl Cli {
    /// Runs the command. `shutdown` stops the broker gracefully (SIGINT/SIGTERM in `main`).
    pub fn run(self, shutdown: impl Future<Output = ()>) -> ExitCode {
        let Cli { config, command } = self;
        let source = move || {
            ConfigSource::resolve(config, std::env::var_os("CO2_CONFIG"))
                .map_err(SettingsError::from)
        };
        match command {
            None => match load(source()) {
                Ok(settings) => serve(settings, shutdown),
                Err(code) => code,
            },
            Some(Command::Passwd(args)) => passwd(&args, source),
            Some(Command::Migrate(args)) => match load(source()) {
                Ok(settings) => migrate(&args, &settings),
                Err(code) => code,
            },
            Some(Command::Rollups(RollupsArgs {
                action: RollupsAction::Rebuild(range),
            })) => {
                if let Err(e) = range.check() {
                    eprintln!("co2-broker rollups: {e}");
                    return ExitCode::from(CONFIG_ERROR);
                }
                match load(source()) {
                    Ok(settings) => rebuild_rollups(&range, &settings),
                    Err(code) => code,
                }
            }
        }
    }
}

/// The settings with the environment applied, or the exit code after saying why not.
fn load(source: Result<ConfigSource, SettingsError>) -> Result<Settings, ExitCode> {
    let settings = source
        .and_then(|source| Settings::load_from(source, std::env::vars()))
        .map_err(|e| {
            eprintln!("co2-broker: {e}");
            ExitCode::from(CONFIG_ERROR)
        })?;
    for name in &settings.ignored_env {
        tracing::warn!(variable = %name, "ignoring an environment variable that names no setting");
    }
    if settings.source == ConfigSource::BuiltIn {
        tracing::warn!(
            "no configuration file (no --config, no CO2_CONFIG, no {DEFAULT_CONFIG_PATH} in the \
             working directory): running on the built-in defaults, the shipped rumqttd.toml"
        );
    }
    Ok(settings)
}

/// The broker, until `shutdown` resolves or it fails.
fn serve(settings: Settings, shutdown: impl Future<Output = ()>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("co2-broker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let metrics = Arc::new(IngestMetrics::default());
    match runtime.block_on(crate::run(settings, metrics, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("co2-broker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `co2-broker passwd …` on `--file`, or else the config's `co2.credentials_file`; without
/// `--file` the config is not read at all, so the command works before there is one.
fn passwd(
    args: &PasswdArgs,
    source: impl FnOnce() -> Result<ConfigSource, SettingsError>,
) -> ExitCode {
    let file = match &args.file {
        Some(file) => file.clone(),
        None => match source().and_then(|s| Settings::load_from(s, std::env::vars())) {
            Ok(settings) => match settings.ingest.credentials_file {
                Some(file) => file,
                None => {
                    eprintln!(
                        "co2-broker passwd: no co2.credentials_file in {}; set it or pass --file PATH",
                        settings.source.describe()
                    );
                    return ExitCode::from(CONFIG_ERROR);
                }
            },
            Err(e) => {
                eprintln!("co2-broker: {e}");
                return ExitCode::from(CONFIG_ERROR);
            }
        },
    };
    match crate::passwd::run(args, &file) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("co2-broker passwd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `co2-broker migrate …` on the configured database.
fn migrate(args: &MigrateArgs, settings: &Settings) -> ExitCode {
    let url = &settings.ingest.database_url;
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::new)
        .and_then(|runtime| runtime.block_on(crate::migrate::run(&args.action, url)));
    match outcome {
        Ok(status) => {
            print!("{status}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("co2-broker migrate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `co2-broker rollups rebuild …` on the configured database.
fn rebuild_rollups(range: &RebuildRange, settings: &Settings) -> ExitCode {
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::new)
        .and_then(|runtime| runtime.block_on(crate::rollups_cli::run(&settings.ingest, range)));
    match outcome {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("co2-broker rollups: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;
    use crate::migrate::MigrateAction;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn config_goes_before_or_after_the_subcommand() {
        for args in [
            &["co2-broker", "--config", "x.toml", "migrate", "status"][..],
            &["co2-broker", "migrate", "status", "--config", "x.toml"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            assert_eq!(cli.config, Some(PathBuf::from("x.toml")));
            assert!(matches!(
                cli.command,
                Some(Command::Migrate(MigrateArgs {
                    action: MigrateAction::Status
                }))
            ));
        }
    }

    #[test]
    fn migrate_down_defaults_to_one_step() {
        let cli = Cli::try_parse_from(["co2-broker", "migrate", "down"]).unwrap();
        let Some(Command::Migrate(args)) = cli.command else {
            panic!("migrate expected");
        };
        assert_eq!(args.action, MigrateAction::Down { steps: 1 });
        let cli = Cli::try_parse_from(["co2-broker", "migrate", "up", "--steps", "2"]).unwrap();
        let Some(Command::Migrate(args)) = cli.command else {
            panic!("migrate expected");
        };
        assert_eq!(args.action, MigrateAction::Up { steps: Some(2) });
    }

    #[test]
    fn bad_arguments_are_usage_errors() {
        for args in [
            &["co2-broker", "--frobnicate"][..],
            &["co2-broker", "serve"],
            &["co2-broker", "--config"],
            &["co2-broker", "migrate", "sideways"],
        ] {
            let err = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
        let help = Cli::try_parse_from(["co2-broker", "--help"]).unwrap_err();
        assert_eq!(help.exit_code(), 0);
    }
}
