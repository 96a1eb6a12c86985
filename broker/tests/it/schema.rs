//! The migrations themselves: upgrading a database that holds readings, and every step down
//! and up again, on MariaDB and SQLite.

use migration::{Migrator, MigratorTrait};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

use crate::support::db;
use crate::support::mariadb::MariaDb;

async fn rows(conn: &DatabaseConnection, sql: &str) -> Vec<Vec<String>> {
    let backend = conn.get_database_backend();
    conn.query_all_raw(Statement::from_string(backend, sql))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{sql}"))
        .iter()
        .map(|row| {
            (0..row.column_names().len())
                .map(|i| {
                    row.try_get_by_index::<Option<String>>(i)
                        .unwrap()
                        .unwrap_or_default()
                })
                .collect()
        })
        .collect()
}

/// A database at migration 2 (four indexes on the readings, no `devices`) with readings in it
/// is upgraded: `devices` is filled from them and the merged identity still refuses a
/// duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_fills_devices_and_keeps_the_identity() {
    let url = MariaDb::shared().create_database("upgrade").await;
    let conn = db::connect(&url).await;
    Migrator::up(&conn, Some(2)).await.unwrap();
    let insert = "INSERT IGNORE INTO co2_emissions \
        (date_time, emissions, device_id, topic, received_at, seq, dedup_key) VALUES \
        ('2026-11-29 10:00:00.000', 500, 'pi-1', 'co2/pi-1', '2026-11-29 10:00:00.100', 1, 't1764410400000s1'), \
        ('2026-11-29 10:01:00.000', 510, 'pi-1', 'co2/pi-1', '2026-11-29 10:01:00.100', 2, 't1764410460000s2'), \
        ('2026-11-29 11:00:00.000', 600, 'pi-2', 'co2/pi-2', '2026-11-29 11:00:02.000', 9, 't1764414000000s9')";
    conn.execute_unprepared(insert).await.unwrap();

    Migrator::up(&conn, None).await.unwrap();
    assert_eq!(
        rows(
            &conn,
            "SELECT device_id, CAST(first_seen AS CHAR), CAST(last_seen AS CHAR) \
             FROM devices ORDER BY device_id"
        )
        .await,
        [
            ["pi-1", "2026-11-29 10:00:00.100", "2026-11-29 10:01:00.100"],
            ["pi-2", "2026-11-29 11:00:02.000", "2026-11-29 11:00:02.000"],
        ]
    );
    let mut indexes = rows(
        &conn,
        "SELECT DISTINCT index_name FROM information_schema.statistics \
         WHERE table_schema = DATABASE() AND table_name = 'co2_emissions'",
    )
    .await
    .concat();
    indexes.sort();
    assert_eq!(
        indexes,
        [
            "PRIMARY",
            "ix_co2_emissions_date_time",
            "ux_co2_emissions_device_time_identity"
        ]
    );
    // The same three readings again: nothing new.
    let again = conn.execute_unprepared(insert).await.unwrap();
    assert_eq!(again.rows_affected(), 0);
    assert_eq!(db::reading_count(&conn).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_go_down_and_up_again_in_mariadb() {
    let url = MariaDb::shared().create_database("down_up").await;
    down_and_up_again(&db::connect(&url).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_go_down_and_up_again_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/co2.db?mode=rwc", dir.path().display());
    down_and_up_again(&db::connect(&url).await).await;
}

async fn down_and_up_again(conn: &DatabaseConnection) {
    Migrator::up(conn, None).await.unwrap();
    let applied = Migrator::get_applied_migrations(conn).await.unwrap().len();
    for _ in 0..applied {
        Migrator::down(conn, Some(1)).await.unwrap();
    }
    assert!(Migrator::get_applied_migrations(conn)
        .await
        .unwrap()
        .is_empty());
    Migrator::up(conn, None).await.unwrap();
    assert_eq!(
        Migrator::get_applied_migrations(conn).await.unwrap().len(),
        applied
    );
    assert_eq!(db::devices(conn).await.len(), 0);
}
