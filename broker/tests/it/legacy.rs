//! Adopting the seed's database: a two-column `co2_emissions` with rows in it.

use std::time::Duration;

use sea_orm::{ConnectionTrait, Statement};

use crate::support::broker::TestBroker;
use crate::support::mariadb::MariaDb;
use crate::support::{db, eventually, mqtt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_table_is_adopted_without_losing_a_row() {
    let url = MariaDb::shared().create_database("sheroDB").await;
    let conn = db::connect(&url).await;
    // Exactly the seed's schema and what sub.py wrote, including a value DOUBLE(7,2) can hold
    // only just, two rows in the same second and a NULL the old script let through. Every row
    // is kept: in co2_emissions, or (the one without a time) in rejected_messages.
    conn.execute_unprepared(
        "CREATE TABLE co2_emissions (date_time DATETIME, emissions DOUBLE(7,2));
         INSERT INTO co2_emissions VALUES
           ('2020-07-13 22:43:23', 3500.00),
           ('2020-07-13 22:43:23', 3501.25),
           ('2020-07-14 08:00:00', 99999.99),
           (NULL, 412.00);",
    )
    .await
    .unwrap();

    let broker = TestBroker::start(&url).await;
    mqtt::publish_one(broker.setup.v4, "co2/pi-7", "2020-7-15 9:5:3|100000.0").await;

    let rows = eventually(Duration::from_secs(10), "3 old rows + 1 new", || async {
        let rows = db::readings(&conn).await;
        (rows.len() == 4).then_some(rows)
    })
    .await;
    let old: Vec<_> = rows
        .iter()
        .filter(|r| r.device_id == "legacy")
        .map(|r| (r.date_time.map(|t| t.to_string()), r.emissions))
        .collect();
    assert_eq!(
        old,
        [
            (Some("2020-07-13 22:43:23".into()), Some(3500.0)),
            (Some("2020-07-13 22:43:23".into()), Some(3501.25)),
            (Some("2020-07-14 08:00:00".into()), Some(99999.99)),
        ]
    );
    // The row without a time cannot be partitioned (nor drawn): it is recorded, not dropped,
    // and the backup below still holds it.
    let rejected = db::rejections(&conn).await;
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].reason, migration::NO_TIME_REASON);
    assert_eq!(rejected[0].payload, "|412");
    // The widened column keeps a value DOUBLE(7,2) could not hold.
    let new = rows.iter().find(|r| r.device_id == "pi-7").unwrap();
    assert_eq!(new.emissions, Some(100000.0));
    assert_eq!(new.date_time.unwrap().to_string(), "2020-07-15 09:05:03");

    // Old dashboards' query still works on the same table and columns.
    let old_query = conn
        .query_all_raw(Statement::from_string(
            conn.get_database_backend(),
            "SELECT date_time, emissions FROM co2_emissions WHERE date_time IS NOT NULL ORDER BY date_time",
        ))
        .await
        .unwrap();
    assert_eq!(old_query.len(), 4);
    // The original table is kept as a backup.
    let backup = conn
        .query_all_raw(Statement::from_string(
            conn.get_database_backend(),
            "SELECT * FROM co2_emissions_legacy",
        ))
        .await
        .unwrap();
    assert_eq!(backup.len(), 4);
    broker.stop().await;
}
