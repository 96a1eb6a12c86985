//! End to end: the real `co2-edge` binary (simulated sensor) against the real `co2-broker`
//! binary and MariaDB, with the broker stopped twice (SIGTERM, then SIGKILL) while the agent
//! keeps sampling. Every reading the agent produced must end up in the table exactly once, in
//! order of time, and nothing may be left in the agent's outbox.

use std::time::Duration;

use crate::support::broker::{config_file, BrokerProcess};
use crate::support::edge::{
    assert_stored_exactly_once, broker_errors, field, is_event, stop_and_deliver_the_rest,
    wait_for_connect_to, EdgeAgent, LIVE_SLACK,
};
use crate::support::mariadb::MariaDb;
use crate::support::{db, eventually};

const DEVICE: &str = "edge-e2e";
/// Fast enough to pile up a backlog during a short outage, slow enough for a debug build.
const INTERVAL_MS: u64 = 50;
/// Readings that must pile up in the outbox before the broker comes back (≈ 2 s of sampling).
const OUTAGE_BACKLOG: u64 = 40;

/// While the broker is down: waits until the agent reports a backlog of at least
/// [`OUTAGE_BACKLOG`] readings while disconnected.
async fn wait_for_outage_backlog(agent: &EdgeAgent, from: usize) -> u64 {
    agent
        .wait_for_line(
            from,
            "a backlog piling up while the broker is down",
            None,
            |l| {
                let backlog = field(l, "backlog")?;
                (is_event(l, "backlog")
                    && l.contains("connected=false")
                    && backlog >= OUTAGE_BACKLOG)
                    .then_some(backlog)
            },
        )
        .await
}

/// After the broker is back: the agent reconnects with its backlog and drains it.
async fn wait_for_drain(agent: &EdgeAgent, broker: &BrokerProcess, from: usize) -> u64 {
    let resent = agent
        .wait_for_line(
            from,
            "the agent reconnecting with its backlog",
            Some(broker),
            |l| {
                is_event(l, "connected to the broker; sending the backlog")
                    .then(|| field(l, "backlog"))
                    .flatten()
            },
        )
        .await;
    agent
        .wait_for_line(from, "the agent's backlog to drain", Some(broker), |l| {
            let backlog = field(l, "backlog")?;
            (is_event(l, "storage ack") && backlog <= LIVE_SLACK).then_some(())
        })
        .await;
    resent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_agent_through_broker_restarts_stores_every_reading_once_in_time_order() {
    let started = std::time::Instant::now();
    let url = MariaDb::shared().create_database("edge").await;
    let dir = tempfile::tempdir().unwrap();
    let setup = config_file(dir.path(), &url, "");
    let broker = BrokerProcess::spawn(&setup).await;
    let conn = db::connect(&url).await;
    let agent_dir = dir.path().join("agent");

    let agent = EdgeAgent::spawn(DEVICE, &agent_dir, &broker, setup.v4, INTERVAL_MS, "run1").await;
    let first_seq = agent.first_seq().await;
    agent
        .wait_for_line(0, "the first storage acks", Some(&broker), |l| {
            is_event(l, "storage ack").then_some(())
        })
        .await;
    eventually(Duration::from_secs(20), "40 readings stored", || async {
        (db::reading_count(&conn).await >= 40).then_some(())
    })
    .await;

    // Outage 1: a graceful stop; the broker drains what it has, the agent keeps sampling.
    let mark = agent.mark();
    let (code, log) = broker.terminate();
    assert_eq!(code, Some(0), "broker SIGTERM exits 0; log:\n{log}");
    let piled = wait_for_outage_backlog(&agent, mark).await;
    let mark = agent.mark();
    let broker = BrokerProcess::spawn(&setup).await;
    let resent = wait_for_drain(&agent, &broker, mark).await;
    assert!(resent >= piled, "reconnected with {resent}, had {piled}");

    // Outage 2: SIGKILL mid-stream. What was PUBACKed but not committed got no storage ack,
    // so the agent still has it and must send it again.
    let mark = agent.mark();
    let _ = broker.kill();
    let piled = wait_for_outage_backlog(&agent, mark).await;
    let mark = agent.mark();
    let broker = BrokerProcess::spawn(&setup).await;
    let resent = wait_for_drain(&agent, &broker, mark).await;
    assert!(resent >= piled, "reconnected with {resent}, had {piled}");

    let next_seq = stop_and_deliver_the_rest(agent, &broker).await;
    // A clean run issues consecutive seqs; both stops were graceful, so the seqs of the whole
    // test are exactly first_seq..next_seq.
    let produced = next_seq - first_seq;
    assert!(produced >= 40 + 2 * OUTAGE_BACKLOG, "{produced} readings");

    // The only panic allowed is rumqttd 0.20's poisoned-listener bug (#1062), which an agent
    // reconnecting with its fixed client id can provoke; the broker must then have restarted
    // the listener (the readings above prove nothing was lost meanwhile).
    let errors = broker_errors(&broker);
    let unexpected_panic = errors
        .lines()
        .any(|l| l.contains("panicked at") && !l.contains("rumqttd-0.20.0/src/server/broker.rs"));
    assert!(!unexpected_panic, "the broker panicked:\n{errors}");
    if errors.contains("panicked at") {
        assert!(
            errors.contains("restarting this listener"),
            "rumqttd panicked and the listener was not restarted:\n{errors}"
        );
    }
    let (code, log) = broker.terminate();
    assert_eq!(code, Some(0), "broker SIGTERM exits 0; log:\n{log}");

    let rows = assert_stored_exactly_once(&conn, DEVICE, first_seq, next_seq).await;
    for pair in rows.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(a.id < b.id, "stored in seq order: {a:?} then {b:?}");
    }
    assert!(rows
        .iter()
        .all(|r| r.topic == format!("co2/{DEVICE}") && r.emissions.is_some()));
    eprintln!(
        "edge end to end: {produced} readings, two broker outages, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Two brokers on one database, an agent listing both: each broker in turn is SIGKILLed
/// mid-stream, the agent fails over to the other, and every reading is stored exactly once
/// (what reached the killed broker without a storage ack is resent to the other one, and the
/// unique key keeps a reading that reached both once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_agent_fails_over_between_brokers_and_stores_every_reading_once() {
    let started = std::time::Instant::now();
    let url = MariaDb::shared().create_database("edge_failover").await;
    let dir = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let setup_a = config_file(&dir_a, &url, "");
    let setup_b = config_file(&dir_b, &url, "");
    let broker_a = BrokerProcess::spawn(&setup_a).await;
    let broker_b = BrokerProcess::spawn(&setup_b).await;
    let conn = db::connect(&url).await;
    let agent_dir = dir.path().join("agent");

    let brokers = [setup_a.v4, setup_b.v4];
    let agent =
        EdgeAgent::spawn_with_brokers(DEVICE, &agent_dir, &broker_a, &brokers, INTERVAL_MS, "run1")
            .await;
    let first_seq = agent.first_seq().await;
    wait_for_connect_to(&agent, &broker_a, 0, setup_a.v4).await;
    eventually(
        Duration::from_secs(20),
        "20 readings stored through broker a",
        || async { (db::reading_count(&conn).await >= 20).then_some(()) },
    )
    .await;

    // Broker a dies mid-stream: the agent moves to b at once and resends what a never acked.
    let mark = agent.mark();
    let _ = broker_a.kill();
    wait_for_connect_to(&agent, &broker_b, mark, setup_b.v4).await;
    let stored = db::reading_count(&conn).await;
    eventually(
        Duration::from_secs(20),
        "20 more readings stored through broker b",
        || async { (db::reading_count(&conn).await >= stored + 20).then_some(()) },
    )
    .await;

    // a comes back, b dies: the rotation wraps around to a.
    let broker_a = BrokerProcess::spawn(&setup_a).await;
    let mark = agent.mark();
    let _ = broker_b.kill();
    wait_for_connect_to(&agent, &broker_a, mark, setup_a.v4).await;
    wait_for_drain(&agent, &broker_a, mark).await;

    let next_seq = stop_and_deliver_the_rest(agent, &broker_a).await;
    let (code, log) = broker_a.terminate();
    assert_eq!(code, Some(0), "broker SIGTERM exits 0; log:\n{log}");
    let rows = assert_stored_exactly_once(&conn, DEVICE, first_seq, next_seq).await;
    assert!(rows.len() >= 40, "{} readings", rows.len());
    eprintln!(
        "edge failover: {} readings, two brokers each SIGKILLed once, {:.1} s",
        rows.len(),
        started.elapsed().as_secs_f64()
    );
}
