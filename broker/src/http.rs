//! The operator's HTTP endpoint: `/metrics` (Prometheus text format), `/healthz` (the process
//! answers) and `/readyz` (listeners up, and the database reachable or the spool within bounds).
//!
//! Three fixed GET routes do not justify an HTTP framework, so this is a minimal HTTP/1.1
//! responder: one request per connection, bounded request size and time, and bounded
//! connections: at most [`MAX_CONNECTIONS`] in all and [`MAX_CONNECTIONS_PER_ADDRESS`] from
//! one address (beyond either a connection is closed at once), so idle sockets from one host
//! can neither exhaust the process's file descriptors nor keep Prometheus from scraping.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Histogram, IngestMetrics, BATCH_ROW_BUCKETS, LATENCY_BUCKETS};
use crate::per_address::AddressSlots;

const MAX_REQUEST_BYTES: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Open connections in all: a scraper and a few operators need a handful.
pub const MAX_CONNECTIONS: usize = 64;
/// Open connections from one address.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 4;

/// What the endpoint reports on, shared with the rest of the broker.
pub struct Health {
    pub metrics: Arc<IngestMetrics>,
    /// The spool bound, to tell "spooling within bounds" from "about to refuse readings".
    pub spool_max_bytes: u64,
}

/// Binds `addr` (before returning, so a taken port fails the start) and serves until `stop`.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    stop: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_address = AddressSlots::new(MAX_CONNECTIONS_PER_ADDRESS);
    Ok(tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics endpoint: accept failed");
                        // Out of file descriptors and the like: back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = stop.cancelled() => return,
            };
            // Over a limit: dropping the stream closes it.
            let Some(address_slot) = per_address.take(peer.ip()) else {
                continue;
            };
            let Ok(slot) = connections.clone().try_acquire_owned() else {
                continue;
            };
            let health = health.clone();
            tokio::spawn(async move {
                let _held = (slot, address_slot);
                // A client that goes away mid-request is no concern of ours.
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, respond(stream, &health)).await;
            });
        }
    }))
}

async fn respond(mut stream: TcpStream, health: &Health) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST_BYTES {
        match stream.read(&mut chunk).await? {
            0 => break,
            n => request.extend_from_slice(&chunk[..n]),
        }
    }
    let line = String::from_utf8_lossy(&request);
    let mut parts = line.split_whitespace();
    let (status, content_type, body) = match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) => (
            "200 OK",
            "text/plain; version=0.0.4",
            render_metrics(&health.metrics),
        ),
        (Some("GET"), Some("/healthz")) => ("200 OK", "text/plain", "ok\n".to_owned()),
        (Some("GET"), Some("/readyz")) => match readiness(health) {
            Ok(()) => ("200 OK", "text/plain", "ready\n".to_owned()),
            Err(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
        },
        (Some("GET"), _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /healthz or /readyz\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Ready while readings can be made durable: written to the database, or spooled with room
/// left. (The listeners are up whenever this endpoint is: both start before it and a failed
/// listener stops the process.)
fn readiness(health: &Health) -> Result<(), String> {
    let m = &health.metrics;
    if m.database_up.load(Relaxed) == 1 {
        return Ok(());
    }
    let used = m.spool_bytes.load(Relaxed);
    if used < health.spool_max_bytes / 10 * 9 {
        Ok(())
    } else {
        Err(format!(
            "database down and spool nearly full ({used} of {} bytes)",
            health.spool_max_bytes
        ))
    }
}

/// Prometheus text exposition of every ingest metric.
pub fn render_metrics(m: &IngestMetrics) -> String {
    let mut out = String::with_capacity(4096);
    let counters = [
        (
            "co2_messages_received_total",
            "Messages taken off the MQTT link under co2/#.",
            &m.received,
        ),
        (
            "co2_readings_stored_total",
            "Readings newly written to the database.",
            &m.stored,
        ),
        (
            "co2_readings_duplicate_total",
            "Readings the database already held (redeliveries).",
            &m.duplicates,
        ),
        (
            "co2_messages_rejected_total",
            "Messages recorded in rejected_messages.",
            &m.rejected,
        ),
        (
            "co2_spooled_total",
            "Readings and rejections written to the on-disk spool.",
            &m.spooled,
        ),
        (
            "co2_replayed_total",
            "Readings and rejections moved from the spool to the database.",
            &m.replayed,
        ),
        (
            "co2_spool_refused_total",
            "Readings and rejections refused because the spool was full or failing.",
            &m.spool_refused,
        ),
        (
            "co2_acks_dropped_total",
            "Storage acks that could not be published.",
            &m.acks_dropped,
        ),
        (
            "co2_write_conflicts_total",
            "Batch writes repeated after losing a lock conflict (deadlock, lock wait timeout, busy SQLite).",
            &m.write_conflicts,
        ),
        (
            "co2_auth_refused_total",
            "CONNECTs refused for missing or wrong credentials.",
            &m.auth_refused,
        ),
        (
            "co2_password_hashes_total",
            "Argon2 password checks computed (remembered passwords and refused or abandoned checks cost none).",
            &m.password_hashes,
        ),
        (
            "co2_connections_refused_total",
            "Connections refused: limit, CONNECT timeout, not MQTT, TLS failure, invalid client id.",
            &m.connections_refused,
        ),
        (
            "co2_oversized_packets_total",
            "Packets larger than max_payload_size (the connection is closed).",
            &m.oversized_packets,
        ),
        (
            "co2_topic_denied_total",
            "Publishes, subscriptions and wills outside a device's own topics (the connection is closed).",
            &m.topic_denied,
        ),
    ];
    for (name, help, counter) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            counter.load(Relaxed)
        );
    }
    let gauges = [
        (
            "co2_database_up",
            "1 if the last database write succeeded.",
            &m.database_up,
        ),
        (
            "co2_spool_bytes",
            "Bytes in the on-disk spool.",
            &m.spool_bytes,
        ),
        (
            "co2_spool_batches",
            "Batches in the spool waiting for the database.",
            &m.spool_batches,
        ),
        (
            "co2_mqtt_connections",
            "MQTT client connections open now.",
            &m.mqtt_connections,
        ),
    ];
    for (name, help, gauge) in gauges {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
            gauge.load(Relaxed)
        );
    }
    histogram(
        &mut out,
        "co2_batch_commit_seconds",
        "Time to commit one batch to the database.",
        m.batch_latency(),
        &LATENCY_BUCKETS,
    );
    histogram(
        &mut out,
        "co2_batch_rows",
        "Readings and rejections per committed batch.",
        m.batch_rows(),
        &BATCH_ROW_BUCKETS,
    );
    out
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram, bounds: &[f64]) {
    let (buckets, count, sum) = h.snapshot();
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (bound, n) in bounds.iter().zip(buckets) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_family() {
        let m = IngestMetrics::default();
        IngestMetrics::add(&m.received, 3);
        m.observe_batch(3, Duration::from_millis(4));
        let text = render_metrics(&m);
        assert!(text.contains("co2_messages_received_total 3\n"));
        assert!(text.contains("co2_batch_commit_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("co2_batch_commit_seconds_bucket{le=\"0.002\"} 0\n"));
        assert!(text.contains("co2_batch_rows_count 1\n"));
        assert!(text.contains("# TYPE co2_database_up gauge\n"));
        assert!(text.contains("co2_mqtt_connections 0\n"));
        assert!(text.contains("co2_topic_denied_total 0\n"));
    }
}
