//! Conversions between the domain types and the `pushwire.v1` messages, in one place.
//! Reads (`From<&Integration> for pb::Integration`) never carry secrets; the worker's config
//! messages ([`integration_config`]) do. Decoding (`TryFrom`) checks structure and names and
//! reports the offending field; admin-input policy (URL schemes, header rules) lives in the
//! control plane.

use std::time::SystemTime;

use super::{
    Audience, AuthHeader, IncompletePolicy, Integration, IntegrationName, PayloadVariables,
    PushAction, PushScope, PushScopeName, ScopeTarget, Secret, SignatureScheme, SigningSecret,
};
use crate::pb::v1 as pb;

/// A message field that could not be converted; `field` is the path, e.g. `push_scope.level`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidField {
    /// Path of the field, snake_case as in the proto file.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl InvalidField {
    /// Builds an error for `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

fn timestamp(t: SystemTime) -> Option<prost_types::Timestamp> {
    Some(t.into())
}

fn system_time(field: &str, t: Option<prost_types::Timestamp>) -> Result<SystemTime, InvalidField> {
    match t {
        None => Ok(SystemTime::UNIX_EPOCH),
        Some(t) => system_time_at(|| field.to_owned(), t),
    }
}

/// A timestamp field; `field` names it only for an error (some paths are written out).
fn system_time_at(
    field: impl FnOnce() -> String,
    t: prost_types::Timestamp,
) -> Result<SystemTime, InvalidField> {
    SystemTime::try_from(t).map_err(|e| InvalidField::new(field(), e.to_string()))
}

fn parse_etag(field: &str, etag: &str) -> Result<i64, InvalidField> {
    if etag.is_empty() {
        return Ok(0);
    }
    etag.parse::<i64>()
        .ok()
        .filter(|r| *r > 0)
        .ok_or_else(|| InvalidField::new(field, "not an etag returned by this server"))
}

/// The etag of a revision: empty for 0 (not stored yet), which is how it is read back.
fn etag_text(revision: i64) -> String {
    if revision > 0 {
        revision.to_string()
    } else {
        String::new()
    }
}

/// Parses an etag as sent by a client: `None` when empty.
pub fn etag(field: &str, etag: &str) -> Result<Option<i64>, InvalidField> {
    parse_etag(field, etag).map(|r| (r != 0).then_some(r))
}

// ---- enums -------------------------------------------------------------------------------

/// Decodes an enum field; `None` for the UNSPECIFIED zero value.
fn enum_value<E: TryFrom<i32>>(field: &str, value: i32) -> Result<E, InvalidField> {
    enum_value_at(|| field.to_owned(), value)
}

/// [`enum_value`] of a field whose path is written out only for an error.
fn enum_value_at<E: TryFrom<i32>>(
    field: impl FnOnce() -> String,
    value: i32,
) -> Result<E, InvalidField> {
    E::try_from(value)
        .map_err(|_| InvalidField::new(field(), format!("unknown enum value {value}")))
}

/// `IncompleteParticipations` → policy; UNSPECIFIED is `None`.
pub fn incomplete_policy(field: &str, v: i32) -> Result<Option<IncompletePolicy>, InvalidField> {
    Ok(match enum_value(field, v)? {
        pb::IncompleteParticipations::Unspecified => None,
        pb::IncompleteParticipations::Skip => Some(IncompletePolicy::Skip),
        pb::IncompleteParticipations::Send => Some(IncompletePolicy::Send),
    })
}

fn incomplete_to_pb(p: IncompletePolicy) -> pb::IncompleteParticipations {
    match p {
        IncompletePolicy::Skip => pb::IncompleteParticipations::Skip,
        IncompletePolicy::Send => pb::IncompleteParticipations::Send,
    }
}

/// `PayloadVariables` → option; UNSPECIFIED is `None`.
pub fn payload_variables(field: &str, v: i32) -> Result<Option<PayloadVariables>, InvalidField> {
    Ok(match enum_value(field, v)? {
        pb::PayloadVariables::Unspecified => None,
        pb::PayloadVariables::AsPublished => Some(PayloadVariables::AsPublished),
        pb::PayloadVariables::Add => Some(PayloadVariables::Add),
    })
}

fn payload_variables_to_pb(p: PayloadVariables) -> pb::PayloadVariables {
    match p {
        PayloadVariables::AsPublished => pb::PayloadVariables::AsPublished,
        PayloadVariables::Add => pb::PayloadVariables::Add,
    }
}

/// `SignatureScheme` list → schemes, sorted and de-duplicated; UNSPECIFIED is refused.
pub fn signature_schemes(
    field: &str,
    values: &[i32],
) -> Result<Vec<SignatureScheme>, InvalidField> {
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        // The field's path is only written out for an error (this runs for every change a
        // worker applies).
        let at = || format!("{field}[{i}]");
        out.push(match enum_value_at(at, *v)? {
            pb::SignatureScheme::Unspecified => {
                return Err(InvalidField::new(
                    at(),
                    "SIGNATURE_SCHEME_UNSPECIFIED is not a scheme",
                ));
            }
            pb::SignatureScheme::Qualifio => SignatureScheme::Qualifio,
            pb::SignatureScheme::StandardWebhooks => SignatureScheme::StandardWebhooks,
        });
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn scheme_to_pb(s: SignatureScheme) -> pb::SignatureScheme {
    match s {
        SignatureScheme::Qualifio => pb::SignatureScheme::Qualifio,
        SignatureScheme::StandardWebhooks => pb::SignatureScheme::StandardWebhooks,
    }
}

/// The level of a scope as the API names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// `PUSH_SCOPE_LEVEL_ACCOUNT`.
    Account,
    /// `PUSH_SCOPE_LEVEL_WEBSITE`.
    Website,
    /// `PUSH_SCOPE_LEVEL_MASTER_FORM`.
    MasterForm,
    /// `PUSH_SCOPE_LEVEL_CAMPAIGN`.
    Campaign,
}

/// `PushScopeLevel` → level; UNSPECIFIED is `None`.
pub fn level(field: &str, v: i32) -> Result<Option<Level>, InvalidField> {
    Ok(match enum_value(field, v)? {
        pb::PushScopeLevel::Unspecified => None,
        pb::PushScopeLevel::Account => Some(Level::Account),
        pb::PushScopeLevel::Website => Some(Level::Website),
        pb::PushScopeLevel::MasterForm => Some(Level::MasterForm),
        pb::PushScopeLevel::Campaign => Some(Level::Campaign),
    })
}

/// Checks a website, master form or campaign id: 1 to 64 characters of letters, digits, `-`
/// and `_`.
pub fn validate_target_id(field: &str, id: &str) -> Result<(), InvalidField> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(InvalidField::new(
            field,
            "must be 1 to 64 characters of letters, digits, '-' and '_'",
        ))
    }
}

/// The canonical form of a website, master form or campaign id: digit-only ids are numbers in
/// participation documents (`418207` and `"0418207"` alike), so they are kept without leading
/// zeros and compare equal to what `participation::parse` produces; other ids are unchanged.
pub fn canonical_target_id(id: &str) -> String {
    if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) {
        let trimmed = id.trim_start_matches('0');
        return if trimmed.is_empty() {
            "0".to_owned()
        } else {
            trimmed.to_owned()
        };
    }
    id.to_owned()
}

/// Builds a scope target from a level and a target id, checking that they fit together.
pub fn scope_target(level: Level, target_id: &str) -> Result<ScopeTarget, InvalidField> {
    const FIELD: &str = "push_scope.target_id";
    if level == Level::Account {
        if !target_id.is_empty() {
            return Err(InvalidField::new(
                FIELD,
                "must be empty for PUSH_SCOPE_LEVEL_ACCOUNT",
            ));
        }
        return Ok(ScopeTarget::Account);
    }
    validate_target_id(FIELD, target_id)?;
    let id = canonical_target_id(target_id);
    Ok(match level {
        Level::Account => unreachable!("handled above"),
        Level::Website => ScopeTarget::Website(id),
        Level::MasterForm => ScopeTarget::MasterForm(id),
        Level::Campaign => ScopeTarget::Campaign(id),
    })
}

fn target_to_pb(t: &ScopeTarget) -> (pb::PushScopeLevel, String) {
    match t {
        ScopeTarget::Account => (pb::PushScopeLevel::Account, String::new()),
        ScopeTarget::Website(id) => (pb::PushScopeLevel::Website, id.clone()),
        ScopeTarget::MasterForm(id) => (pb::PushScopeLevel::MasterForm, id.clone()),
        ScopeTarget::Campaign(id) => (pb::PushScopeLevel::Campaign, id.clone()),
    }
}

/// `Audience` → audience; UNSPECIFIED is `None`.
pub fn audience(field: &str, v: i32) -> Result<Option<Audience>, InvalidField> {
    Ok(match enum_value(field, v)? {
        pb::Audience::Unspecified => None,
        pb::Audience::All => Some(Audience::All),
        pb::Audience::Identified => Some(Audience::Identified),
        pb::Audience::Anonymous => Some(Audience::Anonymous),
    })
}

fn audience_to_pb(a: Audience) -> pb::Audience {
    match a {
        Audience::All => pb::Audience::All,
        Audience::Identified => pb::Audience::Identified,
        Audience::Anonymous => pb::Audience::Anonymous,
    }
}

/// `PushAction` → action; UNSPECIFIED is `None`.
pub fn action(field: &str, v: i32) -> Result<Option<PushAction>, InvalidField> {
    Ok(match enum_value(field, v)? {
        pb::PushAction::Unspecified => None,
        pb::PushAction::Push => Some(PushAction::Push),
        pb::PushAction::DoNotPush => Some(PushAction::DoNotPush),
    })
}

fn action_to_pb(a: PushAction) -> pb::PushAction {
    match a {
        PushAction::Push => pb::PushAction::Push,
        PushAction::DoNotPush => pb::PushAction::DoNotPush,
    }
}

// ---- integrations -------------------------------------------------------------------------

/// The public view of an integration: what reads return. Secrets are reduced to flags; the
/// secret's fingerprint is keyed with a key of the control plane, which fills it in (an unkeyed
/// hash would let any reader test guesses offline).
impl From<&Integration> for pb::Integration {
    fn from(i: &Integration) -> Self {
        let current = i.secrets.first().filter(|s| s.expire_time.is_none());
        pb::Integration {
            name: i.name.to_string(),
            display_name: i.display_name.clone(),
            url: i.url.clone(),
            enabled: Some(i.enabled),
            incomplete_participations: incomplete_to_pb(i.incomplete_participations).into(),
            auth_header: i.auth_header.as_ref().map(|h| pb::AuthHeader {
                name: h.name.clone(),
                value: String::new(),
                value_set: true,
            }),
            secret: String::new(),
            secret_set: current.is_some(),
            secret_fingerprint: String::new(),
            signature_schemes: i
                .signature_schemes
                .iter()
                .map(|s| scheme_to_pb(*s).into())
                .collect(),
            disabled_reason: i.disabled_reason.clone(),
            create_time: timestamp(i.create_time),
            update_time: timestamp(i.update_time),
            etag: etag_text(i.revision),
            payload_variables: payload_variables_to_pb(i.payload_variables).into(),
        }
    }
}

/// The worker's view of an integration: the public view plus its secrets.
pub fn integration_config(i: &Integration) -> pb::IntegrationConfig {
    pb::IntegrationConfig {
        integration: Some(i.into()),
        auth_header_value: i
            .auth_header
            .as_ref()
            .map(|h| h.value.expose().to_owned())
            .unwrap_or_default(),
        signing_secrets: i
            .secrets
            .iter()
            .map(|s| pb::SigningSecret {
                secret: s.secret.expose().to_owned(),
                expire_time: s.expire_time.and_then(timestamp),
            })
            .collect(),
    }
}

/// Decodes the worker's view of an integration (as sent by `WatchConfig`).
impl TryFrom<pb::IntegrationConfig> for Integration {
    type Error = InvalidField;

    fn try_from(c: pb::IntegrationConfig) -> Result<Self, Self::Error> {
        let i = c
            .integration
            .ok_or_else(|| InvalidField::new("integration", "missing"))?;
        let name = IntegrationName::parse(&i.name)
            .map_err(|e| InvalidField::new("integration.name", e.to_string()))?;
        let auth_header = match i.auth_header {
            Some(h) if !h.name.is_empty() => Some(AuthHeader {
                name: h.name,
                value: Secret::new(c.auth_header_value),
            }),
            _ => None,
        };
        let secrets = c
            .signing_secrets
            .into_iter()
            .enumerate()
            .map(|(n, s)| {
                let expire_time = match s.expire_time {
                    None => None,
                    Some(t) => Some(system_time_at(
                        || format!("signing_secrets[{n}].expire_time"),
                        t,
                    )?),
                };
                Ok(SigningSecret {
                    secret: Secret::new(s.secret),
                    expire_time,
                })
            })
            .collect::<Result<_, InvalidField>>()?;
        Ok(Integration {
            name,
            display_name: i.display_name,
            url: i.url,
            enabled: i.enabled.unwrap_or(true),
            disabled_reason: i.disabled_reason,
            incomplete_participations: incomplete_policy(
                "integration.incomplete_participations",
                i.incomplete_participations,
            )?
            .unwrap_or_default(),
            payload_variables: payload_variables(
                "integration.payload_variables",
                i.payload_variables,
            )?
            .unwrap_or_default(),
            auth_header,
            secrets,
            signature_schemes: signature_schemes(
                "integration.signature_schemes",
                &i.signature_schemes,
            )?,
            create_time: system_time("integration.create_time", i.create_time)?,
            update_time: system_time("integration.update_time", i.update_time)?,
            revision: parse_etag("integration.etag", &i.etag)?,
        })
    }
}

// ---- push scopes ---------------------------------------------------------------------------

impl From<&PushScope> for pb::PushScope {
    fn from(s: &PushScope) -> Self {
        let (level, target_id) = target_to_pb(&s.target);
        pb::PushScope {
            name: s.name.to_string(),
            integration: s.integration.to_string(),
            level: level.into(),
            target_id,
            audience: audience_to_pb(s.audience).into(),
            action: action_to_pb(s.action).into(),
            create_time: timestamp(s.create_time),
            update_time: timestamp(s.update_time),
            etag: etag_text(s.revision),
        }
    }
}

/// Decodes a complete push scope (as sent by `WatchConfig`); UNSPECIFIED audience and action
/// take their defaults, an UNSPECIFIED level is refused.
impl TryFrom<pb::PushScope> for PushScope {
    type Error = InvalidField;

    fn try_from(s: pb::PushScope) -> Result<Self, Self::Error> {
        let name = PushScopeName::parse(&s.name)
            .map_err(|e| InvalidField::new("push_scope.name", e.to_string()))?;
        let integration = IntegrationName::parse(&s.integration)
            .map_err(|e| InvalidField::new("push_scope.integration", e.to_string()))?;
        let level = level("push_scope.level", s.level)?
            .ok_or_else(|| InvalidField::new("push_scope.level", "required"))?;
        Ok(PushScope {
            name,
            integration,
            target: scope_target(level, &s.target_id)?,
            audience: audience("push_scope.audience", s.audience)?.unwrap_or_default(),
            action: action("push_scope.action", s.action)?.unwrap_or_default(),
            create_time: system_time("push_scope.create_time", s.create_time)?,
            update_time: system_time("push_scope.update_time", s.update_time)?,
            revision: parse_etag("push_scope.etag", &s.etag)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn integration() -> Integration {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        Integration {
            name: IntegrationName::parse("accounts/42/integrations/crm").unwrap(),
            display_name: "CRM".into(),
            url: "https://crm.example.com/hook".into(),
            enabled: true,
            disabled_reason: String::new(),
            incomplete_participations: IncompletePolicy::Send,
            payload_variables: PayloadVariables::Add,
            auth_header: Some(AuthHeader {
                name: "Authorization".into(),
                value: Secret::new("Bearer tkn-1"),
            }),
            secrets: vec![
                SigningSecret {
                    secret: Secret::new("new-secret"),
                    expire_time: None,
                },
                SigningSecret {
                    secret: Secret::new("old-secret"),
                    expire_time: Some(t),
                },
            ],
            signature_schemes: vec![SignatureScheme::Qualifio, SignatureScheme::StandardWebhooks],
            create_time: t,
            update_time: t,
            revision: 7,
        }
    }

    #[test]
    fn reads_carry_no_secret() {
        let read = pb::Integration::from(&integration());
        let encoded = format!("{:?}", prost::Message::encode_to_vec(&read));
        assert!(read.secret.is_empty());
        assert!(read.secret_set);
        assert!(
            read.secret_fingerprint.is_empty(),
            "keyed by the control plane"
        );
        let header = read.auth_header.clone().unwrap();
        assert!(header.value.is_empty() && header.value_set);
        assert_eq!(read.etag, "7");
        for secret in ["new-secret", "old-secret", "tkn-1"] {
            let bytes = prost::Message::encode_to_vec(&read);
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} in {encoded}"
            );
        }
    }

    #[test]
    fn worker_config_round_trips() {
        let original = integration();
        let back = Integration::try_from(integration_config(&original)).unwrap();
        assert_eq!(back, original);
    }

    #[test]
    fn payload_variables_default_and_unknown() {
        let mut config = integration_config(&integration());
        assert_eq!(
            config.integration.as_ref().unwrap().payload_variables,
            pb::PayloadVariables::Add as i32
        );
        // From a control plane that predates the option: as published.
        config.integration.as_mut().unwrap().payload_variables = 0;
        assert_eq!(
            Integration::try_from(config.clone())
                .unwrap()
                .payload_variables,
            PayloadVariables::AsPublished
        );
        config.integration.as_mut().unwrap().payload_variables = 9;
        assert_eq!(
            Integration::try_from(config).unwrap_err().field,
            "integration.payload_variables"
        );
    }

    #[test]
    fn scope_round_trips_and_checks_target() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(5);
        let scope = PushScope {
            name: PushScopeName::parse("accounts/42/pushScopes/w7").unwrap(),
            integration: IntegrationName::parse("accounts/42/integrations/crm").unwrap(),
            target: ScopeTarget::Website("7".into()),
            audience: Audience::Identified,
            action: PushAction::DoNotPush,
            create_time: t,
            update_time: t,
            revision: 3,
        };
        assert_eq!(
            PushScope::try_from(pb::PushScope::from(&scope)).unwrap(),
            scope
        );

        let mut bad = pb::PushScope::from(&scope);
        bad.level = pb::PushScopeLevel::Account.into();
        assert_eq!(
            PushScope::try_from(bad).unwrap_err().field,
            "push_scope.target_id"
        );
        let mut bad = pb::PushScope::from(&scope);
        bad.level = 99;
        assert_eq!(
            PushScope::try_from(bad).unwrap_err().field,
            "push_scope.level"
        );
        let mut bad = pb::PushScope::from(&scope);
        bad.target_id = "7 8".into();
        assert_eq!(
            PushScope::try_from(bad).unwrap_err().field,
            "push_scope.target_id"
        );
    }

    #[test]
    fn numeric_target_ids_are_canonical() {
        assert_eq!(canonical_target_id("007"), "7");
        assert_eq!(canonical_target_id("000"), "0");
        assert_eq!(canonical_target_id("418207"), "418207");
        assert_eq!(canonical_target_id("web-07"), "web-07");
        assert_eq!(
            scope_target(Level::Campaign, "0099").unwrap(),
            ScopeTarget::Campaign("99".into())
        );
    }

    #[test]
    fn schemes_refuse_unspecified_and_unknown() {
        assert_eq!(
            signature_schemes("s", &[2, 1, 2]).unwrap(),
            vec![SignatureScheme::Qualifio, SignatureScheme::StandardWebhooks]
        );
        assert_eq!(signature_schemes("s", &[1, 0]).unwrap_err().field, "s[1]");
        assert_eq!(signature_schemes("s", &[5]).unwrap_err().field, "s[0]");
    }
}
