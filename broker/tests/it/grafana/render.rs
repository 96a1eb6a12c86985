//! Grafana's rendering of a MySQL panel query into the SQL the server receives, modelled from
//! Grafana's behaviour as read in its sources (the dashboard's template-variable interpolation,
//! and `macros.go` of the MySQL data source plugin 13.0.2, whose expansions the older core
//! `pkg/tsdb/mysql/macros.go` matches) and checked by running the rendered queries on MariaDB.
//! No Grafana code is copied.
//!
//! Grafana renders in three steps, and so does [`render`]:
//! 1. the frontend replaces dashboard variables (`$name`, `${name}`, `${name:format}`,
//!    `[[name]]`), `$__interval` / `$__interval_ms` and the range globals `$__from` / `$__to`
//!    (epoch milliseconds);
//! 2. the backend replaces `$__unixEpochFrom()` / `$__unixEpochTo()` (here: with the macros);
//! 3. the MySQL plugin expands every `$name(args)` macro: the arguments are the text up to the
//!    first `)`, split on `,` and trimmed.
//!
//! Where Grafana would send SQL that is certainly broken (an unknown variable left in place,
//! a macro without its column, an unknown fill mode) the model fails early with a message
//! instead, so the test names the cause rather than a MySQL syntax error.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// The dashboard's time range; `$__timeFilter` and friends use whole epoch seconds of it.
#[derive(Debug, Clone, Copy)]
pub struct TimeRange {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// The value of one dashboard variable as Grafana's SQL data source sees it.
#[derive(Debug, Clone)]
pub enum VariableValue {
    /// A variable that is neither multi-value nor has "All": inserted unquoted, `'` doubled.
    Single(String),
    /// A multi-value or include-All variable (also with one value selected): every value is
    /// quoted as a MySQL string literal and the literals are joined with `,`.
    Multi(Vec<String>),
}

/// Everything a query is rendered against.
#[derive(Debug, Clone)]
pub struct Scope {
    pub range: TimeRange,
    /// `$__interval`: Grafana's bucket width for the panel (never below the data source's
    /// `timeInterval`).
    pub interval: Duration,
    pub variables: Vec<(String, VariableValue)>,
}

impl Scope {
    fn variable(&self, name: &str) -> Option<&VariableValue> {
        self.variables
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, value)| value)
    }
}

/// Renders `sql` the way Grafana does before sending it to MySQL.
pub fn render(sql: &str, scope: &Scope) -> Result<String, String> {
    let sql = interpolate_variables(sql, scope)?;
    expand_macros(&sql, scope.range)
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Step 1: dashboard variables and the interval globals, as the frontend does.
fn interpolate_variables(sql: &str, scope: &Scope) -> Result<String, String> {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(pos) = rest.find(['$', '[']) {
        out.push_str(&rest[..pos]);
        rest = &rest[pos..];
        let (reference, consumed) = if let Some(braced) = rest.strip_prefix("${") {
            let end = braced
                .find('}')
                .ok_or_else(|| format!("unterminated ${{ in {sql:?}"))?;
            (Some(&braced[..end]), end + 3)
        } else if let Some(bracketed) = rest.strip_prefix("[[") {
            let end = bracketed
                .find("]]")
                .ok_or_else(|| format!("unterminated [[ in {sql:?}"))?;
            (Some(&bracketed[..end]), end + 4)
        } else if let Some(after) = rest.strip_prefix('$') {
            let name_len = after.find(|c| !is_word(c)).unwrap_or(after.len());
            let name = &after[..name_len];
            if name.is_empty() || after[name_len..].starts_with('(') {
                // A lone `$`, or a macro call: the plugin's business (step 3).
                (None, 1 + name_len)
            } else {
                (Some(name), 1 + name_len)
            }
        } else {
            (None, 1)
        };
        match reference {
            Some(reference) => out.push_str(&substitute(reference, scope)?),
            None => out.push_str(&rest[..consumed]),
        }
        rest = &rest[consumed..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The text for one `name` or `name:format` reference.
fn substitute(reference: &str, scope: &Scope) -> Result<String, String> {
    let (name, format) = match reference.split_once(':') {
        Some((name, format)) => (name, Some(format)),
        None => (reference, None),
    };
    let millis = |t: DateTime<Utc>| t.timestamp_millis();
    match (name, format) {
        ("__interval", None) => return Ok(format_interval(scope.interval)),
        ("__interval_ms", None) => return Ok(scope.interval.as_millis().to_string()),
        // The range globals: epoch milliseconds by default, whole seconds with
        // `:date:seconds` (the other date formats are not modelled).
        ("__from", None) => return Ok(millis(scope.range.from).to_string()),
        ("__to", None) => return Ok(millis(scope.range.to).to_string()),
        ("__from", Some("date:seconds")) => return Ok(scope.range.from.timestamp().to_string()),
        ("__to", Some("date:seconds")) => return Ok(scope.range.to.timestamp().to_string()),
        ("__interval" | "__interval_ms" | "__from" | "__to", Some(other)) => {
            return Err(format!(
                "${{{name}:{other}}}: format not modelled by the test"
            ))
        }
        _ => {}
    }
    let value = scope.variable(name).ok_or_else(|| {
        format!("${name} is not a dashboard variable (Grafana would send it as is)")
    })?;
    let quote = |v: &str| format!("'{}'", v.replace('\'', "''"));
    Ok(match (format, value) {
        (None, VariableValue::Single(v)) => v.replace('\'', "''"),
        (None | Some("sqlstring"), VariableValue::Multi(values)) => values
            .iter()
            .map(|v| quote(v))
            .collect::<Vec<_>>()
            .join(","),
        (Some("sqlstring"), VariableValue::Single(v)) => quote(v),
        (Some("raw" | "csv"), VariableValue::Single(v)) => v.clone(),
        (Some("raw" | "csv"), VariableValue::Multi(values)) => values.join(","),
        (Some(other), _) => {
            return Err(format!(
                "${{{name}:{other}}}: format not modelled by the test"
            ))
        }
    })
}

/// Grafana's `$__interval` text: the largest whole unit, truncated (90 s prints `1m`).
pub fn format_interval(interval: Duration) -> String {
    const UNITS: [(&str, u128); 6] = [
        ("y", 365 * 86_400_000),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ];
    let ms = interval.as_millis();
    UNITS
        .iter()
        .find(|(_, unit)| ms >= *unit)
        .map(|(suffix, unit)| format!("{}{suffix}", ms / unit))
        .unwrap_or_else(|| "1ms".into())
}

/// Parses a macro's interval argument like Grafana (`10s`, `1m30s`, `500ms`, `1d`, `2w`).
/// Months and years depend on the calendar in Grafana and are not modelled.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid interval {text:?}");
    if let Some(days) = text
        .strip_suffix('d')
        .or_else(|| text.strip_suffix('w'))
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    {
        let n: u64 = days.parse().map_err(|_| bad())?;
        let per = if text.ends_with('w') { 7 } else { 1 };
        return Ok(Duration::from_secs(n * per * 86_400));
    }
    let mut total = 0f64;
    let mut rest = text;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let number: f64 = rest[..number_len].parse().map_err(|_| bad())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += number * seconds;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_secs_f64(total))
}

/// Step 3: the MySQL plugin's macros.
fn expand_macros(sql: &str, range: TimeRange) -> Result<String, String> {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        rest = &rest[pos..];
        let name_len = rest[1..].find(|c| !is_word(c)).unwrap_or(rest.len() - 1);
        let name = &rest[1..1 + name_len];
        let after = &rest[1 + name_len..];
        match (name.is_empty(), after.strip_prefix('(')) {
            (false, Some(args)) => {
                let end = args
                    .find(')')
                    .ok_or_else(|| format!("${name}( without ) in {sql:?}"))?;
                let args: Vec<&str> = args[..end].split(',').map(str::trim).collect();
                out.push_str(&expand_macro(name, &args, range)?);
                // `after` is `(args)rest`: skip the `(`, the arguments and the `)`.
                rest = &after[end + 2..];
            }
            _ => {
                out.push('$');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn expand_macro(name: &str, args: &[&str], range: TimeRange) -> Result<String, String> {
    let from = range.from.timestamp();
    let to = range.to.timestamp();
    let nanos = |t: DateTime<Utc>| {
        t.timestamp_nanos_opt()
            .ok_or_else(|| format!("${name}: time out of range"))
    };
    let column = || {
        args.first()
            .copied()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| format!("${name}() needs a column argument"))
    };
    // The bucket width of the group macros; the optional third argument is a fill mode, which
    // Grafana applies after the query (time_series only) and which does not change the SQL.
    let bucket = || -> Result<Duration, String> {
        let text = args
            .get(1)
            .ok_or_else(|| format!("${name}(column, interval) needs an interval"))?;
        let interval = parse_interval(text.trim_matches(['\'', '"']))?;
        if interval.is_zero() {
            return Err(format!("${name}: interval must be positive"));
        }
        if let Some(fill) = args.get(2) {
            let valid = fill.eq_ignore_ascii_case("null")
                || fill.eq_ignore_ascii_case("previous")
                || fill.parse::<f64>().is_ok();
            if !valid {
                return Err(format!(
                    "${name}: fill mode {fill:?} is not NULL, previous or a number"
                ));
            }
        }
        Ok(interval)
    };
    let time_filter_bound = |t: i64| {
        if t < 0 {
            format!("DATE_ADD(FROM_UNIXTIME(0), INTERVAL {t} SECOND)")
        } else {
            format!("FROM_UNIXTIME({t})")
        }
    };
    Ok(match name {
        "__time" | "__timeEpoch" => format!("UNIX_TIMESTAMP({}) as time_sec", column()?),
        "__timeFilter" => {
            let from_sql = time_filter_bound(from);
            format!("{} BETWEEN {from_sql} AND FROM_UNIXTIME({to})", column()?)
        }
        "__timeFrom" => format!("FROM_UNIXTIME({from})"),
        "__timeTo" => format!("FROM_UNIXTIME({to})"),
        "__timeGroup" | "__timeGroupAlias" => {
            let s = format!("{:.0}", bucket()?.as_secs_f64());
            let alias = if name == "__timeGroupAlias" {
                " AS \"time\""
            } else {
                ""
            };
            format!("UNIX_TIMESTAMP({}) DIV {s} * {s}{alias}", column()?)
        }
        "__unixEpochFilter" => format!("{c} >= {from} AND {c} <= {to}", c = column()?),
        "__unixEpochNanoFilter" => format!(
            "{c} >= {} AND {c} <= {}",
            nanos(range.from)?,
            nanos(range.to)?,
            c = column()?
        ),
        "__unixEpochFrom" => from.to_string(),
        "__unixEpochTo" => to.to_string(),
        "__unixEpochNanoFrom" => nanos(range.from)?.to_string(),
        "__unixEpochNanoTo" => nanos(range.to)?.to_string(),
        "__unixEpochGroup" | "__unixEpochGroupAlias" => {
            let s = bucket()?.as_secs_f64();
            let alias = if name == "__unixEpochGroupAlias" {
                " AS \"time\""
            } else {
                ""
            };
            format!("{} DIV {s} * {s}{alias}", column()?)
        }
        _ => return Err(format!("unknown macro name ${name}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// 2026-11-24 06:00:00 UTC to 12:00:00 UTC: epoch 1795500000 to 1795521600.
    fn scope(interval_s: u64) -> Scope {
        Scope {
            range: TimeRange {
                from: Utc.with_ymd_and_hms(2026, 11, 24, 6, 0, 0).unwrap(),
                to: Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap(),
            },
            interval: Duration::from_secs(interval_s),
            variables: vec![
                (
                    "device".into(),
                    VariableValue::Multi(vec!["pi-1".into(), "o'brien".into()]),
                ),
                ("minutes".into(), VariableValue::Single("15".into())),
                ("room".into(), VariableValue::Single("o'brien".into())),
            ],
        }
    }

    fn r(sql: &str) -> String {
        render(sql, &scope(60)).unwrap()
    }

    #[test]
    fn time_macros_expand_exactly_as_the_mysql_plugin_does() {
        assert_eq!(
            r("$__timeFilter(date_time)"),
            "date_time BETWEEN FROM_UNIXTIME(1795500000) AND FROM_UNIXTIME(1795521600)"
        );
        assert_eq!(r("$__timeFrom()"), "FROM_UNIXTIME(1795500000)");
        assert_eq!(r("$__timeTo()"), "FROM_UNIXTIME(1795521600)");
        assert_eq!(r("$__time(t)"), "UNIX_TIMESTAMP(t) as time_sec");
        assert_eq!(r("$__timeEpoch(t)"), "UNIX_TIMESTAMP(t) as time_sec");
        // Not the CAST(...) the documentation shows.
        assert_eq!(
            r("$__timeGroup(date_time, '5m')"),
            "UNIX_TIMESTAMP(date_time) DIV 300 * 300"
        );
        assert_eq!(
            r("$__timeGroupAlias(date_time, $__interval, 0)"),
            "UNIX_TIMESTAMP(date_time) DIV 60 * 60 AS \"time\""
        );
        // `>=`/`<=`, not the `>`/`<` the documentation shows.
        assert_eq!(
            r("$__unixEpochFilter(ts)"),
            "ts >= 1795500000 AND ts <= 1795521600"
        );
        assert_eq!(
            r("$__unixEpochNanoFilter(ns)"),
            "ns >= 1795500000000000000 AND ns <= 1795521600000000000"
        );
        assert_eq!(
            r("$__unixEpochFrom() $__unixEpochTo()"),
            "1795500000 1795521600"
        );
        assert_eq!(
            r("$__unixEpochGroupAlias(ts, 1h)"),
            "ts DIV 3600 * 3600 AS \"time\""
        );
        let mut before_1970 = scope(60);
        before_1970.range.from = Utc.with_ymd_and_hms(1969, 12, 31, 23, 0, 0).unwrap();
        assert_eq!(
            render("$__timeFilter(t)", &before_1970).unwrap(),
            "t BETWEEN DATE_ADD(FROM_UNIXTIME(0), INTERVAL -3600 SECOND) AND FROM_UNIXTIME(1795521600)"
        );
    }

    #[test]
    fn interval_globals_follow_grafanas_formatting() {
        assert_eq!(
            render("$__interval $__interval_ms ${__interval}", &scope(20)).unwrap(),
            "20s 20000 20s"
        );
        assert_eq!(format_interval(Duration::from_secs(90)), "1m");
        assert_eq!(format_interval(Duration::from_secs(7200)), "2h");
        assert_eq!(format_interval(Duration::from_millis(500)), "500ms");
        assert_eq!(format_interval(Duration::from_secs(86_400 * 400)), "1y");
        assert_eq!(
            render("$__timeGroup(t, $__interval)", &scope(3600)).unwrap(),
            "UNIX_TIMESTAMP(t) DIV 3600 * 3600"
        );
        assert_eq!(parse_interval("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_interval("2w"), Ok(Duration::from_secs(14 * 86_400)));
        assert!(parse_interval("1M").is_err());
    }

    #[test]
    fn range_globals_are_epoch_milliseconds() {
        assert_eq!(
            r("$__from ${__to} ${__to} - ${__from} <= 86400000"),
            "1795500000000 1795521600000 1795521600000 - 1795500000000 <= 86400000"
        );
        assert_eq!(
            r("${__from:date:seconds} ${__to:date:seconds}"),
            "1795500000 1795521600"
        );
        assert!(render("${__from:date:iso}", &scope(60)).is_err());
    }

    #[test]
    fn variables_are_quoted_as_grafanas_sql_data_source_does() {
        assert_eq!(
            r("device_id IN ($device)"),
            "device_id IN ('pi-1','o''brien')"
        );
        assert_eq!(r("IN (${device})"), "IN ('pi-1','o''brien')");
        assert_eq!(r("IN ([[device]])"), "IN ('pi-1','o''brien')");
        assert_eq!(r("${device:sqlstring}"), "'pi-1','o''brien'");
        assert_eq!(r("${device:csv}"), "pi-1,o'brien");
        // A single-value variable goes in unquoted, with quotes doubled.
        assert_eq!(r("INTERVAL $minutes MINUTE"), "INTERVAL 15 MINUTE");
        assert_eq!(r("'$room'"), "'o''brien'");
        assert_eq!(r("${room:sqlstring}"), "'o''brien'");
    }

    #[test]
    fn broken_references_fail_instead_of_reaching_mysql() {
        let s = scope(60);
        assert!(render("IN ($devices)", &s)
            .unwrap_err()
            .contains("$devices"));
        assert!(render("$__timeFiltr(t)", &s)
            .unwrap_err()
            .contains("unknown macro"));
        assert!(render("$__timeFilter()", &s).is_err());
        assert!(render("$__timeGroup(t)", &s).is_err());
        assert!(render("$__timeGroup(t, 1m, zero)", &s).is_err());
        assert!(render("${device:json}", &s).is_err());
        // Not references: a lone `$`, and text that only looks like one.
        assert_eq!(render("SELECT '$' AS d", &s).unwrap(), "SELECT '$' AS d");
        assert_eq!(render("a[0]", &s).unwrap(), "a[0]");
    }
}
