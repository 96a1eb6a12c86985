//! Winsen MH-Z19B/C over UART (9600 8N1): 9-byte command frames with a one-byte checksum.
//!
//! Request `FF 01 CMD b3..b7 CS`, reply `FF CMD d2..d7 CS`, where `CS` is the two's complement
//! of the sum of bytes 1..=7; a frame is valid iff bytes 1..=8 sum to 0 mod 256. Only command
//! 0x86 (read CO2) answers; 0x79 (ABC on/off) and 0x99 (detection range) are fire-and-forget.

use std::time::Duration;

use super::transport::SerialTransport;
use super::{Measurement, SensorError, Source};
use crate::config::Mhz19Config;

pub const BAUD_RATE: u32 = 9600;
const FRAME_LEN: usize = 9;
const CMD_READ: u8 = 0x86;
const CMD_ABC: u8 = 0x79;
const CMD_RANGE: u8 = 0x99;
/// The sensor answers within a few ms; 1 s covers slow USB adapters.
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// `(0xFF - sum(bytes 1..=7)) + 1`, i.e. the two's complement of the sum.
pub fn checksum(frame: &[u8; FRAME_LEN]) -> u8 {
    let sum = frame[1..8].iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    0u8.wrapping_sub(sum)
}

fn command(cmd: u8, data: [u8; 5]) -> [u8; FRAME_LEN] {
    let mut frame = [
        0xFF, 0x01, cmd, data[0], data[1], data[2], data[3], data[4], 0,
    ];
    frame[8] = checksum(&frame);
    frame
}

/// `FF 01 86 00 00 00 00 00 79`.
pub fn read_request() -> [u8; FRAME_LEN] {
    command(CMD_READ, [0; 5])
}

/// Automatic baseline correction (400 ppm reference, 24 h cycle); on by default in the sensor.
pub fn abc_request(enabled: bool) -> [u8; FRAME_LEN] {
    command(CMD_ABC, [if enabled { 0xA0 } else { 0x00 }, 0, 0, 0, 0])
}

/// Detection range as a 32-bit big-endian value in bytes 4..=7 (the `mh-z19` crate gets this
/// wrong for B/C by putting it in bytes 3..=4).
pub fn range_request(range_ppm: u32) -> [u8; FRAME_LEN] {
    let [a, b, c, d] = range_ppm.to_be_bytes();
    command(CMD_RANGE, [0, a, b, c, d])
}

/// The decoded reply to command 0x86.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mhz19Reading {
    pub co2_ppm: u16,
    /// Undocumented byte 4; ESPHome reads `raw - 40` as °C. Too coarse and firmware-dependent
    /// to publish, kept for diagnostics.
    pub raw_temperature: u8,
}

impl Mhz19Reading {
    pub fn approx_temperature_c(&self) -> i16 {
        i16::from(self.raw_temperature) - 40
    }
}

/// Decodes a complete reply frame to the read command.
pub fn decode_read_reply(frame: &[u8; FRAME_LEN]) -> Result<Mhz19Reading, SensorError> {
    if frame[0] != 0xFF {
        return Err(SensorError::BadHeader(frame[0]));
    }
    if frame[1] != CMD_READ {
        return Err(SensorError::WrongCommand {
            expected: CMD_READ,
            got: frame[1],
        });
    }
    let expected = checksum(frame);
    if frame[8] != expected {
        return Err(SensorError::BadChecksum {
            expected: expected.into(),
            got: frame[8].into(),
        });
    }
    Ok(Mhz19Reading {
        co2_ppm: u16::from_be_bytes([frame[2], frame[3]]),
        raw_temperature: frame[4],
    })
}

/// An MH-Z19B/C on a serial transport.
pub struct Mhz19<T> {
    port: T,
    config: Mhz19Config,
}

impl<T: SerialTransport> Mhz19<T> {
    pub fn new(port: T, config: Mhz19Config) -> Self {
        Self { port, config }
    }

    /// Sends the configured range and ABC settings. The sensor does not answer these, and
    /// some firmware echo a frame, so input is cleared before the next read anyway.
    pub fn configure(&mut self) -> Result<(), SensorError> {
        if let Some(range) = self.config.range_ppm {
            self.port.write_all(&range_request(range))?;
        }
        if let Some(abc) = self.config.abc {
            self.port.write_all(&abc_request(abc))?;
        }
        Ok(())
    }

    /// Reads one reply frame, resynchronising on `FF 86` if line noise came first.
    fn read_reply(&mut self) -> Result<[u8; FRAME_LEN], SensorError> {
        let mut frame = [0u8; FRAME_LEN];
        let got = self.port.read_full(&mut frame, REPLY_TIMEOUT)?;
        if got == 0 {
            return Err(SensorError::Timeout);
        }
        if got < FRAME_LEN {
            return Err(SensorError::ShortRead {
                got,
                expected: FRAME_LEN,
            });
        }
        if frame[0] != 0xFF {
            if let Some(start) = frame.windows(2).position(|w| w == [0xFF, CMD_READ]) {
                frame.copy_within(start.., 0);
                let missing = &mut frame[FRAME_LEN - start..];
                let more = self.port.read_full(missing, REPLY_TIMEOUT)?;
                if more < start {
                    return Err(SensorError::ShortRead {
                        got: FRAME_LEN - start + more,
                        expected: FRAME_LEN,
                    });
                }
            }
        }
        Ok(frame)
    }
}

impl<T: SerialTransport> Source for Mhz19<T> {
    fn name(&self) -> &'static str {
        "mhz19"
    }

    /// The B needs 3 min of preheat, the C 1 min; during it the sensor reports fixed values
    /// such as 388 or 555 ppm, so time is the only usable gate.
    fn default_warmup(&self) -> Duration {
        Duration::from_secs(180)
    }

    fn read(&mut self) -> Result<Measurement, SensorError> {
        self.port.clear_input()?;
        self.port.write_all(&read_request())?;
        let reading = decode_read_reply(&self.read_reply()?)?;
        if reading.co2_ppm == 0 {
            return Err(SensorError::Implausible("0 ppm".into()));
        }
        if let Some(range) = self.config.range_ppm {
            if u32::from(reading.co2_ppm) >= range {
                return Err(SensorError::Implausible(format!(
                    "{} ppm saturates the {range} ppm range",
                    reading.co2_ppm
                )));
            }
        }
        Ok(Measurement::co2(reading.co2_ppm.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::transport::script::{hex, ScriptedSerial, Step};
    use super::*;

    fn frame(text: &str) -> [u8; FRAME_LEN] {
        hex(text).try_into().unwrap()
    }

    #[test]
    fn request_frames_match_the_datasheet() {
        assert_eq!(read_request().to_vec(), hex("FF 01 86 00 00 00 00 00 79"));
        assert_eq!(
            abc_request(true).to_vec(),
            hex("FF 01 79 A0 00 00 00 00 E6")
        );
        assert_eq!(
            abc_request(false).to_vec(),
            hex("FF 01 79 00 00 00 00 00 86")
        );
        assert_eq!(
            range_request(2000).to_vec(),
            hex("FF 01 99 00 00 00 07 D0 8F")
        );
        assert_eq!(
            range_request(5000).to_vec(),
            hex("FF 01 99 00 00 00 13 88 CB")
        );
        assert_eq!(checksum(&frame("FF 01 87 00 00 00 00 00 00")), 0x78);
        assert_eq!(checksum(&frame("FF 01 88 07 D0 00 00 00 00")), 0xA0);
    }

    #[test]
    fn good_replies_decode() {
        let r = decode_read_reply(&frame("FF 86 02 20 00 00 00 00 58")).unwrap();
        assert_eq!(r.co2_ppm, 544);
        let r = decode_read_reply(&frame("FF 86 01 90 3F 00 00 00 AA")).unwrap();
        assert_eq!((r.co2_ppm, r.approx_temperature_c()), (400, 23));
        let r = decode_read_reply(&frame("FF 86 02 60 47 00 00 00 D1")).unwrap();
        assert_eq!((r.co2_ppm, r.approx_temperature_c()), (608, 31));
    }

    #[test]
    fn bad_replies_are_rejected() {
        assert!(matches!(
            decode_read_reply(&frame("FF 86 02 60 47 00 00 00 10")),
            Err(SensorError::BadChecksum {
                expected: 0xD1,
                got: 0x10
            })
        ));
        assert!(matches!(
            decode_read_reply(&frame("FE 86 02 60 47 00 00 00 D1")),
            Err(SensorError::BadHeader(0xFE))
        ));
        assert!(matches!(
            decode_read_reply(&frame("FF 01 86 00 00 00 00 00 79")),
            Err(SensorError::WrongCommand {
                expected: 0x86,
                got: 0x01
            })
        ));
    }

    fn sensor(steps: Vec<Step>, config: Mhz19Config) -> Mhz19<ScriptedSerial> {
        Mhz19::new(ScriptedSerial::new(steps), config)
    }

    #[test]
    fn read_over_transport() {
        let mut s = sensor(
            vec![
                Step::Expect(hex("FF 01 86 00 00 00 00 00 79")),
                Step::Reply(hex("FF 86 02 20 00 00 00 00 58")),
            ],
            Mhz19Config::default(),
        );
        assert_eq!(s.read().unwrap(), Measurement::co2(544.0));
        assert_eq!(s.port.cleared, 1, "input is cleared before each request");
    }

    #[test]
    fn resyncs_after_line_noise() {
        let mut s = sensor(
            vec![
                Step::Expect(read_request().to_vec()),
                Step::Reply(hex("00 13 FF 86 02 20 00 00 00 00 58")),
            ],
            Mhz19Config::default(),
        );
        assert_eq!(s.read().unwrap(), Measurement::co2(544.0));
    }

    #[test]
    fn short_read_and_timeout() {
        let mut s = sensor(
            vec![
                Step::Expect(read_request().to_vec()),
                Step::Reply(hex("FF 86 02 20 00")),
                Step::Expect(read_request().to_vec()),
            ],
            Mhz19Config::default(),
        );
        assert!(matches!(
            s.read(),
            Err(SensorError::ShortRead {
                got: 5,
                expected: 9
            })
        ));
        assert!(matches!(s.read(), Err(SensorError::Timeout)));
    }

    #[test]
    fn configure_sends_range_and_abc_and_flags_saturation() {
        let config = Mhz19Config {
            range_ppm: Some(2000),
            abc: Some(false),
        };
        let mut s = sensor(
            vec![
                Step::Expect(hex("FF 01 99 00 00 00 07 D0 8F")),
                Step::Expect(hex("FF 01 79 00 00 00 00 00 86")),
                Step::Expect(read_request().to_vec()),
                // 2000 ppm = 0x07D0: at the top of the range.
                Step::Reply(frame_with_ppm(2000).to_vec()),
            ],
            config,
        );
        s.configure().unwrap();
        assert!(matches!(s.read(), Err(SensorError::Implausible(_))));
    }

    fn frame_with_ppm(ppm: u16) -> [u8; FRAME_LEN] {
        let [hi, lo] = ppm.to_be_bytes();
        let mut f = [0xFF, 0x86, hi, lo, 0, 0, 0, 0, 0];
        f[8] = checksum(&f);
        f
    }
}
