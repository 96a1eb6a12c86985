//! Keeps the `devices` table ("when was each device first and last heard from") current at a
//! cost that does not grow with the reading rate.
//!
//! Why a table and not an index on the readings: an index on `(device_id, received_at)` cost
//! the database ~1.5 µs of CPU for every stored reading, to answer a question (which devices
//! went silent) that needs one row per device. Here a batch upserts a device only when the row
//! this process last wrote for it is [`RESOLUTION`] or more behind, so a busy device costs one
//! upserted row per few seconds, and `last_seen` is never staler than that. The upsert runs in
//! the batch's own transaction: what the table says was seen has been stored.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use chrono::{NaiveDateTime, TimeDelta};
use sea_orm::sea_query::{Expr, OnConflict, Query};
use sea_orm::{DbBackend, Statement};

use super::entities::devices;
use crate::ingest::Reading;

/// How far behind `devices.last_seen` may lag the newest stored reading of a device.
pub const RESOLUTION: TimeDelta = TimeDelta::seconds(5);

/// The span of receive times a batch holds for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub device_id: String,
    pub first: NaiveDateTime,
    pub last: NaiveDateTime,
}

/// What this process last wrote to `devices`, per device.
#[derive(Debug, Default)]
pub struct DeviceActivity {
    written: Mutex<HashMap<String, NaiveDateTime>>,
}

impl DeviceActivity {
    /// The devices of `readings` whose row is due for an update, in device order (concurrent
    /// batches then lock the rows in the same order and cannot deadlock on them).
    pub fn due(&self, readings: &[Reading]) -> Vec<Seen> {
        let mut spans: BTreeMap<&str, (NaiveDateTime, NaiveDateTime)> = BTreeMap::new();
        for r in readings {
            spans
                .entry(r.device_id.as_str())
                .and_modify(|(first, last)| {
                    *first = (*first).min(r.received_at);
                    *last = (*last).max(r.received_at);
                })
                .or_insert((r.received_at, r.received_at));
        }
        let written = self.written.lock().expect("device activity lock");
        spans
            .into_iter()
            .filter(|(device, (_, last))| {
                written
                    .get(*device)
                    .is_none_or(|seen| *last >= *seen + RESOLUTION)
            })
            .map(|(device, (first, last))| Seen {
                device_id: device.to_owned(),
                first,
                last,
            })
            .collect()
    }

    /// Records rows that a committed transaction wrote.
    pub fn written(&self, rows: Vec<Seen>) {
        let mut written = self.written.lock().expect("device activity lock");
        for row in rows {
            let seen = written.entry(row.device_id).or_insert(row.last);
            *seen = (*seen).max(row.last);
        }
    }
}

/// Inserts the devices or moves their `first_seen`/`last_seen` outwards; a replayed old batch
/// never moves `last_seen` back.
pub fn upsert(backend: DbBackend, rows: &[Seen]) -> Statement {
    use devices::Column as C;
    let mut insert = Query::insert();
    insert
        .into_table(devices::Entity)
        .columns([C::DeviceId, C::FirstSeen, C::LastSeen]);
    for row in rows {
        insert.values_panic([
            row.device_id.as_str().into(),
            row.first.into(),
            row.last.into(),
        ]);
    }
    let (first, last) = match backend {
        DbBackend::Sqlite => (
            "MIN(first_seen, excluded.first_seen)",
            "MAX(last_seen, excluded.last_seen)",
        ),
        _ => (
            "LEAST(first_seen, VALUES(first_seen))",
            "GREATEST(last_seen, VALUES(last_seen))",
        ),
    };
    insert.on_conflict(
        OnConflict::column(C::DeviceId)
            .value(C::FirstSeen, Expr::cust(first))
            .value(C::LastSeen, Expr::cust(last))
            .to_owned(),
    );
    backend.build(&insert)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(device: &str, received_ms: i64) -> Reading {
        let t = chrono::DateTime::from_timestamp_millis(received_ms)
            .unwrap()
            .naive_utc();
        Reading {
            device_id: co2_proto::DeviceId::new(device).unwrap(),
            topic: format!("co2/{device}"),
            measured_at: t,
            received_at: t,
            co2_ppm: 420.0,
            seq: None,
            temperature_c: None,
            humidity_pct: None,
            dedup_key: format!("t{received_ms}"),
        }
    }

    #[test]
    fn a_device_is_due_once_per_resolution() {
        let activity = DeviceActivity::default();
        let batch = [
            reading("b", 1_000),
            reading("a", 2_000),
            reading("b", 3_000),
        ];
        let due = activity.due(&batch);
        assert_eq!(
            due.iter().map(|s| s.device_id.as_str()).collect::<Vec<_>>(),
            ["a", "b"],
            "every new device, in device order"
        );
        assert_eq!(
            (due[1].first, due[1].last),
            (batch[0].received_at, batch[2].received_at)
        );
        // Not recorded until committed: a failed write leaves them due.
        assert_eq!(activity.due(&batch).len(), 2);
        activity.written(due);

        assert!(activity.due(&[reading("b", 7_999)]).is_empty());
        assert_eq!(activity.due(&[reading("b", 8_000)]).len(), 1);
        assert!(
            activity.due(&[reading("a", 500)]).is_empty(),
            "older than what was written"
        );
    }

    #[test]
    fn upsert_never_moves_last_seen_back() {
        let rows = DeviceActivity::default().due(&[reading("a", 1_000)]);
        let mysql = upsert(DbBackend::MySql, &rows).sql;
        assert!(mysql.contains("ON DUPLICATE KEY UPDATE"), "{mysql}");
        assert!(
            mysql.contains("GREATEST(last_seen, VALUES(last_seen))"),
            "{mysql}"
        );
        let sqlite = upsert(DbBackend::Sqlite, &rows).sql;
        assert!(
            sqlite.contains("MAX(last_seen, excluded.last_seen)"),
            "{sqlite}"
        );
    }
}
