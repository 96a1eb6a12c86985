//! The real agent against a real MQTT broker (rumqttd, in-process) and a stand-in for the
//! storage side that acks every reading it sees: readings arrive in order without gaps, acked
//! readings leave the outbox, and a backlog left from an offline period drains first.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use co2_edge::config::{self, Overrides, Settings};
use co2_edge::outbox::{Outbox, OutboxLimits};
use co2_proto::{Payload, SeqRanges, StorageAck};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use tokio::sync::{mpsc, oneshot};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_broker(port: u16) {
    let toml = format!(
        r#"
        id = 0
        [router]
        id = 0
        max_connections = 100
        max_outgoing_packet_count = 200
        max_segment_size = 1048576
        max_segment_count = 10
        [v4.1]
        name = "v4-1"
        listen = "127.0.0.1:{port}"
        next_connection_delay_ms = 1
        [v4.1.connections]
        connection_timeout_ms = 60000
        max_payload_size = 20480
        max_inflight_count = 100
        dynamic_filters = true
        "#
    );
    let cfg: rumqttd::Config = ::config::Config::builder()
        .add_source(::config::File::from_str(&toml, ::config::FileFormat::Toml))
        .build()
        .unwrap()
        .try_deserialize()
        .unwrap();
    std::thread::spawn(move || {
        let mut broker = rumqttd::Broker::new(cfg);
        // Blocks for the life of the test process; rumqttd has no stop API.
        let _ = broker.start();
    });
}

async fn wait_for_port(port: u16) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("broker did not start on {port}");
}

/// Subscribes to `co2/#` (reporting the SubAck on `subscribed`), reports every reading's seq
/// and acks it on `ack/<device>`, as the broker's storage does after a commit.
async fn run_acker(port: u16, subscribed: oneshot::Sender<()>, seqs: mpsc::Sender<u64>) {
    let mut subscribed = Some(subscribed);
    let mut options = MqttOptions::new("storage-stand-in", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    client.subscribe("co2/#", QoS::AtLeastOnce).await.unwrap();
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::Publish(p))) if p.topic.starts_with("co2/") => {
                let payload = Payload::parse(&p.payload).unwrap();
                let seq = payload.seq.expect("JSON payloads carry seq");
                let device = p.topic.trim_start_matches("co2/");
                let ack = StorageAck {
                    stored: SeqRanges::from_seqs([seq]),
                };
                client
                    .publish(
                        format!("ack/{device}"),
                        QoS::AtLeastOnce,
                        false,
                        ack.to_json(),
                    )
                    .await
                    .unwrap();
                if seqs.send(seq).await.is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Incoming::SubAck(_))) => {
                if let Some(tx) = subscribed.take() {
                    let _ = tx.send(());
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn settings(port: u16, data_dir: &Path) -> Settings {
    let text = format!(
        r#"
        device_id = "test-pi"
        data_dir = "{}"
        log = "info"
        [sensor]
        kind = "simulated"
        interval_ms = 50
        median_window = 1
        [mqtt]
        host = "127.0.0.1"
        port = {port}
        reconnect_delay_ms = 100
        [clock]
        require_ntp_sync = false
        [outbox]
        fsync_every = 1
        "#,
        data_dir.display()
    );
    let file = data_dir.join("agent.toml");
    std::fs::write(&file, text).unwrap();
    config::load(Some(&file), &Overrides::default()).unwrap()
}

/// Collects `n` distinct seqs (in arrival order, duplicates dropped) within a deadline.
async fn collect(rx: &mut mpsc::Receiver<u64>, n: usize) -> Vec<u64> {
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while order.len() < n {
            let seq = rx.recv().await.unwrap();
            if seen.insert(seq) {
                order.push(seq);
            }
        }
    })
    .await
    .expect("readings arrive within 30 s");
    order
}

fn pending_after_run(data_dir: &Path) -> Vec<u64> {
    let (mut outbox, _) = Outbox::open(&data_dir.join("outbox"), limits()).unwrap();
    outbox
        .read_from(0, 1000)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect()
}

fn limits() -> OutboxLimits {
    OutboxLimits {
        max_records: 1000,
        segment_records: 8192,
        fsync_every: 1,
        fsync_interval: Duration::from_secs(1),
    }
}

/// Leaves `n` readings in the outbox, as an agent does while the broker is unreachable.
fn prefill_backlog(data_dir: &Path, n: usize) -> u64 {
    let (mut outbox, _) = Outbox::open(&data_dir.join("outbox"), limits()).unwrap();
    let first = outbox.next_seq();
    let clock = co2_edge::clock::SystemClock::new(Default::default());
    for i in 0..n {
        let mut time = clock.record_time();
        time.trusted = true;
        let reading = co2_edge::reading::Reading {
            time,
            co2_ppm: 500.0 + i as f64,
            temperature_c: None,
            humidity_pct: None,
        };
        outbox.append(&reading).unwrap();
    }
    outbox.close().unwrap();
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_drains_in_order_then_live_readings_follow_and_acked_ones_leave_the_outbox() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("co2_edge=info"))
        .with_test_writer()
        .try_init();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let first = prefill_backlog(dir.path(), 15);

    start_broker(port);
    wait_for_port(port).await;
    let (seq_tx, mut seq_rx) = mpsc::channel(1000);
    let (sub_tx, sub_rx) = oneshot::channel();
    tokio::spawn(run_acker(port, sub_tx, seq_tx));
    tokio::time::timeout(Duration::from_secs(10), sub_rx)
        .await
        .unwrap()
        .unwrap();

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let agent = tokio::spawn(co2_edge::agent::run(settings(port, dir.path()), async {
        let _ = stop_rx.await;
    }));
    let seqs = collect(&mut seq_rx, 40).await;
    assert_eq!(seqs[0], first, "the backlog comes first");
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "in order, no gaps: {seqs:?}"
    );

    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(15), agent)
        .await
        .expect("agent stops on shutdown")
        .unwrap()
        .unwrap();
    // Acks for the last few readings may still have been on their way at shutdown; everything
    // older than one in-flight window must have left the outbox.
    let pending = pending_after_run(dir.path());
    let settled = &seqs[..seqs.len() - 16];
    assert!(
        pending.iter().all(|s| !settled.contains(s)),
        "acked readings left the outbox; still pending: {pending:?}"
    );
}
