//! End to end over TCP: every payload format, on SQLite and on MariaDB.

use std::time::Duration;

use co2_proto::StorageAck;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::support::broker::TestBroker;
use crate::support::mariadb::MariaDb;
use crate::support::{db, eventually, mqtt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_payload_format_is_stored_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/co2.db?mode=rwc", dir.path().display());
    every_payload_format_is_stored(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_payload_format_is_stored_in_mariadb() {
    let url = MariaDb::shared().create_database("formats").await;
    every_payload_format_is_stored(&url).await;
}

async fn every_payload_format_is_stored(url: &str) {
    let broker = TestBroker::start(url).await;
    let v4 = broker.setup.v4;

    // An ordinary subscriber sees the same traffic: this is a real broker, not just a sink.
    let (watcher, mut watcher_events) = subscriber(v4, "watcher", "co2/#").await;
    // The agent's storage ack arrives on ack/<device>.
    let (_acks, mut ack_events) = subscriber(v4, "pi-json", "ack/pi-json").await;

    mqtt::publish_one(v4, "co2/pi-legacy", "2020-7-13 22:43:23|3500.0").await;
    mqtt::publish_one(v4, "co2/pi-json/kitchen", r#"{"ts":"2026-11-24T10:00:00.250Z","value":612.5,"unit":"ppm","seq":41,"temperature":21.5,"humidity":40}"#).await;
    mqtt::publish_one(v4, "co2/pi-epoch", r#"{"ts":1763978400000,"co2":700}"#).await;
    mqtt::publish_one(v4, "co2/pi-bare", "  815.25 ").await;
    publish_v5(
        broker.setup.v5,
        "co2/pi-v5",
        r#"{"ts":"2026-11-24T10:00:01Z","value":420}"#,
    )
    .await;
    mqtt::publish_one(v4, "co2/pi-bad", "not a reading").await;
    // Every digit as sent (the default JSON float parser can be 1 ulp off).
    mqtt::publish_one(v4, "co2/pi-precise", r#"{"value":20261.933683006926}"#).await;
    // Epoch times are truncated to the millisecond, as RFC 3339 ones are: one instant, one row.
    mqtt::publish_one(v4, "co2/pi-frac", r#"{"ts":1594680203.9996,"value":1}"#).await;
    // Device ids differing only in trailing spaces would merge under MySQL's PAD SPACE
    // collations (silent loss); they are refused instead.
    for topic in ["co2/padprobe", "co2/padprobe ", "co2/padprobe  "] {
        mqtt::publish_one(v4, topic, r#"{"ts":"2026-11-24T10:00:02Z","value":500}"#).await;
    }

    let db = db::connect(url).await;
    let rows = eventually(Duration::from_secs(10), "8 readings", || async {
        let rows = db::readings(&db).await;
        (rows.len() == 8).then_some(rows)
    })
    .await;
    let by_device = |d: &str| {
        rows.iter()
            .find(|r| r.device_id == d)
            .unwrap_or_else(|| panic!("no row for {d}"))
    };

    let legacy = by_device("pi-legacy");
    assert_eq!(legacy.date_time.unwrap().to_string(), "2020-07-13 22:43:23");
    assert_eq!(legacy.emissions, Some(3500.0));
    assert_eq!(legacy.topic, "co2/pi-legacy");

    let json = by_device("pi-json");
    assert_eq!(
        json.date_time.unwrap().to_string(),
        "2026-11-24 10:00:00.250"
    );
    assert_eq!((json.emissions, json.seq), (Some(612.5), Some(41)));
    assert_eq!((json.temperature, json.humidity), (Some(21.5), Some(40.0)));
    assert_eq!(json.topic, "co2/pi-json/kitchen");

    assert_eq!(
        by_device("pi-epoch").date_time.unwrap().to_string(),
        "2025-11-24 10:00:00"
    );
    assert_eq!(by_device("pi-v5").emissions, Some(420.0));

    let bare = by_device("pi-bare");
    assert_eq!(bare.emissions, Some(815.25));
    let age = chrono::Utc::now().naive_utc() - bare.date_time.unwrap();
    assert!(
        age < chrono::TimeDelta::seconds(60),
        "bare numbers take the receive time"
    );
    assert_eq!(bare.date_time, Some(bare.received_at));

    assert_eq!(by_device("pi-precise").emissions, Some(20261.933683006926));
    assert_eq!(
        by_device("pi-frac").date_time.unwrap().to_string(),
        "2020-07-13 22:43:23.999"
    );
    assert_eq!(by_device("padprobe").topic, "co2/padprobe");

    // Each device's first batch writes its row in `devices`; the rejected one has none.
    let devices = db::devices(&db).await;
    assert_eq!(
        devices
            .iter()
            .map(|d| d.device_id.as_str())
            .collect::<Vec<_>>(),
        [
            "padprobe",
            "pi-bare",
            "pi-epoch",
            "pi-frac",
            "pi-json",
            "pi-legacy",
            "pi-precise",
            "pi-v5"
        ]
    );
    for device in &devices {
        let reading = by_device(&device.device_id);
        assert_eq!(
            (device.first_seen, device.last_seen),
            (reading.received_at, reading.received_at),
            "{device:?}"
        );
    }

    let mut rejected = eventually(Duration::from_secs(5), "3 rejections", || async {
        let r = db::rejections(&db).await;
        (r.len() == 3).then_some(r)
    })
    .await;
    rejected.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(rejected[0].topic, "co2/padprobe ");
    assert_eq!(rejected[1].topic, "co2/padprobe  ");
    for padded in &rejected[..2] {
        assert!(padded.reason.contains("whitespace"), "{padded:?}");
    }
    assert_eq!(rejected[2].topic, "co2/pi-bad");
    assert_eq!(rejected[2].payload, "not a reading");
    assert_eq!(
        rejected[2].reason,
        r#"value is not a number: "not a reading""#
    );

    let ack = next_publish(&mut ack_events).await;
    assert_eq!(ack.0, "ack/pi-json");
    let ack = StorageAck::parse(&ack.1).expect("ack payload");
    assert!(ack.stored.contains(41), "{ack:?}");

    let mut seen = Vec::new();
    while seen.len() < 11 {
        seen.push(next_publish(&mut watcher_events).await.0);
    }
    assert!(seen.contains(&"co2/pi-bad".to_owned()), "{seen:?}");
    drop(watcher);

    let metrics = &broker.metrics;
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(metrics.received.load(Relaxed), 11);
    assert_eq!(metrics.stored.load(Relaxed), 8);
    assert_eq!(metrics.rejected.load(Relaxed), 3);
    broker.stop().await;
}

async fn subscriber(
    addr: std::net::SocketAddr,
    id: &str,
    filter: &str,
) -> (AsyncClient, rumqttc::EventLoop) {
    let options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    let (client, mut events) = AsyncClient::new(options, 100);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let mut dropped_connects = 0;
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::SubAck(_))) => return (client, events),
            Ok(_) => {}
            // See `mqtt::publish_all`: rumqttd may drop a CONNECT that races a disconnect.
            Err(e) if dropped_connects < 5 => {
                dropped_connects += 1;
                eprintln!("subscriber {id}: CONNECT dropped ({e:?}); reconnecting");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("subscriber {id} cannot connect: {e:?}"),
        }
    }
}

async fn next_publish(events: &mut rumqttc::EventLoop) -> (String, Vec<u8>) {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) =
                events.poll().await.expect("connection stays up")
            {
                return (p.topic, p.payload.to_vec());
            }
        }
    })
    .await
    .expect("a message within 10 s")
}

async fn publish_v5(addr: std::net::SocketAddr, topic: &str, payload: &str) {
    use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
    use rumqttc::v5::{
        mqttbytes::QoS as QoS5, AsyncClient as Client5, Event as Event5, MqttOptions as Options5,
    };
    let (client, mut events) = Client5::new(
        Options5::new("v5-client", addr.ip().to_string(), addr.port()),
        10,
    );
    client
        .publish(topic, QoS5::AtLeastOnce, false, payload.to_owned())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event5::Incoming(Packet5::PubAck(_)) =
                events.poll().await.expect("v5 connection")
            {
                break;
            }
        }
    })
    .await
    .expect("PUBACK over MQTT 5");
    let _ = client.disconnect().await; // best effort: the test only needed the PUBACK
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_last_seen_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/co2.db?mode=rwc", dir.path().display());
    identity_and_last_seen(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_last_seen_in_mariadb() {
    let url = MariaDb::shared().create_database("last_seen").await;
    identity_and_last_seen(&url).await;
}

/// Through the writer's own database layer: a redelivered reading is stored once, a restarted
/// broker replaying an older spooled batch must not move `devices.last_seen` back, and a busy
/// device's row is rewritten only every `storage::devices::RESOLUTION`.
async fn identity_and_last_seen(url: &str) {
    use co2_broker::ingest::{Batch, Reading};
    use co2_broker::settings::DatabaseUrl;
    use co2_broker::storage::Database;

    let at = |s: i64| {
        chrono::DateTime::from_timestamp(1_764_500_000 + s, 0)
            .unwrap()
            .naive_utc()
    };
    let batch = |s: i64| Batch {
        readings: vec![Reading {
            device_id: co2_proto::DeviceId::new("pi-1").unwrap(),
            topic: "co2/pi-1".into(),
            measured_at: at(s),
            received_at: at(s),
            co2_ppm: 500.0,
            seq: None,
            temperature_c: None,
            humidity_pct: None,
            dedup_key: format!("t{s}"),
        }],
        rejections: Vec::new(),
    };
    let url = DatabaseUrl::new(url.to_owned());
    let running = Database::connect(&url, 2).await.unwrap();
    running.migrate().await.unwrap();
    running.write(&batch(10)).await.unwrap();

    // A second process (the broker after a restart) replays a batch spooled earlier.
    let restarted = Database::connect(&url, 2).await.unwrap();
    restarted.write(&batch(5)).await.unwrap();
    // And one it had stored already: the identity key refuses it on either backend.
    let again = restarted.write(&batch(10)).await.unwrap();
    assert_eq!((again.stored, again.duplicates), (0, 1));
    let db = db::connect(url.expose()).await;
    let row = &db::devices(&db).await[0];
    assert_eq!((row.first_seen, row.last_seen), (at(5), at(10)));

    // It last wrote last_seen 10 itself (with the duplicate), so 12 is within the resolution.
    restarted.write(&batch(12)).await.unwrap();
    assert_eq!(db::devices(&db).await[0].last_seen, at(10));
    restarted.write(&batch(15)).await.unwrap();
    assert_eq!(db::devices(&db).await[0].last_seen, at(15));
    assert_eq!(db::reading_count(&db).await, 4);
}
