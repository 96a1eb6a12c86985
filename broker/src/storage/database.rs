//! The database behind SeaORM: connect, migrate, and write one batch in one transaction.
//!
//! Readings are written as one multi-row INSERT that skips rows whose identity
//! (`device_id`, `date_time`, `dedup_key`) is already stored: `INSERT IGNORE` on MySQL,
//! `ON CONFLICT DO NOTHING` on SQLite. The affected-row count then tells stored from
//! duplicate.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use migration::{Migrator, MigratorTrait};
use sea_orm::sea_query::Query;
use sea_orm::{
    ConnectOptions, ConnectionTrait, DatabaseConnection, DbBackend, DbErr, RuntimeErr, Statement,
    TransactionTrait, Value,
};

use super::devices::{self, DeviceActivity};
use super::entities::rejected_messages;
use super::rollups;
use crate::ingest::{Batch, Reading, Rejection};
use crate::settings::DatabaseUrl;
use crate::throttle::Throttle;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The sqlx error under a SeaORM error, where there is one.
fn sqlx_error(error: &DbErr) -> Option<&sea_orm::sqlx::Error> {
    match error {
        DbErr::Conn(RuntimeErr::SqlxError(e))
        | DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e)) => Some(e.as_ref()),
        _ => None,
    }
}

/// MariaDB Galera's answer to every statement while a node is not part of the cluster's
/// primary component (still joining, partitioned away, or `wsrep_reject_queries` set for
/// maintenance): 1047, "WSREP has not yet prepared node for application use". It says the
/// cluster is away from this node, nothing about the rows: the batch is spooled and replayed
/// once the node has rejoined, never recorded as refused.
const WSREP_NOT_READY: u16 = 1047;

/// Answers that end a statement for reasons outside it, so they say nothing about its rows:
/// the server is shutting down (1053, a graceful restart), the statement or its connection was
/// killed (1317 `KILL QUERY`, 1927 `KILL CONNECTION`, as a DBA or a proxy does). Taken as
/// "database away": the batch is spooled and replayed, not salvaged row by row (which would
/// record good rows as refused).
const SERVER_SHUTDOWN: u16 = 1053;
const QUERY_INTERRUPTED: u16 = 1317;
const CONNECTION_KILLED: u16 = 1927;

/// The MySQL/MariaDB error number of `error`, if the server answered with one.
fn mysql_error_number(error: &DbErr) -> Option<u16> {
    use sea_orm::sqlx::mysql::MySqlDatabaseError;
    sqlx_error(error)
        .and_then(|e| e.as_database_error())
        .and_then(|e| e.try_downcast_ref::<MySqlDatabaseError>())
        .map(MySqlDatabaseError::number)
}

/// True when `error` says a table does not exist (MySQL 1146, SQLite "no such table"): the
/// schema is older than this broker (migrations pending, or turned off and not run by hand).
pub fn is_missing_table(error: &DbErr) -> bool {
    mysql_error_number(error) == Some(1146)
        || sqlx_error(error)
            .and_then(|e| e.as_database_error())
            .is_some_and(|e| e.message().starts_with("no such table"))
}

/// True when `error` means the database cannot be reached (down, restarting, network, or a
/// Galera node outside the primary component), as opposed to refusing what was asked (bad
/// credentials, SQL errors).
pub fn is_unreachable(error: &DbErr) -> bool {
    use sea_orm::sqlx::Error as Sqlx;
    matches!(error, DbErr::ConnectionAcquire(_))
        || sqlx_error(error).is_some_and(|e| {
            matches!(
                e,
                Sqlx::Io(_)
                    | Sqlx::PoolTimedOut
                    | Sqlx::PoolClosed
                    | Sqlx::WorkerCrashed
                    | Sqlx::Protocol(_)
            )
        })
        || matches!(
            mysql_error_number(error),
            Some(WSREP_NOT_READY | SERVER_SHUTDOWN | QUERY_INTERRUPTED | CONNECTION_KILLED)
        )
}

/// True when `error` is a lock conflict with another transaction, which the database resolved
/// by rolling this one back: a deadlock (MySQL 1213) or a lock wait timeout (1205), or a busy
/// or locked SQLite file. Writing the same batch again is the cure; neither the database
/// being away nor it refusing a row. On MariaDB Galera a write set that lost certification
/// against another node's (the same row written on two nodes at once) is rolled back with
/// the same 1213, at COMMIT, and is cured the same way.
pub fn is_conflict(error: &DbErr) -> bool {
    if let Some(number) = mysql_error_number(error) {
        return matches!(number, 1205 | 1213);
    }
    let Some(database) = sqlx_error(error).and_then(|e| e.as_database_error()) else {
        return false;
    };
    // SQLite: SQLITE_BUSY (5) and SQLITE_LOCKED (6), in their extended forms too.
    database
        .code()
        .and_then(|code| code.parse::<u32>().ok())
        .is_some_and(|code| matches!(code & 0xff, 5 | 6))
}

/// What a write did with the readings of a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    pub stored: u64,
    pub duplicates: u64,
    pub rejections: u64,
}

#[derive(Clone)]
pub struct Database {
    conn: DatabaseConnection,
    activity: Arc<DeviceActivity>,
    /// Throttles the log of rollup updates the database refused (see [`rollups`]).
    rollup_failures: Arc<Mutex<Throttle>>,
}

impl Database {
    /// Prepares the pool without connecting yet (creating the SQLite file's directory): a
    /// broker must come up and spool even when the database is down at start.
    pub async fn connect(url: &DatabaseUrl, pool_size: u32) -> Result<Self, DbErr> {
        url.create_sqlite_dir()
            .map_err(|e| DbErr::Custom(e.to_string()))?;
        let mut options = ConnectOptions::new(url.expose());
        options
            .max_connections(pool_size)
            .min_connections(0)
            .connect_timeout(CONNECT_TIMEOUT)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_lazy(true)
            .sqlx_logging(false)
            // WAL: readers (dashboards, tests) never block the writer; NORMAL stays durable
            // across process crashes and fsyncs only at checkpoints.
            .map_sqlx_sqlite_opts(|o| {
                o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
            });
        let conn = sea_orm::Database::connect(options).await?;
        Ok(Self {
            conn,
            activity: Arc::default(),
            rollup_failures: Arc::new(Mutex::new(Throttle::new(Duration::from_secs(10)))),
        })
    }

    pub async fn migrate(&self) -> Result<(), DbErr> {
        Migrator::up(&self.conn, None).await
    }

    pub fn connection(&self) -> &DatabaseConnection {
        &self.conn
    }

    pub fn backend(&self) -> DbBackend {
        self.conn.get_database_backend()
    }

    /// Writes every reading and rejection of `batch` in one transaction, with the `devices`
    /// rows that are due (see [`super::devices`]) and the rollups (see [`super::rollups`]).
    pub async fn write(&self, batch: &Batch) -> Result<WriteOutcome, DbErr> {
        let txn = self.conn.begin().await?;
        let stored = match self.insert_readings(&batch.readings) {
            Some(stmt) => txn.execute_raw(stmt).await?.rows_affected(),
            None => 0,
        };
        if let Some(stmt) = self.insert_rejections(&batch.rejections) {
            txn.execute_raw(stmt).await?;
        }
        // Last, so the device and rollup rows (which every concurrent batch may want) stay
        // locked for as short a time as possible.
        let seen = self.activity.due(&batch.readings);
        if !seen.is_empty() {
            txn.execute_raw(devices::upsert(self.backend(), &seen))
                .await?;
        }
        rollups::maintain_or_log(&txn, &batch.readings, stored, &self.rollup_failures).await?;
        txn.commit().await?;
        self.activity.written(seen);
        Ok(WriteOutcome {
            stored,
            duplicates: batch.readings.len() as u64 - stored,
            rejections: batch.rejections.len() as u64,
        })
    }

    /// The readings' INSERT, written out rather than built with sea-query: the builder copies
    /// every value once more on its way into the statement, and with a thousand rows per batch
    /// building was a fifth of the broker's CPU per reading at full load.
    fn insert_readings(&self, readings: &[Reading]) -> Option<Statement> {
        if readings.is_empty() {
            return None;
        }
        let backend = self.backend();
        // Most sensors measure CO2 only: leaving the two climate columns out of such batches
        // saves 2 of 9 bound parameters per row, which the database pays for per parameter.
        let with_climate = readings
            .iter()
            .any(|r| r.temperature_c.is_some() || r.humidity_pct.is_some());
        let (columns, row) = if with_climate {
            (
                "date_time, emissions, device_id, topic, received_at, seq, dedup_key, \
                 temperature, humidity",
                "(?,?,?,?,?,?,?,?,?)",
            )
        } else {
            (
                "date_time, emissions, device_id, topic, received_at, seq, dedup_key",
                "(?,?,?,?,?,?,?)",
            )
        };
        // MySQL: INSERT IGNORE, since ON DUPLICATE KEY UPDATE would count duplicates as
        // affected rows (sqlx sets CLIENT_FOUND_ROWS). Both skip only rows the identity
        // (device_id, date_time, dedup_key) already holds.
        let (insert, on_conflict) = match backend {
            DbBackend::MySql => ("INSERT IGNORE INTO", ""),
            _ => (
                "INSERT INTO",
                " ON CONFLICT (device_id, date_time, dedup_key) DO NOTHING",
            ),
        };
        let mut sql = format!("{insert} co2_emissions ({columns}) VALUES ");
        sql.reserve(readings.len() * (row.len() + 1) + on_conflict.len());
        for i in 0..readings.len() {
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(row);
        }
        sql.push_str(on_conflict);

        let mut values: Vec<Value> = Vec::with_capacity(readings.len() * 9);
        for r in readings {
            values.extend([
                r.measured_at.into(),
                r.co2_ppm.into(),
                r.device_id.as_str().into(),
                r.topic.as_str().into(),
                r.received_at.into(),
                r.seq.into(),
                r.dedup_key.as_str().into(),
            ]);
            if with_climate {
                values.extend([r.temperature_c.into(), r.humidity_pct.into()]);
            }
        }
        Some(Statement::from_sql_and_values(backend, sql, values))
    }

    fn insert_rejections(&self, rejections: &[Rejection]) -> Option<Statement> {
        use rejected_messages::Column as C;
        if rejections.is_empty() {
            return None;
        }
        let mut insert = Query::insert();
        insert.into_table(rejected_messages::Entity).columns([
            C::ReceivedAt,
            C::Topic,
            C::Payload,
            C::PayloadBytes,
            C::Reason,
        ]);
        for r in rejections {
            insert.values_panic([
                r.received_at.into(),
                r.topic.as_str().into(),
                r.payload.as_str().into(),
                (r.payload_bytes as i64).into(),
                r.reason.as_str().into(),
            ]);
        }
        Some(self.backend().build(&insert))
    }
}
