//! Client ids rumqttd refuses too late.
//!
//! rumqttd 0.20 refuses a client id containing `+`, `$`, `#` or `/` (`validate_clientid`,
//! `src/router/routing.rs`), but only in the router, after the listener has registered the
//! connection; the entry left behind breaks the listener for everyone (see
//! [`super::listener_panic`]). The guard refuses such ids with a CONNACK before rumqttd
//! sees them.
//!
//! Remove when: a rumqttd release contains the fix for bytebeamio/rumqtt#1062 (PR #1066,
//! unreleased as of 0.20.0). The guard may still refuse these ids then, but as its own rule.

/// True if rumqttd would refuse `client_id` only after registering it.
pub fn refused_late_by_rumqttd(client_id: &str) -> bool {
    client_id.contains(['+', '$', '#', '/'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_characters_rumqttd_validates() {
        for bad in ["a/b", "a+", "#", "$SYS"] {
            assert!(refused_late_by_rumqttd(bad), "{bad:?}");
        }
        for good in ["pi-7", "sensor_1.kitchen", ""] {
            assert!(!refused_late_by_rumqttd(good), "{good:?}");
        }
    }
}
