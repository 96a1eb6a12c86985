//! Real faults, injected for real: the database SIGKILLed mid-stream, the broker SIGTERMed or
//! SIGKILLed with readings in its spool, a corrupt spool record and a torn tail, bad payloads
//! among good ones, a value the database refuses, a deadlock the broker's write loses, writes
//! killed by `KILL QUERY` / `KILL CONNECTION`.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use co2_broker::ingest::Batch;
use rumqttc::QoS;
use sea_orm::{ConnectionTrait, DbBackend, Statement};

use crate::support::broker::{config_file, scrape, BrokerProcess, BrokerSetup, TestBroker};
use crate::support::mariadb::MariaDb;
use crate::support::{db, eventually, mqtt};

/// `n` JSON readings of `device` with sequence numbers `first..first+n`.
fn readings(device: &str, first: u64, n: u64) -> Vec<(String, Vec<u8>)> {
    (first..first + n)
        .map(|seq| {
            let payload = format!(
                r#"{{"ts":{},"value":{},"seq":{seq}}}"#,
                1_763_978_400_000 + seq * 1000,
                400 + seq % 600
            );
            (format!("co2/{device}"), payload.into_bytes())
        })
        .collect()
}

/// Distinct (device, seq) pairs stored, and the total row count.
async fn stored_identities(url: &str) -> (usize, u64) {
    let conn = db::connect(url).await;
    let rows = db::readings(&conn).await;
    let distinct: HashSet<_> = rows.iter().map(|r| (r.device_id.clone(), r.seq)).collect();
    (distinct.len(), rows.len() as u64)
}

async fn wait_for_rows(url: &str, expected: u64, timeout: Duration) {
    let conn = db::connect(url).await;
    eventually(timeout, &format!("{expected} rows"), || async {
        (db::reading_count(&conn).await == expected).then_some(())
    })
    .await;
}

async fn wait_for_metric(setup: &BrokerSetup, name: &str, expected: f64) {
    eventually(
        Duration::from_secs(30),
        &format!("{name} = {expected}"),
        || async { (scrape(setup.http, name).await == Some(expected)).then_some(()) },
    )
    .await;
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// What a DBA (or a proxy) does to the broker's connections mid-write: `KILL QUERY` and
/// `KILL CONNECTION`. MariaDB then answers 1317 or 1927, which say nothing about the rows:
/// nothing may be recorded as refused, nothing lost, nothing stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_mid_write_lose_nothing_and_refuse_nothing() {
    let mariadb = MariaDb::shared();
    let url = mariadb.create_database("connkill").await;
    let database = url.rsplit('/').next().unwrap().to_owned();
    let broker = TestBroker::start(&url).await;
    const N: u64 = 6_000;
    // Every 500th reading makes its write linger, so the killer finds writes running.
    db::connect(&url)
        .await
        .execute_unprepared(
            "CREATE TRIGGER linger BEFORE INSERT ON co2_emissions FOR EACH ROW \
             IF NEW.seq % 500 = 0 THEN DO SLEEP(0.3); END IF",
        )
        .await
        .expect("CREATE TRIGGER");

    let admin = mariadb.connect("").await;
    // Kills 6 lingering writes (or gives up after 30 s), then lets the broker catch up.
    const KILLS: u32 = 6;
    let killer = tokio::spawn(async move {
        let mut kills = 0u32;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while kills < KILLS && tokio::time::Instant::now() < deadline {
            let lingering = admin
                .query_all_raw(Statement::from_sql_and_values(
                    DbBackend::MySql,
                    "SELECT ID FROM information_schema.PROCESSLIST \
                     WHERE DB = ? AND ID <> CONNECTION_ID() AND COMMAND IN ('Query', 'Execute') AND TIME_MS > 100",
                    [database.clone().into()],
                ))
                .await
                .unwrap();
            for row in lingering {
                let id: i64 = row.try_get_by_index(0).unwrap();
                let how = if kills % 2 == 0 {
                    "QUERY"
                } else {
                    "CONNECTION"
                };
                // The statement may have ended meanwhile: "unknown thread" is fine.
                if admin
                    .execute_unprepared(&format!("KILL {how} {id}"))
                    .await
                    .is_ok()
                {
                    kills += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        kills
    });
    for part in 0..3 {
        mqtt::publish_all(
            broker.setup.v4,
            format!("pi-connkill-{part}"),
            QoS::AtLeastOnce,
            readings("pi-connkill", part * N / 3, N / 3),
        )
        .await;
    }
    let kills = killer.await.unwrap();
    assert_eq!(kills, KILLS, "only {kills} writes were caught running");

    wait_for_rows(&url, N, Duration::from_secs(60)).await;
    assert_eq!(stored_identities(&url).await, (N as usize, N));
    let conn = db::connect(&url).await;
    assert_eq!(
        db::rejections(&conn).await,
        vec![],
        "good rows recorded as refused"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_sigkilled_mid_stream_loses_nothing() {
    let mut mariadb = MariaDb::start();
    let url = mariadb.create_database("dbkill").await;
    let broker = TestBroker::start(&url).await;
    let addr = broker.setup.v4;
    const N: u64 = 6_000;

    mqtt::publish_all(
        addr,
        "pi-kill-1".into(),
        QoS::AtLeastOnce,
        readings("pi-kill", 0, N / 3),
    )
    .await;
    mariadb = blocking(move || {
        mariadb.kill();
        mariadb
    })
    .await;
    mqtt::publish_all(
        addr,
        "pi-kill-2".into(),
        QoS::AtLeastOnce,
        readings("pi-kill", N / 3, N / 3),
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "readings spooled while the database is dead",
        || async { (broker.metrics.spooled.load(Relaxed) > 0).then_some(()) },
    )
    .await;
    mariadb = blocking(move || {
        mariadb.restart();
        mariadb
    })
    .await;
    mqtt::publish_all(
        addr,
        "pi-kill-3".into(),
        QoS::AtLeastOnce,
        readings("pi-kill", 2 * N / 3, N - 2 * N / 3),
    )
    .await;

    wait_for_rows(&url, N, Duration::from_secs(60)).await;
    assert_eq!(stored_identities(&url).await, (N as usize, N));
    let m = &broker.metrics;
    assert!(m.replayed.load(Relaxed) > 0, "the spool was replayed");
    assert_eq!(m.spool_refused.load(Relaxed), 0);
    broker.stop().await;
    drop(mariadb);
}

/// The broker stops (gracefully or not) while its spool holds readings and the database is
/// down; the next start replays them.
async fn broker_restart_replays_the_spool(graceful: bool) {
    let mut mariadb = MariaDb::start();
    let url = mariadb.create_database("restart").await;
    let dir = tempfile::tempdir().unwrap();
    let setup = config_file(dir.path(), &url, "batch_max_rows = 100");
    let broker = BrokerProcess::spawn(&setup).await;
    const N: u64 = 3_000;
    mqtt::publish_all(
        setup.v4,
        "pi-r-1".into(),
        QoS::AtLeastOnce,
        readings("pi-r", 0, 500),
    )
    .await;
    wait_for_rows(&url, 500, Duration::from_secs(30)).await;

    mariadb = blocking(move || {
        mariadb.kill();
        mariadb
    })
    .await;
    mqtt::publish_all(
        setup.v4,
        "pi-r-2".into(),
        QoS::AtLeastOnce,
        readings("pi-r", 500, N - 500),
    )
    .await;
    // Everything after the kill is in the spool (and acked) before the broker goes down.
    wait_for_metric(&setup, "co2_spooled_total", (N - 500) as f64).await;

    if graceful {
        let (code, log) = broker.terminate();
        assert_eq!(code, Some(0), "SIGTERM exits 0; log:\n{log}");
        // Restart while the database is still down: the broker must come up and keep spooling.
        let broker = BrokerProcess::spawn(&setup).await;
        mqtt::publish_all(
            setup.v4,
            "pi-r-3".into(),
            QoS::AtLeastOnce,
            readings("pi-r", N, 100),
        )
        .await;
        wait_for_metric(&setup, "co2_spooled_total", 100.0).await;
        mariadb = blocking(move || {
            mariadb.restart();
            mariadb
        })
        .await;
        wait_for_rows(&url, N + 100, Duration::from_secs(60)).await;
        assert_eq!(stored_identities(&url).await, (N as usize + 100, N + 100));
        let log = broker.terminate().1;
        assert!(log.contains("database unreachable at start"), "{log}");
        assert!(
            log.contains("spool holds batches from an earlier run"),
            "{log}"
        );
    } else {
        let _ = broker.kill();
        mariadb = blocking(move || {
            mariadb.restart();
            mariadb
        })
        .await;
        let broker = BrokerProcess::spawn(&setup).await;
        wait_for_rows(&url, N, Duration::from_secs(60)).await;
        assert_eq!(stored_identities(&url).await, (N as usize, N));
        let log = broker.terminate().1;
        assert!(
            log.contains("spool holds batches from an earlier run"),
            "{log}"
        );
    }
    drop(mariadb);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_sigterm_with_a_full_spool_then_restart_stores_everything_once() {
    broker_restart_replays_the_spool(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_sigkill_with_a_full_spool_then_restart_stores_everything_once() {
    broker_restart_replays_the_spool(false).await;
}

/// Counts the readings of every record in the spool's segments, oldest first.
fn spool_records(spool_dir: &std::path::Path) -> Vec<(std::path::PathBuf, u64, usize)> {
    let mut segments: Vec<_> = std::fs::read_dir(spool_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segments.sort();
    let mut records = Vec::new();
    for segment in segments {
        let bytes = std::fs::read(&segment).unwrap();
        let mut offset = 0usize;
        while offset + 8 <= bytes.len() {
            let len = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap()) as usize;
            let body = &bytes[offset + 8..offset + 8 + len];
            let batch: Batch = serde_json::from_slice(body).unwrap();
            records.push((segment.clone(), offset as u64, batch.readings.len()));
            offset += 8 + len;
        }
    }
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_spool_record_and_torn_tail_are_skipped_with_a_warning_and_the_rest_stored() {
    let mut mariadb = MariaDb::start();
    let url = mariadb.create_database("corrupt").await;
    let dir = tempfile::tempdir().unwrap();
    let setup = config_file(
        dir.path(),
        &url,
        "batch_max_rows = 50\nbatch_max_delay_ms = 5",
    );
    let broker = BrokerProcess::spawn(&setup).await;
    mariadb = blocking(move || {
        mariadb.kill();
        mariadb
    })
    .await;
    const N: u64 = 1_000;
    for chunk in 0..10 {
        mqtt::publish_all(
            setup.v4,
            format!("pi-c-{chunk}"),
            QoS::AtLeastOnce,
            readings("pi-c", chunk * 100, 100),
        )
        .await;
    }
    wait_for_metric(&setup, "co2_spooled_total", N as f64).await;
    let (code, _) = broker.terminate();
    assert_eq!(code, Some(0));

    let records = spool_records(&setup.data_dir.join("spool"));
    assert!(records.len() >= 3, "several batches spooled: {records:?}");
    // Flip a byte inside a record in the middle, as a bad sector would: the batches after it
    // were acked to their agents too, and must survive it.
    let (segment, offset, lost) = records[records.len() / 2].clone();
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[offset as usize + 12] ^= 0x55;
    // And tear the last record, as a power cut mid-write would.
    let (last_segment, last_offset, torn) = records.last().cloned().unwrap();
    assert_eq!(last_segment, segment, "one segment");
    bytes.truncate(last_offset as usize + 20);
    std::fs::write(&segment, bytes).unwrap();

    mariadb = blocking(move || {
        mariadb.restart();
        mariadb
    })
    .await;
    let broker = BrokerProcess::spawn(&setup).await;
    let expected = N - (lost + torn) as u64;
    wait_for_rows(&url, expected, Duration::from_secs(60)).await;
    let log = broker.terminate().1;
    assert!(log.contains("spool segment holds corrupt records"), "{log}");
    assert!(log.contains("spool segment ends in a torn record"), "{log}");
    assert_eq!(stored_identities(&url).await, (expected as usize, expected));
    drop(mariadb);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_are_rejected_and_good_ones_in_the_same_batch_stored() {
    let url = MariaDb::shared().create_database("mixed").await;
    let broker = TestBroker::start(&url).await;
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "co2/mix",
            b"{\"value\":".to_vec(),
            "JSON payload: EOF while parsing a value at line 1 column 9",
        ),
        (
            "co2/mix",
            b"-3".to_vec(),
            "CO2 value -3 outside 0..=100000 ppm",
        ),
        ("co2/mix", vec![0xc3, 0x28, 0x31], "payload is not UTF-8"),
        (
            "co2//nodevice",
            b"500".to_vec(),
            "topic has no device id after co2/",
        ),
        (
            "co2/mix",
            b"2020-13-40 1:1:1|400".to_vec(),
            "legacy payload: no such date",
        ),
        (
            "co2/mix",
            br#"{"value":500,"unit":"%"}"#.to_vec(),
            "unit \"%\" is not supported (only ppm)",
        ),
    ];
    let mut messages = Vec::new();
    for round in 0..50u64 {
        messages.extend(readings("mix", round * 4, 4));
        for (topic, payload, _) in &bad {
            messages.push((topic.to_string(), payload.clone()));
        }
    }
    mqtt::publish_all(broker.setup.v4, "mixer".into(), QoS::AtLeastOnce, messages).await;
    wait_for_rows(&url, 200, Duration::from_secs(30)).await;
    let conn = db::connect(&url).await;
    let rejected = eventually(Duration::from_secs(10), "300 rejections", || async {
        let r = db::rejections(&conn).await;
        (r.len() == 300).then_some(r)
    })
    .await;
    for (topic, payload, reason) in &bad {
        let matching = rejected
            .iter()
            .filter(|r| r.reason == *reason)
            .collect::<Vec<_>>();
        assert_eq!(matching.len(), 50, "reason {reason:?}");
        assert_eq!(matching[0].topic, *topic);
        assert_eq!(matching[0].payload_bytes as usize, payload.len());
    }
    let per_batch = conn
        .query_all_raw(Statement::from_string(
            conn.get_database_backend(),
            "SELECT COUNT(*) FROM co2_emissions WHERE device_id = 'mix'",
        ))
        .await
        .unwrap();
    assert_eq!(per_batch.len(), 1);
    assert_eq!(broker.metrics.rejected.load(Relaxed), 300);
    assert_eq!(broker.metrics.stored.load(Relaxed), 200);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_readings_are_stored_once() {
    let url = MariaDb::shared().create_database("dedup").await;
    let broker = TestBroker::start(&url).await;
    let batch = readings("pi-dup", 0, 300);
    // An agent that crashed before seeing its acks sends everything again, twice.
    for attempt in 0..3 {
        mqtt::publish_all(
            broker.setup.v4,
            format!("pi-dup-{attempt}"),
            QoS::AtLeastOnce,
            batch.clone(),
        )
        .await;
    }
    mqtt::publish_one(broker.setup.v4, "co2/pi-dup", "2020-7-13 22:43:23|500").await;
    mqtt::publish_one(broker.setup.v4, "co2/pi-dup", "2020-7-13 22:43:23|500").await;
    eventually(
        Duration::from_secs(30),
        "all 902 messages processed",
        || async {
            let m = &broker.metrics;
            (m.stored.load(Relaxed) + m.duplicates.load(Relaxed) == 902).then_some(())
        },
    )
    .await;
    assert_eq!(broker.metrics.stored.load(Relaxed), 301);
    assert_eq!(broker.metrics.duplicates.load(Relaxed), 601);
    assert_eq!(stored_identities(&url).await.1, 301);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_the_database_refuses_is_recorded_and_blocks_nothing() {
    let url = MariaDb::shared().create_database("refuse").await;
    let broker = TestBroker::start(&url).await;
    let conn = db::connect(&url).await;
    // A real refusal from the real database: a trigger that rejects one value (as a policy, a
    // constraint or a full disk would reject a statement while the server stays up).
    conn.execute_unprepared(
        "CREATE TRIGGER refuse_4242 BEFORE INSERT ON co2_emissions FOR EACH ROW \
         IF NEW.emissions = 4242 THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'refused by policy'; END IF",
    )
    .await
    .unwrap();
    let mut messages = readings("pi-refuse", 0, 50);
    messages.insert(
        25,
        (
            "co2/pi-refuse".into(),
            br#"{"value":4242,"seq":999}"#.to_vec(),
        ),
    );
    mqtt::publish_all(
        broker.setup.v4,
        "pi-refuse-1".into(),
        QoS::AtLeastOnce,
        messages,
    )
    .await;
    wait_for_rows(&url, 50, Duration::from_secs(30)).await;
    let rejected = eventually(
        Duration::from_secs(10),
        "the refused reading recorded",
        || async {
            let r = db::rejections(&conn).await;
            (r.len() == 1).then_some(r)
        },
    )
    .await;
    assert!(
        rejected[0].reason.contains("refused by policy"),
        "{:?}",
        rejected[0]
    );
    assert!(rejected[0].payload.contains("4242"), "{:?}", rejected[0]);
    // Nothing is stuck behind it: later readings are stored at once, nothing was spooled.
    mqtt::publish_all(
        broker.setup.v4,
        "pi-refuse-2".into(),
        QoS::AtLeastOnce,
        readings("pi-refuse", 50, 10),
    )
    .await;
    wait_for_rows(&url, 60, Duration::from_secs(10)).await;
    assert_eq!(broker.metrics.spooled.load(Relaxed), 0);
    assert_eq!(broker.metrics.rejected.load(Relaxed), 1);
    broker.stop().await;
}

/// A real deadlock between the broker's write and another transaction, which MariaDB resolves
/// by rolling the broker's back: the batch is written again (not salvaged row by row, which
/// would record the reading as refused), stored once, and the conflict counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_loses_a_deadlock_is_written_again() {
    use sea_orm::TransactionTrait;

    let url = MariaDb::shared().create_database("deadlock").await;
    let broker = TestBroker::start(&url).await;
    let conn = db::connect(&url).await;
    conn.execute_unprepared("CREATE TABLE scratch (n INT)")
        .await
        .unwrap();
    // The other transaction holds the `devices` row the broker's write will want, and is the
    // bigger one (5,000 rows), so MariaDB picks the broker's as the deadlock victim.
    let other = conn.begin().await.unwrap();
    other
        .execute_unprepared("INSERT INTO scratch SELECT seq FROM seq_1_to_5000")
        .await
        .unwrap();
    other
        .execute_unprepared(
            "INSERT INTO devices VALUES ('pi-dl', '2026-11-30 00:00:00', '2026-11-30 00:00:00')",
        )
        .await
        .unwrap();

    mqtt::publish_one(
        broker.setup.v4,
        "co2/pi-dl",
        r#"{"ts":"2026-11-30T10:00:00.000Z","value":500,"seq":1}"#,
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the broker's write waiting for the devices row",
        || async {
            let waiting = conn
                .query_one_raw(Statement::from_string(
                    conn.get_database_backend(),
                    // Still running means waiting: alone it takes microseconds.
                    "SELECT COUNT(*) AS n FROM information_schema.processlist \
                     WHERE info LIKE 'INSERT INTO `devices`%'",
                ))
                .await
                .unwrap()
                .and_then(|row| row.try_get::<i64>("", "n").ok())
                .unwrap_or(0);
            (waiting > 0).then_some(())
        },
    )
    .await;
    // Close the cycle: ask for the reading row the broker's transaction has inserted.
    other
        .execute_unprepared(
            "INSERT IGNORE INTO co2_emissions \
             (date_time, emissions, device_id, topic, received_at, seq, dedup_key) \
             VALUES ('2026-11-30 10:00:00.000', 1, 'pi-dl', 'co2/pi-dl', \
                     '2026-11-30 10:00:00.000', 1, 't1796032800000s1')",
        )
        .await
        .unwrap();
    other.rollback().await.unwrap();

    wait_for_rows(&url, 1, Duration::from_secs(10)).await;
    let rows = db::readings(&conn).await;
    assert_eq!(
        (rows[0].device_id.as_str(), rows[0].emissions),
        ("pi-dl", Some(500.0)),
        "the broker's reading, not the other transaction's"
    );
    assert_eq!(broker.metrics.write_conflicts.load(Relaxed), 1);
    assert_eq!(broker.metrics.rejected.load(Relaxed), 0);
    assert_eq!(broker.metrics.spooled.load(Relaxed), 0);
    assert_eq!(db::devices(&conn).await.len(), 1);
    broker.stop().await;
}
