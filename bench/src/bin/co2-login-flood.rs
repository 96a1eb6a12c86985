//! `co2-login-flood`: floods a running co2-broker with wrong-password CONNECTs while
//! legitimate devices log in, and reports how long the devices waited for their CONNACK and
//! how much memory the broker took meanwhile. `scripts/login-flood` runs it against the
//! release broker; the README's "Limits against bad clients" has its figures.
//!
//! Run `co2-login-flood --help` for the options.
//!
//! The flood: `--workers` connections at a time, from loopback addresses 127.0.0.2 … (one per
//! `--sources`, as that many hosts), each sending a CONNECT as `--target` with a wrong password,
//! waiting for the answer, then again. The devices: `probe-0` … `probe-{N-1}`, all with
//! `--probe-password`, log in one after another every 250 ms from 127.0.0.1, during the flood
//! and `--after` seconds after it: each device's first login is a full password check, later
//! ones may be remembered. Prints one `key=value` line.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::BytesMut;
use clap::Parser;
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Floods a co2-broker with wrong-password CONNECTs while devices log in; reports their
/// CONNACK latency and the broker's memory.
#[derive(Parser)]
struct Args {
    /// The broker; loopback only, the flood stays on this machine.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// Device the flood claims to be.
    #[arg(long, default_value = "pi-1")]
    target: String,
    /// The password of the devices probe-0 … probe-N.
    #[arg(long)]
    probe_password: String,
    /// Devices that log in in turn (probe-0 …), each with its own first, full check.
    #[arg(long, default_value_t = 40)]
    probes: usize,
    /// Flooding connections at a time.
    #[arg(long, default_value_t = 50)]
    workers: usize,
    /// Addresses the flood comes from (127.0.0.2 …), 1 to 200.
    #[arg(long, default_value_t = 1)]
    sources: u8,
    /// How long the flood lasts.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// How long devices keep logging in after the flood.
    #[arg(long, default_value_t = 5)]
    after: u64,
    /// The broker's process id, to read its memory from /proc.
    #[arg(long)]
    broker_pid: Option<u32>,
}

impl Args {
    fn checked(self) -> anyhow::Result<Self> {
        if !self.host.is_loopback() {
            bail!("--host must be a loopback address: the flood stays on this machine");
        }
        if self.sources == 0 || self.sources > 200 {
            bail!("--sources must be 1..=200");
        }
        Ok(self)
    }
}

/// What the flooding clients were told, summed over all of them.
#[derive(Default)]
struct FloodCounts {
    attempts: AtomicU64,
    /// CONNACK "bad user name or password".
    wrong: AtomicU64,
    /// CONNACK "server unavailable": too many password checks waiting.
    busy: AtomicU64,
    /// Closed without a CONNACK (too many connections from the address logging in).
    closed: AtomicU64,
}

async fn flood_worker(
    broker: SocketAddr,
    source: IpAddr,
    connect: Arc<BytesMut>,
    until: Instant,
    counts: Arc<FloodCounts>,
) {
    while Instant::now() < until {
        counts.attempts.fetch_add(1, Relaxed);
        let answer = async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(source, 0))?;
            let mut stream = socket.connect(broker).await?;
            stream.write_all(&connect).await?;
            let mut connack = [0u8; 4];
            stream.read_exact(&mut connack).await?;
            Ok::<_, std::io::Error>(connack)
        };
        match tokio::time::timeout(Duration::from_secs(30), answer).await {
            Ok(Ok([0x20, _, _, 4])) => counts.wrong.fetch_add(1, Relaxed),
            Ok(Ok([0x20, _, _, 3])) => counts.busy.fetch_add(1, Relaxed),
            _ => counts.closed.fetch_add(1, Relaxed),
        };
    }
}

/// Logs `device` in; the time to its CONNACK, or why it failed.
async fn probe(args: &Args, device: &str) -> Result<Duration, String> {
    let mut options = MqttOptions::new(device, args.host.to_string(), args.port);
    options.set_credentials(device, &args.probe_password);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 10);
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => return Ok(ack.code),
                Ok(_) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    let elapsed = started.elapsed();
    let _ = client.disconnect().await; // measuring only the login
    match outcome {
        Ok(Ok(ConnectReturnCode::Success)) => Ok(elapsed),
        Ok(Ok(code)) => Err(format!("{code:?}")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("no CONNACK within 30 s".into()),
    }
}

/// VmRSS and VmHWM of `pid` in MiB.
fn memory_mib(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

#[derive(Default)]
struct Probes {
    first: Vec<Duration>,
    repeat: Vec<Duration>,
    after: Vec<Duration>,
    failed: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse().checked()?;
    let broker = SocketAddr::new(args.host, args.port);
    let mut connect = rumqttc::mqttbytes::v4::Connect::new(args.target.clone());
    connect.set_login(args.target.clone(), "not the password");
    let mut packet = BytesMut::new();
    connect.write(&mut packet).context("encode CONNECT")?;
    let packet = Arc::new(packet);

    let rss_before = args.broker_pid.and_then(memory_mib);
    let flood_ends = Instant::now() + Duration::from_secs(args.seconds);
    let counts = Arc::new(FloodCounts::default());
    let workers: Vec<_> = (0..args.workers)
        .map(|n| {
            let source = IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                0,
                2 + (n % args.sources as usize) as u8,
            ));
            tokio::spawn(flood_worker(
                broker,
                source,
                packet.clone(),
                flood_ends,
                counts.clone(),
            ))
        })
        .collect();

    let mut probes = Probes::default();
    let mut rss_peak = 0.0_f64;
    let probing_ends = flood_ends + Duration::from_secs(args.after);
    let mut n = 0;
    while Instant::now() < probing_ends {
        let next = Instant::now() + Duration::from_millis(250);
        let device = format!("probe-{}", n % args.probes);
        let during = Instant::now() < flood_ends;
        match probe(&args, &device).await {
            Ok(latency) if !during => probes.after.push(latency),
            Ok(latency) if n < args.probes => probes.first.push(latency),
            Ok(latency) => probes.repeat.push(latency),
            Err(e) => probes.failed.push(format!("{device}: {e}")),
        }
        if let Some((rss, _)) = args.broker_pid.and_then(memory_mib) {
            rss_peak = rss_peak.max(rss);
        }
        n += 1;
        tokio::time::sleep_until(next).await;
    }
    for worker in workers {
        worker.await?;
    }
    let rss_after = args.broker_pid.and_then(memory_mib);

    for latencies in [&mut probes.first, &mut probes.repeat, &mut probes.after] {
        latencies.sort();
    }
    let summary = |name: &str, sorted: &[Duration]| {
        format!(
            "{name}_logins={} {name}_p50_ms={:.1} {name}_p99_ms={:.1} {name}_max_ms={:.1}",
            sorted.len(),
            percentile(sorted, 0.5),
            percentile(sorted, 0.99),
            percentile(sorted, 1.0)
        )
    };
    let mib = |m: Option<(f64, f64)>, pick: fn((f64, f64)) -> f64| {
        m.map_or("n/a".to_owned(), |m| format!("{:.0}", pick(m)))
    };
    println!(
        "flood_seconds={} workers={} sources={} flood_connects={} wrong={} busy={} closed={} {} {} {} failed_logins={} rss_before_mib={} rss_peak_mib={:.0} rss_after_mib={} rss_hwm_mib={}",
        args.seconds,
        args.workers,
        args.sources,
        counts.attempts.load(Relaxed),
        counts.wrong.load(Relaxed),
        counts.busy.load(Relaxed),
        counts.closed.load(Relaxed),
        summary("first", &probes.first),
        summary("repeat", &probes.repeat),
        summary("after", &probes.after),
        probes.failed.len(),
        mib(rss_before, |m| m.0),
        rss_peak,
        mib(rss_after, |m| m.0),
        mib(rss_after, |m| m.1),
    );
    for failure in probes.failed.iter().take(5) {
        eprintln!("failed login: {failure}");
    }
    Ok(())
}
