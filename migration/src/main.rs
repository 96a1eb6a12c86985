//! `cargo run -p migration -- up|down|status|fresh [--steps N]`
//!
//! Reads the database URL from the same place as the broker: `CO2_DATABASE_URL`, else
//! `[co2].database_url` in the config file (`CO2_CONFIG`, default `rumqttd.toml`), else the
//! embedded SQLite default.

use anyhow::{bail, Context};
use migration::{Migrator, MigratorTrait};
use sea_orm_migration::sea_orm::Database;

const USAGE: &str = "usage: migration <up|down|status|fresh> [--steps N]";

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let command = args.next().context(USAGE)?;
    let steps = match (args.next().as_deref(), args.next()) {
        (None, _) => None,
        (Some("--steps"), Some(n)) => Some(n.parse().context("--steps takes a number")?),
        _ => bail!(USAGE),
    };
    let url = migration::database_url::resolve().context("cannot read the database URL")?;
    if let Some(dir) = migration::database_url::sqlite_parent_dir(&url) {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let db = Database::connect(&url).await.with_context(|| {
        format!(
            "cannot connect to {}",
            migration::database_url::masked(&url)
        )
    })?;
    match command.as_str() {
        "up" => Migrator::up(&db, steps).await?,
        "down" => Migrator::down(&db, steps.or(Some(1))).await?,
        "fresh" => Migrator::fresh(&db).await?,
        "status" => {
            for m in Migrator::get_migration_with_status(&db).await? {
                println!("{}\t{}", m.name(), m.status());
            }
        }
        _ => bail!(USAGE),
    }
    Ok(())
}
