//! `cargo run -p migration -- up|down|status [--steps N] [--config PATH]`: the migrate
//! runner ([`crate::runner`]) as a program of its own, for a source checkout. An installed
//! broker has the same as `co2-broker migrate …`.
//!
//! It finds the configuration like the broker ([`ConfigSource::resolve`]: `--config`, else
//! `CO2_CONFIG`, else `./rumqttd.toml` if present, else the built-in defaults) and the
//! database in it like the broker ([`database_url::resolve`]: `CO2_DATABASE_URL_FILE` /
//! `CO2_DATABASE_URL` over the file's `database_url_file` / `database_url`, else the SQLite
//! default). Unlike `co2-broker migrate` it reads nothing else of the configuration, so a
//! setting the broker would refuse elsewhere in the file does not stop a migration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::config_source::ConfigSource;
use crate::database_url::{self, DatabaseUrl};
use crate::runner::{self, MigrateAction};

/// Exit code of a configuration that cannot be used, as for a bad argument.
const CONFIG_ERROR: u8 = 2;

/// Apply or revert the co2 database's migrations, on the database co2-broker's settings name.
#[derive(Debug, Parser)]
#[command(name = "migration", version)]
pub struct Cli {
    /// Configuration file [default: $CO2_CONFIG, else ./rumqttd.toml if it exists, else the
    /// built-in defaults: the shipped rumqttd.toml]
    #[arg(short, long, value_name = "PATH", global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub action: MigrateAction,
}

impl Cli {
    /// Runs the command: 0 on success, 2 for a configuration that cannot be used, 1 when the
    /// migration itself fails.
    pub fn run(self) -> ExitCode {
        let url = match database_url(self.config) {
            Ok(url) => url,
            Err(e) => {
                eprintln!("migration: {e}");
                return ExitCode::from(CONFIG_ERROR);
            }
        };
        let outcome = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::new)
            .and_then(|runtime| runtime.block_on(runner::run(&self.action, &url)));
        match outcome {
            Ok(status) => {
                print!("{status}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("migration: {e:#}");
                ExitCode::FAILURE
            }
        }
    }
}

/// The database the broker would use with the same `--config` and environment.
fn database_url(config: Option<PathBuf>) -> anyhow::Result<DatabaseUrl> {
    let source = ConfigSource::resolve(config, std::env::var_os("CO2_CONFIG"))?;
    let file = source
        .read()
        .map_err(|e| anyhow::anyhow!("config {}: {e}", source.describe()))?;
    let env: Vec<(String, String)> = std::env::vars().collect();
    Ok(database_url::resolve(&file, &env)?)
}
