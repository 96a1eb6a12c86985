//! rumqttd log output that says nothing to an operator, dropped before it reaches the log.
//!
//! - rumqttd 0.20 logs at ERROR on every ordinary client disconnect ("no-connection id … is
//!   already gone", "router-drop error=Recv(Disconnected)"); an operator must not learn to
//!   ignore ERROR lines, so exactly those call sites are dropped, by source file and line.
//! - rumqttd opens spans for every single message at ERROR level (so `rumqttd=warn` keeps
//!   them). Recording them formats the topic of each PUBLISH on the router's only thread; the
//!   benchmark's profile showed it among the broker's top costs. Connection-level spans
//!   (`remote_link`, `incoming_connect`, …) stay: they give errors their client id.
//!
//! Remove when: a rumqttd release logs a peer's disconnect below ERROR (PR
//! bytebeamio/rumqtt#781 did so for one of several call sites in 2024; these are still ERROR
//! in 0.20.0, see issue bytebeamio/rumqtt#928) and opens its per-message spans below ERROR.
//! The file and line keys are valid for rumqttd 0.20.0 only: on any other version they
//! silently match nothing, or the wrong line.

use tracing::Metadata;

/// Call sites (path suffix within the rumqttd crate, line) of benign ERROR events.
const BENIGN_ERRORS: [(&str, u32); 4] = [
    ("src/router/routing.rs", 416), // "no-connection id … is already gone"
    ("src/router/routing.rs", 436), // the same, for a disconnect with a reason code
    ("src/router/routing.rs", 539), // the same, when the incoming buffer is gone
    ("src/server/broker.rs", 581),  // "router-drop error=Recv(Disconnected)"
];

/// Names of the spans rumqttd opens per message.
const PER_MESSAGE_SPANS: [&str; 4] = [
    "publish",
    "incoming_payload",
    "[>] incoming",
    "[<] outgoing",
];

/// True for a rumqttd event or span that must not be logged (or even recorded); for use in
/// `tracing_subscriber::filter::filter_fn(|meta| !is_noise(meta))`.
pub fn is_noise(meta: &Metadata<'_>) -> bool {
    is_noise_at(
        meta.target(),
        meta.is_span(),
        meta.name(),
        meta.file(),
        meta.line(),
    )
}

fn is_noise_at(
    target: &str,
    is_span: bool,
    name: &str,
    file: Option<&str>,
    line: Option<u32>,
) -> bool {
    if !target.starts_with("rumqttd") {
        return false;
    }
    if is_span {
        return PER_MESSAGE_SPANS.contains(&name);
    }
    BENIGN_ERRORS.iter().any(|(benign_file, benign_line)| {
        line == Some(*benign_line) && file.is_some_and(|f| f.ends_with(benign_file))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTING: &str = "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/rumqttd-0.20.0/src/router/routing.rs";

    #[test]
    fn only_the_listed_rumqttd_call_sites_and_spans() {
        let event =
            |target, file, line| is_noise_at(target, false, "event", Some(file), Some(line));
        assert!(event("rumqttd::router::routing", ROUTING, 416));
        assert!(event(
            "rumqttd::server::broker",
            "rumqttd-0.20.0/src/server/broker.rs",
            581
        ));
        assert!(
            !event("rumqttd::router::routing", ROUTING, 417),
            "another line"
        );
        assert!(
            !event("co2_broker::guard", "src/router/routing.rs", 416),
            "not rumqttd"
        );

        let span = |target, name| is_noise_at(target, true, name, Some(ROUTING), Some(1));
        assert!(span("rumqttd::router::routing", "publish"));
        assert!(span("rumqttd::router::routing", "[>] incoming"));
        assert!(
            !span("rumqttd::server::broker", "remote_link"),
            "gives errors their client id"
        );
        assert!(!span("co2_broker::mqtt", "publish"), "not rumqttd");
    }
}
