//! The panels that pick raw rows, the minute rollup or the hour rollup by the selected range:
//! on readings stored through the broker's storage layer (so the rollups are kept as in
//! production), each panel rendered for 6 hours, 7 days and 90 days runs on MariaDB as the
//! read-only account, reads exactly the table its range calls for (the other branches are
//! "Impossible WHERE" in the plan, so MariaDB never touches them), and returns the same series
//! as the same panel computed from the raw rows. With retention, narrow ranges from before the
//! oldest raw row (or minute rollup) read the next coarser table instead.

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, TimeDelta, TimeZone, Utc};
use co2_broker::ingest::{Batch, Reading};
use co2_broker::settings::DatabaseUrl;
use co2_broker::storage::Database;
use sea_orm::sqlx::mysql::MySqlConnection;
use sea_orm::sqlx::Connection;
use serde_json::Value;

use super::files::{panels, Provisioning};
use super::frame::{self, Frame};
use super::render::{render, Scope, TimeRange, VariableValue};
use super::{execute, grafana_session, read_only_account, SQL_MODES};
use crate::support::mariadb::MariaDb;

/// The panels whose SQL is a UNION ALL of a raw, a minute and an hour branch.
const ROLLUP_PANELS: [&str; 2] = ["CO2 per device", "Readings per minute"];
const DEVICES: [&str; 3] = ["pi-hall", "pi-attic", "pi-cellar"];

/// The end of every range: midnight, so ranges and the interval buckets start on the hour.
fn anchor() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap()
}

/// Readings of every device from 92 days before [`anchor`] up to one second before it: one
/// every 10 minutes at an uneven offset (every 7th left out), and one every 20 seconds over the
/// last 6 hours (every 5th left out), with
/// fractional values that differ per device.
fn readings() -> Vec<Reading> {
    let end = anchor().naive_utc();
    let mut out = Vec::new();
    for (d, device) in DEVICES.iter().enumerate() {
        let mut push = |t: NaiveDateTime, seq: i64| {
            out.push(Reading {
                device_id: co2_proto::DeviceId::new(*device).unwrap(),
                topic: format!("co2/{device}"),
                measured_at: t,
                received_at: t,
                co2_ppm: 400.0 + ((seq * 37 + d as i64 * 101) % 900) as f64 + 0.37,
                seq: Some(seq),
                temperature_c: None,
                humidity_pct: None,
                dedup_key: format!("t{}s{seq}", t.and_utc().timestamp_millis()),
            })
        };
        let start = end - TimeDelta::days(92);
        let mut seq = 0;
        for i in 0..92 * 144 {
            if i % 7 == 3 {
                // Hours of 5 and of 6 readings: an average of averages would differ.
                continue;
            }
            let t = start + TimeDelta::seconds(600 * i + (i * 13 + d as i64 * 7) % 590);
            push(t, seq);
            seq += 1;
        }
        let dense = end - TimeDelta::hours(6);
        for i in 0..6 * 180 {
            if i % 5 == 0 {
                continue; // minutes of 2 and of 3 readings
            }
            push(dense + TimeDelta::seconds(20 * i + 3 + d as i64), seq);
            seq += 1;
        }
    }
    out
}

async fn stored_database() -> String {
    let url = MariaDb::shared().create_database("grafana_ranges").await;
    let db = Database::connect(&DatabaseUrl::new(url.clone()), 2)
        .await
        .expect("connect");
    db.migrate().await.expect("migrate");
    for chunk in readings().chunks(2_000) {
        db.write(&Batch {
            readings: chunk.to_vec(),
            rejections: vec![],
        })
        .await
        .expect("store a batch (rollups kept in its transaction)");
    }
    url
}

/// The panel's SQL with only its raw branch, unguarded: the reference the rollup branches
/// must agree with.
fn raw_only(sql: &str) -> String {
    let raw = sql
        .split("\nUNION ALL\n")
        .next()
        .expect("a first branch")
        .replace("${__to} - ${__from} <= 21600000\n  AND ", "")
        .replace("${__from} >= ${raw_since}\n  AND ", "");
    assert!(raw.contains("FROM co2_emissions"), "raw branch: {raw}");
    format!("{raw}\nORDER BY 1")
}

/// The CO2 overview dashboard.
fn overview(provisioning: &Provisioning) -> &Value {
    &provisioning
        .dashboards
        .iter()
        .find(|f| f.content["uid"] == "co2-overview")
        .expect("the CO2 overview dashboard")
        .content
}

/// The stored readings of [`stored_database`], with an admin connection and a Grafana session
/// (the read-only account, the data source's session settings).
async fn stored_sessions(provisioning: &Provisioning) -> (MySqlConnection, MySqlConnection) {
    let admin_url = stored_database().await;
    let mut admin = MySqlConnection::connect(&admin_url).await.expect("connect");
    let url = read_only_account(&mut admin, &admin_url).await;
    let conn = grafana_session(&url, provisioning.datasource()).await;
    (admin, conn)
}

/// `range` at `interval_s` with every device selected and the `since` variables.
fn every_device(range: TimeRange, interval_s: u64, since: &[(String, VariableValue)]) -> Scope {
    Scope {
        range,
        interval: Duration::from_secs(interval_s),
        variables: [(
            "device".to_owned(),
            VariableValue::Multi(DEVICES.map(String::from).to_vec()),
        )]
        .into_iter()
        .chain(since.iter().cloned())
        .collect(),
    }
}

/// The hidden variables that say since when raw rows and minute rollups are stored, as
/// Grafana fills them: by running their queries.
async fn since_variables(
    conn: &mut MySqlConnection,
    dashboard: &Value,
) -> Vec<(String, VariableValue)> {
    let mut out = Vec::new();
    for name in ["raw_since", "minute_since"] {
        let variable = super::files::list(&dashboard["templating"]["list"])
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"));
        let sql = variable["query"].as_str().expect("query");
        let frame = frame::query(conn, sql)
            .await
            .unwrap_or_else(|e| panic!("variable {name}: {e}\n{sql}"));
        let value = frame.rows[0][0].clone().expect("a value");
        out.push((name.to_owned(), VariableValue::Single(value)));
    }
    out
}

/// The tables a query's plan reads (derived tables like `<union1,2,3>` left out). A branch
/// MariaDB proved empty from its constant predicate shows as "Impossible WHERE", no table.
async fn tables_read(conn: &mut MySqlConnection, sql: &str) -> Vec<String> {
    let plan = frame::query(conn, &format!("EXPLAIN {sql}"))
        .await
        .unwrap_or_else(|e| panic!("EXPLAIN: {e}\n{sql}"));
    let table = plan
        .columns
        .iter()
        .position(|(name, _, _)| name == "table")
        .expect("EXPLAIN has a table column");
    let mut tables: Vec<String> = plan
        .rows
        .iter()
        .filter_map(|row| row[table].clone())
        .filter(|t| !t.starts_with('<'))
        .collect();
    tables.sort();
    tables.dedup();
    tables
}

/// Asserts the two series have the same buckets (and metric) and values within 1e-6 relative.
fn assert_same_series(from_panel: &Frame, from_raw: &Frame, what: &str) {
    assert_eq!(
        from_panel.rows.len(),
        from_raw.rows.len(),
        "{what}: bucket count\npanel: {:?}\nraw: {:?}",
        from_panel.rows.iter().take(5).collect::<Vec<_>>(),
        from_raw.rows.iter().take(5).collect::<Vec<_>>()
    );
    // ORDER BY 1 leaves the order within a bucket open: compare sorted by every non-value cell.
    let sorted = |frame: &Frame| {
        let mut rows = frame.rows.clone();
        rows.sort_by(|a, b| a[..a.len() - 1].cmp(&b[..b.len() - 1]));
        rows
    };
    for (panel, raw) in sorted(from_panel).iter().zip(sorted(from_raw).iter()) {
        let n = panel.len();
        assert_eq!(panel[..n - 1], raw[..n - 1], "{what}: bucket or metric");
        let value = |cell: &Option<String>| -> f64 {
            cell.as_deref()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{what}: value {cell:?}"))
        };
        let (p, r) = (value(&panel[n - 1]), value(&raw[n - 1]));
        assert!(
            (p - r).abs() <= 1e-6 * r.abs().max(1.0),
            "{what}: bucket {:?}: {p} from the panel, {r} from raw rows",
            &panel[..n - 1]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_ranges_read_the_rollups_and_match_the_raw_series() {
    let provisioning = Provisioning::load();
    let dashboard = overview(&provisioning);
    let (admin, mut conn) = stored_sessions(&provisioning).await;
    admin.close().await.ok();
    let since = since_variables(&mut conn, dashboard).await;

    // (range, a bucket interval (at least the 10 minutes between the sparse readings beyond the
    // last 6 hours), the table to read).
    let cases = [
        (TimeDelta::hours(6), 20, "co2_emissions"),
        (TimeDelta::days(2), 600, "co2_rollup_minute"),
        (TimeDelta::days(90), 7_200, "co2_rollup_hour"),
    ];
    for title in ROLLUP_PANELS {
        let panel = panels(dashboard)
            .into_iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("no panel {title:?}"));
        let sql = panel["targets"][0]["rawSql"].as_str().expect("rawSql");
        for (length, interval_s, table) in cases {
            let range = TimeRange {
                from: anchor() - length,
                to: anchor(),
            };
            let scope = every_device(range, interval_s, &since);
            let what = format!("{title} over {length}");
            let rendered = render(sql, &scope).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(
                tables_read(&mut conn, &rendered).await,
                vec![table.to_owned()],
                "{what}: tables in the plan\n{rendered}"
            );
            let reference = render(&raw_only(sql), &scope).expect("render the raw branch");
            for mode in SQL_MODES {
                execute(&mut conn, &format!("SET SESSION sql_mode = {mode}")).await;
                let series = frame::query(&mut conn, &rendered)
                    .await
                    .unwrap_or_else(|e| panic!("{what} (sql_mode {mode}): {e}\n{rendered}"));
                frame::check_time_series(&series).unwrap_or_else(|e| panic!("{what}: {e}"));
                frame::check_panel_fields(panel, &series).unwrap_or_else(|e| panic!("{what}: {e}"));
                // Every 7th 10-minute and every 5th 20-second reading is left out, so some buckets are
                // empty; most must not be.
                let buckets = length.num_seconds() / interval_s as i64;
                let per_bucket = if title == "CO2 per device" { 3 } else { 1 };
                assert!(
                    series.rows.len() as i64 >= buckets * per_bucket * 3 / 4,
                    "{what}: {} rows for {buckets} buckets",
                    series.rows.len()
                );
                let raw = frame::query(&mut conn, &reference)
                    .await
                    .unwrap_or_else(|e| panic!("{what} raw: {e}\n{reference}"));
                assert_same_series(&series, &raw, &what);
            }
        }
    }
}

/// With retention, raw rows and minute rollups end somewhere in the past. A narrow range from
/// before that point reads the finest table that still covers it (the `raw_since` and
/// `minute_since` variables), not the table its width alone would pick, and shows the same
/// series the raw rows gave before they were dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn narrow_ranges_older_than_the_retention_read_the_rollups() {
    let provisioning = Provisioning::load();
    let dashboard = overview(&provisioning);
    let (mut admin, mut conn) = stored_sessions(&provisioning).await;

    // (6 hours ending this long before the anchor, interval, table once retention has run).
    let cases = [
        (TimeDelta::days(45), 60, "co2_rollup_minute"),
        (TimeDelta::days(80), 3_600, "co2_rollup_hour"),
    ];
    let scope = |ago: TimeDelta, interval_s: u64, since: &[(String, VariableValue)]| {
        // Ending a second before the hour, as the raw rows after it are still there: a
        // rollup bucket starting at the range's end would hold readings the raw filter leaves out.
        let range = TimeRange {
            from: anchor() - ago - TimeDelta::hours(6),
            to: anchor() - ago - TimeDelta::seconds(1),
        };
        every_device(range, interval_s, since)
    };
    let before = since_variables(&mut conn, dashboard).await;
    let mut references = Vec::new();
    for title in ROLLUP_PANELS {
        let panel = panels(dashboard)
            .into_iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("no panel {title:?}"));
        let sql = panel["targets"][0]["rawSql"]
            .as_str()
            .expect("rawSql")
            .to_owned();
        for (ago, interval_s, _) in cases {
            let rendered = render(&sql, &scope(ago, interval_s, &before)).unwrap();
            assert_eq!(tables_read(&mut conn, &rendered).await, ["co2_emissions"]);
            let series = frame::query(&mut conn, &rendered).await.unwrap();
            assert!(!series.rows.is_empty(), "{title}: readings {ago} ago");
            references.push((title, sql.clone(), series));
        }
    }

    // Retention: raw rows kept 30 days, minute rollups 60 (as of the anchor).
    let cutoff = |days: i64| (anchor() - TimeDelta::days(days)).format("'%Y-%m-%d %H:%M:%S'");
    execute(
        &mut admin,
        &format!("DELETE FROM co2_emissions WHERE date_time < {}", cutoff(30)),
    )
    .await;
    execute(
        &mut admin,
        &format!(
            "DELETE FROM co2_rollup_minute WHERE bucket_start < {}",
            cutoff(60)
        ),
    )
    .await;
    admin.close().await.ok();

    let after = since_variables(&mut conn, dashboard).await;
    let mut references = references.into_iter();
    for _ in ROLLUP_PANELS {
        for (ago, interval_s, table) in cases {
            let (title, sql, reference) = references.next().unwrap();
            let what = format!("{title}, 6 hours {ago} ago");
            let rendered = render(&sql, &scope(ago, interval_s, &after)).unwrap();
            assert_eq!(
                tables_read(&mut conn, &rendered).await,
                vec![table.to_owned()],
                "{what}: tables in the plan\n{rendered}"
            );
            let series = frame::query(&mut conn, &rendered)
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}\n{rendered}"));
            assert_same_series(&series, &reference, &what);
        }
    }
}
