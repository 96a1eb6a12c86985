//! Publishing faster than the database writes: every message must still be stored once.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use rumqttc::QoS;

use crate::support::broker::TestBroker;
use crate::support::mariadb::MariaDb;
use crate::support::{db, eventually, mqtt};

const CLIENTS: usize = 4;
const PER_CLIENT: usize = 50_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_200k_qos1_messages_is_stored_exactly() {
    let url = MariaDb::shared().create_database("burst").await;
    let broker = TestBroker::start(&url).await;
    let addr = broker.setup.v4;
    let started = Instant::now();
    let publishers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let messages = (0..PER_CLIENT).map(move |i| {
                let payload = format!(
                    r#"{{"ts":{},"value":{},"seq":{i}}}"#,
                    1_763_978_400_000u64 + i as u64,
                    400 + i % 1000
                );
                (format!("co2/burst-{c}"), payload.into_bytes())
            });
            tokio::spawn(mqtt::publish_all(
                addr,
                format!("burst-{c}"),
                QoS::AtLeastOnce,
                messages,
            ))
        })
        .collect();
    for p in publishers {
        p.await.unwrap();
    }
    let published = started.elapsed();
    let total = (CLIENTS * PER_CLIENT) as u64;
    let conn = db::connect(&url).await;
    eventually(
        Duration::from_secs(120),
        "every burst message stored",
        || async { (broker.metrics.stored.load(Relaxed) >= total).then_some(()) },
    )
    .await;
    let stored = started.elapsed();
    assert_eq!(db::reading_count(&conn).await, total);
    assert_eq!(broker.metrics.duplicates.load(Relaxed), 0);
    println!(
        "burst: {total} QoS 1 messages from {CLIENTS} clients: all PUBACKed in {:.2} s, all stored in {:.2} s ({:.0} readings/s)",
        published.as_secs_f64(),
        stored.as_secs_f64(),
        total as f64 / stored.as_secs_f64()
    );
    broker.stop().await;
}
