//! Device authentication: the credentials file, reloaded while the broker runs, checked by
//! the guard on every CONNECT and by rumqttd's external auth hook behind it.
//!
//! A device connects with username = its device id, its password, and client id = username.
//! The last rule keeps one device from taking over (and kicking) another's session, since
//! rumqttd drops the older connection of a duplicate client id. Passwords are checked with
//! Argon2 by [`checks`] (a fixed pool behind a bounded queue, with a short memory of right
//! passwords); nothing about them is logged.
//!
//! Only the guard gets into rumqttd: it checks the password (so it can answer a refusal with
//! a CONNACK) and forwards a random per-process token in its place, and rumqttd's hook lets in
//! nothing but that token. A local process that reaches rumqttd's loopback port directly, even
//! with a device's right password, is refused: otherwise it could subscribe to `#`, publish as
//! any device, and forge the storage acks that make agents delete unstored readings.

pub mod checks;
pub mod credentials;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use checks::{CheckError, PasswordChecks};
pub use credentials::{check_device_id, hash_password, Credentials, CredentialsError};

use crate::metrics::IngestMetrics;
use crate::throttle::Throttle;

/// How often the credentials file's modification time is looked at.
pub const RELOAD_POLL: Duration = Duration::from_secs(1);

/// The devices allowed to connect, kept current with the credentials file.
pub struct Authenticator {
    path: PathBuf,
    credentials: RwLock<Arc<Credentials>>,
    /// What the file looked like when last read, to notice edits cheaply.
    stamp: Mutex<Option<FileStamp>>,
    checks: PasswordChecks,
    metrics: Arc<IngestMetrics>,
    refusal_log: Mutex<Throttle>,
    /// Bumped on every reload that changed the devices, so open connections of a removed
    /// device can be closed.
    changed: watch::Sender<u64>,
    /// What the guard puts in place of a password it has checked; the only password rumqttd's
    /// hook accepts. Random per process and never logged, so only the guard knows it.
    vouched: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    #[cfg(unix)]
    inode: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        Some(Self {
            modified: meta.modified().ok(),
            len: meta.len(),
            #[cfg(unix)]
            inode: std::os::unix::fs::MetadataExt::ino(&meta),
        })
    }
}

/// Why a CONNECT was refused, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    ClientIdIsNotUsername,
    UnknownDeviceOrWrongPassword,
    /// Too many password checks waiting; not a verdict on the password.
    Busy,
    /// At rumqttd's own port: anything but the guard's token.
    NotThroughTheGuard,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::ClientIdIsNotUsername => "client id must equal the username",
            Refusal::UnknownDeviceOrWrongPassword => "unknown device or wrong password",
            Refusal::Busy => "too many password checks waiting",
            Refusal::NotThroughTheGuard => {
                "connected to rumqttd's loopback port, not through the guard"
            }
        }
    }
}

impl Authenticator {
    /// Reads the credentials file (a missing file means no device may connect yet).
    pub fn open(path: &Path, metrics: Arc<IngestMetrics>) -> Result<Arc<Self>, CredentialsError> {
        let stamp = FileStamp::of(path);
        let credentials = Credentials::load(path)?;
        if credentials.is_empty() {
            tracing::warn!(file = %path.display(), "no device in the credentials file: every MQTT connection is refused until one is added (co2-broker passwd add <device>)");
        } else {
            tracing::info!(file = %path.display(), devices = credentials.len(), "device credentials loaded");
        }
        Ok(Arc::new(Self {
            path: path.to_owned(),
            credentials: RwLock::new(Arc::new(credentials)),
            stamp: Mutex::new(stamp),
            checks: PasswordChecks::new(metrics.clone()),
            metrics,
            refusal_log: Mutex::new(Throttle::new(Duration::from_secs(1))),
            changed: watch::channel(0).0,
            vouched: random_token(),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn current(&self) -> Arc<Credentials> {
        self.credentials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether `device` is (still) in the credentials file.
    pub fn knows(&self, device: &str) -> bool {
        self.current().contains(device)
    }

    /// Changes whenever a reload changed the set of devices or their passwords.
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Reads the file again. On an error the devices loaded before stay in force. A file that
    /// is gone, or holds no device without saying so (the header `co2-broker passwd` writes),
    /// counts as an error too: a truncated or half-copied file must not lock out every device.
    pub fn reload(&self) -> Result<(), CredentialsError> {
        let stamp = FileStamp::of(&self.path);
        let fresh = Credentials::load_deliberate(&self.path)?;
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = stamp;
        let mut current = self.credentials.write().unwrap_or_else(|e| e.into_inner());
        if **current != fresh {
            tracing::info!(file = %self.path.display(), devices = fresh.len(), "device credentials reloaded");
            *current = Arc::new(fresh);
            drop(current);
            self.checks.forget_all();
            self.changed.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// Reloads if the file looks different from when it was last read.
    pub fn reload_if_changed(&self) {
        let stamp = FileStamp::of(&self.path);
        if *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) == stamp {
            return;
        }
        if let Err(e) = self.reload() {
            tracing::error!(error = %e, "cannot reload the credentials file; the devices loaded before stay in force");
            // Do not retry every second for the same broken content; the next edit retries.
            *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = stamp;
        }
    }

    /// rumqttd's external auth hook. True lets the connection in: only the guard's token, for
    /// a device still in the file. Refusals are counted and logged here: only processes that
    /// bypass the guard get this far.
    pub async fn check(&self, client_id: String, username: String, password: String) -> bool {
        let verdict = if client_id != username {
            Err(Refusal::ClientIdIsNotUsername)
        } else if !checks::constant_time_eq(password.as_bytes(), self.vouched.as_bytes()) {
            Err(Refusal::NotThroughTheGuard)
        } else if !self.knows(&username) {
            // Checked by the guard moments ago; the device may have been removed since.
            Err(Refusal::UnknownDeviceOrWrongPassword)
        } else {
            Ok(())
        };
        match verdict {
            Ok(()) => true,
            Err(refusal) => {
                self.refused(&client_id, &username, refusal);
                false
            }
        }
    }

    /// The guard's check of a CONNECT, before it goes to rumqttd. On success, the password
    /// to forward in place of the device's own, which rumqttd's hook then accepts. Counting
    /// and logging a refusal is left to the caller. Cancel-safe: a client that leaves while
    /// its check waits costs no hashing.
    pub async fn vouch(
        &self,
        client_id: &str,
        username: &str,
        password: String,
    ) -> Result<&str, Refusal> {
        if client_id != username {
            return Err(Refusal::ClientIdIsNotUsername);
        }
        match self.checks.check(self.current(), username, password).await {
            Ok(()) => Ok(&self.vouched),
            Err(CheckError::Wrong) => Err(Refusal::UnknownDeviceOrWrongPassword),
            Err(CheckError::Busy) => Err(Refusal::Busy),
        }
    }

    /// The password checks, for their counters.
    pub fn checks(&self) -> &PasswordChecks {
        &self.checks
    }

    fn refused(&self, client_id: &str, username: &str, refusal: Refusal) {
        IngestMetrics::add(&self.metrics.auth_refused, 1);
        let ready = self
            .refusal_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ready();
        if let Some(suppressed) = ready {
            let reason = refusal.reason();
            tracing::warn!(
                client_id = %client_id.escape_debug(),
                username = %username.escape_debug(),
                reason,
                suppressed,
                "MQTT connection refused"
            );
        }
    }

    /// Reloads on every change of the file (polled every [`RELOAD_POLL`]) and on SIGHUP, until
    /// `stop`.
    pub fn watch(self: Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hangup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut poll = tokio::time::interval(RELOAD_POLL);
            loop {
                #[cfg(unix)]
                let sighup = async {
                    match hangup.as_mut() {
                        Some(h) => {
                            h.recv().await;
                        }
                        None => std::future::pending().await,
                    }
                };
                #[cfg(not(unix))]
                let sighup = std::future::pending::<()>();
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = poll.tick() => self.reload_if_changed(),
                    () = sighup => {
                        tracing::info!("SIGHUP: reloading the credentials file");
                        if let Err(e) = self.reload() {
                            tracing::error!(error = %e, "cannot reload the credentials file; the devices loaded before stay in force");
                        }
                    }
                }
            }
        })
    }
}

/// 256 random bits from the operating system, as hex.
fn random_token() -> String {
    use argon2::password_hash::rand_core::{OsRng, RngCore};
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authenticator(dir: &Path, devices: &[(&str, &str)]) -> Arc<Authenticator> {
        let cheap = argon2::Params::new(8, 1, 1, None).unwrap();
        let mut credentials = Credentials::default();
        for (device, password) in devices {
            let hash = credentials::hash_password_with(password, cheap.clone()).unwrap();
            credentials.set(device, hash).unwrap();
        }
        let path = dir.join("devices.passwd");
        credentials.save(&path).unwrap();
        Authenticator::open(&path, Arc::default()).unwrap()
    }

    #[tokio::test]
    async fn the_guards_token_stands_for_a_checked_password_only() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authenticator(dir.path(), &[("pi-1", "one"), ("pi-2", "two")]);
        let wrong = auth.vouch("pi-1", "pi-1", "two".into()).await;
        assert_eq!(wrong, Err(Refusal::UnknownDeviceOrWrongPassword));
        let other_id = auth.vouch("pi-2", "pi-1", "one".into()).await;
        assert_eq!(other_id, Err(Refusal::ClientIdIsNotUsername));

        let token = auth
            .vouch("pi-1", "pi-1", "one".into())
            .await
            .unwrap()
            .to_owned();
        assert_eq!(token.len(), 64);
        assert_ne!(token, random_token(), "random per process");
        assert!(
            auth.check("pi-1".into(), "pi-1".into(), token.clone())
                .await
        );
        assert!(
            !auth
                .check("pi-1".into(), "pi-2".into(), token.clone())
                .await,
            "still bound to the client id"
        );
        let mut guess = token.clone();
        guess.replace_range(63.., if token.ends_with('0') { "1" } else { "0" });
        assert!(!auth.check("pi-1".into(), "pi-1".into(), guess).await);
        // Without the guard even the right password does not get in.
        assert!(!auth.check("pi-2".into(), "pi-2".into(), "two".into()).await);

        // A device removed from the file is not let in on a token issued before.
        let mut credentials = Credentials::load(auth.path()).unwrap();
        credentials.remove("pi-1");
        credentials.save(auth.path()).unwrap();
        auth.reload().unwrap();
        assert!(!auth.check("pi-1".into(), "pi-1".into(), token).await);
    }

    #[tokio::test]
    async fn an_emptied_or_vanished_file_keeps_the_devices_loaded_before() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authenticator(dir.path(), &[("pi-1", "one")]);
        for damaged in ["", "\n\n", "# some comment\n"] {
            std::fs::write(auth.path(), damaged).unwrap();
            let err = auth.reload().unwrap_err().to_string();
            assert!(err.contains("no device"), "{err}");
            assert!(auth.knows("pi-1"), "after {damaged:?}");
        }
        std::fs::remove_file(auth.path()).unwrap();
        assert!(auth.reload().is_err());
        assert!(auth.knows("pi-1"));
        // Emptied on purpose, by `co2-broker passwd remove`: taken.
        Credentials::default().save(auth.path()).unwrap();
        auth.reload().unwrap();
        assert!(!auth.knows("pi-1"));
    }
}
