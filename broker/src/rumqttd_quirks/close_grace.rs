//! Letting rumqttd close a finished connection first.
//!
//! rumqttd 0.20 reuses a connection id as soon as its router has handled a DISCONNECT. If the
//! guard closed the loopback socket while the router still handled the client's DISCONNECT,
//! rumqttd's connection task would send a second, late disconnect for an id the next client
//! may already hold, dropping that client. So when a client's side ends, the guard waits up
//! to [`UPSTREAM_CLOSE_GRACE`] for rumqttd to close its side: after a DISCONNECT it does so
//! within milliseconds; a client that simply vanished is closed after the grace.
//!
//! rumqttd knows of the double disconnect (its comment in `handle_disconnection`,
//! `src/router/routing.rs:410`) but not of the reused id.
//!
//! Remove when: rumqttd no longer hands out a connection id before the connection task that
//! held it has ended (still so in 0.20.0: the connection slab in `src/router/routing.rs`, the
//! task's disconnect in `src/server/broker.rs`).

use std::time::Duration;

/// How long a finished client connection waits for rumqttd to close its side first.
pub const UPSTREAM_CLOSE_GRACE: Duration = Duration::from_secs(1);
