//! Topic rules for an authenticated device: what it may publish and subscribe to.
//!
//! A device `d` may publish only on `co2/d` and `co2/d/...` (its readings), and subscribe only
//! to filters inside `co2/d`, `co2/d/...` and `ack/d` (its storage acks). Wildcards may narrow
//! a filter below the device level (`co2/d/#`) but never widen it past the device
//! (`co2/#`, `co2/+/x`, `#`), and shared subscriptions (`$share/...`) are refused. These rules
//! apply only to devices that logged in; the anonymous mode has no identity to check.

use co2_proto::topic::{ACK_PREFIX, READINGS_PREFIX};

/// True if `topic` is a topic name (no wildcards, no `$`) inside `co2/<device>`.
pub fn may_publish(device: &str, topic: &str) -> bool {
    !topic.contains(['+', '#', '\0']) && within_device(device, READINGS_PREFIX, topic)
}

/// True if every topic that `filter` can match lies inside the device's own readings or acks.
pub fn may_subscribe(device: &str, filter: &str) -> bool {
    within_device(device, READINGS_PREFIX, filter) || within_device(device, ACK_PREFIX, filter)
}

/// `prefix` + `device`, then the end or a `/`. The device level itself is literal, so `+` and
/// `#` can only appear after it, where they cannot reach another device.
fn within_device(device: &str, prefix: &str, topic: &str) -> bool {
    let Some(rest) = topic.strip_prefix(prefix) else {
        return false;
    };
    let Some(after) = rest.strip_prefix(device) else {
        return false;
    };
    !device.is_empty() && (after.is_empty() || after.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_only_under_own_device() {
        assert!(may_publish("pi-7", "co2/pi-7"));
        assert!(may_publish("pi-7", "co2/pi-7/kitchen"));
        assert!(!may_publish("pi-7", "co2/pi-8"));
        assert!(!may_publish("pi-7", "co2/pi-77"));
        assert!(!may_publish("pi-7", "co2/pi-7x/kitchen"));
        assert!(!may_publish("pi-7", "co2/pi-7/#"));
        assert!(!may_publish("pi-7", "co2/+"));
        assert!(!may_publish("pi-7", "ack/pi-7"));
        assert!(!may_publish("pi-7", "ack/pi-8"));
        assert!(!may_publish("pi-7", "other"));
        assert!(!may_publish("pi-7", ""));
    }

    #[test]
    fn subscribe_only_to_own_topics() {
        assert!(may_subscribe("pi-7", "ack/pi-7"));
        assert!(may_subscribe("pi-7", "co2/pi-7"));
        assert!(may_subscribe("pi-7", "co2/pi-7/#"));
        assert!(may_subscribe("pi-7", "co2/pi-7/+"));
        for filter in [
            "#",
            "+/pi-7",
            "co2/#",
            "co2/+",
            "co2/+/x",
            "ack/#",
            "ack/+",
            "ack/pi-8",
            "ack/pi-7x",
            "co2/pi-8/#",
            "$share/g/ack/pi-7",
            "$SYS/#",
        ] {
            assert!(!may_subscribe("pi-7", filter), "{filter}");
        }
    }
}
