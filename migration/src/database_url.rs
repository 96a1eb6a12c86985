//! The one database URL setting, shared by the broker and the migration CLI.
//!
//! Both programs read it from `CO2_DATABASE_URL` first, then `[co2].database_url` in the config
//! file, then fall back to [`DEFAULT_DATABASE_URL`], so the two never disagree about which
//! database they mean.

use std::path::PathBuf;

/// Embedded default: a SQLite file created on first start, so `cargo run` needs no server.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://data/co2.db?mode=rwc";
/// Config file both programs read unless `CO2_CONFIG` names another.
pub const DEFAULT_CONFIG_PATH: &str = "rumqttd.toml";

/// Resolves the URL the way the broker does (for the CLI, which has no other settings):
/// a `database_url_file` (from `CO2_DATABASE_URL_FILE` or the config) wins, then
/// `CO2_DATABASE_URL`, then `[co2].database_url`, then the default.
pub fn resolve() -> Result<String, config::ConfigError> {
    let path = std::env::var("CO2_CONFIG").unwrap_or_else(|_| DEFAULT_CONFIG_PATH.into());
    let file = config::Config::builder()
        .add_source(config::File::with_name(&path).required(false))
        .build()?;
    let setting = |env: &str, key: &str| match std::env::var(env) {
        Ok(value) => Ok(Some(value)),
        Err(_) => match file.get_string(key) {
            Ok(value) => Ok(Some(value)),
            Err(config::ConfigError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        },
    };
    if let Some(url_file) = setting("CO2_DATABASE_URL_FILE", "co2.database_url_file")? {
        return std::fs::read_to_string(&url_file)
            .map(|url| url.trim().to_owned())
            .map_err(|e| {
                config::ConfigError::Message(format!(
                    "co2.database_url_file: cannot read {url_file}: {e}"
                ))
            });
    }
    Ok(setting("CO2_DATABASE_URL", "co2.database_url")?
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.into()))
}

/// The URL with any password replaced by `***`, fit for logs.
pub fn masked(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.into();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.into();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => url.into(),
    }
}

/// For `sqlite://` URLs, the directory the database file lives in (to create it on first start).
pub fn sqlite_parent_dir(url: &str) -> Option<PathBuf> {
    let path = url.strip_prefix("sqlite://")?.split('?').next()?;
    if path.is_empty() || path == ":memory:" {
        return None;
    }
    PathBuf::from(path)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            masked("mysql://co2:s3cret@db.example:3306/sheroDB"),
            "mysql://co2:***@db.example:3306/sheroDB"
        );
        assert_eq!(masked("mysql://co2@db/x"), "mysql://co2@db/x");
        assert_eq!(masked("sqlite://data/co2.db"), "sqlite://data/co2.db");
        assert_eq!(masked("mysql://u:p@ss@h/db"), "mysql://u:***@h/db");
    }

    #[test]
    fn sqlite_dirs() {
        assert_eq!(
            sqlite_parent_dir("sqlite://data/co2.db?mode=rwc"),
            Some(PathBuf::from("data"))
        );
        assert_eq!(sqlite_parent_dir("sqlite://co2.db"), None);
        assert_eq!(sqlite_parent_dir("sqlite::memory:"), None);
        assert_eq!(sqlite_parent_dir("mysql://h/db"), None);
    }
}
