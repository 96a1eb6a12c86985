//! The broker under test: in-process through `co2_broker::run`, or as the real binary for
//! tests that kill it. Both read a real config file written by [`config_file`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use co2_broker::metrics::IngestMetrics;
use co2_broker::settings::Settings;
use tokio::sync::oneshot;

/// Ports and paths of one broker instance.
pub struct BrokerSetup {
    pub v4: SocketAddr,
    pub v5: SocketAddr,
    /// The `/metrics` endpoint.
    pub http: SocketAddr,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
}

/// Writes a config file for `database_url` on fresh ports; `extra_co2` adds `[co2]` keys.
pub fn config_file(dir: &Path, database_url: &str, extra_co2: &str) -> BrokerSetup {
    let v4: SocketAddr = format!("127.0.0.1:{}", super::free_port()).parse().unwrap();
    let v5: SocketAddr = format!("127.0.0.1:{}", super::free_port()).parse().unwrap();
    let http: SocketAddr = format!("127.0.0.1:{}", super::free_port()).parse().unwrap();
    let data_dir = dir.join("data");
    let config = format!(
        r#"id = 0
[router]
max_connections = 1000
max_outgoing_packet_count = 200
max_segment_size = 4194304
max_segment_count = 32

[v4.1]
name = "test-v4"
listen = "{v4}"
next_connection_delay_ms = 0
[v4.1.connections]
connection_timeout_ms = 5000
max_payload_size = 4096
max_inflight_count = 100

[v5.1]
name = "test-v5"
listen = "{v5}"
next_connection_delay_ms = 0
[v5.1.connections]
connection_timeout_ms = 5000
max_payload_size = 4096
max_inflight_count = 100

[co2]
database_url = "{database_url}"
data_dir = "{data_dir}"
db_retry_interval_ms = 200
http_listen = "{http}"
{extra_co2}
"#,
        data_dir = data_dir.display()
    );
    let config_path = dir.join("rumqttd.toml");
    std::fs::write(&config_path, config).expect("write test config");
    BrokerSetup {
        v4,
        v5,
        http,
        data_dir,
        config_path,
    }
}

/// The broker running inside the test process.
pub struct TestBroker {
    pub setup: BrokerSetup,
    pub metrics: Arc<IngestMetrics>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestBroker {
    pub async fn start(database_url: &str) -> Self {
        Self::start_with(database_url, "").await
    }

    pub async fn start_with(database_url: &str, extra_co2: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let setup = config_file(dir.path(), database_url, extra_co2);
        let mut broker = Self::start_in(setup).await;
        broker._dir = Some(dir);
        broker
    }

    /// Starts on an existing setup (to restart on the same data dir and ports).
    pub async fn start_in(setup: BrokerSetup) -> Self {
        capture_logs();
        let settings =
            Settings::load(&setup.config_path, std::iter::empty()).expect("valid test config");
        let metrics = Arc::new(IngestMetrics::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(co2_broker::run(settings, metrics.clone(), async move {
            let _ = stopped.await; // a dropped sender stops the broker too
        }));
        super::mqtt::wait_until_accepting(setup.v4).await;
        Self {
            setup,
            metrics,
            stop: Some(stop),
            task,
            _dir: None,
        }
    }

    /// Graceful stop, as on SIGTERM; returns the setup for a restart.
    pub async fn stop(mut self) -> (BrokerSetup, Option<tempfile::TempDir>) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = tokio::time::timeout(Duration::from_secs(30), &mut self.task)
            .await
            .expect("broker stops within 30 s")
            .expect("broker task did not panic");
        result.expect("broker run() returns Ok after a graceful stop");
        (
            std::mem::replace(&mut self.setup, empty_setup()),
            self._dir.take(),
        )
    }
}

/// In-process brokers log through the test writer, so a failing test shows what its broker
/// said (and passing tests stay quiet).
fn capture_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt() // another harness may have installed one already
            .with_env_filter(tracing_subscriber::EnvFilter::new("info,rumqttd=warn"))
            .with_test_writer()
            .try_init();
    });
}

fn empty_setup() -> BrokerSetup {
    BrokerSetup {
        v4: "127.0.0.1:0".parse().unwrap(),
        v5: "127.0.0.1:0".parse().unwrap(),
        http: "127.0.0.1:0".parse().unwrap(),
        data_dir: PathBuf::new(),
        config_path: PathBuf::new(),
    }
}

/// The real `co2-broker` binary as a child process.
pub struct BrokerProcess {
    child: Child,
    pub log_path: PathBuf,
}

impl BrokerProcess {
    pub async fn spawn(setup: &BrokerSetup) -> Self {
        let log_path = setup
            .config_path
            .with_extension(format!("log.{}", super::free_port()));
        let log = std::fs::File::create(&log_path).expect("broker log file");
        let child = Command::new(env!("CARGO_BIN_EXE_co2-broker"))
            .arg("--config")
            .arg(&setup.config_path)
            .env("RUST_LOG", "info,rumqttd=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("co2-broker binary starts");
        super::mqtt::wait_until_accepting(setup.v4).await;
        Self { child, log_path }
    }

    /// rumqttd's loopback address behind the guard of listener `name`, from the start log.
    pub fn rumqttd_address(&self, name: &str) -> SocketAddr {
        let log = self.log();
        log.lines()
            .filter(|l| {
                l.contains("rumqttd behind it on loopback")
                    && l.contains(&format!("listener={name}"))
            })
            .find_map(|l| {
                l.split_whitespace()
                    .find_map(|f| f.strip_prefix("rumqttd=")?.parse().ok())
            })
            .unwrap_or_else(|| panic!("no loopback address for {name} in the log:\n{log}"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} co2-broker");
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(mut self) -> (Option<i32>, String) {
        self.signal("TERM");
        let status = self.child.wait().expect("broker exits");
        (status.code(), self.log())
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(mut self) -> String {
        self.signal("KILL");
        let _ = self.child.wait(); // reaping only
        self.log()
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- co2-broker log ({}):\n{}",
                self.log_path.display(),
                self.log()
            );
        }
        let _ = self.child.kill(); // already gone when terminate/kill ran
        let _ = self.child.wait();
    }
}

/// Fetches `/metrics` and returns the value of the sample named `name` (no labels).
pub async fn scrape(http: SocketAddr, name: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(http).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await.ok()?;
    body.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}
