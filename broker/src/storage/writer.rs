//! The writer task: batches records, writes them to the database, falls back to the spool,
//! replays the spool, and acks what is durable.
//!
//! Ordering: up to `db_writers` batches are written at once, so rows of neighbouring batches
//! may commit in either order (every row carries its own times). While the spool holds
//! anything, new batches are appended behind it and the spool is replayed oldest first, one
//! batch at a time, so an outage never reorders readings by more than that. Replay and new
//! input alternate, so a long replay never stalls the MQTT side.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use co2_proto::{DeviceId, SeqRanges, StorageAck};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use super::database::{is_conflict, is_unreachable};
use super::{AckSink, Database, Spool, SpoolError, WriteOutcome};
use crate::ingest::record::truncate_utf8;
use crate::ingest::{Batch, Reading, Record, Rejection};
use crate::metrics::IngestMetrics;
use crate::settings::IngestSettings;
use crate::throttle::Throttle;

/// How often a batch that lost a lock conflict is written again before it is spooled, and
/// the pause before each attempt (times the attempt number). Concurrent writers and readers
/// of the same rows make an occasional deadlock normal; salvaging row by row would record the
/// rows as refused.
const CONFLICT_RETRIES: u32 = 3;
const CONFLICT_BACKOFF: Duration = Duration::from_millis(20);

pub struct Writer {
    db: Database,
    spool: Spool,
    /// Where acks go (MQTT in the broker); see [`AckSink`].
    acks: Box<dyn AckSink>,
    metrics: Arc<IngestMetrics>,
    max_rows: usize,
    max_delay: Duration,
    write_timeout: Duration,
    retry_interval: Duration,
    /// Batches being written right now, each on its own pooled connection. Overlapping
    /// writes keep the database busy while a commit waits for its fsync; one writer at a
    /// time spent most of its life waiting (see the README's benchmark section).
    in_flight: JoinSet<WriteAttempt>,
    max_in_flight: usize,
    /// The spool's oldest record on its way to the database. Its own task, not awaited in the
    /// loop: against a database that does not answer, an attempt takes the whole connect
    /// timeout, and meanwhile new readings must still reach the spool and be acked.
    replaying: Option<JoinHandle<WriteAttempt>>,
    /// Earliest time to try the database again after a failure.
    next_db_attempt: Instant,
    /// Migrations could not run at start (database unreachable): run them before the first
    /// write that reaches it.
    schema_pending: bool,
    db_failure_log: Throttle,
    /// Spool records that cannot be read or advanced past, however often replay meets them.
    spool_failure_log: Throttle,
}

/// Waits for the replay in flight; only polled while there is one.
async fn replay_done(
    replaying: &mut Option<JoinHandle<WriteAttempt>>,
) -> Result<WriteAttempt, tokio::task::JoinError> {
    match replaying {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

/// A finished database write and the batch it carried (spooled if the write failed).
struct WriteAttempt {
    batch: Batch,
    result: Result<WriteOutcome, WriteFailure>,
    elapsed: Duration,
}

/// Why a write did not happen.
struct WriteFailure {
    message: String,
    /// The database answered, and said no (a constraint, a trigger, a value it will not take),
    /// as opposed to not answering. Retrying such a batch would fail forever and block the
    /// spool behind it, so its rows are written one by one instead (see `Writer::salvage`).
    refused: bool,
}

impl Writer {
    pub fn new(
        db: Database,
        spool: Spool,
        acks: impl AckSink,
        metrics: Arc<IngestMetrics>,
        settings: &IngestSettings,
        schema_pending: bool,
    ) -> Self {
        metrics.spool_bytes.store(spool.bytes(), Relaxed);
        metrics
            .spool_batches
            .store(spool.pending_records(), Relaxed);
        Self {
            db,
            spool,
            acks: Box::new(acks),
            metrics,
            max_rows: settings.batch_max_rows,
            max_delay: settings.batch_max_delay(),
            write_timeout: settings.db_write_timeout(),
            retry_interval: settings.db_retry_interval(),
            in_flight: JoinSet::new(),
            max_in_flight: settings.db_writers,
            replaying: None,
            next_db_attempt: Instant::now(),
            schema_pending,
            db_failure_log: Throttle::new(Duration::from_secs(10)),
            spool_failure_log: Throttle::new(Duration::from_secs(10)),
        }
    }

    /// Runs until `records` is closed and everything received is written or spooled; then
    /// replays what it can within `grace`.
    ///
    /// One loop does everything, so a finished write is acked the moment it completes, even
    /// while the next batch is still filling.
    pub async fn run(mut self, mut records: mpsc::Receiver<Record>, grace: Duration) {
        let mut buffer: Vec<Record> = Vec::with_capacity(self.max_rows);
        // When the oldest record in `buffer` must be on its way.
        let mut batch_due: Option<tokio::time::Instant> = None;
        let mut input_open = true;
        while input_open || !buffer.is_empty() {
            let replay_due = !self.spool.is_empty()
                && self.in_flight.is_empty()
                && self.replaying.is_none()
                && Instant::now() >= self.next_db_attempt;
            let retry_at = tokio::time::Instant::from_std(self.next_db_attempt);
            let room = self.max_rows - buffer.len();
            let can_send = self.in_flight.len() < self.max_in_flight;
            let send_at = match batch_due {
                Some(due) if room > 0 && input_open => due,
                _ => tokio::time::Instant::now(), // full, or no more input coming
            };
            // Unbiased: under sustained input, replay and completions still get their turn.
            tokio::select! {
                Some(done) = self.in_flight.join_next(), if !self.in_flight.is_empty() => {
                    self.finish(done).await;
                }
                received = records.recv_many(&mut buffer, room), if input_open && room > 0 => {
                    if received == 0 {
                        input_open = false; // flush what is buffered, then stop
                    } else if batch_due.is_none() {
                        batch_due = Some(tokio::time::Instant::now() + self.max_delay);
                    }
                }
                () = tokio::time::sleep_until(send_at), if can_send && !buffer.is_empty() => {
                    let mut batch = Batch::default();
                    buffer.drain(..).for_each(|r| batch.push(r));
                    batch_due = None;
                    self.flush(batch).await;
                }
                () = std::future::ready(()), if replay_due => {
                    self.start_replay();
                }
                done = replay_done(&mut self.replaying), if self.replaying.is_some() => {
                    self.replaying = None;
                    self.finish_replay(done).await;
                }
                () = tokio::time::sleep_until(retry_at), if !self.spool.is_empty() && !replay_due && self.replaying.is_none() => {}
            }
        }
        while let Some(done) = self.in_flight.join_next().await {
            self.finish(done).await;
        }
        self.await_replay().await;
        let deadline = Instant::now() + grace;
        while !self.spool.is_empty() && Instant::now() < deadline && self.replay_one().await {}
        if !self.spool.is_empty() {
            tracing::warn!(
                batches = self.spool.pending_records(),
                "stopping with readings still in the spool; they are replayed at the next start"
            );
        }
    }

    /// Sends a batch on its way: behind the spool if it holds anything (order), else to the
    /// database, concurrently with the other writes in flight.
    async fn flush(&mut self, batch: Batch) {
        if !self.spool.is_empty() {
            self.spool_batch(batch);
        } else if self.schema_pending {
            // Migrating must happen once, before any write: no concurrency until it has.
            let done = self.attempt(batch).await;
            self.finish(Ok(done)).await;
        } else {
            let attempt = self.attempt(batch);
            self.in_flight.spawn(attempt);
        }
    }

    /// One database write (migrating first if still pending), bounded by the write timeout.
    fn attempt(
        &self,
        batch: Batch,
    ) -> impl std::future::Future<Output = WriteAttempt> + Send + 'static {
        let (db, schema_pending, timeout) =
            (self.db.clone(), self.schema_pending, self.write_timeout);
        let metrics = self.metrics.clone();
        async move {
            let started = Instant::now();
            let write = async {
                if schema_pending {
                    db.migrate().await?;
                    tracing::info!("database reachable again; schema migrated");
                }
                let mut conflicts = 0;
                loop {
                    match db.write(&batch).await {
                        Err(e) if is_conflict(&e) && conflicts < CONFLICT_RETRIES => {
                            conflicts += 1;
                            IngestMetrics::add(&metrics.write_conflicts, 1);
                            tracing::warn!(error = %e, attempt = conflicts, "a batch write lost a lock conflict with another transaction; writing it again");
                            tokio::time::sleep(CONFLICT_BACKOFF * conflicts).await;
                        }
                        written => break written,
                    }
                }
            };
            let result = match tokio::time::timeout(timeout, write).await {
                Ok(Ok(outcome)) => Ok(outcome),
                Ok(Err(e)) => Err(WriteFailure {
                    message: e.to_string(),
                    // While migrations are pending every write fails the same way; only a
                    // database with our schema can refuse a row. A conflict that outlasted
                    // the retries is no verdict on the rows either: the spool keeps them.
                    refused: !schema_pending && !is_unreachable(&e) && !is_conflict(&e),
                }),
                Err(_) => Err(WriteFailure {
                    message: format!("no answer within {timeout:?}"),
                    refused: false,
                }),
            };
            WriteAttempt {
                batch,
                result,
                elapsed: started.elapsed(),
            }
        }
    }

    /// Books a finished write: counts and acks it, salvages it row by row if the database
    /// refused it, or spools it if the database did not answer.
    async fn finish(&mut self, done: Result<WriteAttempt, tokio::task::JoinError>) {
        let done = match done {
            Ok(done) => done,
            // Only a panic inside SeaORM/sqlx gets here; its batch is gone with the task.
            Err(e) => {
                tracing::error!(error = %e, "a database write task failed; its batch is not acked (agents with an outbox will resend it)");
                return;
            }
        };
        match done.result {
            Ok(outcome) => {
                self.database_succeeded(done.batch.len(), done.elapsed);
                self.count_written(&done.batch, outcome, false);
                self.ack(&done.batch);
            }
            Err(failure) if failure.refused => self.salvage(done.batch, &failure.message).await,
            Err(failure) => {
                self.database_failed(&failure.message);
                self.spool_batch(done.batch);
            }
        }
    }

    /// Writes a batch the database refused one row at a time: every row it takes is stored,
    /// every row it refuses is recorded in `rejected_messages` with the database's reason, and
    /// both are acked (resending a refused reading cannot help). If the database stops
    /// answering meanwhile, what is left goes to the spool.
    async fn salvage(&mut self, batch: Batch, error: &str) {
        tracing::warn!(
            %error,
            readings = batch.readings.len(),
            rejections = batch.rejections.len(),
            "the database refused a batch; writing its rows one by one"
        );
        let mut rows: Vec<Record> = batch.readings.into_iter().map(Record::Reading).collect();
        rows.extend(batch.rejections.into_iter().map(Record::Rejection));
        let mut rows = rows.into_iter();
        while let Some(row) = rows.next() {
            let mut single = Batch::default();
            single.push(row.clone());
            let done = self.attempt(single).await;
            match done.result {
                Ok(outcome) => {
                    self.count_written(&done.batch, outcome, false);
                    self.ack(&done.batch);
                }
                Err(failure) if failure.refused => match row {
                    Record::Reading(reading) => {
                        let rejection = refused_reading(&reading, &failure.message);
                        IngestMetrics::add(&self.metrics.rejected, 1);
                        tracing::warn!(device = %reading.device_id, reason = %rejection.reason, "reading recorded as rejected");
                        let done = self
                            .attempt(Batch {
                                readings: vec![],
                                rejections: vec![rejection],
                            })
                            .await;
                        if let Err(failure) = done.result {
                            tracing::error!(error = %failure.message, device = %reading.device_id, "cannot record a reading the database refused; it is lost");
                        }
                        self.ack(&Batch {
                            readings: vec![reading],
                            rejections: vec![],
                        });
                    }
                    Record::Rejection(rejection) => {
                        tracing::error!(error = %failure.message, topic = %rejection.topic, reason = %rejection.reason, "the database refused a rejected message; it is lost");
                    }
                },
                Err(failure) => {
                    self.database_failed(&failure.message);
                    let mut rest = Batch::default();
                    rest.push(row);
                    rows.for_each(|r| rest.push(r));
                    self.spool_batch(rest);
                    return;
                }
            }
        }
    }

    /// Books a committed batch: the schema is in place and the database is up.
    fn database_succeeded(&mut self, rows: usize, elapsed: Duration) {
        self.schema_pending = false;
        self.metrics.observe_batch(rows, elapsed);
        if self.metrics.database_up.swap(1, Relaxed) == 0 {
            tracing::info!("database is reachable");
        }
    }

    fn database_failed(&mut self, error: &str) {
        self.metrics.database_up.store(0, Relaxed);
        self.next_db_attempt = Instant::now() + self.retry_interval;
        if let Some(suppressed) = self.db_failure_log.ready() {
            tracing::warn!(
                %error,
                suppressed,
                spooled_batches = self.spool.pending_records(),
                "database write failed; readings go to the spool until it is back"
            );
        }
    }

    fn spool_batch(&mut self, batch: Batch) {
        let result = tokio::task::block_in_place(|| self.spool.append(&batch));
        self.publish_spool_size();
        match result {
            Ok(()) => {
                IngestMetrics::add(&self.metrics.spooled, batch.len());
                self.ack(&batch);
            }
            Err(e) => {
                IngestMetrics::add(&self.metrics.spool_refused, batch.len());
                let hint = match e {
                    SpoolError::Full { .. } => {
                        "raise co2.spool_max_bytes or bring the database back"
                    }
                    _ => "check the disk under co2.data_dir",
                };
                tracing::error!(
                    error = %e,
                    readings = batch.readings.len(),
                    rejections = batch.rejections.len(),
                    hint,
                    "cannot spool a batch: it is not stored and not acked (agents with an outbox will resend it)"
                );
            }
        }
    }

    /// Replays the spool's oldest record and waits for it (at shutdown). Returns whether the
    /// spool moved on.
    async fn replay_one(&mut self) -> bool {
        let before = self.spool.pending_records();
        self.start_replay();
        self.await_replay().await;
        self.spool.pending_records() < before
    }

    /// Waits for the replay in flight, if any, and books it.
    async fn await_replay(&mut self) {
        if self.replaying.is_some() {
            let done = replay_done(&mut self.replaying).await;
            self.replaying = None;
            self.finish_replay(done).await;
        }
    }

    /// Sends the spool's oldest record to the database in its own task (see `replaying`), or
    /// skips it if it cannot be read.
    fn start_replay(&mut self) {
        let oldest = tokio::task::block_in_place(|| self.spool.oldest());
        let batch = match oldest {
            Ok(Some(batch)) => batch,
            Ok(None) => return,
            Err(e @ SpoolError::Decode { .. }) => {
                // Its bytes cannot become a batch, now or later: skip it rather than block
                // the spool behind it. If even that fails, `pop_replayed` backs off.
                if let Some(suppressed) = self.spool_failure_log.ready() {
                    tracing::error!(error = %e, suppressed, "skipping an unreadable spool record; its readings are lost");
                }
                self.pop_replayed();
                return;
            }
            Err(e) => {
                // The spool's disk, not the record: nothing is given up, try again later.
                self.spool_failed(&e, "cannot read the spool; replay paused");
                return;
            }
        };
        self.replaying = Some(tokio::spawn(self.attempt(batch)));
    }

    /// Books a finished replay: the record leaves the spool once its rows are stored (or
    /// salvaged); if the database did not answer, it stays and replay waits a retry interval.
    async fn finish_replay(&mut self, done: Result<WriteAttempt, tokio::task::JoinError>) {
        let done = match done {
            Ok(done) => done,
            Err(e) => {
                // A panic inside SeaORM/sqlx: the record stays, and is tried again later.
                self.database_failed(&format!("a replay task failed: {e}"));
                return;
            }
        };
        let (batch, outcome) = match done.result {
            Ok(outcome) => {
                self.database_succeeded(done.batch.len(), done.elapsed);
                (done.batch, outcome)
            }
            Err(failure) if failure.refused => {
                // Salvaged row by row (or, if the database went away meanwhile, spooled
                // again behind the rest): either way this record is done.
                IngestMetrics::add(&self.metrics.replayed, done.batch.len());
                self.salvage(done.batch, &failure.message).await;
                self.pop_replayed();
                return;
            }
            Err(failure) => {
                self.database_failed(&failure.message);
                return;
            }
        };
        self.count_written(&batch, outcome, true);
        self.pop_replayed();
    }

    /// Moves the spool past the record just replayed (or skipped). Returns false, having
    /// backed off, if it could not.
    fn pop_replayed(&mut self) -> bool {
        let popped = tokio::task::block_in_place(|| self.spool.pop_oldest());
        if let Err(e) = &popped {
            self.spool_failed(e, "cannot advance the spool; trying again later");
        }
        self.publish_spool_size();
        if self.spool.is_empty() {
            tracing::info!("spool replayed completely");
        }
        popped.is_ok()
    }

    /// Backs off (the writer would otherwise retry at once, for ever) and says so, at most
    /// once per interval.
    fn spool_failed(&mut self, error: &SpoolError, what: &str) {
        self.next_db_attempt = Instant::now() + self.retry_interval;
        if let Some(suppressed) = self.spool_failure_log.ready() {
            tracing::error!(%error, suppressed, retry_in = ?self.retry_interval, "{what}");
        }
    }

    fn publish_spool_size(&self) {
        self.metrics.spool_bytes.store(self.spool.bytes(), Relaxed);
        self.metrics
            .spool_batches
            .store(self.spool.pending_records(), Relaxed);
    }

    fn count_written(&self, batch: &Batch, outcome: WriteOutcome, replayed: bool) {
        IngestMetrics::add(&self.metrics.stored, outcome.stored as usize);
        IngestMetrics::add(&self.metrics.duplicates, outcome.duplicates as usize);
        if replayed {
            IngestMetrics::add(&self.metrics.replayed, batch.len());
        }
    }

    /// Tells each agent which of its readings are now durable (in the database or spool).
    fn ack(&mut self, batch: &Batch) {
        let mut by_device: HashMap<&DeviceId, Vec<u64>> = HashMap::new();
        for reading in &batch.readings {
            if let Some(seq) = reading.seq {
                by_device
                    .entry(&reading.device_id)
                    .or_default()
                    .push(seq as u64);
            }
        }
        for (device, seqs) in by_device {
            let ack = StorageAck {
                stored: SeqRanges::from_seqs(seqs),
            };
            if !self.acks.send(device, &ack) {
                IngestMetrics::add(&self.metrics.acks_dropped, 1);
            }
        }
    }
}

/// A reading the database would not take, as a rejection: its fields (there is no raw payload
/// any more) and the database's reason.
fn refused_reading(reading: &Reading, error: &str) -> Rejection {
    let payload = serde_json::to_string(reading).unwrap_or_default();
    let reason = format!("database refused the reading: {error}");
    Rejection {
        received_at: reading.received_at,
        topic: truncate_utf8(&reading.topic, Rejection::MAX_TOPIC_BYTES).to_owned(),
        payload: truncate_utf8(&payload, Rejection::MAX_PAYLOAD_BYTES).to_owned(),
        payload_bytes: u32::try_from(payload.len()).unwrap_or(u32::MAX),
        reason: truncate_utf8(&reason, Rejection::MAX_REASON_BYTES).to_owned(),
    }
}

#[cfg(test)]
mod tests {
    //! The writer's state machine against a real SQLite file, with an ack sink that notes, at
    //! the moment of every ack, which of the device's readings the database holds.

    use std::collections::BTreeSet;
    use std::sync::atomic::Ordering::Relaxed;

    use sea_orm::sqlx::{self, Connection, SqliteConnection};
    use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
    use tokio::task::JoinHandle;

    use std::path::Path;

    use super::*;
    use crate::settings::{DatabaseUrl, IngestSettings};

    /// One ack as the agent would see it, and what the database held when it was sent.
    #[derive(Debug)]
    struct Acked {
        device: String,
        seqs: BTreeSet<u64>,
        in_database: BTreeSet<u64>,
    }

    struct RecordingSink {
        acks: mpsc::UnboundedSender<Acked>,
        /// A connection of its own, as a dashboard would have.
        db: DatabaseConnection,
    }

    impl AckSink for RecordingSink {
        fn send(&mut self, device: &DeviceId, ack: &StorageAck) -> bool {
            let handle = tokio::runtime::Handle::current();
            let in_database = tokio::task::block_in_place(|| {
                handle.block_on(stored_seqs(&self.db, device.as_str()))
            });
            let seqs = ack
                .stored
                .ranges()
                .iter()
                .flat_map(|&(a, b)| a..=b)
                .collect();
            self.acks
                .send(Acked {
                    device: device.to_string(),
                    seqs,
                    in_database,
                })
                .is_ok()
        }
    }

    async fn stored_seqs(db: &DatabaseConnection, device: &str) -> BTreeSet<u64> {
        let rows = db
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Sqlite,
                "SELECT seq FROM co2_emissions WHERE device_id = ?",
                [device.into()],
            ))
            .await
            .unwrap();
        rows.iter()
            .map(|r| r.try_get::<i64>("", "seq").unwrap() as u64)
            .collect()
    }

    async fn count(db: &DatabaseConnection, table: &str) -> i64 {
        let row = db
            .query_one_raw(Statement::from_string(
                DbBackend::Sqlite,
                format!("SELECT COUNT(*) AS n FROM {table}"),
            ))
            .await
            .unwrap()
            .unwrap();
        row.try_get("", "n").unwrap()
    }

    fn reading(device: &str, seq: i64) -> Record {
        let t = chrono::DateTime::from_timestamp(1_764_000_000 + seq, 0)
            .unwrap()
            .naive_utc();
        Record::Reading(Reading {
            device_id: DeviceId::new(device).unwrap(),
            topic: format!("co2/{device}"),
            measured_at: t,
            received_at: t,
            co2_ppm: 400.0 + seq as f64,
            seq: Some(seq),
            temperature_c: None,
            humidity_pct: None,
            dedup_key: format!("t{}s{seq}", t.and_utc().timestamp_millis()),
        })
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        url: String,
        /// The test's own view of the database.
        db: DatabaseConnection,
        metrics: Arc<IngestMetrics>,
        acks: mpsc::UnboundedReceiver<Acked>,
        records: mpsc::Sender<Record>,
        writer: JoinHandle<()>,
    }

    fn settings() -> IngestSettings {
        IngestSettings {
            batch_max_rows: 3,
            batch_max_delay_ms: 20,
            db_retry_interval_ms: 100,
            ..IngestSettings::default()
        }
    }

    impl Fixture {
        /// A migrated SQLite database (plus `setup` SQL) and a running writer.
        async fn start(settings: IngestSettings, setup: &[&str]) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}/co2.db?mode=rwc", dir.path().display());
            let database = Database::connect(&DatabaseUrl::new(url.clone()), 4)
                .await
                .unwrap();
            database.migrate().await.unwrap();
            for sql in setup {
                database.connection().execute_unprepared(sql).await.unwrap();
            }
            let db = sea_orm::Database::connect(url.as_str()).await.unwrap();
            let (spool, _) = Spool::open(&dir.path().join("spool"), 1 << 20).unwrap();
            let (acks_tx, acks) = mpsc::unbounded_channel();
            let sink = RecordingSink {
                acks: acks_tx,
                db: db.clone(),
            };
            let metrics = Arc::new(IngestMetrics::default());
            let writer = Writer::new(database, spool, sink, metrics.clone(), &settings, false);
            let (records, records_rx) = mpsc::channel(64);
            let writer = tokio::spawn(writer.run(records_rx, Duration::from_secs(5)));
            Self {
                _dir: dir,
                url,
                db,
                metrics,
                acks,
                records,
                writer,
            }
        }

        async fn send(&self, records: impl IntoIterator<Item = Record>) {
            for record in records {
                self.records.send(record).await.unwrap();
            }
        }

        async fn next_ack(&mut self) -> Acked {
            tokio::time::timeout(Duration::from_secs(20), self.acks.recv())
                .await
                .expect("an ack within 20 s")
                .expect("the writer is running")
        }

        /// Acked seqs per device, until `want` seqs in all were acked.
        async fn acks_for(&mut self, want: usize) -> Vec<Acked> {
            let mut acks = Vec::new();
            while acks.iter().map(|a: &Acked| a.seqs.len()).sum::<usize>() < want {
                acks.push(self.next_ack().await);
            }
            acks
        }

        async fn stop(self) -> (DatabaseConnection, Arc<IngestMetrics>) {
            drop(self.records);
            tokio::time::timeout(Duration::from_secs(20), self.writer)
                .await
                .expect("the writer stops once its input is closed")
                .unwrap();
            (self.db, self.metrics)
        }
    }

    /// Holds SQLite's write lock from another connection, as a long transaction elsewhere
    /// would.
    async fn lock(url: &str) -> SqliteConnection {
        let mut conn = SqliteConnection::connect(url).await.unwrap();
        sqlx::query("BEGIN EXCLUSIVE")
            .execute(&mut conn)
            .await
            .unwrap();
        conn
    }

    async fn unlock(mut conn: SqliteConnection) {
        sqlx::query("COMMIT").execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
    }

    async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done().await {
            assert!(Instant::now() < deadline, "{what}: not within 20 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readings_are_acked_only_once_committed() {
        let mut fx = Fixture::start(settings(), &[]).await;
        fx.send((1..=5).map(|s| reading("pi-1", s))).await;
        fx.send([reading("pi-2", 9)]).await;
        let acks = fx.acks_for(6).await;
        for ack in &acks {
            assert!(
                ack.seqs.is_subset(&ack.in_database),
                "acked before the database held it: {ack:?}"
            );
        }
        let acked = |device: &str| -> BTreeSet<u64> {
            acks.iter()
                .filter(|a| a.device == device)
                .flat_map(|a| a.seqs.iter().copied())
                .collect()
        };
        assert_eq!(acked("pi-1"), (1..=5).collect());
        assert_eq!(acked("pi-2"), BTreeSet::from([9]));
        let (db, metrics) = fx.stop().await;
        assert_eq!(count(&db, "co2_emissions").await, 6);
        assert_eq!(metrics.stored.load(Relaxed), 6);
        assert_eq!(metrics.spooled.load(Relaxed), 0);
        assert_eq!(metrics.database_up.load(Relaxed), 1);
    }

    /// A replay against a database that does not answer takes the whole write timeout; the
    /// loop must not wait for it (it did: the spool then filled at a few batches per timeout,
    /// and readings backed up into the MQTT link).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readings_reach_the_spool_while_a_replay_waits_for_the_database() {
        let settings = IngestSettings {
            db_write_timeout_ms: 3_000,
            db_retry_interval_ms: 10,
            ..settings()
        };
        let mut fx = Fixture::start(settings, &[]).await;
        let lock = lock(&fx.url).await;
        fx.send((1..=3).map(|s| reading("pi-1", s))).await;
        fx.acks_for(3).await; // spooled after one write timeout
                              // The next replay is under way now, and waits its 3 s for the lock.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        fx.send((4..=30).map(|s| reading("pi-1", s))).await;
        let acks = fx.acks_for(27).await;
        let waited = started.elapsed();
        assert!(acks.iter().all(|a| a.in_database.is_empty()), "{acks:?}");
        assert!(
            waited < Duration::from_secs(2),
            "readings waited {waited:?} behind a replay"
        );
        unlock(lock).await;
        let db = fx.db.clone();
        until("the spool replayed into the database", async || {
            stored_seqs(&db, "pi-1").await == (1..=30).collect()
        })
        .await;
        fx.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_that_does_not_answer_sends_batches_to_the_spool_until_it_is_back() {
        let settings = IngestSettings {
            db_write_timeout_ms: 300,
            ..settings()
        };
        let mut fx = Fixture::start(settings, &[]).await;
        let lock = lock(&fx.url).await;
        fx.send((1..=3).map(|s| reading("pi-1", s))).await;
        // Acked once in the spool, although the database has none of it.
        let acks = fx.acks_for(3).await;
        assert!(acks.iter().all(|a| a.in_database.is_empty()), "{acks:?}");
        assert_eq!(fx.metrics.spooled.load(Relaxed), 3);
        assert_eq!(fx.metrics.database_up.load(Relaxed), 0);
        // Later readings queue behind the spool (order), and are acked from there too.
        fx.send((4..=5).map(|s| reading("pi-1", s))).await;
        let later = fx.acks_for(2).await;
        assert!(later.iter().all(|a| a.in_database.is_empty()), "{later:?}");
        assert!(fx.metrics.spool_batches.load(Relaxed) >= 1);

        unlock(lock).await;
        let db = fx.db.clone();
        until("the spool replayed into the database", async || {
            stored_seqs(&db, "pi-1").await == (1..=5).collect()
        })
        .await;
        let metrics = fx.metrics.clone();
        until("the spool emptied", async || {
            metrics.spool_batches.load(Relaxed) == 0
        })
        .await;
        assert_eq!(metrics.spooled.load(Relaxed), 5);
        assert_eq!(metrics.replayed.load(Relaxed), 5);
        assert_eq!(metrics.database_up.load(Relaxed), 1);
        // New input goes straight to the database again.
        fx.send([reading("pi-1", 6)]).await;
        let ack = fx.next_ack().await;
        assert!(ack.in_database.contains(&6), "{ack:?}");
        let (db, metrics) = fx.stop().await;
        assert_eq!(count(&db, "co2_emissions").await, 6);
        assert_eq!(metrics.spooled.load(Relaxed), 5);
        assert_eq!(
            metrics.spool_bytes.load(Relaxed),
            0,
            "replayed segments deleted"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lock_held_briefly_delays_a_write_but_does_not_spool_it() {
        let mut fx = Fixture::start(settings(), &[]).await;
        let lock = lock(&fx.url).await;
        fx.send((1..=3).map(|s| reading("pi-1", s))).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(fx.acks.is_empty(), "nothing is durable yet");
        unlock(lock).await;
        for ack in fx.acks_for(3).await {
            assert!(ack.seqs.is_subset(&ack.in_database), "{ack:?}");
        }
        let (_, metrics) = fx.stop().await;
        assert_eq!(metrics.spooled.load(Relaxed), 0);
        assert_eq!(metrics.stored.load(Relaxed), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_row_is_recorded_as_rejected_and_the_rest_of_its_batch_stored() {
        let refuse_pi_bad = "CREATE TRIGGER refuse_pi_bad BEFORE INSERT ON co2_emissions \
                             WHEN NEW.device_id = 'pi-bad' \
                             BEGIN SELECT RAISE(ABORT, 'pi-bad is refused by a trigger'); END";
        let settings = IngestSettings {
            batch_max_delay_ms: 60_000,
            ..settings()
        };
        let mut fx = Fixture::start(settings, &[refuse_pi_bad]).await;
        // One batch (it leaves when batch_max_rows = 3 are in), the refused row in the middle.
        fx.send([reading("pi-1", 1), reading("pi-bad", 1), reading("pi-1", 2)])
            .await;
        let acks = fx.acks_for(3).await;
        for ack in acks.iter().filter(|a| a.device == "pi-1") {
            assert!(ack.seqs.is_subset(&ack.in_database), "{ack:?}");
        }
        // Resending a refused reading cannot help: it is acked too.
        let bad: Vec<_> = acks.iter().filter(|a| a.device == "pi-bad").collect();
        assert_eq!(bad.len(), 1, "{acks:?}");
        assert_eq!(bad[0].seqs, BTreeSet::from([1]));
        assert!(bad[0].in_database.is_empty());
        let (db, metrics) = fx.stop().await;
        assert_eq!(stored_seqs(&db, "pi-1").await, BTreeSet::from([1, 2]));
        assert_eq!(count(&db, "co2_emissions").await, 2);
        let rejected = db
            .query_one_raw(Statement::from_string(
                DbBackend::Sqlite,
                "SELECT topic, reason, payload FROM rejected_messages",
            ))
            .await
            .unwrap()
            .expect("the refused reading is recorded");
        assert_eq!(
            rejected.try_get::<String>("", "topic").unwrap(),
            "co2/pi-bad"
        );
        let reason: String = rejected.try_get("", "reason").unwrap();
        assert!(
            reason.starts_with("database refused the reading")
                && reason.contains("pi-bad is refused by a trigger"),
            "{reason}"
        );
        let payload: String = rejected.try_get("", "payload").unwrap();
        assert!(payload.contains(r#""device_id":"pi-bad""#), "{payload}");
        assert_eq!(count(&db, "rejected_messages").await, 1);
        assert_eq!(metrics.rejected.load(Relaxed), 1);
        assert_eq!(metrics.stored.load(Relaxed), 2);
        assert_eq!(metrics.spooled.load(Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redelivered_reading_is_stored_once_and_acked_again() {
        let mut fx = Fixture::start(settings(), &[]).await;
        fx.send((1..=3).map(|s| reading("pi-1", s))).await;
        fx.acks_for(3).await;
        // The agent missed the ack and sends the same readings again, plus a new one.
        fx.send((1..=4).map(|s| reading("pi-1", s))).await;
        let again = fx.acks_for(4).await;
        let seqs: BTreeSet<u64> = again.iter().flat_map(|a| a.seqs.clone()).collect();
        assert_eq!(seqs, (1..=4).collect());
        let (db, metrics) = fx.stop().await;
        assert_eq!(count(&db, "co2_emissions").await, 4);
        assert_eq!(metrics.stored.load(Relaxed), 4);
        assert_eq!(metrics.duplicates.load(Relaxed), 3);
    }

    /// A writer on a spool prepared by `prepare`, not running: the test drives replay.
    async fn idle_writer(
        dir: &Path,
        prepare: impl FnOnce(&mut Spool),
    ) -> (Writer, DatabaseConnection, mpsc::UnboundedReceiver<Acked>) {
        let url = format!("sqlite://{}/co2.db?mode=rwc", dir.display());
        let database = Database::connect(&DatabaseUrl::new(url.clone()), 4)
            .await
            .unwrap();
        database.migrate().await.unwrap();
        let db = sea_orm::Database::connect(url.as_str()).await.unwrap();
        let (mut spool, _) = Spool::open(&dir.join("spool"), 1 << 20).unwrap();
        prepare(&mut spool);
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let sink = RecordingSink {
            acks: acks_tx,
            db: db.clone(),
        };
        let settings = IngestSettings {
            db_retry_interval_ms: 60_000,
            ..settings()
        };
        let metrics = Arc::new(IngestMetrics::default());
        let writer = Writer::new(database, spool, sink, metrics, &settings, false);
        (writer, db, acks)
    }

    fn batch_of(records: impl IntoIterator<Item = Record>) -> Batch {
        let mut batch = Batch::default();
        records.into_iter().for_each(|r| batch.push(r));
        batch
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreadable_spool_pauses_replay_instead_of_spinning() {
        let dir = tempfile::tempdir().unwrap();
        let segment = dir.path().join("spool/spool-0000000000.log");
        let (mut writer, db, _acks) = idle_writer(dir.path(), |spool| {
            spool.append(&batch_of([reading("pi-1", 1)])).unwrap();
        })
        .await;
        let bytes = std::fs::read(&segment).unwrap();
        std::fs::remove_file(&segment).unwrap();
        std::fs::create_dir(&segment).unwrap(); // neither readable nor deletable as a file

        let before = Instant::now();
        assert!(!writer.replay_one().await, "no progress");
        assert!(
            writer.next_db_attempt >= before + Duration::from_secs(60),
            "replay waits a retry interval before trying again"
        );
        assert_eq!(
            writer.spool.pending_records(),
            1,
            "an I/O error gives nothing up"
        );

        // The disk is healthy again: the batch is replayed (the next retry, here at once).
        std::fs::remove_dir(&segment).unwrap();
        std::fs::write(&segment, bytes).unwrap();
        assert!(writer.replay_one().await);
        assert!(writer.spool.is_empty());
        assert_eq!(stored_seqs(&db, "pi-1").await, BTreeSet::from([1]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_undecodable_spool_record_is_skipped_and_a_failed_skip_backs_off() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        std::fs::create_dir_all(&spool_dir).unwrap();
        // Intact frames whose bodies are no batch, in front of a good one.
        let good = serde_json::to_vec(&batch_of([reading("pi-1", 2)])).unwrap();
        let mut bytes = co2_proto::framing::encode(b"{\"readings\":7}");
        bytes.extend(co2_proto::framing::encode(&good));
        std::fs::write(spool_dir.join("spool-0000000000.log"), bytes).unwrap();
        let only_junk = spool_dir.join("spool-0000000001.log");
        std::fs::write(&only_junk, co2_proto::framing::encode(b"junk")).unwrap();
        std::fs::write(
            spool_dir.join("spool-0000000002.log"),
            co2_proto::framing::encode(
                &serde_json::to_vec(&batch_of([reading("pi-1", 3)])).unwrap(),
            ),
        )
        .unwrap();
        let (mut writer, db, _acks) = idle_writer(dir.path(), |_| {}).await;
        assert_eq!(writer.spool.pending_records(), 4);

        // Skipped, then the good batch behind it is replayed.
        assert!(writer.replay_one().await);
        assert!(writer.replay_one().await);
        assert_eq!(stored_seqs(&db, "pi-1").await, BTreeSet::from([2]));

        // Skipping fails too (its segment cannot be deleted): replay backs off.
        let before = Instant::now();
        assert!(matches!(
            writer.spool.oldest(),
            Err(SpoolError::Decode { .. })
        ));
        std::fs::remove_file(&only_junk).unwrap();
        std::fs::create_dir(&only_junk).unwrap();
        assert!(!writer.pop_replayed(), "the skip did not happen");
        assert!(writer.next_db_attempt >= before + Duration::from_secs(60));
        std::fs::remove_dir(&only_junk).unwrap();
        assert!(writer.pop_replayed(), "deleted meanwhile: done");
        assert!(writer.replay_one().await);
        assert!(writer.spool.is_empty());
        assert_eq!(stored_seqs(&db, "pi-1").await, BTreeSet::from([2, 3]));
    }
}
