//! `co2-broker`: logging and signals set up around the command line ([`co2_broker::cli`]):
//! the broker itself, `passwd …` and `migrate …`.

use std::process::ExitCode;

use clap::Parser;
use co2_broker::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse(); // `--help` exits 0, a bad argument exits 2
    init_tracing();
    cli.run(shutdown_signal())
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
