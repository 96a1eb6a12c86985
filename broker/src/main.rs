//! `co2-broker [--config PATH]`: parse arguments, load settings, run until SIGINT/SIGTERM.
//! `co2-broker [--config PATH] passwd ...`: manage device credentials ([`co2_broker::passwd`]).
//! `co2-broker [--config PATH] rollups rebuild ...`: recompute rollups
//! ([`co2_broker::rollups_cli`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use co2_broker::metrics::IngestMetrics;
use co2_broker::passwd::PasswdArgs;
use co2_broker::rollups_cli::RollupsArgs;
use co2_broker::settings::{Settings, DEFAULT_CONFIG_PATH};

const USAGE: &str = "usage: co2-broker [--config PATH]   (default: $CO2_CONFIG or rumqttd.toml)";

fn main() -> ExitCode {
    init_tracing();
    let (path, command) = match parse_args(std::env::args().skip(1)) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!(
                "{message}\n{USAGE}\n{}\n{}",
                co2_broker::passwd::USAGE,
                co2_broker::rollups_cli::USAGE
            );
            return ExitCode::from(2);
        }
    };
    let rollups = match command {
        Command::Serve => None,
        Command::Passwd(passwd) => return run_passwd(&path, &passwd),
        Command::Rollups(rollups) => Some(rollups),
    };
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
    if let Some(rollups) = rollups {
        return match runtime.block_on(co2_broker::rollups_cli::run(&settings.ingest, &rollups)) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("co2-broker rollups: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
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

/// What the command line asks for besides running the broker.
enum Command {
    Serve,
    Passwd(PasswdArgs),
    Rollups(RollupsArgs),
}

/// The config path, and the subcommand if one was given.
fn parse_args(args: impl Iterator<Item = String>) -> Result<(PathBuf, Command), String> {
    let mut path: PathBuf = std::env::var("CO2_CONFIG")
        .unwrap_or_else(|_| DEFAULT_CONFIG_PATH.into())
        .into();
    let mut args = args.peekable();
    if matches!(args.peek().map(String::as_str), Some("--config" | "-c")) {
        args.next();
        path = args.next().ok_or("--config needs a path")?.into();
    }
    match args.next().as_deref() {
        None => Ok((path, Command::Serve)),
        Some("passwd") => Ok((path, Command::Passwd(PasswdArgs::parse(args)?))),
        Some("rollups") => Ok((path, Command::Rollups(RollupsArgs::parse(args)?))),
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

/// rumqttd 0.20 logs these at ERROR for every ordinary client disconnect; an operator must
/// not learn to ignore ERROR lines, so exactly these call sites (file, line) are dropped.
const BENIGN_RUMQTTD_ERRORS: [(&str, u32); 4] = [
    ("src/router/routing.rs", 416), // "no-connection id … is already gone"
    ("src/router/routing.rs", 436),
    ("src/router/routing.rs", 539),
    ("src/server/broker.rs", 581), // "router-drop error=Recv(Disconnected)"
];

/// Spans rumqttd opens for every single message at ERROR level (so `rumqttd=warn` keeps
/// them). Recording them formats the topic of each PUBLISH on the router's only thread; the
/// profile of the benchmark showed it among the broker's top costs. Connection-level spans
/// (`remote_link`, `incoming_connect`, …) stay: they give errors their client id.
const PER_MESSAGE_RUMQTTD_SPANS: [&str; 4] = [
    "publish",
    "incoming_payload",
    "[>] incoming",
    "[<] outgoing",
];

/// `RUST_LOG` decides; by default rumqttd only speaks up for warnings, because at info it
/// logs every connection.
fn init_tracing() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn"));
    let not_benign = tracing_subscriber::filter::filter_fn(|meta| {
        if !meta.target().starts_with("rumqttd") {
            return true;
        }
        if meta.is_span() {
            return !PER_MESSAGE_RUMQTTD_SPANS.contains(&meta.name());
        }
        !BENIGN_RUMQTTD_ERRORS.iter().any(|(file, line)| {
            meta.line() == Some(*line) && meta.file().is_some_and(|f| f.ends_with(file))
        })
    });
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter(filter)
                .with_filter(not_benign),
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
