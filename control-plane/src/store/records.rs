//! Encoding of the domain types into the protobuf records stored under the keys of
//! [`super::keys`] (`pushwire.storage.v1`), and back. The key carries the account and id, the
//! store carries the revision (etag); the record carries the rest.

use std::time::SystemTime;

use prost::Message;
use pushwire_common::domain::convert::{self, InvalidField};
use pushwire_common::domain::{
    AccountName, AuthHeader, Integration, IntegrationName, PushScope, PushScopeName, Secret,
    SigningSecret,
};
use pushwire_common::pb::{storage as rec, v1 as pb};

use super::keys::{self, Parsed};
use super::{KeyValue, StoreError};

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

/// Encodes an integration's record (everything but its name and revision).
pub fn encode_integration(i: &Integration) -> Vec<u8> {
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
            .map(|h| h.value.expose().to_owned())
            .unwrap_or_default(),
        secrets: i
            .secrets
            .iter()
            .map(|s| rec::SigningSecretRecord {
                secret: s.secret.expose().to_owned(),
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

fn decode_integration(kv: &KeyValue, name: IntegrationName) -> Result<Integration, StoreError> {
    let bad = |e: InvalidField| corrupt(&kv.key, e);
    let r = rec::IntegrationRecord::decode(kv.value.as_slice()).map_err(|e| corrupt(&kv.key, e))?;
    let auth_header = (!r.auth_header_name.is_empty()).then(|| AuthHeader {
        name: r.auth_header_name,
        value: Secret::new(r.auth_header_value),
    });
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
        secrets: r
            .secrets
            .into_iter()
            .map(|s| SigningSecret {
                secret: Secret::new(s.secret),
                expire_time: s.expire_time.map(|t| time(Some(t))),
            })
            .collect(),
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

/// Decodes any record under [`keys::ROOT`]; `None` for keys this version does not know.
pub fn decode(kv: &KeyValue) -> Result<Option<Record>, StoreError> {
    let bad_name = |e| corrupt(&kv.key, e);
    Ok(match keys::parse(&kv.key) {
        Some(Parsed::Integration(account, id)) => {
            let account = AccountName::from_id(account).map_err(bad_name)?;
            let name = IntegrationName::new(&account, id).map_err(bad_name)?;
            Some(Record::Integration(decode_integration(kv, name)?))
        }
        Some(Parsed::PushScope(account, id)) => {
            let account = AccountName::from_id(account).map_err(bad_name)?;
            let name = PushScopeName::new(&account, id).map_err(bad_name)?;
            Some(Record::PushScope(decode_push_scope(kv, name)?))
        }
        None => None,
    })
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

    fn kv(value: Vec<u8>) -> KeyValue {
        KeyValue {
            key: "/pushwire/v1/accounts/42/integrations/crm".into(),
            value,
            create_revision: 1,
            mod_revision: 3,
        }
    }

    #[test]
    fn payload_variables_round_trip_and_default() {
        for option in [PayloadVariables::AsPublished, PayloadVariables::Add] {
            let i = integration(option);
            assert_eq!(
                decode(&kv(encode_integration(&i))).unwrap(),
                Some(Record::Integration(i))
            );
        }
        // A record written before the option existed has no such field: as published.
        let mut old = rec::IntegrationRecord::decode(
            encode_integration(&integration(PayloadVariables::Add)).as_slice(),
        )
        .unwrap();
        old.payload_variables = 0;
        assert_eq!(
            decode(&kv(old.encode_to_vec())).unwrap(),
            Some(Record::Integration(integration(
                PayloadVariables::AsPublished
            )))
        );
    }
}
