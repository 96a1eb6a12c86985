//! `/metrics` in the OpenMetrics text format, encoded by `prometheus-client`.
//!
//! The counters stay plain atomics in [`IngestMetrics`] (the hot paths only add to them);
//! a [`Collector`] reads them at scrape time. Names are fixed by dashboards, alerts and
//! scripts: OpenMetrics gives a counter family a name without `_total` and its sample the
//! suffix (`# TYPE co2_readings_stored counter`, `co2_readings_stored_total 10`), so every
//! sample reads exactly as in the Prometheus text format served before.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::{Histogram, IngestMetrics, BATCH_ROW_BUCKETS, LATENCY_BUCKETS};

/// What `/metrics` answers with; Prometheus parses the body by this type, whatever it asked
/// for.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every family starts with `co2_`.
const PREFIX: &str = "co2";

type Field = fn(&IngestMetrics) -> &AtomicU64;

/// Counters: (family name without prefix and `_total`, help, value).
const COUNTERS: [(&str, &str, Field); 17] = [
    (
        "messages_received",
        "Messages taken off the MQTT link under co2/#.",
        |m| &m.received,
    ),
    (
        "readings_stored",
        "Readings newly written to the database.",
        |m| &m.stored,
    ),
    (
        "readings_duplicate",
        "Readings the database already held (redeliveries).",
        |m| &m.duplicates,
    ),
    (
        "messages_rejected",
        "Messages recorded in rejected_messages.",
        |m| &m.rejected,
    ),
    (
        "spooled",
        "Readings and rejections written to the on-disk spool.",
        |m| &m.spooled,
    ),
    (
        "replayed",
        "Readings and rejections moved from the spool to the database.",
        |m| &m.replayed,
    ),
    (
        "spool_refused",
        "Readings and rejections refused because the spool was full or failing.",
        |m| &m.spool_refused,
    ),
    (
        "acks_dropped",
        "Storage acks that could not be published.",
        |m| &m.acks_dropped,
    ),
    (
        "write_conflicts",
        "Batch writes repeated after losing a lock conflict (deadlock, lock wait timeout, busy SQLite).",
        |m| &m.write_conflicts,
    ),
    (
        "retention_partitions_dropped",
        "Partitions dropped because every row in them was older than its table's retention.",
        |m| &m.retention_partitions_dropped,
    ),
    (
        "retention_rows_deleted",
        "Rows deleted because they were older than their table's retention (SQLite, unpartitioned tables).",
        |m| &m.retention_rows_deleted,
    ),
    (
        "retention_failures",
        "Retention rounds that failed (retried after 5 minutes).",
        |m| &m.retention_failures,
    ),
    (
        "auth_refused",
        "CONNECTs refused for missing or wrong credentials.",
        |m| &m.auth_refused,
    ),
    (
        "password_hashes",
        "Argon2 password checks computed (remembered passwords and refused or abandoned checks cost none).",
        |m| &m.password_hashes,
    ),
    (
        "connections_refused",
        "Connections refused: limit, CONNECT timeout, not MQTT, TLS failure, invalid client id.",
        |m| &m.connections_refused,
    ),
    (
        "oversized_packets",
        "Packets larger than max_payload_size (the connection is closed).",
        |m| &m.oversized_packets,
    ),
    (
        "topic_denied",
        "Publishes, subscriptions and wills outside a device's own topics (the connection is closed).",
        |m| &m.topic_denied,
    ),
];

/// Gauges: (family name without prefix and unit, unit, help, value).
const GAUGES: [(&str, Option<Unit>, &str, Field); 4] = [
    (
        "database_up",
        None,
        "1 if the last database write succeeded.",
        |m| &m.database_up,
    ),
    (
        "spool",
        Some(Unit::Bytes),
        "Bytes in the on-disk spool.",
        |m| &m.spool_bytes,
    ),
    (
        "spool_batches",
        None,
        "Batches in the spool waiting for the database.",
        |m| &m.spool_batches,
    ),
    (
        "mqtt_connections",
        None,
        "MQTT client connections open now.",
        |m| &m.mqtt_connections,
    ),
];

/// The registry behind `/metrics`, built once at start.
#[derive(Debug)]
pub struct Exposition {
    registry: Registry,
}

impl Exposition {
    pub fn new(metrics: Arc<IngestMetrics>) -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register_collector(Box::new(IngestCollector(metrics)));
        Self { registry }
    }

    /// The whole exposition, ending in `# EOF`.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// Reads [`IngestMetrics`] at scrape time.
#[derive(Debug)]
struct IngestCollector(Arc<IngestMetrics>);

impl Collector for IngestCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &*self.0;
        for (name, help, field) in COUNTERS {
            let counter = ConstCounter::new(field(m).load(Relaxed));
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        for (name, unit, help, field) in &GAUGES {
            // Gauges are signed in OpenMetrics; ours never come near i64::MAX.
            let gauge = ConstGauge::new(i64::try_from(field(m).load(Relaxed)).unwrap_or(i64::MAX));
            gauge.encode(encoder.encode_descriptor(
                name,
                help,
                unit.as_ref(),
                gauge.metric_type(),
            )?)?;
        }
        histogram(
            &mut encoder,
            "batch_commit",
            Some(&Unit::Seconds),
            "Time to commit one batch to the database.",
            m.batch_latency(),
            &LATENCY_BUCKETS,
        )?;
        histogram(
            &mut encoder,
            "batch_rows",
            None,
            "Readings and rejections per committed batch.",
            m.batch_rows(),
            &BATCH_ROW_BUCKETS,
        )
    }
}

fn histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    unit: Option<&Unit>,
    help: &str,
    histogram: &Histogram,
    bounds: &[f64; 10],
) -> Result<(), std::fmt::Error> {
    let snapshot = histogram.snapshot();
    // prometheus-client takes per-bucket counts and marks `+Inf` with `f64::MAX`.
    let buckets: Vec<(f64, u64)> = bounds
        .iter()
        .chain([f64::MAX].iter())
        .copied()
        .zip(snapshot.buckets)
        .collect();
    encoder
        .encode_descriptor(name, help, unit, MetricType::Histogram)?
        .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            snapshot.sum,
            snapshot.count(),
            &buckets,
            None,
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Every sample name dashboards, alerts, scripts and the README use, as served before
    /// the move to OpenMetrics.
    const SAMPLES: [&str; 27] = [
        "co2_messages_received_total",
        "co2_readings_stored_total",
        "co2_readings_duplicate_total",
        "co2_messages_rejected_total",
        "co2_spooled_total",
        "co2_replayed_total",
        "co2_spool_refused_total",
        "co2_acks_dropped_total",
        "co2_write_conflicts_total",
        "co2_retention_partitions_dropped_total",
        "co2_retention_rows_deleted_total",
        "co2_retention_failures_total",
        "co2_auth_refused_total",
        "co2_password_hashes_total",
        "co2_connections_refused_total",
        "co2_oversized_packets_total",
        "co2_topic_denied_total",
        "co2_database_up",
        "co2_spool_bytes",
        "co2_spool_batches",
        "co2_mqtt_connections",
        "co2_batch_commit_seconds_sum",
        "co2_batch_commit_seconds_count",
        "co2_batch_rows_sum",
        "co2_batch_rows_count",
        "co2_batch_commit_seconds_bucket{le=\"+Inf\"}",
        "co2_batch_rows_bucket{le=\"+Inf\"}",
    ];

    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_sample_keeps_its_name() {
        let m = Arc::new(IngestMetrics::default());
        let text = Exposition::new(m).render().unwrap();
        for name in SAMPLES {
            assert_eq!(sample(&text, name), Some(0.0), "{name} in\n{text}");
        }
        let families = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!(families, COUNTERS.len() + GAUGES.len() + 2);
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn values_and_cumulative_buckets() {
        let m = Arc::new(IngestMetrics::default());
        IngestMetrics::add(&m.received, 3);
        m.spool_bytes.store(4096, Relaxed);
        m.observe_batch(3, Duration::from_millis(4));
        m.observe_batch(2000, Duration::from_secs(7));
        let text = Exposition::new(m).render().unwrap();
        assert_eq!(sample(&text, "co2_messages_received_total"), Some(3.0));
        assert_eq!(sample(&text, "co2_spool_bytes"), Some(4096.0));
        assert!(
            text.contains("# TYPE co2_messages_received counter\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE co2_database_up gauge\n"), "{text}");
        assert!(
            text.contains("# UNIT co2_batch_commit_seconds seconds\n"),
            "{text}"
        );
        let bucket = |name: &str, le: &str| sample(&text, &format!("{name}_bucket{{le=\"{le}\"}}"));
        assert_eq!(bucket("co2_batch_commit_seconds", "0.002"), Some(0.0));
        assert_eq!(bucket("co2_batch_commit_seconds", "0.005"), Some(1.0));
        assert_eq!(bucket("co2_batch_commit_seconds", "5.0"), Some(1.0));
        assert_eq!(bucket("co2_batch_commit_seconds", "+Inf"), Some(2.0));
        assert_eq!(bucket("co2_batch_rows", "5.0"), Some(1.0));
        assert_eq!(bucket("co2_batch_rows", "2000.0"), Some(2.0));
        assert_eq!(sample(&text, "co2_batch_rows_count"), Some(2.0));
        assert_eq!(sample(&text, "co2_batch_rows_sum"), Some(2003.0));
        assert_eq!(sample(&text, "co2_batch_commit_seconds_sum"), Some(7.004));
    }
}
