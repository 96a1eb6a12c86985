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
    let setup = config_file(dir.path(), &url, "");
    let _squatter = std::net::TcpListener::bind(setup.v4).unwrap();
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
