//! Drains rumqttd's local link into the writer's queue.
//!
//! rumqttd keeps what a subscriber has not read yet in a bounded in-memory ring and silently
//! drops the oldest once it wraps, so this task does nothing but receive, classify and hand
//! over. When the queue is full it waits, and the ring (sized by `router.max_segment_*`)
//! absorbs the burst.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rumqttd::local::LinkRx;
use rumqttd::Notification;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Classifier, Record};
use crate::metrics::IngestMetrics;
use crate::throttle::Throttle;

/// After shutdown is requested, the link is drained until it has been quiet this long.
const DRAIN_QUIET: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the MQTT router closed the ingest link: {0}")]
    Router(#[from] Box<rumqttd::local::LinkError>),
    #[error("the writer stopped accepting records")]
    WriterGone,
}

/// Owns the receiving end of the ingest link.
pub struct LinkConsumer {
    pub link: LinkRx,
    pub classifier: Classifier,
    pub out: mpsc::Sender<Record>,
    pub metrics: Arc<IngestMetrics>,
    /// A misconfigured fleet can send thousands of bad messages a second; each is recorded
    /// in `rejected_messages`, the log only gets a sample.
    pub rejection_log: Throttle,
}

impl LinkConsumer {
    /// Receives until `stop` fires, then keeps draining until the link is quiet or `grace`
    /// runs out, so that everything clients already sent is stored. Dropping `self.out` on
    /// return tells the writer to flush and finish.
    pub async fn run(mut self, stop: CancellationToken, grace: Duration) -> Result<(), LinkError> {
        loop {
            let notification = tokio::select! {
                n = self.link.next() => n.map_err(Box::new)?,
                _ = stop.cancelled() => break,
            };
            self.handle(notification).await?;
        }
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let quiet = tokio::time::Instant::now() + DRAIN_QUIET;
            match tokio::time::timeout_at(quiet.min(deadline), self.link.next()).await {
                Ok(notification) => self.handle(notification.map_err(Box::new)?).await?,
                Err(_elapsed) => return Ok(()),
            }
        }
    }

    async fn handle(&mut self, notification: Option<Notification>) -> Result<(), LinkError> {
        match notification {
            Some(Notification::Forward(forward)) => {
                IngestMetrics::add(&self.metrics.received, 1);
                let record = self.classifier.classify(
                    &forward.publish.topic,
                    &forward.publish.payload,
                    Utc::now(),
                );
                if let Record::Rejection(rejection) = &record {
                    IngestMetrics::add(&self.metrics.rejected, 1);
                    if let Some(suppressed) = self.rejection_log.ready() {
                        tracing::warn!(
                            topic = %rejection.topic,
                            reason = %rejection.reason,
                            suppressed,
                            "rejected a message; it is kept in rejected_messages"
                        );
                    }
                }
                self.out
                    .send(record)
                    .await
                    .map_err(|_| LinkError::WriterGone)?;
            }
            // The router pauses a link whose buffer is full until it says it is ready again;
            // without this the link stalls for good.
            Some(Notification::Unschedule) => self.link.wake().await.map_err(Box::new)?,
            // `None` is a wake-up with an empty buffer; acks and the rest need no action.
            _ => {}
        }
        Ok(())
    }
}
