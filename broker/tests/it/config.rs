//! Bad configuration stops the real binary with one line naming the key, and a non-zero exit.

use std::process::Command;

use crate::support::broker::config_file;

/// Runs the binary on a config whose `[co2]` section gets `extra`; returns (exit code, stderr).
fn run_with(extra: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/co2.db?mode=rwc", dir.path().display());
    let setup = config_file(dir.path(), &url, extra);
    let out = Command::new(env!("CARGO_BIN_EXE_co2-broker"))
        .arg("--config")
        .arg(&setup.config_path)
        .envs(env.iter().copied())
        .output()
        .expect("co2-broker runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn invalid_values_name_their_key() {
    let cases = [
        ("legacy_timezone = \"Mars/Olympus\"", "co2.legacy_timezone"),
        ("batch_max_rows = \"many\"", "co2.batch_max_rows"),
        ("batch_max_rows = 0", "co2.batch_max_rows"),
        ("max_co2_ppm = -1.0", "co2.max_co2_ppm"),
        ("spool_max_bytes = -5", "co2.spool_max_bytes"),
        ("no_such_key = 1", "no_such_key"),
    ];
    for (extra, key) in cases {
        let (code, stderr) = run_with(extra, &[]);
        assert_eq!(code, Some(2), "{extra}: {stderr}");
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "one line for {extra}: {stderr}"
        );
        assert!(stderr.contains(key), "{extra}: {stderr}");
    }
}

#[test]
fn environment_overrides_are_checked_too() {
    let (code, stderr) = run_with("", &[("CO2_DATABASE_URL", "postgres://nope")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("co2.database_url"), "{stderr}");
    let (code, stderr) = run_with("", &[("CO2_HTTP_LISTEN", "localhost")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("co2.http_listen"), "{stderr}");
}

#[test]
fn a_taken_port_fails_the_start_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/co2.db?mode=rwc", dir.path().display());
    // The free port the config names may be taken by a test running alongside before the
    // squatter binds it: then take another.
    let (setup, _squatter) = (0..20)
        .find_map(|_| {
            let setup = config_file(dir.path(), &url, "");
            let squatter = std::net::TcpListener::bind(setup.v4).ok()?;
            Some((setup, squatter))
        })
        .expect("a free port for the squatter");
    let out = Command::new(env!("CARGO_BIN_EXE_co2-broker"))
        .arg("--config")
        .arg(&setup.config_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {}", setup.v4)),
        "{stderr}"
    );
}

/// The real binary in `dir` as working directory, with no `CO2_CONFIG` inherited.
fn binary_in(dir: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_co2-broker"));
    command.current_dir(dir).env_remove("CO2_CONFIG");
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_config_file_it_runs_on_the_built_in_defaults() {
    use crate::support::{db, eventually, free_port, mqtt};
    use std::time::Duration;

    // A new directory, as for an installed binary: no rumqttd.toml anywhere near. The
    // built-in listeners (1883, 1884, 9883) are moved to free ports through the environment,
    // so the test does not depend on those ports being free.
    let dir = tempfile::tempdir().unwrap();
    let v4: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let v5 = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let log_path = dir.path().join("broker.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = binary_in(dir.path())
        .env("CO2_V4__1__LISTEN", v4.to_string())
        .env("CO2_V5__1__LISTEN", &v5)
        .env("CO2_HTTP_LISTEN", &http)
        .env("RUST_LOG", "info,rumqttd=warn")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let started = tokio::time::timeout(Duration::from_secs(30), mqtt::wait_until_accepting(v4));
    if started.await.is_err() || child.try_wait().unwrap().is_some() {
        let _ = child.kill();
        panic!(
            "the broker did not start on the built-in defaults:\n{}",
            read_log()
        );
    }

    // It works as shipped: a reading lands in the default SQLite file under the working
    // directory.
    mqtt::publish_one(v4, "co2/pi-defaults", "612").await;
    let url = format!("sqlite://{}/data/co2.db?mode=ro", dir.path().display());
    let conn = db::connect(&url).await;
    eventually(
        Duration::from_secs(10),
        "the reading in data/co2.db",
        || {
            let conn = conn.clone();
            async move { (db::reading_count(&conn).await == 1).then_some(()) }
        },
    )
    .await;

    let term = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(term.success());
    let status = child.wait().unwrap();
    let log = read_log();
    assert_eq!(status.code(), Some(0), "{log}");
    let notice = log
        .lines()
        .find(|l| l.contains("running on the built-in defaults"))
        .unwrap_or_else(|| panic!("no built-in defaults notice in the log:\n{log}"));
    assert!(notice.contains("WARN"), "{notice}");
    assert!(log.contains(&format!("on {v4}")), "{log}");
}

#[test]
fn a_named_config_file_that_is_missing_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    // A rumqttd.toml in the working directory must not stand in for the named file.
    std::fs::write(dir.path().join("rumqttd.toml"), "").unwrap();
    let missing = dir.path().join("etc/co2-broker/rumqttd.toml");
    let by_flag = binary_in(dir.path())
        .arg("--config")
        .arg(&missing)
        .output()
        .unwrap();
    let by_env = binary_in(dir.path())
        .env("CO2_CONFIG", &missing)
        .output()
        .unwrap();
    for (out, named_by) in [(by_flag, "--config"), (by_env, "CO2_CONFIG")] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&format!("{:?}", missing.display().to_string())),
            "{stderr}"
        );
        assert!(stderr.contains("not found"), "{stderr}");
        assert!(stderr.contains(named_by), "{stderr}");
    }
}

#[test]
fn help_exits_0_and_a_wrong_argument_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let help = binary_in(dir.path()).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert_eq!(help.status.code(), Some(0), "{text}");
    for word in ["--config", "passwd", "migrate"] {
        assert!(text.contains(word), "{word} in:\n{text}");
    }
    for args in [
        &["--frobnicate"][..],
        &["migrate", "sideways"],
        &["--config"],
    ] {
        let out = binary_in(dir.path()).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    }
}

/// `co2-broker migrate` resolves the database exactly like the broker: here the file named by
/// `CO2_DATABASE_URL_FILE` wins over the config's `database_url`.
#[test]
fn migrate_works_on_the_database_the_settings_name() {
    let dir = tempfile::tempdir().unwrap();
    let unused = dir.path().join("from-config.db");
    let setup = config_file(
        dir.path(),
        &format!("sqlite://{}?mode=rwc", unused.display()),
        "",
    );
    let used = dir.path().join("db/from-url-file.db");
    let url_file = dir.path().join("database-url");
    std::fs::write(&url_file, format!("sqlite://{}?mode=rwc\n", used.display())).unwrap();
    let migrate = |args: &[&str]| {
        let out = binary_in(dir.path())
            .arg("--config")
            .arg(&setup.config_path)
            .arg("migrate")
            .args(args)
            .env("CO2_DATABASE_URL_FILE", &url_file)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "migrate {args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<String> = stdout
            .lines()
            .filter(|l| l.starts_with('m'))
            .map(str::to_owned)
            .collect();
        lines
    };
    let applied = |lines: &[String]| lines.iter().filter(|l| l.ends_with("\tApplied")).count();

    let all = <migration::Migrator as migration::MigratorTrait>::migrations().len();
    let status = migrate(&["status"]);
    assert_eq!(status.len(), all, "{status:?}");
    assert_eq!(applied(&status), 0, "{status:?}");
    assert_eq!(applied(&migrate(&["up"])), all);
    assert_eq!(applied(&migrate(&["down"])), all - 1);
    assert_eq!(applied(&migrate(&["down", "--steps", "2"])), all - 3);
    assert_eq!(applied(&migrate(&["up", "--steps", "1"])), all - 2);
    assert!(used.exists(), "the URL file's database was migrated");
    assert!(!unused.exists(), "the config's database_url was not used");
}
