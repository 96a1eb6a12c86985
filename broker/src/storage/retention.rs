//! Retention: how long raw readings and rollups are kept, and the partition upkeep behind it.
//!
//! On MySQL/MariaDB the readings and both rollups are partitioned by time (migration 5,
//! [`migration::partitions`]). Every round, for each table, the broker
//! - adds partitions ahead of the clock, so `p_future` (the `MAXVALUE` safety net) stays empty
//!   and turning retention on later never has to split a big partition;
//! - drops the partitions whose every row is older than the table's retention: a partition
//!   `[start, bound)` goes once `bound <= now - retention`. Rows in a partition that straddles
//!   the cutoff stay until all of it has expired, so nothing newer than the retention is ever
//!   touched, and a table keeps at most one partition's width (a day, or a month for long or
//!   no retention) beyond it.
//!
//! SQLite, or a MySQL table that is not partitioned (migration 5 rolled back), gets bounded
//! deletes instead: per device, through the index that starts with `(device_id, time)`, at most
//! [`RetentionPolicy::delete_batch`] rows per statement with a pause between statements, so the
//! writer's batches are never held up for long.
//!
//! Only the three tables of [`migration::partitions::PARTITIONED_TABLES`] are touched. The
//! legacy backup table, `rejected_messages` and `devices` never are.

use std::time::Duration;

use chrono::{NaiveDateTime, NaiveTime, TimeDelta, Utc};
use migration::partitions::{
    future_clause, parse_bound, partition_clause, partition_name, PartitionedTable, Width,
    HOUR_ROLLUPS, MINUTE_ROLLUPS, READINGS,
};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement, TransactionTrait, Value,
};
use tokio_util::sync::CancellationToken;

use super::database::{is_conflict, is_unreachable};
use super::rollups::Level;
use crate::metrics::IngestMetrics;
use crate::settings::IngestSettings;

/// Retention of up to this many days gets daily partitions (at most a day kept beyond it);
/// longer or no retention gets monthly ones (a dozen files a year instead of 365).
const DAILY_PARTITIONS_UP_TO_DAYS: u32 = 62;
/// Partitions always reach at least this far ahead of the clock, beyond the accepted future
/// skew of readings.
const MIN_AHEAD: TimeDelta = TimeDelta::days(2);
/// Time between rounds, and after a round that failed (a dashboard query holding the table,
/// the database away).
const ROUND_INTERVAL: Duration = Duration::from_secs(3600);
const RETRY_INTERVAL: Duration = Duration::from_secs(300);
/// Partition changes wait at most this long for the table's metadata lock. Inserts queue
/// behind a waiting ALTER, so it must stay well below the writer's `db_write_timeout_ms`; a
/// change that gives up is tried again at the next round.
const LOCK_WAIT_SECONDS: u32 = 1;
/// Times a partition change is planned again after the layout changed under it.
const LAYOUT_RACE_RETRIES: u32 = 3;
/// Rows per bounded DELETE, and the pause between two of them.
const DELETE_BATCH: u64 = 5_000;
const DELETE_PAUSE: Duration = Duration::from_millis(20);

/// How long each table keeps its rows; `None` keeps them forever.
#[derive(Debug, Clone)]
pub struct RetentionPolicy {
    pub tables: [(PartitionedTable, Option<u32>); 3],
    /// Partitions are added until they cover this far past now.
    pub ahead: TimeDelta,
    /// Rows per DELETE where there are no partitions.
    pub delete_batch: u64,
    pub delete_pause: Duration,
}

impl RetentionPolicy {
    pub fn from_settings(settings: &IngestSettings) -> Self {
        let days = |d: u32| (d > 0).then_some(d);
        let skew = TimeDelta::milliseconds(settings.max_future_skew_ms as i64);
        Self {
            tables: [
                (READINGS, days(settings.raw_retention_days)),
                (MINUTE_ROLLUPS, days(settings.minute_rollup_retention_days)),
                (HOUR_ROLLUPS, days(settings.hour_rollup_retention_days)),
            ],
            ahead: MIN_AHEAD + skew,
            delete_batch: DELETE_BATCH,
            delete_pause: DELETE_PAUSE,
        }
    }
}

/// The oldest time whose rows `retention_days` guarantees are still there at `now`.
pub fn horizon(now: NaiveDateTime, retention_days: u32) -> NaiveDateTime {
    now - TimeDelta::days(retention_days.into())
}

/// The first whole hour whose raw readings `raw_retention_days` (0: forever) still keeps at
/// `now`: rollups can be rebuilt from there on (a rebuild widens its range to whole hours).
/// Before it, the rollups may be all that is left of the readings. `None`: no limit.
pub fn first_rebuildable_hour(
    now: NaiveDateTime,
    raw_retention_days: u32,
) -> Option<NaiveDateTime> {
    (raw_retention_days > 0).then(|| {
        let horizon = horizon(now, raw_retention_days);
        let hour = Level::Hour.bucket(horizon);
        if hour < horizon {
            hour + Level::Hour.width()
        } else {
            hour
        }
    })
}

fn width(retention_days: Option<u32>) -> Width {
    match retention_days {
        Some(days) if days <= DAILY_PARTITIONS_UP_TO_DAYS => Width::Day,
        _ => Width::Month,
    }
}

/// What one round did to one table.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TableReport {
    pub added: Vec<String>,
    pub dropped: Vec<String>,
    pub deleted_rows: u64,
}

/// One partition as `information_schema.PARTITIONS` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    /// `VALUES LESS THAN`; `None` for `MAXVALUE`.
    pub bound: Option<NaiveDateTime>,
}

/// The partitions of `table` in order, empty when it is not partitioned.
pub async fn partitions(
    db: &impl ConnectionTrait,
    table: PartitionedTable,
) -> Result<Vec<Partition>, DbErr> {
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::MySql,
            "SELECT PARTITION_NAME AS name, PARTITION_DESCRIPTION AS bound \
             FROM information_schema.PARTITIONS \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND PARTITION_NAME IS NOT NULL \
             ORDER BY PARTITION_ORDINAL_POSITION",
            [table.name.into()],
        ))
        .await?;
    rows.iter()
        .map(|row| {
            let name: String = row.try_get("", "name")?;
            let bound: String = row.try_get("", "bound")?;
            let bound = parse_bound(&bound)
                .map_err(|e| DbErr::Custom(format!("{} partition {name}: {e}", table.name)))?;
            Ok(Partition { name, bound })
        })
        .collect()
}

/// One round over every table of `policy` as of `now`. A table that fails does not keep the
/// others from their round; the first error is returned after all were tried.
pub async fn maintain(
    db: &DatabaseConnection,
    policy: &RetentionPolicy,
    now: NaiveDateTime,
) -> Result<Vec<(PartitionedTable, TableReport)>, DbErr> {
    let mut reports = Vec::new();
    let mut first_error = None;
    for (table, days) in policy.tables {
        let outcome = match db.get_database_backend() {
            DbBackend::MySql => maintain_mysql(db, policy, table, days, now).await,
            _ => delete_expired(db, policy, table, days, now).await,
        };
        match outcome {
            Ok(report) => reports.push((table, report)),
            Err(e) => {
                tracing::warn!(table = table.name, error = %e, "retention round failed for this table");
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(reports),
    }
}

async fn maintain_mysql(
    db: &DatabaseConnection,
    policy: &RetentionPolicy,
    table: PartitionedTable,
    days: Option<u32>,
    now: NaiveDateTime,
) -> Result<TableReport, DbErr> {
    let mut layout = partitions(db, table).await?;
    if layout.is_empty() {
        return delete_expired(db, policy, table, days, now).await;
    }
    // Another broker of the same database (Galera) may change the layout between our read and
    // our ALTER: then the ALTER fails on a name or bound that is gone or now exists (or waits
    // for the other ALTER past the lock wait), and the layout is read again. Each of its (at
    // most two) changes can make ours fail once.
    let mut attempt = 0;
    loop {
        match change_partitions(db, table, &layout, days, now, policy.ahead).await {
            Err(e) if attempt < LAYOUT_RACE_RETRIES && !is_unreachable(&e) => {
                attempt += 1;
                tracing::debug!(table = table.name, error = %e, attempt, "partition change refused; reading the layout again");
                // A lock wait means another ALTER (or a long query) holds the table: give it
                // time. A refused name or bound was a change already made: look again now.
                let pause = if is_conflict(&e) {
                    LOCK_WAIT_SECONDS * 1000
                } else {
                    50
                };
                tokio::time::sleep(Duration::from_millis(pause.into()) * attempt).await;
                // Read outside the transaction of `change_partitions`: a read inside it would
                // hold a metadata lock on the table until the end, and another broker's ALTER
                // would wait for it.
                layout = partitions(db, table).await?;
            }
            outcome => return outcome,
        }
    }
}

/// The ALTERs one table with `layout` needs: partitions ahead first (so the table is never
/// without one for the present), then the expired ones dropped. One connection, whose
/// metadata-lock wait is bounded while it runs them.
async fn change_partitions(
    db: &DatabaseConnection,
    table: PartitionedTable,
    layout: &[Partition],
    days: Option<u32>,
    now: NaiveDateTime,
    ahead: TimeDelta,
) -> Result<TableReport, DbErr> {
    let plan = plan(layout, days, now, ahead);
    let report = TableReport {
        added: plan.added(),
        dropped: plan.dropped.clone(),
        deleted_rows: 0,
    };
    let Some(statements) = plan.statements(table) else {
        return Ok(report);
    };
    // A transaction is the way to hold one pooled connection; each ALTER commits on its own.
    let conn = db.begin().await?;
    conn.execute_unprepared(&format!(
        "SET SESSION lock_wait_timeout = {LOCK_WAIT_SECONDS}"
    ))
    .await?;
    let mut outcome = Ok(());
    for statement in statements {
        outcome = conn.execute_unprepared(&statement).await.map(drop);
        if outcome.is_err() {
            break;
        }
    }
    // Back to the server's default before the connection returns to the pool.
    let reset = conn
        .execute_unprepared("SET SESSION lock_wait_timeout = DEFAULT")
        .await;
    conn.commit().await?;
    outcome?;
    reset?;
    if !report.added.is_empty() {
        tracing::info!(table = table.name, partitions = %report.added.join(", "), "partitions added ahead");
    }
    if !report.dropped.is_empty() {
        tracing::info!(
            table = table.name,
            partitions = %report.dropped.join(", "),
            retention_days = days,
            "expired partitions dropped"
        );
    }
    Ok(report)
}

/// What [`plan`] decided for one table.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Partitions to add, in order: `(start, bound)`, no start for the first of the table.
    pub new: Vec<(Option<NaiveDateTime>, NaiveDateTime)>,
    /// The `MAXVALUE` partition the new ones are split from, if the table has one.
    pub future: Option<String>,
    pub dropped: Vec<String>,
}

impl Plan {
    /// The names of the partitions to add.
    pub fn added(&self) -> Vec<String> {
        self.new
            .iter()
            .map(|(start, _)| partition_name(*start))
            .collect()
    }

    /// The ALTERs, partitions ahead first (so the table is never without one for the
    /// present), then the expired ones dropped; `None` when there is nothing to do.
    fn statements(&self, table: PartitionedTable) -> Option<Vec<String>> {
        let mut statements = Vec::new();
        if !self.new.is_empty() {
            let clauses: Vec<String> = self
                .new
                .iter()
                .map(|(start, bound)| partition_clause(*start, *bound))
                .collect();
            let clauses = clauses.join(", ");
            statements.push(match &self.future {
                // Splitting the empty safety net is instant; it keeps its name and MAXVALUE.
                Some(future) => format!(
                    "ALTER TABLE {} REORGANIZE PARTITION {future} INTO ({clauses}, {})",
                    table.name,
                    future_clause(future)
                ),
                None => format!("ALTER TABLE {} ADD PARTITION ({clauses})", table.name),
            });
        }
        if !self.dropped.is_empty() {
            statements.push(format!(
                "ALTER TABLE {} DROP PARTITION {}",
                table.name,
                self.dropped.join(", ")
            ));
        }
        (!statements.is_empty()).then_some(statements)
    }
}

/// The partitions to add and to drop for `layout` at `now`: pure, so the rules are tested
/// without a database.
pub fn plan(layout: &[Partition], days: Option<u32>, now: NaiveDateTime, ahead: TimeDelta) -> Plan {
    let mut plan = Plan {
        future: layout
            .iter()
            .find(|p| p.bound.is_none())
            .map(|p| p.name.clone()),
        ..Plan::default()
    };
    let width = width(days);
    let last = layout.iter().filter_map(|p| p.bound).max();
    let target = now + ahead;
    let mut bound = last.unwrap_or_else(|| now.date().and_time(NaiveTime::MIN));
    if last.is_none() {
        // Only MAXVALUE so far: the first dated partition takes everything before today.
        plan.new.push((None, bound));
    }
    while bound < target {
        let next = width.next_bound(bound);
        plan.new.push((Some(bound), next));
        bound = next;
    }
    if let Some(days) = days {
        let cutoff = horizon(now, days);
        plan.dropped = layout
            .iter()
            .filter(|p| p.bound.is_some_and(|b| b <= cutoff))
            .map(|p| p.name.clone())
            .collect();
    }
    plan
}

/// Bounded deletes of the rows older than `days` (SQLite, or MySQL without partitions).
async fn delete_expired(
    db: &DatabaseConnection,
    policy: &RetentionPolicy,
    table: PartitionedTable,
    days: Option<u32>,
    now: NaiveDateTime,
) -> Result<TableReport, DbErr> {
    let mut report = TableReport::default();
    let Some(days) = days else {
        return Ok(report);
    };
    let cutoff = horizon(now, days);
    let backend = db.get_database_backend();
    let devices: Vec<String> = db
        .query_all_raw(Statement::from_string(
            backend,
            "SELECT device_id FROM devices ORDER BY device_id",
        ))
        .await?
        .iter()
        .map(|row| row.try_get::<String>("", "device_id"))
        .collect::<Result<_, _>>()?;
    let (name, column) = (table.name, table.time_column);
    let sql = match backend {
        DbBackend::MySql => format!(
            "DELETE FROM {name} WHERE device_id = ? AND {column} < ? ORDER BY {column} LIMIT ?"
        ),
        _ => format!(
            "DELETE FROM {name} WHERE rowid IN (SELECT rowid FROM {name} \
             WHERE device_id = ? AND {column} < ? LIMIT ?)"
        ),
    };
    for device in devices {
        loop {
            let values: [Value; 3] = [
                device.as_str().into(),
                cutoff.into(),
                (policy.delete_batch as i64).into(),
            ];
            let deleted = db
                .execute_raw(Statement::from_sql_and_values(backend, &sql, values))
                .await?
                .rows_affected();
            report.deleted_rows += deleted;
            if deleted < policy.delete_batch {
                break;
            }
            tokio::time::sleep(policy.delete_pause).await;
        }
    }
    if report.deleted_rows > 0 {
        tracing::info!(
            table = name,
            rows = report.deleted_rows,
            before = %cutoff,
            retention_days = days,
            "expired rows deleted"
        );
    }
    Ok(report)
}

/// Runs a round at start and then every hour (every five minutes after a failed one) until
/// `stop`.
pub async fn run(
    db: DatabaseConnection,
    policy: RetentionPolicy,
    metrics: std::sync::Arc<IngestMetrics>,
    stop: CancellationToken,
) {
    loop {
        let round = tokio::select! {
            () = stop.cancelled() => return,
            round = maintain(&db, &policy, Utc::now().naive_utc()) => round,
        };
        let pause = match round {
            Ok(reports) => {
                for (_, report) in &reports {
                    IngestMetrics::add(&metrics.retention_partitions_dropped, report.dropped.len());
                    IngestMetrics::add(
                        &metrics.retention_rows_deleted,
                        report.deleted_rows as usize,
                    );
                }
                ROUND_INTERVAL
            }
            Err(e) => {
                IngestMetrics::add(&metrics.retention_failures, 1);
                if is_unreachable(&e) {
                    tracing::debug!(error = %e, "retention round postponed: database away");
                } else {
                    tracing::error!(error = %e, "retention round failed; trying again in 5 minutes");
                }
                RETRY_INTERVAL
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap()
    }

    fn layout(bounds: &[(&str, Option<&str>)]) -> Vec<Partition> {
        bounds
            .iter()
            .map(|(name, bound)| Partition {
                name: (*name).to_owned(),
                bound: bound.map(at),
            })
            .collect()
    }

    #[test]
    fn daily_partitions_are_added_ahead_and_only_wholly_expired_ones_dropped() {
        let parts = layout(&[
            ("p_start", Some("2026-11-01 00:00:00")),
            ("p20261101", Some("2026-12-03 00:00:00")),
            ("p_future", None),
        ]);
        let plan = plan(
            &parts,
            Some(7),
            at("2026-12-02 11:00:00"),
            TimeDelta::days(2),
        );
        // Up to Dec 4 11:00 must be covered: the partitions of Dec 3 and Dec 4.
        assert_eq!(plan.added(), ["p20261203", "p20261204"]);
        assert_eq!(plan.future.as_deref(), Some("p_future"));
        // p_start ends on Nov 1, before the cutoff (Nov 25 11:00); p20261101 reaches past it.
        assert_eq!(plan.dropped, ["p_start"]);
        assert_eq!(
            plan.statements(READINGS).unwrap()[0],
            "ALTER TABLE co2_emissions REORGANIZE PARTITION p_future INTO (\
             PARTITION p20261203 VALUES LESS THAN ('2026-12-04 00:00:00'), \
             PARTITION p20261204 VALUES LESS THAN ('2026-12-05 00:00:00'), \
             PARTITION p_future VALUES LESS THAN (MAXVALUE))"
        );
    }

    #[test]
    fn a_partition_ending_exactly_at_the_cutoff_goes_and_nothing_newer() {
        let parts = layout(&[
            ("p20261124", Some("2026-11-25 00:00:00")),
            ("p20261125", Some("2026-11-26 00:00:00")),
            ("p_future", None),
        ]);
        let plan = plan(
            &parts,
            Some(7),
            at("2026-12-02 00:00:00"),
            TimeDelta::days(30),
        );
        assert_eq!(plan.dropped, ["p20261124"]);
    }

    #[test]
    fn no_retention_adds_monthly_partitions_and_drops_nothing() {
        let parts = layout(&[("p_start", Some("2026-12-03 00:00:00")), ("p_future", None)]);
        let plan = plan(&parts, None, at("2026-12-30 00:00:00"), TimeDelta::days(3));
        assert_eq!(plan.added(), ["p20261203", "p20270101"]);
        assert!(plan.dropped.is_empty());
        let up_to_date = plan_for_covered();
        assert!(up_to_date.new.is_empty());
    }

    fn plan_for_covered() -> Plan {
        let parts = layout(&[
            ("p20261201", Some("2027-01-01 00:00:00")),
            ("p_future", None),
        ]);
        plan(&parts, None, at("2026-12-02 00:00:00"), TimeDelta::days(3))
    }

    #[test]
    fn a_layout_without_maxvalue_gets_partitions_added_not_reorganized() {
        let parts = layout(&[("p_start", Some("2026-12-02 00:00:00"))]);
        let plan = plan(
            &parts,
            Some(3),
            at("2026-12-02 10:00:00"),
            TimeDelta::days(1),
        );
        assert_eq!(
            plan.statements(READINGS).unwrap()[0],
            "ALTER TABLE co2_emissions ADD PARTITION (\
             PARTITION p20261202 VALUES LESS THAN ('2026-12-03 00:00:00'), \
             PARTITION p20261203 VALUES LESS THAN ('2026-12-04 00:00:00'))"
        );
    }
}
