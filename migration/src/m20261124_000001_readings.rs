//! Readings and rejections; adopts the seed's two-column `co2_emissions` without losing a row.
//!
//! The seed wrote `co2_emissions(date_time DATETIME, emissions DOUBLE(7,2))` and dashboards read
//! exactly those two columns, so the readings table keeps that name and those columns and adds
//! what a fleet needs: which device, which topic, when it arrived, the agent's sequence number,
//! and an identity that makes redelivered readings land once.
//!
//! Adopting a legacy table: it is renamed to [`LEGACY_BACKUP_TABLE`], the new table is created,
//! and every old row is copied over with device [`LEGACY_DEVICE_ID`] and no identity (a NULL
//! `dedup_key` never collides). The renamed original stays untouched as a backup for the operator
//! to drop once satisfied. `emissions` becomes a plain DOUBLE: `DOUBLE(7,2)` silently clipped
//! values above 99999.99 in the seed, and two decimals are all a CO2 sensor has anyway.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

/// Where a legacy `co2_emissions` table is kept after its rows are copied.
pub const LEGACY_BACKUP_TABLE: &str = "co2_emissions_legacy";
/// The device id given to rows adopted from a legacy table, which never recorded one.
pub const LEGACY_DEVICE_ID: &str = "legacy";

#[derive(DeriveIden)]
enum Co2Emissions {
    Table,
    Id,
    DateTime,
    Emissions,
    DeviceId,
    Topic,
    ReceivedAt,
    Seq,
    Temperature,
    Humidity,
    DedupKey,
}

#[derive(DeriveIden)]
enum RejectedMessages {
    Table,
    Id,
    ReceivedAt,
    Topic,
    Payload,
    PayloadBytes,
    Reason,
}

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261124_000001_readings"
    }
}

/// Millisecond timestamps: JSON readings carry milliseconds and MySQL's plain DATETIME would
/// drop them. Stored values are always UTC.
pub(crate) fn timestamp_ms(col: &mut ColumnDef, backend: DbBackend) -> &mut ColumnDef {
    match backend {
        DbBackend::MySql => col.custom(Alias::new("DATETIME(3)")),
        _ => col.date_time(),
    }
}

/// utf8mb4 with a binary collation: device ids and topics are case-sensitive in MQTT, so
/// `Pi-1` and `pi-1` must not collide in the unique key.
pub(crate) fn mysql_table_options(table: &mut TableCreateStatement, backend: DbBackend) {
    if backend == DbBackend::MySql {
        table
            .engine("InnoDB")
            .character_set("utf8mb4")
            .collate("utf8mb4_bin");
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let legacy = manager.has_table("co2_emissions").await?
            && !manager.has_column("co2_emissions", "device_id").await?;
        if legacy {
            if manager.has_table(LEGACY_BACKUP_TABLE).await? {
                return Err(DbErr::Migration(format!(
                    "cannot adopt the legacy co2_emissions table: {LEGACY_BACKUP_TABLE} already exists; \
                     rename or drop it first"
                )));
            }
            manager
                .rename_table(
                    Table::rename()
                        .table(Co2Emissions::Table, Alias::new(LEGACY_BACKUP_TABLE))
                        .to_owned(),
                )
                .await?;
        }

        let mut readings = Table::create();
        readings
            .table(Co2Emissions::Table)
            .col(
                ColumnDef::new(Co2Emissions::Id)
                    .big_integer()
                    .not_null()
                    .auto_increment()
                    .primary_key(),
            )
            // Nullable like the seed's columns, so every adopted row fits; the broker always
            // sets both.
            .col(timestamp_ms(&mut ColumnDef::new(Co2Emissions::DateTime), backend).null())
            .col(ColumnDef::new(Co2Emissions::Emissions).double().null())
            .col(
                ColumnDef::new(Co2Emissions::DeviceId)
                    .string_len(64)
                    .not_null(),
            )
            .col(
                ColumnDef::new(Co2Emissions::Topic)
                    .string_len(255)
                    .not_null(),
            )
            .col(timestamp_ms(&mut ColumnDef::new(Co2Emissions::ReceivedAt), backend).not_null())
            .col(ColumnDef::new(Co2Emissions::Seq).big_integer().null())
            .col(ColumnDef::new(Co2Emissions::Temperature).double().null())
            .col(ColumnDef::new(Co2Emissions::Humidity).double().null())
            .col(ColumnDef::new(Co2Emissions::DedupKey).string_len(48).null());
        mysql_table_options(&mut readings, backend);
        manager.create_table(readings).await?;

        let indexes = [
            (
                "ux_co2_emissions_identity",
                vec![Co2Emissions::DeviceId, Co2Emissions::DedupKey],
                true,
            ),
            (
                "ix_co2_emissions_date_time",
                vec![Co2Emissions::DateTime],
                false,
            ),
            (
                "ix_co2_emissions_device_time",
                vec![Co2Emissions::DeviceId, Co2Emissions::DateTime],
                false,
            ),
        ];
        for (name, columns, unique) in indexes {
            let mut index = Index::create();
            index.name(name).table(Co2Emissions::Table);
            for column in columns {
                index.col(column);
            }
            if unique {
                index.unique();
            }
            manager.create_index(index).await?;
        }

        if legacy {
            let copy = format!(
                "INSERT INTO co2_emissions (date_time, emissions, device_id, topic, received_at) \
                 SELECT date_time, emissions, '{LEGACY_DEVICE_ID}', '', COALESCE(date_time, {now}) \
                 FROM {LEGACY_BACKUP_TABLE}",
                now = match backend {
                    DbBackend::Sqlite => "CURRENT_TIMESTAMP",
                    _ => "UTC_TIMESTAMP(3)",
                }
            );
            manager.get_connection().execute_unprepared(&copy).await?;
        }

        let mut rejected = Table::create();
        rejected
            .table(RejectedMessages::Table)
            .col(
                ColumnDef::new(RejectedMessages::Id)
                    .big_integer()
                    .not_null()
                    .auto_increment()
                    .primary_key(),
            )
            .col(
                timestamp_ms(&mut ColumnDef::new(RejectedMessages::ReceivedAt), backend).not_null(),
            )
            .col(
                ColumnDef::new(RejectedMessages::Topic)
                    .string_len(255)
                    .not_null(),
            )
            .col(ColumnDef::new(RejectedMessages::Payload).text().not_null())
            .col(
                ColumnDef::new(RejectedMessages::PayloadBytes)
                    .integer()
                    .not_null(),
            )
            .col(
                ColumnDef::new(RejectedMessages::Reason)
                    .string_len(255)
                    .not_null(),
            );
        mysql_table_options(&mut rejected, backend);
        manager.create_table(rejected).await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_rejected_messages_received_at")
                    .table(RejectedMessages::Table)
                    .col(RejectedMessages::ReceivedAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(RejectedMessages::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Co2Emissions::Table).to_owned())
            .await?;
        if manager.has_table(LEGACY_BACKUP_TABLE).await? {
            manager
                .rename_table(
                    Table::rename()
                        .table(Alias::new(LEGACY_BACKUP_TABLE), Co2Emissions::Table)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
