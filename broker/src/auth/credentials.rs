//! The credentials file: which devices exist and their password hashes.
//!
//! One device a line, `<device>:<argon2 PHC string>`; blank lines and lines starting with `#`
//! are ignored. Only salted Argon2 hashes are accepted, never a plain password. The hash string
//! carries its own parameters, so a file may mix strong hashes with cheaper ones (tests).
//! Changes are written atomically (temporary file, fsync, rename) with mode 0600, so the broker
//! never reads half a file.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{Output, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};

/// Longest device id: it is an MQTT client id and a topic level, and ends up in the database.
pub const MAX_DEVICE_ID_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Syntax {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("cannot hash the password: {0}")]
    Hash(String),
    #[error("{path} holds no device and not the header `co2-broker passwd` writes: taken as damaged (an empty or truncated copy); write it with `co2-broker passwd` to really remove every device")]
    UndeliberatelyEmpty { path: String },
}

/// First line of every file `co2-broker passwd` writes; it marks a file without devices as
/// meant to be so.
const HEADER: &str =
    "# co2-broker device credentials: <device>:<argon2 hash>. Edit with `co2-broker passwd`.";

/// Devices and their password hashes, as read from the credentials file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// device id → Argon2 PHC string (validated when read).
    devices: BTreeMap<String, String>,
}

/// Checks that `id` can be a device: an MQTT client id, a single topic level and a database
/// value without escaping.
pub fn check_device_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_DEVICE_ID_LEN {
        return Err(format!(
            "a device id has 1 to {MAX_DEVICE_ID_LEN} characters"
        ));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "device id {id:?}: only letters, digits, '-', '_' and '.' are allowed"
        ));
    }
    Ok(())
}

/// Hashes `password` with Argon2id and the crate's default (OWASP) parameters and a fresh salt.
pub fn hash_password(password: &str) -> Result<String, CredentialsError> {
    hash_password_with(password, Params::default())
}

/// Like [`hash_password`] with explicit parameters; tests use cheap ones.
pub fn hash_password_with(password: &str, params: Params) -> Result<String, CredentialsError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| CredentialsError::Hash(e.to_string()))
}

impl Credentials {
    /// Parses the file's text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &str) -> Result<Self, CredentialsError> {
        let mut devices = BTreeMap::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let syntax = |reason: String| CredentialsError::Syntax {
                path: path.to_owned(),
                line: index + 1,
                reason,
            };
            let (device, hash) = line
                .split_once(':')
                .ok_or_else(|| syntax("expected <device>:<argon2 hash>".into()))?;
            check_device_id(device).map_err(syntax)?;
            let parsed = PasswordHash::new(hash)
                .map_err(|e| syntax(format!("device {device}: not a password hash ({e})")))?;
            if !parsed.algorithm.as_str().starts_with("argon2") {
                return Err(syntax(format!(
                    "device {device}: only argon2 hashes are accepted, not {}",
                    parsed.algorithm
                )));
            }
            if devices.insert(device.to_owned(), hash.to_owned()).is_some() {
                return Err(syntax(format!("device {device} appears twice")));
            }
        }
        Ok(Self { devices })
    }

    /// Reads `path`; a missing file holds no device.
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(CredentialsError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Reads `path` for a running broker: unlike [`Credentials::load`], a missing file, or one
    /// with no device and without [`HEADER`], is an error rather than "no device".
    pub fn load_deliberate(path: &Path) -> Result<Self, CredentialsError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Io {
            path: name.clone(),
            source,
        })?;
        let credentials = Self::parse(&text, &name)?;
        if credentials.is_empty() && !text.lines().any(|l| l.trim() == HEADER) {
            return Err(CredentialsError::UndeliberatelyEmpty { path: name });
        }
        Ok(credentials)
    }

    /// Writes the file atomically: a reader sees the old or the new content, never a mix.
    pub fn save(&self, path: &Path) -> Result<(), CredentialsError> {
        let io = |source| CredentialsError::Io {
            path: path.display().to_string(),
            source,
        };
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let temp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&temp).map_err(io)?;
        file.write_all(self.render().as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&temp, path).map_err(io)
    }

    pub fn render(&self) -> String {
        let mut text = format!("{HEADER}\n");
        for (device, hash) in &self.devices {
            text.push_str(&format!("{device}:{hash}\n"));
        }
        text
    }

    /// Adds or replaces a device; `hash` must come from [`hash_password`].
    pub fn set(&mut self, device: &str, hash: String) -> Result<(), String> {
        check_device_id(device)?;
        self.devices.insert(device.to_owned(), hash);
        Ok(())
    }

    /// Removes a device; false if it did not exist.
    pub fn remove(&mut self, device: &str) -> bool {
        self.devices.remove(device).is_some()
    }

    pub fn devices(&self) -> impl Iterator<Item = &str> {
        self.devices.keys().map(String::as_str)
    }

    /// The stored Argon2 hash of `device`.
    pub fn hash_of(&self, device: &str) -> Option<&str> {
        self.devices.get(device).map(String::as_str)
    }

    pub fn contains(&self, device: &str) -> bool {
        self.devices.contains_key(device)
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Checks a password; slow on purpose (Argon2), so call it off the async threads. An unknown
    /// device costs a hash too, so that timing does not tell which devices exist.
    pub fn verify(&self, device: &str, password: &str) -> bool {
        self.verify_in(device, password, &mut ArgonMemory::default())
    }

    /// Like [`verify`](Self::verify), with Argon2's working memory (19 MiB with the default
    /// parameters) taken from `memory` and left there for the next check. Allocating it
    /// afresh for every check lets glibc's adaptive thresholds keep each freed block in the
    /// malloc arena of whichever thread ran it: a login flood grew the broker to ~360 MiB that
    /// way, against 2 × 19 MiB for the two checking threads with their own memory.
    pub fn verify_in(&self, device: &str, password: &str, memory: &mut ArgonMemory) -> bool {
        match self.devices.get(device) {
            Some(hash) => {
                PasswordHash::new(hash).is_ok_and(|hash| memory.matches(password.as_bytes(), &hash))
            }
            None => {
                memory.waste_time(password.as_bytes()); // timing only: unknown ≈ wrong
                false
            }
        }
    }
}

/// Argon2's working memory, reused from one check to the next by a checking thread.
#[derive(Default)]
pub struct ArgonMemory {
    blocks: Vec<Block>,
}

impl ArgonMemory {
    /// Whether `password` hashes to `hash`, as `PasswordVerifier::verify_password` decides,
    /// computed in this memory.
    fn matches(&mut self, password: &[u8], hash: &PasswordHash) -> bool {
        let (Some(salt), Some(expected)) = (hash.salt, hash.hash) else {
            return false;
        };
        let (Ok(algorithm), Ok(version), Ok(params)) = (
            Algorithm::try_from(hash.algorithm),
            hash.version
                .map_or(Ok(Version::default()), Version::try_from),
            Params::try_from(hash),
        ) else {
            return false;
        };
        let mut salt_bytes = [0u8; 64];
        let Ok(salt) = salt.decode_b64(&mut salt_bytes) else {
            return false;
        };
        let mut computed = vec![0u8; expected.len()];
        let blocks = self.blocks_for(&params);
        Argon2::new(algorithm, version, params)
            .hash_password_into_with_memory(password, salt, &mut computed, blocks)
            .is_ok()
            // `Output`'s equality is constant-time.
            && Output::new(&computed).is_ok_and(|computed| computed == expected)
    }

    /// Costs what checking a password against a default-parameter hash costs.
    fn waste_time(&mut self, password: &[u8]) {
        let params = Params::default();
        let mut out = [0u8; 32];
        let blocks = self.blocks_for(&params);
        let _ = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into_with_memory(
                password,
                b"co2-broker-unknown-device",
                &mut out,
                blocks,
            );
    }

    fn blocks_for(&mut self, params: &Params) -> &mut [Block] {
        let needed = params.block_count();
        if self.blocks.len() < needed {
            self.blocks.resize(needed, Block::default());
        }
        &mut self.blocks[..needed]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap(password: &str) -> String {
        hash_password_with(password, Params::new(8, 1, 1, None).unwrap()).unwrap()
    }

    #[test]
    fn round_trip_and_verify() {
        let mut creds = Credentials::default();
        creds.set("pi-7", cheap("s3cret")).unwrap();
        creds.set("pi-8", cheap("other")).unwrap();
        let parsed = Credentials::parse(&creds.render(), "test").unwrap();
        assert_eq!(parsed, creds);
        assert!(parsed.verify("pi-7", "s3cret"));
        assert!(!parsed.verify("pi-7", "other"));
        assert!(!parsed.verify("pi-9", "s3cret"));
    }

    #[test]
    fn one_memory_serves_checks_with_different_parameters() {
        let mut creds = Credentials::default();
        creds.set("small", cheap("a")).unwrap();
        let bigger = Params::new(64, 2, 2, Some(16)).unwrap();
        creds
            .set("bigger", hash_password_with("b", bigger).unwrap())
            .unwrap();
        // Argon2d and version 0x10 hashes from elsewhere verify the same way.
        let other = Argon2::new(
            Algorithm::Argon2d,
            Version::V0x10,
            Params::new(16, 1, 1, None).unwrap(),
        )
        .hash_password(b"c", &SaltString::generate(&mut OsRng))
        .unwrap()
        .to_string();
        creds.set("other", other).unwrap();
        let mut memory = ArgonMemory::default();
        for _ in 0..2 {
            assert!(creds.verify_in("bigger", "b", &mut memory));
            assert!(creds.verify_in("small", "a", &mut memory));
            assert!(creds.verify_in("other", "c", &mut memory));
            assert!(!creds.verify_in("bigger", "a", &mut memory));
            assert!(!creds.verify_in("small", "b", &mut memory));
            assert!(!creds.verify_in("other", "", &mut memory));
            assert!(!creds.verify_in("nobody", "a", &mut memory));
        }
        assert_eq!(memory.blocks.len(), Params::default().block_count());
    }

    #[test]
    fn rejects_plain_text_and_bad_ids() {
        let err = Credentials::parse("pi-7:hunter2\n", "f").unwrap_err();
        assert!(err.to_string().contains("f line 1"), "{err}");
        assert!(
            Credentials::parse("pi/7:$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA\n", "f")
                .is_err()
        );
        assert!(check_device_id("co2/#").is_err());
        assert!(check_device_id("").is_err());
        assert!(check_device_id("Pi_7.kitchen-2").is_ok());
    }

    #[test]
    fn save_is_atomic_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices");
        let mut creds = Credentials::default();
        creds.set("pi-1", cheap("x")).unwrap();
        creds.save(&path).unwrap();
        assert_eq!(Credentials::load(&path).unwrap(), creds);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
