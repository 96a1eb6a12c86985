//! Delivery logic: which outbox records to publish when, and when they may leave the outbox.
//!
//! This is the MQTT-independent core of the publisher, driven by the agent loop with the
//! events rumqttc reports; tests drive it directly with a recording [`PublishSink`].
//!
//! Rules (the storage ack itself is defined in `co2_proto::ack`):
//! - **JSON format:** a reading leaves the outbox only when its seq appears in a
//!   [`StorageAck`] on `ack/<device>`. A PUBACK only proves the broker read the packet.
//! - **Legacy format:** the payload has no seq, so the broker cannot ack storage; the reading
//!   leaves the outbox on PUBACK. Delivery is at-least-once to the broker, but at-most-once
//!   beyond it (a broker crash after PUBACK loses the reading).
//! - On every ConnAck, rumqttc's own replay queue is discarded by the agent and everything
//!   unacknowledged is resent from the outbox, oldest first (rumqttc silently drops in-flight
//!   QoS 1 messages whenever the broker lost the session).
//! - In JSON mode, when the oldest in-flight reading has waited `ack_timeout` for its storage
//!   ack, everything unacknowledged is resent (the broker stores a reading once per device,
//!   measured time and seq, so a resent one is not stored twice).
//! - At most `max_in_flight` readings are unacknowledged at a time, and sends are rate-limited
//!   by a token bucket, so a backlog drains in order at a bounded rate.
//! - Readings whose time cannot be established yet are held (see [`crate::clock`]); since the
//!   queue is FIFO, a held reading holds back the ones behind it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use chrono::{DateTime, FixedOffset, Utc};
use co2_proto::{MeasuredAt, Payload, StorageAck};

use crate::clock::{self, ClockNow, Stamp};
use crate::config::PayloadFormat;
use crate::outbox::{Outbox, OutboxError};
use crate::reading::Record;

/// Where payloads go; `Err` means "full, try again later" (rumqttc's request channel).
pub trait PublishSink {
    fn try_publish(&mut self, payload: String) -> Result<(), SinkFull>;
}

#[derive(Debug)]
pub struct SinkFull;

#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    pub format: PayloadFormat,
    pub legacy_offset: FixedOffset,
    pub max_in_flight: usize,
    pub max_rate_per_sec: f64,
    pub ack_timeout: Duration,
    pub max_hold: Duration,
}

/// The wire form of a record with its resolved time.
pub fn format_payload(
    record: &Record,
    time: DateTime<Utc>,
    format: PayloadFormat,
    legacy_offset: FixedOffset,
) -> String {
    let r = &record.reading;
    match format {
        PayloadFormat::Json => Payload {
            measured_at: MeasuredAt::Utc(time),
            co2_ppm: r.co2_ppm,
            seq: Some(record.seq),
            temperature_c: r.temperature_c,
            humidity_pct: r.humidity_pct,
        }
        .to_json(),
        PayloadFormat::Legacy => {
            Payload::to_legacy(time.with_timezone(&legacy_offset).naive_local(), r.co2_ppm)
        }
    }
}

pub struct Delivery {
    config: DeliveryConfig,
    connected: bool,
    /// Next seq to consider for sending; 0 = from the oldest pending.
    next_to_send: u64,
    /// Sent and not yet acknowledged: seq → when sent.
    in_flight: BTreeMap<u64, Instant>,
    /// Legacy mode: seqs handed to rumqttc, waiting for their packet id (FIFO, because
    /// rumqttc assigns packet ids in submission order).
    awaiting_pkid: VecDeque<u64>,
    /// Legacy mode: packet id → seq, until the PUBACK.
    by_pkid: HashMap<u16, u64>,
    tokens: f64,
    refilled_at: Instant,
    holding: bool,
    /// Readings published with a best-guess time (logged, not persisted).
    pub best_guess_total: u64,
}

impl Delivery {
    pub fn new(config: DeliveryConfig, now: Instant) -> Self {
        let tokens = config.max_in_flight as f64;
        Self {
            config,
            connected: false,
            next_to_send: 0,
            in_flight: BTreeMap::new(),
            awaiting_pkid: VecDeque::new(),
            by_pkid: HashMap::new(),
            tokens,
            refilled_at: now,
            holding: false,
            best_guess_total: 0,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Forgets everything sent so far: the next [`Self::pump`] resends from the oldest pending.
    fn restart(&mut self) {
        self.next_to_send = 0;
        self.in_flight.clear();
        self.awaiting_pkid.clear();
        self.by_pkid.clear();
    }

    /// A new connection (ConnAck): resend everything unacknowledged.
    pub fn on_connected(&mut self) {
        self.connected = true;
        self.restart();
    }

    pub fn on_disconnected(&mut self) {
        self.connected = false;
    }

    /// A storage ack from the broker; returns how many readings left the outbox.
    pub fn on_storage_ack(
        &mut self,
        ack: &StorageAck,
        outbox: &mut Outbox,
    ) -> Result<u64, OutboxError> {
        self.in_flight.retain(|seq, _| !ack.stored.contains(*seq));
        outbox.ack(&ack.stored)
    }

    /// rumqttc sent a publish with this packet id (legacy mode needs the mapping).
    pub fn on_outgoing_publish(&mut self, pkid: u16) {
        if self.config.format == PayloadFormat::Legacy {
            if let Some(seq) = self.awaiting_pkid.pop_front() {
                self.by_pkid.insert(pkid, seq);
            }
        }
    }

    /// A PUBACK. In legacy mode this is the only ack there is; returns readings removed.
    pub fn on_puback(&mut self, pkid: u16, outbox: &mut Outbox) -> Result<u64, OutboxError> {
        if self.config.format != PayloadFormat::Legacy {
            return Ok(0);
        }
        let Some(seq) = self.by_pkid.remove(&pkid) else {
            return Ok(0);
        };
        self.in_flight.remove(&seq);
        outbox.ack(&co2_proto::SeqRanges::from_seqs([seq]))
    }

    /// JSON mode: if the oldest in-flight reading has waited too long for its storage ack,
    /// start over from the oldest pending. Returns the seq that timed out.
    pub fn check_ack_timeout(&mut self, now: Instant) -> Option<u64> {
        if self.config.format != PayloadFormat::Json {
            return None;
        }
        let (&seq, _) = self
            .in_flight
            .iter()
            .find(|(_, &sent)| now.duration_since(sent) >= self.config.ack_timeout)?;
        self.restart();
        Some(seq)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.refilled_at).as_secs_f64();
        self.refilled_at = now;
        let burst = self.config.max_in_flight as f64;
        self.tokens = (self.tokens + elapsed * self.config.max_rate_per_sec).min(burst);
    }

    /// Publishes what the window, the rate limit and the clock allow. Returns how many
    /// readings were handed to the sink.
    pub fn pump(
        &mut self,
        now: Instant,
        clock_now: &ClockNow,
        outbox: &mut Outbox,
        sink: &mut dyn PublishSink,
    ) -> Result<usize, OutboxError> {
        self.refill(now);
        let mut sent = 0;
        while self.connected {
            let room = self
                .config
                .max_in_flight
                .saturating_sub(self.in_flight.len());
            let budget = room.min(self.tokens.floor() as usize);
            if budget == 0 {
                break;
            }
            let batch = outbox.read_from(self.next_to_send, budget)?;
            if batch.is_empty() {
                break;
            }
            for record in batch {
                let stamp = clock::resolve(&record.reading.time, clock_now, self.config.max_hold);
                let Some(time) = stamp.time() else {
                    if !self.holding {
                        tracing::warn!(
                            seq = record.seq,
                            "clock not trusted yet (no NTP sync): holding readings for up to {:?} \
                             (set clock.require_ntp_sync = false to trust the system clock)",
                            self.config.max_hold
                        );
                        self.holding = true;
                    }
                    return Ok(sent);
                };
                if self.holding {
                    tracing::info!(seq = record.seq, "releasing held readings ({stamp:?})");
                    self.holding = false;
                }
                if let Stamp::BestGuess(_) = stamp {
                    self.best_guess_total += 1;
                    if self.best_guess_total == 1 || self.best_guess_total % 100 == 0 {
                        tracing::warn!(
                            seq = record.seq,
                            best_guess_total = self.best_guess_total,
                            "publishing with an unverified (best-guess) timestamp"
                        );
                    }
                }
                let payload =
                    format_payload(&record, time, self.config.format, self.config.legacy_offset);
                if sink.try_publish(payload).is_err() {
                    return Ok(sent);
                }
                self.in_flight.insert(record.seq, now);
                if self.config.format == PayloadFormat::Legacy {
                    self.awaiting_pkid.push_back(record.seq);
                }
                self.next_to_send = record.seq + 1;
                self.tokens -= 1.0;
                sent += 1;
            }
        }
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{BootId, RecordTime};
    use crate::outbox::OutboxLimits;
    use crate::reading::Reading;
    use co2_proto::SeqRanges;

    #[derive(Default)]
    struct Recorder {
        payloads: Vec<String>,
        capacity: Option<usize>,
    }

    impl PublishSink for Recorder {
        fn try_publish(&mut self, payload: String) -> Result<(), SinkFull> {
            if self.capacity.is_some_and(|c| self.payloads.len() >= c) {
                return Err(SinkFull);
            }
            self.payloads.push(payload);
            Ok(())
        }
    }

    impl Recorder {
        fn seqs(&self) -> Vec<u64> {
            self.payloads
                .iter()
                .map(|p| Payload::parse(p.as_bytes()).unwrap().seq.unwrap())
                .collect()
        }
    }

    const BOOT: BootId = [3; 16];
    const WALL_MS: i64 = 1_795_000_000_123; // 2026-11-19T...

    fn config(format: PayloadFormat) -> DeliveryConfig {
        DeliveryConfig {
            format,
            legacy_offset: FixedOffset::east_opt(9 * 3600).unwrap(),
            max_in_flight: 4,
            max_rate_per_sec: 10.0,
            ack_timeout: Duration::from_secs(30),
            max_hold: Duration::from_secs(600),
        }
    }

    fn clock_now(trusted: bool) -> ClockNow {
        ClockNow {
            wall: DateTime::from_timestamp_millis(WALL_MS + 60_000).unwrap(),
            boottime: Duration::from_secs(160),
            boot_id: BOOT,
            trusted,
            agent_started: Duration::from_secs(5),
        }
    }

    fn outbox_with(n: usize, trusted: bool) -> (tempfile::TempDir, Outbox, u64) {
        let dir = tempfile::tempdir().unwrap();
        let limits = OutboxLimits {
            max_records: 1000,
            segment_records: 3,
            fsync_every: 100,
            fsync_interval: Duration::from_secs(60),
        };
        let (mut outbox, _) = Outbox::open(dir.path(), limits).unwrap();
        let first = outbox.next_seq();
        for i in 0..n {
            let reading = Reading {
                time: RecordTime {
                    wall_ms: WALL_MS,
                    boottime_ms: 100_000,
                    boot_id: BOOT,
                    trusted,
                },
                co2_ppm: 400.0 + i as f64,
                temperature_c: None,
                humidity_pct: None,
            };
            outbox.append(&reading).unwrap();
        }
        (dir, outbox, first)
    }

    #[test]
    fn json_payload_and_legacy_payload() {
        let record = Record {
            seq: 9,
            reading: Reading {
                time: RecordTime {
                    wall_ms: 0,
                    boottime_ms: 0,
                    boot_id: BOOT,
                    trusted: true,
                },
                co2_ppm: 612.0,
                temperature_c: Some(21.5),
                humidity_pct: Some(40.0),
            },
        };
        let time = "2026-11-24T23:05:07.250Z".parse().unwrap();
        let offset = FixedOffset::east_opt(9 * 3600).unwrap();
        assert_eq!(
            format_payload(&record, time, PayloadFormat::Json, offset),
            r#"{"ts":"2026-11-24T23:05:07.250Z","value":612.0,"unit":"ppm","seq":9,"temperature":21.5,"humidity":40.0}"#
        );
        assert_eq!(
            format_payload(&record, time, PayloadFormat::Legacy, offset),
            "2026-11-25 8:5:7|612.0"
        );
    }

    #[test]
    fn window_limits_sends_and_storage_acks_remove() {
        let (_dir, mut outbox, first) = outbox_with(6, true);
        let start = Instant::now();
        let mut d = Delivery::new(config(PayloadFormat::Json), start);
        let mut sink = Recorder::default();
        assert_eq!(
            d.pump(start, &clock_now(true), &mut outbox, &mut sink)
                .unwrap(),
            0,
            "offline"
        );
        d.on_connected();
        assert_eq!(
            d.pump(start, &clock_now(true), &mut outbox, &mut sink)
                .unwrap(),
            4,
            "window"
        );
        assert_eq!(sink.seqs(), (first..first + 4).collect::<Vec<_>>());
        // A PUBACK proves nothing in JSON mode.
        d.on_outgoing_publish(1);
        assert_eq!(d.on_puback(1, &mut outbox).unwrap(), 0);
        assert_eq!(outbox.pending_len(), 6);

        let ack = StorageAck {
            stored: SeqRanges::from_seqs([first, first + 1]),
        };
        assert_eq!(d.on_storage_ack(&ack, &mut outbox).unwrap(), 2);
        assert_eq!(outbox.pending_len(), 4);
        let later = start + Duration::from_secs(1);
        assert_eq!(
            d.pump(later, &clock_now(true), &mut outbox, &mut sink)
                .unwrap(),
            2
        );
        assert_eq!(sink.seqs()[4..], [first + 4, first + 5]);
    }

    #[test]
    fn reconnect_and_ack_timeout_resend_from_the_oldest() {
        let (_dir, mut outbox, first) = outbox_with(3, true);
        let t0 = Instant::now();
        let mut d = Delivery::new(config(PayloadFormat::Json), t0);
        let mut sink = Recorder::default();
        d.on_connected();
        d.pump(t0, &clock_now(true), &mut outbox, &mut sink)
            .unwrap();
        d.on_storage_ack(
            &StorageAck {
                stored: SeqRanges::from_seqs([first + 1]),
            },
            &mut outbox,
        )
        .unwrap();
        d.on_disconnected();
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(
            d.pump(t1, &clock_now(true), &mut outbox, &mut sink)
                .unwrap(),
            0
        );
        d.on_connected();
        d.pump(t1, &clock_now(true), &mut outbox, &mut sink)
            .unwrap();
        assert_eq!(sink.seqs(), [first, first + 1, first + 2, first, first + 2]);

        assert_eq!(d.check_ack_timeout(t1 + Duration::from_secs(29)), None);
        assert_eq!(
            d.check_ack_timeout(t1 + Duration::from_secs(30)),
            Some(first)
        );
        d.pump(
            t1 + Duration::from_secs(30),
            &clock_now(true),
            &mut outbox,
            &mut sink,
        )
        .unwrap();
        assert_eq!(sink.seqs()[5..], [first, first + 2]);
    }

    #[test]
    fn backlog_drains_at_the_rate_limit_and_a_full_sink_is_retried() {
        let (_dir, mut outbox, _) = outbox_with(40, true);
        let t0 = Instant::now();
        let mut cfg = config(PayloadFormat::Json);
        cfg.max_in_flight = 100;
        cfg.max_rate_per_sec = 5.0;
        let mut d = Delivery::new(cfg, t0);
        d.tokens = 0.0;
        let mut sink = Recorder::default();
        d.on_connected();
        assert_eq!(
            d.pump(t0, &clock_now(true), &mut outbox, &mut sink)
                .unwrap(),
            0
        );
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(
            d.pump(t1, &clock_now(true), &mut outbox, &mut sink)
                .unwrap(),
            10
        );
        sink.capacity = Some(12);
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(
            d.pump(t2, &clock_now(true), &mut outbox, &mut sink)
                .unwrap(),
            2,
            "sink full"
        );
        sink.capacity = None;
        let t3 = t2 + Duration::from_millis(10);
        assert_eq!(
            d.pump(t3, &clock_now(true), &mut outbox, &mut sink)
                .unwrap(),
            3,
            "tokens left"
        );
        let seqs = sink.seqs();
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "in order, no gaps: {seqs:?}"
        );
    }

    #[test]
    fn untrusted_clock_holds_then_back_fills() {
        let (_dir, mut outbox, _) = outbox_with(2, false);
        let t0 = Instant::now();
        let mut d = Delivery::new(config(PayloadFormat::Json), t0);
        let mut sink = Recorder::default();
        d.on_connected();
        assert_eq!(
            d.pump(t0, &clock_now(false), &mut outbox, &mut sink)
                .unwrap(),
            0,
            "held"
        );
        assert_eq!(
            d.pump(t0, &clock_now(true), &mut outbox, &mut sink)
                .unwrap(),
            2
        );
        let p = Payload::parse(sink.payloads[0].as_bytes()).unwrap();
        // Measured at boottime 100 s, now is boottime 160 s at WALL + 60 s: back-filled to WALL.
        let expected = DateTime::from_timestamp_millis(WALL_MS).unwrap();
        assert_eq!(p.measured_at, MeasuredAt::Utc(expected));
    }

    #[test]
    fn legacy_mode_removes_on_puback() {
        let (_dir, mut outbox, _) = outbox_with(3, true);
        let t0 = Instant::now();
        let mut d = Delivery::new(config(PayloadFormat::Legacy), t0);
        let mut sink = Recorder::default();
        d.on_connected();
        assert_eq!(
            d.pump(t0, &clock_now(true), &mut outbox, &mut sink)
                .unwrap(),
            3
        );
        assert!(sink.payloads[0].ends_with("|400.0"), "{:?}", sink.payloads);
        d.on_outgoing_publish(7);
        d.on_outgoing_publish(8);
        d.on_outgoing_publish(9);
        assert_eq!(d.on_puback(8, &mut outbox).unwrap(), 1);
        assert_eq!(d.on_puback(8, &mut outbox).unwrap(), 0, "duplicate PUBACK");
        assert_eq!(outbox.pending_len(), 2);
        assert_eq!(
            d.check_ack_timeout(t0 + Duration::from_secs(3600)),
            None,
            "no storage acks"
        );
        assert_eq!(
            d.on_puback(7, &mut outbox).unwrap() + d.on_puback(9, &mut outbox).unwrap(),
            2
        );
        assert_eq!(outbox.pending_len(), 0);
    }
}
