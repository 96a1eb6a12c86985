//! Per-minute and per-hour rollups of the readings, so dashboards over months and years read a
//! few thousand rows instead of millions.
//!
//! One row per device and bucket. Each keeps the count and the sum of the CO2 values (not their
//! average: averages of averages are wrong when buckets hold different numbers of readings,
//! while `SUM(emissions_sum) / SUM(readings)` is exact over any span), their minimum and
//! maximum, and the measured times of the first and last reading in the bucket. `bucket_start`
//! is the start of the minute or hour, UTC like every stored time.
//!
//! The broker keeps both tables current in the transaction that stores a batch
//! (`broker/src/storage/rollups.rs`); `co2-broker rollups rebuild` recomputes them from the
//! readings for a time range. This migration creates them empty: readings stored before it
//! (an adopted legacy table, an upgraded installation) get their rollups from that command.
//!
//! `device_id` has the readings table's type and collation (`VARCHAR(64)`, `utf8mb4_bin`) so
//! rollups and readings join and compare alike.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

use crate::m20261124_000001_readings::{mysql_table_options, timestamp_ms};

/// The rollup tables, finest first.
pub const ROLLUP_TABLES: [&str; 2] = ["co2_rollup_minute", "co2_rollup_hour"];

#[derive(DeriveIden)]
enum Rollup {
    DeviceId,
    BucketStart,
    Readings,
    EmissionsSum,
    EmissionsMin,
    EmissionsMax,
    FirstTime,
    LastTime,
}

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261202_000004_rollups"
    }
}

fn rollup_table(name: &str, backend: DbBackend) -> TableCreateStatement {
    let mut table = Table::create();
    table
        .table(Alias::new(name))
        .col(ColumnDef::new(Rollup::DeviceId).string_len(64).not_null())
        // Whole minutes or hours: no fractional seconds needed.
        .col(ColumnDef::new(Rollup::BucketStart).date_time().not_null())
        .col(ColumnDef::new(Rollup::Readings).big_integer().not_null())
        .col(ColumnDef::new(Rollup::EmissionsSum).double().not_null())
        .col(ColumnDef::new(Rollup::EmissionsMin).double().not_null())
        .col(ColumnDef::new(Rollup::EmissionsMax).double().not_null())
        .col(timestamp_ms(&mut ColumnDef::new(Rollup::FirstTime), backend).not_null())
        .col(timestamp_ms(&mut ColumnDef::new(Rollup::LastTime), backend).not_null())
        // The primary key is the only index: per-device time ranges read its prefix, and
        // InnoDB clusters the rows of one device and period together.
        .primary_key(
            Index::create()
                .name(format!("pk_{name}"))
                .col(Rollup::DeviceId)
                .col(Rollup::BucketStart),
        );
    mysql_table_options(&mut table, backend);
    table
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        for name in ROLLUP_TABLES {
            manager.create_table(rollup_table(name, backend)).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for name in ROLLUP_TABLES.iter().rev() {
            manager
                .drop_table(Table::drop().table(Alias::new(*name)).to_owned())
                .await?;
        }
        Ok(())
    }
}
