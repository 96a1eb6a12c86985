//! The installed binary's command line: `--help` and `--version` succeed, a wrong argument
//! exits 2 with an error that points to `--help`, and an override reaches the config (seen through `--once`).

use std::process::{Command, Output};

fn co2_edge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_co2-edge"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("co2-edge runs")
}

#[test]
fn help_and_version_exit_0() {
    let help = co2_edge(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("Usage: co2-edge [OPTIONS]"), "{text}");
    assert!(text.contains("--once"), "{text}");
    let version = co2_edge(&["--version"]);
    assert_eq!(version.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("co2-edge {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn wrong_arguments_exit_2() {
    for wrong in [
        &["--frobnicate"][..],
        &["--interval-ms", "soon"],
        &["--config"],
    ] {
        let out = co2_edge(wrong);
        assert_eq!(out.status.code(), Some(2), "{wrong:?}");
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(text.starts_with("error: "), "{wrong:?}: {text}");
        assert!(text.contains("try '--help'"), "{wrong:?}: {text}");
    }
}

#[test]
fn overrides_reach_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("empty.toml");
    std::fs::write(&config, "").unwrap();
    let config = config.to_str().unwrap();
    let once = co2_edge(&["--config", config, "--once", "--sensor", "simulated"]);
    let stdout = String::from_utf8_lossy(&once.stdout);
    assert_eq!(once.status.code(), Some(0), "{once:?}");
    assert!(stdout.contains("\"value\":"), "{stdout}");
    let bogus = co2_edge(&["--config", config, "--once", "--sensor", "bogus"]);
    assert_eq!(bogus.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bogus.stderr);
    assert!(stderr.contains("bogus"), "{stderr}");
}
