//! Real parts for the integration tests: a private MariaDB server, the broker on free ports
//! (in-process or as the real binary), and real MQTT clients over TCP.

pub mod broker;
pub mod db;
pub mod mariadb;
pub mod mqtt;

use std::future::Future;
use std::time::Duration;

/// Polls `check` until it returns `Some`, failing the test with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP port nobody listens on right now (rumqttd binds its own listeners, so the harness
/// cannot hand it a port-0 socket).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("the loopback interface can bind an ephemeral port")
}
