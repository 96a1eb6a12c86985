//! A reading as the agent keeps it: the measured values plus the evidence of when they were
//! measured. The published timestamp is decided later, at send time (see [`crate::clock`]).

use crate::clock::RecordTime;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub time: RecordTime,
    /// CO2 concentration in ppm, after the outlier filter.
    pub co2_ppm: f64,
    /// Degrees Celsius, when the sensor measures it.
    pub temperature_c: Option<f64>,
    /// Relative humidity in percent, when the sensor measures it.
    pub humidity_pct: Option<f64>,
}

/// A reading with the per-device sequence number the outbox gave it: the key the broker
/// deduplicates and acknowledges by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Record {
    pub seq: u64,
    pub reading: Reading,
}
