//! The agent: opens the outbox, the sensor and the MQTT client, runs the sampler task and the
//! delivery loop, and shuts down cleanly (outbox fsynced and closed, MQTT DISCONNECT sent).
//!
//! The delivery loop owns the outbox, the [`Delivery`] state and the rumqttc event loop, and
//! reacts to four things: a new reading, an MQTT event, a housekeeping tick and shutdown.
//! Outbox I/O is small and synchronous (one `write` per reading, batched fsync) and runs inline.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context;
use co2_proto::StorageAck;
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, Outgoing, QoS, Request};
use tokio::sync::mpsc;
use tokio::time;

use crate::brokers::BrokerRotation;
use crate::clock::SystemClock;
use crate::config::{PayloadFormat, Settings};
use crate::filter::SampleFilter;
use crate::outbox::{Outbox, OutboxLimits};
use crate::publisher::{Delivery, DeliveryConfig, PublishSink, SinkFull};
use crate::reading::Reading;
use crate::sensors::{self, SensorError, Source};
use crate::{connection, sampler, shutdown};

/// Sampled readings waiting for the delivery loop. Small: the loop appends within
/// milliseconds; when full the sampler waits (see [`sampler::run`]).
const READINGS_CHANNEL: usize = 64;
/// Housekeeping: fsync deadline, ack timeout, rate-limit refill.
const TICK: Duration = Duration::from_millis(100);
/// How long shutdown waits for the DISCONNECT to go out.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);

struct MqttSink<'a> {
    client: &'a AsyncClient,
    topic: &'a str,
}

impl PublishSink for MqttSink<'_> {
    fn try_publish(&mut self, payload: String) -> Result<(), SinkFull> {
        self.client
            .try_publish(self.topic, QoS::AtLeastOnce, false, payload)
            .map_err(|_| SinkFull)
    }
}

fn sample_filter(settings: &Settings, source: &dyn Source) -> SampleFilter {
    let s = &settings.raw.sensor;
    let warmup = s
        .warmup_secs
        .map(Duration::from_secs)
        .unwrap_or_else(|| source.default_warmup());
    SampleFilter::new(warmup, s.min_ppm, s.max_ppm, s.median_window)
}

/// `--once`: takes one reading (waiting up to `deadline` for a sensor that is not ready yet,
/// ignoring warm-up) and returns it as the JSON payload would carry it, without seq.
pub fn read_once(settings: &Settings, deadline: Duration) -> anyhow::Result<String> {
    let mut source = sensors::open(&settings.raw.sensor).context("opening the sensor")?;
    let started = Instant::now();
    let measurement = loop {
        match source.read() {
            Ok(m) => break m,
            Err(SensorError::NotReady) if started.elapsed() < deadline => {
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e).context(format!("reading {}", source.name())),
        }
    };
    let warmup = settings
        .raw
        .sensor
        .warmup_secs
        .map(Duration::from_secs)
        .unwrap_or_else(|| source.default_warmup());
    let uptime = crate::clock::boottime();
    if uptime < warmup {
        tracing::warn!(
            ?uptime,
            ?warmup,
            "the sensor may still be warming up; this value may be wrong"
        );
    }
    Ok(co2_proto::Payload {
        measured_at: co2_proto::MeasuredAt::Utc(chrono::Utc::now()),
        co2_ppm: measurement.co2_ppm,
        seq: None,
        temperature_c: measurement.temperature_c,
        humidity_pct: measurement.humidity_pct,
    }
    .to_json())
}

/// Runs the agent until `shutdown_signal` resolves.
pub async fn run(
    settings: Settings,
    shutdown_signal: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let device = settings.device_id.clone();
    let outbox_dir = settings.outbox_dir();
    let (mut outbox, recovery) =
        Outbox::open(&outbox_dir, OutboxLimits::from(&settings.raw.outbox))
            .with_context(|| format!("opening the outbox in {}", outbox_dir.display()))?;
    tracing::info!(
        dir = %outbox_dir.display(),
        pending = recovery.pending,
        corrupt = recovery.corrupt_records,
        truncated_bytes = recovery.truncated_bytes,
        next_seq = outbox.next_seq(),
        dropped_total = outbox.dropped_total(),
        "outbox opened"
    );

    let clock = SystemClock::new(settings.raw.clock.clone());
    let source = sensors::open(&settings.raw.sensor).context("opening the sensor")?;
    let filter = sample_filter(&settings, source.as_ref());
    tracing::info!(
        device = %device,
        source = source.name(),
        interval = ?settings.interval(),
        format = ?settings.raw.publish.format,
        brokers = %settings.brokers.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "),
        tls = settings.raw.mqtt.tls.enabled,
        "co2-edge starting"
    );

    // One set of options per broker, built once (TLS files are read here, not at failover).
    let broker_options = settings
        .brokers
        .iter()
        .map(|broker| {
            connection::mqtt_options(&settings, broker)
                .with_context(|| format!("configuring the MQTT connection to {broker}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut rotation = BrokerRotation::new(settings.brokers.clone());
    let publish = &settings.raw.publish;
    // Room for one full resend window on top of one still queued.
    let (client, mut eventloop) = AsyncClient::new(
        broker_options[rotation.index()].clone(),
        2 * publish.max_in_flight + 8,
    );
    let readings_topic = device.readings_topic();
    let ack_topic = device.ack_topic();
    let format = publish.format;
    let mut delivery = Delivery::new(
        DeliveryConfig {
            format,
            legacy_offset: settings.legacy_offset,
            max_in_flight: publish.max_in_flight,
            max_rate_per_sec: publish.max_rate_per_sec,
            ack_timeout: Duration::from_secs(publish.ack_timeout_secs),
            max_hold: clock.max_hold(),
        },
        Instant::now(),
    );

    let (trigger, shutdown) = shutdown::channel();
    let (readings_tx, mut readings_rx) = mpsc::channel::<Reading>(READINGS_CHANNEL);
    let sampler = tokio::spawn(sampler::run(
        source,
        filter,
        settings.interval(),
        clock.clone(),
        readings_tx,
        shutdown.clone(),
    ));

    let reconnect_delay = Duration::from_millis(settings.raw.mqtt.reconnect_delay_ms);
    let backlog_every = Duration::from_secs(publish.backlog_log_secs.max(1));
    let mut poll_after: Option<time::Instant> = None;
    let mut failures = 0u64;
    let mut ticker = time::interval(TICK);
    ticker.set_missed_tick_behavior(time::MissedTickBehavior::Delay);
    let mut backlog_logged = Instant::now();
    tokio::pin!(shutdown_signal);

    let result: anyhow::Result<()> = loop {
        // rumqttc's connect is not cancel-safe: a poll dropped between sending CONNECT and
        // reading CONNACK leaves a half-open connection behind, and the next poll opens
        // another with the same client id. The broker then sees two or three CONNECTs in a
        // few milliseconds, kicks the earlier ones ("Duplicate client_id") and may close the
        // last too. So while a connection is being set up, only shutdown may interrupt it;
        // readings wait in their channel (the sampler waits when it is full).
        let connecting = poll_after.is_none() && !delivery.is_connected();
        let step: anyhow::Result<()> = tokio::select! {
            _ = &mut shutdown_signal => break Ok(()),
            reading = readings_rx.recv(), if !connecting => match reading {
                Some(reading) => outbox.append(&reading).map(|seq| {
                    tracing::debug!(seq, ppm = reading.co2_ppm, pending = outbox.pending_len(), "reading stored");
                }).map_err(Into::into),
                None => break Err(anyhow::anyhow!("the sampler stopped")),
            },
            () = time::sleep_until(poll_after.unwrap_or_else(time::Instant::now)), if poll_after.is_some() => {
                poll_after = None;
                Ok(())
            },
            event = eventloop.poll(), if poll_after.is_none() => {
                match event {
                    Ok(event) => {
                        if matches!(event, Event::Incoming(Incoming::ConnAck(_))) {
                            failures = 0;
                            rotation.on_connected();
                        }
                        handle_event(event, &mut eventloop, &client, &ack_topic, format, &mut delivery, &mut outbox)
                    }
                    Err(e) => {
                        failures += 1;
                        let broker = rotation.current().clone();
                        // While every broker stays away, one line per broker, then one in 30.
                        let log = delivery.is_connected() || failures <= rotation.len() as u64 || failures % 30 == 0;
                        if delivery.is_connected() {
                            tracing::warn!(%broker, pending = outbox.pending_len(), "MQTT connection lost: {e}");
                        } else if log {
                            tracing::warn!(%broker, failures, "cannot connect to the broker: {e}");
                        }
                        delivery.on_disconnected();
                        // Failover: the next attempt goes to the next broker of the list.
                        let wait = rotation.on_failure(reconnect_delay);
                        if rotation.len() > 1 {
                            eventloop.mqtt_options = broker_options[rotation.index()].clone();
                            if log {
                                tracing::info!(from = %broker, to = %rotation.current(), ?wait, "failing over to the next broker");
                            }
                        }
                        poll_after = Some(time::Instant::now() + wait);
                        Ok(())
                    }
                }
            },
            _ = ticker.tick(), if !connecting => {
                let now = Instant::now();
                if let Some(seq) = delivery.check_ack_timeout(now) {
                    tracing::warn!(
                        seq,
                        pending = outbox.pending_len(),
                        "no storage ack within {}s; resending unacknowledged readings",
                        publish.ack_timeout_secs
                    );
                }
                if outbox.pending_len() > 0 && backlog_logged.elapsed() >= backlog_every {
                    tracing::info!(
                        backlog = outbox.pending_len(),
                        in_flight = delivery.in_flight(),
                        connected = delivery.is_connected(),
                        dropped_total = outbox.dropped_total(),
                        "backlog"
                    );
                    backlog_logged = Instant::now();
                }
                outbox.sync_if_due().map_err(Into::into)
            },
        };
        if let Err(e) = step {
            break Err(e);
        }
        let mut sink = MqttSink {
            client: &client,
            topic: &readings_topic,
        };
        if let Err(e) = delivery.pump(Instant::now(), &clock.now(), &mut outbox, &mut sink) {
            break Err(e.into());
        }
    };

    // Shutdown: stop sampling, keep what was sampled, close the outbox, say goodbye.
    tracing::info!("shutting down");
    trigger.fire();
    // The sampler finishes its current read (at most the sensor timeout) and exits.
    let _ = time::timeout(Duration::from_secs(6), sampler).await;
    while let Ok(reading) = readings_rx.try_recv() {
        outbox.append(&reading)?;
    }
    let pending = outbox.pending_len();
    outbox.close().context("closing the outbox")?;
    tracing::info!(pending, "outbox flushed");
    if delivery.is_connected() && client.try_disconnect().is_ok() {
        let _ = time::timeout(DISCONNECT_GRACE, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    result
}

fn handle_event(
    event: Event,
    eventloop: &mut EventLoop,
    client: &AsyncClient,
    ack_topic: &str,
    format: PayloadFormat,
    delivery: &mut Delivery,
    outbox: &mut Outbox,
) -> anyhow::Result<()> {
    match event {
        Event::Incoming(Incoming::ConnAck(connack)) => {
            // rumqttc would replay its in-memory copies first; the outbox is the source of
            // truth and resends everything unacknowledged in order instead.
            eventloop
                .pending
                .retain(|request| !matches!(request, Request::Publish(_)));
            if format == PayloadFormat::Json {
                client
                    .try_subscribe(ack_topic, QoS::AtLeastOnce)
                    .context("subscribing to the storage acks")?;
            }
            delivery.on_connected();
            let (host, port) = eventloop.mqtt_options.broker_address();
            tracing::info!(
                broker = %format!("{host}:{port}"),
                session_present = connack.session_present,
                backlog = outbox.pending_len(),
                first_pending = outbox.first_pending(),
                "connected to the broker; sending the backlog"
            );
        }
        Event::Incoming(Incoming::Publish(publish)) if publish.topic == ack_topic => {
            match StorageAck::parse(&publish.payload) {
                Ok(ack) => {
                    let removed = delivery.on_storage_ack(&ack, outbox)?;
                    tracing::info!(
                        stored = ?ack.stored.ranges(),
                        removed,
                        backlog = outbox.pending_len(),
                        "storage ack"
                    );
                }
                Err(e) => tracing::warn!("ignoring a malformed storage ack: {e}"),
            }
        }
        Event::Incoming(Incoming::PubAck(puback)) => {
            let removed = delivery.on_puback(puback.pkid, outbox)?;
            if removed > 0 {
                tracing::info!(
                    pkid = puback.pkid,
                    backlog = outbox.pending_len(),
                    "PUBACK (legacy mode)"
                );
            }
        }
        Event::Incoming(Incoming::SubAck(_)) => {
            tracing::debug!(topic = ack_topic, "subscribed to storage acks");
        }
        Event::Outgoing(Outgoing::Publish(pkid)) => delivery.on_outgoing_publish(pkid),
        other => tracing::trace!(?other, "mqtt event"),
    }
    Ok(())
}
