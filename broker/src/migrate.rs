//! `co2-broker migrate up|down|status`: the schema by hand, on the database the broker's own
//! settings name, so the two cannot disagree about which database they mean. The broker
//! applies pending migrations at start anyway (unless `co2.run_migrations = false`); this is
//! for rolling schema changes out, or back, deliberately.

use anyhow::Context;
use migration::{Migrator, MigratorTrait};

use crate::settings::DatabaseUrl;
use crate::storage::Database;

/// `co2-broker migrate …`: the arguments after `migrate`.
#[derive(Debug, clap::Args)]
#[command(about = "Apply or revert database migrations by hand, on the configured database")]
pub struct MigrateArgs {
    #[command(subcommand)]
    pub action: MigrateAction,
}

#[derive(Debug, PartialEq, Eq, clap::Subcommand)]
pub enum MigrateAction {
    /// Apply pending migrations: all of them, or the next N.
    Up {
        #[arg(long, value_name = "N")]
        steps: Option<u32>,
    },
    /// Revert applied migrations, newest first: one, or the last N.
    Down {
        #[arg(long, value_name = "N", default_value_t = 1)]
        steps: u32,
    },
    /// List every migration and whether it is applied.
    Status,
}

/// Runs `action` on `url`; returns what to print: every migration with its status afterwards.
pub async fn run(action: &MigrateAction, url: &DatabaseUrl) -> anyhow::Result<String> {
    let db = Database::connect(url, 1)
        .await
        .with_context(|| format!("cannot use database {url}"))?;
    let conn = db.connection();
    match action {
        MigrateAction::Up { steps } => Migrator::up(conn, *steps)
            .await
            .with_context(|| format!("cannot migrate {url} up"))?,
        MigrateAction::Down { steps } => Migrator::down(conn, Some(*steps))
            .await
            .with_context(|| format!("cannot migrate {url} down"))?,
        MigrateAction::Status => {}
    }
    let migrations = Migrator::get_migration_with_status(conn)
        .await
        .with_context(|| format!("cannot read the migration status of {url}"))?;
    Ok(migrations
        .iter()
        .map(|m| format!("{}\t{}\n", m.name(), m.status()))
        .collect())
}
