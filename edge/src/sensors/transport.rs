//! Byte transports between the sensor drivers and the hardware: the seam that makes every
//! driver testable without a Raspberry Pi.
//!
//! Drivers talk to [`SerialTransport`] (UART: MH-Z19, Senseair S8) or [`I2cTransport`]
//! (SCD4x). The real implementations wrap rppal 0.22, which compiles on any Linux; only opening
//! them needs the device nodes. Tests use the scripted doubles in [`script`].
//!
//! rppal 0.22 traps this module works around:
//! - `set_read_mode(min > 0, timeout)` only starts the timer after the first byte, so a silent
//!   sensor would block forever: we use `(0, 100 ms)` and loop until our own deadline.
//! - `Uart::flush` *discards* queued bytes; waiting for them to be sent is `drain`.
//! - rppal's eh-1.0 I2C transaction issues separate write and read calls anyway, so the SCD4x
//!   driver does write → wait → read itself and we need no embedded-hal layer.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

/// A half-duplex UART as the serial drivers need it.
pub trait SerialTransport: Send {
    /// Discards bytes received but not read yet, so a stale reply cannot be taken for the
    /// answer to the next request.
    fn clear_input(&mut self) -> io::Result<()>;
    /// Writes all of `bytes` and returns once they have left the transmitter.
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Reads into `buf` until it is full or `timeout` has passed; returns how many bytes
    /// arrived (fewer than `buf.len()` means the sensor went silent).
    fn read_full(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize>;
}

/// An I2C device at a fixed address, as the SCD4x driver needs it.
pub trait I2cTransport: Send {
    /// One write transfer (START, address, bytes, STOP).
    fn write(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// One read transfer filling `buf` (START, address, bytes, STOP).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<()>;
    /// Waits for the sensor to execute a command. A method so tests need not sleep.
    fn delay(&mut self, duration: Duration);
}

/// How long one `read` call on the UART waits for bytes before we check our own deadline.
const UART_POLL: Duration = Duration::from_millis(100);

/// A UART opened through rppal, 8 data bits, no parity, one stop bit.
pub struct RppalSerial {
    uart: rppal::uart::Uart,
}

impl RppalSerial {
    /// Opens `path` (e.g. `/dev/serial0`, `/dev/ttyUSB0`). `Uart::with_path` does no Pi model
    /// lookup, so this also works with USB adapters and pseudo-terminals.
    pub fn open(path: &Path, baud_rate: u32) -> Result<Self, rppal::uart::Error> {
        let mut uart =
            rppal::uart::Uart::with_path(path, baud_rate, rppal::uart::Parity::None, 8, 1)?;
        uart.set_read_mode(0, UART_POLL)?;
        uart.set_write_mode(true)?;
        Ok(Self { uart })
    }
}

fn uart_io(err: rppal::uart::Error) -> io::Error {
    match err {
        rppal::uart::Error::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

impl SerialTransport for RppalSerial {
    fn clear_input(&mut self) -> io::Result<()> {
        self.uart.flush(rppal::uart::Queue::Input).map_err(uart_io)
    }

    fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = self.uart.write(bytes).map_err(uart_io)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "UART accepted no bytes",
                ));
            }
            bytes = &bytes[n..];
        }
        self.uart.drain().map_err(uart_io)
    }

    fn read_full(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        let deadline = Instant::now() + timeout;
        let mut filled = 0;
        while filled < buf.len() && Instant::now() < deadline {
            filled += self.uart.read(&mut buf[filled..]).map_err(uart_io)?;
        }
        Ok(filled)
    }
}

/// An I2C device opened through rppal on `/dev/i2c-<bus>`.
pub struct RppalI2c {
    i2c: rppal::i2c::I2c,
}

impl RppalI2c {
    /// `I2c::with_bus` opens the bus without a Pi model lookup; bus 1 is GPIO2/GPIO3.
    pub fn open(bus: u8, address: u16) -> Result<Self, rppal::i2c::Error> {
        let mut i2c = rppal::i2c::I2c::with_bus(bus)?;
        i2c.set_slave_address(address)?;
        Ok(Self { i2c })
    }
}

fn i2c_io(err: rppal::i2c::Error) -> io::Error {
    match err {
        rppal::i2c::Error::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

impl I2cTransport for RppalI2c {
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let n = self.i2c.write(bytes).map_err(i2c_io)?;
        if n == bytes.len() {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::WriteZero, "short I2C write"))
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let n = self.i2c.read(buf).map_err(i2c_io)?;
        if n == buf.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short I2C read",
            ))
        }
    }

    fn delay(&mut self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// Scripted transports for driver tests: each expects exact request bytes and plays back
/// datasheet replies, partial replies or silence.
#[cfg(test)]
pub mod script {
    use super::*;
    use std::collections::VecDeque;

    /// One step of a scripted conversation.
    #[derive(Debug, Clone)]
    pub enum Step {
        /// The driver must write exactly these bytes next.
        Expect(Vec<u8>),
        /// The sensor answers with these bytes (served to the next reads).
        Reply(Vec<u8>),
        /// The next I/O call fails (I2C NACK, unplugged adapter).
        Fail,
    }

    #[derive(Default)]
    pub struct ScriptedSerial {
        pub steps: VecDeque<Step>,
        pending: VecDeque<u8>,
        pub cleared: usize,
    }

    impl ScriptedSerial {
        pub fn new(steps: impl IntoIterator<Item = Step>) -> Self {
            Self {
                steps: steps.into_iter().collect(),
                ..Self::default()
            }
        }

        fn take_replies(&mut self) {
            while let Some(Step::Reply(bytes)) = self.steps.front() {
                self.pending.extend(bytes.iter().copied());
                self.steps.pop_front();
            }
        }
    }

    impl SerialTransport for ScriptedSerial {
        fn clear_input(&mut self) -> io::Result<()> {
            self.cleared += 1;
            self.pending.clear();
            Ok(())
        }

        fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
            match self.steps.pop_front() {
                Some(Step::Expect(expected)) => {
                    assert_eq!(bytes, &expected[..], "driver wrote unexpected bytes");
                    self.take_replies();
                    Ok(())
                }
                Some(Step::Fail) => Err(io::Error::other("scripted failure")),
                other => panic!("driver wrote {bytes:02X?}, script had {other:?}"),
            }
        }

        fn read_full(&mut self, buf: &mut [u8], _timeout: Duration) -> io::Result<usize> {
            if let Some(Step::Fail) = self.steps.front() {
                self.steps.pop_front();
                return Err(io::Error::other("scripted failure"));
            }
            let mut n = 0;
            while n < buf.len() {
                match self.pending.pop_front() {
                    Some(b) => {
                        buf[n] = b;
                        n += 1;
                    }
                    None => break,
                }
            }
            Ok(n)
        }
    }

    #[derive(Default)]
    pub struct ScriptedI2c {
        pub steps: VecDeque<Step>,
        pub slept: Duration,
    }

    impl ScriptedI2c {
        pub fn new(steps: impl IntoIterator<Item = Step>) -> Self {
            Self {
                steps: steps.into_iter().collect(),
                slept: Duration::ZERO,
            }
        }
    }

    impl I2cTransport for ScriptedI2c {
        fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
            match self.steps.pop_front() {
                Some(Step::Expect(expected)) => {
                    assert_eq!(bytes, &expected[..], "driver wrote unexpected bytes");
                    Ok(())
                }
                Some(Step::Fail) => Err(io::Error::other("NACK")),
                other => panic!("driver wrote {bytes:02X?}, script had {other:?}"),
            }
        }

        fn read(&mut self, buf: &mut [u8]) -> io::Result<()> {
            match self.steps.pop_front() {
                Some(Step::Reply(bytes)) => {
                    assert_eq!(bytes.len(), buf.len(), "driver read a different length");
                    buf.copy_from_slice(&bytes);
                    Ok(())
                }
                Some(Step::Fail) => Err(io::Error::other("NACK")),
                other => panic!("driver read {} bytes, script had {other:?}", buf.len()),
            }
        }

        fn delay(&mut self, duration: Duration) {
            self.slept += duration;
        }
    }

    /// Parses `"FF 86 02 20"` into bytes, so test vectors read like the datasheet.
    pub fn hex(text: &str) -> Vec<u8> {
        text.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).expect("test vector is hex"))
            .collect()
    }
}
