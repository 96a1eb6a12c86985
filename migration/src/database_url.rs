//! The database URL: the one type that holds it, masks its password wherever it is printed,
//! and the one place that decides where it comes from ([`resolve`]).
//!
//! It lives in this crate, the lowest of the workspace, so that the broker, `co2-broker
//! migrate` and `cargo run -p migration -- …` all go through the same code and never disagree
//! about which database they mean.

use std::path::PathBuf;

use serde::Deserialize;

use crate::config_source::env_key;

/// Embedded default: a SQLite file created on first start, so `cargo run` needs no server.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://data/co2.db?mode=rwc";

/// A database URL that never prints its password. Deliberately not `Serialize`: nothing may
/// write it out in clear by accident; [`DatabaseUrl::expose`] is the only way to the password.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The full URL, password included: only for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// For `sqlite://` URLs, the directory the database file lives in, to create it on first
    /// start (SQLite creates the file, not its directory).
    pub fn sqlite_parent_dir(&self) -> Option<PathBuf> {
        let path = self.0.strip_prefix("sqlite://")?.split('?').next()?;
        if path.is_empty() || path == ":memory:" {
            return None;
        }
        PathBuf::from(path)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(PathBuf::from)
    }

    /// Creates the directory of a `sqlite://` database file if it is missing (SQLite creates
    /// the file, not its directory); nothing for other databases.
    pub fn create_sqlite_dir(&self) -> std::io::Result<()> {
        match self.sqlite_parent_dir() {
            Some(dir) => std::fs::create_dir_all(&dir).map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display()))
            }),
            None => Ok(()),
        }
    }

    /// Whether the broker can talk to this kind of database at all (the drivers built in).
    pub fn has_supported_scheme(&self) -> bool {
        ["sqlite:", "mysql://", "mariadb://"]
            .iter()
            .any(|scheme| self.0.starts_with(scheme))
    }
}

impl Default for DatabaseUrl {
    fn default() -> Self {
        Self::new(DEFAULT_DATABASE_URL)
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&masked(&self.0))
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&masked(&self.0))
    }
}

/// `url` with any password replaced by `***`, fit for logs.
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

/// A database URL setting that cannot be used, with the key that holds it.
#[derive(Debug, thiserror::Error)]
#[error("config key `{key}`: {reason}")]
pub struct InvalidDatabaseUrl {
    pub key: &'static str,
    pub reason: String,
}

/// The database URL, from the environment and the config file `file` (read without
/// environment overrides, see [`crate::ConfigSource::read`]):
///
/// 1. `database_url_file`, a file holding the URL (e.g. a mounted secret), from
///    `CO2_DATABASE_URL_FILE`, else the file's `[co2] database_url_file`; when set it wins,
/// 2. else `database_url`, from `CO2_DATABASE_URL`, else the file's `[co2] database_url`,
/// 3. else [`DEFAULT_DATABASE_URL`].
///
/// So a variable overrides its own key in the file, and a URL file, wherever it is named,
/// overrides a plain URL. Environment names follow [`env_key`] (the broker's rule for every
/// `CO2_<KEY>`); of several spellings the last in `env` wins, as in the broker's layering. The
/// URL must name a database this build can talk to (SQLite, MySQL/MariaDB).
pub fn resolve(
    file: &config::Config,
    env: &[(String, String)],
) -> Result<DatabaseUrl, InvalidDatabaseUrl> {
    let setting = |key: &Key| -> Result<Option<String>, InvalidDatabaseUrl> {
        let from_env = env
            .iter()
            .rev()
            .find(|(name, _)| env_key(name).as_deref() == Some(key.name));
        if let Some((_, value)) = from_env {
            return Ok(Some(value.clone()));
        }
        match file.get_string(key.path) {
            Ok(value) => Ok(Some(value)),
            Err(config::ConfigError::NotFound(_)) => Ok(None),
            Err(e) => Err(key.invalid(e.to_string())),
        }
    };
    let (url, key) = match setting(&URL_FILE)? {
        Some(path) => {
            let url = std::fs::read_to_string(&path)
                .map_err(|e| URL_FILE.invalid(format!("cannot read {path}: {e}")))?;
            (DatabaseUrl::new(url.trim()), URL_FILE)
        }
        None => (
            setting(&URL)?.map(DatabaseUrl::new).unwrap_or_default(),
            URL,
        ),
    };
    if !url.has_supported_scheme() {
        return Err(key.invalid(format!(
            "{url} must start with sqlite:, mysql:// or mariadb://"
        )));
    }
    Ok(url)
}

/// A `[co2]` key: its name (as in `CO2_<NAME>`) and its path in the config file.
struct Key {
    name: &'static str,
    path: &'static str,
}

const URL: Key = Key {
    name: "database_url",
    path: "co2.database_url",
};
const URL_FILE: Key = Key {
    name: "database_url_file",
    path: "co2.database_url_file",
};

impl Key {
    fn invalid(&self, reason: String) -> InvalidDatabaseUrl {
        InvalidDatabaseUrl {
            key: self.path,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn config(toml: &str) -> config::Config {
        config::Config::builder()
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .build()
            .unwrap()
    }

    #[test]
    fn precedence() {
        let dir = tempfile::tempdir().unwrap();
        let url_file = |name: &str, url: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("{url}\n")).unwrap();
            path.display().to_string()
        };
        let env_file = url_file("env", "mysql://env-file/db");
        let config_file = url_file("config", "mysql://config-file/db");
        let with_file = config(&format!(
            "[co2]\ndatabase_url = \"mysql://config/db\"\ndatabase_url_file = {config_file:?}"
        ));
        let with_url = config("[co2]\ndatabase_url = \"mysql://config/db\"");
        let empty = config("");
        let cases = [
            (
                &with_file,
                env(&[("CO2_DATABASE_URL_FILE", &env_file)]),
                "mysql://env-file/db",
            ),
            (
                &with_file,
                env(&[("CO2_DATABASE_URL", "mysql://env/db")]),
                "mysql://config-file/db",
            ),
            (&with_file, env(&[]), "mysql://config-file/db"),
            (
                &with_url,
                env(&[("CO2_DATABASE_URL_FILE", &env_file)]),
                "mysql://env-file/db",
            ),
            (
                &with_url,
                env(&[("CO2_DATABASE_URL", "mysql://env/db")]),
                "mysql://env/db",
            ),
            (
                &with_url,
                env(&[("CO2_database_url", "mysql://env/db")]),
                "mysql://env/db",
            ),
            (&with_url, env(&[]), "mysql://config/db"),
            (
                &empty,
                env(&[("CO2_DATABASE_URL", "mysql://env/db")]),
                "mysql://env/db",
            ),
            (
                &empty,
                env(&[("CO2_CONFIG", "x"), ("DATABASE_URL", "mysql://x/y")]),
                DEFAULT_DATABASE_URL,
            ),
        ];
        for (file, env, expected) in cases {
            let url = resolve(file, &env).unwrap();
            assert_eq!(url.expose(), expected, "{env:?}");
        }
    }

    #[test]
    fn unusable_urls_name_their_key() {
        let err = resolve(&config(""), &env(&[("CO2_DATABASE_URL", "postgres://x/y")]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("config key `co2.database_url`: "), "{err}");
        let err = resolve(
            &config("[co2]\ndatabase_url_file = \"/nonexistent/co2/url\""),
            &env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with(
                "config key `co2.database_url_file`: cannot read /nonexistent/co2/url: "
            ),
            "{err}"
        );
    }

    #[test]
    fn a_password_in_an_unusable_url_stays_masked() {
        let err = resolve(
            &config(""),
            &env(&[("CO2_DATABASE_URL", "postgres://u:s3cret@h/db")]),
        )
        .unwrap_err()
        .to_string();
        assert!(!err.contains("s3cret"), "{err}");
    }

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
    fn debug_and_display_mask_the_password() {
        let url = DatabaseUrl::new("mysql://co2:s3cret@db:3306/sheroDB");
        for shown in [format!("{url}"), format!("{url:?}")] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert_eq!(shown, "mysql://co2:***@db:3306/sheroDB");
        }
        assert_eq!(url.expose(), "mysql://co2:s3cret@db:3306/sheroDB");
    }

    #[test]
    fn sqlite_dirs() {
        let dir = |url: &str| DatabaseUrl::new(url).sqlite_parent_dir();
        assert_eq!(
            dir("sqlite://data/co2.db?mode=rwc"),
            Some(PathBuf::from("data"))
        );
        assert_eq!(dir("sqlite://co2.db"), None);
        assert_eq!(dir("sqlite::memory:"), None);
        assert_eq!(dir("mysql://h/db"), None);
    }
}
