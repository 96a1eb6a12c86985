//! In-process ingest counters, shared by every task and read by tests and the metrics endpoint.
//!
//! Plain atomics: incrementing must cost nothing on a path that runs 100,000 times a second.
//! [`exposition`] turns them into the OpenMetrics text of `/metrics` at scrape time.

pub mod exposition;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (seconds) of the batch commit latency histogram.
pub const LATENCY_BUCKETS: [f64; 10] =
    [0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

#[derive(Debug, Default)]
pub struct IngestMetrics {
    /// Messages taken off the MQTT link under `co2/#`.
    pub received: AtomicU64,
    /// Readings newly written to the database (live and replayed).
    pub stored: AtomicU64,
    /// Readings the database already held (redeliveries), so not written again.
    pub duplicates: AtomicU64,
    /// Messages recorded in `rejected_messages` (or spooled to be).
    pub rejected: AtomicU64,
    /// Readings and rejections written to the on-disk spool.
    pub spooled: AtomicU64,
    /// Readings and rejections moved from the spool to the database.
    pub replayed: AtomicU64,
    /// Readings and rejections refused because the spool was full (lost unless re-sent).
    pub spool_refused: AtomicU64,
    /// Bytes in the spool now.
    pub spool_bytes: AtomicU64,
    /// Batches in the spool now.
    pub spool_batches: AtomicU64,
    /// 1 while the last database write succeeded.
    pub database_up: AtomicU64,
    /// Batches committed to the database.
    pub batches: AtomicU64,
    /// Storage acks the MQTT router could not take (the agent will resend and get a new ack).
    pub acks_dropped: AtomicU64,
    /// Batch writes repeated because they lost a lock conflict (a deadlock, a lock wait
    /// timeout, a busy SQLite file) with another transaction.
    pub write_conflicts: AtomicU64,
    /// Partitions dropped by retention (MySQL/MariaDB).
    pub retention_partitions_dropped: AtomicU64,
    /// Rows deleted by retention (SQLite, or tables without partitions).
    pub retention_rows_deleted: AtomicU64,
    /// Retention rounds that failed (retried after 5 minutes).
    pub retention_failures: AtomicU64,
    batch_latency: Histogram,
    batch_rows: Histogram,
    /// MQTT CONNECTs refused by authentication: unknown device, wrong password, or a client
    /// id that is not the username.
    pub auth_refused: AtomicU64,
    /// Argon2 password hashes computed (a remembered password, a full queue or a client that
    /// left before its turn costs none): what a login flood costs the broker.
    pub password_hashes: AtomicU64,
    /// Connections closed by the guard before reaching the broker: over the connection limit,
    /// no CONNECT in time, not MQTT, a failed TLS handshake, an invalid client id.
    pub connections_refused: AtomicU64,
    /// Packets larger than the listener's `max_payload_size`; the client is disconnected.
    pub oversized_packets: AtomicU64,
    /// Publishes or subscriptions outside the device's own topics; the client is disconnected.
    pub topic_denied: AtomicU64,
    /// MQTT connections open now (gauge), counted by the guard in front of rumqttd.
    pub mqtt_connections: AtomicU64,
}

/// A histogram over ten fixed upper bounds, lock-free: one atomic increment per observation.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket, not cumulative: `buckets[i]` counts the values above bound
    /// `i - 1` and at most bound `i`; the last one those above every bound (`+Inf`).
    buckets: [AtomicU64; 11],
    /// Sum in micro-units (µs for latencies, rows × 10⁶ for sizes) to stay integral.
    sum_micros: AtomicU64,
}

/// What a [`Histogram`] held at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Observations per bucket, not cumulative; the last is the `+Inf` bucket.
    pub buckets: [u64; 11],
    pub sum: f64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

impl Histogram {
    fn observe(&self, value: f64, bounds: &[f64; 10]) {
        let bucket = bounds
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(bounds.len());
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add((value * 1e6) as u64, Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Relaxed)),
            sum: self.sum_micros.load(Relaxed) as f64 / 1e6,
        }
    }
}

/// Upper bounds of the batch size histogram, in rows.
pub const BATCH_ROW_BUCKETS: [f64; 10] = [
    1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 3000.0,
];

impl IngestMetrics {
    pub fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }

    pub fn observe_batch(&self, rows: usize, latency: Duration) {
        self.batches.fetch_add(1, Relaxed);
        self.batch_latency
            .observe(latency.as_secs_f64(), &LATENCY_BUCKETS);
        self.batch_rows.observe(rows as f64, &BATCH_ROW_BUCKETS);
    }

    pub fn batch_latency(&self) -> &Histogram {
        &self.batch_latency
    }

    pub fn batch_rows(&self) -> &Histogram {
        &self.batch_rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_observation_lands_in_one_bucket() {
        let m = IngestMetrics::default();
        m.observe_batch(1, Duration::from_micros(500)); // ≤ 0.001 s
        m.observe_batch(7, Duration::from_millis(2)); // exactly on the 0.002 s bound
        m.observe_batch(5000, Duration::from_secs(9)); // above every bound
        let latency = m.batch_latency().snapshot();
        assert_eq!(latency.buckets, [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(latency.count(), 3);
        assert!((latency.sum - 9.0025).abs() < 1e-9, "{}", latency.sum);
        let rows = m.batch_rows().snapshot();
        assert_eq!(rows.buckets, [1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(rows.sum, 5008.0);
        assert_eq!(IngestMetrics::get(&m.batches), 3);
    }
}
