//! The operator's view: `/metrics` counts what was sent, `/healthz` and `/readyz` answer.

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::QoS;

use crate::security::sqlite_url;
use crate::support::broker::{scrape, TestBroker};
use crate::support::mariadb::MariaDb;
use crate::support::{eventually, mqtt};

/// `GET path` → (status code, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    exchange(addr, &format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n")).await
}

/// Sends `request` as it is → (status code, body) of the answer, read until the endpoint
/// closes the connection.
async fn exchange(addr: SocketAddr, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics endpoint listens");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn reading(seq: u64) -> (String, Vec<u8>) {
    let payload = format!(
        r#"{{"ts":{},"value":500,"seq":{seq}}}"#,
        1_763_978_400_000 + seq
    );
    ("co2/metered".to_owned(), payload.into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_sent() {
    let url = MariaDb::shared().create_database("metrics").await;
    let broker = TestBroker::start(&url).await;
    let http = broker.setup.http;
    let mut messages: Vec<_> = (0..10).map(reading).collect();
    messages.extend((0..2).map(reading)); // redelivered
    messages.extend([
        ("co2/metered".to_owned(), b"garbage".to_vec()),
        ("co2/metered".to_owned(), b"-1".to_vec()),
        ("co2//x".to_owned(), b"400".to_vec()),
    ]);
    mqtt::publish_all(
        broker.setup.v4,
        "metered".into(),
        QoS::AtLeastOnce,
        messages,
    )
    .await;

    eventually(
        Duration::from_secs(10),
        "every message accounted for",
        || async {
            let stored = scrape(http, "co2_readings_stored_total").await?;
            let duplicates = scrape(http, "co2_readings_duplicate_total").await?;
            (stored + duplicates == 12.0).then_some(())
        },
    )
    .await;
    let expect = [
        ("co2_messages_received_total", 15.0),
        ("co2_readings_stored_total", 10.0),
        ("co2_readings_duplicate_total", 2.0),
        ("co2_messages_rejected_total", 3.0),
        ("co2_spooled_total", 0.0),
        ("co2_database_up", 1.0),
        ("co2_auth_refused_total", 0.0),
        ("co2_connections_refused_total", 0.0),
    ];
    for (name, value) in expect {
        assert_eq!(scrape(http, name).await, Some(value), "{name}");
    }
    // The publisher has disconnected: no connection is left open.
    eventually(
        Duration::from_secs(5),
        "no open MQTT connection",
        || async { (scrape(http, "co2_mqtt_connections").await == Some(0.0)).then_some(()) },
    )
    .await;
    let (status, body) = http_get(http, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("# TYPE co2_batch_commit_seconds histogram"),
        "{body}"
    );
    assert!(scrape(http, "co2_batch_rows_sum").await.unwrap() >= 15.0);
    assert_eq!(http_get(http, "/healthz").await.0, 200);
    assert_eq!(http_get(http, "/readyz").await, (200, "ready\n".to_owned()));
    assert_eq!(http_get(http, "/nope").await.0, 404);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_when_the_database_is_down_and_the_spool_full() {
    let mut mariadb = MariaDb::start();
    let url = mariadb.create_database("ready").await;
    // A spool of 40 KiB fills after a few hundred readings.
    let broker = TestBroker::start_with(&url, "spool_max_bytes = 40000\nbatch_max_rows = 20").await;
    let http = broker.setup.http;
    mqtt::publish_all(
        broker.setup.v4,
        "ready-1".into(),
        QoS::AtLeastOnce,
        (0..5).map(reading),
    )
    .await;
    eventually(Duration::from_secs(10), "database up", || async {
        (scrape(http, "co2_database_up").await == Some(1.0)).then_some(())
    })
    .await;
    mariadb = tokio::task::spawn_blocking(move || {
        mariadb.kill();
        mariadb
    })
    .await
    .unwrap();
    mqtt::publish_all(
        broker.setup.v4,
        "ready-2".into(),
        QoS::AtLeastOnce,
        (5..600).map(reading),
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "spool refusing readings",
        || async { (scrape(http, "co2_spool_refused_total").await? > 0.0).then_some(()) },
    )
    .await;
    assert_eq!(scrape(http, "co2_database_up").await, Some(0.0));
    let (status, body) = http_get(http, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("spool nearly full"), "{body}");
    assert_eq!(
        http_get(http, "/healthz").await.0,
        200,
        "alive all the same"
    );
    broker.stop().await;
    drop(mariadb);
}

/// What one request may cost the endpoint: a head over 8 KiB is refused, a head that never
/// ends is closed after 5 s; the bare requests of `scripts/bench` (no Host header) and
/// HTTP/1.0 clients are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_bounded_in_size_and_time() {
    use co2_broker::http::{MAX_REQUEST_BYTES, REQUEST_TIMEOUT};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(&sqlite_url(dir.path())).await;
    let http = broker.setup.http;

    let (status, body) = exchange(http, "GET /metrics HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, 200);
    assert!(body.contains("\nco2_spool_batches 0\n"), "{body}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert_eq!(
        exchange(http, "GET /healthz HTTP/1.0\r\n\r\n").await,
        (200, "ok\n".to_owned())
    );
    assert_eq!(
        exchange(http, "POST /metrics HTTP/1.1\r\n\r\n").await.0,
        405
    );

    let huge = format!(
        "GET /metrics HTTP/1.1\r\nx-filler: {}\r\n\r\n",
        "a".repeat(MAX_REQUEST_BYTES)
    );
    assert_eq!(exchange(http, &huge).await.0, 431);

    let mut slow = tokio::net::TcpStream::connect(http).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nhost: te")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(REQUEST_TIMEOUT * 2, slow.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "a head that never ends holds its connection"
    );
    let waited = started.elapsed();
    assert!(
        waited >= REQUEST_TIMEOUT - Duration::from_millis(500),
        "closed after {waited:?}"
    );
    // The endpoint still serves.
    assert_eq!(http_get(http, "/healthz").await.0, 200);
    broker.stop().await;
}
