//! Senseair S8 over UART (9600 8N1): Modbus RTU with CRC-16/MODBUS, any-sensor address 0xFE.
//!
//! We read input registers IR1..IR4 in one request (`FE 04 00 00 00 04 E5 C6`, as ESPHome does):
//! IR1 is MeterStatus (any of bits 0..6 set means the value is not trustworthy, bit 5 = out of
//! range) and IR4 is the CO2 concentration. Register data is big-endian; only the CRC is sent low
//! byte first.

use std::time::Duration;

use super::transport::SerialTransport;
use super::{Measurement, SensorError, Source};

pub const BAUD_RATE: u32 = 9600;
/// "Any sensor" address: answered by whichever single S8 is on the line.
pub const ANY_ADDRESS: u8 = 0xFE;
const FN_READ_INPUT: u8 = 0x04;
/// MeterStatus bits 0..=6: fatal, offset regulation, algorithm, output, self-diagnostics,
/// out of range, memory.
const STATUS_ERROR_MASK: u16 = 0x7F;
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// Length of an exception reply, and of the prefix we read first to tell both kinds apart.
const EXCEPTION_LEN: usize = 5;

/// CRC-16/MODBUS: poly 0xA001 (reflected 0x8005), init 0xFFFF, no final xor.
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc = 0xFFFFu16;
    for &b in bytes {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// `addr 04 startHi startLo countHi countLo crcLo crcHi`.
pub fn read_input_registers_request(address: u8, start: u16, count: u16) -> [u8; 8] {
    let [sh, sl] = start.to_be_bytes();
    let [ch, cl] = count.to_be_bytes();
    let mut frame = [address, FN_READ_INPUT, sh, sl, ch, cl, 0, 0];
    let [lo, hi] = crc16(&frame[..6]).to_le_bytes();
    frame[6] = lo;
    frame[7] = hi;
    frame
}

fn check_crc(frame: &[u8]) -> Result<(), SensorError> {
    let (body, crc) = frame.split_at(frame.len() - 2);
    let expected = crc16(body);
    let got = u16::from_le_bytes([crc[0], crc[1]]);
    if expected == got {
        Ok(())
    } else {
        Err(SensorError::BadChecksum { expected, got })
    }
}

/// Decodes a complete reply to function `function` (normal or exception) into register values.
pub fn decode_registers_reply(frame: &[u8], function: u8) -> Result<Vec<u16>, SensorError> {
    if frame.len() < EXCEPTION_LEN {
        return Err(SensorError::ShortRead {
            got: frame.len(),
            expected: EXCEPTION_LEN,
        });
    }
    check_crc(frame)?;
    if frame[1] == function | 0x80 {
        return Err(SensorError::ModbusException(frame[2]));
    }
    if frame[1] != function {
        return Err(SensorError::WrongCommand {
            expected: function,
            got: frame[1],
        });
    }
    let data = &frame[3..frame.len() - 2];
    if usize::from(frame[2]) != data.len() || data.len() % 2 != 0 {
        return Err(SensorError::BadHeader(frame[2]));
    }
    Ok(data
        .chunks_exact(2)
        .map(|w| u16::from_be_bytes([w[0], w[1]]))
        .collect())
}

/// A Senseair S8 on a serial transport.
pub struct SenseairS8<T> {
    port: T,
}

impl<T: SerialTransport> SenseairS8<T> {
    pub fn new(port: T) -> Self {
        Self { port }
    }

    /// Reads `count` input registers from `start`; the reply is 5 + 2·count bytes.
    fn read_input_registers(&mut self, start: u16, count: u16) -> Result<Vec<u16>, SensorError> {
        self.port.clear_input()?;
        self.port
            .write_all(&read_input_registers_request(ANY_ADDRESS, start, count))?;
        let expected = EXCEPTION_LEN + 2 * usize::from(count);
        let mut frame = vec![0u8; expected];
        let got = self
            .port
            .read_full(&mut frame[..EXCEPTION_LEN], REPLY_TIMEOUT)?;
        if got == 0 {
            return Err(SensorError::Timeout);
        }
        let is_exception = got == EXCEPTION_LEN && frame[1] & 0x80 != 0;
        let got = if got == EXCEPTION_LEN && !is_exception {
            got + self
                .port
                .read_full(&mut frame[EXCEPTION_LEN..], REPLY_TIMEOUT)?
        } else {
            got
        };
        if is_exception {
            frame.truncate(EXCEPTION_LEN);
        } else if got < expected {
            return Err(SensorError::ShortRead { got, expected });
        }
        if frame[0] != ANY_ADDRESS {
            return Err(SensorError::BadHeader(frame[0]));
        }
        decode_registers_reply(&frame, FN_READ_INPUT)
    }
}

/// Turns IR1..IR4 into a measurement, refusing values the sensor itself flags.
pub fn measurement_from_registers(registers: &[u16]) -> Result<Measurement, SensorError> {
    let [status, _alarm, _output, co2] = registers else {
        return Err(SensorError::Implausible(format!(
            "expected 4 registers, got {}",
            registers.len()
        )));
    };
    if status & STATUS_ERROR_MASK != 0 {
        return Err(SensorError::SensorStatus(*status));
    }
    Ok(Measurement::co2((*co2).into()))
}

impl<T: SerialTransport> Source for SenseairS8<T> {
    fn name(&self) -> &'static str {
        "senseair_s8"
    }

    /// No vendor warm-up figure exists; T90 is 2 min, 60 s is the conservative choice.
    fn default_warmup(&self) -> Duration {
        Duration::from_secs(60)
    }

    fn read(&mut self) -> Result<Measurement, SensorError> {
        let registers = self.read_input_registers(0x0000, 4)?;
        measurement_from_registers(&registers)
    }
}

#[cfg(test)]
mod tests {
    use super::super::transport::script::{hex, ScriptedSerial, Step};
    use super::*;

    const STATUS_AND_CO2: &str = "FE 04 00 00 00 04 E5 C6";

    #[test]
    fn crc_check_values() {
        assert_eq!(crc16(b"123456789"), 0x4B37);
        assert_eq!(
            crc16(&hex("FE 04 02 01 90 AC D8")),
            0,
            "CRC over a whole frame is 0"
        );
        assert_eq!(crc16(&hex("FE 84 02 F2 F1")), 0);
    }

    #[test]
    fn request_frames_match_known_vectors() {
        assert_eq!(
            read_input_registers_request(0xFE, 3, 1).to_vec(),
            hex("FE 04 00 03 00 01 D5 C5")
        );
        assert_eq!(
            read_input_registers_request(0xFE, 0, 4).to_vec(),
            hex(STATUS_AND_CO2)
        );
    }

    #[test]
    fn register_replies_decode() {
        assert_eq!(
            decode_registers_reply(&hex("FE 04 02 01 90 AC D8"), 4).unwrap(),
            [400]
        );
        assert_eq!(
            decode_registers_reply(&hex("FE 04 02 03 88 AD B2"), 4).unwrap(),
            [904]
        );
        assert_eq!(
            decode_registers_reply(&hex("FE 03 02 00 B4 AC 27"), 3).unwrap(),
            [180]
        );
        assert!(matches!(
            decode_registers_reply(&hex("FE 84 02 F2 F1"), 4),
            Err(SensorError::ModbusException(2))
        ));
        assert!(matches!(
            decode_registers_reply(&hex("FE 04 02 01 91 AC D8"), 4),
            Err(SensorError::BadChecksum { .. })
        ));
    }

    fn sensor(steps: Vec<Step>) -> SenseairS8<ScriptedSerial> {
        SenseairS8::new(ScriptedSerial::new(steps))
    }

    #[test]
    fn status_and_co2_over_transport() {
        let mut s = sensor(vec![
            Step::Expect(hex(STATUS_AND_CO2)),
            Step::Reply(hex("FE 04 08 00 00 00 00 00 00 01 90 16 E6")),
        ]);
        assert_eq!(s.read().unwrap(), Measurement::co2(400.0));
    }

    #[test]
    fn out_of_range_status_is_refused() {
        let mut s = sensor(vec![
            Step::Expect(hex(STATUS_AND_CO2)),
            Step::Reply(hex("FE 04 08 00 20 00 00 00 00 00 00 36 D8")),
        ]);
        assert!(matches!(s.read(), Err(SensorError::SensorStatus(0x20))));
    }

    #[test]
    fn exception_short_read_bad_crc_and_timeout() {
        let mut s = sensor(vec![
            Step::Expect(hex(STATUS_AND_CO2)),
            Step::Reply(hex("FE 84 02 F2 F1")),
            Step::Expect(hex(STATUS_AND_CO2)),
            Step::Reply(hex("FE 04 08 00 00 00 00")),
            Step::Expect(hex(STATUS_AND_CO2)),
            Step::Reply(hex("FE 04 08 00 00 00 00 00 00 01 90 16 E7")),
            Step::Expect(hex(STATUS_AND_CO2)),
        ]);
        assert!(matches!(s.read(), Err(SensorError::ModbusException(2))));
        assert!(matches!(
            s.read(),
            Err(SensorError::ShortRead {
                got: 7,
                expected: 13
            })
        ));
        assert!(matches!(s.read(), Err(SensorError::BadChecksum { .. })));
        assert!(matches!(s.read(), Err(SensorError::Timeout)));
    }
}
