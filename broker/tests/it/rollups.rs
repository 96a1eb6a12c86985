//! Rollups (`co2_rollup_minute`, `co2_rollup_hour`) stay equal to a GROUP BY over the stored
//! readings: after duplicates, redeliveries, partly duplicate batches, concurrent batches on the
//! same buckets, late readings days old, a spool replay after the database was killed; and
//! `rollups::rebuild` restores them after rollup rows were deleted or readings edited. On
//! MariaDB and SQLite, through the storage layer and through the broker end to end.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use chrono::{NaiveDateTime, TimeDelta};
use co2_broker::ingest::{Batch, Reading};
use co2_broker::settings::DatabaseUrl;
use co2_broker::storage::database::{is_conflict, is_missing_table};
use co2_broker::storage::rollup_backfill;
use co2_broker::storage::rollups::{self, Level};
use co2_broker::storage::{Database, WriteOutcome};
use migration::{Migrator, MigratorTrait};
use rumqttc::QoS;
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

use crate::support::broker::TestBroker;
use crate::support::mariadb::MariaDb;
use crate::support::{db, eventually, mqtt};

/// One rollup row's figures; `sum` compared within rounding.
#[derive(Debug, Clone)]
struct Figures {
    readings: i64,
    sum: f64,
    min: f64,
    max: f64,
    first: NaiveDateTime,
    last: NaiveDateTime,
}

impl PartialEq for Figures {
    fn eq(&self, other: &Self) -> bool {
        self.readings == other.readings
            && (self.sum - other.sum).abs() <= 1e-9 * self.sum.abs().max(1.0)
            && self.min == other.min
            && self.max == other.max
            && self.first == other.first
            && self.last == other.last
    }
}

type Rollup = BTreeMap<(String, NaiveDateTime), Figures>;

/// What a rollup table holds.
async fn stored(conn: &DatabaseConnection, level: Level) -> Rollup {
    let sql = format!(
        "SELECT device_id, bucket_start, readings, emissions_sum, emissions_min, emissions_max, \
         first_time, last_time FROM {}",
        level.table()
    );
    let backend = conn.get_database_backend();
    conn.query_all_raw(Statement::from_string(backend, sql))
        .await
        .expect("select rollup rows")
        .iter()
        .map(|row| {
            (
                (
                    row.try_get_by_index::<String>(0).unwrap(),
                    row.try_get_by_index::<NaiveDateTime>(1).unwrap(),
                ),
                Figures {
                    readings: row.try_get_by_index(2).unwrap(),
                    sum: row.try_get_by_index(3).unwrap(),
                    min: row.try_get_by_index(4).unwrap(),
                    max: row.try_get_by_index(5).unwrap(),
                    first: row.try_get_by_index(6).unwrap(),
                    last: row.try_get_by_index(7).unwrap(),
                },
            )
        })
        .collect()
}

/// The same figures computed here from every stored reading (a GROUP BY by hand, each level
/// straight from the readings).
async fn expected(conn: &DatabaseConnection, level: Level) -> Rollup {
    let mut rollup = Rollup::new();
    for r in db::readings(conn).await {
        let (Some(t), Some(v)) = (r.date_time, r.emissions) else {
            continue;
        };
        rollup
            .entry((r.device_id.clone(), level.bucket(t)))
            .and_modify(|f| {
                f.readings += 1;
                f.sum += v;
                f.min = f.min.min(v);
                f.max = f.max.max(v);
                f.first = f.first.min(t);
                f.last = f.last.max(t);
            })
            .or_insert(Figures {
                readings: 1,
                sum: v,
                min: v,
                max: v,
                first: t,
                last: t,
            });
    }
    rollup
}

async fn assert_rollups_match_readings(conn: &DatabaseConnection, when: &str) {
    for level in [Level::Minute, Level::Hour] {
        let (stored, expected) = (stored(conn, level).await, expected(conn, level).await);
        assert!(!expected.is_empty(), "{when}: no readings");
        assert_same(&stored, &expected, &format!("{when}: {}", level.table()));
    }
}

/// Equal rollups, or a panic naming the first buckets that differ (not thousands of rows).
fn assert_same(stored: &Rollup, expected: &Rollup, what: &str) {
    let differing: Vec<_> = expected
        .keys()
        .chain(stored.keys())
        .filter(|key| stored.get(*key) != expected.get(*key))
        .take(3)
        .map(|key| {
            format!(
                "{key:?}: stored {:?}, expected {:?}",
                stored.get(key),
                expected.get(key)
            )
        })
        .collect();
    assert!(
        differing.is_empty(),
        "{what}: {} buckets stored, {} expected; first differences:\n{}",
        stored.len(),
        expected.len(),
        differing.join("\n")
    );
}

fn at(s: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").unwrap()
}

/// Readings `seqs` of `device`, 7.5 s apart from `start` (so buckets of a minute hold 8 and
/// batches cross minute and hour boundaries), with values that vary.
fn readings(device: &str, start: NaiveDateTime, seqs: std::ops::Range<i64>) -> Vec<Reading> {
    seqs.map(|seq| {
        let t = start + TimeDelta::milliseconds(7_500 * seq);
        Reading {
            device_id: co2_proto::DeviceId::new(device).unwrap(),
            topic: format!("co2/{device}"),
            measured_at: t,
            received_at: t,
            co2_ppm: 400.0 + (seq * 37 % 500) as f64 + 0.25,
            seq: Some(seq),
            temperature_c: None,
            humidity_pct: None,
            dedup_key: format!("t{}s{seq}", t.and_utc().timestamp_millis()),
        }
    })
    .collect()
}

fn batch(readings: Vec<Reading>) -> Batch {
    Batch {
        readings,
        rejections: vec![],
    }
}

/// `Database::write`, written again after a pause on a lock conflict, as the writer does (it
/// spools the batch after 3 conflicts and replays it later; here it just keeps trying).
async fn write(db: &Database, batch: &Batch) -> WriteOutcome {
    let mut attempts = 0;
    loop {
        match db.write(batch).await {
            Err(e) if is_conflict(&e) && attempts < 20 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(20 * attempts)).await;
            }
            written => break written.expect("write a batch"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_follow_the_readings_in_mariadb() {
    let url = MariaDb::shared().create_database("rollups").await;
    rollups_follow_the_readings(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_follow_the_readings_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/co2.db?mode=rwc", dir.path().display());
    rollups_follow_the_readings(&url).await;
}

async fn rollups_follow_the_readings(url: &str) {
    let db = Database::connect(&DatabaseUrl::new(url), 4).await.unwrap();
    db.migrate().await.unwrap();
    let conn = db.connection();
    let start = at("2026-12-01 09:55:00");

    // New readings of two devices across minutes and an hour boundary.
    let first: Vec<Reading> = readings("pi-a", start, 0..100)
        .into_iter()
        .chain(readings("pi-b", start, 0..60))
        .collect();
    let outcome = write(&db, &batch(first.clone())).await;
    assert_eq!((outcome.stored, outcome.duplicates), (160, 0));
    assert_rollups_match_readings(conn, "new readings").await;
    let before = (
        stored(conn, Level::Minute).await,
        stored(conn, Level::Hour).await,
    );

    // The same batch again (a redelivery, a replayed spool record): nothing changes.
    let outcome = write(&db, &batch(first.clone())).await;
    assert_eq!((outcome.stored, outcome.duplicates), (0, 160));
    assert_same(
        &stored(conn, Level::Minute).await,
        &before.0,
        "redelivery: minutes",
    );
    assert_same(
        &stored(conn, Level::Hour).await,
        &before.1,
        "redelivery: hours",
    );

    // Partly duplicate: old readings, new ones in the same buckets and beyond, and one
    // reading twice in the batch itself.
    let mut mixed: Vec<Reading> = first[90..100].to_vec();
    mixed.extend(readings("pi-a", start, 100..130));
    mixed.push(mixed[12].clone());
    mixed.extend(first[100..105].iter().cloned());
    mixed.extend(readings("pi-b", start, 60..70));
    let outcome = write(&db, &batch(mixed)).await;
    assert_eq!((outcome.stored, outcome.duplicates), (40, 16));
    assert_rollups_match_readings(conn, "partly duplicate batch").await;

    // Late readings: an agent offline for three days sends its backlog, some of it into
    // buckets that already hold readings (other sequence numbers, same minutes).
    let late_start = start - TimeDelta::days(3);
    write(&db, &batch(readings("pi-a", late_start, 0..50))).await;
    let mut into_old_buckets = Vec::new();
    for r in readings("pi-b", start + TimeDelta::seconds(3), 0..20) {
        into_old_buckets.push(Reading {
            seq: Some(r.seq.unwrap() + 5000),
            dedup_key: format!("{}x", r.dedup_key),
            co2_ppm: r.co2_ppm + 1.0,
            ..r
        });
    }
    write(&db, &batch(into_old_buckets)).await;
    assert_rollups_match_readings(conn, "late readings").await;

    // Concurrent batches on the same buckets, half of them partly duplicate: the additions of
    // one must not be lost in another's recomputation.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8i64 {
        let db = db.clone();
        let mut rows = readings("pi-c", start, i * 20..i * 20 + 30); // overlaps the next
        rows.extend(readings("pi-a", start, 120 + i * 5..140 + i * 5));
        tasks.spawn(async move { write(&db, &batch(rows)).await });
    }
    let written: u64 = tasks.join_all().await.iter().map(|o| o.stored).sum();
    assert_eq!(written, 170 + 45, "pi-c 0..170 and pi-a 130..175 are new");
    assert_rollups_match_readings(conn, "concurrent batches").await;

    // Rebuild: rollup rows deleted by hand come back exactly as they were maintained.
    let maintained = (
        stored(conn, Level::Minute).await,
        stored(conn, Level::Hour).await,
    );
    for table in ["co2_rollup_minute", "co2_rollup_hour"] {
        conn.execute_unprepared(&format!("DELETE FROM {table} WHERE device_id <> 'pi-b'"))
            .await
            .unwrap();
    }
    let rebuilt = rollups::rebuild(conn, late_start, start + TimeDelta::hours(2), None)
        .await
        .unwrap();
    assert_eq!(rebuilt.minute_rows as usize, maintained.0.len());
    assert_eq!(rebuilt.hour_rows as usize, maintained.1.len());
    assert_same(
        &stored(conn, Level::Minute).await,
        &maintained.0,
        "rebuilt: minutes",
    );
    assert_same(
        &stored(conn, Level::Hour).await,
        &maintained.1,
        "rebuilt: hours",
    );

    // Readings edited and deleted by hand: rebuilding that device's range follows them, and the
    // bucket left without readings is gone.
    let edits = [
        "UPDATE co2_emissions SET emissions = 9999 \
         WHERE device_id = 'pi-a' AND seq = 3 AND date_time >= '2026-12-01 00:00:00'",
        "DELETE FROM co2_emissions \
         WHERE device_id = 'pi-a' AND seq BETWEEN 8 AND 15 AND date_time >= '2026-12-01 00:00:00'",
    ];
    for sql in edits {
        conn.execute_unprepared(sql).await.unwrap();
    }
    assert_ne!(
        stored(conn, Level::Minute).await,
        expected(conn, Level::Minute).await
    );
    rollups::rebuild(conn, start, start + TimeDelta::minutes(5), Some("pi-a"))
        .await
        .unwrap();
    assert_rollups_match_readings(conn, "rebuilt after edits").await;
    assert!(!stored(conn, Level::Minute)
        .await
        .contains_key(&("pi-a".to_owned(), at("2026-12-01 09:56:00"))));
}

/// A device's readings as JSON payloads, `seqs` 10 s apart from `start_ms`.
fn payloads(device: &str, start_ms: i64, seqs: std::ops::Range<i64>) -> Vec<(String, Vec<u8>)> {
    seqs.map(|seq| {
        let payload = format!(
            r#"{{"ts":{},"value":{},"seq":{seq}}}"#,
            start_ms + seq * 10_000,
            400 + seq % 600
        );
        (format!("co2/{device}"), payload.into_bytes())
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_keeps_rollups_through_redeliveries_and_late_readings_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/co2.db?mode=rwc", dir.path().display());
    broker_keeps_rollups_through_redeliveries_and_late_readings(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_keeps_rollups_through_redeliveries_and_late_readings_in_mariadb() {
    let url = MariaDb::shared().create_database("rollups_e2e").await;
    broker_keeps_rollups_through_redeliveries_and_late_readings(&url).await;
}

async fn broker_keeps_rollups_through_redeliveries_and_late_readings(url: &str) {
    let broker = TestBroker::start(url).await;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let live = payloads("pi-live", now_ms - 3_600_000, 0..400);
    let backlog = payloads("pi-live", now_ms - 4 * 86_400_000, 0..300);
    // Everything once, then everything again from another connection (an agent that never
    // saw its acks), the backlog interleaved.
    for (i, messages) in [live.clone(), backlog.clone(), live[100..].to_vec(), backlog]
        .into_iter()
        .enumerate()
    {
        mqtt::publish_all(
            broker.setup.v4,
            format!("pi-live-{i}"),
            QoS::AtLeastOnce,
            messages,
        )
        .await;
    }
    eventually(
        Duration::from_secs(30),
        "1,300 readings processed",
        || async {
            let m = &broker.metrics;
            (m.stored.load(Relaxed) + m.duplicates.load(Relaxed) == 1_300).then_some(())
        },
    )
    .await;
    assert_eq!(broker.metrics.stored.load(Relaxed), 700);
    let conn = db::connect(url).await;
    assert_rollups_match_readings(&conn, "through the broker").await;
    broker.stop().await;
}

/// The database is SIGKILLed while readings arrive: what was spooled is replayed after it
/// comes back, and the rollups count every reading once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_count_a_spool_replay_once() {
    let mut mariadb = MariaDb::start();
    let url = mariadb.create_database("rollups_spool").await;
    let broker = TestBroker::start(&url).await;
    let addr = broker.setup.v4;
    let start_ms = chrono::Utc::now().timestamp_millis() - 86_400_000;
    let all = payloads("pi-spool", start_ms, 0..1_500);

    mqtt::publish_all(
        addr,
        "pi-spool-1".into(),
        QoS::AtLeastOnce,
        all[..500].to_vec(),
    )
    .await;
    mariadb = tokio::task::spawn_blocking(move || {
        mariadb.kill();
        mariadb
    })
    .await
    .unwrap();
    // Spooled: new readings, and some already stored (the agent resending unacked ones).
    mqtt::publish_all(
        addr,
        "pi-spool-2".into(),
        QoS::AtLeastOnce,
        all[400..1_000].to_vec(),
    )
    .await;
    eventually(Duration::from_secs(30), "readings spooled", || async {
        (broker.metrics.spooled.load(Relaxed) > 0).then_some(())
    })
    .await;
    mariadb = tokio::task::spawn_blocking(move || {
        mariadb.restart();
        mariadb
    })
    .await
    .unwrap();
    mqtt::publish_all(
        addr,
        "pi-spool-3".into(),
        QoS::AtLeastOnce,
        all[900..].to_vec(),
    )
    .await;

    let conn = db::connect(&url).await;
    eventually(Duration::from_secs(60), "1,500 readings", || async {
        (db::reading_count(&conn).await == 1_500).then_some(())
    })
    .await;
    eventually(Duration::from_secs(30), "the spool replayed", || async {
        (broker.metrics.spool_batches.load(Relaxed) == 0).then_some(())
    })
    .await;
    assert!(
        broker.metrics.replayed.load(Relaxed) > 0,
        "the spool was replayed"
    );
    assert_rollups_match_readings(&conn, "after a spool replay").await;
    broker.stop().await;
    drop(mariadb);
}

/// A seed database (the two-column `co2_emissions`) is adopted by the migrations, which leave
/// the rollups empty; `co2-broker rollups rebuild`, the real binary with a real config file,
/// fills them from the adopted readings. Its mistakes are named and fail with status 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_command_fills_the_rollups_of_adopted_legacy_readings() {
    let url = MariaDb::shared().create_database("rollups_cli").await;
    let conn = db::connect(&url).await;
    conn.execute_unprepared(
        "CREATE TABLE co2_emissions (date_time DATETIME, emissions DOUBLE(7,2));
         INSERT INTO co2_emissions VALUES
           ('2020-07-13 22:43:23', 3500.00), ('2020-07-13 22:43:53', 3400.50),
           ('2020-07-13 22:44:10', 3300.25), ('2020-07-14 01:00:00', 700.00),
           (NULL, 500.00), ('2020-07-14 01:00:30', NULL)",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let setup = crate::support::broker::config_file(dir.path(), &url, "");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_co2-broker"))
            .arg("--config")
            .arg(&setup.config_path)
            .args(args)
            .output()
            .expect("co2-broker runs")
    };

    let out = run(&[
        "rollups",
        "rebuild",
        "--from",
        "2020-07-13",
        "--to",
        "2020-07-15",
    ]);
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("3 minute rows, 2 hour rows"), "{printed}");
    assert_rollups_match_readings(&conn, "adopted legacy readings").await;
    assert_eq!(
        stored(&conn, Level::Hour).await[&("legacy".to_owned(), at("2020-07-13 22:00:00"))]
            .readings,
        3
    );

    let out = run(&[
        "rollups",
        "rebuild",
        "--from",
        "2020-07-15",
        "--to",
        "2020-07-13",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be before --to"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_rollup_update_keeps_the_readings_in_mariadb() {
    let url = MariaDb::shared().create_database("rollups_refused").await;
    a_refused_rollup_update_keeps_the_readings(
        &url,
        "CREATE TRIGGER refuse_hours BEFORE INSERT ON co2_rollup_hour FOR EACH ROW \
         SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'refused by policy'",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_rollup_update_keeps_the_readings_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/co2.db?mode=rwc", dir.path().display());
    a_refused_rollup_update_keeps_the_readings(
        &url,
        "CREATE TRIGGER refuse_hours BEFORE INSERT ON co2_rollup_hour \
         BEGIN SELECT RAISE(ABORT, 'refused by policy'); END",
    )
    .await;
}

/// The database refuses the hour rollup (a real trigger, as a policy or an altered table
/// would): the readings are still stored, not rejected; once the trigger is gone, a rebuild
/// brings the rollups back in line.
async fn a_refused_rollup_update_keeps_the_readings(url: &str, trigger: &str) {
    let db = Database::connect(&DatabaseUrl::new(url), 2).await.unwrap();
    db.migrate().await.unwrap();
    let conn = db.connection();
    conn.execute_unprepared(trigger).await.unwrap();
    let start = at("2026-12-01 23:40:00");
    let outcome = write(&db, &batch(readings("pi-r", start, 0..400))).await;
    assert_eq!((outcome.stored, outcome.duplicates), (400, 0));
    assert_eq!(db::reading_count(conn).await, 400);
    assert!(db::rejections(conn).await.is_empty());
    assert!(stored(conn, Level::Hour).await.is_empty(), "refused");

    conn.execute_unprepared("DROP TRIGGER refuse_hours")
        .await
        .unwrap();
    rollups::rebuild(conn, start, start + TimeDelta::hours(1), None)
        .await
        .unwrap();
    assert_rollups_match_readings(conn, "rebuilt after the refusal").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_while_batches_are_stored_in_mariadb() {
    let url = MariaDb::shared()
        .create_database("rollups_rebuild_live")
        .await;
    rebuild_while_batches_are_stored(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_while_batches_are_stored_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/co2.db?mode=rwc", dir.path().display());
    rebuild_while_batches_are_stored(&url).await;
}

/// `rollups rebuild` runs while the broker stores batches into the same buckets: whichever
/// waits for whom, no reading is lost from the rollups or counted twice.
async fn rebuild_while_batches_are_stored(url: &str) {
    let db = Database::connect(&DatabaseUrl::new(url), 4).await.unwrap();
    db.migrate().await.unwrap();
    let start = at("2026-12-01 12:00:00");
    let writer = {
        let db = db.clone();
        tokio::spawn(async move {
            for i in 0..40 {
                let mut rows = readings("pi-w", start, i * 25..i * 25 + 25);
                rows.extend(readings("pi-v", start, i * 25..i * 25 + 30));
                write(&db, &batch(rows)).await;
            }
        })
    };
    let rebuilds = {
        let db = db.clone();
        tokio::spawn(async move {
            for _ in 0..10 {
                rollups::rebuild(db.connection(), start, start + TimeDelta::hours(3), None)
                    .await
                    .expect("rebuild while batches are stored");
            }
        })
    };
    writer.await.unwrap();
    rebuilds.await.unwrap();
    assert_eq!(db::reading_count(db.connection()).await, 2_005); // pi-v overlaps by 5
    assert_rollups_match_readings(db.connection(), "rebuilt while batches were stored").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_from_before_the_rollup_tables_get_rollups_in_the_background_in_mariadb() {
    let url = MariaDb::shared().create_database("rollups_backfill").await;
    readings_from_before_the_rollup_tables_get_rollups_in_the_background(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_from_before_the_rollup_tables_get_rollups_in_the_background_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/co2.db?mode=rwc", dir.path().display());
    readings_from_before_the_rollup_tables_get_rollups_in_the_background(&url).await;
}

/// An installation upgraded from before migration 4: its readings have no rollups. The broker
/// fills them by itself after the upgrade (migration 6 records the span), newest day first,
/// and clears the span once done. A fresh installation has no span.
async fn readings_from_before_the_rollup_tables_get_rollups_in_the_background(url: &str) {
    let conn = db::connect(url).await;
    Migrator::up(&conn, Some(3)).await.unwrap();
    let db = Database::connect(&DatabaseUrl::new(url), 2).await.unwrap();
    let start = at("2026-11-20 08:00:00");
    for (device, from) in [("pi-old", start), ("pi-older", start - TimeDelta::days(3))] {
        // Stored by a broker of before the rollups (here: the rollup tables do not exist yet,
        // so the readings are stored without them).
        db.write(&batch(readings(device, from, 0..600)))
            .await
            .unwrap();
    }
    assert_eq!(db::reading_count(&conn).await, 1_200);
    // Before migration 6 the backfill finds no table, and says so (it waits, not fails).
    let missing = rollup_backfill::remaining(&conn).await.unwrap_err();
    assert!(is_missing_table(&missing), "{missing}");

    let broker = TestBroker::start(url).await;
    eventually(Duration::from_secs(30), "backfill done", || async {
        rollup_backfill::remaining(&conn)
            .await
            .ok()
            .flatten()
            .is_none()
            .then_some(())
    })
    .await;
    assert_rollups_match_readings(&conn, "filled in the background").await;
    broker.stop().await;

    let fresh = tempfile::tempdir().unwrap();
    let fresh_url = format!("sqlite://{}/fresh.db?mode=rwc", fresh.path().display());
    let fresh_db = Database::connect(&DatabaseUrl::new(&fresh_url), 1)
        .await
        .unwrap();
    fresh_db.migrate().await.unwrap();
    assert_eq!(
        rollup_backfill::remaining(fresh_db.connection())
            .await
            .unwrap(),
        None
    );
}
