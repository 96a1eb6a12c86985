//! `co2-broker [--config PATH]`: parse arguments, load settings, run until SIGINT/SIGTERM.
//! `co2-broker [--config PATH] passwd ...`: manage device credentials ([`co2_broker::passwd`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use co2_broker::metrics::IngestMetrics;
use co2_broker::passwd::PasswdArgs;
use co2_broker::settings::{Settings, DEFAULT_CONFIG_PATH};

const USAGE: &str = "usage: co2-broker [--config PATH]   (default: $CO2_CONFIG or rumqttd.toml)";

fn main() -> ExitCode {
    init_tracing();
    let (path, passwd) = match parse_args(std::env::args().skip(1)) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("{message}\n{USAGE}\n{}", co2_broker::passwd::USAGE);
            return ExitCode::from(2);
        }
    };
    if let Some(passwd) = passwd {
        return run_passwd(&path, &passwd);
    }
    let settings = match Settings::load(&path, std::env::vars()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("co2-broker: {e}");
            return ExitCode::from(2);
        }
    };
    for name in &settings.ignored_env {
        tracing::warn!(variable = %name, "ignoring an environment variable that names no [co2] setting");
    }
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
    match runtime.block_on(co2_broker::run(settings, metrics, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("co2-broker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The config path, and the `passwd` subcommand if one was given.
fn parse_args(args: impl Iterator<Item = String>) -> Result<(PathBuf, Option<PasswdArgs>), String> {
    let mut path: PathBuf = std::env::var("CO2_CONFIG")
        .unwrap_or_else(|_| DEFAULT_CONFIG_PATH.into())
        .into();
    let mut args = args.peekable();
    if matches!(args.peek().map(String::as_str), Some("--config" | "-c")) {
        args.next();
        path = args.next().ok_or("--config needs a path")?.into();
    }
    match args.next().as_deref() {
        None => Ok((path, None)),
        Some("passwd") => Ok((path, Some(PasswdArgs::parse(args)?))),
        Some("--help" | "-h") => Err("co2-broker: MQTT broker that stores CO2 readings".into()),
        Some(other) => Err(format!("unexpected argument {other:?}")),
    }
}

/// `co2-broker passwd ...` on `--file` or the config's `co2.credentials_file`.
fn run_passwd(config: &std::path::Path, args: &PasswdArgs) -> ExitCode {
    let file = match &args.file {
        Some(file) => file.clone(),
        None => match Settings::load(config, std::env::vars()) {
            Ok(settings) => match settings.ingest.credentials_file {
                Some(file) => file,
                None => {
                    eprintln!(
                        "co2-broker passwd: {} sets no co2.credentials_file; set it or pass --file PATH",
                        config.display()
                    );
                    return ExitCode::from(2);
                }
            },
            Err(e) => {
                eprintln!("co2-broker: {e}");
                return ExitCode::from(2);
            }
        },
    };
    match co2_broker::passwd::run(args, &file) {
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

/// `RUST_LOG` decides; by default rumqttd only speaks up for warnings, because at info it
/// logs every connection. rumqttd's noise is dropped whatever `RUST_LOG` says.
fn init_tracing() {
    use co2_broker::rumqttd_quirks::log_noise;
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn"));
    let not_noise = tracing_subscriber::filter::filter_fn(|meta| !log_noise::is_noise(meta));
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter(filter)
                .with_filter(not_noise),
        )
        .init();
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await; // no SIGTERM handler: Ctrl-C still works
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
