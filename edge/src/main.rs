//! co2-edge binary: parse arguments, load the config, set up logging, run. Nothing else.

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use co2_edge::{agent, cli, config};

fn main() -> anyhow::Result<()> {
    // `--help` and `--version` exit 0 here, wrong arguments 2.
    let args = cli::Args::parse();
    let config_file = args.config_file();
    let settings =
        config::load(config_file.as_deref(), &args.overrides()).with_context(
            || match &config_file {
                Some(path) => format!("loading config {}", path.display()),
                None => "loading config (no file; defaults and environment)".to_string(),
            },
        )?;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.raw.log))
        .context("config key `log`")?;
    // Colours only on a terminal: journald and log files get plain text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    if args.once {
        let deadline = std::time::Duration::from_secs(15);
        println!("{}", agent::read_once(&settings, deadline)?);
        return Ok(());
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(agent::run(settings, shutdown_signal()))
}

/// SIGINT or SIGTERM (systemd's stop), whichever comes first.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot listen for SIGTERM: {e}; only Ctrl-C stops the agent");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}
