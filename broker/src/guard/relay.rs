//! Relaying an admitted connection: the client's packets to rumqttd one by one, checked, and
//! rumqttd's packets back to the client frame by frame, with the few packets the guard
//! answers or sends itself fitted in between whole frames.
//!
//! The guard answers itself for a PUBLISH larger than `max_payload_size`: it is read through
//! (not buffered), recorded in `rejected_messages` as too large, and acknowledged, MQTT 5 with
//! a refusing reason code. Disconnecting instead would wedge the client: it resends the same
//! message after every reconnect, for ever. And it keeps rumqttd's session alive for a client
//! that turned keep-alive off, which rumqttd 0.20 does not allow.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{Packet, Publish, PublishProperties};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::framing::{
    buffered_frame, drain_oversized, next_frame, Codec, FrameError, OversizedPublish, PINGREQ,
    PINGRESP,
};
use super::{acl, End, Guard, GuardedListener, Peer};
use crate::ingest::record::{Record, Rejection};
use crate::rumqttd_quirks::close_grace::UPSTREAM_CLOSE_GRACE;

/// How often the guard pings rumqttd for a client without keep-alive (well within the
/// stand-in keep-alive, which rumqttd enforces at 1.5 times).
pub const KEEP_ALIVE_PING: Duration = Duration::from_secs(30);
/// Oversized PUBLISHes up to this size are read through and recorded; a bigger packet is no
/// reading gone wrong and costs the connection.
pub const OVERSIZED_READ_THROUGH: usize = 1 << 20;
/// Largest packet rumqttd may send to a client (the MQTT maximum); only frames the stream.
const DOWNSTREAM_MAX: usize = 268_435_455;

/// MQTT 5 topic aliases the client set up on this connection: a PUBLISH with an empty topic
/// means the topic last sent with its alias, and that is what the rules must judge.
#[derive(Debug, Default)]
pub struct TopicAliases(HashMap<u16, String>);

impl TopicAliases {
    /// The topic a PUBLISH goes to, remembering an alias it defines.
    pub fn resolve(&mut self, publish: &Publish, properties: Option<&PublishProperties>) -> String {
        let alias = properties.and_then(|p| p.topic_alias);
        if publish.topic.is_empty() {
            return alias
                .and_then(|a| self.0.get(&a).cloned())
                .unwrap_or_default();
        }
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        if let Some(alias) = alias {
            self.0.insert(alias, topic.clone());
        }
        topic
    }
}

/// Relays until either side closes, the client breaks a rule, or its device is revoked.
/// `buf` holds what the client sent after its CONNECT.
#[allow(clippy::too_many_arguments)]
pub async fn relay<R, W>(
    guard: &Guard,
    config: &GuardedListener,
    peer: &Peer,
    keep_alive_off: bool,
    mut client_rx: R,
    client_tx: W,
    mut buf: BytesMut,
    upstream: TcpStream,
) -> End
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let (upstream_rx, mut upstream_tx) = upstream.into_split();
    // Packets the guard answers itself; a few at most wait (the client waits for them).
    let (answers_tx, answers_rx) = mpsc::channel::<BytesMut>(8);
    let pings_owed = AtomicU32::new(0);
    let downstream = downstream(
        upstream_rx,
        client_tx,
        config.codec,
        answers_rx,
        &pings_owed,
    );
    let codec = config.codec;
    let max = config.max_packet_size;
    // client → rumqttd: packet by packet, checked; every packet already received goes out in
    // one write (one syscall per read, not per packet, under a burst).
    let checked = async {
        let mut aliases = TopicAliases::default();
        let mut checked = BytesMut::new();
        let mut ping = tokio::time::interval(KEEP_ALIVE_PING);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.reset();
        loop {
            let mut frame = tokio::select! {
                frame = next_frame(&mut client_rx, &mut buf, codec, max) => frame,
                _ = ping.tick(), if keep_alive_off => {
                    pings_owed.fetch_add(1, Ordering::Relaxed);
                    if upstream_tx.write_all(&PINGREQ).await.is_err() {
                        return End::Closed;
                    }
                    continue;
                }
            };
            loop {
                let frame_bytes = match frame {
                    Ok(Some(frame)) => frame,
                    Ok(None) | Err(FrameError::Io(_)) => return End::Closed,
                    Err(FrameError::Oversized(size)) => {
                        // What came before goes first.
                        if upstream_tx.write_all(&checked).await.is_err() {
                            return End::Closed;
                        }
                        checked.clear();
                        match answer_oversized(guard, config, peer, &mut client_rx, &mut buf, size)
                            .await
                        {
                            Ok(Some(answer)) => {
                                if answers_tx.send(answer).await.is_err() {
                                    return End::Closed;
                                }
                            }
                            Ok(None) => {}
                            Err(end) => return end,
                        }
                        break;
                    }
                    Err(e) => return End::Refused(format!("not MQTT: {e}")),
                };
                if let Err(end) = check(guard, peer, codec, max, &frame_bytes, &mut aliases) {
                    return end;
                }
                checked.extend_from_slice(&frame_bytes);
                frame = match buffered_frame(&buf, codec, max) {
                    Ok(Some(len)) => Ok(Some(buf.split_to(len).freeze())),
                    Ok(None) => break,
                    Err(e) => Err(e),
                };
            }
            if !checked.is_empty() {
                if upstream_tx.write_all(&checked).await.is_err() {
                    return End::Closed;
                }
                checked.clear();
            }
        }
    };
    let revoked = async {
        match (&guard.auth, &peer.device) {
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
    tokio::select! {
        _ = &mut downstream => End::Closed,
        end = checked => {
            if matches!(end, End::Closed) {
                // Let rumqttd close first (see the quirk's module).
                let _ = tokio::time::timeout(UPSTREAM_CLOSE_GRACE, &mut downstream).await;
            }
            end
        }
        () = revoked => End::Revoked,
    }
}

/// Checks one packet against the topic rules (with credentials) and the subscription budget.
fn check(
    guard: &Guard,
    peer: &Peer,
    codec: Codec,
    max: usize,
    frame: &Bytes,
    aliases: &mut TopicAliases,
) -> Result<(), End> {
    // Only these packet types are judged; the rest (acks, pings, DISCONNECT) goes through
    // without decoding, which is most of a busy device's traffic besides its PUBLISHes.
    let kind = frame.first().map_or(0, |b| b >> 4);
    let judged = match kind {
        1 | 8 => true,              // a second CONNECT, SUBSCRIBE
        3 => peer.device.is_some(), // PUBLISH: topic rules with credentials only
        _ => false,
    };
    if !judged {
        return Ok(());
    }
    let packet = codec
        .decode(frame, max)
        .map_err(|e| End::Refused(format!("malformed packet: {e}")))?;
    match &packet {
        Packet::Connect(..) => Err(End::Refused("second CONNECT".into())),
        Packet::Publish(publish, properties) => {
            let topic = aliases.resolve(publish, properties.as_ref());
            match &peer.device {
                Some(device) if !acl::may_publish(device, &topic) => {
                    Err(End::Denied(format!("publish to {topic}")))
                }
                _ => Ok(()),
            }
        }
        Packet::Subscribe(subscribe, _) => {
            if let Some(device) = &peer.device {
                if let Some(filter) = subscribe
                    .filters
                    .iter()
                    .find(|f| !acl::may_subscribe(device, &f.path))
                {
                    return Err(End::Denied(format!("subscribe to {}", filter.path)));
                }
            }
            guard
                .subscriptions
                .admit(peer.subscriber(), subscribe.filters.iter().map(|f| &f.path))
        }
        _ => Ok(()),
    }
}

/// Reads an oversized packet through. A PUBLISH on a topic the client may use is recorded
/// as rejected and, at QoS 1, acknowledged (returned: the answer to send); anything else
/// costs the connection, as does a QoS 2 PUBLISH (whose exchange the guard cannot finish
/// for rumqttd) and anything over [`OVERSIZED_READ_THROUGH`].
async fn answer_oversized<R: AsyncRead + Unpin>(
    guard: &Guard,
    config: &GuardedListener,
    peer: &Peer,
    client_rx: &mut R,
    buf: &mut BytesMut,
    size: usize,
) -> Result<Option<BytesMut>, End> {
    if size > OVERSIZED_READ_THROUGH {
        return Err(End::Oversized(size));
    }
    let publish = match drain_oversized(
        client_rx,
        buf,
        config.codec,
        size,
        Rejection::MAX_PAYLOAD_BYTES,
    )
    .await
    {
        Ok(Some(publish)) if publish.qos < 2 => publish,
        Ok(_) => return Err(End::Oversized(size)),
        Err(_) => return Err(End::Closed),
    };
    if let Some(device) = &peer.device {
        if !acl::may_publish(device, &publish.topic) {
            return Err(End::Denied(format!("publish to {}", publish.topic)));
        }
    }
    let reason = format!(
        "packet of {size} bytes exceeds max_payload_size ({} bytes) of listener {}",
        config.max_packet_size, config.name
    );
    guard
        .record_oversized(&config.name, peer, &publish, &reason)
        .await?;
    Ok((publish.qos == 1).then(|| config.codec.puback(publish.pkid, &reason)))
}

/// rumqttd → client, whole frames at a time, with the guard's own answers in between and the
/// PINGRESPs to the guard's own pings left out.
async fn downstream<W: AsyncWrite + Unpin>(
    mut upstream_rx: OwnedReadHalf,
    mut client_tx: W,
    codec: Codec,
    mut answers: mpsc::Receiver<BytesMut>,
    pings_owed: &AtomicU32,
) {
    let mut buf = BytesMut::with_capacity(8192);
    let mut answers_open = true;
    loop {
        tokio::select! {
            answer = answers.recv(), if answers_open => match answer {
                Some(answer) => {
                    if client_tx.write_all(&answer).await.is_err() {
                        return;
                    }
                }
                None => answers_open = false,
            },
            read = upstream_rx.read_buf(&mut buf) => {
                if !matches!(read, Ok(n) if n > 0) {
                    let _ = client_tx.shutdown().await; // closing either way
                    return;
                }
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(8192);
                }
                let mut start = 0;
                let mut end = 0;
                loop {
                    match buffered_frame(&buf[end..], codec, DOWNSTREAM_MAX) {
                        Ok(Some(len)) => {
                            let frame = &buf[end..end + len];
                            if frame == PINGRESP && take_owed(pings_owed) {
                                if client_tx.write_all(&buf[start..end]).await.is_err() {
                                    return;
                                }
                                start = end + len;
                            }
                            end += len;
                        }
                        Ok(None) => break,
                        // rumqttd wrote something this codec cannot frame: pass it on as it is.
                        Err(_) => {
                            end = buf.len();
                            break;
                        }
                    }
                }
                if client_tx.write_all(&buf[start..end]).await.is_err() {
                    return;
                }
                let _ = buf.split_to(end);
            }
        }
    }
}

fn take_owed(pings_owed: &AtomicU32) -> bool {
    pings_owed
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

/// The distinct subscription filters each client has been let through with, and the bound on
/// them. rumqttd keeps a commit log for every distinct filter ever subscribed, for the rest of
/// its life (also after the client left), so the bound is per device for the process's
/// lifetime: resubscribing a filter it had is free, a new one beyond the bound is refused.
pub struct Subscriptions {
    per_client: std::sync::Mutex<HashMap<String, HashSet<String>>>,
    max_per_client: usize,
}

impl Subscriptions {
    pub fn new(max_per_client: usize) -> Self {
        Self {
            per_client: Default::default(),
            max_per_client,
        }
    }

    /// Admits `filters` for `client` (a device, or a client id without credentials), or says
    /// why not.
    pub fn admit<'a>(
        &self,
        client: &str,
        filters: impl Iterator<Item = &'a String>,
    ) -> Result<(), End> {
        let mut per_client = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
        let known = per_client.entry(client.to_owned()).or_default();
        let new: HashSet<&String> = filters.filter(|f| !known.contains(*f)).collect();
        if known.len() + new.len() > self.max_per_client {
            return Err(End::Denied(format!(
                "more than {} distinct subscription filters",
                self.max_per_client
            )));
        }
        known.extend(new.into_iter().cloned());
        Ok(())
    }
}

impl OversizedPublish {
    fn rejection(&self, reason: &str) -> Rejection {
        Rejection::new(
            chrono::Utc::now(),
            &self.topic,
            &self.payload_start,
            self.payload_bytes,
            reason,
        )
    }
}

impl Guard {
    /// Hands an oversized PUBLISH to the writer as a rejection; it waits for room in the
    /// writer's queue (only this client waits). Once the broker is shutting down the writer
    /// takes nothing new: the client is disconnected unanswered and sends it again later.
    async fn record_oversized(
        &self,
        listener: &str,
        peer: &Peer,
        publish: &OversizedPublish,
        reason: &str,
    ) -> Result<(), End> {
        use crate::metrics::IngestMetrics;
        let rejection = Record::Rejection(publish.rejection(reason));
        let Some(writer) = self.rejections.upgrade() else {
            return Err(End::Closed);
        };
        if writer.send(rejection).await.is_err() {
            return Err(End::Closed);
        }
        IngestMetrics::add(&self.metrics.received, 1);
        IngestMetrics::add(&self.metrics.rejected, 1);
        self.report_oversized(listener, peer, publish.payload_bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use rumqttd::protocol::{Connect, Filter, Login, QoS, Subscribe};

    use crate::metrics::IngestMetrics;

    const MAX: usize = 4096;

    /// A guard without credentials (the topic rules come from the peer's device) and its
    /// metrics; the writer's queue is never used by `check`.
    fn guard() -> Arc<Guard> {
        let (rejections, _) = mpsc::channel(1);
        Guard::new(None, 10, rejections, Arc::new(IngestMetrics::default()))
    }

    fn device(name: &str) -> Peer {
        Peer {
            client_id: name.into(),
            device: Some(name.into()),
        }
    }

    fn anonymous(client_id: &str) -> Peer {
        Peer {
            client_id: client_id.into(),
            device: None,
        }
    }

    fn frame(codec: Codec, packet: Packet) -> Bytes {
        codec.encode(packet).unwrap().freeze()
    }

    fn publish(codec: Codec, topic: &str, alias: Option<u16>) -> Bytes {
        let properties = alias.map(|a| PublishProperties {
            topic_alias: Some(a),
            ..Default::default()
        });
        let properties = if codec == Codec::V5 { properties } else { None };
        frame(
            codec,
            Packet::Publish(
                Publish::new(topic.to_owned(), "500".to_owned(), false),
                properties,
            ),
        )
    }

    fn subscribe(codec: Codec, filters: &[&str]) -> Bytes {
        let filters = filters
            .iter()
            .map(|f| Filter {
                path: (*f).into(),
                qos: QoS::AtLeastOnce,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: rumqttd::protocol::RetainForwardRule::OnEverySubscribe,
            })
            .collect();
        frame(
            codec,
            Packet::Subscribe(Subscribe { pkid: 1, filters }, None),
        )
    }

    fn judge(guard: &Guard, peer: &Peer, codec: Codec, frame: &Bytes) -> Result<(), String> {
        check(guard, peer, codec, MAX, frame, &mut TopicAliases::default())
            .map_err(|end| format!("{end:?}"))
    }

    #[test]
    fn a_second_connect_ends_the_connection_in_every_mode() {
        let guard = guard();
        for codec in [Codec::V4, Codec::V5] {
            let connect = frame(
                codec,
                Packet::Connect(
                    Connect {
                        keep_alive: 30,
                        client_id: "pi-1".into(),
                        clean_session: true,
                    },
                    None,
                    None,
                    None,
                    Some(Login {
                        username: "pi-1".into(),
                        password: "pw".into(),
                    }),
                ),
            );
            for peer in [device("pi-1"), anonymous("pi-1")] {
                let end = judge(&guard, &peer, codec, &connect).unwrap_err();
                assert_eq!(end, r#"Refused("second CONNECT")"#, "{codec:?}");
            }
        }
    }

    #[test]
    fn publishes_and_subscriptions_are_judged_against_the_device() {
        let guard = guard();
        let pi1 = device("pi-1");
        for codec in [Codec::V4, Codec::V5] {
            assert!(judge(&guard, &pi1, codec, &publish(codec, "co2/pi-1/k", None)).is_ok());
            let end = judge(&guard, &pi1, codec, &publish(codec, "co2/pi-2", None)).unwrap_err();
            assert_eq!(end, r#"Denied("publish to co2/pi-2")"#);
            assert!(judge(&guard, &pi1, codec, &subscribe(codec, &["ack/pi-1"])).is_ok());
            let end = judge(
                &guard,
                &pi1,
                codec,
                &subscribe(codec, &["ack/pi-1", "co2/#"]),
            )
            .unwrap_err();
            assert_eq!(end, r#"Denied("subscribe to co2/#")"#);
            // Without credentials nobody is anybody: topics go through unjudged.
            let anon = anonymous("x");
            assert!(judge(&guard, &anon, codec, &publish(codec, "co2/pi-2", None)).is_ok());
            assert!(judge(&guard, &anon, codec, &subscribe(codec, &["#"])).is_ok());
        }
        // Not MQTT where a packet is judged: refused, not passed on.
        let garbage = Bytes::from_static(&[0x30, 0x02, 0xFF, 0xFF]);
        let end = judge(&guard, &pi1, Codec::V4, &garbage).unwrap_err();
        assert!(end.starts_with(r#"Refused("malformed packet"#), "{end}");
    }

    #[test]
    fn an_alias_cannot_smuggle_a_foreign_topic_past_the_rules() {
        let guard = guard();
        let pi1 = device("pi-1");
        let codec = Codec::V5;
        let mut aliases = TopicAliases::default();
        let mut judge = |frame: Bytes| {
            check(&guard, &pi1, codec, MAX, &frame, &mut aliases).map_err(|e| format!("{e:?}"))
        };
        // An alias set on the device's own topic is judged as that topic when used.
        assert!(judge(publish(codec, "co2/pi-1", Some(1))).is_ok());
        assert!(judge(publish(codec, "", Some(1))).is_ok());
        // An alias never defined names no topic: denied, not passed to rumqttd to guess.
        assert_eq!(
            judge(publish(codec, "", Some(2))).unwrap_err(),
            r#"Denied("publish to ")"#
        );
        // Redefining the alias onto a foreign topic is judged by the new topic.
        assert_eq!(
            judge(publish(codec, "co2/pi-2", Some(1))).unwrap_err(),
            r#"Denied("publish to co2/pi-2")"#
        );
    }

    #[test]
    fn aliases_resolve_to_the_topic_they_were_set_with() {
        let mut aliases = TopicAliases::default();
        let with_alias = |n| PublishProperties {
            topic_alias: Some(n),
            ..Default::default()
        };
        let first = Publish::new("co2/pi-1", "1", false);
        let aliased = Publish::new("", "2", false);
        assert_eq!(aliases.resolve(&first, Some(&with_alias(3))), "co2/pi-1");
        assert_eq!(aliases.resolve(&aliased, Some(&with_alias(3))), "co2/pi-1");
        // An unknown alias, or none with an empty topic, is the empty topic: denied by the ACL.
        assert_eq!(aliases.resolve(&aliased, Some(&with_alias(4))), "");
        assert_eq!(aliases.resolve(&aliased, None), "");
        // Redefined.
        let other = Publish::new("co2/pi-1/x", "3", false);
        assert_eq!(aliases.resolve(&other, Some(&with_alias(3))), "co2/pi-1/x");
        assert_eq!(
            aliases.resolve(&aliased, Some(&with_alias(3))),
            "co2/pi-1/x"
        );
    }

    #[test]
    fn the_subscription_budget_counts_distinct_filters_per_client_for_good() {
        let subscriptions = Subscriptions::new(3);
        let filters = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let a = filters(&["ack/pi-1", "co2/pi-1"]);
        assert!(subscriptions.admit("pi-1", a.iter()).is_ok());
        assert!(subscriptions.admit("pi-1", a.iter()).is_ok(), "again: free");
        let b = filters(&["co2/pi-1/a", "co2/pi-1/b"]);
        assert!(subscriptions.admit("pi-1", b.iter()).is_err(), "4 > 3");
        let c = filters(&["co2/pi-1/a"]);
        assert!(subscriptions.admit("pi-1", c.iter()).is_ok());
        assert!(subscriptions.admit("pi-2", b.iter()).is_ok(), "per client");
    }
}
