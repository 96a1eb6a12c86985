//! Real MQTT clients (rumqttc) over TCP.

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

/// Waits until the listener at `addr` accepts TCP connections.
///
/// A TCP probe, not an MQTT one: a probe client's quick connect–disconnect right before the
/// test's own clients made rumqttd 0.20 occasionally drop the next connection (its router
/// reuses connection slots while the old one's events are still in flight).
pub async fn wait_until_accepting(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "broker at {addr} never accepted a connection"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes every message at `qos` from one connection and returns once all are acked
/// (PUBACK for QoS 1, immediately after sending for QoS 0).
pub async fn publish_all(
    addr: SocketAddr,
    client_id: String,
    qos: QoS,
    messages: impl IntoIterator<Item = (String, Vec<u8>)> + Send + 'static,
) {
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(options, 1000);
    let messages: Vec<_> = messages.into_iter().collect();
    let expected = messages.len();
    let publisher = tokio::spawn(async move {
        for (topic, payload) in messages {
            client
                .publish(topic, qos, false, payload)
                .await
                .expect("queue publish");
        }
        client
    });
    let (mut done, mut connected, mut refused_connects) = (0usize, false, 0);
    while done < expected {
        let event = match events.poll().await {
            Ok(event) => event,
            // rumqttd 0.20 reuses connection ids: a CONNECT that lands in the instant another
            // client disconnects can be dropped by that client's late disconnect event. A real
            // client reconnects; so does this one (rumqttc sends nothing before the CONNACK,
            // so nothing is sent twice).
            Err(e) if !connected && refused_connects < 5 => {
                refused_connects += 1;
                eprintln!("CONNECT to {addr} dropped ({e:?}); reconnecting");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => {
                panic!("MQTT connection to {addr} ({done} of {expected} acked) failed: {e:?}")
            }
        };
        match event {
            Event::Incoming(Packet::ConnAck(_)) => connected = true,
            Event::Incoming(Packet::PubAck(_)) if qos == QoS::AtLeastOnce => done += 1,
            Event::Outgoing(Outgoing::Publish(_)) if qos == QoS::AtMostOnce => done += 1,
            _ => {}
        }
    }
    let client = publisher.await.expect("publisher task");
    client.disconnect().await.expect("queue disconnect");
    // Drive the event loop until the DISCONNECT is on the wire.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match events.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                _ => {}
            }
        }
    })
    .await;
}

/// Publishes one message at QoS 1 with a short-lived client.
pub async fn publish_one(addr: SocketAddr, topic: &str, payload: impl Into<Vec<u8>>) {
    let id = super::unique_client_id("one");
    publish_all(
        addr,
        id,
        QoS::AtLeastOnce,
        vec![(topic.to_owned(), payload.into())],
    )
    .await;
}
