//! `co2-broker [--config PATH]`: parse arguments, load settings, run until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use co2_broker::metrics::IngestMetrics;
use co2_broker::settings::{Settings, DEFAULT_CONFIG_PATH};

const USAGE: &str = "usage: co2-broker [--config PATH]   (default: $CO2_CONFIG or rumqttd.toml)";

fn main() -> ExitCode {
    init_tracing();
    let path = match config_path(std::env::args().skip(1)) {
        Ok(path) => path,
        Err(message) => {
            eprintln!("{message}\n{USAGE}");
            return ExitCode::from(2);
        }
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

fn config_path(mut args: impl Iterator<Item = String>) -> Result<PathBuf, String> {
    let default = std::env::var("CO2_CONFIG").unwrap_or_else(|_| DEFAULT_CONFIG_PATH.into());
    match (args.next().as_deref(), args.next(), args.next()) {
        (None, _, _) => Ok(default.into()),
        (Some("--config" | "-c"), Some(path), None) => Ok(path.into()),
        (Some("--help" | "-h"), _, _) => {
            Err("co2-broker: MQTT broker that stores CO2 readings".into())
        }
        (Some(other), _, _) => Err(format!("unexpected argument {other:?}")),
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

/// `RUST_LOG` decides; by default rumqttd only speaks up for warnings, because at info it
/// logs every connection.
fn init_tracing() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn"));
    let not_benign = tracing_subscriber::filter::filter_fn(|meta| {
        !(meta.target().starts_with("rumqttd")
            && BENIGN_RUMQTTD_ERRORS.iter().any(|(file, line)| {
                meta.line() == Some(*line) && meta.file().is_some_and(|f| f.ends_with(file))
            }))
    });
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
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
