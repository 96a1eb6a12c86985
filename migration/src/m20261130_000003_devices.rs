//! Fewer indexes on the readings table, and a `devices` table for "when did each device last
//! report".
//!
//! Every secondary index costs the database about 1.5 µs of CPU per stored reading (measured
//! with 300,000-row INSERT runs on MariaDB 10.11: 10.0 µs per row with the four indexes of
//! migrations 1 and 2, 7.0 µs with the two this migration leaves), and ingest speed is bound by
//! that CPU. So:
//!
//! - The identity `(device_id, dedup_key)` and the per-device time index `(device_id,
//!   date_time)` become one unique index `(device_id, date_time, dedup_key)`. It is the same
//!   identity: a dedup key made from the measured time (`t<ms>...`) already fixes `date_time`,
//!   and the other kind (`r<boot>.<n>`) is unique on its own. Per-device time ranges read its
//!   prefix exactly as they read the old index.
//! - `(device_id, received_at)` (migration 2) served only "last seen per device". That now lives
//!   in `devices`, one row per device, which the broker keeps current (to within a few seconds)
//!   with the batches it stores. The silent-device alert reads a table with one row per device
//!   instead of an index with one entry per reading. It is filled here from the readings
//!   already stored.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::ConnectionTrait;

use crate::m20261124_000001_readings::{mysql_table_options, timestamp_ms};

#[derive(DeriveIden)]
enum Devices {
    Table,
    DeviceId,
    FirstSeen,
    LastSeen,
}

#[derive(DeriveIden, Clone, Copy)]
enum Co2Emissions {
    Table,
    DeviceId,
    DateTime,
    ReceivedAt,
    DedupKey,
}

const IDENTITY: &str = "ux_co2_emissions_device_time_identity";
const OLD_IDENTITY: &str = "ux_co2_emissions_identity";
const OLD_DEVICE_TIME: &str = "ix_co2_emissions_device_time";
const OLD_DEVICE_RECEIVED: &str = "ix_co2_emissions_device_received";

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261130_000003_devices"
    }
}

fn index(name: &str, columns: &[Co2Emissions], unique: bool) -> IndexCreateStatement {
    let mut index = Index::create();
    index.name(name).table(Co2Emissions::Table);
    for column in columns {
        index.col(*column);
    }
    if unique {
        index.unique();
    }
    index
}

fn drop_index(name: &str) -> IndexDropStatement {
    Index::drop()
        .name(name)
        .table(Co2Emissions::Table)
        .to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let mut devices = Table::create();
        devices
            .table(Devices::Table)
            .col(
                ColumnDef::new(Devices::DeviceId)
                    .string_len(64)
                    .not_null()
                    .primary_key(),
            )
            .col(timestamp_ms(&mut ColumnDef::new(Devices::FirstSeen), backend).not_null())
            .col(timestamp_ms(&mut ColumnDef::new(Devices::LastSeen), backend).not_null());
        mysql_table_options(&mut devices, backend);
        manager.create_table(devices).await?;
        // Filled while the old (device_id, received_at) index still makes this a loose scan.
        manager
            .get_connection()
            .execute_unprepared(
                "INSERT INTO devices (device_id, first_seen, last_seen) \
                 SELECT device_id, MIN(received_at), MAX(received_at) FROM co2_emissions \
                 GROUP BY device_id",
            )
            .await?;

        // The new identity first: the table is never without one. Every stored row satisfies
        // it, since it extends the old unique key by a column.
        manager
            .create_index(index(
                IDENTITY,
                &[
                    Co2Emissions::DeviceId,
                    Co2Emissions::DateTime,
                    Co2Emissions::DedupKey,
                ],
                true,
            ))
            .await?;
        for old in [OLD_IDENTITY, OLD_DEVICE_TIME, OLD_DEVICE_RECEIVED] {
            manager.drop_index(drop_index(old)).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use Co2Emissions::{DateTime, DedupKey, DeviceId, ReceivedAt};
        let old: [(&str, &[Co2Emissions], bool); 3] = [
            (OLD_IDENTITY, &[DeviceId, DedupKey], true),
            (OLD_DEVICE_TIME, &[DeviceId, DateTime], false),
            (OLD_DEVICE_RECEIVED, &[DeviceId, ReceivedAt], false),
        ];
        for (name, columns, unique) in old {
            manager.create_index(index(name, columns, unique)).await?;
        }
        manager.drop_index(drop_index(IDENTITY)).await?;
        manager
            .drop_table(Table::drop().table(Devices::Table).to_owned())
            .await
    }
}
