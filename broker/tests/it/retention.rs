//! Retention drops exactly what has expired: on MariaDB whole partitions whose every row is
//! older than the table's retention (and nothing newer, however close), on SQLite and on a
//! MariaDB table without partitions the rows older than it, in bounded batches. Partitions
//! are added ahead of the clock, two brokers doing the upkeep at once agree, writes go on, and
//! the legacy backup table is never touched. Migration 5 partitions tables that already hold
//! readings (adopted legacy rows included) without losing one.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{Months, NaiveDateTime, NaiveTime, TimeDelta, Utc};
use co2_broker::ingest::{Batch, Reading};
use co2_broker::settings::DatabaseUrl;
use co2_broker::storage::retention::{self, partitions, Partition, RetentionPolicy};
use co2_broker::storage::Database;
use migration::partitions::{PartitionedTable, HOUR_ROLLUPS, MINUTE_ROLLUPS, READINGS};
use migration::{Migrator, MigratorTrait, LEGACY_BACKUP_TABLE, NO_TIME_REASON};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

use crate::support::broker::{scrape, TestBroker};
use crate::support::mariadb::MariaDb;
use crate::support::{db, eventually};

const DEVICES: [&str; 2] = ["pi-kitchen", "pi-office"];
/// Readings reach this far back and ahead of now.
const DAYS_BACK: i64 = 100;
const HOURS_AHEAD: i64 = 20;

/// A reading of every device every 5 hours 7 minutes (so readings fall at every time of day,
/// on both sides of every midnight) from `DAYS_BACK` ago to `HOURS_AHEAD` from `now`.
fn readings(now: NaiveDateTime) -> Vec<Reading> {
    let step = TimeDelta::minutes(5 * 60 + 7);
    let mut out = Vec::new();
    for device in DEVICES {
        let mut t = now - TimeDelta::days(DAYS_BACK);
        let mut seq = 0;
        while t <= now + TimeDelta::hours(HOURS_AHEAD) {
            out.push(Reading {
                device_id: co2_proto::DeviceId::new(device).unwrap(),
                topic: format!("co2/{device}"),
                measured_at: t,
                received_at: now,
                co2_ppm: 400.0 + (seq % 90) as f64,
                seq: Some(seq),
                temperature_c: None,
                humidity_pct: None,
                dedup_key: format!("t{}s{seq}", t.and_utc().timestamp_millis()),
            });
            t += step;
            seq += 1;
        }
    }
    out
}

async fn store(db: &Database, readings: Vec<Reading>) {
    for chunk in readings.chunks(500) {
        db.write(&Batch {
            readings: chunk.to_vec(),
            rejections: vec![],
        })
        .await
        .expect("write a batch");
    }
}

/// The times of a table's rows, per device, sorted; rows without a time are left out.
async fn times(
    conn: &DatabaseConnection,
    table: PartitionedTable,
) -> BTreeMap<String, Vec<NaiveDateTime>> {
    let sql = format!(
        "SELECT device_id, {} FROM {} ORDER BY device_id, {}",
        table.time_column, table.name, table.time_column
    );
    let backend = conn.get_database_backend();
    let mut out: BTreeMap<String, Vec<NaiveDateTime>> = BTreeMap::new();
    for row in conn
        .query_all_raw(Statement::from_string(backend, sql))
        .await
        .expect("select times")
    {
        let device: String = row.try_get_by_index(0).unwrap();
        // Adopted legacy rows may lack a time (until migration 5 moves them out).
        if let Some(t) = row.try_get_by_index::<Option<NaiveDateTime>>(1).unwrap() {
            out.entry(device).or_default().push(t);
        }
    }
    out
}

/// `before` without the rows older than `keep_from`.
fn kept_from(
    before: &BTreeMap<String, Vec<NaiveDateTime>>,
    keep_from: Option<NaiveDateTime>,
) -> BTreeMap<String, Vec<NaiveDateTime>> {
    before
        .iter()
        .map(|(device, ts)| {
            let kept = ts
                .iter()
                .copied()
                .filter(|t| keep_from.is_none_or(|k| *t >= k));
            (device.clone(), kept.collect())
        })
        .filter(|(_, ts): &(String, Vec<NaiveDateTime>)| !ts.is_empty())
        .collect()
}

fn policy(raw: Option<u32>, minute: Option<u32>, hour: Option<u32>) -> RetentionPolicy {
    RetentionPolicy {
        tables: [
            (READINGS, raw),
            (MINUTE_ROLLUPS, minute),
            (HOUR_ROLLUPS, hour),
        ],
        ahead: TimeDelta::days(2),
        delete_batch: 7,
        delete_pause: Duration::from_millis(1),
    }
}

/// Where the partitions that `days` leaves at `now` start: the bound of the last one that
/// expired. `None` when none has.
fn first_kept(layout: &[Partition], days: u32, now: NaiveDateTime) -> Option<NaiveDateTime> {
    let cutoff = retention::horizon(now, days);
    layout
        .iter()
        .filter_map(|p| p.bound)
        .filter(|b| *b <= cutoff)
        .max()
}

/// Rows in `table` (a table name, or a table with a `PARTITION (…)` clause).
async fn table_count(conn: &DatabaseConnection, table: &str) -> i64 {
    conn.query_one_raw(Statement::from_string(
        conn.get_database_backend(),
        format!("SELECT COUNT(*) FROM {table}"),
    ))
    .await
    .unwrap()
    .unwrap()
    .try_get_by_index(0)
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_exactly_the_expired_partitions_in_mariadb() {
    let url = MariaDb::shared().create_database("retention").await;
    let conn = db::connect(&url).await;
    // A seed installation: its rows (one without a time) are adopted by migration 1.
    conn.execute_unprepared(
        "CREATE TABLE co2_emissions (date_time DATETIME, emissions DOUBLE(7,2));
         INSERT INTO co2_emissions VALUES
           ('2020-07-13 22:43:23', 3500.00), (NULL, 500.00), ('2020-07-14 01:00:00', 700.00)",
    )
    .await
    .unwrap();
    Migrator::up(&conn, Some(4)).await.unwrap();
    let db = Database::connect(&DatabaseUrl::new(&url), 4).await.unwrap();
    let now = Utc::now().naive_utc();
    store(&db, readings(now)).await;
    let readings_before = times(&conn, READINGS).await;
    let minutes_before = times(&conn, MINUTE_ROLLUPS).await;
    let hours_before = times(&conn, HOUR_ROLLUPS).await;

    // Migration 5 on a table holding 100 days of readings and the adopted ones.
    db.migrate().await.unwrap();
    let rejected = db::rejections(&conn).await;
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].reason, NO_TIME_REASON);
    assert_eq!(rejected[0].payload, "|500");
    let readings_at_upgrade = times(&conn, READINGS).await;
    assert_eq!(
        readings_at_upgrade, readings_before,
        "migration 5 lost or moved readings"
    );
    let layout = partitions(&conn, READINGS).await.unwrap();
    let names: Vec<_> = layout.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names.first(), Some(&"p_start"), "{layout:?}");
    assert_eq!(names.last(), Some(&"p_future"), "{layout:?}");
    // The 2020 rows share p_start; monthly partitions cover the last 24 months, then one
    // reaches to tomorrow.
    let this_month = migration::partitions::month_start(now.date()).and_time(NaiveTime::MIN);
    let tomorrow = (now.date() + TimeDelta::days(1)).and_time(NaiveTime::MIN);
    assert_eq!(
        layout[0].bound,
        Some(this_month - Months::new(24)),
        "{layout:?}"
    );
    assert_eq!(layout[layout.len() - 2].bound, Some(tomorrow), "{layout:?}");
    assert_eq!(layout.len(), 27, "{layout:?}");

    // Raw readings kept 30 days, minute rollups 45, hour rollups forever.
    let round = policy(Some(30), Some(45), None);
    let minute_layout = partitions(&conn, MINUTE_ROLLUPS).await.unwrap();
    let reports = retention::maintain(db.connection(), &round, now)
        .await
        .unwrap();
    let raw_report = &reports[0].1;
    assert!(!raw_report.dropped.is_empty(), "{reports:?}");
    assert!(raw_report.dropped.contains(&"p_start".to_owned()));

    let keep_raw = first_kept(&layout, 30, now);
    let after = times(&conn, READINGS).await;
    assert_eq!(after, kept_from(&readings_before, keep_raw));
    // Rows older than the cutoff that share a partition with newer ones stay (a month's
    // partition straddles it), every row newer than the cutoff stays.
    let cutoff = retention::horizon(now, 30);
    assert!(
        after.values().flatten().any(|t| *t < cutoff),
        "the straddling partition was touched"
    );
    let newer = |m: &BTreeMap<String, Vec<NaiveDateTime>>| {
        m.values().flatten().filter(|t| **t >= cutoff).count()
    };
    assert_eq!(newer(&after), newer(&readings_before));
    assert_eq!(
        times(&conn, MINUTE_ROLLUPS).await,
        kept_from(&minutes_before, first_kept(&minute_layout, 45, now))
    );
    assert_eq!(times(&conn, HOUR_ROLLUPS).await, hours_before);
    // The legacy backup keeps every seed row, the 2020 ones included.
    assert_eq!(table_count(&conn, LEGACY_BACKUP_TABLE).await, 3);

    // Daily partitions (30 days of retention) now reach two days ahead; p_future is empty.
    let layout = partitions(&conn, READINGS).await.unwrap();
    let last_bound = layout.iter().filter_map(|p| p.bound).max().unwrap();
    assert!(last_bound >= now + TimeDelta::days(2), "{layout:?}");
    assert_eq!(
        table_count(&conn, "co2_emissions PARTITION (p_future)").await,
        0
    );

    // The same round again changes nothing.
    let again = retention::maintain(db.connection(), &round, now)
        .await
        .unwrap();
    assert!(
        again
            .iter()
            .all(|(_, r)| r.added.is_empty() && r.dropped.is_empty()),
        "{again:?}"
    );

    // 40 days later, with two brokers doing the upkeep at the same moment.
    let later = now + TimeDelta::days(40);
    let before = times(&conn, READINGS).await;
    let layout = partitions(&conn, READINGS).await.unwrap();
    let other = db::connect(&url).await;
    let (a, b) = tokio::join!(
        retention::maintain(db.connection(), &round, later),
        retention::maintain(&other, &round, later)
    );
    a.unwrap();
    b.unwrap();
    assert_eq!(
        times(&conn, READINGS).await,
        kept_from(&before, first_kept(&layout, 30, later))
    );
    let layout = partitions(&conn, READINGS).await.unwrap();
    let bounds: Vec<_> = layout.iter().filter_map(|p| p.bound).collect();
    assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{layout:?}");
    assert!(
        *bounds.last().unwrap() >= later + TimeDelta::days(2),
        "{layout:?}"
    );
    assert!(
        *bounds.first().unwrap() > retention::horizon(later, 31),
        "{layout:?}"
    );

    // Writes go on into the new partitions.
    let late = readings(later)
        .into_iter()
        .filter(|r| r.measured_at > later - TimeDelta::days(1))
        .collect::<Vec<_>>();
    let count = late.len();
    let outcome = db
        .write(&Batch {
            readings: late,
            rejections: vec![],
        })
        .await
        .unwrap();
    assert_eq!(outcome.stored as usize, count);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_exactly_the_expired_rows_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/co2.db?mode=rwc", dir.path().display());
    retention_deletes_exactly_the_expired_rows(&url, false).await;
}

/// A MariaDB table without partitions (migration 5 rolled back) gets the same bounded deletes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_exactly_the_expired_rows_without_partitions_in_mariadb() {
    let url = MariaDb::shared().create_database("retention_rows").await;
    retention_deletes_exactly_the_expired_rows(&url, true).await;
}

async fn retention_deletes_exactly_the_expired_rows(url: &str, roll_back_partitions: bool) {
    let db = Database::connect(&DatabaseUrl::new(url), 4).await.unwrap();
    db.migrate().await.unwrap();
    let conn = db::connect(url).await;
    if roll_back_partitions {
        Migrator::down(&conn, Some(2)).await.unwrap(); // 6 (backfill) and 5 (partitions)
        assert!(partitions(&conn, READINGS).await.unwrap().is_empty());
    }
    let now = Utc::now().naive_utc();
    store(&db, readings(now)).await;
    let readings_before = times(&conn, READINGS).await;
    let minutes_before = times(&conn, MINUTE_ROLLUPS).await;
    let hours_before = times(&conn, HOUR_ROLLUPS).await;

    let round = policy(Some(30), Some(45), None);
    let reports = retention::maintain(db.connection(), &round, now)
        .await
        .unwrap();
    let raw_cutoff = retention::horizon(now, 30);
    let expected = kept_from(&readings_before, Some(raw_cutoff));
    let deleted = readings_before.values().flatten().count() - expected.values().flatten().count();
    // Many statements of at most 7 rows each.
    assert!(deleted > 7 * 10, "{deleted}");
    assert_eq!(reports[0].1.deleted_rows as usize, deleted);
    assert_eq!(times(&conn, READINGS).await, expected);
    assert_eq!(
        times(&conn, MINUTE_ROLLUPS).await,
        kept_from(&minutes_before, Some(retention::horizon(now, 45)))
    );
    assert_eq!(times(&conn, HOUR_ROLLUPS).await, hours_before);

    let again = retention::maintain(db.connection(), &round, now)
        .await
        .unwrap();
    assert!(again.iter().all(|(_, r)| r.deleted_rows == 0), "{again:?}");
}

/// The broker itself: started with 30 days of raw retention on readings from the last 100
/// days, it applies retention at start and counts it on /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_applies_retention_at_start_in_mariadb() {
    let url = MariaDb::shared().create_database("retention_broker").await;
    let conn = db::connect(&url).await;
    // Readings stored before the upgrade to migration 5, which the broker applies at start.
    Migrator::up(&conn, Some(4)).await.unwrap();
    the_broker_applies_retention_at_start(&url, &conn, "co2_retention_partitions_dropped_total")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_applies_retention_at_start_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/co2.db?mode=rwc", dir.path().display());
    let conn = db::connect(&url).await;
    Migrator::up(&conn, None).await.unwrap();
    the_broker_applies_retention_at_start(&url, &conn, "co2_retention_rows_deleted_total").await;
}

async fn the_broker_applies_retention_at_start(
    url: &str,
    conn: &DatabaseConnection,
    counter: &str,
) {
    let db = Database::connect(&DatabaseUrl::new(url), 2).await.unwrap();
    let now = Utc::now().naive_utc();
    store(&db, readings(now)).await;
    let before = times(conn, READINGS).await;

    let broker = TestBroker::start_with(url, "raw_retention_days = 30").await;
    let http = broker.setup.http;
    eventually(Duration::from_secs(20), counter, || async {
        (scrape(http, counter).await? > 0.0).then_some(())
    })
    .await;
    let after = times(conn, READINGS).await;
    let cutoff = retention::horizon(now, 30);
    let newer = |m: &BTreeMap<String, Vec<NaiveDateTime>>| {
        m.values().flatten().filter(|t| **t >= cutoff).count()
    };
    assert_eq!(
        newer(&after),
        newer(&before),
        "a reading inside the retention went"
    );
    let oldest = after.values().flatten().min().unwrap();
    assert!(
        *oldest >= cutoff - TimeDelta::days(31),
        "readings older than the cutoff by more than a partition stayed: {oldest}"
    );
    assert_eq!(
        scrape(http, "co2_retention_failures_total").await,
        Some(0.0)
    );
    broker.stop().await;
}
