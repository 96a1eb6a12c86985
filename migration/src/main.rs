//! `cargo run -p migration -- up|down|status [--steps N] [--config PATH]`; see
//! [`migration::cli`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    migration::cli::Cli::parse().run()
}
