//! The schema of the co2 readings database, one migration per file, in order.
//!
//! The broker applies these at start (unless told not to); `cargo run -p migration --
//! up|down|status` (from a source checkout, [`cli`]) and `co2-broker migrate up|down|status`
//! (an installed broker) apply them by hand, both through [`runner`], on the database the broker's settings
//! name ([`database_url::resolve`]). Both MySQL/MariaDB (production) and SQLite (embedded
//! default) are supported by every migration.
//!
//! Being the lowest crate of the workspace, it also holds what the broker and this CLI must
//! agree on: which configuration is read ([`config_source`]) and which database it names
//! ([`database_url`]).

pub use sea_orm_migration::prelude::*;

pub mod cli;
pub mod config_source;
pub mod database_url;
pub mod partitions;
pub mod runner;

mod m20261124_000001_readings;
mod m20261124_000002_last_seen_index;
mod m20261130_000003_devices;
mod m20261202_000004_rollups;
mod m20261202_000005_partitions;
mod m20261202_000006_rollup_backfill;

pub use config_source::ConfigSource;
pub use database_url::DatabaseUrl;
pub use m20261124_000001_readings::{LEGACY_BACKUP_TABLE, LEGACY_DEVICE_ID};
pub use m20261202_000004_rollups::ROLLUP_TABLES;
pub use m20261202_000005_partitions::NO_TIME_REASON;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261124_000001_readings::Migration),
            Box::new(m20261124_000002_last_seen_index::Migration),
            Box::new(m20261130_000003_devices::Migration),
            Box::new(m20261202_000004_rollups::Migration),
            Box::new(m20261202_000005_partitions::Migration),
            Box::new(m20261202_000006_rollup_backfill::Migration),
        ]
    }
}
