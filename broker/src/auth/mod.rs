//! Device authentication: the credentials file, reloaded while the broker runs, checked by
//! the guard on every CONNECT and by rumqttd's external auth hook behind it.
//!
//! A device connects with username = its device id, its password, and client id = username.
//! The last rule keeps one device from taking over (and kicking) another's session, since
//! rumqttd drops the older connection of a duplicate client id. Passwords are checked with
//! Argon2 off the async threads, a few at a time, and nothing about them is cached or logged.
//! Argon2 runs once per CONNECT: the guard checks (so it can answer a refusal with a CONNACK)
//! and forwards a per-process token instead of the password, which the hook accepts at once;
//! anything reaching rumqttd's loopback port without the guard is hashed by the hook.

pub mod credentials;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

pub use credentials::{check_device_id, hash_password, Credentials, CredentialsError};

use crate::metrics::IngestMetrics;
use crate::throttle::Throttle;

/// How often the credentials file's modification time is looked at.
pub const RELOAD_POLL: Duration = Duration::from_secs(1);
/// Password checks at once: each Argon2 check costs ~20 ms of CPU and ~19 MiB, so a flood of
/// CONNECTs waits here instead of taking every core and the memory.
const CONCURRENT_CHECKS: usize = 2;

/// The devices allowed to connect, kept current with the credentials file.
pub struct Authenticator {
    path: PathBuf,
    credentials: RwLock<Arc<Credentials>>,
    /// What the file looked like when last read, to notice edits cheaply.
    stamp: Mutex<Option<FileStamp>>,
    hashing: Semaphore,
    metrics: Arc<IngestMetrics>,
    refusal_log: Mutex<Throttle>,
    /// Bumped on every reload that changed the devices, so open connections of a removed
    /// device can be closed.
    changed: watch::Sender<u64>,
    /// What the guard puts in place of a password it has checked, so that rumqttd's hook does
    /// not run Argon2 a second time for the same CONNECT. Random per process and never
    /// logged; a process that reaches rumqttd's loopback port directly does not know it and
    /// is checked in full.
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
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::ClientIdIsNotUsername => "client id must equal the username",
            Refusal::UnknownDeviceOrWrongPassword => "unknown device or wrong password",
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
            hashing: Semaphore::new(CONCURRENT_CHECKS),
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

    /// Reads the file again. On an error the devices loaded before stay in force.
    pub fn reload(&self) -> Result<(), CredentialsError> {
        let stamp = FileStamp::of(&self.path);
        let fresh = Credentials::load(&self.path)?;
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner()) = stamp;
        let mut current = self.credentials.write().unwrap_or_else(|e| e.into_inner());
        if **current != fresh {
            tracing::info!(file = %self.path.display(), devices = fresh.len(), "device credentials reloaded");
            *current = Arc::new(fresh);
            drop(current);
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

    /// rumqttd's external auth hook. True lets the connection in. Refusals are counted and
    /// logged here: only processes that bypass the guard get this far with bad credentials.
    pub async fn check(&self, client_id: String, username: String, password: String) -> bool {
        let verdict = if client_id == username && self.is_vouched(&password) {
            // Checked by the guard moments ago; the device may have been removed since.
            if self.knows(&username) {
                Ok(())
            } else {
                Err(Refusal::UnknownDeviceOrWrongPassword)
            }
        } else {
            self.verify(&client_id, &username, password).await
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
    /// to forward in place of the device's own, which rumqttd's hook then accepts at once.
    /// Counting and logging a refusal is left to the caller.
    pub async fn vouch(
        &self,
        client_id: &str,
        username: &str,
        password: String,
    ) -> Result<&str, Refusal> {
        self.verify(client_id, username, password).await?;
        Ok(&self.vouched)
    }

    async fn verify(
        &self,
        client_id: &str,
        username: &str,
        password: String,
    ) -> Result<(), Refusal> {
        if client_id != username {
            return Err(Refusal::ClientIdIsNotUsername);
        }
        let credentials = self.current();
        // Closed only if the semaphore were closed, which never happens.
        let Ok(_permit) = self.hashing.acquire().await else {
            return Err(Refusal::UnknownDeviceOrWrongPassword);
        };
        let user = username.to_owned();
        match tokio::task::spawn_blocking(move || credentials.verify(&user, &password)).await {
            Ok(true) => Ok(()),
            Ok(false) | Err(_) => Err(Refusal::UnknownDeviceOrWrongPassword),
        }
    }

    /// Compared in constant time: how much of the token a guess got right must not show.
    fn is_vouched(&self, password: &str) -> bool {
        password.len() == self.vouched.len()
            && password
                .bytes()
                .zip(self.vouched.bytes())
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
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
        // The real password still works without the guard.
        assert!(auth.check("pi-2".into(), "pi-2".into(), "two".into()).await);

        // A device removed from the file is not let in on a token issued before.
        let mut credentials = Credentials::load(auth.path()).unwrap();
        credentials.remove("pi-1");
        credentials.save(auth.path()).unwrap();
        auth.reload().unwrap();
        assert!(!auth.check("pi-1".into(), "pi-1".into(), token).await);
    }
}
