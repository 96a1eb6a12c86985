//! Time RANGE partitions of the tables that grow with every reading (MySQL/MariaDB only).
//!
//! Each of [`PARTITIONED_TABLES`] is partitioned by `RANGE COLUMNS` on its time column, so
//! retention drops a whole partition (a file) instead of deleting millions of rows, and a
//! dashboard's time filter reads only the partitions of its range. The layout:
//!
//! - `p_start`: everything before the first bound (whatever is oldest, however old);
//! - `p<YYYYMMDD>`: one partition per day or per month, named after the day it starts;
//! - `p_future`: `MAXVALUE`, a safety net that is kept empty by adding partitions ahead of
//!   time (a reading never fails for want of a partition).
//!
//! Migration 5 creates the layout; the broker keeps it going (`storage::retention`). Both
//! name and bound partitions with the helpers here, so they always agree.

use chrono::{Datelike, Months, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta};

/// A table partitioned by time: its name and the column that says when a row happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionedTable {
    pub name: &'static str,
    pub time_column: &'static str,
}

/// The raw readings (by measured time) and both rollups (by bucket start).
pub const READINGS: PartitionedTable = PartitionedTable {
    name: "co2_emissions",
    time_column: "date_time",
};
pub const MINUTE_ROLLUPS: PartitionedTable = PartitionedTable {
    name: "co2_rollup_minute",
    time_column: "bucket_start",
};
pub const HOUR_ROLLUPS: PartitionedTable = PartitionedTable {
    name: "co2_rollup_hour",
    time_column: "bucket_start",
};
pub const PARTITIONED_TABLES: [PartitionedTable; 3] = [READINGS, MINUTE_ROLLUPS, HOUR_ROLLUPS];

/// The first partition, holding everything before the first dated one.
pub const START_PARTITION: &str = "p_start";
/// The last partition (`VALUES LESS THAN (MAXVALUE)`).
pub const FUTURE_PARTITION: &str = "p_future";

/// How much time one dated partition covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    Day,
    Month,
}

impl Width {
    /// The bound after `bound`: the next midnight, or the first of the next month. Bounds that
    /// are not aligned (made by hand) are aligned by the partition that follows them.
    pub fn next_bound(self, bound: NaiveDateTime) -> NaiveDateTime {
        let date = bound.date();
        let next = match self {
            Width::Day => date + TimeDelta::days(1),
            Width::Month => month_start(date) + Months::new(1),
        };
        next.and_time(NaiveTime::MIN)
    }
}

/// Midnight of the first day of `date`'s month.
pub fn month_start(date: NaiveDate) -> NaiveDate {
    date.with_day(1).expect("every month has a first day")
}

/// The name of the partition whose rows start at `start`; [`START_PARTITION`] for the first
/// one, which has no start.
pub fn partition_name(start: Option<NaiveDateTime>) -> String {
    match start {
        None => START_PARTITION.to_owned(),
        Some(start) if start.time() == NaiveTime::MIN => start.format("p%Y%m%d").to_string(),
        Some(start) => start.format("p%Y%m%d%H%M%S").to_string(),
    }
}

/// `bound` as the SQL literal of a `VALUES LESS THAN` clause.
pub fn bound_literal(bound: NaiveDateTime) -> String {
    bound.format("'%Y-%m-%d %H:%M:%S'").to_string()
}

/// One partition's `VALUES LESS THAN` as `information_schema.PARTITIONS` shows it
/// (`'2026-12-01'`, `'2026-12-01 00:00:00'`, `MAXVALUE`): `None` for `MAXVALUE`.
pub fn parse_bound(description: &str) -> Result<Option<NaiveDateTime>, String> {
    let text = description.trim();
    if text.eq_ignore_ascii_case("MAXVALUE") {
        return Ok(None);
    }
    let unquoted = text.trim_matches('\'');
    NaiveDateTime::parse_from_str(unquoted, "%Y-%m-%d %H:%M:%S%.f")
        .or_else(|_| {
            NaiveDate::parse_from_str(unquoted, "%Y-%m-%d").map(|d| d.and_time(NaiveTime::MIN))
        })
        .map(Some)
        .map_err(|e| format!("partition bound {description:?} is not a time: {e}"))
}

/// `PARTITION name VALUES LESS THAN (bound)` for the partition `[start, bound)`, or `p_start`
/// when it has no start.
pub fn partition_clause(start: Option<NaiveDateTime>, bound: NaiveDateTime) -> String {
    format!(
        "PARTITION {} VALUES LESS THAN ({})",
        partition_name(start),
        bound_literal(bound)
    )
}

/// `PARTITION <name> VALUES LESS THAN (MAXVALUE)`; `name` is [`FUTURE_PARTITION`] unless an
/// operator named it otherwise.
pub fn future_clause(name: &str) -> String {
    format!("PARTITION {name} VALUES LESS THAN (MAXVALUE)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap()
    }

    #[test]
    fn bounds_advance_by_day_and_month_and_realign() {
        assert_eq!(
            Width::Day.next_bound(at("2026-12-31 00:00:00")),
            at("2027-01-01 00:00:00")
        );
        assert_eq!(
            Width::Month.next_bound(at("2026-12-03 00:00:00")),
            at("2027-01-01 00:00:00")
        );
        assert_eq!(
            Width::Month.next_bound(at("2027-01-31 00:00:00")),
            at("2027-02-01 00:00:00")
        );
        assert_eq!(
            Width::Day.next_bound(at("2026-12-03 06:30:00")),
            at("2026-12-04 00:00:00")
        );
    }

    #[test]
    fn bounds_read_back_as_written_and_as_mariadb_shows_them() {
        let t = at("2026-12-01 00:00:00");
        assert_eq!(parse_bound(&bound_literal(t)), Ok(Some(t)));
        assert_eq!(parse_bound("'2026-12-01'"), Ok(Some(t)));
        assert_eq!(parse_bound("MAXVALUE"), Ok(None));
        assert!(parse_bound("TO_DAYS(x)").is_err());
        assert_eq!(partition_name(Some(t)), "p20261201");
        assert_eq!(
            partition_name(Some(at("2026-12-01 06:00:00"))),
            "p20261201060000"
        );
        assert_eq!(partition_name(None), "p_start");
    }
}
