//! `up`, `down` and `status` by hand: the one implementation behind both
//! `cargo run -p migration -- …` and `co2-broker migrate …`, so the two take the same
//! arguments and print the same thing. The broker applies pending migrations at start anyway
//! (unless `co2.run_migrations = false`); this is for rolling schema changes out, or back,
//! deliberately.

use std::time::Duration;

use anyhow::Context;
use sea_orm_migration::sea_orm::{ConnectOptions, Database, DatabaseConnection};
use sea_orm_migration::MigratorTrait;

use crate::database_url::DatabaseUrl;
use crate::Migrator;

/// How long to wait for the database server before giving up with an error.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What to do with the schema.
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

/// Runs `action` on `url`; returns what to print: every migration with its status afterwards,
/// one `name<TAB>Applied|Pending` line each.
pub async fn run(action: &MigrateAction, url: &DatabaseUrl) -> anyhow::Result<String> {
    let conn = connect(url)
        .await
        .with_context(|| format!("cannot use database {url}"))?;
    match action {
        MigrateAction::Up { steps } => Migrator::up(&conn, *steps)
            .await
            .with_context(|| format!("cannot migrate {url} up"))?,
        MigrateAction::Down { steps } => Migrator::down(&conn, Some(*steps))
            .await
            .with_context(|| format!("cannot migrate {url} down"))?,
        MigrateAction::Status => {}
    }
    let migrations = Migrator::get_migration_with_status(&conn)
        .await
        .with_context(|| format!("cannot read the migration status of {url}"))?;
    Ok(migrations
        .iter()
        .map(|m| format!("{}\t{}\n", m.name(), m.status()))
        .collect())
}

/// One connection, created SQLite directory included; a server that does not answer is an
/// error after [`CONNECT_TIMEOUT`], not a hang.
async fn connect(url: &DatabaseUrl) -> anyhow::Result<DatabaseConnection> {
    url.create_sqlite_dir()?;
    let mut options = ConnectOptions::new(url.expose());
    options
        .max_connections(1)
        .connect_timeout(CONNECT_TIMEOUT)
        .acquire_timeout(CONNECT_TIMEOUT)
        .sqlx_logging(false);
    Ok(Database::connect(options).await?)
}
