//! Topic names: `co2/<device>[/...]` carries readings, `ack/<device>` carries storage acks.

use std::fmt;

/// Prefix of every topic that carries readings; the broker stores everything under `co2/#`.
pub const READINGS_PREFIX: &str = "co2/";
/// The subscription that receives every reading.
pub const READINGS_FILTER: &str = "co2/#";
/// Prefix of the storage acknowledgements; deliberately outside `co2/#` so the broker's own
/// acks never come back to it as readings.
pub const ACK_PREFIX: &str = "ack/";
/// Longest device id accepted; the database column is sized to match.
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// A device id as it appears in topics, usernames and the `device_id` column.
///
/// It is one MQTT topic level: never empty, at most [`MAX_DEVICE_ID_LEN`] bytes, and free of
/// `/`, the wildcards `+` and `#`, and control characters, so it can be placed into a topic or a
/// filter without changing its meaning; and it neither starts nor ends with whitespace, so that
/// the database (which ignores trailing spaces in comparisons) tells every device apart.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

/// Why a topic or device id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is not under co2/")]
    NotReadingsTopic,
    #[error("topic has no device id after co2/")]
    MissingDevice,
    #[error("device id longer than {MAX_DEVICE_ID_LEN} bytes")]
    DeviceTooLong,
    #[error("device id contains '/', '+', '#' or a control character")]
    DeviceInvalidChar,
    #[error("device id starts or ends with whitespace")]
    DeviceWhitespace,
}

impl DeviceId {
    pub fn new(id: impl Into<String>) -> Result<Self, TopicError> {
        let id = id.into();
        if id.is_empty() {
            return Err(TopicError::MissingDevice);
        }
        if id.len() > MAX_DEVICE_ID_LEN {
            return Err(TopicError::DeviceTooLong);
        }
        if id
            .chars()
            .any(|c| matches!(c, '/' | '+' | '#') || c.is_control())
        {
            return Err(TopicError::DeviceInvalidChar);
        }
        // MySQL and MariaDB compare `utf8mb4_bin` with PAD SPACE: `pi-1` and `pi-1 ` are one
        // key there, so the second device's readings would count as duplicates of the first's.
        if id.trim() != id {
            return Err(TopicError::DeviceWhitespace);
        }
        Ok(Self(id))
    }

    /// The device a readings topic names: the level right after `co2/`.
    pub fn from_readings_topic(topic: &str) -> Result<Self, TopicError> {
        let rest = topic
            .strip_prefix(READINGS_PREFIX)
            .ok_or(TopicError::NotReadingsTopic)?;
        Self::new(rest.split('/').next().unwrap_or_default())
    }

    /// `co2/<device>`: where an agent publishes its readings.
    pub fn readings_topic(&self) -> String {
        format!("{READINGS_PREFIX}{}", self.0)
    }

    /// `ack/<device>`: where the broker confirms what it stored for this device.
    pub fn ack_topic(&self) -> String {
        format!("{ACK_PREFIX}{}", self.0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A plain string, as in a topic.
impl serde::Serialize for DeviceId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// Checked like [`DeviceId::new`]: a value read back (e.g. from the broker's spool) is as
/// trustworthy as one taken from a topic.
impl<'de> serde::Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let id = String::deserialize(deserializer)?;
        Self::new(id).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_is_the_level_after_co2() {
        let id = DeviceId::from_readings_topic("co2/pi-7").unwrap();
        assert_eq!(id.as_str(), "pi-7");
        let id = DeviceId::from_readings_topic("co2/pi-7/livingroom").unwrap();
        assert_eq!(id.as_str(), "pi-7");
        assert_eq!(id.readings_topic(), "co2/pi-7");
        assert_eq!(id.ack_topic(), "ack/pi-7");
    }

    #[test]
    fn topics_without_a_device_are_refused() {
        assert_eq!(
            DeviceId::from_readings_topic("co2/"),
            Err(TopicError::MissingDevice)
        );
        assert_eq!(
            DeviceId::from_readings_topic("co2//x"),
            Err(TopicError::MissingDevice)
        );
        assert_eq!(
            DeviceId::from_readings_topic("co2"),
            Err(TopicError::NotReadingsTopic)
        );
        assert_eq!(
            DeviceId::from_readings_topic("co2/a+b"),
            Err(TopicError::DeviceInvalidChar)
        );
        assert_eq!(
            DeviceId::from_readings_topic(&format!("co2/{}", "x".repeat(65))),
            Err(TopicError::DeviceTooLong)
        );
        for padded in ["co2/pi-1 ", "co2/pi-1  /x", "co2/ pi-1", "co2/pi-1\u{a0}"] {
            assert_eq!(
                DeviceId::from_readings_topic(padded),
                Err(TopicError::DeviceWhitespace),
                "{padded:?}"
            );
        }
        assert!(DeviceId::new("pi 1").is_ok(), "inner spaces are kept");
    }

    #[test]
    fn serializes_as_a_plain_string_and_is_checked_when_read() {
        let id = DeviceId::new("pi-7").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), r#""pi-7""#);
        assert_eq!(serde_json::from_str::<DeviceId>(r#""pi-7""#).unwrap(), id);
        let err = serde_json::from_str::<DeviceId>(r#""co2/#""#).unwrap_err();
        assert!(err.to_string().contains("'/'"), "{err}");
        assert!(serde_json::from_str::<DeviceId>(r#""""#).is_err());
    }
}
