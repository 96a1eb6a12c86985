//! MQTT framing for the guard: where a packet ends, decoding and encoding with rumqttd's own
//! codec (`rumqttd::protocol`, nothing copied), and the few packets the guard writes itself.

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{
    self, ConnAck, ConnectReturnCode, Packet, Protocol, PubAck, PubAckProperties, PubAckReason,
};
use tokio::io::{AsyncRead, AsyncReadExt};

/// PINGREQ and PINGRESP: fixed header only, the same in MQTT 3.1.1 and 5.
pub const PINGREQ: [u8; 2] = [0xC0, 0x00];
pub const PINGRESP: [u8; 2] = [0xD0, 0x00];

/// The MQTT version of a listener, i.e. which codec frames its packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    V4,
    V5,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The packet's remaining length, over the listener's `max_payload_size`.
    #[error("packet of {0} bytes exceeds max_payload_size")]
    Oversized(usize),
    #[error("{0}")]
    Protocol(protocol::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Codec {
    fn frame_len(self, buf: &[u8], max: usize) -> Result<usize, protocol::Error> {
        match self {
            Codec::V4 => protocol::v4::check(buf.iter(), max).map(|h| h.frame_length()),
            Codec::V5 => protocol::v5::check(buf.iter(), max).map(|h| h.frame_length()),
        }
    }

    pub fn decode(self, frame: &[u8], max: usize) -> Result<Packet, protocol::Error> {
        let mut frame = BytesMut::from(frame);
        match self {
            Codec::V4 => protocol::v4::V4.read_mut(&mut frame, max),
            Codec::V5 => protocol::v5::V5.read_mut(&mut frame, max),
        }
    }

    pub fn encode(self, packet: Packet) -> Result<BytesMut, protocol::Error> {
        let mut out = BytesMut::new();
        match self {
            Codec::V4 => protocol::v4::V4.write(packet, &mut out),
            Codec::V5 => protocol::v5::V5.write(packet, &mut out),
        }?;
        Ok(out)
    }

    /// A refusing CONNACK; empty if the code has no form in this version (the connection is
    /// closed right after, and no CONNACK is still a refusal).
    pub fn connack(self, code: ConnectReturnCode) -> BytesMut {
        let packet = Packet::ConnAck(
            ConnAck {
                session_present: false,
                code,
            },
            None,
        );
        self.encode(packet).unwrap_or_default()
    }

    /// "Server busy": MQTT 5 has a code for it, 3.1.1 only "server unavailable".
    pub fn busy(self) -> ConnectReturnCode {
        match self {
            Codec::V4 => ConnectReturnCode::ServiceUnavailable,
            Codec::V5 => ConnectReturnCode::ServerBusy,
        }
    }

    /// The PUBACK for a QoS 1 publish the guard answers itself. MQTT 5 carries `reason`
    /// (a refusal that ends the exchange: the client does not resend); 3.1.1 has no way to
    /// say anything but "received".
    pub fn puback(self, pkid: u16, refusal: &str) -> BytesMut {
        let (reason, properties) = match self {
            Codec::V4 => (PubAckReason::Success, None),
            Codec::V5 => (
                PubAckReason::QuotaExceeded,
                Some(PubAckProperties {
                    reason_string: Some(refusal.to_owned()),
                    user_properties: Vec::new(),
                }),
            ),
        };
        self.encode(Packet::PubAck(PubAck { pkid, reason }, properties))
            .unwrap_or_default()
    }
}

/// The length of the complete packet at the start of `buf`, `None` if more bytes are needed.
pub fn buffered_frame(buf: &[u8], codec: Codec, max: usize) -> Result<Option<usize>, FrameError> {
    match codec.frame_len(buf, max) {
        Ok(len) => Ok(Some(len)),
        Err(protocol::Error::InsufficientBytes(_)) => Ok(None),
        Err(protocol::Error::PayloadSizeLimitExceeded(n)) => Err(FrameError::Oversized(n)),
        Err(e) => Err(FrameError::Protocol(e)),
    }
}

/// The next complete packet (fixed header included), or `None` at a clean end of stream.
/// Reads at most one packet plus 4 KiB ahead, so a client cannot make the guard buffer more
/// than `max` bytes. Cancel-safe: bytes read stay in `buf`.
pub async fn next_frame<R: AsyncRead + Unpin>(
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

/// What the guard keeps of a PUBLISH too large to forward.
#[derive(Debug, PartialEq, Eq)]
pub struct OversizedPublish {
    pub topic: String,
    pub qos: u8,
    pub pkid: u16,
    /// The start of the payload, at most `keep` bytes.
    pub payload_start: Vec<u8>,
    pub payload_bytes: usize,
}

/// Reads the rest of an oversized packet whose fixed header starts `buf`: keeps its topic,
/// packet id and the first `keep` payload bytes if it is a PUBLISH, and reads and drops the
/// remainder without holding more than 64 KiB. `None` for any other packet type or a PUBLISH
/// whose header does not fit in 64 KiB (the caller then disconnects the client).
pub async fn drain_oversized<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    codec: Codec,
    remaining_len: usize,
    keep: usize,
) -> Result<Option<OversizedPublish>, FrameError> {
    const WINDOW: usize = 64 * 1024;
    let first = buf.first().copied().unwrap_or_default();
    if first >> 4 != 3 {
        return Ok(None);
    }
    let header_len = 1 + varint_len(remaining_len);
    let frame_len = header_len + remaining_len;
    let window = frame_len.min(header_len + WINDOW);
    while buf.len() < window {
        buf.reserve(window - buf.len());
        if reader.read_buf(buf).await? == 0 {
            return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
    let qos = (first >> 1) & 0b11;
    let body = &buf[header_len..window];
    let kept = parse_publish_start(body, codec, qos).map(|(topic, pkid, payload_at)| {
        let payload_start = body[payload_at..body.len().min(payload_at + keep)].to_vec();
        OversizedPublish {
            topic,
            qos,
            pkid,
            payload_start,
            payload_bytes: remaining_len - payload_at,
        }
    });
    // Drop the whole frame: what is in the buffer now, then the rest as it arrives.
    let in_buf = buf.len().min(frame_len);
    let _ = buf.split_to(in_buf);
    let mut left = frame_len - in_buf;
    let mut sink = [0u8; 8192];
    while left > 0 {
        let want = left.min(sink.len());
        let n = reader.read(&mut sink[..want]).await?;
        if n == 0 {
            return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        left -= n;
    }
    Ok(kept)
}

/// Topic, packet id (0 for QoS 0) and where the payload starts, from the variable header of a
/// PUBLISH (`body` is the packet after its fixed header, possibly cut short).
fn parse_publish_start(body: &[u8], codec: Codec, qos: u8) -> Option<(String, u16, usize)> {
    let topic_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let topic = body.get(2..2 + topic_len)?;
    let mut at = 2 + topic_len;
    let pkid = if qos > 0 {
        let pkid = u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]);
        at += 2;
        pkid
    } else {
        0
    };
    if codec == Codec::V5 {
        let (properties_len, len_bytes) = read_varint(body.get(at..)?)?;
        at += len_bytes + properties_len;
        if at > body.len() {
            return None;
        }
    }
    Some((String::from_utf8_lossy(topic).into_owned(), pkid, at))
}

fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// An MQTT variable byte integer: its value and how many bytes it took.
fn read_varint(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, byte) in bytes.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut value: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        loop {
            let mut byte = (value & 0x7F) as u8;
            value >>= 7;
            if value > 0 {
                byte |= 0x80;
            }
            bytes.push(byte);
            if value == 0 {
                return bytes;
            }
        }
    }

    /// A PUBLISH written out by hand (rumqttd's `Publish::new` is QoS 0 only).
    fn publish(codec: Codec, topic: &str, payload: Vec<u8>, pkid: u16) -> BytesMut {
        let qos = u8::from(pkid != 0);
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&pkid.to_be_bytes());
        }
        if codec == Codec::V5 {
            let content_type = [&[0x03, 0x00, 0x04][..], b"text"].concat();
            body.extend(varint(content_type.len()));
            body.extend(content_type);
        }
        body.extend(payload);
        let mut frame = BytesMut::from(&[0x30 | (qos << 1)][..]);
        frame.extend(varint(body.len()));
        frame.extend(body);
        frame
    }

    #[tokio::test]
    async fn an_oversized_publish_is_read_through_and_its_start_kept() {
        for codec in [Codec::V4, Codec::V5] {
            for pkid in [0u16, 7] {
                let payload = vec![b'9'; 100_000];
                let mut frame = publish(codec, "co2/pi-1", payload, pkid);
                frame.extend_from_slice(&PINGREQ); // the next packet must survive
                let mut buf = BytesMut::from(&frame[..10]);
                let mut rest = &frame[10..];
                let remaining = match buffered_frame(&buf, codec, 4096) {
                    Err(FrameError::Oversized(n)) => n,
                    other => panic!("{other:?}"),
                };
                let kept = drain_oversized(&mut rest, &mut buf, codec, remaining, 16)
                    .await
                    .unwrap()
                    .expect("a PUBLISH");
                assert_eq!(kept.topic, "co2/pi-1");
                assert_eq!((kept.qos, kept.pkid), (u8::from(pkid != 0), pkid));
                assert_eq!(kept.payload_start, vec![b'9'; 16]);
                assert_eq!(kept.payload_bytes, 100_000);
                let next = next_frame(&mut rest, &mut buf, codec, 4096).await.unwrap();
                assert_eq!(next.as_deref(), Some(&PINGREQ[..]), "{codec:?}");
            }
        }
    }

    #[test]
    fn varints() {
        for value in [
            0,
            127,
            128,
            16_383,
            16_384,
            2_097_151,
            2_097_152,
            268_435_455,
        ] {
            let bytes = varint(value);
            assert_eq!(read_varint(&bytes), Some((value, bytes.len())));
            assert_eq!(varint_len(value), bytes.len());
        }
    }
}
