//! CO2 sources: one driver per sensor protocol, plus a simulated and an external-command source,
//! all behind the [`Source`] trait the sampler polls.
//!
//! Every driver's protocol logic is pure and tested with example frames (checksums and CRCs
//! included) from the sensors' datasheets; hardware access goes through [`transport`].

pub mod command;
pub mod mhz19;
pub mod scd4x;
pub mod senseair_s8;
pub mod simulated;
pub mod transport;

use std::io;
use std::time::Duration;

use crate::config::{SensorConfig, SensorKind};

/// One sample as a sensor reports it, before warm-up gating and outlier filtering.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measurement {
    /// CO2 concentration in ppm.
    pub co2_ppm: f64,
    /// Degrees Celsius, from sensors that measure it reliably (SCD4x).
    pub temperature_c: Option<f64>,
    /// Relative humidity in percent (SCD4x).
    pub humidity_pct: Option<f64>,
}

impl Measurement {
    pub fn co2(co2_ppm: f64) -> Self {
        Self {
            co2_ppm,
            temperature_c: None,
            humidity_pct: None,
        }
    }
}

/// Why a sample could not be taken. The sampler logs it and tries again at the next tick;
/// none of these stops the agent.
#[derive(Debug, thiserror::Error)]
pub enum SensorError {
    #[error("sensor did not answer")]
    Timeout,
    #[error("short read: {got} of {expected} bytes")]
    ShortRead { got: usize, expected: usize },
    #[error("bad checksum: expected {expected:#06x}, got {got:#06x}")]
    BadChecksum { expected: u16, got: u16 },
    #[error("bad frame header {0:#04x}")]
    BadHeader(u8),
    #[error("reply to command {got:#04x}, expected {expected:#04x}")]
    WrongCommand { expected: u8, got: u8 },
    #[error("Modbus exception {0:#04x}")]
    ModbusException(u8),
    #[error("sensor reports error status {0:#06x}")]
    SensorStatus(u16),
    #[error("no new measurement yet")]
    NotReady,
    #[error("implausible value: {0}")]
    Implausible(String),
    #[error("command failed: {0}")]
    Command(String),
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
}

/// Something that yields CO2 measurements when asked. Calls may block (serial timeouts, SCD4x
/// command delays, external programs), so the sampler runs them on a blocking thread.
pub trait Source: Send {
    /// Short name for logs (`mhz19`, `scd4x`, ...).
    fn name(&self) -> &'static str;
    /// How long after sensor power-on readings are garbage, if the config does not say.
    fn default_warmup(&self) -> Duration;
    /// Takes one sample. [`SensorError::NotReady`] means "ask again later", not a failure.
    fn read(&mut self) -> Result<Measurement, SensorError>;
}

/// Why a source could not be opened; fatal at start, reported with the device path.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("opening serial port {path}: {source}")]
    Serial {
        path: String,
        source: rppal::uart::Error,
    },
    #[error("opening I2C bus {bus}: {source}")]
    I2c { bus: u8, source: rppal::i2c::Error },
    #[error("configuring sensor: {0}")]
    Setup(SensorError),
}

/// Opens the source the config names, with the real rppal transport for hardware sensors.
pub fn open(config: &SensorConfig) -> Result<Box<dyn Source>, OpenError> {
    let serial = |baud| {
        transport::RppalSerial::open(&config.serial.path, baud).map_err(|source| {
            OpenError::Serial {
                path: config.serial.path.display().to_string(),
                source,
            }
        })
    };
    Ok(match config.kind {
        SensorKind::Mhz19 => {
            let mut sensor = mhz19::Mhz19::new(serial(mhz19::BAUD_RATE)?, config.mhz19.clone());
            sensor.configure().map_err(OpenError::Setup)?;
            Box::new(sensor)
        }
        SensorKind::SenseairS8 => Box::new(senseair_s8::SenseairS8::new(serial(
            senseair_s8::BAUD_RATE,
        )?)),
        SensorKind::Scd4x => {
            let bus = config.scd4x.i2c_bus;
            let i2c = transport::RppalI2c::open(bus, scd4x::ADDRESS)
                .map_err(|source| OpenError::I2c { bus, source })?;
            Box::new(scd4x::Scd4x::new(i2c, config.scd4x.clone()))
        }
        SensorKind::Simulated => Box::new(simulated::Simulated::new(&config.simulated)),
        SensorKind::Command => Box::new(command::CommandSource::new(config.command.clone())),
    })
}
