//! The real `co2-edge` binary for end-to-end tests: its config, its log (the only window
//! into what it does), its outbox cursor, and the checks that every reading it issued is
//! stored exactly once.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use co2_broker::storage::entities::co2_emissions;
use sea_orm::DatabaseConnection;

use super::broker::BrokerProcess;
use super::db;

/// What may still be pending when the backlog counts as drained: the readings sampled while
/// the last storage ack was on its way (50 ms sampling against a batch delay plus commit of
/// 25–100 ms on a loaded 2-core machine). Whatever it is, the second agent run below must
/// deliver exactly that many.
pub const LIVE_SLACK: u64 = 10;

/// The `co2-edge` binary of the workspace: it lives next to the test binary's `deps/` directory.
/// A `cargo test -p co2-broker` alone does not build it, so it is built here if missing.
pub fn edge_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // <target>/<profile>/deps/it-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in <target>/<profile>/deps");
    let binary = profile_dir.join("co2-edge");
    if binary.is_file() {
        return binary;
    }
    let target_dir = profile_dir.parent().expect("<target> above <profile>");
    let mut build = Command::new(env!("CARGO"));
    build
        .args(["build", "-p", "co2-edge", "--bin", "co2-edge"])
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    if profile_dir.file_name().and_then(|n| n.to_str()) == Some("release") {
        build.arg("--release");
    }
    let status = build.status().expect("cargo runs");
    assert!(
        status.success() && binary.is_file(),
        "building co2-edge failed ({status}); expected it at {}",
        binary.display()
    );
    binary
}

/// Removes terminal colour codes, in case the agent's log writer adds them.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The numeric value of `name=` in one of the agent's log lines.
pub fn field(line: &str, name: &str) -> Option<u64> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    let digits: String = line[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The seq ranges of a `storage ack` line: `stored=[(first, last), ...]`.
pub fn acked_ranges(line: &str) -> Vec<(u64, u64)> {
    let Some(start) = line.find(" stored=[") else {
        return Vec::new();
    };
    let list = &line[start + " stored=[".len()..];
    let list = &list[..list.find(']').unwrap_or(list.len())];
    let numbers: Vec<u64> = list
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    numbers.chunks_exact(2).map(|p| (p[0], p[1])).collect()
}

/// Whether `line` is the agent's log event `message` (tracing prints `target: message fields`).
pub fn is_event(line: &str, message: &str) -> bool {
    line.contains(&format!(": {message} ")) || line.ends_with(&format!(": {message}"))
}

/// One run of the real `co2-edge` binary; killed on drop if the test fails midway.
pub struct EdgeAgent {
    child: Child,
    log_path: PathBuf,
    /// Its device id, data dir and brokers, for a later run on the same outbox.
    pub device: String,
    pub data_dir: PathBuf,
    pub brokers: Vec<SocketAddr>,
}

impl EdgeAgent {
    /// Starts the agent on `data_dir` (the outbox survives between runs) against `broker`
    /// and waits until its outbox is open.
    pub async fn spawn(
        device: &str,
        data_dir: &Path,
        broker: &BrokerProcess,
        addr: SocketAddr,
        interval_ms: u64,
        run: &str,
    ) -> Self {
        Self::spawn_with_brokers(device, data_dir, broker, &[addr], interval_ms, run).await
    }

    /// Like [`Self::spawn`], with `mqtt.brokers` listing `addrs` when there is more than one.
    pub async fn spawn_with_brokers(
        device: &str,
        data_dir: &Path,
        broker: &BrokerProcess,
        addrs: &[SocketAddr],
        interval_ms: u64,
        run: &str,
    ) -> Self {
        let brokers = match addrs {
            [addr] => format!("host = \"{}\"\nport = {}", addr.ip(), addr.port()),
            _ => format!(
                "brokers = [{}]",
                addrs
                    .iter()
                    .map(|a| format!("\"{a}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let config_path = data_dir.join(format!("{run}.toml"));
        let config = format!(
            r#"device_id = "{device}"
data_dir = "{data_dir}"
log = "info"

[sensor]
kind = "simulated"
interval_ms = {interval_ms}
median_window = 1

[mqtt]
{brokers}
reconnect_delay_ms = 200

[publish]
max_rate_per_sec = 1000.0
backlog_log_secs = 1

[clock]
require_ntp_sync = false   # containers never report NTP sync

[outbox]
fsync_every = 1
"#,
            data_dir = data_dir.display(),
        );
        std::fs::create_dir_all(data_dir).expect("agent data dir");
        std::fs::write(&config_path, config).expect("write agent config");
        let log_path = data_dir.join(format!("{run}.log"));
        let log = std::fs::File::create(&log_path).expect("agent log file");
        let child = Command::new(edge_binary())
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("co2-edge binary starts");
        let agent = Self {
            child,
            log_path,
            device: device.to_owned(),
            data_dir: data_dir.to_owned(),
            brokers: addrs.to_vec(),
        };
        agent
            .wait_for_line(0, "the agent's outbox to open", Some(broker), |line| {
                is_event(line, "outbox opened").then_some(())
            })
            .await;
        agent
    }

    pub fn lines(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        strip_ansi(&text).lines().map(str::to_owned).collect()
    }

    /// The first seq this run issues: `next_seq` of its `outbox opened` line.
    pub async fn first_seq(&self) -> u64 {
        self.wait_for_line(0, "next_seq in `outbox opened`", None, |l| {
            is_event(l, "outbox opened")
                .then(|| field(l, "next_seq"))
                .flatten()
        })
        .await
    }

    /// Number of log lines so far, to look only at what comes after a point in the test.
    pub fn mark(&self) -> usize {
        self.lines().len()
    }

    /// Waits for the first log line after `from` that `matches` accepts. On timeout the test
    /// fails with the agent's log and what went wrong in `broker`, if it runs.
    pub async fn wait_for_line<T>(
        &self,
        from: usize,
        what: &str,
        broker: Option<&BrokerProcess>,
        matches: impl Fn(&str) -> Option<T>,
    ) -> T {
        let timeout = Duration::from_secs(20);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let lines = self.lines();
            if let Some(found) = lines.iter().skip(from).find_map(|l| matches(l)) {
                return found;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n\
                     broker errors:\n{}\nagent log:\n{}",
                    broker.map(broker_errors).unwrap_or_default(),
                    lines.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM and wait; returns the exit code and the log.
    pub fn terminate(mut self) -> (Option<i32>, String) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -TERM co2-edge");
        let status = self.child.wait().expect("agent exits");
        (status.code(), self.lines().join("\n"))
    }
}

impl Drop for EdgeAgent {
    fn drop(&mut self) {
        let _ = self.child.kill(); // already gone after terminate()
        let _ = self.child.wait(); // reaping only
    }
}

/// The agent's outbox cursor file: `v1 <cursor> <dropped_total> <clean_next_seq>`.
pub fn outbox_cursor(data_dir: &Path) -> (u64, u64, u64) {
    let path = data_dir.join("outbox").join("cursor");
    let text = std::fs::read_to_string(&path).expect("outbox cursor file");
    let numbers: Vec<u64> = text
        .split_whitespace()
        .skip(1)
        .map(|n| n.parse().expect("cursor numbers"))
        .collect();
    assert!(text.starts_with("v1 ") && numbers.len() == 3, "{text:?}");
    (numbers[0], numbers[1], numbers[2])
}

/// The broker's error lines and panics (the first of each kind is enough to diagnose).
pub fn broker_errors(broker: &BrokerProcess) -> String {
    let log = strip_ansi(&broker.log());
    let mut seen = BTreeSet::new();
    log.lines()
        .filter(|l| l.contains(" ERROR ") || l.contains("panicked at"))
        .filter(|l| seen.insert(l.split_once("Z ").map_or(*l, |(_, rest)| rest).to_owned()))
        .take(20)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The readings of `device`, in seq order.
pub async fn device_rows(conn: &DatabaseConnection, device: &str) -> Vec<co2_emissions::Model> {
    let mut rows: Vec<_> = db::readings(conn)
        .await
        .into_iter()
        .filter(|r| r.device_id == device)
        .collect();
    rows.sort_by_key(|r| (r.seq, r.id));
    rows
}

/// Stops `agent` and delivers what it still holds (the readings sampled while the last acks
/// were on their way) with a second run on the same outbox and brokers, whose interval is so
/// long that it samples exactly one reading, right at start; waits until the outbox is empty.
/// `broker` is only for diagnostics. Returns the agent's next seq: every seq it issued is
/// below it.
pub async fn stop_and_deliver_the_rest(agent: EdgeAgent, broker: &BrokerProcess) -> u64 {
    let (device, agent_dir, brokers) = (
        agent.device.clone(),
        agent.data_dir.clone(),
        agent.brokers.clone(),
    );
    let agent_dir = agent_dir.as_path();
    let (code, log) = agent.terminate();
    assert_eq!(code, Some(0), "agent SIGTERM exits 0; log:\n{log}");
    let left = log
        .lines()
        .rev()
        .find(|l| is_event(l, "outbox flushed"))
        .and_then(|l| field(l, "pending"))
        .unwrap_or_else(|| panic!("no `outbox flushed pending=` line; log:\n{log}"));
    // The backlog was at most LIVE_SLACK when the caller stopped waiting; a loaded machine
    // samples a few more before the SIGTERM lands (11 seen). Only a runaway backlog fails.
    assert!(
        left <= 3 * LIVE_SLACK,
        "{left} readings left after the drain"
    );

    let agent =
        EdgeAgent::spawn_with_brokers(&device, agent_dir, broker, &brokers, 600_000, "run2").await;
    let lines = agent.lines();
    let opened = lines
        .iter()
        .find(|l| is_event(l, "outbox opened"))
        .expect("outbox opened");
    assert_eq!(field(opened, "pending"), Some(left), "{opened}");
    let sampled = field(opened, "next_seq").expect("next_seq in `outbox opened`");
    agent
        .wait_for_line(0, "the outbox to be empty", Some(broker), |l| {
            let acked = acked_ranges(l)
                .iter()
                .any(|&(first, last)| (first..=last).contains(&sampled));
            (is_event(l, "storage ack") && acked && field(l, "backlog") == Some(0)).then_some(())
        })
        .await;
    let (code, log) = agent.terminate();
    assert_eq!(code, Some(0), "agent SIGTERM exits 0; log:\n{log}");
    assert!(
        log.lines()
            .any(|l| is_event(l, "outbox flushed") && field(l, "pending") == Some(0)),
        "the outbox is empty at the end; log:\n{log}"
    );
    let (cursor, dropped_total, next_seq) = outbox_cursor(agent_dir);
    assert_eq!(dropped_total, 0, "no reading dropped at the outbox bound");
    assert_eq!(
        cursor, next_seq,
        "every seq the agent issued is acknowledged"
    );
    next_seq
}

/// Asserts that the device's stored seqs are exactly `first_seq..next_seq`, each once, with
/// measured times following seq; returns the rows in seq order.
pub async fn assert_stored_exactly_once(
    conn: &DatabaseConnection,
    device: &str,
    first_seq: u64,
    next_seq: u64,
) -> Vec<co2_emissions::Model> {
    let rows = device_rows(conn, device).await;
    let seqs: Vec<u64> = rows
        .iter()
        .map(|r| r.seq.expect("agent readings carry seq") as u64)
        .collect();
    let distinct: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        seqs.len(),
        "{device}: a reading stored twice: {:?}",
        seqs.windows(2).filter(|w| w[0] == w[1]).collect::<Vec<_>>()
    );
    let missing: Vec<u64> = (first_seq..next_seq)
        .filter(|s| !distinct.contains(s))
        .collect();
    assert!(
        missing.is_empty(),
        "{device}: readings never stored: {missing:?}"
    );
    assert_eq!(
        seqs,
        (first_seq..next_seq).collect::<Vec<_>>(),
        "{device}: stored seqs are exactly the issued ones"
    );
    for pair in rows.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(
            a.date_time < b.date_time,
            "measured times follow seq: seq {:?} at {:?}, seq {:?} at {:?}",
            a.seq,
            a.date_time,
            b.seq,
            b.date_time
        );
    }
    rows
}

/// Waits for the agent to (re)connect to the broker at `addr` after log line `from`.
pub async fn wait_for_connect_to(
    agent: &EdgeAgent,
    broker: &BrokerProcess,
    from: usize,
    addr: SocketAddr,
) {
    agent
        .wait_for_line(
            from,
            &format!("the agent connecting to {addr}"),
            Some(broker),
            |l| {
                (is_event(l, "connected to the broker; sending the backlog")
                    && l.contains(&format!(" broker={addr} ")))
                .then_some(())
            },
        )
        .await;
}
