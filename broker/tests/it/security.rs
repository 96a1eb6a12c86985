//! Security: device credentials, client-id binding, reload, topic rules, TLS, limits and safe
//! defaults, each tried with real MQTT clients (or raw sockets) over TCP against the broker.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use co2_broker::auth::credentials::{hash_password_with, Credentials};
use co2_broker::metrics::IngestMetrics;
use rumqttc::{AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Packet, QoS};
use std::io::Write as _;
use tokio::io::AsyncWriteExt;

use crate::support::broker::{config_file, BrokerProcess, TestBroker};
use crate::support::{db, eventually, unique_client_id};

/// Name of the credentials file the tests write into their temp dir.
const CREDENTIALS_FILE: &str = "devices.passwd";

/// Writes a credentials file with cheap Argon2 parameters (the hash string carries them).
pub(crate) fn credentials_file(dir: &Path, devices: &[(&str, &str)]) -> PathBuf {
    let cheap = argon2::Params::new(8, 1, 1, None).unwrap();
    let mut credentials = Credentials::default();
    for (device, password) in devices {
        credentials
            .set(device, hash_password_with(password, cheap.clone()).unwrap())
            .unwrap();
    }
    let path = dir.join(CREDENTIALS_FILE);
    credentials.save(&path).unwrap();
    path
}

pub(crate) fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}/co2.db?mode=rwc", dir.display())
}

/// An in-process broker on SQLite in `dir` that knows exactly `devices`.
pub(crate) async fn broker_with_devices(dir: &Path, devices: &[(&str, &str)]) -> TestBroker {
    let creds = credentials_file(dir, devices);
    TestBroker::start_with(
        &sqlite_url(dir),
        &format!("credentials_file = {:?}", creds.display().to_string()),
    )
    .await
}

pub(crate) struct Login<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: &'a str,
}

pub(crate) fn device<'a>(id: &'a str, password: &'static str) -> Login<'a> {
    Login {
        client_id: id,
        username: Some(id),
        password,
    }
}

/// Connects and waits for the CONNACK; Err describes the refusal.
pub(crate) async fn connect(
    addr: SocketAddr,
    login: &Login<'_>,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<(AsyncClient, EventLoop), String> {
    let mut options = MqttOptions::new(login.client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(1 << 20, 1 << 20);
    if let Some(username) = login.username {
        options.set_credentials(username, login.password);
    }
    if let Some(tls) = tls {
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
    }
    let (client, mut events) = AsyncClient::new(options, 100);
    let connack = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => return Ok(ack.code),
                Ok(_) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "no CONNACK within 10 s".to_string())??;
    match connack {
        ConnectReturnCode::Success => Ok((client, events)),
        refused => Err(format!("{refused:?}")),
    }
}

/// Publishes at QoS 1 and waits for the PUBACK; Err if the broker closes the connection.
pub(crate) async fn publish(
    client: &AsyncClient,
    events: &mut EventLoop,
    topic: &str,
    payload: impl Into<Vec<u8>>,
) -> Result<(), String> {
    client
        .publish(topic, QoS::AtLeastOnce, false, payload.into())
        .await
        .map_err(|e| e.to_string())?;
    until_closed_or(events, |packet| matches!(packet, Packet::PubAck(_))).await
}

/// Polls until `wanted` arrives (Ok) or the connection ends (Err).
pub(crate) async fn until_closed_or(
    events: &mut EventLoop,
    wanted: impl Fn(&Packet) -> bool,
) -> Result<(), String> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(packet)) if wanted(&packet) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "neither answer nor disconnect within 10 s".to_string())?
}

async fn stored_devices(url: &str) -> Vec<String> {
    let conn = db::connect(url).await;
    db::readings(&conn)
        .await
        .into_iter()
        .map(|r| r.device_id)
        .collect()
}

pub(crate) fn count(counter: &std::sync::atomic::AtomicU64) -> u64 {
    IngestMetrics::get(counter)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_known_devices_with_their_own_client_id_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker_with_devices(dir.path(), &[("pi-7", "seven"), ("pi-8", "eight")]).await;
    let url = sqlite_url(dir.path());
    {
        let addr = broker.setup.v4;
        let anonymous = Login {
            client_id: "pi-7",
            username: None,
            password: "",
        };
        // Each refusal is a CONNACK that says why, not just a closed socket.
        let refusal = |result: Result<_, String>| result.err().unwrap_or_default();
        let bad_login = "BadUserNamePassword";
        assert!(refusal(connect(addr, &anonymous, None).await).contains(bad_login));
        assert!(
            refusal(connect(addr, &device("pi-7", "eight"), None).await).contains(bad_login),
            "wrong password"
        );
        assert!(
            refusal(connect(addr, &device("pi-9", "nine"), None).await).contains(bad_login),
            "unknown device"
        );
        let other_client_id = Login {
            client_id: "pi-8",
            username: Some("pi-7"),
            password: "seven",
        };
        assert!(
            refusal(connect(addr, &other_client_id, None).await).contains("BadClientId"),
            "client id != username"
        );
    }
    let (client, mut events) = connect(broker.setup.v4, &device("pi-7", "seven"), None)
        .await
        .expect("right password");
    publish(&client, &mut events, "co2/pi-7", r#"{"value":612}"#)
        .await
        .expect("own topic");
    eventually(Duration::from_secs(10), "pi-7's reading stored", || async {
        stored_devices(&url)
            .await
            .contains(&"pi-7".to_string())
            .then_some(())
    })
    .await;
    assert_eq!(
        count(&broker.metrics.auth_refused),
        4,
        "each refusal counted once"
    );
    broker.stop().await;
}

/// Local processes can reach rumqttd's loopback port without the guard. rumqttd lets in only
/// the guard's per-process token, so even a device's right password does not get a local
/// process past the topic rules (it could otherwise subscribe to `#`, publish as any device,
/// or forge another device's storage acks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bypassing_the_guard_gets_nobody_in() {
    let dir = tempfile::tempdir().unwrap();
    let creds = credentials_file(dir.path(), &[("pi-7", "seven")]);
    let setup = config_file(
        dir.path(),
        &sqlite_url(dir.path()),
        &format!("credentials_file = {:?}", creds.display().to_string()),
    );
    let broker = BrokerProcess::spawn(&setup).await;
    let inner = broker.rumqttd_address("test-v4");
    for password in ["eight", "seven"] {
        // rumqttd closes the connection without a CONNACK.
        assert!(
            connect(inner, &device("pi-7", password), None)
                .await
                .is_err(),
            "password {password:?} let a client past the guard"
        );
    }
    connect(setup.v4, &device("pi-7", "seven"), None)
        .await
        .expect("right password, through the guard");
    assert!(
        broker.log().contains("not through the guard"),
        "the direct refusals are logged by rumqttd's hook:\n{}",
        broker.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_come_and_go_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker_with_devices(dir.path(), &[("pi-7", "seven"), ("pi-8", "eight")]).await;
    let creds = dir.path().join(CREDENTIALS_FILE);
    let addr = broker.setup.v4;
    let (_client, mut events) = connect(addr, &device("pi-8", "eight"), None)
        .await
        .expect("pi-8 is known");
    assert!(connect(addr, &device("pi-9", "nine"), None).await.is_err());

    // The CLI, as an operator would run it: add pi-9, remove pi-8.
    let passwd = |args: &[&str], stdin: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_co2-broker"))
            .arg("passwd")
            .args(args)
            .arg("--file")
            .arg(&creds)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "passwd {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    passwd(&["add", "pi-9", "--password-stdin"], "nine\n");
    passwd(&["remove", "pi-8"], "");
    assert_eq!(passwd(&["list"], ""), "pi-7\npi-9\n");
    let text = std::fs::read_to_string(&creds).unwrap();
    assert!(!text.contains("nine"), "no plain password in the file");
    assert!(text.contains("pi-9:$argon2id$"), "{text}");

    // pi-8's open connection is closed, and it cannot come back; pi-9 can connect.
    until_closed_or(&mut events, |_| false)
        .await
        .expect_err("the removed device's connection is closed");
    eventually(Duration::from_secs(10), "pi-9 accepted", || async {
        connect(addr, &device("pi-9", "nine"), None).await.ok()
    })
    .await;
    assert!(connect(addr, &device("pi-8", "eight"), None).await.is_err());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_use_another_devices_topics() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker_with_devices(dir.path(), &[("pi-7", "seven"), ("pi-8", "eight")]).await;
    let url = sqlite_url(dir.path());
    let addr = broker.setup.v4;

    // Publishing as someone else, or outside co2/<own id>, costs the connection.
    for topic in ["co2/pi-8", "co2/pi-77", "ack/pi-8", "elsewhere"] {
        denied_by_guard(&broker.metrics, &format!("publish to {topic}"), || async {
            let (client, mut events) = connect(addr, &device("pi-7", "seven"), None).await?;
            publish(&client, &mut events, topic, r#"{"value":999}"#).await
        })
        .await;
    }
    // Reading other devices' data (or everything) too.
    for filter in [
        "co2/#",
        "#",
        "ack/pi-8",
        "ack/+",
        "+/pi-8",
        "$share/g/ack/pi-8",
        "co2/pi-8/#",
    ] {
        denied_by_guard(
            &broker.metrics,
            &format!("subscribe to {filter}"),
            || async {
                let (client, mut events) = connect(addr, &device("pi-7", "seven"), None).await?;
                client
                    .subscribe(filter, QoS::AtLeastOnce)
                    .await
                    .map_err(|e| e.to_string())?;
                until_closed_or(&mut events, |p| matches!(p, Packet::SubAck(_))).await
            },
        )
        .await;
    }
    // A last will on another device's topic is refused at CONNECT.
    denied_by_guard(&broker.metrics, "a will on co2/pi-8", || async {
        let mut options = MqttOptions::new("pi-7", addr.ip().to_string(), addr.port());
        options.set_credentials("pi-7", "seven");
        options.set_last_will(rumqttc::LastWill::new(
            "co2/pi-8",
            r#"{"value":1}"#,
            QoS::AtLeastOnce,
            false,
        ));
        let (_client, mut events) = AsyncClient::new(options, 10);
        until_closed_or(
            &mut events,
            |p| matches!(p, Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success),
        )
        .await
    })
    .await;

    // Its own topics work: publish, and the storage ack on ack/pi-7.
    let (client, mut events) = connect(addr, &device("pi-7", "seven"), None).await.unwrap();
    client
        .subscribe("ack/pi-7", QoS::AtLeastOnce)
        .await
        .unwrap();
    until_closed_or(&mut events, |p| matches!(p, Packet::SubAck(_)))
        .await
        .expect("own ack topic");
    publish(
        &client,
        &mut events,
        "co2/pi-7/kitchen",
        r#"{"ts":"2026-01-01T00:00:00Z","value":612,"seq":1}"#,
    )
    .await
    .expect("own topic");
    until_closed_or(
        &mut events,
        |p| matches!(p, Packet::Publish(p) if p.topic == "ack/pi-7"),
    )
    .await
    .expect("storage ack for pi-7");

    // The ack may come from the spool on a loaded machine; the database follows.
    let devices = eventually(Duration::from_secs(10), "pi-7's reading stored", || async {
        let devices = stored_devices(&url).await;
        (!devices.is_empty()).then_some(devices)
    })
    .await;
    assert_eq!(
        devices,
        vec!["pi-7".to_string()],
        "nothing stored for anyone else"
    );
    let conn = db::connect(&url).await;
    assert!(db::rejections(&conn).await.is_empty());
    broker.stop().await;
}

/// Runs `attempt`, which must end with the connection closed, until the guard counts it as a
/// denial. (A reconnect with the same client id can also be dropped by rumqttd while the
/// previous connection's teardown is in flight; that must not pass for a denial.)
async fn denied_by_guard<F, Fut>(metrics: &IngestMetrics, what: &str, attempt: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    for _ in 0..5 {
        let before = count(&metrics.topic_denied);
        assert!(attempt().await.is_err(), "{what} was accepted");
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while std::time::Instant::now() < deadline {
            if count(&metrics.topic_denied) > before {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    panic!("{what}: refused, but never by the guard's topic rules");
}

/// A CA, and a server certificate for 127.0.0.1 and localhost signed by it, as PEM files.
struct TestPki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    ca_der: rustls::pki_types::CertificateDer<'static>,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestPki {
    fn generate(dir: &Path) -> Self {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "co2-broker test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let issuer =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
        let ca_cert: &rcgen::Certificate = issuer.as_ref();
        let (ca, cert, key) = (
            dir.join("ca.pem"),
            dir.join("server.pem"),
            dir.join("server.key"),
        );
        std::fs::write(&ca, ca_cert.pem()).unwrap();
        std::fs::write(&cert, server.pem()).unwrap();
        std::fs::write(&key, server_key.serialize_pem()).unwrap();
        Self {
            ca,
            cert,
            key,
            ca_der: ca_cert.der().clone(),
            issuer,
        }
    }

    /// `[v4.1.tls]` for the test config (appended after `[co2]`, which TOML allows).
    fn listener_section(&self, client_ca: bool) -> String {
        let mut section = format!(
            "\n[v4.1.tls]\ncertpath = {:?}\nkeypath = {:?}\n",
            self.cert.display().to_string(),
            self.key.display().to_string()
        );
        if client_ca {
            section.push_str(&format!("capath = {:?}\n", self.ca.display().to_string()));
        }
        section
    }

    fn client_config(&self, client_cert: Option<&str>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let config = match client_cert {
            Some(name) => {
                let key = rcgen::KeyPair::generate().unwrap();
                let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
                params
                    .distinguished_name
                    .push(rcgen::DnType::CommonName, name);
                let cert = params.signed_by(&key, &self.issuer).unwrap();
                builder
                    .with_client_auth_cert(
                        vec![cert.der().clone()],
                        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
                    )
                    .unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }
}

/// Connects to `addr` from another loopback address (127.0.0.2), as a second host would: the
/// guard limits what one address may hold before logging in.
pub(crate) async fn connect_from_elsewhere(
    addr: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2), addr).await
}

/// A TCP connection to `addr` from the loopback address `source` (all of 127/8 is local).
pub(crate) async fn connect_from(
    source: std::net::Ipv4Addr,
    addr: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((source, 0).into())?;
    socket.connect(addr).await
}

/// Opens `n` TCP connections that never say anything, and one that sends junk, all from
/// another host than the test's legitimate clients.
async fn bad_clients(addr: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut sockets = Vec::new();
    for _ in 0..n {
        sockets.push(connect_from_elsewhere(addr).await.unwrap());
    }
    let mut junk = connect_from_elsewhere(addr).await.unwrap();
    // Packet type 15 does not exist; the rest is noise.
    let _ = junk
        .write_all(b"\xf0\x00\x00\x01GET / HTTP/1.1\r\n\r\n")
        .await;
    sockets.push(junk);
    sockets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_tls_only_and_slow_handshakes_stall_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let creds = credentials_file(dir.path(), &[("pi-7", "seven")]);
    let url = sqlite_url(dir.path());
    let extra = format!(
        "credentials_file = {:?}\n{}",
        creds.display().to_string(),
        pki.listener_section(false)
    );
    let broker = TestBroker::start_with(&url, &extra).await;
    let addr = broker.setup.v4;
    let tls = pki.client_config(None);

    // Plain MQTT to the TLS port fails.
    assert!(connect(addr, &device("pi-7", "seven"), None).await.is_err());

    // Half-open connections and junk in front of the queue do not stall a TLS client.
    let _bad = bad_clients(addr, 20).await;
    let started = std::time::Instant::now();
    let (client, mut events) = connect(addr, &device("pi-7", "seven"), Some(tls.clone()))
        .await
        .expect("TLS with the test CA");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "TLS connect took {:?} behind stalled clients",
        started.elapsed()
    );
    publish(&client, &mut events, "co2/pi-7", r#"{"value":613}"#)
        .await
        .expect("publish over TLS");
    eventually(
        Duration::from_secs(10),
        "the TLS reading stored",
        || async {
            stored_devices(&url)
                .await
                .contains(&"pi-7".into())
                .then_some(())
        },
    )
    .await;
    assert!(
        count(&broker.metrics.connections_refused) >= 1,
        "plain TCP refused"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_when_a_ca_is_configured() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(dir.path());
    let extra = pki.listener_section(true);
    let broker = TestBroker::start_with(&sqlite_url(dir.path()), &extra).await;
    let addr = broker.setup.v4;
    let anonymous = Login {
        client_id: "pi-1",
        username: None,
        password: "",
    };
    assert!(
        connect(addr, &anonymous, Some(pki.client_config(None)))
            .await
            .is_err(),
        "no client certificate"
    );
    connect(addr, &anonymous, Some(pki.client_config(Some("pi-1"))))
        .await
        .expect("client certificate from the CA");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_packets_and_junk_disturb_nobody_else() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    let broker = TestBroker::start(&url).await;
    let addr = broker.setup.v4;
    let good = Login {
        client_id: "good",
        username: None,
        password: "",
    };
    let (good_client, mut good_events) = connect(addr, &good, None).await.unwrap();

    let _bad = bad_clients(addr, 20).await;
    let big = Login {
        client_id: "big",
        username: None,
        password: "",
    };
    let (big_client, mut big_events) = connect(addr, &big, None).await.unwrap();
    // Acknowledged and recorded as rejected, so the client moves on instead of resending it
    // on every reconnect; it stays connected.
    publish(&big_client, &mut big_events, "co2/big", vec![b'7'; 8192])
        .await
        .expect("an 8 KiB message over a 4 KiB limit is acknowledged");
    publish(&big_client, &mut big_events, "co2/big", r#"{"value":599}"#)
        .await
        .expect("the same client goes on");

    // The client that was already connected, and a new one, are served as usual.
    publish(
        &good_client,
        &mut good_events,
        "co2/good",
        r#"{"value":600}"#,
    )
    .await
    .expect("the good client is unaffected");
    let late = Login {
        client_id: &unique_client_id("late"),
        username: None,
        password: "",
    };
    let started = std::time::Instant::now();
    let (late_client, mut late_events) = connect(addr, &late, None).await.unwrap();
    publish(
        &late_client,
        &mut late_events,
        "co2/late",
        r#"{"value":601}"#,
    )
    .await
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    eventually(Duration::from_secs(10), "both readings stored", || async {
        let devices = stored_devices(&url).await;
        (devices.contains(&"good".into()) && devices.contains(&"late".into())).then_some(())
    })
    .await;
    let conn = db::connect(&url).await;
    let rejected = eventually(
        Duration::from_secs(10),
        "the oversized one recorded",
        || async {
            let rejected = db::rejections(&conn).await;
            (!rejected.is_empty()).then_some(rejected)
        },
    )
    .await;
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].topic, "co2/big");
    assert!(
        rejected[0].reason.contains("max_payload_size"),
        "{rejected:?}"
    );
    assert!(rejected[0].payload.starts_with("7777"), "{rejected:?}");
    eventually(
        Duration::from_secs(10),
        "big's small reading stored",
        || async {
            stored_devices(&url)
                .await
                .contains(&"big".into())
                .then_some(())
        },
    )
    .await;
    assert_eq!(count(&broker.metrics.oversized_packets), 1);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let setup = config_file(dir.path(), &sqlite_url(dir.path()), "");
    let config = std::fs::read_to_string(&setup.config_path).unwrap();
    // 3 router slots: the ingest link and two clients.
    std::fs::write(
        &setup.config_path,
        config.replace("max_connections = 1000", "max_connections = 3"),
    )
    .unwrap();
    let broker = TestBroker::start_in(setup).await;
    let addr = broker.setup.v4;
    let login = |id: &'static str| Login {
        client_id: id,
        username: None,
        password: "",
    };
    let _first = connect(addr, &login("first"), None).await.unwrap();
    let _second = connect(addr, &login("second"), None).await.unwrap();
    eventually(Duration::from_secs(5), "two open connections", || async {
        (count(&broker.metrics.mqtt_connections) == 2).then_some(())
    })
    .await;
    assert!(connect(addr, &login("third"), None).await.is_err());
    assert!(count(&broker.metrics.connections_refused) >= 1);
    drop(_first);
    eventually(Duration::from_secs(10), "a free slot again", || async {
        connect(addr, &login("fourth"), None).await.ok().map(drop)
    })
    .await;
    broker.stop().await;
}

/// Runs the binary on a config whose v4 listener listens on all interfaces.
fn start_open(dir: &Path, extra: &str) -> std::process::Child {
    let setup = config_file(dir, &sqlite_url(dir), extra);
    let config = std::fs::read_to_string(&setup.config_path).unwrap();
    let open = config.replace(
        &format!("\"{}\"", setup.v4),
        &format!("\"0.0.0.0:{}\"", setup.v4.port()),
    );
    std::fs::write(&setup.config_path, open).unwrap();
    Command::new(env!("CARGO_BIN_EXE_co2-broker"))
        .arg("--config")
        .arg(&setup.config_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn listening_beyond_loopback_needs_credentials_or_an_explicit_opt_out() {
    let dir = tempfile::tempdir().unwrap();
    let out = start_open(dir.path(), "").wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("co2.credentials_file"), "{stderr}");
    assert!(stderr.contains("allow_anonymous_remote"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let mut child = start_open(dir.path(), "allow_anonymous_remote = true");
    // tracing writes to stdout.
    let mut stderr = child.stdout.take().unwrap();
    let warned = std::thread::spawn(move || {
        use std::io::Read;
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut chunk) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&chunk[..n]);
            if String::from_utf8_lossy(&seen).contains("co2-broker started") {
                break;
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    })
    .join()
    .unwrap();
    let _ = child.kill(); // done with it either way
    let _ = child.wait();
    assert!(warned.contains("WARN"), "{warned}");
    assert!(warned.contains("ANYONE WHO CAN REACH"), "{warned}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_rules_hold_over_mqtt_5() {
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as Code5, Packet as Packet5};
    use rumqttc::v5::{
        mqttbytes::QoS as QoS5, AsyncClient as Client5, Event as Event5, EventLoop as Events5,
        MqttOptions as Options5,
    };
    async fn until5(events: &mut Events5, wanted: impl Fn(&Packet5) -> bool) -> Result<(), String> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match events.poll().await {
                    Ok(Event5::Incoming(packet)) if wanted(&packet) => return Ok(()),
                    Ok(_) => continue,
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .await
        .map_err(|_| "neither answer nor disconnect within 10 s".to_string())?
    }
    let connected = |p: &Packet5| matches!(p, Packet5::ConnAck(a) if a.code == Code5::Success);
    let dir = tempfile::tempdir().unwrap();
    let broker = broker_with_devices(dir.path(), &[("pi-7", "seven")]).await;
    let url = sqlite_url(dir.path());
    let addr = broker.setup.v5;
    let client = |client_id: &str, password: &str| {
        let mut options = Options5::new(client_id, addr.ip().to_string(), addr.port());
        options.set_credentials("pi-7", password);
        Client5::new(options, 10)
    };

    let (_c, mut events) = client("pi-7", "wrong");
    let refused = until5(&mut events, connected).await.unwrap_err();
    assert!(
        refused.contains("BadUserNamePassword"),
        "wrong password: {refused}"
    );
    let (_c, mut events) = client("pi-8", "seven");
    assert!(
        until5(&mut events, connected).await.is_err(),
        "client id != username"
    );

    denied_by_guard(&broker.metrics, "publish as pi-8 over MQTT 5", || async {
        let (c, mut events) = client("pi-7", "seven");
        c.publish("co2/pi-8", QoS5::AtLeastOnce, false, r#"{"value":1}"#)
            .await
            .map_err(|e| e.to_string())?;
        until5(&mut events, |p| matches!(p, Packet5::PubAck(_))).await
    })
    .await;
    denied_by_guard(&broker.metrics, "subscribe to # over MQTT 5", || async {
        let (c, mut events) = client("pi-7", "seven");
        c.subscribe("#", QoS5::AtLeastOnce)
            .await
            .map_err(|e| e.to_string())?;
        until5(&mut events, |p| matches!(p, Packet5::SubAck(_))).await
    })
    .await;

    let (c, mut events) = client("pi-7", "seven");
    c.publish("co2/pi-7", QoS5::AtLeastOnce, false, r#"{"value":614}"#)
        .await
        .unwrap();
    until5(&mut events, |p| matches!(p, Packet5::PubAck(_)))
        .await
        .expect("own topic over MQTT 5");
    eventually(Duration::from_secs(10), "pi-7's reading stored", || async {
        (stored_devices(&url).await == vec!["pi-7".to_string()]).then_some(())
    })
    .await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_url_can_come_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    let url_file = dir.path().join("database-url");
    std::fs::write(&url_file, format!("{url}\n")).unwrap();
    let decoy = format!("sqlite://{}/decoy.db?mode=rwc", dir.path().display());
    let broker = TestBroker::start_with(
        &decoy,
        &format!("database_url_file = {:?}", url_file.display().to_string()),
    )
    .await;
    crate::support::mqtt::publish_one(broker.setup.v4, "co2/from-file", r#"{"value":615}"#).await;
    eventually(
        Duration::from_secs(10),
        "stored via the URL in the file",
        || async {
            stored_devices(&url)
                .await
                .contains(&"from-file".to_string())
                .then_some(())
        },
    )
    .await;
    broker.stop().await;
    assert!(!dir.path().join("decoy.db").exists());
}
