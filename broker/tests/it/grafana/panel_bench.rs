//! The dashboard benchmark of issue 11: how long every panel of the shipped dashboards, their
//! variable and the alert rule queries take on MariaDB holding a year of a 100-device fleet at
//! one reading per 10 s, for ranges of 1 hour to 1 year ending now. Ignored by `cargo test`
//! (loading takes minutes); `./scripts/panel-bench` runs it and prints the tables that README.md
//! "Dashboard speed" shows.
//!
//! **What is loaded** (sizes from `PANEL_BENCH_*`, see [`Sizes`]). A year of 100 devices at
//! 10 s is 315 M readings (~57 GB with indexes at the 181 B per row measured here), hours of
//! loading on this machine, so by default only what the dashboard can read at a cost that grows
//! with the data is loaded in full, the rest is synthesised where it is read:
//! - raw readings (`co2_emissions`), every device every 10 s, for the last `RAW_DAYS` (14) days:
//!   the raw branch of "CO2 per device" and "Readings per minute" serves ranges up to 6 hours
//!   (1 day in the first dashboard: with 14 days MariaDB planned a 1-day range as an index
//!   range scan as it would on a year; with 7 it scanned the table); the other raw-row queries (latest
//!   value, recent readings, the silent panel's "Last measured", the CO2 alert) read only the
//!   newest entries of an index, whatever the range (their `EXPLAIN` is printed to check);
//! - `co2_rollup_minute` for the last `MINUTE_DAYS` (30) days (the minute branch serves
//!   ranges up to 3 days): computed from the raw rows by the broker's own
//!   `rollups::rebuild` where raw rows exist, synthesised before that (6 readings a minute);
//! - `co2_rollup_hour` for the last `HOUR_DAYS` (365) days (the hour branch serves ranges
//!   beyond 3 days): from `rebuild` over the raw days, from the synthesised minute rows by
//!   the broker's `rollups::recompute`, and synthesised directly before the minute rows;
//! - `devices` (every 25th device silent for 2 hours, the others seen at the end of the load)
//!   and one rejected message every 10 minutes over the year.
//!
//! Values follow a daily cycle per device plus noise, the same function at every level, so the
//! series runs on across the boundaries. All rows are made inside MariaDB (`seq_0_to_N`
//! sequence tables, `INSERT … SELECT`, one day per statement), not through MQTT: the ingest
//! path has its own benchmark (`./scripts/bench`).
//!
//! **What is timed**: each query rendered exactly as Grafana sends it ([`render`]), with the
//! interval Grafana picks for the panel's width ([`grafana_interval`]), run as the read-only
//! account of grafana/README.md over a session like the data source's; once after a clean
//! restart of the loaded server (empty buffer pool; the OS may still cache the files: "first")
//! and then `RUNS` (5) times ("median"), with Device = All and with one device. A query whose
//! `GROUP BY` or sort spilled an internal temporary table to disk is flagged: that is what
//! makes the many-series queries slow at MariaDB's default 16 MB in-memory limit.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use chrono::{DateTime, DurationRound, NaiveDateTime, TimeDelta, Utc};
use co2_broker::settings::DatabaseUrl;
use co2_broker::storage::rollups::{self, Level, Span};
use co2_broker::storage::Database;
use sea_orm::sqlx::mysql::MySqlConnection;
use sea_orm::sqlx::{AssertSqlSafe, Connection, Executor};
use sea_orm::{ConnectionTrait, DbBackend};
use serde_json::Value;

use super::files::{list, panels, Provisioning, DATASOURCE_UID};
use super::frame;
use super::render::{format_interval, parse_interval, render, Scope, TimeRange, VariableValue};
use super::{execute, grafana_session, read_only_account, variable_selections};
use crate::support::mariadb::MariaDb;

/// The ranges every panel is timed on, ending now. 7 days is the one range here that the
/// minute rollup serves.
const RANGES: [(&str, i64); 5] = [
    ("1 h", 3_600),
    ("1 d", 86_400),
    ("7 d", 7 * 86_400),
    ("30 d", 30 * 86_400),
    ("1 y", 365 * 86_400),
];

/// How much is loaded and how often each query runs, from the environment (`./scripts/panel-bench`
/// sets these from `DEVICES`, `RAW_DAYS`, ...).
#[derive(Debug)]
struct Sizes {
    devices: u32,
    raw_days: u32,
    minute_days: u32,
    hour_days: u32,
    runs: usize,
    buffer_pool: String,
    /// More `mariadbd` options, e.g. `--tmp-table-size=256M --max-heap-table-size=256M`.
    server_options: Vec<String>,
}

impl Sizes {
    fn from_env() -> Sizes {
        let number = |name: &str, default: u32| -> u32 {
            let key = format!("PANEL_BENCH_{name}");
            match std::env::var(&key) {
                Ok(v) => v
                    .parse()
                    .unwrap_or_else(|_| panic!("{key}={v:?} is not a whole number")),
                Err(_) => default,
            }
        };
        let sizes = Sizes {
            devices: number("DEVICES", 100),
            raw_days: number("RAW_DAYS", 14),
            minute_days: number("MINUTE_DAYS", 30),
            hour_days: number("HOUR_DAYS", 365),
            runs: number("RUNS", 5) as usize,
            buffer_pool: std::env::var("PANEL_BENCH_BUFFER_POOL").unwrap_or_else(|_| "2G".into()),
            server_options: std::env::var("PANEL_BENCH_MARIADB_OPTIONS")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
        };
        assert!(
            (1..=10_000).contains(&sizes.devices)
                && sizes.raw_days >= 1
                && sizes.raw_days <= sizes.minute_days
                && sizes.minute_days <= sizes.hour_days
                && sizes.runs >= 1,
            "need 1 ≤ DEVICES ≤ 10000, 1 ≤ RAW_DAYS ≤ MINUTE_DAYS ≤ HOUR_DAYS, RUNS ≥ 1: {sizes:?}"
        );
        sizes
    }
}

/// Where each kind of row starts. Every start is on the hour before `now`, so each rollup
/// row is either computed from the rows below it or synthesised, never half of each.
struct Timeline {
    now: NaiveDateTime,
    raw_start: NaiveDateTime,
    minute_start: NaiveDateTime,
    hour_start: NaiveDateTime,
    /// When the silent devices (every 25th) stopped sending.
    silent_since: NaiveDateTime,
}

impl Timeline {
    fn new(now: DateTime<Utc>, sizes: &Sizes) -> Timeline {
        let now = now.naive_utc();
        let top = now.duration_trunc(TimeDelta::hours(1)).unwrap_or(now);
        let days = |n: u32| top - TimeDelta::days(i64::from(n));
        Timeline {
            now,
            raw_start: days(sizes.raw_days),
            minute_start: days(sizes.minute_days),
            hour_start: days(sizes.hour_days),
            silent_since: now - TimeDelta::hours(2),
        }
    }
}

fn literal(t: NaiveDateTime) -> String {
    format!(
        "CAST('{}' AS DATETIME(3))",
        t.format("%Y-%m-%d %H:%M:%S%.3f")
    )
}

fn epoch_ms(t: NaiveDateTime) -> i64 {
    t.and_utc().timestamp_millis()
}

/// The smooth CO2 curve of device `d` at epoch second `e` (SQL expressions): a daily cycle
/// shifted per device around 650 ppm plus a slower wave, 340–960 ppm.
fn curve(e: &str, d: &str) -> String {
    format!(
        "(650 + 250 * SIN(2 * PI() * MOD({e} + {d} * 900, 86400) / 86400) \
         + 60 * SIN({e} / 3700 + {d}))"
    )
}

/// `pi-000`, `pi-001`, ... as SQL for device number `d`.
fn device_name(d: &str, devices: u32) -> String {
    let width = (devices.saturating_sub(1)).to_string().len().max(3);
    format!("CONCAT('pi-', LPAD({d}, {width}, '0'))")
}

/// Every device's readings at 10 s in `[start, end)`, in arrival order (time, then device),
/// each device a fixed fraction of a second late; the broker's identity `t<ms>s<seq>`.
fn raw_readings(
    sizes: &Sizes,
    timeline: &Timeline,
    start: NaiveDateTime,
    end: NaiveDateTime,
) -> String {
    let slots = (end - start).num_seconds() / 10;
    let first_seq = (start - timeline.hour_start).num_seconds() / 10;
    let start_ms = epoch_ms(start);
    format!(
        "INSERT INTO co2_emissions \
           (date_time, emissions, device_id, topic, received_at, seq, dedup_key) \
         SELECT t, ROUND({curve} + MOD(FLOOR(e / 10) * 7919 + d * 104729, 61) - 30, 1), \
           name, CONCAT('co2/', name), DATE_ADD(t, INTERVAL 350000 MICROSECOND), seq, \
           CONCAT('t', {start_ms} + offset_ms, 's', seq) \
         FROM ( \
           SELECT d, offset_ms, {first_seq} + i AS seq, ({start_ms} + offset_ms) / 1000 AS e, \
             DATE_ADD({start}, INTERVAL offset_ms * 1000 MICROSECOND) AS t, {name} AS name \
           FROM ( \
             SELECT d.seq AS d, s.seq AS i, s.seq * 10000 + MOD(d.seq * 37, 9000) AS offset_ms \
             FROM seq_0_to_{last_device} d STRAIGHT_JOIN seq_0_to_{last_slot} s \
           ) slots \
         ) readings \
         WHERE NOT (MOD(d, 25) = 7 AND t >= {silent})",
        curve = curve("e", "d"),
        name = device_name("d", sizes.devices),
        start = literal(start),
        last_device = sizes.devices - 1,
        last_slot = slots - 1,
        silent = literal(timeline.silent_since),
    )
}

/// Synthesised rollup rows of `level` for every device in `[start, end)`: the readings a
/// bucket would hold at one per 10 s, their mean on [`curve`] at the bucket's middle, ±30 ppm.
fn synthetic_rollups(
    sizes: &Sizes,
    level: Level,
    start: NaiveDateTime,
    end: NaiveDateTime,
) -> String {
    let width = level.width().num_seconds();
    let buckets = (end - start).num_seconds() / width;
    let start_s = start.and_utc().timestamp();
    format!(
        "INSERT INTO {table} (device_id, bucket_start, readings, emissions_sum, emissions_min, \
           emissions_max, first_time, last_time) \
         SELECT name, bucket, {per_bucket}, {per_bucket} * v, v - 30, v + 30, \
           DATE_ADD(bucket, INTERVAL jitter_us MICROSECOND), \
           DATE_ADD(bucket, INTERVAL {last_us} + jitter_us MICROSECOND) \
         FROM ( \
           SELECT {name} AS name, DATE_ADD(CAST('{start}' AS DATETIME), INTERVAL b.seq * {width} SECOND) AS bucket, \
             ROUND({curve}, 1) AS v, MOD(d.seq * 37, 9000) * 1000 AS jitter_us \
           FROM seq_0_to_{last_device} d STRAIGHT_JOIN seq_0_to_{last_bucket} b \
         ) buckets",
        table = level.table(),
        per_bucket = width / 10,
        last_us = (width - 10) * 1_000_000,
        name = device_name("d.seq", sizes.devices),
        start = start.format("%Y-%m-%d %H:%M:%S"),
        curve = curve(&format!("({start_s} + b.seq * {width} + {})", width / 2), "d.seq"),
        last_device = sizes.devices - 1,
        last_bucket = buckets - 1,
    )
}

/// `[start, end)` cut into pieces of at most `step`.
fn chunks(
    start: NaiveDateTime,
    end: NaiveDateTime,
    step: TimeDelta,
) -> Vec<(NaiveDateTime, NaiveDateTime)> {
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let next = (at + step).min(end);
        out.push((at, next));
        at = next;
    }
    out
}

/// Loads the fleet (see the module documentation); returns a report of what took how long.
async fn load(url: &str, sizes: &Sizes, timeline: &Timeline) -> String {
    let mut report = String::new();
    let db = Database::connect(&DatabaseUrl::new(url.to_owned()), 1)
        .await
        .expect("connect for migration");
    db.migrate().await.expect("migrate");
    let mut conn = MySqlConnection::connect(url).await.expect("connect");
    execute(&mut conn, "SET time_zone = '+00:00'").await;
    let total = Instant::now();
    let mut step = |what: &str, started: Instant| {
        let line = format!("- {what}: {:.1} s\n", started.elapsed().as_secs_f64());
        print!("{line}");
        report.push_str(&line);
    };

    let started = Instant::now();
    for (start, end) in chunks(timeline.raw_start, timeline.now, TimeDelta::days(1)) {
        execute(&mut conn, &raw_readings(sizes, timeline, start, end)).await;
    }
    step("raw readings", started);

    let started = Instant::now();
    let rebuilt = rollups::rebuild(db.connection(), timeline.raw_start, timeline.now, None)
        .await
        .expect("rollups rebuild over the raw days");
    step(
        &format!(
            "rollups::rebuild over the raw days ({} minute, {} hour rows)",
            rebuilt.minute_rows, rebuilt.hour_rows
        ),
        started,
    );

    let started = Instant::now();
    for (start, end) in chunks(
        timeline.minute_start,
        timeline.raw_start,
        TimeDelta::days(1),
    ) {
        execute(
            &mut conn,
            &synthetic_rollups(sizes, Level::Minute, start, end),
        )
        .await;
        let span = Span {
            device_id: None,
            start,
            end,
        };
        db.connection()
            .execute_raw(rollups::recompute(DbBackend::MySql, Level::Hour, &[span]))
            .await
            .expect("hour rows from the synthesised minute rows");
    }
    step(
        "synthesised minute rows before the raw days, their hour rows by rollups::recompute",
        started,
    );

    let started = Instant::now();
    for (start, end) in chunks(
        timeline.hour_start,
        timeline.minute_start,
        TimeDelta::days(30),
    ) {
        execute(
            &mut conn,
            &synthetic_rollups(sizes, Level::Hour, start, end),
        )
        .await;
    }
    step("synthesised hour rows before the minute rows", started);

    let started = Instant::now();
    execute(
        &mut conn,
        &format!(
            "INSERT INTO devices (device_id, first_seen, last_seen) \
             SELECT {name}, {first}, IF(MOD(s.seq, 25) = 7, \
               (SELECT MAX(r.received_at) FROM co2_emissions r WHERE r.device_id = {name}), \
               UTC_TIMESTAMP(3)) \
             FROM seq_0_to_{last} s",
            name = device_name("s.seq", sizes.devices),
            first = literal(timeline.hour_start),
            last = sizes.devices - 1,
        ),
    )
    .await;
    let rejections = (timeline.now - timeline.hour_start).num_minutes() / 10;
    execute(
        &mut conn,
        &format!(
            "INSERT INTO rejected_messages (received_at, topic, payload, payload_bytes, reason) \
             SELECT DATE_ADD({start}, INTERVAL seq * 10 MINUTE), 'co2/pi-000', 'x', 1, \
               'payload is not a reading' \
             FROM seq_0_to_{last}",
            start = literal(timeline.hour_start),
            last = rejections - 1,
        ),
    )
    .await;
    // InnoDB samples statistics in the background after bulk changes; settle them now so the
    // plans do not depend on when the sampling ran.
    execute(
        &mut conn,
        "ANALYZE TABLE co2_emissions, co2_rollup_minute, co2_rollup_hour, devices, rejected_messages",
    )
    .await;
    step("devices, rejected messages, ANALYZE TABLE", started);
    let line = format!("- load in total: {:.1} s\n", total.elapsed().as_secs_f64());
    print!("{line}");
    report.push_str(&line);
    conn.close().await.ok();
    report
}

/// Rows and size on disk of every table, as a Markdown table.
async fn table_sizes(conn: &mut MySqlConnection) -> String {
    let tables = frame::query(
        conn,
        "SELECT TABLE_NAME, ROUND((DATA_LENGTH + INDEX_LENGTH) / 1048576) \
         FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() \
           AND TABLE_NAME <> 'seaql_migrations' ORDER BY TABLE_NAME",
    )
    .await
    .expect("table sizes");
    let mut out = String::from(
        "| table | rows | MB (data + indexes) | from | to |\n| --- | --- | --- | --- | --- |\n",
    );
    for row in tables.rows {
        let name = row[0].clone().unwrap_or_default();
        let time = match name.as_str() {
            "co2_emissions" => "date_time",
            "co2_rollup_minute" | "co2_rollup_hour" => "bucket_start",
            "rejected_messages" => "received_at",
            "devices" => "last_seen",
            "rollup_backfill" => "readings_to",
            _ => continue,
        };
        let counted = frame::query(
            conn,
            &format!("SELECT COUNT(*), MIN({time}), MAX({time}) FROM {name}"),
        )
        .await
        .expect("count rows");
        let cell = |i: usize| counted.rows[0][i].clone().unwrap_or_default();
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} |",
            cell(0),
            row[1].clone().unwrap_or_default(),
            cell(1),
            cell(2)
        );
    }
    out
}

/// The `$__interval` Grafana gives a panel: the range over the panel's width in pixels
/// (its `maxDataPoints`), rounded to the next lower "nice" interval as Grafana's
/// `roundInterval` does, and at least the data source's `timeInterval`.
fn grafana_interval(range: TimeDelta, panel: &Value, minimum: Duration) -> Duration {
    // Grafana's steps: (raw interval below, rounded interval), in milliseconds. Finer steps
    // exist below 7.5 s; the data source's 10 s minimum overrides them.
    const NICE: [(u64, u64); 21] = [
        (7_500, 5_000),
        (12_500, 10_000),
        (17_500, 15_000),
        (25_000, 20_000),
        (45_000, 30_000),
        (90_000, 60_000),
        (210_000, 120_000),
        (450_000, 300_000),
        (750_000, 600_000),
        (1_050_000, 900_000),
        (1_500_000, 1_200_000),
        (2_700_000, 1_800_000),
        (5_400_000, 3_600_000),
        (9_000_000, 7_200_000),
        (16_200_000, 10_800_000),
        (32_400_000, 21_600_000),
        (86_400_000, 43_200_000),
        (604_800_000, 86_400_000),
        (1_814_400_000, 604_800_000),
        (3_628_800_000, 2_592_000_000),
        (u64::MAX, 31_536_000_000),
    ];
    let raw = range.num_milliseconds() as u64 / pixels(panel);
    let nice = NICE
        .iter()
        .find(|(below, _)| raw < *below)
        .map_or(31_536_000_000, |(_, nice)| *nice);
    Duration::from_millis(nice).max(minimum)
}

/// A panel's width in pixels on a 1920-pixel screen: its share of the 24-column grid.
fn pixels(panel: &Value) -> u64 {
    panel["gridPos"]["w"].as_u64().unwrap_or(24).clamp(1, 24) * 1_900 / 24
}

/// One query's timings.
struct Timing {
    first: Duration,
    median: Duration,
    rows: usize,
    /// Whether MariaDB had to write an internal temporary table to disk (its in-memory limit,
    /// `tmp_table_size` / `max_heap_table_size`, 16 MB by default, was too small): the usual
    /// reason a `GROUP BY` over many groups is slow.
    disk_temporary: bool,
}

async fn disk_temporary_tables(conn: &mut MySqlConnection) -> u64 {
    let status = frame::query(conn, "SHOW SESSION STATUS LIKE 'Created_tmp_disk_tables'")
        .await
        .expect("session status");
    status.rows[0][1]
        .as_deref()
        .and_then(|n| n.parse().ok())
        .expect("Created_tmp_disk_tables")
}

/// Runs `sql` once and returns how long it took and how many rows came back.
async fn run(conn: &mut MySqlConnection, sql: &str) -> (Duration, usize) {
    let started = Instant::now();
    let rows = conn
        .fetch_all(AssertSqlSafe(sql))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{sql}"))
        .len();
    (started.elapsed(), rows)
}

/// Runs `sql` once ("first"), then `runs` times; the median of those.
async fn time(conn: &mut MySqlConnection, sql: &str, runs: usize) -> Timing {
    let before = disk_temporary_tables(conn).await;
    let (first, rows) = run(conn, sql).await;
    // Counted around the first run only, so the status queries stay out of the timed runs.
    let disk_temporary = disk_temporary_tables(conn).await > before;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        times.push(run(conn, sql).await.0);
    }
    times.sort();
    Timing {
        first,
        median: times[times.len() / 2],
        rows,
        disk_temporary,
    }
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

fn cell(t: &Timing) -> String {
    let disk = if t.disk_temporary {
        "; tmp on disk"
    } else {
        ""
    };
    format!(
        "{} ms ({}; {} rows{disk})",
        ms(t.median),
        ms(t.first),
        t.rows
    )
}

/// `table:type:key:rows:Extra` for each row of the query's plan, for reading which index a
/// query uses and how many rows MariaDB expects to touch.
async fn plan(conn: &mut MySqlConnection, sql: &str) -> String {
    let explain = frame::query(conn, &format!("EXPLAIN {sql}"))
        .await
        .unwrap_or_else(|e| panic!("EXPLAIN: {e}\n{sql}"));
    let column = |name: &str| {
        explain
            .columns
            .iter()
            .position(|(n, _, _)| n == name)
            .expect("EXPLAIN column")
    };
    let picked = ["table", "type", "key", "rows", "Extra"].map(column);
    explain
        .rows
        .iter()
        .map(|row| {
            picked
                .iter()
                .map(|&i| row[i].clone().unwrap_or_else(|| "-".into()))
                .collect::<Vec<_>>()
                .join(":")
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

/// A `UNION ALL` panel's branches, each alone without its range guard, ordered by time: what
/// the panel would cost if that branch served the range.
fn branches(sql: &str) -> Vec<String> {
    sql.split("\nUNION ALL\n")
        .map(|branch| {
            let branch = branch
                .trim_end_matches("\nORDER BY 1")
                .lines()
                // The guards: the range's width, and since when a table is complete.
                .filter(|line| {
                    !["${__to} - ${__from}", "${raw_since}", "${minute_since}"]
                        .iter()
                        .any(|guard| line.contains(guard))
                })
                .collect::<Vec<_>>()
                .join("\n")
                .replacen("\n  AND $__timeFilter", "\nWHERE $__timeFilter", 1);
            format!("{branch}\nORDER BY 1")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark that loads a large database for minutes: ./scripts/panel-bench"]
async fn panel_bench() {
    let sizes = Sizes::from_env();
    let provisioning = Provisioning::load();
    let datasource = provisioning.datasource();
    let minimum = datasource["jsonData"]["timeInterval"]
        .as_str()
        .map(|i| parse_interval(i).expect("timeInterval"))
        .unwrap_or(Duration::from_secs(1));
    let buffer_pool = format!("--innodb-buffer-pool-size={}", sizes.buffer_pool);
    let mut options = vec![
        buffer_pool.as_str(),
        // The restart after the load must start with an empty buffer pool.
        "--innodb-buffer-pool-dump-at-shutdown=OFF",
        "--innodb-buffer-pool-load-at-startup=OFF",
    ];
    options.extend(sizes.server_options.iter().map(String::as_str));
    let mut server = MariaDb::start_with(&options);
    let url = server.create_database("panel_bench").await;
    let now = Utc::now()
        .duration_trunc(TimeDelta::seconds(1))
        .unwrap_or_else(|_| Utc::now());
    let timeline = Timeline::new(now, &sizes);
    println!("## Load ({sizes:?}, now = {} UTC)\n", timeline.now);
    let load_report = load(&url, &sizes, &timeline).await;
    let mut admin = MySqlConnection::connect(&url).await.expect("connect");
    let sizes_table = table_sizes(&mut admin).await;
    let grafana_url = read_only_account(&mut admin, &url).await;
    admin.close().await.ok();

    // The first run of each query then reads from disk (or the OS's file cache), as the first
    // dashboard load after a server start does; the median runs read from the buffer pool.
    let restarted = Instant::now();
    server.stop();
    server.restart();
    println!(
        "- clean restart: {:.1} s",
        restarted.elapsed().as_secs_f64()
    );
    let mut conn = grafana_session(&grafana_url, datasource).await;
    let version = frame::query(
        &mut conn,
        "SELECT VERSION(), @@innodb_buffer_pool_size DIV 1048576, \
         LEAST(@@tmp_table_size, @@max_heap_table_size) DIV 1048576",
    )
    .await
    .expect("version");

    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nMariaDB {} ({} MB buffer pool, {} MB in-memory temporary tables{}); {} devices; \
         raw rows {} d, minute rows {} d, hour rows {} d; median of {} runs after a first run \
         (first run after a restart; rows returned).\n\n{load_report}\n{sizes_table}",
        version.rows[0][0].clone().unwrap_or_default(),
        version.rows[0][1].clone().unwrap_or_default(),
        version.rows[0][2].clone().unwrap_or_default(),
        if sizes.server_options.is_empty() {
            String::new()
        } else {
            format!(", options {}", sizes.server_options.join(" "))
        },
        sizes.devices,
        sizes.raw_days,
        sizes.minute_days,
        sizes.hour_days,
        sizes.runs,
    );
    let mut plans = String::new();
    for file in &provisioning.dashboards {
        let dashboard = &file.content;
        let mut failures = Vec::new();
        let base = Scope {
            range: TimeRange {
                from: now - TimeDelta::hours(1),
                to: now,
            },
            interval: minimum,
            variables: Vec::new(),
        };
        // Every variable at its default (Device = All), then Device = its first device alone.
        let selections = variable_selections(&mut conn, dashboard, &base, &mut failures).await;
        assert!(failures.is_empty(), "variables: {failures:?}");
        let selections = &selections[..2.min(selections.len())];
        let one_device = selections.get(1).map_or("-".to_owned(), |(_, variables)| {
            variables
                .iter()
                .filter_map(|(name, value)| match value {
                    VariableValue::Multi(values) if name == "device" => {
                        Some(format!("Device = {}", values.join(",")))
                    }
                    _ => None,
                })
                .collect()
        });
        let _ = writeln!(
            out,
            "\n### {}\n\n| panel | range | interval | Device = All | {one_device} |\n| --- | --- | --- | --- | --- |",
            dashboard["title"].as_str().unwrap_or_default(),
        );
        for variable in list(&dashboard["templating"]["list"])
            .iter()
            .filter(|v| v["type"] == "query")
        {
            let sql =
                render(variable["query"].as_str().unwrap_or_default(), &base).expect("render");
            let timing = time(&mut conn, &sql, sizes.runs).await;
            let _ = writeln!(
                out,
                "| variable `{}` | any | - | {} | |",
                variable["name"].as_str().unwrap_or_default(),
                cell(&timing)
            );
        }
        for panel in panels(dashboard) {
            let base = Scope {
                variables: selections[0].1.clone(),
                ..base.clone()
            };
            // Titles may name variables ("silent for more than $silent_minutes min").
            let title = panel["title"].as_str().unwrap_or_default();
            let title = render(title, &base).unwrap_or_else(|_| title.to_owned());
            let title = title.as_str();
            for target in list(&panel["targets"]) {
                let sql = target["rawSql"].as_str().unwrap_or_default();
                for (label, seconds) in RANGES {
                    let range = TimeDelta::seconds(seconds);
                    let interval = grafana_interval(range, panel, minimum);
                    let mut cells = Vec::new();
                    for (selection, variables) in selections {
                        let scope = Scope {
                            range: TimeRange {
                                from: now - range,
                                to: now,
                            },
                            interval,
                            variables: variables.clone(),
                        };
                        let rendered =
                            render(sql, &scope).unwrap_or_else(|e| panic!("{title}: {e}"));
                        let timing = time(&mut conn, &rendered, sizes.runs).await;
                        println!("{title} {label} {selection}: {}", cell(&timing));
                        if selection == "defaults" && matches!(label, "1 d" | "1 y") {
                            let _ = writeln!(
                                plans,
                                "- {title}, {label}: {}",
                                plan(&mut conn, &rendered).await
                            );
                        }
                        cells.push(cell(&timing));
                    }
                    let _ = writeln!(
                        out,
                        "| {title} | {label} | {} | {} |",
                        format_interval(interval),
                        cells.join(" | ")
                    );
                }
            }
        }

        // What the range-picked branches save: "CO2 per device" with each branch serving
        // the whole range, where this load holds every row that branch would read.
        if let Some(panel) = panels(dashboard)
            .into_iter()
            .find(|p| p["title"] == "CO2 per device")
        {
            let sql = panel["targets"][0]["rawSql"].as_str().unwrap_or_default();
            // The same query without asking MariaDB to group by sorting: it groups through a
            // temporary table then (which spills to disk beyond `tmp_table_size`).
            let temp_table = sql.replace("SELECT SQL_BIG_RESULT\n", "SELECT\n");
            let complete = [sizes.raw_days, sizes.minute_days, sizes.hour_days];
            // One timed run after the first: these are slow by design.
            let reference_runs = 1;
            let _ = writeln!(
                out,
                "\n\"CO2 per device\", Device = All: the dashboard query without `SQL_BIG_RESULT`, \
                 and each branch alone serving the whole range (\"-\": not loaded for that \
                 range); one run after the first:\n\n\
                 | range | interval | without SQL_BIG_RESULT | raw rows | minute rollup | hour rollup |\n\
                 | --- | --- | --- | --- | --- | --- |",
            );
            for (label, seconds) in RANGES {
                let range = TimeDelta::seconds(seconds);
                let interval = grafana_interval(range, panel, minimum);
                let scope = Scope {
                    range: TimeRange {
                        from: now - range,
                        to: now,
                    },
                    interval,
                    variables: selections[0].1.clone(),
                };
                let rendered = render(&temp_table, &scope).expect("render without SQL_BIG_RESULT");
                let mut cells = vec![cell(&time(&mut conn, &rendered, reference_runs).await)];
                for (branch, days) in branches(sql).iter().zip(complete) {
                    if seconds > i64::from(days) * 86_400 {
                        cells.push("-".to_owned());
                        continue;
                    }
                    let rendered = render(branch, &scope).expect("render a branch");
                    cells.push(cell(&time(&mut conn, &rendered, reference_runs).await));
                }
                let _ = writeln!(
                    out,
                    "| {label} | {} | {} |",
                    format_interval(interval),
                    cells.join(" | ")
                );
            }
        }
    }

    let _ = writeln!(
        out,
        "\n### Alert rules\n\n| rule | range | time |\n| --- | --- | --- |"
    );
    for rule in provisioning.alert_rules() {
        let uid = rule["uid"].as_str().unwrap_or_default();
        for query in list(&rule["data"])
            .iter()
            .filter(|q| q["datasourceUid"] == DATASOURCE_UID)
        {
            let scope = super::alert_scope(query, now);
            let rendered = render(
                query["model"]["rawSql"].as_str().unwrap_or_default(),
                &scope,
            )
            .unwrap_or_else(|e| panic!("alert {uid}: {e}"));
            let timing = time(&mut conn, &rendered, sizes.runs).await;
            let _ = writeln!(plans, "- alert {uid}: {}", plan(&mut conn, &rendered).await);
            let _ = writeln!(
                out,
                "| {uid} | {} s | {} |",
                (scope.range.to - scope.range.from).num_seconds(),
                cell(&timing)
            );
        }
    }
    let _ = writeln!(
        out,
        "\nPlans (`table:type:key:rows:Extra`, Device = All):\n\n{plans}"
    );
    println!("{out}");
    drop(server);
}
