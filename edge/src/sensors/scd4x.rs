//! Sensirion SCD40/SCD41 over I2C (address 0x62): periodic measurement of CO2, temperature and
//! humidity, every 2-byte data word followed by a CRC-8.
//!
//! Commands are 16-bit big-endian. The sensor needs time to execute a command before it can be
//! read, and rppal issues STOP between write and read anyway, so every exchange is
//! write → wait → read rather than a repeated-start `write_read`.
//!
//! Start-up survives an agent restart while the sensor is still measuring (it would NACK
//! configuration): stop (ignoring a NACK), wait 500 ms, configure, start. The first
//! measurement after start is discarded.

use std::time::Duration;

use super::transport::I2cTransport;
use super::{Measurement, SensorError, Source};
use crate::config::Scd4xConfig;

pub const ADDRESS: u16 = 0x62;

const START_PERIODIC: u16 = 0x21B1;
const READ_MEASUREMENT: u16 = 0xEC05;
const STOP_PERIODIC: u16 = 0x3F86;
const GET_DATA_READY: u16 = 0xE4B8;
const SET_TEMPERATURE_OFFSET: u16 = 0x241D;
const SET_SENSOR_ALTITUDE: u16 = 0x2427;
const STOP_EXEC: Duration = Duration::from_millis(500);
const COMMAND_EXEC: Duration = Duration::from_millis(1);

/// CRC-8 as Sensirion uses it: poly 0x31, init 0xFF, no reflection, no final xor.
pub fn crc8(bytes: &[u8]) -> u8 {
    let mut crc = 0xFFu8;
    for &b in bytes {
        crc ^= b;
        for _ in 0..8 {
            crc = if crc & 0x80 != 0 {
                (crc << 1) ^ 0x31
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Splits `[hi lo crc]*` into words, checking each CRC.
pub fn decode_words<const N: usize>(bytes: &[u8]) -> Result<[u16; N], SensorError> {
    if bytes.len() != 3 * N {
        return Err(SensorError::ShortRead {
            got: bytes.len(),
            expected: 3 * N,
        });
    }
    let mut words = [0u16; N];
    for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(3)) {
        let expected = crc8(&chunk[..2]);
        if chunk[2] != expected {
            return Err(SensorError::BadChecksum {
                expected: expected.into(),
                got: chunk[2].into(),
            });
        }
        *word = u16::from_be_bytes([chunk[0], chunk[1]]);
    }
    Ok(words)
}

/// `cmdHi cmdLo argHi argLo crc`.
pub fn command_with_argument(command: u16, argument: u16) -> [u8; 5] {
    let [c0, c1] = command.to_be_bytes();
    let [a0, a1] = argument.to_be_bytes();
    [c0, c1, a0, a1, crc8(&[a0, a1])]
}

/// Data-ready status: ready iff any of the low 11 bits is set.
pub fn is_data_ready(word: u16) -> bool {
    word & 0x07FF != 0
}

/// read_measurement words → ppm, °C (`-45 + 175·w/65535`), %RH (`100·w/65535`).
pub fn measurement_from_words([co2, t, rh]: [u16; 3]) -> Measurement {
    Measurement {
        co2_ppm: co2.into(),
        temperature_c: Some(-45.0 + 175.0 * f64::from(t) / 65535.0),
        humidity_pct: Some(100.0 * f64::from(rh) / 65535.0),
    }
}

/// An SCD40/SCD41 on an I2C transport.
pub struct Scd4x<T> {
    bus: T,
    config: Scd4xConfig,
    /// False until start-up succeeded, and again after an I/O error so the next read re-runs
    /// the start sequence (the sensor may have been power-cycled).
    measuring: bool,
    /// The first measurement after start is not trusted (notes §4.5).
    discard_next: bool,
}

impl<T: I2cTransport> Scd4x<T> {
    pub fn new(bus: T, config: Scd4xConfig) -> Self {
        Self {
            bus,
            config,
            measuring: false,
            discard_next: true,
        }
    }

    fn send(&mut self, command: u16) -> Result<(), SensorError> {
        Ok(self.bus.write(&command.to_be_bytes())?)
    }

    fn read_words<const N: usize>(&mut self, command: u16) -> Result<[u16; N], SensorError> {
        self.send(command)?;
        self.bus.delay(COMMAND_EXEC);
        let mut buf = vec![0u8; 3 * N];
        self.bus.read(&mut buf)?;
        decode_words(&buf)
    }

    fn start(&mut self) -> Result<(), SensorError> {
        // A NACK here only means the sensor was idle already.
        if let Err(e) = self.send(STOP_PERIODIC) {
            tracing::debug!("scd4x: stop_periodic_measurement not acknowledged: {e}");
        }
        self.bus.delay(STOP_EXEC);
        if let Some(offset) = self.config.temperature_offset_c {
            let word = (offset.clamp(0.0, 175.0) * 65535.0 / 175.0) as u16;
            self.bus
                .write(&command_with_argument(SET_TEMPERATURE_OFFSET, word))?;
            self.bus.delay(COMMAND_EXEC);
        }
        if let Some(altitude) = self.config.altitude_m {
            self.bus
                .write(&command_with_argument(SET_SENSOR_ALTITUDE, altitude))?;
            self.bus.delay(COMMAND_EXEC);
        }
        self.send(START_PERIODIC)?;
        self.discard_next = true;
        Ok(())
    }

    fn read_measurement(&mut self) -> Result<Measurement, SensorError> {
        if !self.measuring {
            self.start()?;
            self.measuring = true;
            // The first data arrives about 5 s after start.
            return Err(SensorError::NotReady);
        }
        let [status] = self.read_words::<1>(GET_DATA_READY)?;
        if !is_data_ready(status) {
            return Err(SensorError::NotReady);
        }
        let measurement = measurement_from_words(self.read_words::<3>(READ_MEASUREMENT)?);
        if std::mem::take(&mut self.discard_next) {
            return Err(SensorError::NotReady);
        }
        if measurement.co2_ppm <= 0.0 {
            return Err(SensorError::Implausible("0 ppm in periodic mode".into()));
        }
        Ok(measurement)
    }
}

impl<T: I2cTransport> Source for Scd4x<T> {
    fn name(&self) -> &'static str {
        "scd4x"
    }

    /// The driver already drops the first measurement after start; no further gate needed.
    fn default_warmup(&self) -> Duration {
        Duration::ZERO
    }

    fn read(&mut self) -> Result<Measurement, SensorError> {
        let result = self.read_measurement();
        if let Err(SensorError::Io(_)) = result {
            self.measuring = false;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::super::transport::script::{hex, ScriptedI2c, Step};
    use super::*;

    #[test]
    fn crc8_check_values() {
        assert_eq!(crc8(&[0xBE, 0xEF]), 0x92);
        assert_eq!(crc8(&[0x00]), 0xAC);
        assert_eq!(crc8(b"123456789"), 0xF7);
    }

    fn approx(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 0.01)
    }

    #[test]
    fn measurement_vectors() {
        let m = measurement_from_words(decode_words(&hex("01 F4 33 66 67 A2 5E B9 3C")).unwrap());
        assert_eq!(m.co2_ppm, 500.0);
        assert!(
            approx(m.temperature_c, 25.0) && approx(m.humidity_pct, 37.0),
            "{m:?}"
        );
        let m = measurement_from_words(decode_words(&hex("03 E8 D4 62 03 5E 80 00 A2")).unwrap());
        assert_eq!(m.co2_ppm, 1000.0);
        assert!(
            approx(m.temperature_c, 22.0) && approx(m.humidity_pct, 50.0),
            "{m:?}"
        );
    }

    #[test]
    fn serial_number_and_crc_errors() {
        let [a, b, c] = decode_words::<3>(&hex("F8 96 31 9F 07 C2 3B BE 89")).unwrap();
        let serial = (u64::from(a) << 32) | (u64::from(b) << 16) | u64::from(c);
        assert_eq!(serial, 0xF896_9F07_3BBE);
        assert!(matches!(
            decode_words::<3>(&hex("01 F4 34 66 67 A2 5E B9 3C")),
            Err(SensorError::BadChecksum {
                expected: 0x33,
                got: 0x34
            })
        ));
        assert!(matches!(
            decode_words::<3>(&hex("01 F4 33")),
            Err(SensorError::ShortRead { .. })
        ));
    }

    #[test]
    fn command_vectors() {
        assert_eq!(
            command_with_argument(SET_TEMPERATURE_OFFSET, 2022).to_vec(),
            hex("24 1D 07 E6 48")
        );
        assert_eq!(
            command_with_argument(SET_SENSOR_ALTITUDE, 1950).to_vec(),
            hex("24 27 07 9E 09")
        );
        assert!(is_data_ready(
            decode_words::<1>(&hex("80 06 04")).unwrap()[0]
        ));
        assert!(!is_data_ready(
            decode_words::<1>(&hex("80 00 A2")).unwrap()[0]
        ));
    }

    #[test]
    fn start_up_then_ready_and_not_ready() {
        let steps = vec![
            // stop: NACKed because the sensor was idle, which is fine
            Step::Fail,
            Step::Expect(hex("24 1D 07 E6 48")),
            Step::Expect(hex("21 B1")),
            // not ready
            Step::Expect(hex("E4 B8")),
            Step::Reply(hex("80 00 A2")),
            // ready, first measurement discarded
            Step::Expect(hex("E4 B8")),
            Step::Reply(hex("80 06 04")),
            Step::Expect(hex("EC 05")),
            Step::Reply(hex("03 E8 D4 62 03 5E 80 00 A2")),
            // ready, kept
            Step::Expect(hex("E4 B8")),
            Step::Reply(hex("80 06 04")),
            Step::Expect(hex("EC 05")),
            Step::Reply(hex("01 F4 33 66 67 A2 5E B9 3C")),
        ];
        let config = Scd4xConfig {
            temperature_offset_c: Some(5.4),
            ..Scd4xConfig::default()
        };
        let mut s = Scd4x::new(ScriptedI2c::new(steps), config);
        assert!(matches!(s.read(), Err(SensorError::NotReady)), "start-up");
        assert!(s.bus.slept >= STOP_EXEC);
        assert!(
            matches!(s.read(), Err(SensorError::NotReady)),
            "no data yet"
        );
        assert!(
            matches!(s.read(), Err(SensorError::NotReady)),
            "first discarded"
        );
        assert_eq!(s.read().unwrap().co2_ppm, 500.0);
        assert!(s.bus.steps.is_empty());
    }

    #[test]
    fn io_error_restarts_the_sensor() {
        let steps = vec![
            Step::Expect(hex("3F 86")),
            Step::Expect(hex("21 B1")),
            Step::Expect(hex("E4 B8")),
            Step::Fail,
            Step::Expect(hex("3F 86")),
            Step::Expect(hex("21 B1")),
        ];
        let mut s = Scd4x::new(ScriptedI2c::new(steps), Scd4xConfig::default());
        assert!(matches!(s.read(), Err(SensorError::NotReady)));
        assert!(matches!(s.read(), Err(SensorError::Io(_))));
        assert!(matches!(s.read(), Err(SensorError::NotReady)), "restarted");
        assert!(s.bus.steps.is_empty());
    }
}
