//! Keeps `co2_rollup_minute` and `co2_rollup_hour` (migration 4) equal to a `GROUP BY` over the
//! stored readings, and rebuilds them from the readings on request.
//!
//! Maintenance runs inside the transaction that stores a batch ([`maintain`]), so a rollup
//! never counts a reading that was not committed, and never misses one that was:
//!
//! - All readings of the batch were new (the normal case): their per-bucket count, sum, min,
//!   max and first/last time are added to the buckets, computed here from the batch. No reading
//!   table is read, so the cost does not depend on how many readings a bucket already holds.
//! - None was new (a redelivery, a spool replay of a batch that had landed): nothing changes;
//!   the transaction that first stored them already counted them.
//! - Some were duplicates: the touched minute buckets are recomputed from the readings, then
//!   the touched hour buckets from the minute rows. The additions are made first anyway: on
//!   MySQL/MariaDB they lock the bucket rows, in key order, before the readings are read, so a
//!   concurrent batch adding to the same buckets either committed before (and is read) or waits
//!   for this transaction and adds on top.
//!
//! A late reading (an agent that was offline for days) lands in the bucket of its measured
//! time like any other. Only the CO2 value (`emissions`) is rolled up; temperature and humidity
//! are optional and rare, and every column more costs every batch.
//!
//! What the broker does not see it cannot maintain: readings adopted from a legacy table,
//! readings stored before migration 4, rows edited or deleted by hand. [`rebuild`] recomputes a
//! time range from the readings for those (`co2-broker rollups rebuild`).

use std::collections::BTreeMap;
use std::sync::Mutex;

use chrono::{DurationRound, NaiveDateTime, TimeDelta};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement, TransactionTrait, Value,
};

use super::database::{is_conflict, is_unreachable};
use crate::ingest::Reading;
use crate::throttle::Throttle;

/// The columns of both rollup tables, in the order every statement here lists them.
const COLUMNS: &str = "device_id, bucket_start, readings, emissions_sum, emissions_min, \
                       emissions_max, first_time, last_time";

/// A rollup table: its bucket width and how to compute a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Minute,
    Hour,
}

impl Level {
    pub fn table(self) -> &'static str {
        match self {
            Level::Minute => "co2_rollup_minute",
            Level::Hour => "co2_rollup_hour",
        }
    }

    pub fn width(self) -> TimeDelta {
        match self {
            Level::Minute => TimeDelta::minutes(1),
            Level::Hour => TimeDelta::hours(1),
        }
    }

    /// The start of the bucket `t` falls in.
    pub fn bucket(self, t: NaiveDateTime) -> NaiveDateTime {
        // Truncating to a whole minute or hour fails only for times near the ends of the
        // representable range, which the classifier never lets through.
        t.duration_trunc(self.width()).unwrap_or(t)
    }

    /// The SQL for the bucket of `column`. It must give exactly the value [`Level::bucket`]
    /// binds, or the same bucket would get two keys: a `DATETIME` on MySQL, the text sqlx
    /// writes for a whole minute (`2026-12-02 06:41:00`) on SQLite.
    fn bucket_sql(self, backend: DbBackend, column: &str) -> String {
        match (backend, self) {
            (DbBackend::Sqlite, Level::Minute) => {
                format!("strftime('%Y-%m-%d %H:%M:00', {column})")
            }
            (DbBackend::Sqlite, Level::Hour) => format!("strftime('%Y-%m-%d %H:00:00', {column})"),
            (_, Level::Minute) => {
                format!("CAST(DATE_FORMAT({column}, '%Y-%m-%d %H:%i:00') AS DATETIME)")
            }
            (_, Level::Hour) => {
                format!("CAST(DATE_FORMAT({column}, '%Y-%m-%d %H:00:00') AS DATETIME)")
            }
        }
    }

    /// Where the rows of this level are computed from, with their time and value columns.
    fn source(self) -> Source {
        match self {
            Level::Minute => Source {
                table: "co2_emissions",
                time: "date_time",
                aggregates: "COUNT(*), SUM(emissions), MIN(emissions), MAX(emissions), \
                             MIN(date_time), MAX(date_time)",
                // Legacy rows may lack either; they belong to no bucket.
                filter: "emissions IS NOT NULL AND date_time IS NOT NULL",
            },
            Level::Hour => Source {
                table: "co2_rollup_minute",
                time: "bucket_start",
                aggregates: "SUM(readings), SUM(emissions_sum), MIN(emissions_min), \
                             MAX(emissions_max), MIN(first_time), MAX(last_time)",
                filter: "1 = 1",
            },
        }
    }
}

struct Source {
    table: &'static str,
    time: &'static str,
    aggregates: &'static str,
    filter: &'static str,
}

/// One bucket's figures, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    pub readings: i64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub first: NaiveDateTime,
    pub last: NaiveDateTime,
}

impl Aggregate {
    fn of(reading: &Reading) -> Self {
        Self {
            readings: 1,
            sum: reading.co2_ppm,
            min: reading.co2_ppm,
            max: reading.co2_ppm,
            first: reading.measured_at,
            last: reading.measured_at,
        }
    }

    fn add(&mut self, reading: &Reading) {
        self.readings += 1;
        self.sum += reading.co2_ppm;
        self.min = self.min.min(reading.co2_ppm);
        self.max = self.max.max(reading.co2_ppm);
        self.first = self.first.min(reading.measured_at);
        self.last = self.last.max(reading.measured_at);
    }
}

/// The buckets of `readings` at `level`, in key order (device, then time): concurrent batches
/// then lock the rollup rows they share in the same order, and cannot deadlock on them.
pub fn aggregate(readings: &[Reading], level: Level) -> BTreeMap<(&str, NaiveDateTime), Aggregate> {
    let mut buckets: BTreeMap<(&str, NaiveDateTime), Aggregate> = BTreeMap::new();
    for r in readings {
        buckets
            .entry((r.device_id.as_str(), level.bucket(r.measured_at)))
            .and_modify(|a| a.add(r))
            .or_insert_with(|| Aggregate::of(r));
    }
    buckets
}

/// A span of one device's buckets (or of every device's), `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub device_id: Option<String>,
    pub start: NaiveDateTime,
    pub end: NaiveDateTime,
}

/// The buckets of `keys` as spans, neighbouring buckets of a device merged: one range scan each.
fn spans<'a>(keys: impl Iterator<Item = &'a (&'a str, NaiveDateTime)>, level: Level) -> Vec<Span> {
    let mut spans: Vec<Span> = Vec::new();
    for &(device, start) in keys {
        let end = start + level.width();
        match spans.last_mut() {
            Some(last) if last.device_id.as_deref() == Some(device) && last.end == start => {
                last.end = end;
            }
            _ => spans.push(Span {
                device_id: Some(device.to_owned()),
                start,
                end,
            }),
        }
    }
    spans
}

/// Brings the rollups up to date with a batch just written in `txn`, of whose readings
/// `stored` were new (see the module documentation).
pub async fn maintain(
    txn: &impl ConnectionTrait,
    readings: &[Reading],
    stored: u64,
) -> Result<(), DbErr> {
    if stored == 0 {
        return Ok(());
    }
    let backend = txn.get_database_backend();
    let exact = stored == readings.len() as u64;
    for level in [Level::Minute, Level::Hour] {
        let buckets = aggregate(readings, level);
        txn.execute_raw(add(backend, level, &buckets)).await?;
        if !exact {
            txn.execute_raw(recompute(backend, level, &spans(buckets.keys(), level)))
                .await?;
        }
    }
    Ok(())
}

/// [`maintain`], except that a rollup statement the database refuses (a dropped or altered
/// rollup table, a trigger) does not cost the readings: they are committed without their
/// rollups, and the refusal is logged (at most every 10 s) with the command that repairs them.
/// Rollups are derived and can be rebuilt; refused readings would end up as rejections. Lock
/// conflicts and a lost connection still fail the write, which is then retried or spooled.
pub async fn maintain_or_log(
    txn: &impl ConnectionTrait,
    readings: &[Reading],
    stored: u64,
    failure_log: &Mutex<Throttle>,
) -> Result<(), DbErr> {
    match maintain(txn, readings, stored).await {
        Err(e) if !is_conflict(&e) && !is_unreachable(&e) => {
            let ready = failure_log.lock().map(|mut log| log.ready());
            if let Ok(Some(suppressed)) = ready {
                let (from, to) = readings.iter().fold((None, None), |(lo, hi), r| {
                    (
                        Some(lo.map_or(r.measured_at, |t: NaiveDateTime| t.min(r.measured_at))),
                        Some(hi.map_or(r.measured_at, |t: NaiveDateTime| t.max(r.measured_at))),
                    )
                });
                tracing::error!(
                    error = %e,
                    suppressed,
                    ?from,
                    ?to,
                    "the database refused a rollup update; the readings are stored without it. \
                     Once fixed, run `co2-broker rollups rebuild --from <time> --to <time>` over the affected span"
                );
            }
            Ok(())
        }
        other => other,
    }
}

/// Adds `buckets` to the rollup rows of `level`, creating the rows that do not exist yet.
pub fn add(
    backend: DbBackend,
    level: Level,
    buckets: &BTreeMap<(&str, NaiveDateTime), Aggregate>,
) -> Statement {
    let table = level.table();
    let mut sql = format!("INSERT INTO {table} ({COLUMNS}) VALUES ");
    let mut values: Vec<Value> = Vec::with_capacity(buckets.len() * 8);
    for (i, ((device, start), a)) in buckets.iter().enumerate() {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?,?,?,?,?,?,?,?)");
        values.extend([
            (*device).into(),
            (*start).into(),
            a.readings.into(),
            a.sum.into(),
            a.min.into(),
            a.max.into(),
            a.first.into(),
            a.last.into(),
        ]);
    }
    sql.push_str(&match backend {
        DbBackend::Sqlite => " ON CONFLICT (device_id, bucket_start) DO UPDATE SET \
             readings = readings + excluded.readings, \
             emissions_sum = emissions_sum + excluded.emissions_sum, \
             emissions_min = MIN(emissions_min, excluded.emissions_min), \
             emissions_max = MAX(emissions_max, excluded.emissions_max), \
             first_time = MIN(first_time, excluded.first_time), \
             last_time = MAX(last_time, excluded.last_time)"
            .to_owned(),
        _ => format!(
            " ON DUPLICATE KEY UPDATE \
             {table}.readings = {table}.readings + VALUES(readings), \
             {table}.emissions_sum = {table}.emissions_sum + VALUES(emissions_sum), \
             {table}.emissions_min = LEAST({table}.emissions_min, VALUES(emissions_min)), \
             {table}.emissions_max = GREATEST({table}.emissions_max, VALUES(emissions_max)), \
             {table}.first_time = LEAST({table}.first_time, VALUES(first_time)), \
             {table}.last_time = GREATEST({table}.last_time, VALUES(last_time))"
        ),
    });
    Statement::from_sql_and_values(backend, sql, values)
}

/// Recomputes the rollup rows of `level` in `spans` from their source (the readings for
/// minutes, the minute rows for hours), overwriting what they held. Buckets whose source rows
/// are all gone are left alone: [`rebuild`] deletes the span first.
pub fn recompute(backend: DbBackend, level: Level, spans: &[Span]) -> Statement {
    let table = level.table();
    let Source {
        table: source,
        time,
        aggregates,
        filter,
    } = level.source();
    let bucket = level.bucket_sql(backend, time);
    let mut values: Vec<Value> = Vec::with_capacity(spans.len() * 3);
    let mut ranges = String::new();
    for (i, span) in spans.iter().enumerate() {
        if i > 0 {
            ranges.push_str(" OR ");
        }
        if let Some(device) = &span.device_id {
            ranges.push_str(&format!("(device_id = ? AND {time} >= ? AND {time} < ?)"));
            values.push(device.as_str().into());
        } else {
            ranges.push_str(&format!("({time} >= ? AND {time} < ?)"));
        }
        values.extend([span.start.into(), span.end.into()]);
    }
    let replace = match backend {
        DbBackend::Sqlite => " ON CONFLICT (device_id, bucket_start) DO UPDATE SET \
             readings = excluded.readings, emissions_sum = excluded.emissions_sum, \
             emissions_min = excluded.emissions_min, emissions_max = excluded.emissions_max, \
             first_time = excluded.first_time, last_time = excluded.last_time"
            .to_owned(),
        _ => format!(
            " ON DUPLICATE KEY UPDATE \
             {table}.readings = VALUES(readings), {table}.emissions_sum = VALUES(emissions_sum), \
             {table}.emissions_min = VALUES(emissions_min), \
             {table}.emissions_max = VALUES(emissions_max), \
             {table}.first_time = VALUES(first_time), {table}.last_time = VALUES(last_time)"
        ),
    };
    let sql = format!(
        "INSERT INTO {table} ({COLUMNS}) \
         SELECT device_id, {bucket}, {aggregates} FROM {source} \
         WHERE {filter} AND ({ranges}) \
         GROUP BY device_id, {bucket}{replace}"
    );
    Statement::from_sql_and_values(backend, sql, values)
}

/// What [`rebuild`] wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rebuilt {
    pub minute_rows: u64,
    pub hour_rows: u64,
}

/// How much [`rebuild`] recomputes per transaction: a day of every device is a few hundred
/// thousand readings at 10 s, which keeps each transaction's locks and undo log small.
const REBUILD_CHUNK: TimeDelta = TimeDelta::days(1);

/// Recomputes both rollups of `device` (or of every device) from the readings measured in
/// `[from, to)`, widened to whole hours so every hour row it writes is complete. Rows of
/// buckets that no longer hold a reading are deleted. One transaction per day.
pub async fn rebuild(
    db: &DatabaseConnection,
    from: NaiveDateTime,
    to: NaiveDateTime,
    device: Option<&str>,
) -> Result<Rebuilt, DbErr> {
    let from = Level::Hour.bucket(from);
    let to = {
        let start = Level::Hour.bucket(to);
        if start == to {
            to
        } else {
            start + Level::Hour.width()
        }
    };
    let mut total = Rebuilt::default();
    let mut start = from;
    while start < to {
        let end = (start + REBUILD_CHUNK).min(to);
        let span = Span {
            device_id: device.map(str::to_owned),
            start,
            end,
        };
        let mut conflicts = 0;
        let chunk = loop {
            match rebuild_span(db, &span).await {
                // The broker's batches lock the same rows in another order; the database
                // rolled this chunk back, so doing it again is safe.
                Err(e) if is_conflict(&e) && conflicts < REBUILD_CONFLICT_RETRIES => {
                    conflicts += 1;
                    tracing::warn!(error = %e, attempt = conflicts, "rebuilding a day of rollups lost a lock conflict with the broker's writes; doing it again");
                    // Give the batches it collided with time to commit.
                    tokio::time::sleep(REBUILD_CONFLICT_BACKOFF * conflicts).await;
                }
                done => break done?,
            }
        };
        total.minute_rows += chunk.minute_rows;
        total.hour_rows += chunk.hour_rows;
        start = end;
    }
    Ok(total)
}

/// How often a day of [`rebuild`] is done again after losing a lock conflict, and the pause
/// before each attempt (times the attempt number). InnoDB rolls back the transaction that
/// changed fewer rows, which is usually the broker's batch, but not always.
const REBUILD_CONFLICT_RETRIES: u32 = 10;
const REBUILD_CONFLICT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(50);

/// One transaction of [`rebuild`]: deletes the span's rollup rows and recomputes them.
async fn rebuild_span(db: &DatabaseConnection, span: &Span) -> Result<Rebuilt, DbErr> {
    let txn = db.begin().await?;
    let backend = txn.get_database_backend();
    let mut rebuilt = Rebuilt::default();
    for level in [Level::Minute, Level::Hour] {
        txn.execute_raw(delete(backend, level, span)).await?;
        let written = txn
            .execute_raw(recompute(backend, level, std::slice::from_ref(span)))
            .await?
            .rows_affected();
        match level {
            Level::Minute => rebuilt.minute_rows = written,
            Level::Hour => rebuilt.hour_rows = written,
        }
    }
    txn.commit().await?;
    Ok(rebuilt)
}

fn delete(backend: DbBackend, level: Level, span: &Span) -> Statement {
    let table = level.table();
    let mut values: Vec<Value> = Vec::with_capacity(3);
    let mut sql = format!("DELETE FROM {table} WHERE bucket_start >= ? AND bucket_start < ?");
    values.extend([span.start.into(), span.end.into()]);
    if let Some(device) = &span.device_id {
        sql.push_str(" AND device_id = ?");
        values.push(device.as_str().into());
    }
    Statement::from_sql_and_values(backend, sql, values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").unwrap()
    }

    fn reading(device: &str, measured: &str, ppm: f64) -> Reading {
        let t = at(measured);
        Reading {
            device_id: co2_proto::DeviceId::new(device).unwrap(),
            topic: format!("co2/{device}"),
            measured_at: t,
            received_at: t,
            co2_ppm: ppm,
            seq: None,
            temperature_c: None,
            humidity_pct: None,
            dedup_key: format!("t{}", t.and_utc().timestamp_millis()),
        }
    }

    #[test]
    fn buckets_are_whole_minutes_and_hours() {
        let t = at("2026-12-02 06:41:59.999");
        assert_eq!(Level::Minute.bucket(t), at("2026-12-02 06:41:00"));
        assert_eq!(Level::Hour.bucket(t), at("2026-12-02 06:00:00"));
        // The text sqlx binds for a whole minute on SQLite is what strftime gives there.
        assert_eq!(
            at("2026-12-02 06:41:00").format("%F %T%.f").to_string(),
            "2026-12-02 06:41:00"
        );
    }

    #[test]
    fn a_batch_aggregates_per_device_and_bucket_in_key_order() {
        let batch = [
            reading("b", "2026-12-02 06:41:10", 500.0),
            reading("a", "2026-12-02 06:42:00", 410.0),
            reading("b", "2026-12-02 06:41:50.5", 420.0),
            reading("a", "2026-12-02 06:40:59.999", 400.0),
        ];
        let minutes = aggregate(&batch, Level::Minute);
        let keys: Vec<_> = minutes.keys().map(|(d, t)| (*d, t.to_string())).collect();
        assert_eq!(
            keys,
            [
                ("a", "2026-12-02 06:40:00".to_owned()),
                ("a", "2026-12-02 06:42:00".to_owned()),
                ("b", "2026-12-02 06:41:00".to_owned()),
            ]
        );
        assert_eq!(
            minutes[&("b", at("2026-12-02 06:41:00"))],
            Aggregate {
                readings: 2,
                sum: 920.0,
                min: 420.0,
                max: 500.0,
                first: at("2026-12-02 06:41:10"),
                last: at("2026-12-02 06:41:50.5"),
            }
        );
        let hours = aggregate(&batch, Level::Hour);
        assert_eq!(hours.len(), 2);
        assert_eq!(hours[&("a", at("2026-12-02 06:00:00"))].readings, 2);
    }

    #[test]
    fn neighbouring_buckets_of_a_device_make_one_span() {
        let batch = [
            reading("a", "2026-12-02 06:40:01", 1.0),
            reading("a", "2026-12-02 06:41:01", 1.0),
            reading("a", "2026-12-02 06:43:01", 1.0),
            reading("b", "2026-12-02 06:44:01", 1.0),
        ];
        let minutes = aggregate(&batch, Level::Minute);
        let spans = spans(minutes.keys(), Level::Minute);
        let shown: Vec<_> = spans
            .iter()
            .map(|s| {
                (
                    s.device_id.as_deref().unwrap(),
                    s.start.time().to_string(),
                    s.end.time().to_string(),
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                ("a", "06:40:00".to_owned(), "06:42:00".to_owned()),
                ("a", "06:43:00".to_owned(), "06:44:00".to_owned()),
                ("b", "06:44:00".to_owned(), "06:45:00".to_owned()),
            ]
        );
        let sql = recompute(DbBackend::MySql, Level::Minute, &spans).sql;
        assert_eq!(sql.matches("device_id = ?").count(), 3, "{sql}");
    }
}
