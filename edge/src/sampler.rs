//! The sampling task: polls the source every interval, gates and filters the samples, stamps
//! them with the clock evidence and hands them to the agent loop, which appends them to the
//! outbox. It never touches MQTT, so a broker outage cannot stall sampling.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{self, MissedTickBehavior};

use crate::clock::{self, SystemClock};
use crate::filter::{SampleFilter, Verdict};
use crate::reading::Reading;
use crate::sensors::{SensorError, Source};
use crate::shutdown::Shutdown;

/// Logs sensor failures without flooding: the first of a run, then every `EVERY`th, and the
/// recovery.
struct FailureLog {
    consecutive: u64,
}

impl FailureLog {
    const EVERY: u64 = 20;

    fn failed(&mut self, source: &str, error: &SensorError) {
        self.consecutive += 1;
        if self.consecutive == 1 || self.consecutive % Self::EVERY == 0 {
            tracing::warn!(
                source,
                consecutive = self.consecutive,
                "sensor read failed: {error}"
            );
        }
    }

    fn succeeded(&mut self, source: &str) {
        if self.consecutive > 0 {
            tracing::info!(source, after = self.consecutive, "sensor answers again");
        }
        self.consecutive = 0;
    }
}

/// Runs until shutdown or until the receiving side is gone.
///
/// `readings` is bounded: when the agent loop falls behind (a very slow SD card), `send` waits
/// and the next samples are simply taken later; nothing is dropped here.
pub async fn run(
    mut source: Box<dyn Source>,
    mut filter: SampleFilter,
    interval: Duration,
    clock: SystemClock,
    readings: mpsc::Sender<Reading>,
    mut shutdown: Shutdown,
) {
    let name = source.name();
    let mut ticker = time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failures = FailureLog { consecutive: 0 };
    let mut warming_logged = false;
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = ticker.tick() => {}
        }
        // Serial timeouts, SCD4x command delays and external programs block: keep them off the
        // async threads.
        let joined = tokio::task::spawn_blocking(move || {
            let result = source.read();
            (source, result)
        })
        .await;
        let result = match joined {
            Ok((returned, result)) => {
                source = returned;
                result
            }
            Err(e) => {
                tracing::error!(source = name, "sensor driver panicked: {e}");
                return;
            }
        };
        let sample = match result {
            Ok(sample) => {
                failures.succeeded(name);
                sample
            }
            Err(SensorError::NotReady) => {
                tracing::debug!(source = name, "no new measurement yet");
                continue;
            }
            Err(e) => {
                failures.failed(name, &e);
                continue;
            }
        };
        let measurement = match filter.apply(sample, clock::boottime()) {
            Verdict::Accept(m) => m,
            Verdict::WarmingUp { remaining } => {
                if !warming_logged {
                    tracing::info!(
                        source = name,
                        ?remaining,
                        "sensor warming up; discarding readings"
                    );
                    warming_logged = true;
                }
                continue;
            }
            Verdict::Implausible(ppm) => {
                tracing::warn!(source = name, ppm, "implausible reading discarded");
                continue;
            }
        };
        let reading = Reading {
            time: clock.record_time(),
            co2_ppm: measurement.co2_ppm,
            temperature_c: measurement.temperature_c,
            humidity_pct: measurement.humidity_pct,
        };
        tracing::debug!(ppm = reading.co2_ppm, "sampled");
        tokio::select! {
            _ = shutdown.wait() => return,
            sent = readings.send(reading) => if sent.is_err() { return },
        }
    }
}
