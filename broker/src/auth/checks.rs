//! Password checks: Argon2 on a fixed pool of threads behind a bounded queue, and a short-lived
//! memory of passwords that were right.
//!
//! An Argon2 check costs ~20 ms of CPU and 19 MiB, by design. A flood of CONNECTs with wrong
//! passwords must therefore neither queue without bound (every waiting connection holds a slot
//! and its buffers, and a legitimate device would wait behind all of them) nor spread over
//! tokio's blocking pool (each of its up to 512 threads keeps its own malloc arena of 19 MiB).
//! So:
//! - [`CHECK_THREADS`] threads do all the hashing; their memory is reused check after check;
//! - at most [`QUEUED_CHECKS`] checks wait for them; beyond that a CONNECT is refused at once
//!   as "server busy" (the device retries, as it would after any refusal);
//! - a check whose client is gone by the time a thread takes it is skipped (the waiting side
//!   dropped its receiver);
//! - at most [`CHECKS_PER_DEVICE`] checks per device id are queued or running, and all unknown
//!   device ids share one such allowance: a flood of wrong passwords for one device, or for
//!   made-up ones, from any number of addresses, takes at most that many places in the queue,
//!   so other devices still get theirs. (A flood naming many real devices can still fill the
//!   queue; the devices then hear "server busy" and retry, and those remembered below skip it.)
//! - a device's password that was right is remembered for [`VERIFIED_FOR`] as a keyed hash, so
//!   a device reconnecting (a flapping network, an agent restarting) skips the queue and the
//!   Argon2 cost, also while a flood of wrong passwords keeps the threads busy.
//!
//! The memory holds, per device, a BLAKE2b hash of the password under a random per-process key
//! and the stored Argon2 hash it was checked against: a wrong password, a changed password in
//! the credentials file or a removed device all miss it. It never leaves the process and is
//! bounded by the number of devices in the file.

use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blake2::{Blake2b512, Digest};
use tokio::sync::oneshot;

use super::credentials::{ArgonMemory, Credentials};
use crate::metrics::IngestMetrics;

/// Threads that run Argon2.
pub const CHECK_THREADS: usize = 2;
/// Checks that may wait for a thread: at ~20 ms a check, the last one waits ~0.3 s.
pub const QUEUED_CHECKS: usize = 32;
/// Checks for one device id (or for all unknown ones together) that may be queued or running.
pub const CHECKS_PER_DEVICE: usize = 2;
/// How long a password that was right is taken as right again without Argon2.
pub const VERIFIED_FOR: Duration = Duration::from_secs(600);

/// Why a password could not be confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckError {
    /// Unknown device or wrong password.
    Wrong,
    /// Too many checks waiting: try again later.
    Busy,
}

/// The pool, its queue and the memory of right passwords. Dropping it ends the threads once
/// the queue is drained.
pub struct PasswordChecks {
    queue: SyncSender<Job>,
    verified: Mutex<HashMap<String, Verified>>,
    pending: Allowances,
    /// Key of the remembered password hashes; random per process.
    key: [u8; 32],
}

struct Job {
    credentials: Arc<Credentials>,
    device: String,
    password: String,
    verdict: oneshot::Sender<bool>,
    allowance: PendingCheck,
}

struct Verified {
    password: [u8; 64],
    /// The credentials file's hash the password was checked against.
    stored_hash: String,
    until: Instant,
}

impl PasswordChecks {
    /// Counts every Argon2 computation in `metrics.password_hashes`.
    pub fn new(metrics: Arc<IngestMetrics>) -> Self {
        let (queue, jobs) = sync_channel(QUEUED_CHECKS);
        let jobs = Arc::new(Mutex::new(jobs));
        for n in 0..CHECK_THREADS {
            let (jobs, metrics) = (jobs.clone(), metrics.clone());
            // A thread that cannot be started leaves fewer threads; with none, every check
            // waits until its connection's deadline and is refused, which is loud enough.
            let started = std::thread::Builder::new()
                .name(format!("co2-password-check-{n}"))
                .spawn(move || run_checks(&jobs, &metrics));
            if let Err(e) = started {
                tracing::error!(error = %e, "cannot start a password check thread");
            }
        }
        let mut key = [0u8; 32];
        argon2::password_hash::rand_core::RngCore::fill_bytes(
            &mut argon2::password_hash::rand_core::OsRng,
            &mut key,
        );
        Self {
            queue,
            verified: Mutex::new(HashMap::new()),
            pending: Arc::default(),
            key,
        }
    }

    /// Whether `password` is `device`'s password in `credentials`. Cancel-safe: dropping the
    /// future before the check started skips the check.
    pub async fn check(
        &self,
        credentials: Arc<Credentials>,
        device: &str,
        password: String,
    ) -> Result<(), CheckError> {
        let keyed = self.keyed(&password);
        let stored_hash = credentials.hash_of(device).map(str::to_owned);
        if let Some(stored) = &stored_hash {
            if self.remembered(device, stored, &keyed) {
                return Ok(());
            }
        }
        // Travels with the job: a check abandoned by its client keeps its place in the
        // device's allowance until a thread takes it off the queue.
        let known = stored_hash.is_some().then(|| device.to_owned());
        let Some(pending) = PendingCheck::take(&self.pending, known) else {
            return Err(CheckError::Busy);
        };
        let (verdict, answer) = oneshot::channel();
        let job = Job {
            credentials,
            device: device.to_owned(),
            password,
            verdict,
            allowance: pending,
        };
        match self.queue.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(CheckError::Busy),
            // No thread left to check: nobody gets in, and the log says why.
            Err(TrySendError::Disconnected(_)) => return Err(CheckError::Busy),
        }
        match answer.await {
            Ok(true) => {
                if let Some(stored_hash) = stored_hash {
                    self.remember(device, stored_hash, keyed);
                }
                Ok(())
            }
            Ok(false) => Err(CheckError::Wrong),
            Err(_) => Err(CheckError::Busy), // the checking thread died
        }
    }

    /// Forgets every remembered password (the credentials file changed).
    pub fn forget_all(&self) {
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn keyed(&self, password: &str) -> [u8; 64] {
        let digest = Blake2b512::new()
            .chain_update(self.key)
            .chain_update(password.as_bytes())
            .finalize();
        digest.into()
    }

    fn remembered(&self, device: &str, stored_hash: &str, keyed: &[u8; 64]) -> bool {
        let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        verified.get(device).is_some_and(|v| {
            v.until > Instant::now()
                && v.stored_hash == stored_hash
                && constant_time_eq(&v.password, keyed)
        })
    }

    fn remember(&self, device: &str, stored_hash: String, password: [u8; 64]) {
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        verified.retain(|_, v| v.until > now);
        verified.insert(
            device.to_owned(),
            Verified {
                password,
                stored_hash,
                until: now + VERIFIED_FOR,
            },
        );
    }
}

/// Checks queued or running per device id; `None` stands for every unknown id.
type Allowances = Arc<Mutex<HashMap<Option<String>, usize>>>;

/// A place in a device's allowance of [`CHECKS_PER_DEVICE`]; given back when dropped.
struct PendingCheck {
    pending: Allowances,
    device: Option<String>,
}

impl PendingCheck {
    /// `None` when `device` (`None`: any unknown device) has all its checks in use.
    fn take(pending: &Allowances, device: Option<String>) -> Option<Self> {
        let mut counts = pending.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(device.clone()).or_default();
        if *count >= CHECKS_PER_DEVICE {
            return None;
        }
        *count += 1;
        Some(Self {
            pending: pending.clone(),
            device,
        })
    }
}

impl Drop for PendingCheck {
    fn drop(&mut self) {
        let mut counts = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.device) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.device); // bounded by the devices being checked right now
            }
        }
    }
}

/// One checking thread: takes jobs until every sender is gone.
fn run_checks(jobs: &Mutex<Receiver<Job>>, metrics: &IngestMetrics) {
    let mut memory = ArgonMemory::default();
    loop {
        let job = {
            let jobs = jobs.lock().unwrap_or_else(|e| e.into_inner());
            match jobs.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        if job.verdict.is_closed() {
            continue; // the client left (or its deadline passed) while the check waited
        }
        let right = job
            .credentials
            .verify_in(&job.device, &job.password, &mut memory);
        IngestMetrics::add(&metrics.password_hashes, 1);
        // The device's allowance is free before it hears the verdict, so it may try again.
        let Job {
            verdict, allowance, ..
        } = job;
        drop(allowance);
        let _ = verdict.send(right); // a client that left meanwhile needs no answer
    }
}

/// Compared in constant time: how much of a secret a guess got right must not show.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::credentials::hash_password_with;

    fn credentials(devices: &[(&str, &str)], cost_kib: u32) -> Arc<Credentials> {
        let params = argon2::Params::new(cost_kib, 1, 1, None).unwrap();
        let mut credentials = Credentials::default();
        for (device, password) in devices {
            let hash = hash_password_with(password, params.clone()).unwrap();
            credentials.set(device, hash).unwrap();
        }
        Arc::new(credentials)
    }

    /// `n` devices `pi-0`.. sharing the password "one" (hashed once: the tests' time goes to
    /// the checks, not to making the file).
    fn many_devices(n: usize, cost_kib: u32) -> Arc<Credentials> {
        let params = argon2::Params::new(cost_kib, 1, 1, None).unwrap();
        let hash = hash_password_with("one", params).unwrap();
        let mut credentials = Credentials::default();
        for device in 0..n {
            credentials
                .set(&format!("pi-{device}"), hash.clone())
                .unwrap();
        }
        Arc::new(credentials)
    }

    #[tokio::test]
    async fn right_wrong_and_remembered() {
        let checks = PasswordChecks::new(Arc::default());
        let creds = credentials(&[("pi-1", "one")], 8);
        assert_eq!(
            checks.check(creds.clone(), "pi-1", "two".into()).await,
            Err(CheckError::Wrong)
        );
        assert_eq!(
            checks.check(creds.clone(), "pi-9", "one".into()).await,
            Err(CheckError::Wrong)
        );
        assert_eq!(
            checks.check(creds.clone(), "pi-1", "one".into()).await,
            Ok(())
        );
        assert!(checks.remembered("pi-1", creds.hash_of("pi-1").unwrap(), &checks.keyed("one")));
        assert!(!checks.remembered("pi-1", creds.hash_of("pi-1").unwrap(), &checks.keyed("onE")));
        // A new password in the file does not match what was remembered for the old one.
        let changed = credentials(&[("pi-1", "one")], 8);
        assert!(!checks.remembered(
            "pi-1",
            changed.hash_of("pi-1").unwrap(),
            &checks.keyed("one")
        ));
        checks.forget_all();
        assert!(!checks.remembered("pi-1", creds.hash_of("pi-1").unwrap(), &checks.keyed("one")));
    }

    #[tokio::test]
    async fn a_full_queue_answers_busy_at_once_and_departed_checks_are_skipped() {
        let metrics = Arc::new(IngestMetrics::default());
        let checks = Arc::new(PasswordChecks::new(metrics.clone()));
        // Expensive enough that the threads stay busy while the queue fills; one check per
        // device, so each device's allowance has room.
        let clients = CHECK_THREADS + QUEUED_CHECKS + 8;
        let creds = many_devices(clients, 16 * 1024);
        let mut waiting = Vec::new();
        for n in 0..clients {
            let (checks, creds) = (checks.clone(), creds.clone());
            waiting.push(tokio::spawn(async move {
                checks
                    .check(creds, &format!("pi-{n}"), "wrong".into())
                    .await
            }));
        }
        // Those that did not fit were told at once; the rest leave before their turn.
        tokio::time::sleep(Duration::from_millis(5)).await;
        for w in &waiting {
            if !w.is_finished() {
                w.abort();
            }
        }
        let mut busy = 0;
        for w in waiting {
            if let Ok(Err(CheckError::Busy)) = w.await {
                busy += 1;
            }
        }
        assert!(busy >= 8, "{busy} refused as busy");
        // The abandoned checks hold their queue places until a thread is free, which then
        // skips them without hashing; only the checks already running were computed.
        let verdict = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match checks.check(creds.clone(), "pi-0", "one".into()).await {
                    Err(CheckError::Busy) => tokio::time::sleep(Duration::from_millis(10)).await,
                    verdict => return verdict,
                }
            }
        })
        .await
        .expect("the queue drains");
        assert_eq!(verdict, Ok(()));
        let hashed = IngestMetrics::get(&metrics.password_hashes);
        assert!(
            hashed <= 3 * CHECK_THREADS as u64 + 1,
            "{hashed} checks ran for {} clients that left",
            QUEUED_CHECKS
        );
    }

    #[tokio::test]
    async fn a_flood_against_one_device_or_unknown_ones_leaves_the_queue_to_others() {
        let checks = Arc::new(PasswordChecks::new(Arc::default()));
        let creds = many_devices(2, 16 * 1024);
        let mut flood = Vec::new();
        for n in 0..40 {
            // Half against a real device, half against made-up ones.
            let device = if n % 2 == 0 {
                "pi-0".to_owned()
            } else {
                format!("ghost-{n}")
            };
            let (checks, creds) = (checks.clone(), creds.clone());
            flood.push(tokio::spawn(async move {
                checks.check(creds, &device, "wrong".into()).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        // The flood holds at most 2 × CHECKS_PER_DEVICE places; the other device gets one.
        assert_eq!(
            checks.check(creds.clone(), "pi-1", "one".into()).await,
            Ok(())
        );
        let (mut wrong, mut busy) = (0, 0);
        for f in flood {
            match f.await.unwrap() {
                Err(CheckError::Wrong) => wrong += 1,
                Err(CheckError::Busy) => busy += 1,
                Ok(()) => panic!("a wrong password was taken"),
            }
        }
        assert_eq!(wrong, 2 * CHECKS_PER_DEVICE, "{wrong} checked, {busy} busy");
        assert_eq!(busy, 40 - 2 * CHECKS_PER_DEVICE);
        // Once answered, the allowances are free again, and nothing is left over.
        assert_eq!(
            checks.check(creds.clone(), "pi-0", "wrong".into()).await,
            Err(CheckError::Wrong)
        );
        assert!(checks.pending.lock().unwrap().is_empty());
    }
}
