//! `co2-bench`: N simulated devices publish JSON readings at QoS 1 to a running co2-broker and
//! wait for its storage acks (`ack/<device>`), which the broker sends only after the rows are
//! committed. So "acked" here means "in the database", and the time from publish to ack is
//! the publish→commit latency an agent experiences (an upper bound: it includes the ack's
//! trip back).
//!
//! Run `co2-bench --help` for the options. Without `--rate` every device publishes as fast
//! as the broker takes it (throughput); with `--rate R` the devices together publish R readings
//! per second (latency at a fixed load). Prints one `key=value` line that `scripts/bench`
//! turns into the README table.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use co2_proto::{DeviceId, MeasuredAt, Payload, StorageAck};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::Semaphore;

/// Simulated devices publish QoS 1 readings to a running co2-broker and time its storage acks.
#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// Simulated devices, each with its own connection.
    #[arg(long, default_value_t = 20)]
    devices: usize,
    /// Readings each device publishes.
    #[arg(long, default_value_t = 10_000)]
    readings: u64,
    /// Readings per second, all devices together; as fast as they go without it.
    #[arg(long)]
    rate: Option<f64>,
    /// Measured time between two readings of a device, in milliseconds. The readings of a
    /// device end at the present and reach back `readings × spacing`. 1 (the default) puts a
    /// device's readings of a run into one or two minute buckets; 10000 (a sensor every 10 s)
    /// or 60000 (one reading per device and minute, the worst case for rollups) make every
    /// batch touch many more rollup rows.
    #[arg(long, default_value_t = 1)]
    spacing_ms: u64,
    /// Tag in the device ids, so runs against one database do not collide (default: the time).
    #[arg(long)]
    run: Option<String>,
}

/// Devices logging in at the same time. They all connect from one address, and the broker
/// refuses an address more than `guard::MAX_UNADMITTED_PER_ADDRESS` (8) connections that are
/// still logging in (a defence against login floods), so the bench logs in a few at a time,
/// as devices behind one NAT that retry would end up doing.
const CONCURRENT_LOGINS: usize = 4;

/// What one device saw.
struct DeviceReport {
    latencies: Vec<Duration>,
    first_publish: Instant,
    last_ack: Instant,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let run = match args.run {
        Some(run) => run,
        None => format!(
            "{:x}",
            SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis()
        ),
    };
    let logins = Arc::new(Semaphore::new(CONCURRENT_LOGINS));
    let per_device_interval = args
        .rate
        .map(|rate| Duration::from_secs_f64(args.devices as f64 / rate));
    let mut tasks = Vec::new();
    for i in 0..args.devices {
        let device = DeviceId::new(format!("bench-{run}-{i}"))?;
        tasks.push(tokio::spawn(run_device(
            args.host.clone(),
            args.port,
            device,
            args.readings,
            per_device_interval,
            args.spacing_ms,
            logins.clone(),
        )));
    }
    let mut reports = Vec::new();
    for task in tasks {
        reports.push(task.await??);
    }
    let total = args.devices as u64 * args.readings;
    let start = reports
        .iter()
        .map(|r| r.first_publish)
        .min()
        .context("no devices")?;
    let end = reports
        .iter()
        .map(|r| r.last_ack)
        .max()
        .context("no devices")?;
    let mut latencies: Vec<Duration> = reports.into_iter().flat_map(|r| r.latencies).collect();
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let elapsed = end.duration_since(start).as_secs_f64();
    println!(
        "run={} devices={} readings={} seconds={:.3} persisted_per_s={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        run,
        args.devices,
        total,
        elapsed,
        total as f64 / elapsed,
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
    );
    Ok(())
}

async fn run_device(
    host: String,
    port: u16,
    device: DeviceId,
    readings: u64,
    interval: Option<Duration>,
    spacing_ms: u64,
    logins: Arc<Semaphore>,
) -> anyhow::Result<DeviceReport> {
    let login = logins.acquire_owned().await?;
    let mut options = MqttOptions::new(device.as_str(), host, port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_inflight(200);
    let (client, mut events) = AsyncClient::new(options, 1000);
    client
        .subscribe(device.ack_topic(), QoS::AtLeastOnce)
        .await?;
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = events.poll().await? {
            break;
        }
    }
    drop(login);
    let first_publish = Instant::now();
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    let spacing_ms = i64::try_from(spacing_ms).context("spacing in range")?;
    let base_ms = now_ms - (readings as i64 - 1) * spacing_ms;
    let topic = device.readings_topic();
    let publisher = tokio::spawn({
        let client = client.clone();
        async move {
            let mut sent = Vec::with_capacity(readings as usize);
            let mut ticker = interval.map(tokio::time::interval);
            for seq in 0..readings {
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                }
                let payload = Payload {
                    measured_at: MeasuredAt::Utc(
                        chrono::DateTime::from_timestamp_millis(base_ms + seq as i64 * spacing_ms)
                            .context("timestamp in range")?,
                    ),
                    co2_ppm: 400.0 + (seq % 800) as f64,
                    seq: Some(seq),
                    temperature_c: None,
                    humidity_pct: None,
                };
                sent.push(Instant::now());
                client
                    .publish(&topic, QoS::AtLeastOnce, false, payload.to_json())
                    .await?;
            }
            anyhow::Ok(sent)
        }
    });
    let mut acked_at: HashMap<u64, Instant> = HashMap::with_capacity(readings as usize);
    let deadline = Instant::now() + Duration::from_secs(600);
    while (acked_at.len() as u64) < readings {
        let event = tokio::time::timeout_at(deadline.into(), events.poll())
            .await
            .with_context(|| {
                format!(
                    "{device}: only {} of {readings} acked in time",
                    acked_at.len()
                )
            })??;
        if let Event::Incoming(Packet::Publish(p)) = event {
            let now = Instant::now();
            let ack = StorageAck::parse(&p.payload).context("ack payload")?;
            for &(first, last) in ack.stored.ranges() {
                for seq in first..=last {
                    acked_at.entry(seq).or_insert(now);
                }
            }
        }
    }
    let sent = publisher.await??;
    let latencies = (0..readings)
        .map(|seq| acked_at[&seq].saturating_duration_since(sent[seq as usize]))
        .collect();
    let last_ack = acked_at.values().copied().max().unwrap_or(first_publish);
    let _ = client.disconnect().await; // the numbers are in; a failed goodbye changes nothing
    Ok(DeviceReport {
        latencies,
        first_publish,
        last_ack,
    })
}
