//! Rollups of live readings, brought up to date shortly after their minute has passed instead
//! of in every batch.
//!
//! A fleet sends each device's readings seconds apart, so a batch holds about one reading per
//! device and minute: kept in the batch's transaction, every stored reading also wrote a minute
//! row (measured: ingest −30 % with one reading per device and minute, `SPACING_MS=60000
//! ./scripts/bench`). Here a batch only marks the buckets it touched, in memory; a flush once
//! a second recomputes the marked minute buckets whose minute has ended (plus a grace for
//! stragglers) from the readings, then their hour buckets from the minute rows. A device that
//! reports every 10 s costs one minute-row write per six readings.
//!
//! Recomputing from the stored readings (rather than adding up what was marked) keeps every
//! bucket exact whatever happened in between: duplicates, redeliveries, spool replays, two
//! brokers writing to one database, a batch committed but timed out and replayed.
//!
//! Only live readings are deferred: measured at most [`LIVE_WINDOW`] before they arrived. Late
//! ones (an agent back after days offline) are rare and keep their rollups in the batch's own
//! transaction ([`super::rollups::maintain`]), so what a crash can lose is bounded in measured
//! time. That is what the marker file is for: it exists while marks may be unflushed, holds the
//! receive time of the oldest unflushed mark, and is touched while the broker runs. A broker that
//! finds it at start (the last run did not stop cleanly) rebuilds the rollups of the measured
//! times that can have been affected before flushing anything new; a clean stop flushes
//! everything and removes it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr};
use tokio_util::sync::CancellationToken;

use super::database::{is_conflict, is_unreachable};
use super::rollups::{self, Level, Span};
use crate::ingest::Reading;
use crate::throttle::Throttle;

/// Readings measured at most this long before they arrived are live: their rollups are
/// deferred. Older ones are late and rolled up in their batch.
pub const LIVE_WINDOW: TimeDelta = TimeDelta::minutes(10);
/// A bucket is recomputed this long after it ended (readings still in flight land first)...
const CLOSE_GRACE: TimeDelta = TimeDelta::seconds(5);
/// ...or once it has been marked this long, whichever comes first: a minute row lags by at most
/// a minute, an hour row by five.
const MINUTE_MAX_DELAY: Duration = Duration::from_secs(60);
const HOUR_MAX_DELAY: Duration = Duration::from_secs(300);
const FLUSH_TICK: Duration = Duration::from_secs(1);
/// Spans per recompute statement.
const SPANS_PER_STATEMENT: usize = 500;
/// How often the marker file is touched while marks are pending.
const MARKER_TOUCH: Duration = Duration::from_secs(10);
/// The marker file in the data dir.
const MARKER: &str = "rollups.pending";

pub fn is_live(reading: &Reading) -> bool {
    reading.measured_at >= reading.received_at - LIVE_WINDOW
}

type Key = (String, NaiveDateTime);

/// Buckets marked and not yet recomputed, with when each was first marked.
#[derive(Debug, Default)]
pub struct PendingRollups {
    inner: Mutex<Marks>,
}

#[derive(Debug, Default)]
struct Marks {
    minutes: BTreeMap<Key, Marked>,
    hours: BTreeMap<Key, Marked>,
}

#[derive(Debug, Clone, Copy)]
struct Marked {
    at: Instant,
    /// Receive time (UTC) of the oldest reading behind the mark, for the marker file.
    received: NaiveDateTime,
}

impl Marks {
    fn level(&mut self, level: Level) -> &mut BTreeMap<Key, Marked> {
        match level {
            Level::Minute => &mut self.minutes,
            Level::Hour => &mut self.hours,
        }
    }
}

impl PendingRollups {
    /// Marks the minute buckets of `readings` (committed live readings).
    pub fn mark<'a>(&self, readings: impl IntoIterator<Item = &'a Reading>) {
        let now = Instant::now();
        let mut marks = self.inner.lock().expect("rollup marks lock");
        for r in readings {
            let key = (
                r.device_id.as_str().to_owned(),
                Level::Minute.bucket(r.measured_at),
            );
            marks
                .minutes
                .entry(key)
                .and_modify(|m| m.received = m.received.min(r.received_at))
                .or_insert(Marked {
                    at: now,
                    received: r.received_at,
                });
        }
    }

    /// Buckets marked, minute and hour.
    pub fn len(&self) -> usize {
        let marks = self.inner.lock().expect("rollup marks lock");
        marks.minutes.len() + marks.hours.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The receive time of the oldest reading whose rollups are not recomputed yet.
    fn oldest_unflushed(&self) -> Option<NaiveDateTime> {
        let marks = self.inner.lock().expect("rollup marks lock");
        marks
            .minutes
            .values()
            .chain(marks.hours.values())
            .map(|m| m.received)
            .min()
    }

    /// Takes the marks of `level` that are due at `now` (all of them with `all`).
    fn take_due(&self, level: Level, now: NaiveDateTime, all: bool) -> Vec<(Key, Marked)> {
        let max_delay = match level {
            Level::Minute => MINUTE_MAX_DELAY,
            Level::Hour => HOUR_MAX_DELAY,
        };
        let mut marks = self.inner.lock().expect("rollup marks lock");
        let map = marks.level(level);
        let due: Vec<Key> = map
            .iter()
            .filter(|((_, start), marked)| {
                all || *start + level.width() + CLOSE_GRACE <= now
                    || marked.at.elapsed() >= max_delay
            })
            .map(|(key, _)| key.clone())
            .collect();
        due.into_iter()
            .filter_map(|key| map.remove_entry(&key))
            .collect()
    }

    /// Puts marks back (their recompute failed), keeping the older of two marks of a bucket.
    fn put_back(&self, level: Level, taken: Vec<(Key, Marked)>) {
        let mut marks = self.inner.lock().expect("rollup marks lock");
        let map = marks.level(level);
        for (key, marked) in taken {
            map.entry(key)
                .and_modify(|m| {
                    m.at = m.at.min(marked.at);
                    m.received = m.received.min(marked.received);
                })
                .or_insert(marked);
        }
    }
}

/// What one flush recomputed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    pub minutes: usize,
    pub hours: usize,
}

/// Recomputes the due minute buckets, then the due hour buckets (those of the minutes just
/// recomputed among them); every bucket with `all`. Marks whose recompute failed stay.
pub async fn flush(
    db: &DatabaseConnection,
    pending: &PendingRollups,
    all: bool,
) -> Result<Flushed, DbErr> {
    let now = Utc::now().naive_utc();
    let minutes = pending.take_due(Level::Minute, now, all);
    if !minutes.is_empty() {
        if let Err(e) = recompute(db, Level::Minute, &minutes).await {
            pending.put_back(Level::Minute, minutes);
            return Err(e);
        }
        let hours = minutes.iter().map(|((device, start), marked)| {
            ((device.clone(), Level::Hour.bucket(*start)), *marked)
        });
        pending.put_back(Level::Hour, hours.collect());
    }
    let hours = pending.take_due(Level::Hour, now, all);
    if !hours.is_empty() {
        if let Err(e) = recompute(db, Level::Hour, &hours).await {
            pending.put_back(Level::Hour, hours);
            return Err(e);
        }
    }
    Ok(Flushed {
        minutes: minutes.len(),
        hours: hours.len(),
    })
}

async fn recompute(
    db: &DatabaseConnection,
    level: Level,
    keys: &[(Key, Marked)],
) -> Result<(), DbErr> {
    // Keys are in key order, so neighbouring buckets of a device merge into one span and
    // concurrent flushes (another broker) lock rows in the same order.
    let mut spans: Vec<Span> = Vec::new();
    for ((device, start), _) in keys {
        let end = *start + level.width();
        match spans.last_mut() {
            Some(last) if last.device_id.as_deref() == Some(device) && last.end == *start => {
                last.end = end;
            }
            _ => spans.push(Span {
                device_id: Some(device.clone()),
                start: *start,
                end,
            }),
        }
    }
    let backend = db.get_database_backend();
    for chunk in spans.chunks(SPANS_PER_STATEMENT) {
        db.execute_raw(rollups::recompute(backend, level, chunk))
            .await?;
    }
    Ok(())
}

/// The measured times whose rollups a run that did not stop cleanly may have left
/// unfinished, from the marker file it left behind; `None` when there is none.
pub fn unfinished_span(
    data_dir: &Path,
    max_future_skew: TimeDelta,
) -> std::io::Result<Option<(NaiveDateTime, NaiveDateTime)>> {
    let path = marker_path(data_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let touched: DateTime<Utc> = std::fs::metadata(&path)?.modified()?.into();
    let touched = touched.naive_utc();
    // Unreadable content (a torn write): assume marks from long before the last touch.
    let since = NaiveDateTime::parse_from_str(text.trim(), "%Y-%m-%d %H:%M:%S%.f")
        .unwrap_or(touched - TimeDelta::days(1))
        .min(touched);
    Ok(Some((
        since - LIVE_WINDOW - TimeDelta::minutes(5),
        touched + max_future_skew + TimeDelta::minutes(1),
    )))
}

fn marker_path(data_dir: &Path) -> PathBuf {
    data_dir.join(MARKER)
}

/// Writes the marker: marks received since `since` may be unflushed.
fn write_marker(path: &Path, since: NaiveDateTime) -> std::io::Result<()> {
    std::fs::write(path, format!("{}\n", since.format("%Y-%m-%d %H:%M:%S%.3f")))
}

/// The flusher: first rebuilds what an unclean stop left (see the module documentation), then
/// flushes every second until `stop`; then flushes everything once more and removes the
/// marker. `stop` must come after the last batch was written.
pub async fn run(
    db: DatabaseConnection,
    pending: std::sync::Arc<PendingRollups>,
    data_dir: PathBuf,
    max_future_skew: TimeDelta,
    stop: CancellationToken,
) {
    let marker = marker_path(&data_dir);
    // When the marker was last written; an old marker found at start counts as written long
    // ago, so it is removed (or rewritten) at the first flush.
    let mut touched: Option<Instant> = None;
    match unfinished_span(&data_dir, max_future_skew) {
        Ok(None) => {}
        Ok(Some((from, to))) => {
            tracing::warn!(%from, %to, "the last run did not stop cleanly: rebuilding the rollups it may have left unfinished");
            loop {
                let rebuilt = tokio::select! {
                    () = stop.cancelled() => return,
                    rebuilt = rollups::rebuild(&db, from, to, None) => rebuilt,
                };
                match rebuilt {
                    Ok(done) => {
                        tracing::info!(
                            minute_rows = done.minute_rows,
                            hour_rows = done.hour_rows,
                            "rollups of the unclean stop rebuilt"
                        );
                        touched = Instant::now().checked_sub(MARKER_TOUCH);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "rebuilding the rollups of the unclean stop failed; trying again in 10 s");
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_secs(10)) => {}
                        }
                    }
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, path = %marker.display(), "cannot read the rollup marker; run `co2-broker rollups rebuild` over the hours before this start if the last run crashed");
        }
    }
    let mut failures = Throttle::new(Duration::from_secs(10));
    let mut ticker = tokio::time::interval(FLUSH_TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            _ = ticker.tick() => false,
        };
        match flush(&db, &pending, stopping).await {
            Ok(_) => {}
            Err(e) => {
                if let Some(suppressed) = failures.ready() {
                    let pending = pending.len();
                    // The database away or busy heals by itself; anything else needs a look.
                    if is_unreachable(&e) || is_conflict(&e) {
                        tracing::warn!(error = %e, suppressed, pending, "recomputing rollups failed; the buckets stay marked and are tried again");
                    } else {
                        tracing::error!(error = %e, suppressed, pending, "recomputing rollups failed; the buckets stay marked and are tried again");
                    }
                }
            }
        }
        // The marker: present while marks may be unflushed, touched while the broker runs.
        match pending.oldest_unflushed() {
            Some(since) if touched.is_none_or(|t| t.elapsed() >= MARKER_TOUCH) => {
                if let Err(e) = write_marker(&marker, since) {
                    tracing::warn!(error = %e, path = %marker.display(), "cannot write the rollup marker");
                }
                touched = Some(Instant::now());
            }
            Some(_) => {}
            None if touched.is_some() || stopping => {
                match std::fs::remove_file(&marker) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(error = %e, path = %marker.display(), "cannot remove the rollup marker")
                    }
                }
                touched = None;
            }
            None => {}
        }
        if stopping {
            if !pending.is_empty() {
                tracing::warn!(
                    pending = pending.len(),
                    "stopping with rollups not recomputed; the next start rebuilds them"
                );
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(device: &str, measured: NaiveDateTime, received: NaiveDateTime) -> Reading {
        Reading {
            device_id: co2_proto::DeviceId::new(device).unwrap(),
            topic: format!("co2/{device}"),
            measured_at: measured,
            received_at: received,
            co2_ppm: 500.0,
            seq: None,
            temperature_c: None,
            humidity_pct: None,
            dedup_key: format!("t{}", measured.and_utc().timestamp_millis()),
        }
    }

    #[test]
    fn readings_up_to_ten_minutes_old_on_arrival_are_live() {
        let now = Utc::now().naive_utc();
        assert!(is_live(&reading("pi", now - TimeDelta::minutes(10), now)));
        assert!(is_live(&reading("pi", now + TimeDelta::hours(1), now)));
        assert!(!is_live(&reading("pi", now - TimeDelta::minutes(11), now)));
    }

    #[test]
    fn ended_minutes_are_due_running_ones_wait_and_all_takes_everything() {
        let now = Utc::now().naive_utc();
        let this_minute = Level::Minute.bucket(now);
        let pending = PendingRollups::default();
        let earlier = this_minute - TimeDelta::minutes(2);
        pending.mark(&[
            reading("pi-a", earlier, now),
            reading("pi-a", earlier + TimeDelta::seconds(30), now),
            reading("pi-b", this_minute + TimeDelta::minutes(1), now),
        ]);
        assert_eq!(pending.len(), 2, "one mark per device and minute");
        let due = pending.take_due(Level::Minute, now, false);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].0, ("pi-a".to_owned(), earlier));
        assert_eq!(pending.len(), 1, "the running minute waits");

        // A failed recompute puts its marks back; the oldest receive time is kept.
        pending.put_back(Level::Minute, due);
        assert_eq!(pending.len(), 2);
        assert_eq!(pending.oldest_unflushed(), Some(now));
        assert_eq!(pending.take_due(Level::Minute, now, true).len(), 2);
        assert!(pending.is_empty());
    }

    #[test]
    fn a_marker_names_the_span_to_rebuild() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            unfinished_span(dir.path(), TimeDelta::hours(24)).unwrap(),
            None
        );
        let since = Utc::now().naive_utc() - TimeDelta::hours(3);
        write_marker(&marker_path(dir.path()), since).unwrap();
        let (from, to) = unfinished_span(dir.path(), TimeDelta::hours(24))
            .unwrap()
            .unwrap();
        assert!(from <= since - LIVE_WINDOW);
        assert!(to >= Utc::now().naive_utc() + TimeDelta::hours(24));
    }
}
