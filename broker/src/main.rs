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
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
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
