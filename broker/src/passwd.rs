//! `co2-broker passwd`: add, list and remove devices in the credentials file.
//!
//! The file is rewritten atomically; a running broker notices the change within a second (or
//! at once on SIGHUP), so devices come and go without a restart.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::auth::{check_device_id, hash_password, Credentials};

/// `co2-broker passwd …`: the arguments after `passwd`.
#[derive(Debug, clap::Args)]
#[command(
    about = "Add, list or remove devices in the credentials file",
    after_help = "The file is co2.credentials_file of the config unless --file names one. `add` prompts for \
                  the password (twice) on a terminal and otherwise reads one line from stdin; it \
                  replaces the password of an existing device."
)]
pub struct PasswdArgs {
    #[command(subcommand)]
    pub action: Action,
    /// The credentials file [default: co2.credentials_file of the config].
    #[arg(short, long, value_name = "PATH", global = true)]
    pub file: Option<PathBuf>,
}

#[derive(Debug, PartialEq, Eq, clap::Subcommand)]
pub enum Action {
    /// Add a device, or replace its password.
    Add {
        #[arg(value_parser = device_id)]
        device: String,
        /// Read the password from stdin even on a terminal.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Remove a device; its open connections are closed.
    #[command(visible_alias = "rm", alias = "delete")]
    Remove {
        #[arg(value_parser = device_id)]
        device: String,
    },
    /// List the devices.
    #[command(visible_alias = "ls")]
    List,
}

/// A device id as the credentials file accepts it.
fn device_id(id: &str) -> Result<String, String> {
    check_device_id(id)?;
    Ok(id.to_owned())
}

/// Runs the command on `file`; returns what to print on stdout.
pub fn run(args: &PasswdArgs, file: &Path) -> anyhow::Result<String> {
    let mut credentials = Credentials::load(file)?;
    match &args.action {
        Action::List => Ok(credentials.devices().map(|d| format!("{d}\n")).collect()),
        Action::Add {
            device,
            password_stdin,
        } => {
            let password = read_password(device, *password_stdin)?;
            if password.is_empty() {
                bail!("empty password");
            }
            let existed = credentials.contains(device);
            credentials
                .set(device, hash_password(&password)?)
                .map_err(anyhow::Error::msg)?;
            credentials.save(file)?;
            Ok(format!(
                "{} device {device} in {}\n",
                if existed { "updated" } else { "added" },
                file.display()
            ))
        }
        Action::Remove { device } => {
            if !credentials.remove(device) {
                bail!("no device {device} in {}", file.display());
            }
            credentials.save(file)?;
            Ok(format!(
                "removed device {device} from {}; its open connections are closed\n",
                file.display()
            ))
        }
    }
}

/// One line from stdin, or a prompt without echo (twice) when stdin is a terminal.
fn read_password(device: &str, from_stdin: bool) -> anyhow::Result<String> {
    use std::io::IsTerminal;
    let stdin = std::io::stdin();
    if from_stdin || !stdin.is_terminal() {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from stdin")?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_owned());
    }
    let first = prompt(&format!("password for {device}: "))?;
    let second = prompt("again: ")?;
    if first != second {
        bail!("the passwords differ");
    }
    Ok(first)
}

/// Reads a line from the terminal with echo off (`stty -echo`, restored afterwards).
fn prompt(text: &str) -> anyhow::Result<String> {
    use std::io::Write;
    eprint!("{text}");
    let _ = std::io::stderr().flush(); // a prompt shown late is still a prompt
    let stty = |arg: &str| {
        std::process::Command::new("stty")
            .arg(arg)
            .stdin(std::process::Stdio::inherit())
            .status()
            .is_ok_and(|s| s.success())
    };
    let silenced = stty("-echo");
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    if silenced {
        stty("echo");
    }
    eprintln!();
    read.context("cannot read the password")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// `passwd` as the broker's command line nests it.
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        passwd: PasswdArgs,
    }

    fn parse(args: &[&str]) -> Result<PasswdArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("passwd").chain(args.iter().copied())).map(|c| c.passwd)
    }

    #[test]
    fn parses_the_three_actions() {
        let add = parse(&["add", "pi-7", "--password-stdin"]).unwrap();
        assert_eq!(
            add.action,
            Action::Add {
                device: "pi-7".into(),
                password_stdin: true
            }
        );
        assert_eq!(add.file, None);
        assert_eq!(
            parse(&["remove", "pi-7", "--file", "x"]).unwrap().file,
            Some(PathBuf::from("x"))
        );
        assert_eq!(
            parse(&["rm", "pi-7"]).unwrap().action,
            Action::Remove {
                device: "pi-7".into()
            }
        );
        assert_eq!(parse(&["list"]).unwrap().action, Action::List);
        assert!(parse(&["add"]).is_err());
        assert!(parse(&["add", "co2/#"]).is_err());
        assert!(parse(&["frobnicate"]).is_err());
    }
}
