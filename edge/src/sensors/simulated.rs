//! A simulated sensor for tests and demos: a plausible indoor CO2 curve, deterministic per seed.
//!
//! The room fills up during office hours (08:00–18:00 UTC) towards baseline + 700 ppm and airs
//! out to the baseline at night, as a first-order lag with a 30 min time constant, plus a few ppm
//! of sensor noise. With `with_climate` it also reports temperature and humidity, which exercises
//! the optional payload fields.

use std::time::{Duration, Instant};

use chrono::Timelike;

use super::{Measurement, SensorError, Source};
use crate::config::SimulatedConfig;

const OCCUPIED_EXCESS_PPM: f64 = 700.0;
const TIME_CONSTANT_SECS: f64 = 1800.0;
const NOISE_PPM: f64 = 8.0;

/// splitmix64: tiny, seedable and good enough for noise; no `rand` dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    /// Roughly normal in about [-1, 1] (mean of three uniforms).
    fn noise(&mut self) -> f64 {
        (self.unit() + self.unit() + self.unit()) / 3.0
    }
}

pub struct Simulated {
    rng: SplitMix64,
    baseline_ppm: f64,
    co2_ppm: f64,
    with_climate: bool,
    last: Option<Instant>,
}

impl Simulated {
    pub fn new(config: &SimulatedConfig) -> Self {
        Self {
            rng: SplitMix64(config.seed),
            baseline_ppm: config.baseline_ppm,
            co2_ppm: config.baseline_ppm + 100.0,
            with_climate: config.with_climate,
            last: None,
        }
    }

    /// Advances the room by `dt` at `hour` (0..24, UTC) and samples it. Pure, for tests.
    pub fn step(&mut self, dt: Duration, hour: u32) -> Measurement {
        let occupied = (8..18).contains(&hour);
        let target = self.baseline_ppm + if occupied { OCCUPIED_EXCESS_PPM } else { 0.0 };
        let alpha = 1.0 - (-dt.as_secs_f64() / TIME_CONSTANT_SECS).exp();
        self.co2_ppm += (target - self.co2_ppm) * alpha;
        let sample = (self.co2_ppm + NOISE_PPM * self.rng.noise())
            .max(1.0)
            .round();
        let (temperature_c, humidity_pct) = if self.with_climate {
            let t = 21.0 + if occupied { 1.5 } else { 0.0 } + 0.2 * self.rng.noise();
            let rh = 40.0 + (self.co2_ppm - self.baseline_ppm) / 100.0 + self.rng.noise();
            (
                Some((t * 100.0).round() / 100.0),
                Some((rh * 10.0).round() / 10.0),
            )
        } else {
            (None, None)
        };
        Measurement {
            co2_ppm: sample,
            temperature_c,
            humidity_pct,
        }
    }
}

impl Source for Simulated {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn default_warmup(&self) -> Duration {
        Duration::ZERO
    }

    fn read(&mut self) -> Result<Measurement, SensorError> {
        let now = Instant::now();
        let dt = self.last.map_or(Duration::ZERO, |last| now - last);
        self.last = Some(now);
        Ok(self.step(dt, chrono::Utc::now().hour()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim(seed: u64) -> Simulated {
        Simulated::new(&SimulatedConfig {
            seed,
            baseline_ppm: 420.0,
            with_climate: true,
        })
    }

    #[test]
    fn same_seed_same_curve() {
        let (mut a, mut b) = (sim(7), sim(7));
        for _ in 0..50 {
            assert_eq!(
                a.step(Duration::from_secs(60), 10),
                b.step(Duration::from_secs(60), 10)
            );
        }
        assert_ne!(
            sim(8).step(Duration::ZERO, 3),
            sim(7).step(Duration::ZERO, 3)
        );
    }

    #[test]
    fn room_fills_by_day_and_airs_out_at_night() {
        let mut s = sim(1);
        let mut last = Measurement::co2(0.0);
        for _ in 0..(4 * 60) {
            last = s.step(Duration::from_secs(60), 12);
        }
        assert!((1050.0..1150.0).contains(&last.co2_ppm), "{last:?}");
        assert!(last.temperature_c.is_some() && last.humidity_pct.is_some());
        for _ in 0..(6 * 60) {
            last = s.step(Duration::from_secs(60), 23);
        }
        assert!((400.0..450.0).contains(&last.co2_ppm), "{last:?}");
    }
}
