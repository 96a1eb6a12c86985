//! co2-broker: an MQTT broker (embedded rumqttd) that stores every reading published under
//! `co2/#` in a database, in one process.
//!
//! Data path: MQTT clients → [`guard`] (authentication, topic rules, limits, TLS) → rumqttd
//! router → ingest link ([`ingest::link`]) → classify ([`ingest::classify`]) → bounded queue →
//! [`storage::Writer`] → database, or the on-disk spool while the database is away → storage
//! ack on `ack/<device>`.

pub mod auth;
pub mod cli;
pub mod guard;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod migrate;
pub mod mqtt;
pub mod passwd;
pub mod per_address;
pub mod rollups_cli;
pub mod rumqttd_quirks;
pub mod settings;
pub mod storage;
pub mod throttle;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ingest::link::LinkConsumer;
use crate::ingest::Classifier;
use crate::metrics::IngestMetrics;
use crate::mqtt::EmbeddedBroker;
use crate::settings::Settings;
use crate::storage::database::is_unreachable;
use crate::storage::retention::RetentionPolicy;
use crate::storage::{Database, Spool, Writer};
use crate::throttle::Throttle;

/// Runs the broker until `shutdown` resolves, then stops accepting connections, stores what
/// clients already sent, and returns. Tests and `main` share this entry point.
pub async fn run(
    settings: Settings,
    metrics: Arc<IngestMetrics>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let ingest = &settings.ingest;
    let db = Database::connect(&ingest.database_url, ingest.db_pool_size)
        .await
        .with_context(|| format!("cannot use database {}", ingest.database_url))?;
    let mut schema_pending = false;
    if ingest.run_migrations {
        match db.migrate().await {
            Ok(()) => {}
            // Down at start: come up anyway and spool; the writer migrates once it is back.
            // Anything else (credentials, permissions, SQL) needs the operator now.
            Err(e) if is_unreachable(&e) => {
                tracing::warn!(error = %e, database = %ingest.database_url, "database unreachable at start; readings go to the spool until it is back");
                schema_pending = true;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot migrate {}", ingest.database_url))
            }
        }
    }
    let (spool, recovery) =
        tokio::task::block_in_place(|| Spool::open(&ingest.spool_dir(), ingest.spool_max_bytes))
            .context("cannot open the spool")?;
    if recovery.records > 0 {
        tracing::info!(
            batches = recovery.records,
            "spool holds batches from an earlier run; replaying them first"
        );
    }

    // Bounded: when the writer falls behind, the link stops draining rumqttd (whose ring
    // buffers meanwhile) and the guard's own rejections wait for room.
    let (records_tx, records_rx) = mpsc::channel(ingest.queue_capacity);
    let mut broker = EmbeddedBroker::start(&settings, records_tx.clone(), metrics.clone()).await?;
    let listeners: Vec<String> = settings
        .listeners()
        .map(|(v, l)| {
            format!(
                "{} MQTT {} on {}{}",
                l.name,
                if v == 5 { "5" } else { "3.1.1" },
                l.listen,
                if l.tls.is_some() { " (TLS)" } else { "" }
            )
        })
        .collect();

    let stop = CancellationToken::new();
    let http = match ingest.http_addr() {
        Some(addr) => {
            let health = Arc::new(http::Health {
                metrics: metrics.clone(),
                spool_max_bytes: ingest.spool_max_bytes,
            });
            let task = http::serve(addr, health, stop.clone())
                .await
                .with_context(|| {
                    format!("metrics endpoint cannot listen on {addr} (co2.http_listen)")
                })?;
            Some(task)
        }
        None => None,
    };
    // Retention runs on its own connection from the pool, beside the writers.
    let retention = tokio::spawn(storage::retention::run(
        db.connection().clone(),
        RetentionPolicy::from_settings(ingest),
        metrics.clone(),
        stop.clone(),
    ));
    let backfill = tokio::spawn(storage::rollup_backfill::run(
        db.connection().clone(),
        ingest.raw_retention_days,
        stop.clone(),
    ));
    let writer = Writer::new(
        db,
        spool,
        broker.acks,
        metrics.clone(),
        ingest,
        schema_pending,
    );
    let writer = tokio::spawn(writer.run(records_rx, ingest.shutdown_grace()));
    let consumer = LinkConsumer {
        link: broker.ingest,
        classifier: Classifier::new(ingest),
        out: records_tx,
        metrics,
        rejection_log: Throttle::new(Duration::from_secs(10)),
    };
    let mut consumer = tokio::spawn(consumer.run(stop.clone(), ingest.shutdown_grace()));
    tracing::info!(
        listeners = %listeners.join(", "),
        database = %ingest.database_url,
        metrics = %ingest.http_addr().map_or("off".into(), |a| format!("http://{a}/metrics")),
        "co2-broker started"
    );

    let outcome = tokio::select! {
        () = shutdown => {
            tracing::info!("shutting down: no new connections; storing what clients already sent");
            Ok(())
        }
        e = broker.listeners.failed() => Err(anyhow::Error::new(e)),
        r = &mut consumer => Err(match r {
            Ok(Ok(())) => anyhow::anyhow!("ingest link ended"),
            Ok(Err(e)) => anyhow::Error::new(e),
            Err(e) => anyhow::Error::new(e).context("ingest link task failed"),
        }),
    };
    broker.listeners.stop_accepting();
    stop.cancel();
    if !consumer.is_finished() {
        match consumer.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "ingest link failed while draining"),
            Err(e) => tracing::error!(error = %e, "ingest link task failed while draining"),
        }
    }
    writer.await.context("writer task failed")?;
    let _ = retention.await; // it ends with the stop token; a panic there changes nothing now
    let _ = backfill.await; // likewise; it resumes at the next start
    if let Some(http) = http {
        let _ = http.await; // it ends with the stop token; a panic there changes nothing now
    }
    tracing::info!("stopped");
    outcome
}
