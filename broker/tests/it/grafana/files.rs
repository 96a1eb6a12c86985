//! The files under `grafana/`: loading every provisioning YAML and dashboard JSON, and the
//! checks that need no database (structure, data source references, secrets, thresholds).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::render::parse_interval;

/// The uid every panel, variable and alert query must use.
pub const DATASOURCE_UID: &str = "co2-mysql";
/// The CO2 thresholds the issue asks for, in ppm (yellow, orange, red).
pub const CO2_THRESHOLDS: [f64; 3] = [800.0, 1000.0, 1500.0];

/// A parsed file and where it came from (for messages).
pub struct File {
    pub path: PathBuf,
    pub content: Value,
}

/// Everything under `grafana/`, parsed.
pub struct Provisioning {
    pub datasources: Vec<File>,
    pub providers: Vec<File>,
    pub alerting: Vec<File>,
    pub dashboards: Vec<File>,
}

pub fn grafana_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../grafana")
}

fn files_with_extension(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| extensions.contains(&e))
        })
        .collect();
    found.sort();
    found
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn load_yaml(dir: &Path) -> Vec<File> {
    files_with_extension(dir, &["yaml", "yml"])
        .into_iter()
        .map(|path| {
            let content = serde_norway::from_str::<Value>(&read(&path))
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
            File { path, content }
        })
        .collect()
}

impl Provisioning {
    /// Parses every file; a file that does not parse fails the test here.
    pub fn load() -> Provisioning {
        let root = grafana_dir();
        let provisioning = root.join("provisioning");
        let dashboards = files_with_extension(&root.join("dashboards"), &["json"])
            .into_iter()
            .map(|path| {
                let content = serde_json::from_str::<Value>(&read(&path))
                    .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()));
                File { path, content }
            })
            .collect();
        let loaded = Provisioning {
            datasources: load_yaml(&provisioning.join("datasources")),
            providers: load_yaml(&provisioning.join("dashboards")),
            alerting: load_yaml(&provisioning.join("alerting")),
            dashboards,
        };
        for (kind, files) in [
            ("data source", &loaded.datasources),
            ("dashboard provider", &loaded.providers),
            ("alerting", &loaded.alerting),
            ("dashboard", &loaded.dashboards),
        ] {
            assert!(!files.is_empty(), "no {kind} file under {}", root.display());
        }
        loaded
    }

    /// The provisioned data source with [`DATASOURCE_UID`].
    pub fn datasource(&self) -> &Value {
        self.datasources
            .iter()
            .flat_map(|f| list(&f.content["datasources"]))
            .find(|d| d["uid"] == DATASOURCE_UID)
            .unwrap_or_else(|| panic!("no data source with uid {DATASOURCE_UID}"))
    }

    /// Every alert rule of every group.
    pub fn alert_rules(&self) -> Vec<&Value> {
        self.alerting
            .iter()
            .flat_map(|f| list(&f.content["groups"]))
            .flat_map(|g| list(&g["rules"]))
            .collect()
    }
}

/// A JSON array's items, or nothing.
pub fn list(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// Every panel with queries, also those nested in collapsed rows.
pub fn panels(dashboard: &Value) -> Vec<&Value> {
    list(&dashboard["panels"])
        .iter()
        .flat_map(|p| std::iter::once(p).chain(list(&p["panels"])))
        .filter(|p| p["type"] != "row")
        .collect()
}

/// The `$NAME` environment references of a provisioning string value, and whether a
/// form other than the bare `$NAME` occurs (`${NAME}`, `$__env{..}`, `$__file{..}`).
fn env_references(text: &str) -> (Vec<String>, bool) {
    let mut names = Vec::new();
    let mut braced = false;
    let text = text.replace("$$", "");
    for part in text.split('$').skip(1) {
        if part.starts_with('{') || part.starts_with("__") {
            braced = true;
        }
        let name: String = part
            .trim_start_matches('{')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        names.push(name);
    }
    (names, braced)
}

fn valid_uid(uid: &Value) -> bool {
    uid.as_str().is_some_and(|u| {
        (1..=40).contains(&u.len())
            && u.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

fn references_datasource(value: &Value) -> bool {
    value["uid"] == DATASOURCE_UID && value["type"] == "mysql"
}

/// All problems found without a database; empty when the files are fine.
pub fn problems(p: &Provisioning) -> Vec<String> {
    let mut problems = Vec::new();
    let mut problem = |text: String| problems.push(text);
    let all_yaml = p.datasources.iter().chain(&p.providers).chain(&p.alerting);
    for file in all_yaml {
        if file.content["apiVersion"] != 1 {
            problem(format!("{}: apiVersion must be 1", file.path.display()));
        }
    }

    // Data source: everything site-specific comes from the environment.
    let ds = p.datasource();
    if ds["type"] != "mysql" || ds["access"] != "proxy" {
        problem(format!(
            "data source {DATASOURCE_UID}: type mysql, access proxy expected"
        ));
    }
    for (key, value) in [
        ("url", &ds["url"]),
        ("user", &ds["user"]),
        ("jsonData.database", &ds["jsonData"]["database"]),
        ("secureJsonData.password", &ds["secureJsonData"]["password"]),
    ] {
        let text = value.as_str().unwrap_or_default();
        let (names, braced) = env_references(text);
        if names.is_empty() || names.iter().any(String::is_empty) {
            problem(format!(
                "data source {key} = {text:?}: must come from an environment variable"
            ));
        }
        if let Some(name) = names.iter().find(|n| n.starts_with("CO2_")) {
            problem(format!(
                "data source {key}: ${name} is in the broker's CO2_* settings namespace \
                 (the broker refuses unknown CO2_ variables)"
            ));
        }
        if key.starts_with("secureJsonData") && (braced || text != format!("${}", names[0])) {
            problem(format!(
                "data source {key} = {text:?}: use exactly the bare $NAME form \
                 (braced forms expand twice and truncate secrets containing '$')"
            ));
        }
    }
    if ds["jsonData"]["timezone"] != "+00:00" {
        problem(format!(
            "data source jsonData.timezone is {}, must be \"+00:00\" (the columns hold UTC)",
            ds["jsonData"]["timezone"]
        ));
    }
    match ds["jsonData"]["timeInterval"].as_str().map(parse_interval) {
        Some(Ok(i)) if i.as_secs() >= 1 => {}
        other => problem(format!(
            "data source jsonData.timeInterval {other:?}: must be at least 1s \
             ($__timeGroup would print DIV 0)"
        )),
    }
    for key in ["maxOpenConns", "maxIdleConns", "connMaxLifetime"] {
        let value = &ds["jsonData"][key];
        if !value.is_null() && !value.is_u64() {
            problem(format!(
                "data source jsonData.{key} must be a literal number"
            ));
        }
    }

    // Dashboard providers.
    let providers: Vec<&Value> = p
        .providers
        .iter()
        .flat_map(|f| list(&f.content["providers"]))
        .collect();
    for provider in &providers {
        let path = provider["options"]["path"].as_str().unwrap_or_default();
        if provider["type"] != "file" || !path.starts_with('/') {
            problem(format!(
                "provider {}: type file with an absolute options.path",
                provider["name"]
            ));
        }
    }

    // Dashboards.
    let mut uids = Vec::new();
    for file in &p.dashboards {
        let d = &file.content;
        let at = file.path.display();
        if !valid_uid(&d["uid"]) || uids.contains(&d["uid"]) {
            problem(format!(
                "{at}: uid {} is not a unique [A-Za-z0-9_-]{{1,40}}",
                d["uid"]
            ));
        }
        uids.push(d["uid"].clone());
        if !d["id"].is_null() || !d["schemaVersion"].is_u64() || d["title"].as_str().is_none() {
            problem(format!(
                "{at}: needs title, integer schemaVersion and no id"
            ));
        }
        let variables = list(&d["templating"]["list"]);
        let all_sql: Vec<&str> = panels(d)
            .iter()
            .flat_map(|panel| list(&panel["targets"]))
            .filter_map(|t| t["rawSql"].as_str())
            .collect();
        for v in variables {
            let name = v["name"].as_str().unwrap_or_default();
            if v["type"] == "query" {
                if !references_datasource(&v["datasource"]) {
                    problem(format!(
                        "{at}: variable {name} must use data source {DATASOURCE_UID}"
                    ));
                }
                if v["query"].as_str().is_none_or(str::is_empty) {
                    problem(format!("{at}: variable {name} has no query"));
                }
            }
            // `$name`, `${name}`, `${name:format}`.
            let referenced = |sql: &str| {
                sql.contains(&format!("${name}")) || sql.contains(&format!("${{{name}"))
            };
            let used = all_sql.iter().any(|sql| referenced(sql))
                || panels(d).iter().any(|p| {
                    p["title"]
                        .as_str()
                        .is_some_and(|t| t.contains(&format!("${name}")))
                });
            if !used {
                problem(format!("{at}: variable {name} is not used"));
            }
        }
        let mut ids = Vec::new();
        for panel in panels(d) {
            let title = panel["title"].as_str().unwrap_or_default();
            let here = format!("{at}: panel {title:?}");
            if title.is_empty() || panel["description"].as_str().is_none_or(str::is_empty) {
                problem(format!("{here}: needs a title and a description"));
            }
            if ids.contains(&panel["id"]) || !panel["id"].is_u64() {
                problem(format!("{here}: id {} missing or not unique", panel["id"]));
            }
            ids.push(panel["id"].clone());
            let grid = &panel["gridPos"];
            let (x, w) = (grid["x"].as_u64(), grid["w"].as_u64());
            if !matches!((x, w), (Some(x), Some(w)) if w > 0 && x + w <= 24)
                || grid["h"].as_u64().is_none()
            {
                problem(format!("{here}: gridPos {grid} outside the 24-column grid"));
            }
            if !references_datasource(&panel["datasource"]) {
                problem(format!(
                    "{here}: datasource must be {{type: mysql, uid: {DATASOURCE_UID}}}"
                ));
            }
            let targets = list(&panel["targets"]);
            if targets.is_empty() {
                problem(format!("{here}: no targets"));
            }
            for t in targets {
                let sql = t["rawSql"].as_str().unwrap_or_default();
                if !references_datasource(&t["datasource"]) {
                    problem(format!(
                        "{here}: target datasource must be uid {DATASOURCE_UID}"
                    ));
                }
                if !matches!(t["format"].as_str(), Some("time_series" | "table"))
                    || t["rawQuery"] != true
                    || t["editorMode"] != "code"
                    || sql.trim().is_empty()
                {
                    problem(format!(
                        "{here}: target needs format time_series|table, rawQuery true, \
                         editorMode code and rawSql"
                    ));
                }
                if sql.contains(';') {
                    problem(format!(
                        "{here}: one statement per query (Grafana refuses ';')"
                    ));
                }
                if ["--", "#", "/*"].iter().any(|c| sql.contains(c)) {
                    problem(format!(
                        "{here}: no SQL comments (plugin 13.x strips them, older versions \
                         expand macros inside them)"
                    ));
                }
            }
            let unit = &panel["fieldConfig"]["defaults"]["unit"];
            if matches!(panel["type"].as_str(), Some("gauge" | "stat")) && unit == "ppm" {
                let steps = co2_steps(panel);
                if steps != CO2_THRESHOLDS {
                    problem(format!(
                        "{here}: CO2 thresholds {steps:?}, expected {CO2_THRESHOLDS:?}"
                    ));
                }
            }
        }
    }

    // Alert rules.
    let dashboard_folders: Vec<&Value> = providers.iter().map(|p| &p["folder"]).collect();
    for group in p.alerting.iter().flat_map(|f| list(&f.content["groups"])) {
        if dashboard_folders.contains(&&group["folder"]) {
            problem(format!(
                "alert group {}: folder title shared with dashboards",
                group["name"]
            ));
        }
        if group["interval"]
            .as_str()
            .map(parse_interval)
            .is_none_or(|i| i.is_err())
        {
            problem(format!("alert group {}: interval", group["name"]));
        }
    }
    let mut rule_uids = Vec::new();
    for rule in p.alert_rules() {
        let here = format!("alert rule {}", rule["uid"]);
        if !valid_uid(&rule["uid"]) || rule_uids.contains(&rule["uid"]) {
            problem(format!(
                "{here}: uid must be a unique [A-Za-z0-9_-]{{1,40}}"
            ));
        }
        rule_uids.push(rule["uid"].clone());
        let data = list(&rule["data"]);
        let ref_ids: Vec<&Value> = data.iter().map(|q| &q["refId"]).collect();
        if !ref_ids.contains(&&rule["condition"]) {
            problem(format!(
                "{here}: condition {} is no refId of data",
                rule["condition"]
            ));
        }
        if rule["for"]
            .as_str()
            .map(parse_interval)
            .is_none_or(|f| f.is_err())
            || !matches!(
                rule["noDataState"].as_str(),
                Some("OK" | "NoData" | "Alerting")
            )
            || !matches!(
                rule["execErrState"].as_str(),
                Some("OK" | "Error" | "Alerting")
            )
        {
            problem(format!("{here}: for, noDataState or execErrState invalid"));
        }
        if rule["labels"].as_object().is_some_and(|labels| {
            labels
                .values()
                .any(|v| v.as_str().is_none_or(|s| s.contains('$')))
        }) {
            problem(format!("{here}: labels must be plain strings without '$'"));
        }
        for q in data {
            match q["datasourceUid"].as_str() {
                Some(DATASOURCE_UID) => {
                    let m = &q["model"];
                    if !references_datasource(&m["datasource"])
                        || m["format"] != "table"
                        || m["rawSql"].as_str().is_none_or(str::is_empty)
                    {
                        problem(format!(
                            "{here}: query {}: mysql table query with rawSql",
                            q["refId"]
                        ));
                    }
                }
                Some("__expr__") => {
                    let m = &q["model"];
                    if !ref_ids.contains(&&m["expression"]) || threshold(m).is_none() {
                        problem(format!(
                            "{here}: expression {}: threshold over a refId",
                            q["refId"]
                        ));
                    }
                }
                other => problem(format!("{here}: unknown datasourceUid {other:?}")),
            }
        }
    }
    if let Some(co2_rule) = p
        .alert_rules()
        .into_iter()
        .find(|r| r["uid"] == "co2-above-threshold")
    {
        let limit = alert_threshold(co2_rule).map(|(_, limit)| limit);
        if limit != Some(CO2_THRESHOLDS[2]) {
            problem(format!(
                "alert co2-above-threshold fires above {limit:?} ppm, the dashboards' red step is {}",
                CO2_THRESHOLDS[2]
            ));
        }
    } else {
        problem("no alert rule co2-above-threshold".into());
    }
    if !p
        .alert_rules()
        .iter()
        .any(|r| r["uid"] == "co2-device-silent")
    {
        problem("no alert rule co2-device-silent".into());
    }
    problems
}

/// The non-base threshold values of a panel.
fn co2_steps(panel: &Value) -> Vec<f64> {
    list(&panel["fieldConfig"]["defaults"]["thresholds"]["steps"])
        .iter()
        .filter_map(|s| s["value"].as_f64())
        .collect()
}

/// `(evaluator type, limit)` of a threshold expression model.
fn threshold(model: &Value) -> Option<(String, f64)> {
    if model["type"] != "threshold" {
        return None;
    }
    let evaluator = &list(&model["conditions"]).first()?["evaluator"];
    let kind = evaluator["type"].as_str()?;
    matches!(kind, "gt" | "lt").then_some(())?;
    Some((kind.to_owned(), evaluator["params"][0].as_f64()?))
}

/// The threshold of a rule's condition expression.
pub fn alert_threshold(rule: &Value) -> Option<(String, f64)> {
    list(&rule["data"])
        .iter()
        .find(|q| q["refId"] == rule["condition"])
        .and_then(|q| threshold(&q["model"]))
}
