//! `co2-broker rollups rebuild --from TIME --to TIME [--device ID]`: recomputes the rollup
//! tables from the stored readings for a time range ([`crate::storage::rollups::rebuild`]).
//!
//! The broker maintains rollups only for the batches it stores itself; readings adopted from a
//! legacy table, stored before the rollup migration, or edited by hand need this. It runs
//! against the configured database while the broker keeps running: each day of the range is
//! one transaction, and batches stored meanwhile wait for it or are read by it.

use chrono::{NaiveDate, NaiveDateTime};

use crate::settings::IngestSettings;
use crate::storage::retention;
use crate::storage::rollups::{self, Level, Rebuilt};
use crate::storage::Database;

/// `co2-broker rollups …`
#[derive(Debug, clap::Args)]
pub struct RollupsArgs {
    #[command(subcommand)]
    pub action: RollupsAction,
}

#[derive(Debug, PartialEq, Eq, clap::Subcommand)]
pub enum RollupsAction {
    /// Recomputes co2_rollup_minute and co2_rollup_hour from the readings measured in
    /// [--from, --to), widened to whole hours, for one device or all. TIME is UTC:
    /// `2026-11-30`, `2026-11-30 14:00`, `2026-11-30T14:00:00Z` and the like.
    Rebuild(RebuildRange),
}

#[derive(Debug, PartialEq, Eq, clap::Args)]
pub struct RebuildRange {
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub from: NaiveDateTime,
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub to: NaiveDateTime,
    /// Only this device [default: every device]
    #[arg(long, value_name = "ID")]
    pub device: Option<String>,
}

impl RebuildRange {
    /// The range is not empty (clap checks each time, this the two together).
    pub fn check(&self) -> Result<(), String> {
        if self.from >= self.to {
            return Err(format!(
                "--from ({}) must be before --to ({})",
                self.from, self.to
            ));
        }
        Ok(())
    }

    /// The range starts no earlier than the raw readings are kept (`raw_retention_days`, 0:
    /// forever). Before that, the rollups may be all that is left of the readings, and
    /// recomputing them from what remains would erase them.
    pub fn check_retention(
        &self,
        raw_retention_days: u32,
        now: NaiveDateTime,
    ) -> Result<(), String> {
        let Some(first) = retention::first_rebuildable_hour(now, raw_retention_days) else {
            return Ok(());
        };
        if Level::Hour.bucket(self.from) < first {
            return Err(format!(
                "--from {} reaches before the raw readings still kept (co2.raw_retention_days = {raw_retention_days}: \
                 from {}); the rollups there cannot be recomputed and would be erased. \
                 Use --from {first} or later",
                self.from,
                retention::horizon(now, raw_retention_days)
            ));
        }
        Ok(())
    }
}

/// A UTC time as an operator types it: a date, or a date and time with `T` or a space, with
/// or without seconds, fraction and a trailing `Z`.
fn parse_time(text: &str) -> Result<NaiveDateTime, String> {
    let trimmed = text.trim().trim_end_matches('Z').replace('T', " ");
    ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(&trimmed, format).ok())
        .or_else(|| {
            NaiveDate::parse_from_str(&trimmed, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
        })
        .ok_or_else(|| format!("cannot read {text:?} as a UTC time (e.g. 2026-11-30 14:00)"))
}

/// Connects to the configured database (migrating it first if the config allows, so the
/// rollup tables exist) and rebuilds; returns what to print.
pub async fn run(settings: &IngestSettings, args: &RebuildRange) -> anyhow::Result<String> {
    use anyhow::Context;
    args.check_retention(settings.raw_retention_days, chrono::Utc::now().naive_utc())
        .map_err(anyhow::Error::msg)?;
    let db = Database::connect(&settings.database_url, 1)
        .await
        .with_context(|| format!("cannot use database {}", settings.database_url))?;
    if settings.run_migrations {
        db.migrate()
            .await
            .with_context(|| format!("cannot migrate {}", settings.database_url))?;
    }
    let Rebuilt {
        minute_rows,
        hour_rows,
    } = rollups::rebuild(db.connection(), args.from, args.to, args.device.as_deref())
        .await
        .context("rebuilding the rollups failed")?;
    Ok(format!(
        "rebuilt {} from {} to {} (whole hours): {minute_rows} minute rows, {hour_rows} hour rows\n",
        args.device
            .as_deref()
            .map_or("every device".to_owned(), |d| format!("device {d}")),
        args.from,
        args.to,
    ))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// Just the `rollups` subcommand, as the broker's command line nests it.
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        action: RollupsAction,
    }

    fn parse(args: &[&str]) -> Result<RebuildRange, String> {
        let cli = Cli::try_parse_from(std::iter::once("rollups").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        let RollupsAction::Rebuild(range) = cli.action;
        range.check()?;
        Ok(range)
    }

    #[test]
    fn times_are_read_in_the_usual_spellings() {
        let args = parse(&[
            "rebuild",
            "--from",
            "2026-11-30",
            "--to",
            "2026-12-01T06:30:15.5Z",
            "--device",
            "pi-1",
        ])
        .unwrap();
        assert_eq!(args.from.to_string(), "2026-11-30 00:00:00");
        assert_eq!(args.to.to_string(), "2026-12-01 06:30:15.500");
        assert_eq!(args.device.as_deref(), Some("pi-1"));
        assert_eq!(
            parse(&[
                "rebuild",
                "--from",
                "2026-11-30 14:00",
                "--to",
                "2026-11-30 15:00:00"
            ])
            .unwrap()
            .from
            .to_string(),
            "2026-11-30 14:00:00"
        );
    }

    #[test]
    fn mistakes_are_named() {
        assert!(parse(&["rebuild", "--from", "2026-11-30"])
            .unwrap_err()
            .contains("--to"));
        assert!(
            parse(&["rebuild", "--from", "yesterday", "--to", "2026-11-30"])
                .unwrap_err()
                .contains("\"yesterday\"")
        );
        assert!(
            parse(&["rebuild", "--from", "2026-12-01", "--to", "2026-11-30"])
                .unwrap_err()
                .contains("before")
        );
        assert!(parse(&["rebuild", "--from"])
            .unwrap_err()
            .contains("--from"));
        assert!(parse(&["drop"]).unwrap_err().contains("drop"));
    }

    #[test]
    fn a_rebuild_never_reaches_before_the_raw_retention() {
        let now = parse_time("2026-12-02 10:20").unwrap();
        let range = |from: &str| parse(&["rebuild", "--from", from, "--to", "2026-12-02"]).unwrap();
        // Kept from 2026-11-02 10:20: the hour starting 10:00 is partly gone already.
        let refused = range("2026-11-02 10:30")
            .check_retention(30, now)
            .unwrap_err();
        assert!(
            refused.contains("--from 2026-11-02 11:00:00 or later"),
            "{refused}"
        );
        assert!(range("2026-11-02 11:00").check_retention(30, now).is_ok());
        assert!(range("2020-01-01").check_retention(0, now).is_ok());
    }
}
