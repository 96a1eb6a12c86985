//! What flows from the link to storage: readings to store and rejections to record.
//!
//! These types are also the spool's on-disk format (as JSON), so a field added here must be
//! optional to keep older spool files readable.

use chrono::NaiveDateTime;
use co2_proto::DeviceId;
use serde::{Deserialize, Serialize};

/// A reading ready to be stored. All times are UTC with millisecond precision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// The device the topic names (`co2/<device>/...`); never taken from the payload.
    pub device_id: DeviceId,
    pub topic: String,
    /// When the sensor measured (stored in the legacy `date_time` column).
    pub measured_at: NaiveDateTime,
    pub received_at: NaiveDateTime,
    /// Stored in the legacy `emissions` column.
    pub co2_ppm: f64,
    pub seq: Option<i64>,
    pub temperature_c: Option<f64>,
    pub humidity_pct: Option<f64>,
    /// Identity within the device: a redelivered reading has the same key and is stored once.
    /// See [`crate::ingest::classify`] for how it is formed.
    pub dedup_key: String,
}

/// A message that could not become a reading, kept with the reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    pub received_at: NaiveDateTime,
    /// The topic, cut to fit its column.
    pub topic: String,
    /// The payload as text (invalid UTF-8 replaced), cut to [`Rejection::MAX_PAYLOAD_BYTES`].
    pub payload: String,
    /// Length of the original payload in bytes.
    pub payload_bytes: u32,
    pub reason: String,
}

impl Rejection {
    /// How much of a rejected payload is kept: enough to see what went wrong, bounded so that
    /// a flood of junk cannot fill the database.
    pub const MAX_PAYLOAD_BYTES: usize = 1024;
    pub const MAX_TOPIC_BYTES: usize = 255;
    pub const MAX_REASON_BYTES: usize = 255;

    /// A rejection of a message received at `received_at`, its fields cut to their columns;
    /// `payload_start` may be the whole payload or just its beginning, `payload_bytes` is the
    /// full length.
    pub fn new(
        received_at: chrono::DateTime<chrono::Utc>,
        topic: &str,
        payload_start: &[u8],
        payload_bytes: usize,
        reason: &str,
    ) -> Self {
        let text = String::from_utf8_lossy(
            &payload_start[..payload_start.len().min(Self::MAX_PAYLOAD_BYTES)],
        );
        Self {
            received_at: received_at.naive_utc(),
            topic: truncate_utf8(topic, Self::MAX_TOPIC_BYTES).to_owned(),
            payload: truncate_utf8(&text, Self::MAX_PAYLOAD_BYTES).to_owned(),
            payload_bytes: u32::try_from(payload_bytes).unwrap_or(u32::MAX),
            reason: truncate_utf8(reason, Self::MAX_REASON_BYTES).to_owned(),
        }
    }
}

/// One classified MQTT message.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Reading(Reading),
    Rejection(Rejection),
}

/// Records written together in one transaction, and the unit of the spool.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub readings: Vec<Reading>,
    pub rejections: Vec<Rejection>,
}

impl Batch {
    pub fn push(&mut self, record: Record) {
        match record {
            Record::Reading(r) => self.readings.push(r),
            Record::Rejection(r) => self.rejections.push(r),
        }
    }

    pub fn len(&self) -> usize {
        self.readings.len() + self.rejections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The longest prefix of `text` that fits in `max` bytes without splitting a character.
pub fn truncate_utf8(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_utf8("abc", 5), "abc");
        assert_eq!(truncate_utf8("abc", 2), "ab");
        assert_eq!(truncate_utf8("aé", 2), "a");
        assert_eq!(truncate_utf8("", 0), "");
    }
}
