//! The embedded rumqttd: its router, its listeners on our runtime, and the ingest link.
//!
//! We assemble rumqttd from `Router` + `Server` instead of calling `Broker::start`, because
//! `Broker::start` blocks a thread forever, only logs a listener that cannot bind, and offers
//! no way to stop accepting. Start order matters: the ingest link subscribes to `co2/#` and
//! its SubAck arrives *before* any listener opens, since rumqttd drops (after PUBACK!) every
//! message published while no subscription matches.

use std::net::SocketAddr;
use std::time::Duration;

use co2_proto::{StorageAck, READINGS_FILTER};
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::{v4::V4, v5::V5};
use rumqttd::{LinkType, Notification, Router, Server};
use tokio::task::JoinSet;

use crate::settings::Settings;

/// Client id of the in-process subscriber that stores readings.
pub const INGEST_CLIENT_ID: &str = "co2-broker-ingest";
const SUBACK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("cannot attach the ingest link to the router: {0}")]
    Link(#[from] Box<rumqttd::local::LinkError>),
    #[error("the router did not confirm the co2/# subscription")]
    NoSubAck,
    #[error("listener {name} cannot listen on {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("listener {name} stopped: {reason}")]
    ListenerStopped { name: String, reason: String },
}

/// A running broker: its listeners, and the two ends of the ingest link.
pub struct EmbeddedBroker {
    pub listeners: Listeners,
    /// Messages published under `co2/#`.
    pub ingest: LinkRx,
    /// Publishes storage acks back to the agents.
    pub acks: AckPublisher,
}

impl EmbeddedBroker {
    pub async fn start(settings: &Settings) -> Result<Self, MqttError> {
        let router_tx = Router::new(settings.mqtt.id, settings.mqtt.router.clone()).spawn();
        let (mut link_tx, mut link_rx, _connack) =
            LinkBuilder::new(INGEST_CLIENT_ID, router_tx.clone())
                .build()
                .map_err(Box::new)?;
        link_tx.subscribe(READINGS_FILTER).map_err(Box::new)?;
        wait_for_suback(&mut link_rx).await?;

        // Bind-check first: `Server::start` binds inside its task, and a clear error before
        // anything runs beats a listener that silently never came up.
        for (_, listener) in settings.listeners() {
            std::net::TcpListener::bind(listener.listen).map_err(|source| MqttError::Bind {
                name: listener.name.clone(),
                addr: listener.listen,
                source,
            })?;
        }
        let mut tasks = JoinSet::new();
        for (version, listener) in settings.listeners() {
            let name = format!(
                "{} (MQTT {}) on {}",
                listener.name,
                if version == 5 { "5" } else { "3.1.1" },
                listener.listen
            );
            let (config, router_tx) = (listener.clone(), router_tx.clone());
            tasks.spawn(async move {
                let result = if version == 5 {
                    Server::new(config, router_tx, V5)
                        .start(LinkType::Remote)
                        .await
                } else {
                    Server::new(config, router_tx, V4)
                        .start(LinkType::Remote)
                        .await
                };
                (name, result.map_err(|e| e.to_string()))
            });
        }
        Ok(Self {
            listeners: Listeners { tasks },
            ingest: link_rx,
            acks: AckPublisher { link: link_tx },
        })
    }
}

async fn wait_for_suback(link_rx: &mut LinkRx) -> Result<(), MqttError> {
    let wait = async {
        loop {
            match link_rx.next().await.map_err(Box::new)? {
                Some(Notification::DeviceAck(_)) => return Ok(()),
                _ => continue,
            }
        }
    };
    tokio::time::timeout(SUBACK_TIMEOUT, wait)
        .await
        .map_err(|_| MqttError::NoSubAck)?
}

/// The accept loops. Aborting them closes the ports; connections already open keep going
/// until the process ends, so their last messages can still be drained.
pub struct Listeners {
    tasks: JoinSet<(String, Result<(), String>)>,
}

impl Listeners {
    /// Resolves only if a listener stops on its own, which is always a failure.
    pub async fn failed(&mut self) -> MqttError {
        match self.tasks.join_next().await {
            Some(Ok((name, result))) => MqttError::ListenerStopped {
                name,
                reason: result.err().unwrap_or_else(|| "accept loop ended".into()),
            },
            Some(Err(e)) => MqttError::ListenerStopped {
                name: "?".into(),
                reason: e.to_string(),
            },
            None => std::future::pending().await,
        }
    }

    pub fn stop_accepting(&mut self) {
        self.tasks.abort_all();
    }
}

/// Publishes storage acks on `ack/<device>` through the ingest link.
pub struct AckPublisher {
    link: LinkTx,
}

impl AckPublisher {
    /// Never blocks: the ack is queued on the link even when the router's channel is full
    /// (`try_publish` keeps the packet buffered and it leaves with the next wake-up). Returns
    /// false only when the router is gone.
    pub fn publish(&mut self, device_id: &str, ack: &StorageAck) -> bool {
        let topic = format!("{}{device_id}", co2_proto::topic::ACK_PREFIX);
        match self.link.try_publish(topic, ack.to_json()) {
            Ok(_) | Err(rumqttd::local::LinkError::TrySend(_)) => true,
            Err(_) => false,
        }
    }
}
