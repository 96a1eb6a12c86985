//! The schema of the co2 readings database, one migration per file, in order.
//!
//! The broker applies these at start (unless told not to); `co2-broker migrate up|down|status`
//! applies them by hand, on the database the broker's settings name (`co2.database_url`, or
//! the file `co2.database_url_file` names, each overridable by `CO2_DATABASE_URL` /
//! `CO2_DATABASE_URL_FILE`). Both MySQL/MariaDB (production) and SQLite (embedded default)
//! are supported by every migration.

pub use sea_orm_migration::prelude::*;

mod m20261124_000001_readings;
mod m20261124_000002_last_seen_index;
mod m20261130_000003_devices;

pub use m20261124_000001_readings::{LEGACY_BACKUP_TABLE, LEGACY_DEVICE_ID};

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261124_000001_readings::Migration),
            Box::new(m20261124_000002_last_seen_index::Migration),
            Box::new(m20261130_000003_devices::Migration),
        ]
    }
}
