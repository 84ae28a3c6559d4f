//! Encoding of the domain types into the protobuf records stored under the keys of
//! [`super::keys`] (`pushwire.storage.v1`), and back. The key carries the account and id, the
//! store carries the revision (etag); the record carries the rest.
//!
//! Secrets (signing secrets, auth header values) are encrypted here, on the way in, and
//! decrypted on the way out, with the [`Keyring`]; each is bound to its record's key and field
//! ([`aad`]), so a ciphertext copied to another record or field does not decrypt.

use std::time::SystemTime;

use prost::Message;
use pushwire_common::domain::convert::{self, InvalidField};
use pushwire_common::domain::{
    AccountName, AuthHeader, Integration, IntegrationName, PushScope, PushScopeName, Secret,
    SigningSecret,
};
use pushwire_common::pb::v1 as pb;

use super::encryption::EncryptionError;
use super::keys::{self, Parsed};
use super::pb as rec;
use super::{KeyValue, StoreError};
use crate::crypto::Keyring;

/// Field name of the auth header value in associated data.
const AUTH_HEADER_VALUE: &str = "auth_header_value";
/// Field name of the encryption check's value in associated data.
const CHECK: &str = "check";
/// What the encryption check record holds, encrypted.
pub const CHECK_TEXT: &[u8] = b"pushwire encryption check";

/// Field name of the `n`th signing secret in associated data.
fn secret_field(n: usize) -> String {
    format!("secrets/{n}")
}

/// The associated data of an encrypted value: the key of its record and its field.
pub fn aad(key: &str, field: &str) -> Vec<u8> {
    format!("{key}#{field}").into_bytes()
}

/// A decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// An integration.
    Integration(Integration),
    /// A push scope.
    PushScope(PushScope),
}

fn time(t: Option<prost_types::Timestamp>) -> SystemTime {
    t.and_then(|t| SystemTime::try_from(t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn corrupt(key: &str, what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{key}: {what}"))
}

/// Encodes an integration's record (everything but its name and revision), its secrets
/// encrypted with the current key.
pub fn encode_integration(i: &Integration, keys: &Keyring) -> Vec<u8> {
    let key = integration_key(&i.name);
    let seal = |field: &str, s: &Secret| keys.encrypt(s.expose().as_bytes(), &aad(&key, field));
    // The API view holds the enums already encoded (and no secret).
    let view = pb::Integration::from(i);
    rec::IntegrationRecord {
        display_name: i.display_name.clone(),
        url: i.url.clone(),
        enabled: i.enabled,
        disabled_reason: i.disabled_reason.clone(),
        incomplete_participations: view.incomplete_participations,
        auth_header_name: i
            .auth_header
            .as_ref()
            .map(|h| h.name.clone())
            .unwrap_or_default(),
        auth_header_value: i
            .auth_header
            .as_ref()
            .map(|h| seal(AUTH_HEADER_VALUE, &h.value)),
        secrets: i
            .secrets
            .iter()
            .enumerate()
            .map(|(n, s)| rec::SigningSecretRecord {
                secret: Some(seal(&secret_field(n), &s.secret)),
                expire_time: s.expire_time.map(Into::into),
            })
            .collect(),
        signature_schemes: view.signature_schemes,
        create_time: Some(i.create_time.into()),
        update_time: Some(i.update_time.into()),
        payload_variables: view.payload_variables,
    }
    .encode_to_vec()
}

/// Encodes a push scope's record (everything but its name and revision).
pub fn encode_push_scope(s: &PushScope) -> Vec<u8> {
    let view = pb::PushScope::from(s);
    rec::PushScopeRecord {
        integration_id: s.integration.id().to_owned(),
        level: view.level,
        target_id: view.target_id,
        audience: view.audience,
        action: view.action,
        create_time: Some(s.create_time.into()),
        update_time: Some(s.update_time.into()),
    }
    .encode_to_vec()
}

/// Decrypts one encrypted field of the record at `kv`; `stale` is set when its key is not the
/// current one.
fn open(
    kv: &KeyValue,
    field: &str,
    value: Option<&rec::EncryptedValue>,
    keys: &Keyring,
    stale: &mut bool,
) -> Result<Secret, EncryptionError> {
    let value = value.ok_or_else(|| EncryptionError::NotEncrypted {
        record: kv.key.clone(),
        field: field.to_owned(),
    })?;
    let plain = keys.decrypt(value, &aad(&kv.key, field)).map_err(|cause| {
        EncryptionError::Undecryptable {
            record: kv.key.clone(),
            field: field.to_owned(),
            cause,
        }
    })?;
    *stale |= value.key_id != keys.current_id();
    // The error would hold the bytes: drop it.
    String::from_utf8(plain)
        .map(Secret::new)
        .map_err(|_| corrupt(&kv.key, format!("{field}: not UTF-8 text")).into())
}

/// Why a secret field has no encrypted value.
pub const NOT_ENCRYPTED: &str =
    "no encrypted value (a record written before secrets were encrypted at rest?)";

fn decode_integration(
    kv: &KeyValue,
    name: IntegrationName,
    keys: &Keyring,
    stale: &mut bool,
) -> Result<Integration, EncryptionError> {
    let bad = |e: InvalidField| corrupt(&kv.key, e);
    let r = rec::IntegrationRecord::decode(kv.value.as_slice()).map_err(|e| corrupt(&kv.key, e))?;
    let auth_header = match r.auth_header_name.is_empty() {
        true => None,
        false => Some(AuthHeader {
            value: open(
                kv,
                AUTH_HEADER_VALUE,
                r.auth_header_value.as_ref(),
                keys,
                stale,
            )?,
            name: r.auth_header_name,
        }),
    };
    let secrets = r
        .secrets
        .iter()
        .enumerate()
        .map(|(n, s)| {
            Ok(SigningSecret {
                secret: open(kv, &secret_field(n), s.secret.as_ref(), keys, stale)?,
                expire_time: s.expire_time.map(|t| time(Some(t))),
            })
        })
        .collect::<Result<_, EncryptionError>>()?;
    Ok(Integration {
        name,
        display_name: r.display_name,
        url: r.url,
        enabled: r.enabled,
        disabled_reason: r.disabled_reason,
        incomplete_participations: convert::incomplete_policy(
            "incomplete_participations",
            r.incomplete_participations,
        )
        .map_err(bad)?
        .unwrap_or_default(),
        // UNSPECIFIED in records written before the option existed.
        payload_variables: convert::payload_variables("payload_variables", r.payload_variables)
            .map_err(bad)?
            .unwrap_or_default(),
        auth_header,
        secrets,
        signature_schemes: convert::signature_schemes("signature_schemes", &r.signature_schemes)
            .map_err(bad)?,
        create_time: time(r.create_time),
        update_time: time(r.update_time),
        revision: kv.mod_revision,
    })
}

fn decode_push_scope(kv: &KeyValue, name: PushScopeName) -> Result<PushScope, StoreError> {
    let bad = |e: InvalidField| corrupt(&kv.key, e);
    let r = rec::PushScopeRecord::decode(kv.value.as_slice()).map_err(|e| corrupt(&kv.key, e))?;
    let integration =
        IntegrationName::new(name.account(), &r.integration_id).map_err(|e| corrupt(&kv.key, e))?;
    let level = convert::level("level", r.level)
        .map_err(bad)?
        .ok_or_else(|| corrupt(&kv.key, "no level"))?;
    Ok(PushScope {
        name,
        integration,
        target: convert::scope_target(level, &r.target_id).map_err(bad)?,
        audience: convert::audience("audience", r.audience)
            .map_err(bad)?
            .unwrap_or_default(),
        action: convert::action("action", r.action)
            .map_err(bad)?
            .unwrap_or_default(),
        create_time: time(r.create_time),
        update_time: time(r.update_time),
        revision: kv.mod_revision,
    })
}

/// Decodes any record under [`keys::ROOT`], decrypting its secrets; `None` for keys this version
/// does not know and for [`keys::ENCRYPTION_CHECK`].
pub fn decode(kv: &KeyValue, keys: &Keyring) -> Result<Option<Record>, StoreError> {
    match open_record(kv, keys) {
        Ok(opened) => Ok(opened.map(|(record, _)| record)),
        Err(EncryptionError::Store(e)) => Err(e),
        Err(e) => Err(StoreError::Corrupt(e.to_string())),
    }
}

/// [`decode`], for the key check of a whole read: tells a secret that does not open (an
/// `EncryptionError` other than `Store`) from a record malformed otherwise, and says whether a
/// secret of the record is under an older key than the current one.
pub fn open_record(
    kv: &KeyValue,
    keys: &Keyring,
) -> Result<Option<(Record, bool)>, EncryptionError> {
    let bad_name = |e| corrupt(&kv.key, e);
    let mut stale = false;
    let record = match keys::parse(&kv.key) {
        Some(Parsed::Integration(account, id)) => {
            let account = AccountName::from_id(account).map_err(bad_name)?;
            let name = IntegrationName::new(&account, id).map_err(bad_name)?;
            Record::Integration(decode_integration(kv, name, keys, &mut stale)?)
        }
        Some(Parsed::PushScope(account, id)) => {
            let account = AccountName::from_id(account).map_err(bad_name)?;
            let name = PushScopeName::new(&account, id).map_err(bad_name)?;
            Record::PushScope(decode_push_scope(kv, name)?)
        }
        None => return Ok(None),
    };
    Ok(Some((record, stale)))
}

/// Encodes the encryption check record ([`keys::ENCRYPTION_CHECK`]) with the current key.
pub fn encode_check(keys: &Keyring) -> Vec<u8> {
    rec::EncryptionCheckRecord {
        check: Some(keys.encrypt(CHECK_TEXT, &aad(keys::ENCRYPTION_CHECK, CHECK))),
    }
    .encode_to_vec()
}

/// A stored record that holds encrypted values, as stored: an integration or the encryption
/// check. For checking and re-encrypting them without decoding the rest.
#[derive(Debug)]
pub enum Sealed {
    /// An integration record.
    Integration(Box<rec::IntegrationRecord>),
    /// The encryption check record.
    Check(rec::EncryptionCheckRecord),
}

impl Sealed {
    /// Decodes the record at `kv` when it is one that holds encrypted values.
    pub fn decode(kv: &KeyValue) -> Result<Option<Self>, StoreError> {
        let bad = |e| corrupt(&kv.key, e);
        if kv.key == keys::ENCRYPTION_CHECK {
            let r = rec::EncryptionCheckRecord::decode(kv.value.as_slice()).map_err(bad)?;
            return Ok(Some(Self::Check(r)));
        }
        Ok(match keys::parse(&kv.key) {
            Some(Parsed::Integration(..)) => Some(Self::Integration(Box::new(
                rec::IntegrationRecord::decode(kv.value.as_slice()).map_err(bad)?,
            ))),
            _ => None,
        })
    }

    /// Its encrypted fields, by field name (as in [`aad`]); `None` where a value is missing.
    pub fn fields(&mut self) -> Vec<(String, Option<&mut rec::EncryptedValue>)> {
        match self {
            Self::Integration(r) => {
                let mut fields = Vec::with_capacity(r.secrets.len() + 1);
                if !r.auth_header_name.is_empty() {
                    fields.push((AUTH_HEADER_VALUE.to_owned(), r.auth_header_value.as_mut()));
                }
                for (n, s) in r.secrets.iter_mut().enumerate() {
                    fields.push((secret_field(n), s.secret.as_mut()));
                }
                fields
            }
            Self::Check(r) => vec![(CHECK.to_owned(), r.check.as_mut())],
        }
    }

    /// The plaintext a field must decrypt to, when it is fixed (the encryption check).
    pub fn expected(&self) -> Option<&'static [u8]> {
        matches!(self, Self::Check(_)).then_some(CHECK_TEXT)
    }

    /// Encodes it again.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Integration(r) => r.encode_to_vec(),
            Self::Check(r) => r.encode_to_vec(),
        }
    }
}

/// Store key of an integration.
pub fn integration_key(name: &IntegrationName) -> String {
    keys::integration(name.account().id(), name.id())
}

/// Store key of a push scope.
pub fn push_scope_key(name: &PushScopeName) -> String {
    keys::push_scope(name.account().id(), name.id())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use pushwire_common::domain::{IncompletePolicy, PayloadVariables, SignatureScheme};

    use super::*;

    const AUTH: &str = "Bearer auth-s3cret-value";
    const SECRET: &str = "signing-s3cret-value";
    const OLD_SECRET: &str = "older-s3cret-value";

    fn keys() -> Keyring {
        Keyring::parse("k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "test").unwrap()
    }

    fn integration(payload_variables: PayloadVariables) -> Integration {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let account = AccountName::from_id("42").unwrap();
        Integration {
            name: IntegrationName::new(&account, "crm").unwrap(),
            display_name: "CRM".into(),
            url: "https://crm.example.com/hook".into(),
            enabled: true,
            disabled_reason: String::new(),
            incomplete_participations: IncompletePolicy::Send,
            payload_variables,
            auth_header: None,
            secrets: Vec::new(),
            signature_schemes: vec![SignatureScheme::Qualifio],
            create_time: t,
            update_time: t,
            revision: 3,
        }
    }

    fn with_secrets() -> Integration {
        let mut i = integration(PayloadVariables::AsPublished);
        i.auth_header = Some(AuthHeader {
            name: "Authorization".into(),
            value: Secret::new(AUTH),
        });
        i.secrets = vec![
            SigningSecret {
                secret: Secret::new(SECRET),
                expire_time: None,
            },
            SigningSecret {
                secret: Secret::new(OLD_SECRET),
                expire_time: Some(UNIX_EPOCH + Duration::from_secs(1_800_000_000)),
            },
        ];
        i
    }

    fn kv(value: Vec<u8>) -> KeyValue {
        KeyValue {
            key: "/pushwire/v1/accounts/42/integrations/crm".into(),
            value,
            create_revision: 1,
            mod_revision: 3,
        }
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    #[test]
    fn payload_variables_round_trip_and_default() {
        let keys = keys();
        for option in [PayloadVariables::AsPublished, PayloadVariables::Add] {
            let i = integration(option);
            assert_eq!(
                decode(&kv(encode_integration(&i, &keys)), &keys).unwrap(),
                Some(Record::Integration(i))
            );
        }
        // A record written before the option existed has no such field: as published.
        let mut old = rec::IntegrationRecord::decode(
            encode_integration(&integration(PayloadVariables::Add), &keys).as_slice(),
        )
        .unwrap();
        old.payload_variables = 0;
        assert_eq!(
            decode(&kv(old.encode_to_vec()), &keys).unwrap(),
            Some(Record::Integration(integration(
                PayloadVariables::AsPublished
            )))
        );
    }

    #[test]
    fn secrets_are_stored_encrypted_and_read_back() {
        let keys = keys();
        let i = with_secrets();
        let value = encode_integration(&i, &keys);
        for secret in [AUTH, SECRET, OLD_SECRET, "s3cret"] {
            assert!(!contains(&value, secret), "{secret} stored in clear");
        }
        let r = rec::IntegrationRecord::decode(value.as_slice()).unwrap();
        assert_eq!(r.auth_header_value.as_ref().unwrap().key_id, "k1");
        assert!(
            r.secrets
                .iter()
                .all(|s| s.secret.as_ref().unwrap().key_id == "k1")
        );
        assert_eq!(
            decode(&kv(value), &keys).unwrap(),
            Some(Record::Integration(i))
        );
    }

    #[test]
    fn ciphertexts_are_bound_to_their_record_and_field() {
        let keys = keys();
        let value = encode_integration(&with_secrets(), &keys);
        // The same bytes under another integration's key.
        let mut moved = kv(value.clone());
        moved.key = "/pushwire/v1/accounts/42/integrations/other".into();
        let err = decode(&moved, &keys).unwrap_err().to_string();
        assert!(
            err.contains("auth_header_value") && err.contains("\"k1\""),
            "{err}"
        );
        // The current and the previous secret swapped inside the record.
        let mut r = rec::IntegrationRecord::decode(value.as_slice()).unwrap();
        let (a, b) = (r.secrets[0].secret.take(), r.secrets[1].secret.take());
        (r.secrets[0].secret, r.secrets[1].secret) = (b, a);
        let err = decode(&kv(r.encode_to_vec()), &keys)
            .unwrap_err()
            .to_string();
        assert!(err.contains("secrets/0"), "{err}");
        for secret in [AUTH, SECRET, OLD_SECRET] {
            assert!(!err.contains(secret), "{err}");
        }
    }

    #[test]
    fn missing_or_foreign_encrypted_values_are_errors() {
        let keys = keys();
        let value = encode_integration(&with_secrets(), &keys);
        let mut r = rec::IntegrationRecord::decode(value.as_slice()).unwrap();
        r.auth_header_value = None;
        let err = decode(&kv(r.encode_to_vec()), &keys)
            .unwrap_err()
            .to_string();
        assert!(err.contains(NOT_ENCRYPTED), "{err}");
        let other =
            Keyring::parse("k9:ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=", "test").unwrap();
        let err = decode(&kv(value), &other).unwrap_err().to_string();
        assert!(err.contains("\"k1\", which is not among"), "{err}");
    }

    #[test]
    fn sealed_fields_and_check_record() {
        let keys = keys();
        let mut sealed = Sealed::decode(&kv(encode_integration(&with_secrets(), &keys)))
            .unwrap()
            .unwrap();
        let names: Vec<_> = sealed.fields().into_iter().map(|(f, _)| f).collect();
        assert_eq!(names, ["auth_header_value", "secrets/0", "secrets/1"]);
        let check = KeyValue {
            key: keys::ENCRYPTION_CHECK.into(),
            value: encode_check(&keys),
            create_revision: 1,
            mod_revision: 1,
        };
        assert_eq!(decode(&check, &keys).unwrap(), None);
        let mut sealed = Sealed::decode(&check).unwrap().unwrap();
        assert_eq!(sealed.expected(), Some(CHECK_TEXT));
        let (field, value) = sealed.fields().pop().unwrap();
        let aad = aad(&check.key, &field);
        assert_eq!(keys.decrypt(value.unwrap(), &aad).unwrap(), CHECK_TEXT);
    }
}
