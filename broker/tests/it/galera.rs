//! Scale-out end to end: two `co2-broker` processes writing to different nodes of a 3-node
//! MariaDB Galera cluster, four real `co2-edge` agents listing both brokers, a steady stream
//! of readings with seq numbers, and the faults of a real deployment one after the other:
//! a broker SIGKILLed (its agents fail over), a Galera node SIGKILLed and restarted (it
//! rejoins by IST), the node under one broker refusing queries (MariaDB error 1047, as while
//! it is outside the primary component), and that node partitioned away (SIGSTOP) and back.
//! Afterwards every (device, seq) the agents issued is stored exactly once: no gap, no
//! duplicate, nothing recorded as rejected.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sea_orm::DatabaseConnection;

use crate::support::broker::{config_file, scrape, BrokerProcess, BrokerSetup};
use crate::support::edge::{
    assert_stored_exactly_once, field, is_event, stop_and_deliver_the_rest, wait_for_connect_to,
    EdgeAgent, LIVE_SLACK,
};
use crate::support::galera::{tail, GaleraCluster};
use crate::support::{db, eventually};

/// Four devices at 20 readings/s each: a steady stream a debug build keeps up with on 2 cores
/// next to three database servers.
const DEVICES: usize = 4;
const INTERVAL_MS: u64 = 50;
/// How long the frozen node stays away: longer than the shortened eviction timeouts
/// (suspect 2 s + inactive 3 s, see `support::galera`), so the other two nodes go on without
/// it and it has to rejoin.
const PARTITION: Duration = Duration::from_secs(7);
/// A write the frozen node never answers counts as failed after this long (then spooled).
const WRITE_TIMEOUT_MS: u64 = 2000;

struct Agent {
    agent: EdgeAgent,
    first_seq: u64,
}

async fn start_agent(
    dir: &std::path::Path,
    number: usize,
    brokers: &[SocketAddr],
    diagnostics: &BrokerProcess,
) -> Agent {
    let device = format!("galera-{number}");
    let agent = EdgeAgent::spawn_with_brokers(
        &device,
        &dir.join(&device),
        diagnostics,
        brokers,
        INTERVAL_MS,
        "run1",
    )
    .await;
    let first_seq = agent.first_seq().await;
    Agent { agent, first_seq }
}

/// Waits until `more` readings beyond the current count are stored (read on node 1, which
/// waits for causality: it sees what any node committed).
async fn wait_for_more(conn: &DatabaseConnection, more: u64, what: &str) {
    let now = db::reading_count(conn).await;
    eventually(Duration::from_secs(60), what, || async {
        (db::reading_count(conn).await >= now + more).then_some(())
    })
    .await;
}

async fn metric(setup: &BrokerSetup, name: &str) -> f64 {
    scrape(setup.http, name).await.unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_brokers_on_galera_store_every_reading_once_through_broker_node_and_partition_faults() {
    let started = Instant::now();
    let mut cluster = tokio::task::spawn_blocking(GaleraCluster::start)
        .await
        .expect("cluster start");
    let cluster_up = started.elapsed();
    let database = cluster.create_database("galera_e2e").await;
    let dir = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (dir.path().join("broker-a"), dir.path().join("broker-b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let extra = format!("db_write_timeout_ms = {WRITE_TIMEOUT_MS}");
    // Broker a writes to node 1, broker b to node 2; node 3 serves no broker.
    let setup_a = config_file(&dir_a, &cluster.url(1, &database), &extra);
    let setup_b = config_file(&dir_b, &cluster.url(2, &database), &extra);
    // One after the other: a migrates the schema, b finds it in place.
    let broker_a = BrokerProcess::spawn(&setup_a).await;
    let broker_b = BrokerProcess::spawn(&setup_b).await;
    let conn = cluster.connect(1, &database).await;

    // Even devices prefer a, odd ones b.
    let mut agents = Vec::new();
    for number in 0..DEVICES {
        let brokers = if number % 2 == 0 {
            [setup_a.v4, setup_b.v4]
        } else {
            [setup_b.v4, setup_a.v4]
        };
        agents.push(start_agent(dir.path(), number, &brokers, &broker_a).await);
    }
    wait_for_more(&conn, 100, "the first 100 readings").await;

    // 1. Broker a SIGKILLed mid-stream: its agents fail over to b, resending what a had not
    //    acked; a comes back (replaying its spool, if any).
    let marks: Vec<usize> = agents.iter().map(|a| a.agent.mark()).collect();
    let _ = broker_a.kill();
    for (number, agent) in agents.iter().enumerate().filter(|(n, _)| n % 2 == 0) {
        wait_for_connect_to(&agent.agent, &broker_b, marks[number], setup_b.v4).await;
    }
    let broker_a = BrokerProcess::spawn(&setup_a).await;
    wait_for_more(&conn, 60, "60 readings after broker a's SIGKILL").await;
    // Agents stay where they are; restarted (gracefully, on their outboxes), the even ones
    // go back to a, so both brokers carry traffic again for the faults below.
    let mut placed = Vec::new();
    for (number, Agent { agent, first_seq }) in agents.into_iter().enumerate() {
        if number % 2 == 1 {
            placed.push(Agent { agent, first_seq });
            continue;
        }
        let (device, data_dir, brokers) = (
            agent.device.clone(),
            agent.data_dir.clone(),
            agent.brokers.clone(),
        );
        let (code, log) = agent.terminate();
        assert_eq!(code, Some(0), "agent SIGTERM exits 0; log:\n{log}");
        let agent = EdgeAgent::spawn_with_brokers(
            &device,
            &data_dir,
            &broker_a,
            &brokers,
            INTERVAL_MS,
            "run1b",
        )
        .await;
        wait_for_connect_to(&agent, &broker_a, 0, setup_a.v4).await;
        placed.push(Agent { agent, first_seq });
    }
    let agents = placed;
    let after_broker_kill = started.elapsed();

    // 2. Galera node 3 SIGKILLed: the other two keep the primary component. Restarted, it
    //    recovers its position from InnoDB and catches up by IST from a donor's gcache.
    cluster.kill(3);
    wait_for_more(&conn, 40, "40 readings with node 3 down").await;
    let log_before = cluster.error_log(3).len();
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.restart(3, Duration::from_secs(90));
        cluster
    })
    .await
    .expect("node 3 rejoins");
    let rejoin_log = cluster.error_log(3)[log_before..].to_owned();
    assert!(
        rejoin_log.contains("Receiving IST"),
        "node 3 rejoined without IST; its log since the restart:\n{}",
        tail(&rejoin_log, 60)
    );
    wait_for_more(&conn, 40, "40 readings after node 3 rejoined").await;
    let after_node_kill = started.elapsed();

    // 3. Node 2 (broker b's) answers every query with 1047, as a node outside the primary
    //    component does: b must spool, not record its readings as refused.
    let spooled = metric(&setup_b, "co2_spooled_total").await;
    cluster
        .execute(2, "SET GLOBAL wsrep_reject_queries = ALL")
        .await;
    eventually(
        Duration::from_secs(20),
        "broker b spooling on 1047",
        || async { (metric(&setup_b, "co2_spooled_total").await > spooled).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await; // a stretch of spooling, by design
    cluster
        .execute(2, "SET GLOBAL wsrep_reject_queries = NONE")
        .await;
    eventually(
        Duration::from_secs(30),
        "broker b's spool replayed",
        || async {
            (metric(&setup_b, "co2_spool_batches").await == 0.0
                && metric(&setup_b, "co2_database_up").await == 1.0)
                .then_some(())
        },
    )
    .await;

    // 4. Node 2 partitioned away: frozen longer than the eviction timeouts. Nodes 1 and 3 go
    //    on (broker a keeps storing); b's writes time out and are spooled; thawed, node 2
    //    finds itself outside the primary component (1047 again) and rejoins.
    let spooled = metric(&setup_b, "co2_spooled_total").await;
    cluster.freeze(2);
    let frozen = Instant::now();
    wait_for_more(
        &conn,
        40,
        "broker a storing through nodes 1 and 3 meanwhile",
    )
    .await;
    tokio::time::sleep(PARTITION.saturating_sub(frozen.elapsed())).await;
    cluster.thaw(2);
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.wait_synced(2, Duration::from_secs(90));
        cluster
    })
    .await
    .expect("node 2 rejoins");
    assert!(
        metric(&setup_b, "co2_spooled_total").await > spooled,
        "broker b spooled while its node was away"
    );
    for setup in [&setup_a, &setup_b] {
        eventually(Duration::from_secs(60), "both spools replayed", || async {
            (metric(setup, "co2_spool_batches").await == 0.0
                && metric(setup, "co2_database_up").await == 1.0)
                .then_some(())
        })
        .await;
    }
    let after_partition = started.elapsed();

    // Drain: every agent's backlog down to what is in flight, then stop and deliver the rest.
    for agent in &agents {
        let from = agent.agent.mark();
        agent
            .agent
            .wait_for_line(from, "the agent's backlog to drain", Some(&broker_b), |l| {
                let backlog = field(l, "backlog")?;
                (is_event(l, "storage ack") && backlog <= LIVE_SLACK).then_some(())
            })
            .await;
    }
    let mut issued = Vec::new();
    for Agent { agent, first_seq } in agents {
        let device = agent.device.clone();
        let next_seq = stop_and_deliver_the_rest(agent, &broker_b).await;
        issued.push((device, first_seq, next_seq));
    }
    let conflicts = metric(&setup_a, "co2_write_conflicts_total").await
        + metric(&setup_b, "co2_write_conflicts_total").await;
    let (code, log) = broker_a.terminate();
    assert_eq!(code, Some(0), "broker a SIGTERM exits 0; log:\n{log}");
    let (code, log) = broker_b.terminate();
    assert_eq!(code, Some(0), "broker b SIGTERM exits 0; log:\n{log}");

    let mut total = 0;
    for (device, first_seq, next_seq) in &issued {
        total += assert_stored_exactly_once(&conn, device, *first_seq, *next_seq)
            .await
            .len();
    }
    assert_eq!(
        db::reading_count(&conn).await,
        total as u64,
        "no reading of another device"
    );
    let rejections = db::rejections(&conn).await;
    assert!(
        rejections.is_empty(),
        "readings recorded as rejected: {rejections:?}"
    );
    // Every node holds every row.
    for number in [2, 3] {
        let node = cluster.connect(number, &database).await;
        assert_eq!(
            db::reading_count(&node).await,
            total as u64,
            "node {number}"
        );
    }
    eprintln!(
        "galera: {total} readings from {DEVICES} devices stored exactly once; cluster up in \
         {:.1} s, broker SIGKILL done at {:.1} s, node SIGKILL + IST at {:.1} s, 1047 and \
         partition at {:.1} s, {conflicts} write conflicts retried, {:.1} s in all",
        cluster_up.as_secs_f64(),
        after_broker_kill.as_secs_f64(),
        after_node_kill.as_secs_f64(),
        after_partition.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
