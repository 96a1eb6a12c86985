//! Running rendered SQL on MariaDB like Grafana's MySQL plugin does (one statement, text
//! protocol, session `time_zone` from the data source) and checking that the result has the
//! shape the panel needs.

use sea_orm::sqlx::mysql::MySqlConnection;
use sea_orm::sqlx::{
    AssertSqlSafe, Column, Executor, Row, SqlSafeStr, Statement, TypeInfo, ValueRef,
};
use serde_json::Value;

use super::files::list;

/// How Grafana treats a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Number,
    Time,
    Text,
    Other,
}

impl Kind {
    /// `binary_charset`: the column's collation is `binary` (63). sqlx names every column with
    /// the BINARY flag VARBINARY/BLOB, also `utf8mb4_bin` text; Grafana's driver (like
    /// go-sql-driver) calls a column binary only by its character set, so text stays text.
    fn of(mysql_type: &str, binary_charset: bool) -> Kind {
        let base = mysql_type.split_whitespace().next().unwrap_or_default();
        match base {
            "BINARY" | "VARBINARY" | "TINYBLOB" | "BLOB" | "MEDIUMBLOB" | "LONGBLOB"
                if !binary_charset =>
            {
                Kind::Text
            }
            "TINYINT" | "SMALLINT" | "MEDIUMINT" | "INT" | "BIGINT" | "DECIMAL" | "FLOAT"
            | "DOUBLE" => Kind::Number,
            "DATETIME" | "TIMESTAMP" | "DATE" => Kind::Time,
            "VARCHAR" | "CHAR" | "TEXT" | "TINYTEXT" | "MEDIUMTEXT" | "LONGTEXT" | "ENUM" => {
                Kind::Text
            }
            _ => Kind::Other,
        }
    }
}

/// A query result: columns with their kind, and every cell as the text MySQL sent.
#[derive(Debug)]
pub struct Frame {
    pub columns: Vec<(String, Kind, String)>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl Frame {
    fn column(&self, name: &str) -> Option<(usize, Kind)> {
        self.columns
            .iter()
            .position(|(n, _, _)| n == name)
            .map(|i| (i, self.columns[i].1))
    }

    fn describe(&self) -> String {
        self.columns
            .iter()
            .map(|(n, _, t)| format!("{n} {t}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Runs one statement over the text protocol (as Grafana's Go driver does without arguments).
pub async fn query(conn: &mut MySqlConnection, sql: &str) -> Result<Frame, String> {
    let rows = (&mut *conn)
        .fetch_all(AssertSqlSafe(sql))
        .await
        .map_err(|e| e.to_string())?;
    let mut frame = Frame {
        columns: Vec::new(),
        rows: Vec::new(),
    };
    let describe = |c: &sea_orm::sqlx::mysql::MySqlColumn| {
        let name = c.type_info().name().to_owned();
        // sqlx keeps the collation private; its Debug output is the only way to read it.
        let binary = format!("{:?}", c.type_info()).contains("collation: Collation(63)");
        (c.name().to_owned(), Kind::of(&name, binary), name)
    };
    frame.columns = match rows.first() {
        Some(first) => first.columns().iter().map(describe).collect(),
        // No row, no column metadata in the result: ask the server to describe the statement.
        None => conn
            .prepare(AssertSqlSafe(sql).into_sql_str())
            .await
            .map_err(|e| e.to_string())?
            .columns()
            .iter()
            .map(describe)
            .collect(),
    };
    for row in &rows {
        let mut cells = Vec::with_capacity(frame.columns.len());
        for i in 0..frame.columns.len() {
            let null = row.try_get_raw(i).map_err(|e| e.to_string())?.is_null();
            cells.push(if null {
                None
            } else {
                // The text protocol sends every value as text; the type check is skipped on
                // purpose so numbers, decimals and dates all come back as MySQL printed them.
                Some(
                    row.try_get_unchecked::<String, _>(i)
                        .map_err(|e| e.to_string())?,
                )
            });
        }
        frame.rows.push(cells);
    }
    Ok(frame)
}

/// The `time_series` contract: a non-null `time` column (epoch seconds or DATETIME) in
/// ascending order, at least one numeric value column, and strings only as `metric`.
pub fn check_time_series(frame: &Frame) -> Result<(), String> {
    let (time, kind) = frame
        .column("time")
        .ok_or_else(|| format!("time_series without a `time` column: {}", frame.describe()))?;
    if !matches!(kind, Kind::Number | Kind::Time) {
        return Err(format!(
            "`time` is {}, not epoch seconds or DATETIME",
            frame.columns[time].2
        ));
    }
    let mut previous: Option<&String> = None;
    for row in &frame.rows {
        let value = row[time]
            .as_ref()
            .ok_or_else(|| "a row has a NULL `time`".to_owned())?;
        if let Some(previous) = previous {
            let ascending = match kind {
                Kind::Number => {
                    previous.parse::<f64>().unwrap_or(f64::NAN) <= value.parse().unwrap_or(f64::NAN)
                }
                _ => previous <= value,
            };
            if !ascending {
                return Err(format!(
                    "rows not sorted by time ({previous} before {value})"
                ));
            }
        }
        previous = Some(value);
    }
    let mut values = 0;
    for (i, (name, kind, mysql_type)) in frame.columns.iter().enumerate() {
        match kind {
            _ if i == time => {}
            Kind::Number => values += 1,
            Kind::Text if name == "metric" => {}
            _ => {
                return Err(format!(
                    "column {name} ({mysql_type}) is neither a value nor `metric`"
                ))
            }
        }
    }
    if values == 0 {
        return Err(format!("no numeric value column: {}", frame.describe()));
    }
    Ok(())
}

/// The columns a panel's own settings refer to must exist: the reduce field of a stat or
/// gauge (numeric), override matchers by name and the table's sort column.
pub fn check_panel_fields(panel: &Value, frame: &Frame) -> Result<(), String> {
    if let Some(fields) = panel["options"]["reduceOptions"]["fields"].as_str() {
        if let Some(name) = fields.strip_prefix("/^").and_then(|f| f.strip_suffix("$/")) {
            match frame.column(name) {
                Some((_, Kind::Number)) => {}
                _ => {
                    return Err(format!(
                        "reduceOptions.fields {fields} needs a numeric column {name}: {}",
                        frame.describe()
                    ))
                }
            }
        } else if !fields.is_empty() {
            return Err(format!("reduceOptions.fields {fields:?} is not /^name$/"));
        }
    }
    let by_name = list(&panel["fieldConfig"]["overrides"])
        .iter()
        .filter(|o| o["matcher"]["id"] == "byName")
        .filter_map(|o| o["matcher"]["options"].as_str());
    let sort_by = list(&panel["options"]["sortBy"])
        .iter()
        .filter_map(|s| s["displayName"].as_str());
    for name in by_name.chain(sort_by) {
        if frame.column(name).is_none() {
            return Err(format!(
                "the panel refers to column {name:?}, the query returns {}",
                frame.describe()
            ));
        }
    }
    Ok(())
}

/// The alert "numeric data" contract: exactly one numeric column, the others strings (labels).
/// Returns `(labels, value)` per row.
pub fn alert_instances(frame: &Frame) -> Result<Vec<(String, f64)>, String> {
    let numeric: Vec<usize> = (0..frame.columns.len())
        .filter(|&i| frame.columns[i].1 == Kind::Number)
        .collect();
    let [value] = numeric[..] else {
        return Err(format!(
            "alert query needs exactly one numeric column: {}",
            frame.describe()
        ));
    };
    if frame
        .columns
        .iter()
        .any(|(_, kind, _)| !matches!(kind, Kind::Number | Kind::Text))
    {
        return Err(format!(
            "alert query returns non-label columns: {}",
            frame.describe()
        ));
    }
    frame
        .rows
        .iter()
        .map(|row| {
            let labels = (0..row.len())
                .filter(|&i| i != value)
                .map(|i| row[i].clone().unwrap_or_default())
                .collect::<Vec<_>>()
                .join(",");
            let number = row[value]
                .as_deref()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("alert value of {labels} is NULL"))?;
            Ok((labels, number))
        })
        .collect()
}
