//! Keys that encrypt secrets at rest (signing secrets and auth header values) with AES-256-GCM.
//!
//! A [`Keyring`] holds one or more named 256-bit keys: the first (current) one encrypts, every
//! one decrypts what was encrypted under its id, so keys can be rotated (see
//! `store::encryption::reencrypt`). Keys come from, in this order:
//!
//! 1. `--encryption-key-file` (`PUSHWIRE_ENCRYPTION_KEY_FILE`): lines `key-id:base64`, where the
//!    base64 (standard alphabet) holds exactly 32 bytes; blank lines and `#` comments are
//!    ignored; the first key is the current one;
//! 2. the environment variable `PUSHWIRE_ENCRYPTION_KEY`, in the same format (no flag: a command
//!    line is visible to every local user);
//! 3. on the embedded store only, `<data-dir>/encryption.key`, generated (mode 0600) on first
//!    start. With etcd and no key the control plane refuses to start.
//!
//! Key material never appears in `Debug` output, errors or logs; key ids do (they are names).

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::store::pb::EncryptedValue;
use aes_gcm::aead::{Aead as _, KeyInit as _, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use pushwire_common::domain::Secret;
use rand::{RngCore as _, TryRngCore as _};
use zeroize::Zeroizing;

use crate::Config;

/// Environment variable holding one key (`key-id:base64`) when no key file is given.
pub const KEY_ENV: &str = "PUSHWIRE_ENCRYPTION_KEY";
/// File inside `--data-dir` holding the key generated for the embedded store.
pub const GENERATED_KEY_FILE: &str = "encryption.key";
/// Bytes of an AES-256 key.
const KEY_BYTES: usize = 32;
/// Bytes of an AES-GCM nonce.
const NONCE_BYTES: usize = 12;
/// Longest key id; ids are stored in every encrypted value.
const MAX_ID_CHARS: usize = 64;

/// `PUSHWIRE_ENCRYPTION_KEY`, when set and not blank (read by [`Config`]'s parser).
pub fn key_from_env() -> Option<Secret> {
    std::env::var(KEY_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(Secret::new)
}

/// One named key.
struct Key {
    id: String,
    cipher: Aes256Gcm,
}

/// The keys of the control plane; the first encrypts. `Debug` shows the ids only.
pub struct Keyring {
    keys: Vec<Key>,
    /// Keys the fingerprints of secrets that reads show (see [`Keyring::fingerprint`]):
    /// derived from the current key, never stored.
    fingerprint_key: Zeroizing<[u8; KEY_BYTES]>,
}

/// Label of the derivation of the fingerprint key from the current encryption key.
const FINGERPRINT_LABEL: &[u8] = b"pushwire secret fingerprint v1";

/// HMAC-SHA256 keyed with `key`.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use hmac::{KeyInit as _, Mac as _};
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("ids", &self.ids().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Why keys could not be loaded. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// With etcd, a key must be given.
    #[error(
        "no encryption key: with etcd, give --encryption-key-file (or {KEY_ENV}), a file of \
         lines `key-id:base64-of-32-bytes`, e.g. made with \
         `printf 'key1:%s\\n' \"$(head -c 32 /dev/urandom | base64)\" > pushwire.key`"
    )]
    Missing,
    /// Both sources were given.
    #[error("give either --encryption-key-file or {KEY_ENV}, not both")]
    Ambiguous,
    /// The key file could not be read or written.
    #[error("encryption key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A line of a key file (or of the environment variable) is not a key.
    #[error("{origin} line {line}: {reason}")]
    Parse {
        /// The file or the variable.
        origin: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong, without the line itself.
        reason: String,
    },
    /// No key in the file or variable.
    #[error("{0}: no key (expected lines `key-id:base64-of-32-bytes`)")]
    Empty(String),
    /// The operating system's random source failed.
    #[error("cannot generate a key: {0}")]
    Random(String),
}

/// Why a value could not be decrypted. Never carries key material or plaintext.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// Encrypted under a key id that is not in the keyring.
    #[error("encrypted with key \"{key_id}\", which is not among the configured keys ({known})")]
    UnknownKey {
        /// The value's key id.
        key_id: String,
        /// The ids of the keyring, comma-separated.
        known: String,
    },
    /// The key with that id does not authenticate it.
    #[error(
        "key \"{key_id}\" does not decrypt it: that id names other key material here, or the \
         value was altered or moved from another record"
    )]
    Decrypt {
        /// The value's key id.
        key_id: String,
    },
    /// Not a value this module wrote.
    #[error("malformed encrypted value (nonce of {0} bytes)")]
    Malformed(usize),
}

impl Keyring {
    /// The keys for `config` (see the module documentation for the order of sources).
    pub fn from_config(config: &Config) -> Result<Self, KeyError> {
        match (&config.encryption_key_file, &config.encryption_key) {
            (Some(_), Some(_)) => Err(KeyError::Ambiguous),
            (Some(path), None) => Self::load(path),
            (None, Some(key)) => Self::parse(key.expose(), KEY_ENV),
            (None, None) if config.etcd_endpoints.is_empty() => {
                Self::load_or_generate(&config.data_dir.join(GENERATED_KEY_FILE))
            }
            (None, None) => Err(KeyError::Missing),
        }
    }

    /// Parses key lines; `origin` names their source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, KeyError> {
        let mut keys: Vec<Key> = Vec::new();
        let mut fingerprint_key = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: String| KeyError::Parse {
                origin: origin.to_owned(),
                line: n + 1,
                reason,
            };
            let Some((id, b64)) = line.split_once(':') else {
                return Err(bad("expected `key-id:base64-of-32-bytes`".into()));
            };
            let id = id.trim();
            check_id(id).map_err(bad)?;
            if keys.iter().any(|k| k.id == id) {
                return Err(bad(format!("key id \"{id}\" appears twice")));
            }
            let bytes = Zeroizing::new(
                base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .map_err(|_| bad(format!("key \"{id}\" is not valid base64")))?,
            );
            let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|_| {
                bad(format!(
                    "key \"{id}\" is {} bytes; AES-256 takes {KEY_BYTES}",
                    bytes.len()
                ))
            })?;
            if fingerprint_key.is_none() {
                fingerprint_key = Some(Zeroizing::new(hmac_sha256(&bytes, FINGERPRINT_LABEL)));
            }
            keys.push(Key {
                id: id.to_owned(),
                cipher,
            });
        }
        let Some(fingerprint_key) = fingerprint_key else {
            return Err(KeyError::Empty(origin.to_owned()));
        };
        Ok(Self {
            keys,
            fingerprint_key,
        })
    }

    /// Reads a key file; warns when group or others may read it.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
        warn_if_shared(path, "the encryption key file");
        Self::parse(&text, &path.display().to_string())
    }

    /// Reads `path`, or creates it (mode 0600) with a fresh key when it does not exist.
    pub fn load_or_generate(path: &Path) -> Result<Self, KeyError> {
        if path.exists() {
            return Self::load(path);
        }
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let day = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let id = format!("local-{}", day.get(..10).unwrap_or("0").replace('-', ""));
        let mut key = Zeroizing::new([0u8; KEY_BYTES]);
        rand::rngs::OsRng
            .try_fill_bytes(key.as_mut())
            .map_err(|e| KeyError::Random(e.to_string()))?;
        let text = Zeroizing::new(format!(
            "# Pushwire encryption keys (`key-id:base64`, the first encrypts). Generated on first\n\
             # start: back it up with the data directory; without it the secrets cannot be read.\n\
             {id}:{}\n",
            base64::engine::general_purpose::STANDARD.encode(key.as_ref())
        ));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        match options.open(path) {
            Ok(mut file) => {
                file.write_all(text.as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(io)?;
            }
            // Created meanwhile by another process: use that one.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Self::load(path),
            Err(e) => return Err(io(e)),
        }
        tracing::warn!(
            key_id = %id,
            path = %path.display(),
            "generated an encryption key for the secrets at rest; back it up with the data"
        );
        Self::parse(&text, &path.display().to_string())
    }

    /// The fingerprint of a secret that reads show: `hmac-sha256:` and the first 12 hex digits
    /// of HMAC-SHA256 of the secret, keyed with a key derived from the current encryption key.
    /// It tells secrets apart (a rotation changes it) but, unlike a plain hash, nobody without
    /// the key can test a guess against it. Rotating the encryption key changes every
    /// fingerprint.
    pub fn fingerprint(&self, secret: &Secret) -> String {
        let mac = hmac_sha256(self.fingerprint_key.as_ref(), secret.expose().as_bytes());
        format!("hmac-sha256:{}", &hex::encode(mac)[..12])
    }

    /// Id of the key that encrypts.
    pub fn current_id(&self) -> &str {
        &self.keys[0].id
    }

    /// Every key id, the current one first.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.id.as_str())
    }

    /// Whether a key with this id is configured.
    pub fn has(&self, id: &str) -> bool {
        self.keys.iter().any(|k| k.id == id)
    }

    /// Encrypts `plaintext` with the current key and a random nonce, bound to `aad` (the record
    /// and field it is stored in).
    pub fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> EncryptedValue {
        let key = &self.keys[0];
        let mut nonce = [0u8; NONCE_BYTES];
        // ThreadRng is a CSPRNG reseeded from the operating system.
        rand::rng().fill_bytes(&mut nonce);
        let ciphertext = key
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .expect("AES-GCM encrypts anything shorter than 64 GiB");
        EncryptedValue {
            key_id: key.id.clone(),
            nonce: nonce.to_vec(),
            ciphertext,
        }
    }

    /// Decrypts a value written by [`Keyring::encrypt`] with the same `aad`.
    pub fn decrypt(&self, value: &EncryptedValue, aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let key = self
            .keys
            .iter()
            .find(|k| k.id == value.key_id)
            .ok_or_else(|| CryptoError::UnknownKey {
                key_id: value.key_id.clone(),
                known: self.ids().collect::<Vec<_>>().join(", "),
            })?;
        let nonce: [u8; NONCE_BYTES] = value
            .nonce
            .as_slice()
            .try_into()
            .map_err(|_| CryptoError::Malformed(value.nonce.len()))?;
        key.cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &value.ciphertext,
                    aad,
                },
            )
            .map_err(|_| CryptoError::Decrypt {
                key_id: value.key_id.clone(),
            })
    }
}

fn check_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_CHARS
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a key id is 1-{MAX_ID_CHARS} characters of A-Z, a-z, 0-9, '-', '_' and '.' \
             (expected `key-id:base64-of-32-bytes`)"
        ))
    }
}

/// Warns when group or others may read `path` (`what`: "the encryption key file", "the store
/// file"). Not refused: Kubernetes mounts Secrets 0644 by default (and group-readable with
/// `fsGroup`), inside a pod only the container reads it; a readable store file may be meant
/// for a backup job.
pub(crate) fn warn_if_shared(path: &Path, what: &str) {
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "{what} may be read by group or others; chmod 600 it"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K1_OTHER_BYTES: &str = "k1:HxwdHh8AAQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRo=";
    const K2: &str = "k2:ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

    fn ring(text: &str) -> Keyring {
        Keyring::parse(text, "test").unwrap()
    }

    fn parse_err(text: &str) -> String {
        Keyring::parse(text, "keys.txt").unwrap_err().to_string()
    }

    #[test]
    fn round_trip_with_fresh_nonces() {
        let keys = ring(K1);
        let a = keys.encrypt(b"hunter2", b"/k#f");
        let b = keys.encrypt(b"hunter2", b"/k#f");
        assert_eq!(a.key_id, "k1");
        assert_eq!(a.nonce.len(), NONCE_BYTES);
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
        assert!(!a.ciphertext.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(keys.decrypt(&a, b"/k#f").unwrap(), b"hunter2");
        assert_eq!(keys.decrypt(&b, b"/k#f").unwrap(), b"hunter2");
    }

    #[test]
    fn other_associated_data_does_not_decrypt() {
        let keys = ring(K1);
        let v = keys.encrypt(b"hunter2", b"/a#secrets/0");
        assert_eq!(
            keys.decrypt(&v, b"/b#secrets/0"),
            Err(CryptoError::Decrypt {
                key_id: "k1".into()
            })
        );
    }

    #[test]
    fn tampering_is_detected() {
        let keys = ring(K1);
        let v = keys.encrypt(b"hunter2", b"aad");
        let mut flipped = v.clone();
        flipped.ciphertext[0] ^= 1;
        assert!(matches!(
            keys.decrypt(&flipped, b"aad"),
            Err(CryptoError::Decrypt { .. })
        ));
        let mut truncated = v.clone();
        truncated.ciphertext.truncate(3);
        assert!(keys.decrypt(&truncated, b"aad").is_err());
        let mut nonce = v;
        nonce.nonce.pop();
        assert_eq!(
            keys.decrypt(&nonce, b"aad"),
            Err(CryptoError::Malformed(11))
        );
    }

    #[test]
    fn unknown_and_wrong_keys() {
        let v = ring(K1).encrypt(b"hunter2", b"aad");
        let err = ring(K2).decrypt(&v, b"aad").unwrap_err();
        assert_eq!(
            err,
            CryptoError::UnknownKey {
                key_id: "k1".into(),
                known: "k2".into()
            }
        );
        assert!(err.to_string().contains("\"k1\""), "{err}");
        let err = ring(K1_OTHER_BYTES).decrypt(&v, b"aad").unwrap_err();
        assert!(matches!(err, CryptoError::Decrypt { ref key_id } if key_id == "k1"));
    }

    #[test]
    fn rotation_first_key_encrypts_all_decrypt() {
        let old = ring(K1);
        let both = ring(&format!("# rotated\n{K2}\n\n{K1}\n"));
        assert_eq!(both.current_id(), "k2");
        assert_eq!(both.ids().collect::<Vec<_>>(), ["k2", "k1"]);
        assert!(both.has("k1") && !old.has("k2"));
        let before = old.encrypt(b"s", b"aad");
        assert_eq!(both.decrypt(&before, b"aad").unwrap(), b"s");
        let after = both.encrypt(b"s", b"aad");
        assert_eq!(after.key_id, "k2");
        assert!(old.decrypt(&after, b"aad").is_err());
    }

    #[test]
    fn key_file_errors_are_clear_and_never_print_keys() {
        let b64 = K1.split_once(':').unwrap().1;
        let short = "c2hvcnQta2V5LWJ5dGVz"; // 15 bytes
        for (text, expected) in [
            ("", "keys.txt: no key"),
            ("# only a comment\n\n", "keys.txt: no key"),
            (b64, "keys.txt line 1: expected `key-id:base64-of-32-bytes`"),
            (&format!(":{b64}"), "keys.txt line 1: a key id is 1-64"),
            (&format!("bad id:{b64}"), "keys.txt line 1: a key id"),
            (
                &format!("{K1}\n{K1}"),
                "keys.txt line 2: key id \"k1\" appears twice",
            ),
            (
                "k3:not*base64",
                "keys.txt line 1: key \"k3\" is not valid base64",
            ),
            (
                &format!("\n{K1}\nk3:{short}"),
                "keys.txt line 3: key \"k3\" is 15 bytes; AES-256 takes 32",
            ),
        ] {
            let err = parse_err(text);
            assert!(err.starts_with(expected), "{text:?}: {err}");
            assert!(!err.contains(b64) && !err.contains(short), "{err}");
        }
    }

    #[test]
    fn debug_shows_ids_only() {
        let printed = format!("{:?}", ring(&format!("{K2}\n{K1}")));
        assert_eq!(printed, "Keyring { ids: [\"k2\", \"k1\"], .. }");
    }

    #[test]
    fn generated_key_file_is_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data").join(GENERATED_KEY_FILE);
        let first = Keyring::load_or_generate(&path).unwrap();
        assert!(first.current_id().starts_with("local-"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let again = Keyring::load_or_generate(&path).unwrap();
        let v = first.encrypt(b"s", b"aad");
        assert_eq!(again.decrypt(&v, b"aad").unwrap(), b"s");
    }

    #[test]
    fn sources() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, format!("{K2}\n{K1}\n")).unwrap();
        let mut config = Config::defaults();
        config.encryption_key = None;
        config.encryption_key_file = None;
        config.data_dir = dir.path().join("data");
        config.etcd_endpoints = vec!["http://127.0.0.1:2379".into()];
        assert!(matches!(
            Keyring::from_config(&config),
            Err(KeyError::Missing)
        ));
        config.encryption_key = Some(Secret::new(K1));
        assert_eq!(Keyring::from_config(&config).unwrap().current_id(), "k1");
        config.encryption_key_file = Some(file);
        assert!(matches!(
            Keyring::from_config(&config),
            Err(KeyError::Ambiguous)
        ));
        config.encryption_key = None;
        assert_eq!(Keyring::from_config(&config).unwrap().current_id(), "k2");
        config.encryption_key_file = None;
        config.etcd_endpoints.clear();
        let generated = Keyring::from_config(&config).unwrap();
        assert!(config.data_dir.join(GENERATED_KEY_FILE).is_file());
        assert!(generated.current_id().starts_with("local-"));
    }
}
