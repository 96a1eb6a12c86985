//! The Grafana files under `grafana/`: every file parses and references the provisioned data
//! source, and every panel, variable and alert query, rendered the way Grafana renders it
//! ([`render`]), runs on a real MariaDB holding seeded readings (new devices and rows adopted
//! from a legacy table) and returns the columns its panel needs ([`frame`]). A dashboard with
//! wrong SQL fails here; the last test proves that on purpose-broken copies.

mod files;
mod frame;
mod panel_bench;
mod ranges;
mod render;

use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use co2_broker::settings::DatabaseUrl;
use co2_broker::storage::Database;
use sea_orm::sqlx::mysql::MySqlConnection;
use sea_orm::sqlx::{AssertSqlSafe, Connection, Executor};
use serde_json::Value;

use crate::support::mariadb::MariaDb;
use files::{list, panels, Provisioning};
use render::{parse_interval, render, Scope, TimeRange, VariableValue};

/// Devices of the seed, and what each one is for.
const KITCHEN: &str = "pi-kitchen"; // normal values, temperature and humidity
const OFFICE: &str = "pi-office"; // above 1500 ppm for the last 8 minutes: the CO2 alert
const LAB: &str = "o'brien-lab"; // silent for 40 minutes; a quote to escape
const LEGACY: &str = "legacy"; // rows adopted from the seed's two-column table

/// Session `sql_mode`s every query must work under: the server's default, and the stricter
/// settings a MySQL 8 server or a careful DBA has (`ONLY_FULL_GROUP_BY`, `ANSI_QUOTES`).
const SQL_MODES: [&str; 2] = [
    "DEFAULT",
    "CONCAT(@@GLOBAL.sql_mode, ',ONLY_FULL_GROUP_BY,ANSI_QUOTES')",
];

#[test]
fn provisioning_files_parse_and_agree() {
    let provisioning = Provisioning::load();
    let problems = files::problems(&provisioning);
    assert!(
        problems.is_empty(),
        "grafana/ has problems:\n  {}",
        problems.join("\n  ")
    );
}

fn sql_time(t: DateTime<Utc>) -> String {
    format!("'{}'", t.format("%Y-%m-%d %H:%M:%S%.3f"))
}

fn sql_text(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

async fn execute(conn: &mut MySqlConnection, sql: &str) {
    conn.execute(AssertSqlSafe(sql))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{sql}"));
}

/// A database migrated by the broker with readings for the last hours, legacy rows adopted
/// by the real migration, and rejected messages. Returns its URL and the seed's "now".
async fn seeded_database() -> (String, DateTime<Utc>) {
    let url = MariaDb::shared().create_database("grafana").await;
    let now = Utc::now().trunc_subsecs(0);
    let minutes = |m: i64| now - chrono::Duration::minutes(m);
    let mut conn = MySqlConnection::connect(&url).await.expect("connect");
    // The seed's own table, with a NULL time and a NULL value as the old script let through.
    execute(
        &mut conn,
        "CREATE TABLE co2_emissions (date_time DATETIME, emissions DOUBLE(7,2))",
    )
    .await;
    let mut legacy: Vec<String> = (0..7)
        .map(|i| format!("({}, {})", sql_time(minutes(300 - 10 * i)), 700 + 25 * i))
        .collect();
    legacy.push("(NULL, 412.00)".into());
    legacy.push(format!("({}, NULL)", sql_time(minutes(310))));
    execute(
        &mut conn,
        &format!("INSERT INTO co2_emissions VALUES {}", legacy.join(", ")),
    )
    .await;
    Database::connect(&DatabaseUrl::new(url.clone()), 2)
        .await
        .expect("connect for migration")
        .migrate()
        .await
        .expect("migrate (adopting the legacy table)");
    let adopted = frame::query(
        &mut conn,
        &format!(
            "SELECT COUNT(*) FROM co2_emissions WHERE device_id = {}",
            sql_text(LEGACY)
        ),
    )
    .await
    .expect("count adopted rows");
    // The row without a time is moved to rejected_messages by migration 5 (partitions).
    assert_eq!(
        adopted.rows[0][0].as_deref(),
        Some("8"),
        "legacy rows adopted"
    );

    let mut rows = Vec::new();
    let mut reading = |device: &str, at: DateTime<Utc>, seq: i64, ppm: f64, climate: bool| {
        let (temperature, humidity) = if climate {
            (
                format!("{:.1}", 21.0 + (seq % 7) as f64 / 10.0),
                "45".to_owned(),
            )
        } else {
            ("NULL".into(), "NULL".into())
        };
        rows.push(format!(
            "({measured}, {ppm}, {device}, {topic}, {received}, {seq}, {temperature}, {humidity}, {key})",
            measured = sql_time(at - chrono::Duration::seconds(2)),
            device = sql_text(device),
            topic = sql_text(&format!("co2/{device}")),
            received = sql_time(at),
            key = sql_text(&format!("s{seq}")),
        ));
    };
    for m in (0..=180).rev() {
        let seq = 180 - m;
        reading(
            KITCHEN,
            minutes(m),
            seq,
            600.0 + (m % 30) as f64 * 5.0,
            true,
        );
        // A 30-minute gap an hour and a half ago, and the last 8 minutes above 1500 ppm.
        if !(90..120).contains(&m) {
            let ppm = if m < 8 { 1650.0 + m as f64 } else { 900.0 };
            reading(OFFICE, minutes(m), seq, ppm, false);
        }
        if m >= 40 {
            reading(LAB, minutes(m), seq, 700.0 + m as f64 * 2.0, false);
        }
    }
    execute(
        &mut conn,
        &format!(
            "INSERT INTO co2_emissions (date_time, emissions, device_id, topic, received_at, \
             seq, temperature, humidity, dedup_key) VALUES {}",
            rows.join(", ")
        ),
    )
    .await;
    // What the broker's writer keeps for the readings it stores (storage::devices).
    execute(
        &mut conn,
        "INSERT INTO devices (device_id, first_seen, last_seen) \
         SELECT device_id, MIN(received_at), MAX(received_at) FROM co2_emissions \
         WHERE device_id <> 'legacy' GROUP BY device_id",
    )
    .await;
    let rejected: Vec<String> = [
        (100, "co2", "400", "topic is not under co2/"),
        (
            70,
            "co2/pi-kitchen",
            "-5",
            "CO2 value -5 outside 0..=100000 ppm",
        ),
        (
            30,
            "co2/pi-office",
            "{\"value\":1,\"humidity\":101}",
            "humidity outside 0..=100 %",
        ),
        (29, "co2/", "400", "topic has no device id after co2/"),
        (1, "co2/pi-kitchen", "x", "payload is not a reading"),
    ]
    .iter()
    .map(|(m, topic, payload, reason)| {
        format!(
            "({}, {}, {}, {}, {})",
            sql_time(minutes(*m)),
            sql_text(topic),
            sql_text(payload),
            payload.len(),
            sql_text(reason)
        )
    })
    .collect();
    execute(
        &mut conn,
        &format!(
            "INSERT INTO rejected_messages (received_at, topic, payload, payload_bytes, reason) \
             VALUES {}",
            rejected.join(", ")
        ),
    )
    .await;
    let url = read_only_account(&mut conn, &url).await;
    conn.close().await.ok(); // closing politely; the server drops it either way
    (url, now)
}

/// The read-only account grafana/README.md tells operators to create, with exactly its
/// `GRANT`s (for the test database): every panel and alert must work with no more than that.
/// Returns the account's URL.
async fn read_only_account(conn: &mut MySqlConnection, admin_url: &str) -> String {
    let (server, database) = admin_url.rsplit_once('/').expect("database in the URL");
    let (_, host) = server.rsplit_once('@').expect("credentials in the URL");
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../grafana/README.md"),
    )
    .expect("grafana/README.md");
    let grants: Vec<&str> = readme
        .lines()
        .filter(|line| line.starts_with("GRANT "))
        .collect();
    assert!(grants.len() >= 3, "the README's GRANTs: {grants:?}");
    let user = format!("'{database}'@'%'");
    execute(
        conn,
        &format!("CREATE USER {user} IDENTIFIED BY 'read-only'"),
    )
    .await;
    for grant in grants {
        let grant = grant
            .replace("sheroDB.", &format!("`{database}`."))
            .replace("'grafana'@'%'", &user);
        execute(conn, &grant).await;
    }
    format!("mysql://{database}:read-only@{host}/{database}")
}

/// A connection set up like the provisioned data source: session `time_zone` from its
/// `jsonData.timezone`.
async fn grafana_session(url: &str, datasource: &Value) -> MySqlConnection {
    let timezone = datasource["jsonData"]["timezone"]
        .as_str()
        .expect("jsonData.timezone");
    let mut conn = MySqlConnection::connect(url).await.expect("connect");
    execute(
        &mut conn,
        &format!("SET time_zone = {}", sql_text(timezone)),
    )
    .await;
    conn
}

/// Which renderings of every query a check covers.
struct Matrix {
    intervals: Vec<Duration>,
    sql_modes: Vec<&'static str>,
}

impl Matrix {
    /// The data source's minimum interval and the usual ones of a 6-hour range and longer.
    fn full(datasource: &Value) -> Matrix {
        let minimum = datasource["jsonData"]["timeInterval"]
            .as_str()
            .map(|i| parse_interval(i).expect("timeInterval"))
            .unwrap_or(Duration::from_secs(1));
        let mut intervals = vec![minimum];
        intervals.extend([20, 60, 300, 3600].map(Duration::from_secs));
        Matrix {
            intervals,
            sql_modes: SQL_MODES.to_vec(),
        }
    }

    fn quick() -> Matrix {
        Matrix {
            intervals: vec![Duration::from_secs(60)],
            sql_modes: vec![SQL_MODES[0]],
        }
    }
}

/// The values each dashboard variable takes: every variable at its default ("All" for the
/// multi-value ones), then each multi-value variable at each single value of its own.
async fn variable_selections(
    conn: &mut MySqlConnection,
    dashboard: &Value,
    scope: &Scope,
    failures: &mut Vec<String>,
) -> Vec<(String, Vec<(String, VariableValue)>)> {
    let mut defaults = Vec::new();
    let mut alternatives = Vec::new();
    for v in list(&dashboard["templating"]["list"]) {
        let name = v["name"].as_str().unwrap_or_default().to_owned();
        let multi = v["multi"] == true || v["includeAll"] == true;
        let options: Vec<String> = match v["type"].as_str() {
            Some("query") => {
                let sql = v["query"].as_str().unwrap_or_default();
                let result = match render(sql, scope) {
                    Ok(sql) => frame::query(conn, &sql).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(frame) => frame
                        .rows
                        .into_iter()
                        .filter_map(|r| r[0].clone())
                        .collect(),
                    Err(e) => {
                        failures.push(format!("variable {name}: {e}\n  SQL: {sql}"));
                        continue;
                    }
                }
            }
            Some("custom") => v["query"]
                .as_str()
                .unwrap_or_default()
                .split(',')
                .map(|o| o.trim().to_owned())
                .collect(),
            Some("constant" | "textbox") => vec![v["query"].as_str().unwrap_or_default().into()],
            other => {
                failures.push(format!("variable {name}: type {other:?} not modelled"));
                continue;
            }
        };
        if options.is_empty() {
            failures.push(format!("variable {name} has no values on the seeded data"));
            continue;
        }
        if multi {
            defaults.push((name.clone(), VariableValue::Multi(options.clone())));
            alternatives.extend(
                options
                    .into_iter()
                    .map(|o| (name.clone(), VariableValue::Multi(vec![o]))),
            );
        } else {
            let current = match &v["current"]["value"] {
                Value::String(s) if options.contains(s) => s.clone(),
                _ => options[0].clone(),
            };
            defaults.push((name, VariableValue::Single(current)));
        }
    }
    let mut selections = vec![("defaults".to_owned(), defaults.clone())];
    for (name, value) in alternatives {
        let mut variables = defaults.clone();
        let label = format!("{name} = {value:?}");
        for slot in variables.iter_mut().filter(|(n, _)| *n == name) {
            slot.1 = value.clone();
        }
        selections.push((label, variables));
    }
    selections
}

/// Renders and runs every target of every panel of `dashboard` over the matrix; returns one
/// message per failure. On the default selection every query must return rows.
async fn dashboard_failures(
    conn: &mut MySqlConnection,
    dashboard: &Value,
    range: TimeRange,
    matrix: &Matrix,
) -> Vec<String> {
    let mut failures = Vec::new();
    let base = Scope {
        range,
        interval: matrix.intervals[0],
        variables: Vec::new(),
    };
    let selections = variable_selections(conn, dashboard, &base, &mut failures).await;
    for mode in &matrix.sql_modes {
        execute(conn, &format!("SET SESSION sql_mode = {mode}")).await;
        for interval in &matrix.intervals {
            for (selection, variables) in &selections {
                let scope = Scope {
                    range,
                    interval: *interval,
                    variables: variables.clone(),
                };
                for panel in panels(dashboard) {
                    for target in list(&panel["targets"]) {
                        let sql = target["rawSql"].as_str().unwrap_or_default();
                        let context = format!(
                            "panel {} target {} ({selection}; interval {interval:?}; sql_mode {mode})",
                            panel["title"], target["refId"]
                        );
                        let rendered = match render(sql, &scope) {
                            Ok(rendered) => rendered,
                            Err(e) => {
                                failures.push(format!("{context}: {e}"));
                                continue;
                            }
                        };
                        let checked = match frame::query(conn, &rendered).await {
                            Err(e) => Err(e),
                            Ok(frame) => {
                                let shape = if target["format"] == "time_series" {
                                    frame::check_time_series(&frame)
                                } else {
                                    Ok(())
                                };
                                shape
                                    .and_then(|()| frame::check_panel_fields(panel, &frame))
                                    .and_then(|()| {
                                        if frame.rows.is_empty() && selection == "defaults" {
                                            Err("no rows on the seeded data".into())
                                        } else {
                                            Ok(())
                                        }
                                    })
                            }
                        };
                        if let Err(e) = checked {
                            failures.push(format!("{context}: {e}\n  SQL: {rendered}"));
                        }
                    }
                }
            }
        }
    }
    failures
}

/// The dashboard's default range (`now-6h` to `now`) around the seed.
/// What an alert rule's data query is rendered against at `now`: its relative time range and
/// interval. Alert rules cannot use dashboard variables: none are defined.
fn alert_scope(query: &Value, now: DateTime<Utc>) -> Scope {
    let relative = &query["relativeTimeRange"];
    let seconds = |key: &str| chrono::Duration::seconds(relative[key].as_i64().unwrap_or(0));
    Scope {
        range: TimeRange {
            from: now - seconds("from"),
            to: now - seconds("to"),
        },
        interval: Duration::from_millis(query["model"]["intervalMs"].as_u64().unwrap_or(60_000)),
        variables: Vec::new(),
    }
}

fn six_hours_before(now: DateTime<Utc>) -> TimeRange {
    TimeRange {
        from: now - chrono::Duration::hours(6),
        to: now,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_query_runs_on_mariadb_and_returns_what_its_panel_needs() {
    let provisioning = Provisioning::load();
    let (url, now) = seeded_database().await;
    let mut conn = grafana_session(&url, provisioning.datasource()).await;
    let matrix = Matrix::full(provisioning.datasource());
    let mut failures = Vec::new();
    for file in &provisioning.dashboards {
        for failure in
            dashboard_failures(&mut conn, &file.content, six_hours_before(now), &matrix).await
        {
            failures.push(format!("{}: {failure}", file.path.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing dashboard queries:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_fire_for_exactly_the_seeded_culprits() {
    let provisioning = Provisioning::load();
    let (url, now) = seeded_database().await;
    let mut conn = grafana_session(&url, provisioning.datasource()).await;
    let expected = [("co2-above-threshold", OFFICE), ("co2-device-silent", LAB)];
    for rule in provisioning.alert_rules() {
        let uid = rule["uid"].as_str().unwrap_or_default();
        let (kind, limit) = files::alert_threshold(rule).expect("threshold condition");
        for query in list(&rule["data"])
            .iter()
            .filter(|q| q["datasourceUid"] == files::DATASOURCE_UID)
        {
            let scope = alert_scope(query, now);
            let sql = query["model"]["rawSql"].as_str().unwrap_or_default();
            let rendered = render(sql, &scope).unwrap_or_else(|e| panic!("alert {uid}: {e}"));
            for mode in SQL_MODES {
                execute(&mut conn, &format!("SET SESSION sql_mode = {mode}")).await;
                let frame = frame::query(&mut conn, &rendered)
                    .await
                    .unwrap_or_else(|e| panic!("alert {uid} (sql_mode {mode}): {e}\n{rendered}"));
                let instances = frame::alert_instances(&frame)
                    .unwrap_or_else(|e| panic!("alert {uid}: {e}\n{rendered}"));
                assert!(!instances.is_empty(), "alert {uid}: no rows\n{rendered}");
                let firing: Vec<&str> = instances
                    .iter()
                    .filter(|(_, value)| {
                        if kind == "gt" {
                            *value > limit
                        } else {
                            *value < limit
                        }
                    })
                    .map(|(labels, _)| labels.as_str())
                    .collect();
                let culprit = expected
                    .iter()
                    .find(|(u, _)| *u == uid)
                    .map(|(_, device)| *device);
                assert_eq!(
                    firing,
                    culprit.into_iter().collect::<Vec<_>>(),
                    "alert {uid} fires for the wrong devices; instances: {instances:?}"
                );
            }
        }
    }
    for (uid, _) in expected {
        assert!(
            provisioning.alert_rules().iter().any(|r| r["uid"] == uid),
            "alert rule {uid} missing"
        );
    }
}

/// Replaces `from` by `to` in the SQL of the first target of the panel titled `title`.
fn broken(dashboard: &Value, title: &str, from: &str, to: &str) -> Value {
    let mut copy = dashboard.clone();
    let panel = copy["panels"]
        .as_array_mut()
        .and_then(|panels| panels.iter_mut().find(|p| p["title"] == title))
        .unwrap_or_else(|| panic!("no panel {title:?}"));
    let sql = panel["targets"][0]["rawSql"].as_str().unwrap_or_default();
    assert!(sql.contains(from), "panel {title:?} has no {from:?}");
    panel["targets"][0]["rawSql"] = Value::String(sql.replacen(from, to, 1));
    copy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_with_wrong_sql_fails_the_check() {
    let provisioning = Provisioning::load();
    let dashboard = &provisioning
        .dashboards
        .iter()
        .find(|f| f.content["uid"] == "co2-overview")
        .expect("the CO2 overview dashboard")
        .content;
    let (url, now) = seeded_database().await;
    let mut conn = grafana_session(&url, provisioning.datasource()).await;
    let range = six_hours_before(now);
    let matrix = Matrix::quick();
    assert_eq!(
        dashboard_failures(&mut conn, dashboard, range, &matrix).await,
        Vec::<String>::new(),
        "the dashboard itself must pass"
    );
    let series = "CO2 per device";
    let gauge = "Latest CO2 per device";
    let cases = [
        (
            broken(dashboard, series, "AVG(emissions)", "AVG(emission)"),
            "Unknown column",
        ),
        (
            broken(dashboard, series, "ORDER BY 1", "ORDER BY 2"),
            "not sorted by time",
        ),
        (
            broken(dashboard, series, "$__timeGroupAlias(", "$__timeGroup("),
            "without a `time` column",
        ),
        (
            broken(
                dashboard,
                series,
                "device_id AS metric",
                "device_id AS device",
            ),
            "neither a value nor `metric`",
        ),
        (
            broken(dashboard, series, "IN ($device)", "IN ($devices)"),
            "$devices",
        ),
        (
            broken(dashboard, series, "$__timeFilter(", "$__timeFiltre("),
            "unknown macro",
        ),
        (
            broken(dashboard, gauge, "AS co2", "AS ppm"),
            "numeric column co2",
        ),
        (
            broken(
                dashboard,
                gauge,
                "FROM co2_emissions r",
                "FROM co2_readings r",
            ),
            // The read-only account is refused any table it was not granted, existing or not.
            "SELECT command denied",
        ),
        (
            broken(
                dashboard,
                "Recent readings",
                "ORDER BY",
                "AND emissions < 0 ORDER BY",
            ),
            "no rows",
        ),
        (
            broken(dashboard, "Recent readings", "AS `CO2`", "AS `ppm`"),
            "column \"CO2\"",
        ),
    ];
    for (dashboard, expected) in cases {
        let failures = dashboard_failures(&mut conn, &dashboard, range, &matrix).await;
        assert!(
            failures.iter().any(|f| f.contains(expected)),
            "expected a failure containing {expected:?}, got {failures:#?}"
        );
    }
}
