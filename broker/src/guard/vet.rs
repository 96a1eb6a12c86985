//! Vetting a CONNECT: everything the guard decides about a new client from its first packet
//! alone, without I/O. The password itself is checked afterwards (it takes a thread, see
//! [`crate::auth::checks`]); what goes to rumqttd is then built by [`Admitted::upstream_connect`].

use bytes::Bytes;
use rumqttd::protocol::{
    Connect, ConnectProperties, ConnectReturnCode, LastWill, LastWillProperties, Login, Packet,
};

use super::acl;
use super::framing::Codec;
use super::End;
use crate::rumqttd_quirks;

/// The keep-alive rumqttd is told for a client that turned keep-alive off (0 seconds): rumqttd
/// 0.20 refuses 0, which MQTT allows (3.1.1 §3.1.2.10), so the guard asks for this instead and
/// pings rumqttd itself every [`KEEP_ALIVE_PING`](super::relay::KEEP_ALIVE_PING).
pub const STAND_IN_KEEP_ALIVE_SECS: u16 = 60;

/// A CONNECT the guard lets through, pending the password check.
#[derive(Debug)]
pub struct Admitted {
    pub client_id: String,
    /// The device whose topic rules apply; `None` without credentials (anonymous mode).
    pub device: Option<String>,
    /// The password to check, with credentials.
    pub password: Option<String>,
    /// The client sent keep-alive 0: the guard keeps the upstream session alive.
    pub keep_alive_off: bool,
    connect: Connect,
    properties: Option<ConnectProperties>,
    will: Option<LastWill>,
    will_properties: Option<LastWillProperties>,
    login: Option<Login>,
}

/// A refused CONNECT: the CONNACK code to answer with (if any) and how to count it.
#[derive(Debug)]
pub struct Refused {
    pub code: ConnectReturnCode,
    pub end: End,
    /// The client id, if the CONNECT got that far.
    pub client_id: Option<String>,
}

/// Judges a decoded first packet. `credentials` says whether devices must log in.
pub fn vet(packet: Packet, credentials: bool) -> Result<Admitted, Refused> {
    let Packet::Connect(mut connect, properties, will, will_properties, login) = packet else {
        return Err(Refused {
            code: ConnectReturnCode::ProtocolError,
            end: End::Refused("first packet is not CONNECT".into()),
            client_id: None,
        });
    };
    let client_id = connect.client_id.clone();
    let refuse = |code, end| Refused {
        code,
        end,
        client_id: Some(client_id.clone()),
    };
    if rumqttd_quirks::client_id::refused_late_by_rumqttd(&client_id)
        || client_id.contains(char::is_control)
    {
        return Err(refuse(
            ConnectReturnCode::ClientIdentifierNotValid,
            End::Refused("client id contains '/', '+', '#', '$' or a control character".into()),
        ));
    }
    let keep_alive_off = connect.keep_alive == 0;
    if keep_alive_off {
        connect.keep_alive = STAND_IN_KEEP_ALIVE_SECS;
    }
    let (device, password) = if credentials {
        let Some(Login { username, password }) = &login else {
            return Err(refuse(
                ConnectReturnCode::BadUserNamePassword,
                End::Unauthenticated("no username and password"),
            ));
        };
        if *username != client_id {
            return Err(refuse(
                ConnectReturnCode::ClientIdentifierNotValid,
                End::Unauthenticated("client id must equal the username"),
            ));
        }
        if let Some(will) = &will {
            let topic = String::from_utf8_lossy(&will.topic);
            if !acl::may_publish(username, &topic) {
                return Err(refuse(
                    ConnectReturnCode::NotAuthorized,
                    End::Denied(format!("will topic {topic}")),
                ));
            }
        }
        (Some(username.clone()), Some(password.clone()))
    } else {
        (None, None)
    };
    Ok(Admitted {
        client_id,
        device,
        password,
        keep_alive_off,
        connect,
        properties,
        will,
        will_properties,
        login,
    })
}

impl Admitted {
    /// The CONNECT for rumqttd: the client's own bytes when nothing changed, else re-encoded
    /// with `vouched` in place of the checked password and the stand-in keep-alive.
    pub fn upstream_connect(
        self,
        original: Bytes,
        codec: Codec,
        vouched: Option<&str>,
    ) -> Result<Bytes, rumqttd::protocol::Error> {
        if vouched.is_none() && !self.keep_alive_off {
            return Ok(original);
        }
        let login = match (self.login, vouched) {
            (Some(login), Some(token)) => Some(Login {
                username: login.username,
                password: token.to_owned(),
            }),
            (login, _) => login,
        };
        let packet = Packet::Connect(
            self.connect,
            self.properties,
            self.will,
            self.will_properties,
            login,
        );
        codec.encode(packet).map(|b| b.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::QoS;

    fn connect(client_id: &str, keep_alive: u16, login: Option<(&str, &str)>) -> Packet {
        Packet::Connect(
            Connect {
                keep_alive,
                client_id: client_id.into(),
                clean_session: true,
            },
            None,
            None,
            None,
            login.map(|(username, password)| Login {
                username: username.into(),
                password: password.into(),
            }),
        )
    }

    fn with_will(packet: Packet, topic: &str) -> Packet {
        let Packet::Connect(c, p, _, wp, l) = packet else {
            unreachable!()
        };
        let will = LastWill {
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            message: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
        };
        Packet::Connect(c, p, Some(will), wp, l)
    }

    fn refusal(result: Result<Admitted, Refused>) -> (ConnectReturnCode, String) {
        let refused = result.expect_err("refused");
        (refused.code, format!("{:?}", refused.end))
    }

    #[test]
    fn a_device_logs_in_as_itself() {
        let admitted = vet(connect("pi-1", 30, Some(("pi-1", "pw"))), true).unwrap();
        assert_eq!(admitted.device.as_deref(), Some("pi-1"));
        assert_eq!(admitted.password.as_deref(), Some("pw"));
        assert!(!admitted.keep_alive_off);

        let (code, end) = refusal(vet(connect("pi-1", 30, None), true));
        assert_eq!(code, ConnectReturnCode::BadUserNamePassword);
        assert!(end.contains("no username"), "{end}");
        let (code, end) = refusal(vet(connect("pi-2", 30, Some(("pi-1", "pw"))), true));
        assert_eq!(code, ConnectReturnCode::ClientIdentifierNotValid);
        assert!(end.contains("must equal"), "{end}");
    }

    #[test]
    fn client_ids_that_break_rumqttd_are_refused_in_every_mode() {
        for bad in ["a/b", "a+", "#", "$SYS", "a\u{7}b"] {
            for credentials in [false, true] {
                let (code, _) = refusal(vet(connect(bad, 30, Some((bad, "pw"))), credentials));
                assert_eq!(code, ConnectReturnCode::ClientIdentifierNotValid, "{bad:?}");
            }
        }
    }

    #[test]
    fn wills_only_on_the_devices_own_topics() {
        let own = with_will(connect("pi-1", 30, Some(("pi-1", "pw"))), "co2/pi-1/status");
        assert!(vet(own, true).is_ok());
        let other = with_will(connect("pi-1", 30, Some(("pi-1", "pw"))), "co2/pi-2");
        let (code, end) = refusal(vet(other, true));
        assert_eq!(code, ConnectReturnCode::NotAuthorized);
        assert!(end.contains("will topic co2/pi-2"), "{end}");
        let anonymous = with_will(connect("x", 30, None), "anything");
        assert!(vet(anonymous, false).is_ok());
        // A will is a publish like any other: not on the device's acks (it would forge a
        // storage ack), not with wildcards, not on another device's subtree.
        for topic in ["ack/pi-1", "co2/pi-1/#", "co2/+", "co2/pi-10", "", "$SYS/x"] {
            let will = with_will(connect("pi-1", 30, Some(("pi-1", "pw"))), topic);
            let (code, end) = refusal(vet(will, true));
            assert_eq!(code, ConnectReturnCode::NotAuthorized, "{topic:?}");
            assert!(end.contains(&format!("will topic {topic}")), "{end}");
        }
        // The will is kept for rumqttd as the client sent it.
        let own = with_will(connect("pi-1", 30, Some(("pi-1", "pw"))), "co2/pi-1");
        let admitted = vet(own, true).unwrap();
        let Packet::Connect(_, _, Some(will), _, _) = Codec::V4
            .decode(
                &admitted
                    .upstream_connect(Bytes::new(), Codec::V4, Some("token"))
                    .unwrap(),
                1024,
            )
            .unwrap()
        else {
            panic!("the will was lost");
        };
        assert_eq!(&will.topic[..], b"co2/pi-1");
        assert_eq!(&will.message[..], b"gone");
    }

    #[test]
    fn client_id_checks_come_before_the_password_and_name_the_client() {
        // The refusal carries the client id (for the log) even when it is unusable.
        let refused = vet(connect("a/b", 30, None), false).unwrap_err();
        assert_eq!(refused.client_id.as_deref(), Some("a/b"));
        // A bad client id is refused as such, not as a missing login.
        let (code, _) = refusal(vet(connect("a#", 30, None), true));
        assert_eq!(code, ConnectReturnCode::ClientIdentifierNotValid);
        // Characters rumqttd handles are fine, with or without credentials.
        for good in ["pi-1", "Pi_7.kitchen-2", "pi 1", "ü-sensor"] {
            assert!(vet(connect(good, 30, None), false).is_ok(), "{good:?}");
            let admitted = vet(connect(good, 30, Some((good, "pw"))), true).unwrap();
            assert_eq!(admitted.device.as_deref(), Some(good));
        }
        // NUL and DEL are control characters too.
        for bad in ["a\0b", "a\u{7f}"] {
            let (code, _) = refusal(vet(connect(bad, 30, None), false));
            assert_eq!(code, ConnectReturnCode::ClientIdentifierNotValid, "{bad:?}");
        }
    }

    #[test]
    fn a_second_packet_type_is_not_a_connect() {
        let (code, _) = refusal(vet(Packet::PingReq(rumqttd::protocol::PingReq), false));
        assert_eq!(code, ConnectReturnCode::ProtocolError);
    }

    #[test]
    fn keep_alive_zero_is_replaced_upstream_and_the_password_by_the_token() {
        for codec in [Codec::V4, Codec::V5] {
            let packet = connect("pi-1", 0, Some(("pi-1", "secret")));
            let original = codec.encode(packet.clone()).unwrap().freeze();
            let admitted = vet(packet, true).unwrap();
            assert!(admitted.keep_alive_off);
            let upstream = admitted
                .upstream_connect(original.clone(), codec, Some("token"))
                .unwrap();
            let Packet::Connect(c, _, _, _, Some(login)) = codec.decode(&upstream, 1024).unwrap()
            else {
                panic!("not a CONNECT with login");
            };
            assert_eq!(c.keep_alive, STAND_IN_KEEP_ALIVE_SECS);
            assert_eq!(
                (login.username.as_str(), login.password.as_str()),
                ("pi-1", "token")
            );

            // Nothing to change: the client's own bytes go through.
            let plain = connect("x", 30, None);
            let original = codec.encode(plain.clone()).unwrap().freeze();
            let admitted = vet(plain, false).unwrap();
            let upstream = admitted
                .upstream_connect(original.clone(), codec, None)
                .unwrap();
            assert_eq!(upstream, original);
        }
    }
}
