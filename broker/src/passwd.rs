//! `co2-broker passwd`: add, list and remove devices in the credentials file.
//!
//! The file is rewritten atomically; a running broker notices the change within a second (or
//! at once on SIGHUP), so devices come and go without a restart.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::auth::{check_device_id, hash_password, Credentials};

pub const USAGE: &str = "\
usage: co2-broker [--config PATH] passwd add <device> [--password-stdin] [--file PATH]
       co2-broker [--config PATH] passwd remove <device> [--file PATH]
       co2-broker [--config PATH] passwd list [--file PATH]
The file is co2.credentials_file of the config unless --file names one. `add` prompts for the
password (twice) on a terminal and otherwise reads one line from stdin; it replaces the password
of an existing device.";

/// A parsed `passwd` command line.
#[derive(Debug, PartialEq, Eq)]
pub struct PasswdArgs {
    pub action: Action,
    /// `--file`; otherwise the config's `co2.credentials_file`.
    pub file: Option<PathBuf>,
    pub password_stdin: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Add(String),
    Remove(String),
    List,
}

impl PasswdArgs {
    /// Parses the arguments after `passwd`.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Self, String> {
        let mut positional = Vec::new();
        let (mut file, mut password_stdin) = (None, false);
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--password-stdin" => password_stdin = true,
                "--file" | "-f" => {
                    file = Some(PathBuf::from(args.next().ok_or("--file needs a path")?))
                }
                flag if flag.starts_with('-') => return Err(format!("unknown option {flag}")),
                _ => positional.push(arg),
            }
        }
        let action = match positional
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            ["add", device] => Action::Add(device.to_string()),
            ["remove" | "rm" | "delete", device] => Action::Remove(device.to_string()),
            ["list" | "ls"] => Action::List,
            _ => return Err("expected `add <device>`, `remove <device>` or `list`".into()),
        };
        if let Action::Add(device) | Action::Remove(device) = &action {
            check_device_id(device)?;
        }
        Ok(Self {
            action,
            file,
            password_stdin,
        })
    }
}

/// Runs the command on `file`; returns what to print on stdout.
pub fn run(args: &PasswdArgs, file: &Path) -> anyhow::Result<String> {
    let mut credentials = Credentials::load(file)?;
    match &args.action {
        Action::List => Ok(credentials.devices().map(|d| format!("{d}\n")).collect()),
        Action::Add(device) => {
            let password = read_password(device, args.password_stdin)?;
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
        Action::Remove(device) => {
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
    use super::*;

    fn parse(args: &[&str]) -> Result<PasswdArgs, String> {
        PasswdArgs::parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_the_three_actions() {
        assert_eq!(
            parse(&["add", "pi-7", "--password-stdin"]).unwrap(),
            PasswdArgs {
                action: Action::Add("pi-7".into()),
                file: None,
                password_stdin: true
            }
        );
        assert_eq!(
            parse(&["remove", "pi-7", "--file", "x"]).unwrap().file,
            Some(PathBuf::from("x"))
        );
        assert_eq!(parse(&["list"]).unwrap().action, Action::List);
        assert!(parse(&["add"]).is_err());
        assert!(parse(&["add", "co2/#"]).is_err());
        assert!(parse(&["frobnicate"]).is_err());
    }
}
