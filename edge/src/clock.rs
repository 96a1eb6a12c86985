//! When was a reading taken? Wall-clock trust on a Pi without a real-time clock.
//!
//! A Pi boots with the time fake-hwclock or timesyncd saved at shutdown: plausible, but behind
//! by the whole downtime, so no "is the year sane" check can catch it. We therefore trust the
//! wall clock only when the kernel says NTP synchronised it (`adjtimex`, the flag behind
//! `timedatectl`'s "System clock synchronized"), and record with every reading the evidence to
//! fix its time later: the boot id and `CLOCK_BOOTTIME`.
//!
//! **The choice (documented in the README):** readings taken while the clock is untrusted are
//! *held* in the outbox, not published. When the clock becomes trusted in the same boot, their
//! time is back-filled exactly from the boottime difference. Readings from an earlier boot that
//! never saw a synced clock, or any reading held longer than `clock.max_hold_secs`, are
//! published with the best-guess wall time and a warning, so an offline site without NTP still
//! delivers data.

use std::time::Duration;

use chrono::{DateTime, Datelike, Utc};

use crate::config::ClockConfig;

/// `/proc/sys/kernel/random/boot_id` as 16 bytes; all zero if unknown.
pub type BootId = [u8; 16];

/// The time evidence stored with each reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordTime {
    /// Wall clock at measurement, ms since the Unix epoch (UTC), trusted or not.
    pub wall_ms: i64,
    /// `CLOCK_BOOTTIME` at measurement, ms: monotonic within one boot, counts suspend.
    pub boottime_ms: u64,
    pub boot_id: BootId,
    /// Whether the wall clock was trusted at measurement.
    pub trusted: bool,
}

impl RecordTime {
    pub fn wall(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.wall_ms).unwrap_or_default()
    }
}

/// A snapshot of the clocks, taken when deciding how to stamp readings.
#[derive(Debug, Clone, Copy)]
pub struct ClockNow {
    pub wall: DateTime<Utc>,
    pub boottime: Duration,
    pub boot_id: BootId,
    pub trusted: bool,
    /// Boottime when the agent started: how long readings from an earlier boot have waited.
    pub agent_started: Duration,
}

/// The time a reading is published with, or why it must wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamp {
    /// Measured with a trusted clock.
    Trusted(DateTime<Utc>),
    /// Measured before the clock was trusted, corrected from the boottime difference.
    BackFilled(DateTime<Utc>),
    /// Could not be established; the untrusted wall time at measurement.
    BestGuess(DateTime<Utc>),
    /// Not yet: the clock may still become trusted within `max_hold`.
    Hold,
}

impl Stamp {
    pub fn time(self) -> Option<DateTime<Utc>> {
        match self {
            Stamp::Trusted(t) | Stamp::BackFilled(t) | Stamp::BestGuess(t) => Some(t),
            Stamp::Hold => None,
        }
    }
}

/// Decides the published time of a reading. Pure, so every case is unit-tested.
pub fn resolve(t: &RecordTime, now: &ClockNow, max_hold: Duration) -> Stamp {
    if t.trusted {
        return Stamp::Trusted(t.wall());
    }
    let same_boot = t.boot_id != BootId::default() && t.boot_id == now.boot_id;
    let measured_at_boottime = Duration::from_millis(t.boottime_ms);
    if now.trusted {
        if same_boot {
            let age = now.boottime.saturating_sub(measured_at_boottime);
            if let Ok(age) = chrono::Duration::from_std(age) {
                return Stamp::BackFilled(now.wall - age);
            }
        }
        return Stamp::BestGuess(t.wall());
    }
    let waited = if same_boot {
        now.boottime.saturating_sub(measured_at_boottime)
    } else {
        now.boottime.saturating_sub(now.agent_started)
    };
    if waited >= max_hold {
        Stamp::BestGuess(t.wall())
    } else {
        Stamp::Hold
    }
}

/// The host's clocks, with the trust policy from the config.
#[derive(Debug, Clone)]
pub struct SystemClock {
    boot_id: BootId,
    config: ClockConfig,
    agent_started: Duration,
}

impl SystemClock {
    pub fn new(config: ClockConfig) -> Self {
        if config.require_ntp_sync {
            match ntp_sync_state() {
                Ok(synced) => tracing::info!(ntp_synchronised = synced, "clock"),
                Err(e) => tracing::warn!(
                    "cannot ask the kernel for the NTP state (adjtimex: {e}); the clock counts as \
                     unsynchronised (is adjtimex blocked by a seccomp filter?)"
                ),
            }
        }
        Self {
            boot_id: read_boot_id(),
            config,
            agent_started: boottime(),
        }
    }

    pub fn max_hold(&self) -> Duration {
        Duration::from_secs(self.config.max_hold_secs)
    }

    pub fn now(&self) -> ClockNow {
        let wall = Utc::now();
        ClockNow {
            wall,
            boottime: boottime(),
            boot_id: self.boot_id,
            trusted: self.is_trusted(wall),
            agent_started: self.agent_started,
        }
    }

    fn is_trusted(&self, wall: DateTime<Utc>) -> bool {
        wall.year() >= self.config.min_year
            && (!self.config.require_ntp_sync || kernel_ntp_synchronised())
    }

    /// The evidence to store with a reading taken now.
    pub fn record_time(&self) -> RecordTime {
        let now = self.now();
        RecordTime {
            wall_ms: now.wall.timestamp_millis(),
            boottime_ms: u64::try_from(now.boottime.as_millis()).unwrap_or(u64::MAX),
            boot_id: now.boot_id,
            trusted: now.trusted,
        }
    }
}

/// `CLOCK_BOOTTIME`: time since boot including suspend; our proxy for sensor power-on.
pub fn boottime() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME exists on every Linux ≥ 2.6.39.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// True when the kernel considers the clock NTP-synchronised (`adjtimex` returns a state other
/// than `TIME_ERROR` and `STA_UNSYNC` is clear). Read-only: `modes = 0` changes nothing.
pub fn kernel_ntp_synchronised() -> bool {
    ntp_sync_state().unwrap_or(false)
}

/// Like [`kernel_ntp_synchronised`], but says when the kernel refused to answer (a seccomp
/// filter such as systemd's `ProtectClock=` blocks `adjtimex` entirely).
pub fn ntp_sync_state() -> std::io::Result<bool> {
    // SAFETY: an all-zero timex is a valid argument; with modes = 0 adjtimex only reads.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    if state < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0)
}

/// Reads the boot id; all zero (never equal to a real one) when unavailable.
pub fn read_boot_id() -> BootId {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .and_then(|text| parse_boot_id(&text))
        .unwrap_or_default()
}

fn parse_boot_id(text: &str) -> Option<BootId> {
    let hex: Vec<u8> = text.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
    if hex.len() != 32 {
        return None;
    }
    let mut id = BootId::default();
    for (byte, pair) in id.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT_A: BootId = [1; 16];
    const BOOT_B: BootId = [2; 16];
    const HOLD: Duration = Duration::from_secs(600);

    fn record(trusted: bool, boot_id: BootId, boottime_s: u64) -> RecordTime {
        RecordTime {
            wall_ms: 1_000_000,
            boottime_ms: boottime_s * 1000,
            boot_id,
            trusted,
        }
    }

    fn now(trusted: bool, boottime_s: u64) -> ClockNow {
        ClockNow {
            wall: "2026-11-24T12:00:00Z".parse().unwrap(),
            boottime: Duration::from_secs(boottime_s),
            boot_id: BOOT_A,
            trusted,
            agent_started: Duration::from_secs(10),
        }
    }

    #[test]
    fn trusted_readings_keep_their_time() {
        let r = record(true, BOOT_B, 5);
        assert_eq!(resolve(&r, &now(false, 20), HOLD), Stamp::Trusted(r.wall()));
    }

    #[test]
    fn same_boot_readings_are_back_filled_once_synced() {
        let r = record(false, BOOT_A, 100);
        assert_eq!(resolve(&r, &now(false, 160), HOLD), Stamp::Hold);
        let expected = "2026-11-24T11:59:00Z".parse().unwrap();
        assert_eq!(
            resolve(&r, &now(true, 160), HOLD),
            Stamp::BackFilled(expected)
        );
    }

    #[test]
    fn earlier_boot_readings_get_the_best_guess() {
        let r = record(false, BOOT_B, 100);
        assert_eq!(
            resolve(&r, &now(true, 20), HOLD),
            Stamp::BestGuess(r.wall())
        );
        assert_eq!(
            resolve(&r, &now(false, 20), HOLD),
            Stamp::Hold,
            "waited 10 s since start"
        );
        assert_eq!(
            resolve(&r, &now(false, 610), HOLD),
            Stamp::BestGuess(r.wall())
        );
    }

    #[test]
    fn held_too_long_is_released() {
        let r = record(false, BOOT_A, 100);
        assert_eq!(resolve(&r, &now(false, 699), HOLD), Stamp::Hold);
        assert_eq!(
            resolve(&r, &now(false, 700), HOLD),
            Stamp::BestGuess(r.wall())
        );
        let unknown_boot = record(false, BootId::default(), 100);
        let mut n = now(true, 200);
        n.boot_id = BootId::default();
        assert_eq!(
            resolve(&unknown_boot, &n, HOLD),
            Stamp::BestGuess(unknown_boot.wall())
        );
    }

    #[test]
    fn host_clocks_are_readable() {
        assert!(boottime() > Duration::ZERO);
        assert_eq!(
            parse_boot_id("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\n"),
            Some([
                0x0f, 0x1e, 0x2d, 0x3c, 0x4b, 0x5a, 0x69, 0x78, 0x87, 0x96, 0xa5, 0xb4, 0xc3, 0xd2,
                0xe1, 0xf0
            ])
        );
        assert_eq!(parse_boot_id("nope"), None);
        // Whatever the host says, asking must not fail or change anything.
        let _ = kernel_ntp_synchronised();
    }
}
