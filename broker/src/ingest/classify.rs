//! Turns one MQTT message into a [`Reading`] or a [`Rejection`]: the single place where raw
//! topic and payload bytes are judged.
//!
//! ## Identity (`dedup_key`)
//! A reading delivered twice (QoS 1 redelivery, an agent resending after a crash) must be
//! stored once, so each reading gets a key, and the table stores one row per `(device_id,
//! date_time, dedup_key)` (its unique index; `date_time` is the measured time, or the receive
//! time for payloads without one):
//! - payload with time and sequence number: `t<epoch ms>s<seq>`. Time is part of the key so
//!   that an agent whose counter restarts (reinstalled, outbox wiped) is not mistaken for
//!   redelivery.
//! - payload with time, no sequence number (legacy, JSON without `seq`): `t<epoch ms>`; two
//!   different readings from one device in the same millisecond (legacy: the same second) are
//!   taken as one.
//! - payload without time (bare numbers): nothing in the payload identifies it, so the broker
//!   assigns `r<boot>.<n>` on receipt. That keeps spool replays idempotent; an MQTT
//!   redelivery of such a payload is stored twice, which cannot be told apart.

use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, NaiveDateTime, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use co2_proto::{DeviceId, MeasuredAt, Payload};

use super::record::{Reading, Record, Rejection};
use crate::settings::IngestSettings;

/// The oldest measurement time accepted: anything earlier is an unsynchronised clock.
const EARLIEST_PLAUSIBLE: DateTime<Utc> = DateTime::from_timestamp_nanos(946_684_800_000_000_000); // 2000-01-01

/// Judges messages; shared by the link task, cheap to call per message.
pub struct Classifier {
    legacy_zone: Tz,
    co2_range: RangeInclusive<f64>,
    max_future_skew: TimeDelta,
    /// Distinguishes this process's receive-assigned keys from any earlier run's.
    boot: String,
    received: AtomicU64,
}

impl Classifier {
    pub fn new(settings: &IngestSettings) -> Self {
        Self {
            legacy_zone: settings.legacy_timezone,
            co2_range: settings.min_co2_ppm..=settings.max_co2_ppm,
            max_future_skew: TimeDelta::milliseconds(settings.max_future_skew_ms as i64),
            boot: format!("{:x}", Utc::now().timestamp_millis()),
            received: AtomicU64::new(0),
        }
    }

    pub fn classify(&self, topic: &[u8], payload: &[u8], received_at: DateTime<Utc>) -> Record {
        let received_at = truncate_to_millis(received_at);
        match self.reading(topic, payload, received_at) {
            Ok(reading) => Record::Reading(reading),
            Err(reason) => Record::Rejection(Rejection::new(
                received_at,
                &String::from_utf8_lossy(topic),
                payload,
                payload.len(),
                &reason,
            )),
        }
    }

    fn reading(
        &self,
        topic: &[u8],
        payload: &[u8],
        received_at: DateTime<Utc>,
    ) -> Result<Reading, String> {
        let topic = std::str::from_utf8(topic).map_err(|_| "topic is not UTF-8".to_owned())?;
        if topic.len() > Rejection::MAX_TOPIC_BYTES {
            return Err(format!(
                "topic longer than {} bytes",
                Rejection::MAX_TOPIC_BYTES
            ));
        }
        let device = DeviceId::from_readings_topic(topic).map_err(|e| e.to_string())?;
        let payload = Payload::parse(payload).map_err(|e| e.to_string())?;
        if !self.co2_range.contains(&payload.co2_ppm) {
            return Err(format!(
                "CO2 value {} outside {}..={} ppm",
                payload.co2_ppm,
                self.co2_range.start(),
                self.co2_range.end()
            ));
        }
        if payload
            .humidity_pct
            .is_some_and(|h| !(0.0..=100.0).contains(&h))
        {
            return Err("humidity outside 0..=100 %".into());
        }
        if payload
            .temperature_c
            .is_some_and(|t| !(-100.0..=150.0).contains(&t))
        {
            return Err("temperature outside -100..=150 °C".into());
        }
        let seq = payload
            .seq
            .map(i64::try_from)
            .transpose()
            .map_err(|_| "seq larger than 2^63-1".to_owned())?;
        let measured_at = match payload.measured_at {
            MeasuredAt::Utc(t) => Some(truncate_to_millis(t)),
            MeasuredAt::Local(t) => Some(truncate_to_millis(self.local_to_utc(t))),
            MeasuredAt::Unstated => None,
        };
        if let Some(t) = measured_at {
            if t < EARLIEST_PLAUSIBLE {
                return Err(format!("timestamp {t} is before 2000 (clock not set?)"));
            }
            if t > received_at + self.max_future_skew {
                return Err(format!("timestamp {t} is in the future"));
            }
        }
        let dedup_key = match (measured_at, seq) {
            (Some(t), Some(seq)) => format!("t{}s{seq}", t.timestamp_millis()),
            (Some(t), None) => format!("t{}", t.timestamp_millis()),
            (None, _) => format!(
                "r{}.{}",
                self.boot,
                self.received.fetch_add(1, Ordering::Relaxed)
            ),
        };
        Ok(Reading {
            device_id: device,
            topic: topic.to_owned(),
            measured_at: measured_at.unwrap_or(received_at).naive_utc(),
            received_at: received_at.naive_utc(),
            co2_ppm: payload.co2_ppm,
            seq,
            temperature_c: payload.temperature_c,
            humidity_pct: payload.humidity_pct,
            dedup_key,
        })
    }

    /// Legacy wall-clock time to UTC. In the autumn overlap the earlier instant is taken; a
    /// time inside the spring-forward gap (which a clock that missed the change may report) is
    /// read with the offset in force just before the gap.
    fn local_to_utc(&self, local: NaiveDateTime) -> DateTime<Utc> {
        let zone = self.legacy_zone;
        match zone.from_local_datetime(&local).earliest() {
            Some(t) => t.with_timezone(&Utc),
            None => {
                let before = local - TimeDelta::hours(3);
                let utc_minus_local = zone
                    .from_local_datetime(&before)
                    .earliest()
                    .map(|t| t.naive_utc() - before)
                    .unwrap_or_default();
                Utc.from_utc_datetime(&(local + utc_minus_local))
            }
        }
    }
}

fn truncate_to_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classifier(zone: &str) -> Classifier {
        Classifier::new(&IngestSettings {
            legacy_timezone: zone.parse().expect("a known zone"),
            ..IngestSettings::default()
        })
    }

    fn now() -> DateTime<Utc> {
        "2026-11-24T12:00:00.123456Z".parse().unwrap()
    }

    fn reading(record: Record) -> Reading {
        match record {
            Record::Reading(r) => r,
            Record::Rejection(r) => panic!("rejected: {}", r.reason),
        }
    }

    fn reason(record: Record) -> String {
        match record {
            Record::Rejection(r) => r.reason,
            Record::Reading(r) => panic!("accepted: {r:?}"),
        }
    }

    #[test]
    fn legacy_time_is_read_in_the_configured_zone() {
        let r =
            reading(classifier("UTC").classify(b"co2/pi-1", b"2020-7-13 22:43:23|3500.0", now()));
        assert_eq!(r.measured_at.to_string(), "2020-07-13 22:43:23");
        assert_eq!(r.dedup_key, "t1594680203000");
        assert_eq!((r.device_id.as_str(), r.co2_ppm), ("pi-1", 3500.0));

        let r = reading(classifier("Europe/Berlin").classify(
            b"co2/pi-1",
            b"2020-7-13 22:43:23|3500.0",
            now(),
        ));
        assert_eq!(r.measured_at.to_string(), "2020-07-13 20:43:23");
    }

    #[test]
    fn daylight_saving_edges_do_not_lose_readings() {
        let c = classifier("Europe/Berlin");
        // 02:30 on 2026-03-29 does not exist in Berlin: read with the winter offset (+01:00).
        let gap = reading(c.classify(b"co2/a", b"2026-3-29 2:30:00|500", now()));
        assert_eq!(gap.measured_at.to_string(), "2026-03-29 01:30:00");
        // 02:30 on 2026-10-25 happens twice: the first (summer, +02:00) is taken.
        let overlap = reading(c.classify(b"co2/a", b"2026-10-25 2:30:00|500", now()));
        assert_eq!(overlap.measured_at.to_string(), "2026-10-25 00:30:00");
    }

    #[test]
    fn identities() {
        let c = classifier("UTC");
        let json = reading(c.classify(
            b"co2/pi-1/room",
            br#"{"ts":"2026-11-24T10:00:00.5Z","value":600,"seq":9}"#,
            now(),
        ));
        assert_eq!(json.dedup_key, "t1795514400500s9");
        assert_eq!(json.topic, "co2/pi-1/room");
        assert_eq!(json.seq, Some(9));
        let bare1 = reading(c.classify(b"co2/pi-1", b"600", now()));
        let bare2 = reading(c.classify(b"co2/pi-1", b"600", now()));
        assert_ne!(bare1.dedup_key, bare2.dedup_key);
        assert!(bare1.dedup_key.starts_with('r'));
        assert_eq!(bare1.measured_at.to_string(), "2026-11-24 12:00:00.123");
        assert_eq!(bare1.received_at, bare1.measured_at);
    }

    #[test]
    fn rejections_carry_the_reason_and_a_bounded_payload() {
        let c = classifier("UTC");
        assert_eq!(
            reason(c.classify(b"co2", b"400", now())),
            "topic is not under co2/"
        );
        assert_eq!(
            reason(c.classify(b"co2/", b"400", now())),
            "topic has no device id after co2/"
        );
        assert_eq!(
            reason(c.classify(b"co2/a", b"-5", now())),
            "CO2 value -5 outside 0..=100000 ppm"
        );
        assert_eq!(
            reason(c.classify(b"co2/a", &[0xff, 0x00], now())),
            "payload is not UTF-8"
        );
        assert_eq!(
            reason(c.classify(&[b'c', b'o', b'2', b'/', 0xff], b"1", now())),
            "topic is not UTF-8"
        );
        assert!(
            reason(c.classify(b"co2/a", br#"{"ts":0,"value":1}"#, now())).contains("before 2000")
        );
        assert!(reason(c.classify(
            b"co2/a",
            br#"{"ts":"2027-11-24T10:00:00Z","value":1}"#,
            now()
        ))
        .contains("future"));
        assert_eq!(
            reason(c.classify(b"co2/a", br#"{"value":1,"humidity":101}"#, now())),
            "humidity outside 0..=100 %"
        );

        let big = vec![b'x'; 5000];
        let Record::Rejection(r) = c.classify(b"co2/a", &big, now()) else {
            panic!()
        };
        assert_eq!(r.payload.len(), Rejection::MAX_PAYLOAD_BYTES);
        assert_eq!(r.payload_bytes, 5000);
    }
}
