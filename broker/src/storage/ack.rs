//! Where the writer's storage acks go.
//!
//! The writer decides *when* an agent may forget readings (after they are committed to the
//! database or the spool); how the ack reaches the agent is not storage's business. The MQTT
//! side implements [`AckSink`] (publishing on `ack/<device>`, see `crate::mqtt`), so storage
//! depends on nothing above it and its tests can watch the acks without a broker.

use co2_proto::{DeviceId, StorageAck};

/// Receives the storage acks of committed readings, one per device per committed batch.
pub trait AckSink: Send + 'static {
    /// Queues `ack` for `device` without blocking (the writer must never wait for a
    /// consumer). Returns false if it cannot be delivered at all; the writer counts that in
    /// `co2_acks_dropped_total`, and the agent resends the readings and is acked again.
    fn send(&mut self, device: &DeviceId, ack: &StorageAck) -> bool;
}
