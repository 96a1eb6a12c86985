//! The guard: the broker's public MQTT listeners, in front of rumqttd.
//!
//! rumqttd 0.20 authenticates a CONNECT but has no authorization at all (any client may
//! publish or subscribe anything), awaits every TLS handshake inside its accept loop (one
//! slow client stops all others from connecting), and only logs what it refuses. So the
//! public ports belong to the guard, and rumqttd listens on loopback ports only the guard
//! uses. Per connection the guard:
//!
//! 1. takes a slot of the connection limit, or closes the connection at once;
//! 2. does the TLS handshake (if configured) and reads the CONNECT, both within the
//!    listener's `connection_timeout_ms`, in the connection's own task;
//! 3. frames and decodes every packet the client sends with rumqttd's own codec
//!    (`rumqttd::protocol`), refusing anything that is not MQTT or exceeds
//!    `max_payload_size`;
//! 4. with credentials configured: refuses a CONNECT without login, whose client id is not
//!    its username or whose password is wrong, each with a CONNACK that says so (rumqttd's
//!    hook would only close the socket), and checks every PUBLISH, SUBSCRIBE and will
//!    against [`acl`];
//! 5. forwards the client's packets to rumqttd byte for byte (the CONNECT carries a token in
//!    place of the password it checked, see [`Authenticator::vouch`]), and copies rumqttd's
//!    answers back unchanged.
//!
//! A refused connection, an oversized packet and a denied topic each increment a counter in
//! [`IngestMetrics`] and are logged (rate-limited to one line a second per kind, with the
//! number held back).

pub mod acl;
pub mod tls;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{self, ConnAck, ConnectReturnCode, Packet, Protocol};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::auth::Authenticator;
use crate::metrics::IngestMetrics;
use crate::throttle::Throttle;

/// How long a connection waits for rumqttd's loopback listener (it is restarted after a
/// rumqttd panic, see `mqtt::rumqttd_panics`).
const UPSTREAM_CONNECT_PATIENCE: Duration = Duration::from_secs(5);
/// How long a finished client connection waits for rumqttd to close its side first.
const UPSTREAM_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The MQTT version of a listener, i.e. which codec frames its packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    V4,
    V5,
}

impl Codec {
    fn frame_len(self, buf: &[u8], max: usize) -> Result<usize, protocol::Error> {
        match self {
            Codec::V4 => protocol::v4::check(buf.iter(), max).map(|h| h.frame_length()),
            Codec::V5 => protocol::v5::check(buf.iter(), max).map(|h| h.frame_length()),
        }
    }

    fn decode(self, frame: &[u8], max: usize) -> Result<Packet, protocol::Error> {
        let mut frame = BytesMut::from(frame);
        match self {
            Codec::V4 => protocol::v4::V4.read_mut(&mut frame, max),
            Codec::V5 => protocol::v5::V5.read_mut(&mut frame, max),
        }
    }

    fn encode(self, packet: Packet) -> Result<BytesMut, protocol::Error> {
        let mut out = BytesMut::new();
        match self {
            Codec::V4 => protocol::v4::V4.write(packet, &mut out),
            Codec::V5 => protocol::v5::V5.write(packet, &mut out),
        }?;
        Ok(out)
    }

    fn connack(self, code: ConnectReturnCode) -> BytesMut {
        let mut out = BytesMut::new();
        let packet = Packet::ConnAck(
            ConnAck {
                session_present: false,
                code,
            },
            None,
        );
        let written = match self {
            Codec::V4 => protocol::v4::V4.write(packet, &mut out),
            Codec::V5 => protocol::v5::V5.write(packet, &mut out),
        };
        if written.is_err() {
            out.clear(); // the connection is closed right after; no CONNACK is still a refusal
        }
        out
    }
}

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
enum End {
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
struct Peer {
    client_id: String,
    /// The device the topic rules are checked against (`None` in anonymous mode).
    device: Option<String>,
}

impl Guard {
    pub fn new(
        auth: Option<Arc<Authenticator>>,
        max_connections: usize,
        metrics: Arc<IngestMetrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            auth,
            connections: Arc::new(Semaphore::new(max_connections)),
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
            let Ok(slot) = self.connections.clone().try_acquire_owned() else {
                self.report(
                    &config.name,
                    &addr,
                    None,
                    End::Refused("connection limit reached (router.max_connections)".into()),
                );
                continue; // dropping the stream closes it
            };
            let _ = stream.set_nodelay(true); // latency only; failure changes nothing else
            tokio::spawn(self.clone().connection(stream, addr, config.clone(), slot));
        }
    }

    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        addr: SocketAddr,
        config: Arc<GuardedListener>,
        _slot: OwnedSemaphorePermit,
    ) {
        let _open = OpenConnection::count(&self.metrics);
        let deadline = Instant::now() + config.connect_timeout;
        let (end, peer) = match &config.tls {
            Some(acceptor) => {
                match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => self.session(tls, &config, deadline).await,
                    Ok(Err(e)) => (End::Refused(format!("TLS handshake failed: {e}")), None),
                    Err(_) => (
                        End::Refused("no TLS handshake within connection_timeout_ms".into()),
                        None,
                    ),
                }
            }
            None => self.session(stream, &config, deadline).await,
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
                tracing::warn!(listener, peer = %addr, client_id = %client_id, denied = %what.escape_debug(), suppressed, "MQTT client used a topic outside its own; disconnected")
            }
            End::Closed | End::Revoked => {}
        }
    }

    /// Reads the CONNECT, vets it, opens the upstream connection and relays until either side
    /// closes. Returns how it ended and, once known, who the client was.
    async fn session<S>(
        &self,
        client: S,
        config: &GuardedListener,
        deadline: Instant,
    ) -> (End, Option<Peer>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (mut client_rx, mut client_tx) = tokio::io::split(client);
        let mut buf = BytesMut::with_capacity(1024);
        let max = config.max_packet_size;
        let first = tokio::time::timeout_at(
            deadline,
            next_frame(&mut client_rx, &mut buf, config.codec, max),
        )
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
        let (fields, properties, will, will_properties, login) =
            match config.codec.decode(&connect, max) {
                Ok(Packet::Connect(fields, properties, will, will_properties, login)) => {
                    (fields, properties, will, will_properties, login)
                }
                Ok(_) => return (End::Refused("first packet is not CONNECT".into()), None),
                Err(e) => return (End::Refused(format!("invalid CONNECT: {e}")), None),
            };
        let will_topic = will
            .as_ref()
            .map(|w| String::from_utf8_lossy(&w.topic).into_owned());
        let mut peer = Peer {
            client_id: fields.client_id.clone(),
            device: None,
        };
        // rumqttd refuses these only after registering the client, which can break its
        // listener (upstream issue #1062); refuse them here instead.
        if peer.client_id.contains(['/', '+', '#', '$'])
            || peer.client_id.contains(char::is_control)
        {
            refuse_connect(
                &mut client_tx,
                config.codec,
                ConnectReturnCode::ClientIdentifierNotValid,
            )
            .await;
            return (
                End::Refused("client id contains '/', '+', '#', '$' or a control character".into()),
                Some(peer),
            );
        }
        let mut connect = connect;
        if let Some(auth) = &self.auth {
            let Some(protocol::Login { username, password }) = login else {
                refuse_connect(
                    &mut client_tx,
                    config.codec,
                    ConnectReturnCode::BadUserNamePassword,
                )
                .await;
                return (End::Unauthenticated("no username and password"), Some(peer));
            };
            if username != peer.client_id {
                refuse_connect(
                    &mut client_tx,
                    config.codec,
                    ConnectReturnCode::ClientIdentifierNotValid,
                )
                .await;
                return (
                    End::Unauthenticated("client id must equal the username"),
                    Some(peer),
                );
            }
            if let Some(topic) = will_topic.filter(|t| !acl::may_publish(&username, t)) {
                refuse_connect(
                    &mut client_tx,
                    config.codec,
                    ConnectReturnCode::NotAuthorized,
                )
                .await;
                return (End::Denied(format!("will topic {topic}")), Some(peer));
            }
            // Checked here, not only by rumqttd's hook, so that a wrong password gets a
            // CONNACK saying so instead of a closed socket. rumqttd gets a token in place of
            // the password and does not hash it again.
            let vouched = match auth.vouch(&peer.client_id, &username, password).await {
                Ok(token) => token,
                Err(refusal) => {
                    refuse_connect(
                        &mut client_tx,
                        config.codec,
                        ConnectReturnCode::BadUserNamePassword,
                    )
                    .await;
                    return (End::Unauthenticated(refusal.reason()), Some(peer));
                }
            };
            let login = protocol::Login {
                username: username.clone(),
                password: vouched.to_owned(),
            };
            let rewritten = Packet::Connect(fields, properties, will, will_properties, Some(login));
            match config.codec.encode(rewritten) {
                Ok(rewritten) => connect = rewritten.freeze(),
                Err(e) => return (End::Refused(format!("invalid CONNECT: {e}")), Some(peer)),
            }
            peer.device = Some(username);
        }

        let mut upstream = match connect_upstream(&config.upstream).await {
            Ok(upstream) => upstream,
            Err(e) => {
                tracing::error!(listener = %config.name, upstream = %config.upstream.get(), error = %e, "rumqttd's loopback listener is unreachable");
                refuse_connect(
                    &mut client_tx,
                    config.codec,
                    ConnectReturnCode::ServiceUnavailable,
                )
                .await;
                return (End::Closed, Some(peer));
            }
        };
        if upstream.write_all(&connect).await.is_err() {
            return (End::Closed, Some(peer));
        }
        let (mut upstream_rx, mut upstream_tx) = upstream.into_split();

        // rumqttd → client: unchanged.
        let downstream = tokio::io::copy(&mut upstream_rx, &mut client_tx);
        // client → rumqttd: packet by packet, checked; every packet already received goes
        // out in one write (one syscall per read, not per packet, under a burst).
        let checked = async {
            let mut aliases = std::collections::HashMap::<u16, String>::new();
            let mut checked = BytesMut::new();
            loop {
                let mut frame = next_frame(&mut client_rx, &mut buf, config.codec, max).await;
                loop {
                    let frame_bytes = match frame {
                        Ok(Some(frame)) => frame,
                        Ok(None) => return End::Closed,
                        Err(FrameError::Oversized(n)) => return End::Oversized(n),
                        Err(FrameError::Io(_)) => return End::Closed,
                        Err(e) => return End::Refused(format!("not MQTT: {e}")),
                    };
                    if let Some(device) = &peer.device {
                        match config.codec.decode(&frame_bytes, max) {
                            Ok(packet) => {
                                if let Err(denied) = authorize(device, &packet, &mut aliases) {
                                    return denied;
                                }
                            }
                            Err(e) => return End::Refused(format!("malformed packet: {e}")),
                        }
                    }
                    checked.extend_from_slice(&frame_bytes);
                    frame = match buffered_frame(&buf, config.codec, max) {
                        Ok(Some(len)) => Ok(Some(buf.split_to(len).freeze())),
                        Ok(None) => break,
                        Err(e) => Err(e),
                    };
                }
                if upstream_tx.write_all(&checked).await.is_err() {
                    return End::Closed;
                }
                checked.clear();
            }
        };
        let revoked = async {
            match (&self.auth, &peer.device) {
                (Some(auth), Some(device)) => {
                    let mut changes = auth.subscribe_changes();
                    while changes.changed().await.is_ok() {
                        if !auth.knows(device) {
                            return;
                        }
                    }
                    std::future::pending().await
                }
                _ => std::future::pending().await,
            }
        };
        tokio::pin!(downstream);
        let end = tokio::select! {
            _ = &mut downstream => End::Closed,
            end = checked => {
                if matches!(end, End::Closed) {
                    // Let rumqttd close first. It reuses connection ids at once, and if the
                    // upstream socket closed while its router still handled the client's
                    // DISCONNECT, the connection task would send a second, late disconnect
                    // for an id the next client may already have, dropping that client. After
                    // a DISCONNECT rumqttd closes within milliseconds; a client that simply
                    // vanished is closed after the grace.
                    let _ = tokio::time::timeout(UPSTREAM_CLOSE_GRACE, &mut downstream).await;
                }
                end
            }
            () = revoked => End::Revoked,
        };
        (end, Some(peer))
    }
}

/// Checks one packet of an authenticated device against the topic rules.
fn authorize(
    device: &str,
    packet: &Packet,
    aliases: &mut std::collections::HashMap<u16, String>,
) -> Result<(), End> {
    match packet {
        Packet::Publish(publish, properties) => {
            let alias = properties.as_ref().and_then(|p| p.topic_alias);
            let topic = match (publish.topic.is_empty(), alias) {
                (false, alias) => {
                    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                    if let Some(alias) = alias {
                        aliases.insert(alias, topic.clone());
                    }
                    topic
                }
                (true, Some(alias)) => aliases.get(&alias).cloned().unwrap_or_default(),
                (true, None) => String::new(),
            };
            if acl::may_publish(device, &topic) {
                Ok(())
            } else {
                Err(End::Denied(format!("publish to {topic}")))
            }
        }
        Packet::Subscribe(subscribe, _) => {
            match subscribe
                .filters
                .iter()
                .find(|f| !acl::may_subscribe(device, &f.path))
            {
                Some(filter) => Err(End::Denied(format!("subscribe to {}", filter.path))),
                None => Ok(()),
            }
        }
        Packet::Connect(..) => Err(End::Refused("second CONNECT".into())),
        _ => Ok(()),
    }
}

#[derive(Debug, thiserror::Error)]
enum FrameError {
    #[error("packet of {0} bytes exceeds max_payload_size")]
    Oversized(usize),
    #[error("{0}")]
    Protocol(protocol::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The length of the complete packet at the start of `buf`, `None` if more bytes are needed.
fn buffered_frame(buf: &[u8], codec: Codec, max: usize) -> Result<Option<usize>, FrameError> {
    match codec.frame_len(buf, max) {
        Ok(len) => Ok(Some(len)),
        Err(protocol::Error::InsufficientBytes(_)) => Ok(None),
        Err(protocol::Error::PayloadSizeLimitExceeded(n)) => Err(FrameError::Oversized(n)),
        Err(e) => Err(FrameError::Protocol(e)),
    }
}

/// The next complete packet (fixed header included), or `None` at a clean end of stream.
/// Reads at most one packet plus 4 KiB ahead, so a client cannot make the guard buffer more
/// than `max` bytes.
async fn next_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    codec: Codec,
    max: usize,
) -> Result<Option<Bytes>, FrameError> {
    loop {
        if let Some(len) = buffered_frame(buf, codec, max)? {
            return Ok(Some(buf.split_to(len).freeze()));
        }
        buf.reserve(4096);
        if reader.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()))
            };
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
