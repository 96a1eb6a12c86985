//! Which samples are fit to publish: the warm-up gate, a plausibility range and a rolling
//! median that keeps a single spike from reaching the broker.
//!
//! Warm-up is measured against system uptime (`CLOCK_BOOTTIME`), the best proxy for sensor
//! power-on: restarting the agent does not restart the sensor's warm-up. The median window is
//! over accepted samples only; temperature and humidity pass through unfiltered.

use std::collections::VecDeque;
use std::time::Duration;

use crate::sensors::Measurement;

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Publish this (the CO2 value is the median of the window).
    Accept(Measurement),
    /// The sensor has not been powered long enough; `remaining` until it has.
    WarmingUp { remaining: Duration },
    /// Outside the configured plausibility range; not added to the window.
    Implausible(f64),
}

pub struct SampleFilter {
    warmup: Duration,
    min_ppm: f64,
    max_ppm: f64,
    window: VecDeque<f64>,
    window_len: usize,
}

impl SampleFilter {
    pub fn new(warmup: Duration, min_ppm: f64, max_ppm: f64, window_len: usize) -> Self {
        Self {
            warmup,
            min_ppm,
            max_ppm,
            window: VecDeque::with_capacity(window_len),
            window_len: window_len.max(1),
        }
    }

    /// Judges one sample taken at system uptime `uptime`.
    pub fn apply(&mut self, sample: Measurement, uptime: Duration) -> Verdict {
        if uptime < self.warmup {
            return Verdict::WarmingUp {
                remaining: self.warmup - uptime,
            };
        }
        let ppm = sample.co2_ppm;
        if !ppm.is_finite() || ppm < self.min_ppm || ppm > self.max_ppm {
            return Verdict::Implausible(ppm);
        }
        if self.window.len() == self.window_len {
            self.window.pop_front();
        }
        self.window.push_back(ppm);
        Verdict::Accept(Measurement {
            co2_ppm: median(self.window.iter().copied()),
            ..sample
        })
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UP: Duration = Duration::from_secs(1000);

    fn accepted(v: Verdict) -> f64 {
        match v {
            Verdict::Accept(m) => m.co2_ppm,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn warm_up_is_measured_from_boot() {
        let mut f = SampleFilter::new(Duration::from_secs(180), 1.0, 10_000.0, 1);
        assert_eq!(
            f.apply(Measurement::co2(555.0), Duration::from_secs(60)),
            Verdict::WarmingUp {
                remaining: Duration::from_secs(120)
            }
        );
        assert_eq!(
            accepted(f.apply(Measurement::co2(555.0), Duration::from_secs(180))),
            555.0
        );
    }

    #[test]
    fn median_suppresses_a_spike() {
        let mut f = SampleFilter::new(Duration::ZERO, 1.0, 10_000.0, 3);
        assert_eq!(accepted(f.apply(Measurement::co2(600.0), UP)), 600.0);
        assert_eq!(accepted(f.apply(Measurement::co2(610.0), UP)), 605.0);
        assert_eq!(accepted(f.apply(Measurement::co2(5000.0), UP)), 610.0);
        assert_eq!(accepted(f.apply(Measurement::co2(620.0), UP)), 620.0);
    }

    #[test]
    fn implausible_values_are_refused_and_climate_passes_through() {
        let mut f = SampleFilter::new(Duration::ZERO, 300.0, 5000.0, 3);
        assert_eq!(
            f.apply(Measurement::co2(0.0), UP),
            Verdict::Implausible(0.0)
        );
        assert_eq!(
            f.apply(Measurement::co2(6000.0), UP),
            Verdict::Implausible(6000.0)
        );
        assert!(matches!(
            f.apply(Measurement::co2(f64::NAN), UP),
            Verdict::Implausible(_)
        ));
        let m = Measurement {
            co2_ppm: 500.0,
            temperature_c: Some(21.0),
            humidity_pct: Some(40.0),
        };
        assert_eq!(f.apply(m, UP), Verdict::Accept(m));
    }
}
