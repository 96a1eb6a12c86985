//! The database URL: the one type that holds it, masks its password wherever it is printed,
//! and knows the embedded SQLite default.
//!
//! Where the URL comes from is decided in one place, [`super::Settings::load`]: `CO2_*`
//! variables over the config file, and `database_url_file` over `database_url`. The broker and
//! `co2-broker migrate` both go through it, so the two never disagree about which database
//! they mean.

use std::path::PathBuf;

use serde::Deserialize;

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

    /// Whether the broker can talk to this kind of database at all.
    pub(super) fn has_supported_scheme(&self) -> bool {
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
