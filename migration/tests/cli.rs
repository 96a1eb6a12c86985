//! The real `migration` binary (`cargo run -p migration -- …`) on SQLite files: it finds the
//! configuration and the database like the broker, applies and reverts the schema, and stops
//! with exit code 2 and one clear line on a configuration file that does not exist.

use std::path::Path;
use std::process::{Command, Output};

use sea_orm_migration::sea_orm::Database;
use sea_orm_migration::SchemaManager;

/// The tables of the migrations, in order (the rollups' two come with the fourth).
const TABLES: [&str; 6] = [
    "co2_emissions",
    "rejected_messages",
    "devices",
    "co2_rollup_minute",
    "co2_rollup_hour",
    "rollup_backfill",
];

/// The binary with `dir` as working directory and none of the caller's `CO2_*` settings.
fn migration_in(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_migration"));
    command.current_dir(dir);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("CO2_") {
            command.env_remove(name);
        }
    }
    command
}

fn stdout_of(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `(applied, pending)` counted from `status`-style output (`name<TAB>Applied|Pending`).
fn counts(status: &str) -> (usize, usize) {
    let lines: Vec<&str> = status.lines().collect();
    let applied = lines.iter().filter(|l| l.ends_with("\tApplied")).count();
    let pending = lines.iter().filter(|l| l.ends_with("\tPending")).count();
    assert_eq!(applied + pending, lines.len(), "{status}");
    (applied, pending)
}

/// Which of the schema's tables exist in the SQLite file at `path`, asked of the database.
async fn tables_in(path: &Path) -> Vec<&'static str> {
    let db = Database::connect(format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let manager = SchemaManager::new(&db);
    let mut present = Vec::new();
    for table in TABLES {
        if manager.has_table(table).await.unwrap() {
            present.push(table);
        }
    }
    db.close().await.unwrap();
    present
}

/// `CO2_DATABASE_URL` wins over the `database_url` of the file named by `--config`, as in the
/// broker; up, down and status work on that database.
#[tokio::test]
async fn up_down_and_status_on_the_database_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let unused = dir.path().join("from-config.db");
    let config = dir.path().join("co2.toml");
    std::fs::write(
        &config,
        format!(
            "[co2]\ndatabase_url = \"sqlite://{}?mode=rwc\"\n",
            unused.display()
        ),
    )
    .unwrap();
    // In a directory that does not exist yet: the CLI creates it, like the broker.
    let used = dir.path().join("db/from-env.db");
    let migrate = |args: &[&str]| {
        let out = migration_in(dir.path())
            .arg("--config")
            .arg(&config)
            .args(args)
            .env(
                "CO2_DATABASE_URL",
                format!("sqlite://{}?mode=rwc", used.display()),
            )
            .output()
            .unwrap();
        stdout_of(&out, &format!("{args:?}"))
    };

    assert_eq!(counts(&migrate(&["status"])), (0, 6));
    assert!(tables_in(&used).await.is_empty());

    assert_eq!(counts(&migrate(&["up"])), (6, 0));
    assert_eq!(tables_in(&used).await, TABLES);

    assert_eq!(counts(&migrate(&["down"])), (5, 1));
    assert_eq!(tables_in(&used).await, TABLES[..5]);

    // Migration 5 (partitions) changes nothing on SQLite.
    assert_eq!(counts(&migrate(&["down"])), (4, 2));
    assert_eq!(tables_in(&used).await, TABLES[..5]);

    assert_eq!(counts(&migrate(&["down"])), (3, 3));
    assert_eq!(tables_in(&used).await, TABLES[..3]);

    assert_eq!(counts(&migrate(&["down", "--steps", "2"])), (1, 5));
    assert_eq!(
        tables_in(&used).await,
        ["co2_emissions", "rejected_messages"]
    );

    assert_eq!(counts(&migrate(&["up", "--steps", "1"])), (2, 4));
    assert_eq!(counts(&migrate(&["status"])), (2, 4));

    assert!(!unused.exists(), "the config's database_url was not used");
}

/// Without `--config` or `CO2_CONFIG`, `./rumqttd.toml` is read, as by the broker.
#[tokio::test]
async fn the_config_in_the_working_directory_names_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("from-cwd.db");
    std::fs::write(
        dir.path().join("rumqttd.toml"),
        format!(
            "[co2]\ndatabase_url = \"sqlite://{}?mode=rwc\"\n",
            db.display()
        ),
    )
    .unwrap();
    let out = migration_in(dir.path()).arg("up").output().unwrap();
    assert_eq!(counts(&stdout_of(&out, "up")), (6, 0));
    assert_eq!(tables_in(&db).await, TABLES);
}

#[test]
fn a_missing_config_file_exits_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    for (config_flag, named_by) in [(true, "--config"), (false, "CO2_CONFIG")] {
        let mut command = migration_in(dir.path());
        if config_flag {
            command.arg("--config").arg(&missing);
        } else {
            command.env("CO2_CONFIG", &missing);
        }
        let out = command.arg("up").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("migration: configuration file "),
            "{stderr}"
        );
        assert!(stderr.contains(&*missing.to_string_lossy()), "{stderr}");
        assert!(stderr.contains(named_by), "{stderr}");
        assert!(out.stdout.is_empty());
    }
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(entries.is_empty(), "nothing created: {entries:?}");
}

#[test]
fn unusable_urls_and_arguments_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = migration_in(dir.path())
        .arg("status")
        .env("CO2_DATABASE_URL", "postgres://co2:s3cret@db/x")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("migration: config key `co2.database_url`: "),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret"), "{stderr}");
    for (args, says) in [
        (&["sideways"][..], "unrecognized subcommand 'sideways'"),
        (
            &["down", "--steps", "many"],
            "invalid value 'many' for '--steps <N>'",
        ),
        // Without a subcommand clap prints the usage (no `error:` line).
        (&[], "Usage: migration [OPTIONS] <COMMAND>"),
    ] {
        let out = migration_in(dir.path()).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

/// A database that cannot be opened is a failure of the run (1), with the masked URL.
#[test]
fn an_unreachable_database_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    // A SQLite file in a directory that is a file: cannot be created.
    std::fs::write(dir.path().join("blocker"), "").unwrap();
    let out = migration_in(dir.path())
        .arg("up")
        .env(
            "CO2_DATABASE_URL",
            format!("sqlite://{}/blocker/co2.db?mode=rwc", dir.path().display()),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("migration: cannot use database sqlite://"),
        "{stderr}"
    );
    assert!(stderr.contains("blocker"), "{stderr}");
}
