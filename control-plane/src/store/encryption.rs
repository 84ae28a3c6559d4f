//! Secrets at rest across the whole store: the start-up check that the configured keys decrypt
//! every stored secret ([`verify`]), and the rewrite of every secret under the current key after
//! a rotation ([`reencrypt`]).
//!
//! [`verify`] also writes [`keys::ENCRYPTION_CHECK`] on the first start, so a control plane
//! given other keys refuses to start even while no integration exists yet.

use std::sync::Arc;

use zeroize::Zeroizing;

use super::records::{self, Sealed};
use super::snapshot::{self, Snapshot};
use super::{Compare, KeyValue, Op, Store, StoreError, Txn, TxnOutcome, keys};
use crate::crypto::{CryptoError, KeyError, Keyring};

/// How often one record's rewrite is retried when a concurrent change beat it.
const MAX_ATTEMPTS: usize = 8;

/// Why the keys and the store do not fit. Never carries key material or secrets.
#[derive(Debug, thiserror::Error)]
pub enum EncryptionError {
    /// The keys could not be loaded.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// A stored secret does not decrypt with the configured keys.
    #[error("{record} ({field}): {cause}; {}", hint(.cause))]
    Undecryptable {
        /// Store key of the record.
        record: String,
        /// Its field.
        field: String,
        /// Why.
        cause: CryptoError,
    },
    /// A stored secret is not encrypted at all.
    #[error(
        "{record} ({field}): {}; delete that record (or the embedded store) and create it again",
        records::NOT_ENCRYPTED
    )]
    NotEncrypted {
        /// Store key of the record.
        record: String,
        /// Its field.
        field: String,
    },
    /// The encryption check decrypted to something else.
    #[error("{0}: unexpected content")]
    BadCheck(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A record kept changing while being re-encrypted.
    #[error("{0} kept changing while being re-encrypted; run again")]
    Busy(String),
}

fn hint(cause: &CryptoError) -> &'static str {
    match cause {
        CryptoError::UnknownKey { .. } => {
            "add that key back to the key file, after the current one, and keep it until \
             `control-plane --reencrypt` has rewritten every record"
        }
        CryptoError::Decrypt { .. } => {
            "is this the key file the store was written with? (the control plane refuses to \
             start rather than serve secrets it cannot read)"
        }
        CryptoError::Malformed(_) => "the record was not written by Pushwire",
    }
}

/// What [`verify`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verified {
    /// Records holding encrypted values (integrations and the check), all decrypted.
    pub records: usize,
    /// Of those, the ones with a value under another key than the current one.
    pub stale: usize,
}

/// What [`reencrypt`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reencrypted {
    /// The key everything is now encrypted with.
    pub key_id: String,
    /// Records holding encrypted values.
    pub records: usize,
    /// Of those, the ones rewritten.
    pub rewritten: usize,
}

/// The record at `kv` if it holds encrypted values; one that does not decode at all is logged
/// and skipped, as the config feed does.
fn sealed(kv: &KeyValue) -> Option<Sealed> {
    match Sealed::decode(kv) {
        Ok(sealed) => sealed,
        Err(e) => {
            tracing::error!(error = %e, "secrets at rest: skipping unreadable record");
            None
        }
    }
}

/// Decrypts every encrypted value of `sealed`; true when one is under an older key.
fn check(kv: &KeyValue, sealed: &mut Sealed, keys: &Keyring) -> Result<bool, EncryptionError> {
    let expected = sealed.expected();
    let mut stale = false;
    for (field, value) in sealed.fields() {
        let Some(value) = value else {
            return Err(EncryptionError::NotEncrypted {
                record: kv.key.clone(),
                field,
            });
        };
        let plain = Zeroizing::new(
            keys.decrypt(value, &records::aad(&kv.key, &field))
                .map_err(|cause| EncryptionError::Undecryptable {
                    record: kv.key.clone(),
                    field,
                    cause,
                })?,
        );
        if expected.is_some_and(|e| e != plain.as_slice()) {
            return Err(EncryptionError::BadCheck(kv.key.clone()));
        }
        stale |= value.key_id != keys.current_id();
    }
    Ok(stale)
}

/// Checks the encryption check record at `kv`; true when it is under an older key.
fn check_record(kv: &KeyValue, keys: &Keyring) -> Result<bool, EncryptionError> {
    let mut sealed =
        Sealed::decode(kv)?.ok_or_else(|| EncryptionError::BadCheck(kv.key.clone()))?;
    check(kv, &mut sealed, keys)
}

/// Checks that `keys` decrypt every secret in the store (and the encryption check, written with
/// the current key when absent). Run at start-up: a control plane that fails it must not serve.
pub async fn verify(store: &dyn Store, keys: &Arc<Keyring>) -> Result<Verified, EncryptionError> {
    Ok(verify_read(store, keys).await?.0)
}

/// [`verify`], also returning the whole configuration it read and checked, so that start-up
/// loads the config feed from it instead of reading (and decrypting) everything again.
pub async fn verify_read(
    store: &dyn Store,
    keys: &Arc<Keyring>,
) -> Result<(Verified, Snapshot), EncryptionError> {
    let mut snapshot = snapshot::read(store, keys).await?;
    if let Some(refusal) = snapshot.refusal.take() {
        return Err(refusal);
    }
    let mut verified = Verified {
        // The integrations and the check.
        records: snapshot.integrations.len() + 1,
        stale: snapshot.stale,
    };
    match &snapshot.check {
        Some(kv) => verified.stale += usize::from(check_record(kv, keys)?),
        None => write_check(store, keys).await?,
    }
    if verified.stale > 0 {
        tracing::warn!(
            key_id = keys.current_id(),
            stale = verified.stale,
            "secrets at rest: some records are encrypted with an older key; run \
             `control-plane --reencrypt` before removing it from the key file"
        );
    }
    tracing::info!(
        key_id = keys.current_id(),
        records = verified.records,
        "secrets at rest: every stored secret decrypts"
    );
    Ok((verified, snapshot))
}

/// Writes the encryption check unless it exists; when another replica wrote it first, checks
/// that one.
async fn write_check(store: &dyn Store, keys: &Keyring) -> Result<(), EncryptionError> {
    let key = keys::ENCRYPTION_CHECK;
    for _ in 0..MAX_ATTEMPTS {
        let txn = Txn {
            compares: vec![Compare::Absent(key.to_owned())],
            ops: vec![Op::Put {
                key: key.to_owned(),
                value: records::encode_check(keys),
            }],
        };
        if let TxnOutcome::Committed { .. } = store.txn(txn).await? {
            return Ok(());
        }
        if let Some(kv) = store.get(key).await? {
            return check_record(&kv, keys).map(drop);
        }
    }
    Err(EncryptionError::Busy(key.to_owned()))
}

/// Re-encrypts with the current key every stored secret that is under another key, one
/// transaction per record guarded by its revision (a record changed meanwhile is read again).
/// Safe while control planes serve, as long as each of them has every key involved.
pub async fn reencrypt(
    store: &dyn Store,
    keys: &Arc<Keyring>,
) -> Result<Reencrypted, EncryptionError> {
    verify(store, keys).await?;
    let range = store.range(keys::ROOT).await?;
    let mut done = Reencrypted {
        key_id: keys.current_id().to_owned(),
        ..Reencrypted::default()
    };
    for kv in range.kvs {
        if sealed(&kv).is_none() {
            continue;
        }
        done.records += 1;
        done.rewritten += usize::from(rewrite(store, keys, kv).await?);
    }
    tracing::info!(
        key_id = %done.key_id,
        records = done.records,
        rewritten = done.rewritten,
        "secrets at rest: re-encrypted"
    );
    Ok(done)
}

/// Rewrites one record under the current key; false when there was nothing to do.
async fn rewrite(
    store: &dyn Store,
    keys: &Keyring,
    mut kv: KeyValue,
) -> Result<bool, EncryptionError> {
    for _ in 0..MAX_ATTEMPTS {
        let Some(mut sealed) = sealed(&kv) else {
            return Ok(false);
        };
        let mut changed = false;
        for (field, value) in sealed.fields() {
            let Some(value) = value else {
                return Err(EncryptionError::NotEncrypted {
                    record: kv.key.clone(),
                    field,
                });
            };
            if value.key_id == keys.current_id() {
                continue;
            }
            let aad = records::aad(&kv.key, &field);
            let plain = Zeroizing::new(keys.decrypt(value, &aad).map_err(|cause| {
                EncryptionError::Undecryptable {
                    record: kv.key.clone(),
                    field,
                    cause,
                }
            })?);
            *value = keys.encrypt(&plain, &aad);
            changed = true;
        }
        if !changed {
            return Ok(false);
        }
        let txn = Txn {
            compares: vec![Compare::ModRevision(kv.key.clone(), kv.mod_revision)],
            ops: vec![Op::Put {
                key: kv.key.clone(),
                value: sealed.encode(),
            }],
        };
        if let TxnOutcome::Committed { .. } = store.txn(txn).await? {
            return Ok(true);
        }
        // Changed meanwhile (then written with some replica's current key) or deleted.
        match store.get(&kv.key).await? {
            Some(fresh) => kv = fresh,
            None => return Ok(false),
        }
    }
    Err(EncryptionError::Busy(kv.key))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::store::pb as rec;
    use prost::Message as _;

    use super::*;
    use crate::store::EmbeddedStore;
    use crate::store::fixtures::{K1, K1_OTHER_BYTES, K2, integration, put_integration, ring};

    fn store() -> (Arc<dyn Store>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
        (Arc::new(store), dir)
    }

    async fn key_ids(store: &dyn Store) -> Vec<String> {
        let mut ids = Vec::new();
        for kv in store.range(keys::ROOT).await.unwrap().kvs {
            if let Some(mut sealed) = Sealed::decode(&kv).unwrap() {
                for (_, v) in sealed.fields() {
                    ids.push(v.unwrap().key_id.clone());
                }
            }
        }
        ids
    }

    #[tokio::test]
    async fn first_start_writes_the_check_that_other_keys_fail() {
        let (store, _dir) = store();
        let k1 = ring(K1);
        assert_eq!(
            verify(store.as_ref(), &k1).await.unwrap(),
            Verified {
                records: 1,
                stale: 0
            }
        );
        assert!(store.get(keys::ENCRYPTION_CHECK).await.unwrap().is_some());
        // Again: the check is there and decrypts.
        verify(store.as_ref(), &k1).await.unwrap();

        // No integration yet, and still: another key is refused, naming the key id.
        let err = verify(store.as_ref(), &ring(K2)).await.unwrap_err();
        assert!(
            matches!(&err, EncryptionError::Undecryptable { cause: CryptoError::UnknownKey { key_id, .. }, .. } if key_id == "k1"),
            "{err}"
        );
        let err = verify(store.as_ref(), &ring(K1_OTHER_BYTES))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, EncryptionError::Undecryptable { cause: CryptoError::Decrypt { key_id }, .. } if key_id == "k1"),
            "{err}"
        );
        let printed = err.to_string();
        assert!(printed.contains("key \"k1\" does not decrypt"), "{printed}");
    }

    #[tokio::test]
    async fn every_integration_is_checked() {
        let (store, _dir) = store();
        let k1 = ring(K1);
        verify(store.as_ref(), &k1).await.unwrap();
        // Written by a replica that had another key first.
        put_integration(store.as_ref(), &integration("crm"), &ring(K2)).await;
        let err = verify(store.as_ref(), &k1).await.unwrap_err().to_string();
        assert!(
            err.starts_with("/pushwire/v1/accounts/42/integrations/crm (auth_header_value): encrypted with key \"k2\""),
            "{err}"
        );
        assert!(!err.contains("t0ken") && !err.contains("s3cret"), "{err}");
        let both = ring(&format!("{K1}\n{K2}"));
        assert_eq!(
            verify(store.as_ref(), &both).await.unwrap(),
            Verified {
                records: 2,
                stale: 1
            }
        );
    }

    #[tokio::test]
    async fn plaintext_records_are_refused() {
        let (store, _dir) = store();
        let k1 = ring(K1);
        let i = integration("crm");
        let mut r = rec::IntegrationRecord::decode(records::encode_integration(&i, &k1).as_slice())
            .unwrap();
        r.secrets[0].secret = None;
        let txn = Txn {
            compares: vec![],
            ops: vec![Op::Put {
                key: records::integration_key(&i.name),
                value: r.encode_to_vec(),
            }],
        };
        store.txn(txn).await.unwrap();
        let err = verify(store.as_ref(), &k1).await.unwrap_err();
        assert!(
            matches!(&err, EncryptionError::NotEncrypted { field, .. } if field == "secrets/0"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn reencrypt_moves_everything_to_the_current_key() {
        let (store, _dir) = store();
        let k1 = ring(K1);
        verify(store.as_ref(), &k1).await.unwrap();
        for id in ["a", "b", "c"] {
            put_integration(store.as_ref(), &integration(id), &k1).await;
        }
        let rotated = ring(&format!("{K2}\n{K1}"));
        // New writes use the new key at once.
        put_integration(store.as_ref(), &integration("d"), &rotated).await;
        let done = reencrypt(store.as_ref(), &rotated).await.unwrap();
        assert_eq!(
            done,
            Reencrypted {
                key_id: "k2".into(),
                records: 5,
                rewritten: 4
            }
        );
        assert!(key_ids(store.as_ref()).await.iter().all(|id| id == "k2"));
        // Nothing left to do; the old key can go.
        let done = reencrypt(store.as_ref(), &rotated).await.unwrap();
        assert_eq!(done.rewritten, 0);
        let k2 = ring(K2);
        verify(store.as_ref(), &k2).await.unwrap();
        let kv = store
            .get(&records::integration_key(&integration("a").name))
            .await
            .unwrap()
            .unwrap();
        let Some(records::Record::Integration(a)) = records::decode(&kv, &k2).unwrap() else {
            panic!("not an integration");
        };
        assert_eq!(a.secrets[0].secret.expose(), "s3cret");
        assert_eq!(a.auth_header.unwrap().value.expose(), "Bearer t0ken");
    }
}
