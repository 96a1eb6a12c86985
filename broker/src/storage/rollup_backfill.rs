//! Fills the rollups of readings stored before the rollup tables existed (an upgraded
//! installation, an adopted legacy table), in the background, so nobody has to remember
//! `co2-broker rollups rebuild` after upgrading.
//!
//! Migration 6 records the span in `rollup_backfill`. The broker rebuilds it one day at a time,
//! newest first (recent history is what dashboards show first), and after each day shrinks the
//! recorded span: a restart resumes where it stopped. Between days it rests as long as the day
//! took, so the backfill takes at most half of the time the database could give it, and
//! batches of new readings keep their place. Rebuilding is idempotent: two brokers on one
//! database (Galera) may both work on the span; they then do some days twice, no harm.
//! Days before the raw retention horizon are skipped: their readings may be gone, and the
//! rollups there would be erased rather than filled.

use std::time::{Duration, Instant};

use chrono::{NaiveDateTime, TimeDelta, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, Statement};
use tokio_util::sync::CancellationToken;

use super::database::{is_missing_table, is_unreachable};
use super::retention;
use super::rollups;

/// Rebuilt per step.
const STEP: TimeDelta = TimeDelta::days(1);
/// Least rest between steps, however quick the step was.
const MIN_REST: Duration = Duration::from_millis(100);
const RETRY_AWAY: Duration = Duration::from_secs(30);
const RETRY_FAILED: Duration = Duration::from_secs(300);

/// The span still to fill, `[from, to)` in measured time; `None` when there is none.
pub async fn remaining(
    db: &impl ConnectionTrait,
) -> Result<Option<(NaiveDateTime, NaiveDateTime)>, DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT readings_from, readings_to FROM rollup_backfill WHERE id = 1",
        ))
        .await?;
    row.map(|row| {
        Ok((
            row.try_get("", "readings_from")?,
            row.try_get("", "readings_to")?,
        ))
    })
    .transpose()
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Rebuilt `[from, to)`; more remains.
    Filled {
        from: NaiveDateTime,
        to: NaiveDateTime,
    },
    /// The span is done (or was never there).
    Done,
}

/// Rebuilds the newest day of the remaining span and records the rest. `raw_retention_days`
/// (0: forever) bounds how far back it goes, as of `now`.
pub async fn step(
    db: &DatabaseConnection,
    raw_retention_days: u32,
    now: NaiveDateTime,
) -> Result<Step, DbErr> {
    let Some((from, to)) = remaining(db).await? else {
        return Ok(Step::Done);
    };
    let floor = retention::first_rebuildable_hour(now, raw_retention_days)
        .map_or(from, |first| from.max(first));
    if to <= floor {
        db.execute_unprepared("DELETE FROM rollup_backfill WHERE id = 1")
            .await?;
        return Ok(Step::Done);
    }
    let start = floor.max(to - STEP);
    rollups::rebuild(db, start, to, None).await?;
    // Only if nobody else moved it meanwhile (another broker); either way the day is done.
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "UPDATE rollup_backfill SET readings_to = ? WHERE id = 1 AND readings_to = ?",
        [start.into(), to.into()],
    ))
    .await?;
    Ok(Step::Filled { from: start, to })
}

/// Steps until the span is done or `stop`.
pub async fn run(db: DatabaseConnection, raw_retention_days: u32, stop: CancellationToken) {
    let mut announced = false;
    let mut told_missing = false;
    loop {
        let began = Instant::now();
        let outcome = tokio::select! {
            () = stop.cancelled() => return,
            outcome = step(&db, raw_retention_days, Utc::now().naive_utc()) => outcome,
        };
        let rest = match outcome {
            Ok(Step::Done) => {
                if announced {
                    tracing::info!("rollups of the readings stored before the rollup tables existed are complete");
                }
                return;
            }
            Ok(Step::Filled { from, to }) => {
                if !announced {
                    tracing::info!(
                        "filling the rollups of readings stored before the rollup tables existed, newest day first, in the background (what remains: table rollup_backfill)"
                    );
                    announced = true;
                }
                tracing::debug!(%from, %to, "rollups filled");
                began.elapsed().max(MIN_REST)
            }
            Err(e) if is_unreachable(&e) => RETRY_AWAY,
            // The schema is not migrated yet (the database was away at start, or migrations
            // are run by hand): the table comes with migration 6.
            Err(e) if is_missing_table(&e) => {
                if !told_missing {
                    tracing::warn!(error = %e, "rollup backfill waits for migration 6; trying again in 5 minutes");
                    told_missing = true;
                }
                RETRY_FAILED
            }
            Err(e) => {
                tracing::error!(error = %e, "filling old rollups failed; trying again in 5 minutes");
                RETRY_FAILED
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(rest) => {}
        }
    }
}
