//! The embedded rumqttd: its router, its listeners on our runtime, and the ingest link.
//!
//! We assemble rumqttd from `Router` + `Server` instead of calling `Broker::start`, because
//! `Broker::start` blocks a thread forever, only logs a listener that cannot bind, and offers
//! no way to stop accepting. Start order matters: the ingest link subscribes to `co2/#` and
//! its SubAck arrives *before* any listener opens, since rumqttd drops (after PUBACK!) every
//! message published while no subscription matches.
//!
//! The configured listen addresses belong to the [`guard`](crate::guard), which vets every
//! connection and forwards it to a rumqttd listener on a loopback port of its own. With
//! credentials, the guard checks device passwords and rumqttd's auth hook lets in only the
//! guard's per-process token (see [`crate::auth`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use co2_proto::{DeviceId, StorageAck, READINGS_FILTER};
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::{v4::V4, v5::V5};
use rumqttd::{LinkType, Notification, Router, Server};
use tokio::task::JoinSet;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::auth::{Authenticator, CredentialsError};
use crate::guard::{Codec, Guard, GuardedListener, Upstream};
use crate::metrics::IngestMetrics;
use crate::rumqttd_quirks;
use crate::settings::Settings;
use crate::storage::AckSink;

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
    #[error("listener {name}: TLS: {source}")]
    Tls {
        name: String,
        source: crate::guard::tls::TlsError,
    },
    #[error("credentials file (co2.credentials_file): {0}")]
    Credentials(#[from] CredentialsError),
    #[error("no free loopback port for rumqttd's listener behind {name}: {source}")]
    NoLoopbackPort {
        name: String,
        source: std::io::Error,
    },
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
    /// `rejections` is the writer's queue: the guard records oversized messages there.
    pub async fn start(
        settings: &Settings,
        rejections: tokio::sync::mpsc::Sender<crate::ingest::record::Record>,
        metrics: Arc<IngestMetrics>,
    ) -> Result<Self, MqttError> {
        let auth = match &settings.ingest.credentials_file {
            Some(path) => Some(Authenticator::open(path, metrics.clone())?),
            None => None,
        };
        for open in settings.open_to_the_network() {
            tracing::warn!(
                listener = %open.name,
                listen = %open.listen,
                "ANYONE WHO CAN REACH {} MAY PUBLISH AND READ EVERYTHING: no device credentials \
                 (co2.credentials_file) and co2.allow_anonymous_remote = true",
                open.listen
            );
        }
        let router_tx = Router::new(settings.mqtt.id, settings.mqtt.router.clone()).spawn();
        let (mut link_tx, mut link_rx, _connack) =
            LinkBuilder::new(INGEST_CLIENT_ID, router_tx.clone())
                .build()
                .map_err(Box::new)?;
        link_tx.subscribe(READINGS_FILTER).map_err(Box::new)?;
        wait_for_suback(&mut link_rx).await?;

        // The public ports first: a clear error before anything runs.
        let mut public = Vec::new();
        for (version, listener) in settings.listeners() {
            let socket = tokio::net::TcpListener::bind(listener.listen)
                .await
                .map_err(|source| MqttError::Bind {
                    name: listener.name.clone(),
                    addr: listener.listen,
                    source,
                })?;
            let tls = match &listener.tls {
                Some(tls) => {
                    Some(
                        crate::guard::tls::acceptor(tls).map_err(|source| MqttError::Tls {
                            name: listener.name.clone(),
                            source,
                        })?,
                    )
                }
                None => None,
            };
            let upstream = loopback_port().map_err(|source| MqttError::NoLoopbackPort {
                name: listener.name.clone(),
                source,
            })?;
            tracing::info!(
                listener = %listener.name,
                public = %listener.listen,
                rumqttd = %upstream,
                "guard listening; rumqttd behind it on loopback"
            );
            let guarded = GuardedListener {
                name: listener.name.clone(),
                codec: if version == 5 { Codec::V5 } else { Codec::V4 },
                upstream: Upstream::new(upstream),
                tls,
                connect_timeout: Duration::from_millis(
                    listener.connections.connection_timeout_ms.into(),
                ),
                max_packet_size: listener.connections.max_payload_size,
            };
            // rumqttd's own listener: loopback, plain TCP (the guard did TLS), and with
            // credentials it lets in only what the guard vouched for.
            let mut inner = listener.clone();
            inner.listen = upstream;
            inner.tls = None;
            if let Some(auth) = &auth {
                let auth = auth.clone();
                inner.set_auth_handler(move |client_id, username, password| {
                    let auth = auth.clone();
                    async move { auth.check(client_id, username, password).await }
                });
            }
            public.push((version, socket, guarded, inner));
        }
        let guard = Guard::new(
            auth.clone(),
            settings.mqtt.router.max_connections.saturating_sub(1),
            rejections,
            metrics,
        );
        let stop_watching = CancellationToken::new();
        if let Some(auth) = &auth {
            auth.clone().watch(stop_watching.clone());
        }
        let mut tasks = JoinSet::new();
        for (version, socket, guarded, listener) in public {
            let name = format!(
                "{} (MQTT {}) on {}",
                guarded.name,
                if version == 5 { "5" } else { "3.1.1" },
                socket.local_addr().map_or(guarded.upstream.get(), |a| a)
            );
            let upstream = guarded.upstream.clone();
            let serve = guard.clone().serve(socket, Arc::new(guarded));
            let guard_name = name.clone();
            tasks.spawn(async move { (guard_name, Err(serve.await.to_string())) });
            let (mut config, router_tx) = (listener.clone(), router_tx.clone());
            let mut poisoned = rumqttd_quirks::listener_panic::subscribe();
            tasks.spawn(async move {
                let mut port_retries = 0;
                loop {
                    config.listen = upstream.get();
                    let (config, router_tx) = (config.clone(), router_tx.clone());
                    let mut server = tokio::spawn(async move {
                        if version == 5 {
                            Server::new(config, router_tx, V5).start(LinkType::Remote).await
                        } else {
                            Server::new(config, router_tx, V4).start(LinkType::Remote).await
                        }
                    });
                    tokio::select! {
                        result = &mut server => {
                            // Another process took the loopback port since it was picked:
                            // pick another (the guard follows `upstream`).
                            if let Ok(Err(e)) = &result {
                                if is_addr_in_use(e) && port_retries < 20 {
                                    port_retries += 1;
                                    if let Ok(addr) = loopback_port() {
                                        upstream.set(addr);
                                    }
                                    continue;
                                }
                            }
                            let reason = match result {
                                Ok(Ok(())) => "accept loop ended".to_owned(),
                                Ok(Err(e)) => e.to_string(),
                                Err(e) => e.to_string(),
                            };
                            return (name, Err(reason));
                        }
                        _ = poisoned.changed() => {
                            server.abort();
                            let _ = server.await; // aborted on purpose
                            tracing::error!(
                                listener = %name,
                                "rumqttd panicked while accepting a connection (rumqttd 0.20 bug, upstream issue #1062); \
                                 restarting this listener so that new clients can connect; open connections are unaffected"
                            );
                            rumqttd_quirks::listener_panic::wait_until_bindable(upstream.get()).await;
                        }
                    }
                }
            });
        }
        Ok(Self {
            listeners: Listeners {
                tasks,
                _auth_watch: stop_watching.drop_guard(),
            },
            ingest: link_rx,
            acks: AckPublisher { link: link_tx },
        })
    }
}

/// A loopback address for one of rumqttd's listeners behind the guard. rumqttd binds it
/// itself, so the port is only picked here: at random below the kernel's ephemeral range
/// (where other programs, and tests, get their `:0` ports), never twice in this process, and
/// bindable right now. Should another process take it before rumqttd binds it, the listener's
/// supervisor picks another.
fn loopback_port() -> std::io::Result<SocketAddr> {
    use argon2::password_hash::rand_core::{OsRng, RngCore};
    use std::sync::Mutex;
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let mut last_error = None;
    for _ in 0..100 {
        let port = 20_000 + (OsRng.next_u32() % 12_000) as u16;
        if handed_out.contains(&port) {
            continue;
        }
        let addr = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
        match std::net::TcpListener::bind(addr) {
            Ok(_) => {
                handed_out.push(port);
                return Ok(addr);
            }
            Err(e) => last_error = Some(e),
        }
    }
    // Everything tried is busy: let the kernel choose.
    match std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)) {
        Ok(listener) => listener.local_addr(),
        Err(e) => Err(last_error.unwrap_or(e)),
    }
}

fn is_addr_in_use(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::AddrInUse;
        }
        source = e.source();
    }
    false
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
    /// Stops reloading the credentials file when the listeners go.
    _auth_watch: DropGuard,
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

impl AckSink for AckPublisher {
    /// Never blocks: the ack is queued on the link even when the router's channel is full
    /// (`try_publish` keeps the packet buffered and it leaves with the next wake-up). Returns
    /// false only when the router is gone.
    fn send(&mut self, device: &DeviceId, ack: &StorageAck) -> bool {
        match self.link.try_publish(device.ack_topic(), ack.to_json()) {
            Ok(_) | Err(rumqttd::local::LinkError::TrySend(_)) => true,
            Err(_) => false,
        }
    }
}
