//! Workarounds for the behaviour of the rumqttd we embed, each in one place with the
//! condition for removing it.
//!
//! Every quirk here was measured on rumqttd 0.20.0, which the workspace pins exactly
//! (`rumqttd = "=0.20.0"`): some key on rumqttd's source file and line, and none may be
//! trusted on another release. Upgrading rumqttd means going through this module: check each
//! "remove when" against the new release, and re-check every file and line in
//! [`log_noise`].

pub mod client_id;
pub mod close_grace;
pub mod listener_panic;
pub mod log_noise;
