//! Reading payloads: the three formats found in the field, parsed in one place.
//!
//! | format | example | time |
//! | --- | --- | --- |
//! | JSON (current agents) | `{"ts":"2026-11-24T10:00:00.250Z","value":612,"seq":42}` | `ts`: RFC 3339, or epoch seconds / milliseconds |
//! | legacy (old Pis, paho-mqtt) | `2020-7-13 22:43:23\|3500.0` | local wall time, zone unknown to the payload |
//! | bare number | `612.5` | none: the broker uses the time it received the message |
//!
//! JSON fields: `ts`, `value` (aliases `co2` and `ppm`), optional `unit` (only `"ppm"`), optional
//! `seq` (the agent's per-device sequence number, used to deduplicate and to acknowledge),
//! optional `temperature` (°C) and `humidity` (%RH). Unknown fields are ignored so that newer
//! agents can add fields without breaking older brokers.

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// Epoch numbers at or above this are milliseconds; below, seconds. 1e11 seconds is the year
/// 5138 and 1e11 milliseconds is March 1973, so real readings never fall in between.
const EPOCH_MILLIS_THRESHOLD: f64 = 1e11;

/// When a reading was measured, as far as the payload says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MeasuredAt {
    /// An absolute instant (JSON payloads).
    Utc(DateTime<Utc>),
    /// A wall-clock time without zone (legacy payloads); the receiver decides the zone.
    Local(NaiveDateTime),
    /// The payload carries no time (bare numbers); the receiver uses its receive time.
    Unstated,
}

/// One CO2 reading as carried by a payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Payload {
    pub measured_at: MeasuredAt,
    /// CO2 concentration in ppm.
    pub co2_ppm: f64,
    /// The agent's per-device sequence number; absent in legacy and bare payloads.
    pub seq: Option<u64>,
    /// Degrees Celsius, from sensors that measure it (SCD4x).
    pub temperature_c: Option<f64>,
    /// Relative humidity in percent, from sensors that measure it (SCD4x).
    pub humidity_pct: Option<f64>,
}

/// Why a payload is not a reading. The `Display` text is the reason recorded for a rejection.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload is empty")]
    Empty,
    #[error("payload is not UTF-8")]
    NotUtf8,
    #[error("legacy payload: {0}")]
    Legacy(&'static str),
    #[error("JSON payload: {0}")]
    Json(String),
    #[error("value is not a number: {0:?}")]
    NotANumber(String),
    #[error("value is not finite")]
    NotFinite,
    #[error("unit {0:?} is not supported (only ppm)")]
    Unit(String),
    #[error("timestamp out of range")]
    TimestampRange,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum JsonTime {
    Text(String),
    Epoch(f64),
}

#[derive(Serialize, Deserialize)]
struct JsonReading {
    #[serde(skip_serializing_if = "Option::is_none")]
    ts: Option<JsonTime>,
    #[serde(alias = "co2", alias = "ppm")]
    value: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    unit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    humidity: Option<f64>,
}

impl Payload {
    /// Parses any of the three formats; the first non-blank byte decides which.
    pub fn parse(bytes: &[u8]) -> Result<Self, PayloadError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| PayloadError::NotUtf8)?
            .trim();
        if text.is_empty() {
            Err(PayloadError::Empty)
        } else if text.starts_with('{') {
            parse_json(text)
        } else if text.contains('|') {
            parse_legacy(text)
        } else {
            Ok(Self {
                measured_at: MeasuredAt::Unstated,
                co2_ppm: parse_number(text)?,
                seq: None,
                temperature_c: None,
                humidity_pct: None,
            })
        }
    }

    /// The JSON form current agents publish: UTC time with milliseconds and unit `ppm`.
    /// A [`MeasuredAt::Local`] time is written without zone designator only as a last resort;
    /// agents always hold UTC times.
    pub fn to_json(&self) -> String {
        let ts = match self.measured_at {
            MeasuredAt::Utc(t) => Some(JsonTime::Text(
                t.to_rfc3339_opts(SecondsFormat::Millis, true),
            )),
            MeasuredAt::Local(t) => Some(JsonTime::Text(
                t.format("%Y-%m-%dT%H:%M:%S%.3f").to_string(),
            )),
            MeasuredAt::Unstated => None,
        };
        let json = JsonReading {
            ts,
            value: self.co2_ppm,
            unit: Some("ppm".into()),
            seq: self.seq,
            temperature: self.temperature_c,
            humidity: self.humidity_pct,
        };
        serde_json::to_string(&json).expect("a struct of numbers and strings always serializes")
    }

    /// The legacy `Y-M-D h:m:s|value` form old servers understand (fields not zero-padded,
    /// exactly as the original Python agents wrote them). Only time and value survive.
    pub fn to_legacy(local_time: NaiveDateTime, co2_ppm: f64) -> String {
        use chrono::{Datelike, Timelike};
        format!(
            "{}-{}-{} {}:{}:{}|{:.1}",
            local_time.year(),
            local_time.month(),
            local_time.day(),
            local_time.hour(),
            local_time.minute(),
            local_time.second(),
            co2_ppm
        )
    }
}

fn parse_number(text: &str) -> Result<f64, PayloadError> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| PayloadError::NotANumber(text.chars().take(32).collect()))?;
    if value.is_finite() {
        Ok(value)
    } else {
        Err(PayloadError::NotFinite)
    }
}

fn parse_json(text: &str) -> Result<Payload, PayloadError> {
    let json: JsonReading =
        serde_json::from_str(text).map_err(|e| PayloadError::Json(e.to_string()))?;
    if let Some(unit) = json.unit.filter(|u| !u.eq_ignore_ascii_case("ppm")) {
        return Err(PayloadError::Unit(unit));
    }
    let finite = |v: Option<f64>| match v {
        Some(v) if !v.is_finite() => Err(PayloadError::NotFinite),
        v => Ok(v),
    };
    let measured_at = match json.ts {
        None => MeasuredAt::Unstated,
        Some(JsonTime::Text(t)) => MeasuredAt::Utc(
            DateTime::parse_from_rfc3339(t.trim())
                .map_err(|e| PayloadError::Json(format!("ts {t:?} is not RFC 3339: {e}")))?
                .with_timezone(&Utc),
        ),
        Some(JsonTime::Epoch(n)) => MeasuredAt::Utc(from_epoch(n)?),
    };
    Ok(Payload {
        measured_at,
        co2_ppm: finite(Some(json.value))?.unwrap_or_default(),
        seq: json.seq,
        temperature_c: finite(json.temperature)?,
        humidity_pct: finite(json.humidity)?,
    })
}

/// An epoch number (seconds, or milliseconds from [`EPOCH_MILLIS_THRESHOLD`] on) as a time,
/// **truncated** to the millisecond like RFC 3339 and legacy times are, so that one instant
/// sent in another format gets the same stored time and identity. The number's shortest
/// decimal form (which is the text the client sent, for up to 17 significant digits) is cut,
/// not the binary value: `1594680203.123 * 1000.0` is `1594680203122.9998` in binary.
fn from_epoch(n: f64) -> Result<DateTime<Utc>, PayloadError> {
    if !n.is_finite() {
        return Err(PayloadError::TimestampRange);
    }
    let digits = n.abs().to_string(); // Rust prints f64 without an exponent
    let (whole, fraction) = digits.split_once('.').unwrap_or((&digits, ""));
    let whole: i64 = whole.parse().map_err(|_| PayloadError::TimestampRange)?;
    let kept = if n.abs() >= EPOCH_MILLIS_THRESHOLD {
        0
    } else {
        3
    };
    let (kept_digits, dropped_digits) = fraction.split_at(fraction.len().min(kept));
    let kept_millis: i64 = format!("{kept_digits:0<kept$}").parse().unwrap_or(0);
    let millis = whole
        .checked_mul(if kept == 3 { 1000 } else { 1 })
        .and_then(|m| m.checked_add(kept_millis))
        .ok_or(PayloadError::TimestampRange)?;
    // Towards the earlier millisecond, as chrono truncates times before 1970.
    let dropped = dropped_digits.bytes().any(|d| d != b'0');
    let millis = if n < 0.0 {
        -millis - i64::from(dropped)
    } else {
        millis
    };
    DateTime::from_timestamp_millis(millis).ok_or(PayloadError::TimestampRange)
}

/// `Y-M-D h:m:s|value`, where no field needs leading zeros and seconds may have a fraction.
fn parse_legacy(text: &str) -> Result<Payload, PayloadError> {
    let (when, value) = text
        .split_once('|')
        .ok_or(PayloadError::Legacy("missing '|'"))?;
    let (date, time) = when
        .trim()
        .split_once(char::is_whitespace)
        .ok_or(PayloadError::Legacy("expected 'Y-M-D h:m:s' before '|'"))?;
    let [y, mo, d] = split3(date, '-').ok_or(PayloadError::Legacy("date is not Y-M-D"))?;
    let [h, mi, s] = split3(time.trim(), ':').ok_or(PayloadError::Legacy("time is not h:m:s"))?;
    let int = |f: &str| f.trim().parse::<u32>().ok();
    let (secs, nanos) = match s.split_once('.') {
        Some((whole, frac)) if !frac.is_empty() && frac.len() <= 9 => (
            int(whole),
            int(frac).map(|f| f * 10u32.pow(9 - frac.len() as u32)),
        ),
        Some(_) => (None, None),
        None => (int(s), Some(0)),
    };
    let year = y.trim().parse::<i32>().ok();
    let date = match (year, int(mo), int(d)) {
        (Some(y), Some(m), Some(d)) => NaiveDate::from_ymd_opt(y, m, d),
        _ => None,
    }
    .ok_or(PayloadError::Legacy("no such date"))?;
    let time = match (int(h), int(mi), secs, nanos) {
        (Some(h), Some(m), Some(s), Some(n)) => NaiveTime::from_hms_nano_opt(h, m, s, n),
        _ => None,
    }
    .ok_or(PayloadError::Legacy("no such time of day"))?;
    Ok(Payload {
        measured_at: MeasuredAt::Local(date.and_time(time)),
        co2_ppm: parse_number(value)?,
        seq: None,
        temperature_c: None,
        humidity_pct: None,
    })
}

fn split3(text: &str, sep: char) -> Option<[&str; 3]> {
    let mut parts = text.split(sep);
    let out = [parts.next()?, parts.next()?, parts.next()?];
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> MeasuredAt {
        MeasuredAt::Local(
            NaiveDate::from_ymd_opt(y, mo, d)
                .unwrap()
                .and_hms_opt(h, mi, s)
                .unwrap(),
        )
    }

    #[test]
    fn legacy_payload_without_zero_padding() {
        let p = Payload::parse(b"2020-7-13 22:43:23|3500.0").unwrap();
        assert_eq!(p.measured_at, local(2020, 7, 13, 22, 43, 23));
        assert_eq!(p.co2_ppm, 3500.0);
        assert_eq!(p.seq, None);
        let p = Payload::parse(b"2021-1-2 3:4:5|412").unwrap();
        assert_eq!(p.measured_at, local(2021, 1, 2, 3, 4, 5));
        let p = Payload::parse(b"2021-01-02 03:04:05.5 | 412.25\n").unwrap();
        assert_eq!(p.co2_ppm, 412.25);
        let MeasuredAt::Local(t) = p.measured_at else {
            panic!()
        };
        assert_eq!(t.and_utc().timestamp_subsec_millis(), 500);
    }

    #[test]
    fn legacy_payload_errors_say_what_is_wrong() {
        let reason = |b: &[u8]| Payload::parse(b).unwrap_err().to_string();
        assert_eq!(
            reason(b"2020-13-1 1:1:1|400"),
            "legacy payload: no such date"
        );
        assert_eq!(
            reason(b"2020-2-30 1:1:1|400"),
            "legacy payload: no such date"
        );
        assert_eq!(
            reason(b"2020-1-1 25:1:1|400"),
            "legacy payload: no such time of day"
        );
        assert_eq!(
            reason(b"2020-1-1|400"),
            "legacy payload: expected 'Y-M-D h:m:s' before '|'"
        );
        assert_eq!(
            reason(b"2020-1 1:1:1|400"),
            "legacy payload: date is not Y-M-D"
        );
        assert_eq!(
            reason(b"2020-1-1 1:1:1|abc"),
            "value is not a number: \"abc\""
        );
        assert_eq!(reason(b"2020-1-1 1:1:1|NaN"), "value is not finite");
    }

    #[test]
    fn json_payload_with_rfc3339_and_epochs() {
        let p = Payload::parse(br#"{"ts":"2026-11-24T10:00:00.250+01:00","value":612,"seq":42}"#)
            .unwrap();
        let expected = "2026-11-24T09:00:00.250Z".parse::<DateTime<Utc>>().unwrap();
        assert_eq!(p.measured_at, MeasuredAt::Utc(expected));
        assert_eq!((p.co2_ppm, p.seq), (612.0, Some(42)));

        let secs = Payload::parse(br#"{"ts":1700000000,"co2":500}"#).unwrap();
        let millis = Payload::parse(br#"{"ts":1700000000000,"ppm":500}"#).unwrap();
        let frac = Payload::parse(br#"{"ts":1700000000.25,"co2":500}"#).unwrap();
        let t = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        assert_eq!(secs.measured_at, MeasuredAt::Utc(t));
        assert_eq!(millis.measured_at, MeasuredAt::Utc(t));
        assert_eq!(
            frac.measured_at,
            MeasuredAt::Utc(t + chrono::Duration::milliseconds(250))
        );

        let untimed =
            Payload::parse(br#"{"value":700.5,"temperature":21.5,"humidity":40,"extra":1}"#)
                .unwrap();
        assert_eq!(untimed.measured_at, MeasuredAt::Unstated);
        assert_eq!(untimed.temperature_c, Some(21.5));
        assert_eq!(untimed.humidity_pct, Some(40.0));
    }

    #[test]
    fn every_format_truncates_to_the_same_millisecond() {
        let at = |payload: &str| match Payload::parse(payload.as_bytes()).unwrap().measured_at {
            MeasuredAt::Utc(t) => t.timestamp_millis(),
            other => panic!("{other:?}"),
        };
        let truncated = 1_594_680_203_999;
        assert_eq!(at(r#"{"ts":1594680203.9996,"value":1}"#), truncated);
        assert_eq!(at(r#"{"ts":1594680203999.6,"value":1}"#), truncated);
        assert_eq!(
            at(r#"{"ts":"2020-07-13T22:43:23.9996Z","value":1}"#),
            truncated
        );
        // Decimal digits are cut, not the binary value (1594680203.123 * 1000 < ...123).
        assert_eq!(at(r#"{"ts":1594680203.123,"value":1}"#), 1_594_680_203_123);
        assert_eq!(at(r#"{"ts":1594680203.1,"value":1}"#), 1_594_680_203_100);
        assert_eq!(at(r#"{"ts":1594680203,"value":1}"#), 1_594_680_203_000);
        assert_eq!(at(r#"{"ts":-1.0005,"value":1}"#), -1_001);
    }

    #[test]
    fn json_values_keep_every_digit() {
        for text in ["20261.933683006926", "0.1", "612.3000000000001", "1e-7"] {
            let sent: f64 = text.parse().unwrap();
            let payload = format!(r#"{{"value":{text},"temperature":{text},"humidity":{text}}}"#);
            let p = Payload::parse(payload.as_bytes()).unwrap();
            assert_eq!(p.co2_ppm.to_bits(), sent.to_bits(), "{text}");
            assert_eq!(p.temperature_c.map(f64::to_bits), Some(sent.to_bits()));
            assert_eq!(p.humidity_pct.map(f64::to_bits), Some(sent.to_bits()));
        }
    }

    #[test]
    fn json_payload_errors() {
        let err = |b: &[u8]| Payload::parse(b).unwrap_err();
        assert!(matches!(
            err(br#"{"ts":"yesterday","value":1}"#),
            PayloadError::Json(_)
        ));
        assert!(matches!(
            err(br#"{"ts":"2026-11-24T10:00:00Z"}"#),
            PayloadError::Json(_)
        ));
        assert!(matches!(err(br#"{"value":"high"}"#), PayloadError::Json(_)));
        assert!(matches!(err(br#"{"value":1"#), PayloadError::Json(_)));
        assert_eq!(
            err(br#"{"value":1,"unit":"%"}"#),
            PayloadError::Unit("%".into())
        );
        assert_eq!(
            err(br#"{"value":1,"ts":1e300}"#),
            PayloadError::TimestampRange
        );
    }

    #[test]
    fn bare_numbers_and_garbage() {
        let p = Payload::parse(b" 612.5 ").unwrap();
        assert_eq!((p.co2_ppm, p.measured_at), (612.5, MeasuredAt::Unstated));
        assert_eq!(Payload::parse(b"").unwrap_err(), PayloadError::Empty);
        assert_eq!(Payload::parse(b"  \n").unwrap_err(), PayloadError::Empty);
        assert_eq!(
            Payload::parse(&[0xff, 0xfe, 0x31]).unwrap_err(),
            PayloadError::NotUtf8
        );
        assert_eq!(Payload::parse(b"inf").unwrap_err(), PayloadError::NotFinite);
        assert!(matches!(
            Payload::parse(b"hello"),
            Err(PayloadError::NotANumber(_))
        ));
    }

    #[test]
    fn json_round_trip_keeps_every_field() {
        let original = Payload {
            measured_at: MeasuredAt::Utc("2026-11-24T10:00:00.123Z".parse().unwrap()),
            co2_ppm: 812.0,
            seq: Some(7),
            temperature_c: Some(22.25),
            humidity_pct: Some(41.5),
        };
        let json = original.to_json();
        assert_eq!(
            json,
            r#"{"ts":"2026-11-24T10:00:00.123Z","value":812.0,"unit":"ppm","seq":7,"temperature":22.25,"humidity":41.5}"#
        );
        assert_eq!(Payload::parse(json.as_bytes()).unwrap(), original);
    }

    #[test]
    fn legacy_round_trip() {
        let MeasuredAt::Local(t) = local(2020, 7, 3, 2, 4, 9) else {
            unreachable!()
        };
        let text = Payload::to_legacy(t, 3500.0);
        assert_eq!(text, "2020-7-3 2:4:9|3500.0");
        let p = Payload::parse(text.as_bytes()).unwrap();
        assert_eq!((p.measured_at, p.co2_ppm), (MeasuredAt::Local(t), 3500.0));
    }
}
