//! Time RANGE partitions for the readings and both rollups on MySQL/MariaDB, so retention
//! drops whole partitions and never runs bulk DELETEs (see [`crate::partitions`]). SQLite has
//! no partitions: this migration does nothing there and retention deletes in small batches.
//!
//! MySQL requires every unique key of a partitioned table to contain the partitioning column.
//! The identity `(device_id, date_time, dedup_key)` and the rollups' primary keys already do;
//! the readings' primary key becomes `(id, date_time)` (still clustered in arrival order, `id`
//! stays unique on its own), which needs `date_time NOT NULL`. The broker always writes a
//! time; only rows adopted from a legacy table can lack one. Those rows cannot be drawn or
//! aged out, so they are recorded in `rejected_messages` (reason below) and removed from the
//! readings; the legacy backup table still holds them as they were.
//!
//! The layout made here: `p_start` for everything older than 24 months (or than the oldest
//! row's month), one partition per month up to the current one, one up to tomorrow, and
//! `p_future`. The broker adds partitions ahead from there, daily or monthly as its retention
//! settings call for, and drops expired ones.
//!
//! Cost: the ALTERs copy each table once (InnoDB rebuilds a table to partition it), during
//! which writes to it wait; README "Retention" has the measured time per million rows. Edge
//! agents keep their readings meanwhile.

use chrono::{Months, NaiveDateTime, NaiveTime, TimeDelta, Utc};
use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend, Statement};

use crate::partitions::{
    future_clause, month_start, partition_clause, Width, FUTURE_PARTITION, PARTITIONED_TABLES,
    READINGS,
};

/// How far back monthly partitions reach at upgrade; older rows share `p_start`.
const MONTHS_BACK: u32 = 24;

/// The reason recorded for adopted rows without a time.
pub const NO_TIME_REASON: &str =
    "adopted legacy row without date_time: cannot be partitioned or drawn (migration 5)";

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261202_000005_partitions"
    }
}

/// The bounds of the dated partitions for a table whose oldest row is at `oldest`, as of `now`.
fn initial_bounds(oldest: Option<NaiveDateTime>, now: NaiveDateTime) -> Vec<NaiveDateTime> {
    let this_month = month_start(now.date()).and_time(NaiveTime::MIN);
    let floor = this_month - Months::new(MONTHS_BACK);
    let mut bound = oldest.map_or(this_month, |t| {
        Ord::max(month_start(t.date()).and_time(NaiveTime::MIN), floor)
    });
    let mut bounds = Vec::new();
    while bound <= this_month {
        bounds.push(bound);
        bound = Width::Month.next_bound(bound);
    }
    let tomorrow = (now.date() + TimeDelta::days(1)).and_time(NaiveTime::MIN);
    if bounds.last() != Some(&tomorrow) {
        bounds.push(tomorrow);
    }
    bounds
}

/// `PARTITION BY RANGE COLUMNS(column) (...)` for `bounds`.
fn partition_by(column: &str, bounds: &[NaiveDateTime]) -> String {
    let mut clauses = Vec::with_capacity(bounds.len() + 1);
    let mut start = None;
    for &bound in bounds {
        clauses.push(partition_clause(start, bound));
        start = Some(bound);
    }
    clauses.push(future_clause(FUTURE_PARTITION));
    format!(
        "PARTITION BY RANGE COLUMNS({column}) ({})",
        clauses.join(", ")
    )
}

/// The oldest time in `table`, found with one primary-key or identity probe per device of
/// `devices` (a plain MIN would scan the whole table: no index starts with the time column).
pub(crate) async fn oldest(
    db: &SchemaManagerConnection<'_>,
    table: &str,
    column: &str,
) -> Result<Option<NaiveDateTime>, DbErr> {
    // ORDER BY … LIMIT 1, not MIN(): in a dependent subquery MariaDB reads every row of the
    // device for a MIN, but only the first index entry for this.
    let sql = format!(
        "SELECT MIN(oldest) AS oldest FROM (SELECT (SELECT t.{column} FROM {table} t \
         WHERE t.device_id = d.device_id AND t.{column} IS NOT NULL \
         ORDER BY t.{column} LIMIT 1) AS oldest FROM devices d) per_device"
    );
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await?;
    Ok(match row {
        Some(row) => row.try_get::<Option<NaiveDateTime>>("", "oldest")?,
        None => None,
    })
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::MySql {
            return Ok(());
        }
        let db = manager.get_connection();
        db.execute_unprepared(&format!(
            "INSERT INTO rejected_messages (received_at, topic, payload, payload_bytes, reason) \
             SELECT received_at, topic, CONCAT('|', COALESCE(emissions, '')), \
             CHAR_LENGTH(CONCAT('|', COALESCE(emissions, ''))), '{NO_TIME_REASON}' \
             FROM co2_emissions WHERE date_time IS NULL"
        ))
        .await?;
        db.execute_unprepared("DELETE FROM co2_emissions WHERE date_time IS NULL")
            .await?;

        let now = Utc::now().naive_utc();
        for table in PARTITIONED_TABLES {
            let bounds = initial_bounds(oldest(db, table.name, table.time_column).await?, now);
            let change_keys = if table == READINGS {
                "MODIFY date_time DATETIME(3) NOT NULL, DROP PRIMARY KEY, \
                 ADD PRIMARY KEY (id, date_time) "
            } else {
                ""
            };
            db.execute_unprepared(&format!(
                "ALTER TABLE {} {change_keys}{}",
                table.name,
                partition_by(table.time_column, &bounds)
            ))
            .await?;
        }
        Ok(())
    }

    /// Removes the partitions and restores the readings' primary key. Rows moved to
    /// `rejected_messages` by `up` stay there.
    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::MySql {
            return Ok(());
        }
        let db = manager.get_connection();
        for table in PARTITIONED_TABLES {
            db.execute_unprepared(&format!("ALTER TABLE {} REMOVE PARTITIONING", table.name))
                .await?;
        }
        db.execute_unprepared(
            "ALTER TABLE co2_emissions DROP PRIMARY KEY, ADD PRIMARY KEY (id), \
             MODIFY date_time DATETIME(3) NULL",
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap()
    }

    #[test]
    fn an_empty_table_gets_this_month_and_today() {
        let bounds = initial_bounds(None, at("2026-12-02 11:00:00"));
        assert_eq!(
            bounds,
            [at("2026-12-01 00:00:00"), at("2026-12-03 00:00:00")]
        );
        let sql = partition_by("date_time", &bounds);
        assert_eq!(
            sql,
            "PARTITION BY RANGE COLUMNS(date_time) (\
             PARTITION p_start VALUES LESS THAN ('2026-12-01 00:00:00'), \
             PARTITION p20261201 VALUES LESS THAN ('2026-12-03 00:00:00'), \
             PARTITION p_future VALUES LESS THAN (MAXVALUE))"
        );
    }

    #[test]
    fn old_data_gets_monthly_partitions_for_two_years_at_most() {
        let bounds = initial_bounds(Some(at("2026-10-13 22:43:23")), at("2026-12-31 08:00:00"));
        assert_eq!(
            bounds,
            [
                at("2026-10-01 00:00:00"),
                at("2026-11-01 00:00:00"),
                at("2026-12-01 00:00:00"),
                at("2027-01-01 00:00:00"),
            ]
        );
        let bounds = initial_bounds(Some(at("2020-07-13 22:43:23")), at("2026-12-02 08:00:00"));
        assert_eq!(bounds.first(), Some(&at("2024-12-01 00:00:00")));
        assert_eq!(bounds.len(), 26);
    }
}
