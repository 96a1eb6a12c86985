//! The guard: the broker's public MQTT listeners, in front of rumqttd.
//!
//! rumqttd 0.20 authenticates a CONNECT but has no authorization at all (any client may
//! publish or subscribe anything), awaits every TLS handshake inside its accept loop (one
//! slow client stops all others from connecting), and only logs what it refuses. So the
//! public ports belong to the guard, and rumqttd listens on loopback ports only the guard
//! gets into (see [`crate::auth`]). Per connection the guard:
//!
//! 1. takes a slot of the connection limit and one of the few its address may hold before
//!    being admitted, or closes the connection at once;
//! 2. does the TLS handshake (if configured), reads the CONNECT, vets it ([`vet`]) and checks
//!    the password, all within the listener's `connection_timeout_ms`, in the connection's
//!    own task; a client that leaves while its password check waits costs no hashing;
//! 3. frames and decodes what the client sends with rumqttd's own codec ([`framing`]),
//!    refusing anything that is not MQTT;
//! 4. relays ([`relay`]): checks every PUBLISH, SUBSCRIBE and will against [`acl`] and the
//!    subscription budget, answers oversized PUBLISHes itself, keeps rumqttd's session alive
//!    for clients without keep-alive, and copies rumqttd's answers back.
//!
//! A refused connection, an oversized packet and a denied topic each increment a counter in
//! [`IngestMetrics`] and are logged (rate-limited to one line a second per kind, with the
//! number held back).

pub mod acl;
pub mod framing;
pub mod relay;
pub mod tls;
pub mod vet;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::ConnectReturnCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

pub use framing::Codec;
use framing::{next_frame, FrameError};
use relay::Subscriptions;

use crate::auth::{Authenticator, Refusal};
use crate::ingest::record::Record;
use crate::metrics::IngestMetrics;
use crate::per_address::{AddressSlot, AddressSlots};
use crate::throttle::Throttle;

/// How long a connection waits for rumqttd's loopback listener (it is restarted after a
/// rumqttd panic, see `rumqttd_quirks::listener_panic`).
const UPSTREAM_CONNECT_PATIENCE: Duration = Duration::from_secs(5);
/// Connections one address may hold before they are admitted (TLS handshake, CONNECT,
/// password check). A legitimate device needs one, for milliseconds; a host that opens idle
/// sockets or floods CONNECTs with wrong passwords gets no more than this, however fast it
/// goes, so it can neither fill the connection limit nor the password checks' queue.
pub const MAX_UNADMITTED_PER_ADDRESS: usize = 8;
/// Distinct subscription filters one device (or, without credentials, one client id) may use
/// over the broker's lifetime; see [`Subscriptions`].
pub const MAX_FILTERS_PER_CLIENT: usize = 16;

/// One public listener and the rumqttd listener behind it.
#[derive(Clone)]
pub struct GuardedListener {
    pub name: String,
    pub codec: Codec,
    /// rumqttd's loopback listener for this one.
    pub upstream: Arc<Upstream>,
    pub tls: Option<TlsAcceptor>,
    /// TLS handshake and CONNECT must both arrive within this.
    pub connect_timeout: Duration,
    /// Largest accepted packet (MQTT remaining length), as rumqttd's `max_payload_size`.
    pub max_packet_size: usize,
}

/// Where rumqttd's loopback listener behind a public one is. Its port is picked at start and
/// picked again if another process took it first, so the guard looks it up per connection.
#[derive(Debug)]
pub struct Upstream(std::sync::RwLock<SocketAddr>);

impl Upstream {
    pub fn new(addr: SocketAddr) -> Arc<Self> {
        Arc::new(Self(std::sync::RwLock::new(addr)))
    }
    pub fn get(&self) -> SocketAddr {
        *self.0.read().unwrap_or_else(|e| e.into_inner())
    }
    pub fn set(&self, addr: SocketAddr) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = addr;
    }
}

/// State shared by all public listeners.
pub struct Guard {
    /// `None`: anonymous mode, no identities and therefore no topic rules.
    pub auth: Option<Arc<Authenticator>>,
    /// Connection slots across all listeners (rumqttd's router refuses beyond its own limit
    /// in a way that can break its listener, so the guard stays below it).
    connections: Arc<Semaphore>,
    /// Connections per address not admitted yet; see [`MAX_UNADMITTED_PER_ADDRESS`].
    unadmitted: AddressSlots,
    subscriptions: Subscriptions,
    /// The writer's queue, for the oversized messages the guard records itself. Weak: the
    /// writer drains and stops once the ingest link's sender is gone, whatever clients are
    /// still connected.
    rejections: mpsc::WeakSender<Record>,
    metrics: Arc<IngestMetrics>,
    logs: Logs,
}

#[derive(Default)]
struct Logs {
    refused: Mutex<Option<Throttle>>,
    oversized: Mutex<Option<Throttle>>,
    denied: Mutex<Option<Throttle>>,
}

/// One log line a second per kind; the rest is counted and reported with the next line.
fn throttled(slot: &Mutex<Option<Throttle>>) -> Option<u64> {
    slot.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(|| Throttle::new(Duration::from_secs(1)))
        .ready()
}

/// Keeps `mqtt_connections` right however the connection task ends.
struct OpenConnection<'a>(&'a IngestMetrics);

impl<'a> OpenConnection<'a> {
    fn count(metrics: &'a IngestMetrics) -> Self {
        IngestMetrics::add(&metrics.mqtt_connections, 1);
        Self(metrics)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0
            .mqtt_connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How a guarded connection ended.
#[derive(Debug)]
pub enum End {
    /// Either side closed or the connection broke after it was established.
    Closed,
    /// Before reaching rumqttd: limit, timeout, not MQTT, TLS, invalid CONNECT.
    Refused(String),
    /// Refused for the credentials it presented (or did not).
    Unauthenticated(&'static str),
    Oversized(usize),
    Denied(String),
    Revoked,
}

/// Who the connection belongs to, once its CONNECT was read.
pub struct Peer {
    client_id: String,
    /// The device the topic rules are checked against (`None` in anonymous mode).
    device: Option<String>,
}

impl Peer {
    /// Whose subscription budget applies: the device, or the client id without credentials.
    fn subscriber(&self) -> &str {
        self.device.as_deref().unwrap_or(&self.client_id)
    }
}

impl Guard {
    pub fn new(
        auth: Option<Arc<Authenticator>>,
        max_connections: usize,
        rejections: mpsc::Sender<Record>,
        metrics: Arc<IngestMetrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            auth,
            connections: Arc::new(Semaphore::new(max_connections)),
            unadmitted: AddressSlots::new(MAX_UNADMITTED_PER_ADDRESS),
            subscriptions: Subscriptions::new(MAX_FILTERS_PER_CLIENT),
            rejections: rejections.downgrade(),
            metrics,
            logs: Logs::default(),
        })
    }

    /// The accept loop of one public listener; returns only if accepting fails for good.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        config: Arc<GuardedListener>,
    ) -> std::io::Error {
        loop {
            let (stream, addr) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) if is_transient_accept_error(&e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = %config.name, error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return e,
            };
            let Some(unadmitted) = self.unadmitted.take(addr.ip()) else {
                let reason = format!(
                    "{MAX_UNADMITTED_PER_ADDRESS} connections from this address are still logging in"
                );
                self.report(&config.name, &addr, None, End::Refused(reason));
                continue; // dropping the stream closes it
            };
            let Ok(slot) = self.connections.clone().try_acquire_owned() else {
                self.report(
                    &config.name,
                    &addr,
                    None,
                    End::Refused("connection limit reached (router.max_connections)".into()),
                );
                continue;
            };
            let _ = stream.set_nodelay(true); // latency only; failure changes nothing else
            tokio::spawn(
                self.clone()
                    .connection(stream, addr, config.clone(), slot, unadmitted),
            );
        }
    }

    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        addr: SocketAddr,
        config: Arc<GuardedListener>,
        _slot: OwnedSemaphorePermit,
        unadmitted: AddressSlot,
    ) {
        let _open = OpenConnection::count(&self.metrics);
        let deadline = Instant::now() + config.connect_timeout;
        let (end, peer) = match &config.tls {
            Some(acceptor) => {
                match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => self.session(tls, &config, deadline, unadmitted).await,
                    Ok(Err(e)) => (End::Refused(format!("TLS handshake failed: {e}")), None),
                    Err(_) => (
                        End::Refused("no TLS handshake within connection_timeout_ms".into()),
                        None,
                    ),
                }
            }
            None => self.session(stream, &config, deadline, unadmitted).await,
        };
        self.report(&config.name, &addr, peer.as_ref(), end);
    }

    fn report(&self, listener: &str, addr: &SocketAddr, peer: Option<&Peer>, end: End) {
        let client_id = peer.map_or("", |p| p.client_id.as_str()).escape_debug();
        let (counter, log) = match &end {
            End::Closed => return,
            End::Refused(_) => (&self.metrics.connections_refused, &self.logs.refused),
            End::Unauthenticated(_) => (&self.metrics.auth_refused, &self.logs.refused),
            End::Oversized(_) => (&self.metrics.oversized_packets, &self.logs.oversized),
            End::Denied(_) => (&self.metrics.topic_denied, &self.logs.denied),
            End::Revoked => {
                tracing::info!(listener, peer = %addr, client_id = %client_id, "device removed from the credentials file; connection closed");
                return;
            }
        };
        IngestMetrics::add(counter, 1);
        let Some(suppressed) = throttled(log) else {
            return;
        };
        match end {
            End::Refused(reason) => {
                tracing::warn!(listener, peer = %addr, client_id = %client_id, reason, suppressed, "MQTT connection refused")
            }
            End::Unauthenticated(reason) => {
                tracing::warn!(listener, peer = %addr, client_id = %client_id, reason, suppressed, "MQTT connection refused")
            }
            End::Oversized(size) => {
                tracing::warn!(listener, peer = %addr, client_id = %client_id, size, suppressed, "MQTT packet larger than max_payload_size; client disconnected")
            }
            End::Denied(what) => {
                tracing::warn!(listener, peer = %addr, client_id = %client_id, denied = %what.escape_debug(), suppressed, "MQTT client broke a topic rule or limit; disconnected")
            }
            End::Closed | End::Revoked => {}
        }
    }

    /// An oversized PUBLISH the guard recorded and answered; the client stays connected.
    fn report_oversized(&self, listener: &str, peer: &Peer, size: usize) {
        IngestMetrics::add(&self.metrics.oversized_packets, 1);
        if let Some(suppressed) = throttled(&self.logs.oversized) {
            tracing::warn!(listener, client_id = %peer.client_id.escape_debug(), size, suppressed, "MQTT message larger than max_payload_size; recorded as rejected and acknowledged");
        }
    }

    /// Reads the CONNECT, vets it, checks the password, opens the upstream connection and
    /// relays until either side closes. Returns how it ended and, once known, who the client
    /// was.
    async fn session<S>(
        &self,
        client: S,
        config: &GuardedListener,
        deadline: Instant,
        unadmitted: AddressSlot,
    ) -> (End, Option<Peer>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (mut client_rx, mut client_tx) = tokio::io::split(client);
        let mut buf = BytesMut::with_capacity(1024);
        let (codec, max) = (config.codec, config.max_packet_size);
        let first =
            tokio::time::timeout_at(deadline, next_frame(&mut client_rx, &mut buf, codec, max))
                .await;
        let connect = match first {
            Err(_) => {
                return (
                    End::Refused("no CONNECT within connection_timeout_ms".into()),
                    None,
                )
            }
            Ok(Ok(Some(frame))) => frame,
            // Nothing sent at all: a port probe, not a refusal.
            Ok(Ok(None)) => return (End::Closed, None),
            Ok(Err(FrameError::Oversized(n))) => return (End::Oversized(n), None),
            Ok(Err(e)) => return (End::Refused(format!("not MQTT: {e}")), None),
        };
        let packet = match codec.decode(&connect, max) {
            Ok(packet) => packet,
            Err(e) => return (End::Refused(format!("invalid CONNECT: {e}")), None),
        };
        let admitted = match vet::vet(packet, self.auth.is_some()) {
            Ok(admitted) => admitted,
            Err(refused) => {
                refuse_connect(&mut client_tx, codec, refused.code).await;
                let peer = refused.client_id.map(|client_id| Peer {
                    client_id,
                    device: None,
                });
                return (refused.end, peer);
            }
        };
        let peer = Peer {
            client_id: admitted.client_id.clone(),
            device: admitted.device.clone(),
        };
        let vouched = match (&self.auth, &admitted.password) {
            (Some(auth), Some(password)) => {
                let check = auth.vouch(&peer.client_id, &peer.client_id, password.clone());
                match until_deadline_or_gone(check, &mut client_rx, &mut buf, deadline, max).await {
                    Waited::Done(Ok(token)) => Some(token),
                    Waited::Done(Err(refusal)) => {
                        let (code, end) = match refusal {
                            Refusal::Busy => (
                                codec.busy(),
                                End::Refused("too many password checks waiting".into()),
                            ),
                            other => (
                                ConnectReturnCode::BadUserNamePassword,
                                End::Unauthenticated(other.reason()),
                            ),
                        };
                        refuse_connect(&mut client_tx, codec, code).await;
                        return (end, Some(peer));
                    }
                    Waited::Late => {
                        refuse_connect(&mut client_tx, codec, codec.busy()).await;
                        let reason = "password check not done within connection_timeout_ms";
                        return (End::Refused(reason.into()), Some(peer));
                    }
                    Waited::Gone => return (End::Closed, Some(peer)),
                }
            }
            _ => None,
        };
        let keep_alive_off = admitted.keep_alive_off;
        let connect = match admitted.upstream_connect(connect, codec, vouched) {
            Ok(connect) => connect,
            Err(e) => return (End::Refused(format!("invalid CONNECT: {e}")), Some(peer)),
        };
        drop(unadmitted);

        let mut upstream = match connect_upstream(&config.upstream).await {
            Ok(upstream) => upstream,
            Err(e) => {
                tracing::error!(listener = %config.name, upstream = %config.upstream.get(), error = %e, "rumqttd's loopback listener is unreachable");
                refuse_connect(&mut client_tx, codec, ConnectReturnCode::ServiceUnavailable).await;
                return (End::Closed, Some(peer));
            }
        };
        if upstream.write_all(&connect).await.is_err() {
            return (End::Closed, Some(peer));
        }
        let end = relay::relay(
            self,
            config,
            &peer,
            keep_alive_off,
            client_rx,
            client_tx,
            buf,
            upstream,
        )
        .await;
        (end, Some(peer))
    }
}

/// How waiting for a password check ended.
enum Waited<T> {
    Done(T),
    /// The connection's deadline passed first.
    Late,
    /// The client closed its connection meanwhile; dropping the check skips it.
    Gone,
}

/// Awaits `check` while watching the client: what it sends meanwhile is kept in `buf` (up to
/// one packet ahead), and if it leaves the check is abandoned.
async fn until_deadline_or_gone<T, R: AsyncRead + Unpin>(
    check: impl std::future::Future<Output = T>,
    client_rx: &mut R,
    buf: &mut BytesMut,
    deadline: Instant,
    max: usize,
) -> Waited<T> {
    tokio::pin!(check);
    let mut reading = true;
    loop {
        tokio::select! {
            verdict = &mut check => return Waited::Done(verdict),
            () = tokio::time::sleep_until(deadline) => return Waited::Late,
            read = client_rx.read_buf(buf), if reading => match read {
                Ok(0) | Err(_) => return Waited::Gone,
                // Enough read ahead: stop reading (and so stop noticing a departure).
                Ok(_) => reading = buf.len() <= max + 4096,
            },
        }
    }
}

/// Answers a CONNECT the guard will not forward; the connection is closed right after, so a
/// client that is already gone changes nothing.
async fn refuse_connect<W: AsyncWrite + Unpin>(
    client_tx: &mut W,
    codec: Codec,
    code: ConnectReturnCode,
) {
    let _ = client_tx.write_all(&codec.connack(code)).await; // closing either way
}

async fn connect_upstream(upstream: &Upstream) -> std::io::Result<TcpStream> {
    let give_up = Instant::now() + UPSTREAM_CONNECT_PATIENCE;
    loop {
        match TcpStream::connect(upstream.get()).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true); // latency only
                return Ok(stream);
            }
            Err(e) if Instant::now() >= give_up => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn is_transient_accept_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | OutOfMemory | Other
    ) || e.raw_os_error().is_some()
}
