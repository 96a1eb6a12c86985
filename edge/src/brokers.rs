//! The brokers an agent may deliver to, and which one to try next.
//!
//! Several co2-broker instances can write to one database cluster (see the main README,
//! "Running more than one broker"). An agent given a list of them fails over: when a
//! connection attempt fails or an open connection is lost, it moves on to the next broker of
//! the list. Nothing else changes on failover: the outbox resends every reading without a
//! storage ack, and the database's unique key stores a reading that reached two brokers once.

use std::fmt;
use std::time::Duration;

/// One broker: a host name or IP address and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for BrokerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl BrokerAddress {
    /// Parses `host`, `host:port`, `[v6]` or `[v6]:port`; a missing port is `default_port`.
    pub fn parse(text: &str, default_port: u16) -> Result<Self, String> {
        let text = text.trim();
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("{text:?}: `[` without `]`"))?;
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(format!("{text:?}: expected `:port` after `]`")),
                },
            }
        } else {
            match text.rsplit_once(':') {
                // A bare IPv6 address without brackets: no port can be told apart.
                Some((host, _)) if host.contains(':') => (text, None),
                Some((host, port)) => (host, Some(port)),
                None => (text, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{text:?}: no host"));
        }
        let port = match port {
            None => default_port,
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{text:?}: port {port:?} is not 1..=65535"))?,
        };
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }
}

/// Which broker to try next: the current one until it fails, then the next of the list.
///
/// The reconnect delay is paid once per round through the whole list, not per broker: after
/// losing a broker the agent tries the others at once (one of them is most likely up), and
/// only when every broker failed in a row does it wait before starting over. With a single
/// broker this is the plain "wait, then reconnect" of before.
#[derive(Debug)]
pub struct BrokerRotation {
    brokers: Vec<BrokerAddress>,
    current: usize,
    /// Failures in a row since the last successful connection.
    failed_in_a_row: usize,
}

impl BrokerRotation {
    /// `brokers` must not be empty (the config validation guarantees it).
    pub fn new(brokers: Vec<BrokerAddress>) -> Self {
        assert!(!brokers.is_empty(), "at least one broker");
        Self {
            brokers,
            current: 0,
            failed_in_a_row: 0,
        }
    }

    /// The broker to connect to (or connected to).
    pub fn current(&self) -> &BrokerAddress {
        &self.brokers[self.current]
    }

    /// Position of [`Self::current`] in the list.
    pub fn index(&self) -> usize {
        self.current
    }

    pub fn len(&self) -> usize {
        self.brokers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.brokers.is_empty()
    }

    /// A connection to [`Self::current`] was accepted.
    pub fn on_connected(&mut self) {
        self.failed_in_a_row = 0;
    }

    /// Connecting to [`Self::current`] failed, or its connection was lost: moves on to the
    /// next broker and returns how long to wait before trying it (zero unless a whole round
    /// failed).
    pub fn on_failure(&mut self, reconnect_delay: Duration) -> Duration {
        self.failed_in_a_row += 1;
        self.current = (self.current + 1) % self.brokers.len();
        if self.failed_in_a_row % self.brokers.len() == 0 {
            reconnect_delay
        } else {
            Duration::ZERO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(host: &str, port: u16) -> BrokerAddress {
        BrokerAddress {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn parses_hosts_ports_and_ipv6() {
        assert_eq!(BrokerAddress::parse("a.lan", 1883), Ok(addr("a.lan", 1883)));
        assert_eq!(
            BrokerAddress::parse(" a.lan:8883 ", 1883),
            Ok(addr("a.lan", 8883))
        );
        assert_eq!(
            BrokerAddress::parse("[::1]:1884", 1883),
            Ok(addr("::1", 1884))
        );
        assert_eq!(
            BrokerAddress::parse("[fe80::2]", 1883),
            Ok(addr("fe80::2", 1883))
        );
        assert_eq!(
            BrokerAddress::parse("fe80::2", 1883),
            Ok(addr("fe80::2", 1883))
        );
        assert_eq!(addr("::1", 1884).to_string(), "[::1]:1884");
        assert_eq!(addr("10.0.0.2", 1883).to_string(), "10.0.0.2:1883");
        for bad in ["", ":1883", "a:", "a:0", "a:70000", "a:x", "[::1", "[::1]x"] {
            assert!(BrokerAddress::parse(bad, 1883).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn fails_over_at_once_and_waits_only_after_a_whole_round() {
        let delay = Duration::from_secs(2);
        let mut rotation = BrokerRotation::new(vec![addr("a", 1), addr("b", 2), addr("c", 3)]);
        assert_eq!(rotation.current().host, "a");
        // a lost: b and c are tried at once, a again only after the delay.
        assert_eq!(rotation.on_failure(delay), Duration::ZERO);
        assert_eq!(rotation.current().host, "b");
        assert_eq!(rotation.on_failure(delay), Duration::ZERO);
        assert_eq!(rotation.current().host, "c");
        assert_eq!(rotation.on_failure(delay), delay);
        assert_eq!(rotation.current().host, "a");
        // A success starts a new round: losing a then tries b at once.
        assert_eq!(rotation.on_failure(delay), Duration::ZERO);
        rotation.on_connected();
        assert_eq!(rotation.current().host, "b");
        assert_eq!(rotation.on_failure(delay), Duration::ZERO);
        assert_eq!(rotation.current().host, "c");
    }

    #[test]
    fn a_single_broker_waits_between_attempts_as_before() {
        let delay = Duration::from_millis(200);
        let mut rotation = BrokerRotation::new(vec![addr("only", 1883)]);
        for _ in 0..3 {
            assert_eq!(rotation.on_failure(delay), delay);
            assert_eq!(rotation.current().host, "only");
        }
        rotation.on_connected();
        assert_eq!(rotation.on_failure(delay), delay);
    }
}
