//! A source that runs a configured program and reads its stdout: `<co2_ppm> [temperature_c
//! [humidity_pct]]`, separated by whitespace or commas. This covers sensors we have no driver
//! for (a vendor tool, a Python script) without linking anything.
//!
//! The program runs without a shell, with a timeout after which it is killed; only the first
//! 4 KiB of its output are read.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::{Measurement, SensorError, Source};
use crate::config::CommandConfig;

const MAX_OUTPUT: u64 = 4096;

pub struct CommandSource {
    config: CommandConfig,
}

impl CommandSource {
    pub fn new(config: CommandConfig) -> Self {
        Self { config }
    }
}

/// Parses `612`, `612.5 21.3 40`, `612,21.3,40`; anything else is an error naming the text.
pub fn parse_output(text: &str) -> Result<Measurement, SensorError> {
    let mut numbers = text
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| SensorError::Command(format!("output is not a number: {s:?}")))
        });
    let co2_ppm = numbers
        .next()
        .ok_or_else(|| SensorError::Command("no output".into()))??;
    let temperature_c = numbers.next().transpose()?;
    let humidity_pct = numbers.next().transpose()?;
    Ok(Measurement {
        co2_ppm,
        temperature_c,
        humidity_pct,
    })
}

impl Source for CommandSource {
    fn name(&self) -> &'static str {
        "command"
    }

    fn default_warmup(&self) -> Duration {
        Duration::ZERO
    }

    fn read(&mut self) -> Result<Measurement, SensorError> {
        let mut child = Command::new(&self.config.program)
            .args(&self.config.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                SensorError::Command(format!("starting {:?}: {e}", self.config.program))
            })?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| SensorError::Command("no stdout pipe".into()))?;
        // Read on a helper thread so a program that never exits cannot block us past the
        // timeout; the channel has room for the one message, so the thread never blocks.
        let (tx, rx) = mpsc::sync_channel(1);
        std::thread::spawn(move || {
            let mut out = String::new();
            let result = stdout
                .take(MAX_OUTPUT)
                .read_to_string(&mut out)
                .map(|_| out);
            // The receiver is gone only if we timed out; nothing left to tell.
            let _ = tx.send(result);
        });
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let output = match rx.recv_timeout(timeout) {
            Ok(output) => output?,
            Err(_) => {
                // Best effort: the child may have exited just now.
                let _ = child.kill();
                let _ = child.wait();
                return Err(SensorError::Command(format!(
                    "{:?} produced no output within {timeout:?}",
                    self.config.program
                )));
            }
        };
        let status = child.wait()?;
        if !status.success() {
            return Err(SensorError::Command(format!(
                "{:?} exited with {status}",
                self.config.program
            )));
        }
        parse_output(&output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(program: &str, args: &[&str], timeout_ms: u64) -> CommandSource {
        CommandSource::new(CommandConfig {
            program: program.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            timeout_ms,
        })
    }

    #[test]
    fn parses_numbers() {
        assert_eq!(parse_output("612\n").unwrap(), Measurement::co2(612.0));
        let m = parse_output("612.5, 21.25, 40").unwrap();
        assert_eq!(
            (m.co2_ppm, m.temperature_c, m.humidity_pct),
            (612.5, Some(21.25), Some(40.0))
        );
        assert!(parse_output("").is_err());
        assert!(parse_output("high").is_err());
        assert!(parse_output("NaN").is_err());
    }

    #[test]
    fn runs_a_program() {
        assert_eq!(
            source("echo", &["733"], 5000).read().unwrap(),
            Measurement::co2(733.0)
        );
        assert!(matches!(
            source("false", &[], 5000).read(),
            Err(SensorError::Command(_))
        ));
        assert!(matches!(
            source("/nonexistent/co2", &[], 5000).read(),
            Err(SensorError::Command(_))
        ));
    }

    #[test]
    fn kills_a_hanging_program() {
        let started = std::time::Instant::now();
        assert!(matches!(
            source("sleep", &["10"], 200).read(),
            Err(SensorError::Command(_))
        ));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
