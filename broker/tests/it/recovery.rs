//! rumqttd 0.20 poisons a listener when a client id that failed its handshake connects again
//! (upstream bytebeamio/rumqtt#1062): afterwards that listener accepts no client at all. The
//! guard refuses the client ids that trigger it, but a local process can still reach rumqttd's
//! loopback port; the broker then notices the panic and restarts the listener. This test
//! provokes the bug for real, on the real binary (a separate process, so that the panic hook
//! does not touch the other tests' brokers).

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::support::broker::{config_file, BrokerProcess};
use crate::support::{db, eventually, unique_client_id};

/// Connects with `client_id` and publishes one reading at QoS 1; Ok once PUBACKed.
async fn try_publish(addr: SocketAddr, client_id: &str, payload: &str) -> Result<(), String> {
    let options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    let (client, mut events) = AsyncClient::new(options, 10);
    client
        .publish("co2/survivor", QoS::AtLeastOnce, false, payload.to_owned())
        .await
        .map_err(|e| e.to_string())?;
    let acked = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("no PUBACK within 3 s".into()));
    let _ = client.disconnect().await; // the verdict is in; a failed goodbye changes nothing
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_rumqttd_listener_is_restarted_and_serves_again() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/co2.db?mode=rwc", dir.path().display());
    let setup = config_file(dir.path(), &url, "");
    let broker = BrokerProcess::spawn(&setup).await;
    let inner = broker.rumqttd_address("test-v4");

    // Straight to rumqttd: the router refuses a client id with '/' after rumqttd registered
    // its will sender; the second attempt with the same id panics and poisons the listener.
    for _ in 0..2 {
        let refused = try_publish(inner, "bad/client", r#"{"value":1}"#).await;
        assert!(refused.is_err(), "rumqttd refuses client ids with '/'");
    }
    eventually(
        Duration::from_secs(10),
        "the broker to notice the panic",
        || async {
            broker
                .log()
                .contains("restarting this listener")
                .then_some(())
        },
    )
    .await;

    // New, well-behaved clients are served again, through the guard.
    eventually(
        Duration::from_secs(20),
        "a new client to be served",
        || async {
            try_publish(setup.v4, &unique_client_id("survivor"), r#"{"value":612}"#)
                .await
                .ok()
        },
    )
    .await;
    let conn = db::connect(&url).await;
    eventually(
        Duration::from_secs(10),
        "the survivor's reading stored",
        || async {
            db::readings(&conn)
                .await
                .iter()
                .any(|r| r.device_id == "survivor" && r.emissions == Some(612.0))
                .then_some(())
        },
    )
    .await;
    let (code, log) = broker.terminate();
    assert_eq!(code, Some(0), "{log}");
}
