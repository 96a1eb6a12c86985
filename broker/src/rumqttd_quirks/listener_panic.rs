//! Notices panics inside rumqttd's connection handling, so that the broken listener can be
//! replaced.
//!
//! rumqttd 0.20 keeps a per-listener map of pending last-will senders behind a `Mutex`. When a
//! connection fails during its handshake (a client id reused while its previous connection is
//! still being set up, an invalid client id, the connection limit), its entry stays behind,
//! and the next CONNECT with that client id panics *while holding the lock*. The poisoned
//! mutex then makes every later connection on that listener panic: the broker runs on but
//! accepts no client, for good. The map belongs to the `Server`, so a fresh `Server` on the
//! same port heals it: the listener supervisors in [`crate::mqtt`] wait on [`subscribe`] and
//! then start one.
//!
//! Remove when: a rumqttd release contains the fix for bytebeamio/rumqtt#1062 (PR
//! bytebeamio/rumqtt#1066, open and unreleased as of 0.20.0).

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::sync::watch;

static PANICS: OnceLock<watch::Sender<u64>> = OnceLock::new();

/// Installs (once per process) a panic hook that counts panics located in rumqttd's
/// `server/broker.rs`, and returns a receiver that changes with every such panic. The
/// previous hook still runs, so the panic is reported as usual.
pub fn subscribe() -> watch::Receiver<u64> {
    PANICS
        .get_or_init(|| {
            let (panics, _) = watch::channel(0);
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if info.location().is_some_and(|l| in_rumqttd_server(l.file())) {
                    if let Some(panics) = PANICS.get() {
                        panics.send_modify(|n| *n += 1);
                    }
                }
                previous(info);
            }));
            panics
        })
        .subscribe()
}

/// The file of rumqttd 0.20 whose panics break a listener.
fn in_rumqttd_server(file: &str) -> bool {
    file.contains("rumqttd") && file.ends_with("server/broker.rs")
}

/// After an aborted accept loop its socket closes asynchronously; wait (briefly) until the
/// port can be bound again so that the restarted listener does not fail on `AddrInUse`.
pub async fn wait_until_bindable(addr: SocketAddr) {
    for _ in 0..100 {
        if std::net::TcpListener::bind(addr).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_panics_in_rumqttds_server_count() {
        assert!(in_rumqttd_server(
            "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/rumqttd-0.20.0/src/server/broker.rs"
        ));
        assert!(!in_rumqttd_server("broker/src/server/broker.rs"));
        assert!(!in_rumqttd_server(
            "/root/.cargo/registry/src/x/rumqttd-0.20.0/src/router/routing.rs"
        ));
    }
}
