//! Which stored readings still lack rollups: those stored before migration 4 created the
//! rollup tables (an upgraded installation, an adopted legacy table). The broker fills them in
//! the background (`broker/src/storage/rollup_backfill.rs`), newest day first, and shrinks the
//! span as it goes; the row is gone once they are done. Before this, an operator had to run
//! `co2-broker rollups rebuild` over the whole history after upgrading, or the dashboard showed
//! nothing before the upgrade for ranges over a day.
//!
//! `rollup_backfill` holds at most one row (`id` = 1): the measured times `[readings_from,
//! readings_to)` whose rollups are still to be computed. `readings_from` is the oldest reading;
//! `readings_to` is when migration 4 was applied (readings stored since then have rollups).

use chrono::{DateTime, NaiveDateTime};
use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, Statement};

use crate::m20261124_000001_readings::{mysql_table_options, timestamp_ms};
use crate::m20261202_000005_partitions::oldest;

#[derive(DeriveIden)]
enum RollupBackfill {
    Table,
    Id,
    ReadingsFrom,
    ReadingsTo,
}

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261202_000006_rollup_backfill"
    }
}

/// When migration 4 (the rollup tables) was applied; `None` if it is not recorded.
async fn rollups_created(db: &SchemaManagerConnection<'_>) -> Result<Option<NaiveDateTime>, DbErr> {
    let backend = db.get_database_backend();
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            "SELECT applied_at FROM seaql_migrations WHERE version = ?",
            ["m20261202_000004_rollups".into()],
        ))
        .await?;
    Ok(match row {
        Some(row) => {
            let seconds: i64 = row.try_get("", "applied_at")?;
            DateTime::from_timestamp(seconds, 0).map(|t| t.naive_utc())
        }
        None => None,
    })
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let backend = manager.get_database_backend();
        let mut table = Table::create();
        table
            .table(RollupBackfill::Table)
            .col(
                ColumnDef::new(RollupBackfill::Id)
                    .integer()
                    .not_null()
                    .primary_key(),
            )
            .col(
                timestamp_ms(&mut ColumnDef::new(RollupBackfill::ReadingsFrom), backend).not_null(),
            )
            .col(timestamp_ms(&mut ColumnDef::new(RollupBackfill::ReadingsTo), backend).not_null());
        mysql_table_options(&mut table, backend);
        manager.create_table(table).await?;

        let db = manager.get_connection();
        let Some(from) = oldest(db, "co2_emissions", "date_time").await? else {
            return Ok(()); // no readings: nothing to fill
        };
        let to = rollups_created(db)
            .await?
            .unwrap_or_else(|| chrono::Utc::now().naive_utc());
        if from >= to {
            return Ok(());
        }
        db.execute_raw(Statement::from_sql_and_values(
            backend,
            "INSERT INTO rollup_backfill (id, readings_from, readings_to) VALUES (1, ?, ?)",
            [from.into(), to.into()],
        ))
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(RollupBackfill::Table).to_owned())
            .await
    }
}
