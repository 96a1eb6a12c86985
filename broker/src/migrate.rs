//! `co2-broker migrate up|down|status`: the schema by hand, on the database the broker's own
//! settings name, so the two cannot disagree about which database they mean. The runner is
//! the migration crate's ([`migration::runner`]), the same as `cargo run -p migration -- …`:
//! same subcommands, same output.

pub use migration::runner::{run, MigrateAction};

/// `co2-broker migrate …`: the arguments after `migrate`.
#[derive(Debug, clap::Args)]
#[command(about = "Apply or revert database migrations by hand, on the configured database")]
pub struct MigrateArgs {
    #[command(subcommand)]
    pub action: MigrateAction,
}
