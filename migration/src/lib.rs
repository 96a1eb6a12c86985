//! The schema of the co2 readings database, one migration per file, in order.
//!
//! The broker applies these at start (unless told not to) and `cargo run -p migration -- up`
//! applies them by hand. Both MySQL/MariaDB (production) and SQLite (embedded default) are
//! supported by every migration.

pub use sea_orm_migration::prelude::*;

pub mod database_url;
mod m20261124_000001_readings;
mod m20261124_000002_last_seen_index;
mod m20261130_000003_devices;
mod m20261202_000004_rollups;

pub use m20261124_000001_readings::{LEGACY_BACKUP_TABLE, LEGACY_DEVICE_ID};
pub use m20261202_000004_rollups::ROLLUP_TABLES;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261124_000001_readings::Migration),
            Box::new(m20261124_000002_last_seen_index::Migration),
            Box::new(m20261130_000003_devices::Migration),
            Box::new(m20261202_000004_rollups::Migration),
        ]
    }
}
