//! Integration operations: create, read, list, update (with secret rotation) and delete (with
//! the push scopes that refer to it when forced), each as one guarded store transaction.

use std::time::SystemTime;

use pushwire_common::domain::convert::InvalidField;
use pushwire_common::domain::{
    AccountName, AuthHeader, IncompletePolicy, Integration, IntegrationName, PayloadVariables,
    Secret, SignatureScheme, SigningSecret,
};

use super::{
    AccountView, Attempt, Catalog, Page, PageRequest, Read, Result, ServiceError, check_etag,
    generate_id, paginate, validate,
};
use crate::store::records;
use crate::store::{Compare, Op, Txn, keys};

/// How many replaced secrets keep signing at once; older ones are dropped early.
const MAX_PREVIOUS_SECRETS: usize = 4;

/// An auth header as an admin sets it.
#[derive(Clone, Debug)]
pub struct AuthHeaderInput {
    /// Header name.
    pub name: String,
    /// Header value.
    pub value: Secret,
}

/// The fields a create or update sets; `None` leaves a field as it is (or at its default on
/// create). For `auth_header` and `secret`, `Some(None)` removes them.
#[derive(Clone, Debug, Default)]
pub struct IntegrationPatch {
    /// New display name.
    pub display_name: Option<String>,
    /// New endpoint URL.
    pub url: Option<String>,
    /// Enable or disable.
    pub enabled: Option<bool>,
    /// Why it is disabled (only with `enabled: false`).
    pub disabled_reason: Option<String>,
    /// Policy for incomplete participations.
    pub incomplete_participations: Option<IncompletePolicy>,
    /// Whether the body gets a `variables` object added.
    pub payload_variables: Option<PayloadVariables>,
    /// Set or remove the auth header.
    pub auth_header: Option<Option<AuthHeaderInput>>,
    /// Set (rotate) or remove the signing secret.
    pub secret: Option<Option<Secret>>,
    /// Signature schemes.
    pub signature_schemes: Option<Vec<SignatureScheme>>,
}

impl Catalog {
    /// Creates an integration; `id` is generated when `None`.
    pub async fn create_integration(
        &self,
        account: &AccountName,
        id: Option<&str>,
        patch: IntegrationPatch,
    ) -> Result<Integration> {
        let name = match id {
            Some(id) => IntegrationName::new(account, id)
                .map_err(|e| InvalidField::new("integration_id", e.to_string()))?,
            None => IntegrationName::new(account, &super::generate_id())
                .expect("generated ids are valid"),
        };
        let generated = id.is_none();
        let now = SystemTime::now();
        let mut integration = Integration::new(name, now);
        self.apply(&mut integration, patch, now)?;
        let ((), revision) = self
            .transact(
                move || self.view(account),
                |view| {
                    if generated && view.integrations.contains_key(integration.name.id()) {
                        integration.name = IntegrationName::new(account, &generate_id())
                            .expect("generated ids are valid");
                        return Ok(Attempt::Again);
                    }
                    self.check_new_integration(&view, &integration)?;
                    let key = records::integration_key(&integration.name);
                    let txn = Txn {
                        compares: vec![
                            Compare::Absent(key.clone()),
                            Compare::PrefixUnchangedSince {
                                prefix: keys::integrations_prefix(account.id()),
                                revision: view.revision,
                            },
                        ],
                        ops: vec![Op::Put {
                            key,
                            value: records::encode_integration(&integration, &self.keys),
                        }],
                    };
                    Ok(Attempt::Commit { txn, value: () })
                },
            )
            .await?;
        integration.revision = revision;
        Ok(integration)
    }

    /// The checks of a new integration against its account as read (shared by creates and
    /// imports, so that both refuse the same way): its id is free, the account is under
    /// `--max-integrations-per-account`, and its display name is unique. The caller's
    /// transaction guards the read with a prefix compare: a concurrent create makes it fail,
    /// and the count is taken again.
    pub(super) fn check_new_integration(
        &self,
        view: &AccountView,
        integration: &Integration,
    ) -> Result<()> {
        if view.integrations.contains_key(integration.name.id()) {
            return Err(ServiceError::AlreadyExists(format!(
                "{} already exists",
                integration.name
            )));
        }
        let max = self.opts.max_integrations_per_account;
        if view.integrations.len() >= max {
            return Err(ServiceError::ResourceExhausted(format!(
                "{} has {} integrations, the most allowed per account \
                 (--max-integrations-per-account {max}); delete one first",
                integration.name.account(),
                view.integrations.len()
            )));
        }
        check_unique_display_name(view, integration)
    }

    /// The keyed fingerprint of `i`'s current signing secret, if it has one (see
    /// [`crate::crypto::Keyring::fingerprint`]).
    pub fn secret_fingerprint(&self, i: &Integration) -> Option<String> {
        i.secrets
            .first()
            .filter(|s| s.expire_time.is_none())
            .map(|s| self.keys.fingerprint(&s.secret))
    }

    /// Reads one integration (from memory while the store is unavailable).
    pub async fn get_integration(&self, name: &IntegrationName) -> Result<Read<Integration>> {
        self.read_one(&records::integration_key(name), name).await
    }

    /// Lists an account's integrations by id (from memory while the store is unavailable).
    pub async fn list_integrations(
        &self,
        account: &AccountName,
        page: &PageRequest,
    ) -> Result<Read<Page<Integration>>> {
        let read = self
            .read_under::<Integration>(&keys::integrations_prefix(account.id()))
            .await?;
        let items = read.value.into_iter().map(|i| (i.name.id().to_owned(), i));
        Ok(Read {
            value: paginate(items, page)?,
            stale_at: read.stale_at,
        })
    }

    /// Applies `patch` to an integration; fails with ABORTED when `etag` is stale.
    pub async fn update_integration(
        &self,
        name: &IntegrationName,
        etag: Option<i64>,
        patch: IntegrationPatch,
    ) -> Result<Integration> {
        let (mut updated, revision) = self
            .transact(
                move || self.view(name.account()),
                |view| {
                    let current = view
                        .integrations
                        .get(name.id())
                        .ok_or_else(|| ServiceError::NotFound(name.to_string()))?;
                    check_etag(name, etag, current.revision)?;
                    let now = SystemTime::now();
                    let mut updated = current.clone();
                    self.apply(&mut updated, patch.clone(), now)?;
                    updated.update_time = now;
                    let key = records::integration_key(name);
                    let mut compares = vec![Compare::ModRevision(key.clone(), current.revision)];
                    if updated.display_name != current.display_name {
                        check_unique_display_name(&view, &updated)?;
                        compares.push(Compare::PrefixUnchangedSince {
                            prefix: keys::integrations_prefix(name.account().id()),
                            revision: view.revision,
                        });
                    }
                    let txn = Txn {
                        compares,
                        ops: vec![Op::Put {
                            key,
                            value: records::encode_integration(&updated, &self.keys),
                        }],
                    };
                    Ok(Attempt::Commit {
                        txn,
                        value: updated,
                    })
                },
            )
            .await?;
        updated.revision = revision;
        Ok(updated)
    }

    /// Deletes an integration; with `force`, also the scopes that refer to it, atomically.
    pub async fn delete_integration(
        &self,
        name: &IntegrationName,
        etag: Option<i64>,
        force: bool,
    ) -> Result<()> {
        self.transact(
            move || self.view(name.account()),
            |view| {
                let current = view
                    .integrations
                    .get(name.id())
                    .ok_or_else(|| ServiceError::NotFound(name.to_string()))?;
                check_etag(name, etag, current.revision)?;
                let referring: Vec<_> = view
                    .scopes
                    .values()
                    .filter(|s| &s.integration == name)
                    .collect();
                if !referring.is_empty() && !force {
                    let listed: Vec<String> = referring
                        .iter()
                        .take(5)
                        .map(|s| s.name.to_string())
                        .collect();
                    return Err(ServiceError::FailedPrecondition(format!(
                        "{name} is used by {} push scope(s) ({}{}); delete them first or set force",
                        referring.len(),
                        listed.join(", "),
                        if referring.len() > listed.len() {
                            ", ..."
                        } else {
                            ""
                        },
                    )));
                }
                let key = records::integration_key(name);
                let mut ops = vec![Op::Delete { key: key.clone() }];
                ops.extend(referring.iter().map(|s| Op::Delete {
                    key: records::push_scope_key(&s.name),
                }));
                let txn = Txn {
                    compares: vec![
                        Compare::ModRevision(key, current.revision),
                        // A scope created meanwhile for this integration would be left dangling.
                        Compare::PrefixUnchangedSince {
                            prefix: keys::push_scopes_prefix(name.account().id()),
                            revision: view.revision,
                        },
                    ],
                    ops,
                };
                Ok(Attempt::Commit { txn, value: () })
            },
        )
        .await?;
        Ok(())
    }

    /// Validates `patch` and applies it to `i`.
    pub(super) fn apply(
        &self,
        i: &mut Integration,
        patch: IntegrationPatch,
        now: SystemTime,
    ) -> Result<()> {
        let previous_url = i.url.clone();
        let had_auth_header = i.auth_header.is_some();
        let had_secret = !i.secrets.is_empty();
        let gives_auth_header = patch.auth_header.is_some();
        let gives_secret = patch.secret.is_some();
        let signing_changes = gives_secret || patch.signature_schemes.is_some();
        if let Some(name) = patch.display_name {
            validate::new_display_name("integration.display_name", &name)?;
            i.display_name = name.trim().to_owned();
        }
        if let Some(url) = patch.url {
            let url =
                validate::new_endpoint_url("integration.url", &url, self.opts.allow_insecure_http)?;
            // Only a URL being set: an integration stored under another allow-list stays
            // updatable (disabling it, say); the worker's guard still refuses to deliver.
            validate::endpoint_host("integration.url", &url, &self.opts.ssrf_allow)?;
            i.url = url;
        }
        // Creation checks the required fields here too, so a create without them fails
        // before anything is read.
        validate::display_name("integration.display_name", &i.display_name)?;
        validate::endpoint_url("integration.url", &i.url, self.opts.allow_insecure_http)?;
        if let Some(enabled) = patch.enabled {
            i.enabled = enabled;
            if enabled {
                i.disabled_reason.clear();
            }
        }
        if let Some(reason) = patch.disabled_reason {
            validate::reason("integration.disabled_reason", &reason)?;
            if i.enabled && !reason.is_empty() {
                return Err(InvalidField::new(
                    "integration.disabled_reason",
                    "can only be set with enabled: false",
                )
                .into());
            }
            i.disabled_reason = reason;
        }
        if let Some(policy) = patch.incomplete_participations {
            i.incomplete_participations = policy;
        }
        if let Some(option) = patch.payload_variables {
            i.payload_variables = option;
        }
        if let Some(header) = patch.auth_header {
            i.auth_header = match header {
                None => None,
                Some(h) => {
                    validate::header_name("integration.auth_header.name", &h.name)?;
                    validate::header_value("integration.auth_header.value", h.value.expose())?;
                    Some(AuthHeader {
                        name: h.name,
                        value: h.value,
                    })
                }
            };
        }
        if let Some(schemes) = patch.signature_schemes {
            if schemes.is_empty() {
                return Err(InvalidField::new(
                    "integration.signature_schemes",
                    "name at least one scheme",
                )
                .into());
            }
            i.signature_schemes = schemes;
        }
        if let Some(secret) = patch.secret {
            if let Some(s) = &secret {
                validate::secret("integration.secret", s.expose())?;
            }
            rotate(
                &mut i.secrets,
                secret,
                now,
                now + self.opts.secret_rotation_grace,
            );
        }
        // Checked on the result, and only when this change touches signing: an integration
        // stored before the rule stays updatable (disabling it, say).
        if signing_changes
            && let Some(current) = i.secrets.first().filter(|s| s.expire_time.is_none())
        {
            validate::secret_for_schemes(
                "integration.secret",
                current.secret.expose(),
                &i.signature_schemes,
            )?;
        }
        if !previous_url.is_empty() && validate::origin_changes(&previous_url, &i.url) {
            check_credentials_follow(
                had_auth_header && !gives_auth_header,
                had_secret && !gives_secret,
            )?;
        }
        Ok(())
    }
}

/// Makes `new` the current secret. The current one keeps signing until `grace_end`; expired
/// ones are dropped. Setting the current secret again changes nothing; removing the secret
/// stops signing at once.
fn rotate(
    secrets: &mut Vec<SigningSecret>,
    new: Option<Secret>,
    now: SystemTime,
    grace_end: SystemTime,
) {
    let Some(new) = new else {
        secrets.clear();
        return;
    };
    if secrets
        .first()
        .is_some_and(|s| s.expire_time.is_none() && s.secret == new)
    {
        return;
    }
    for s in secrets.iter_mut() {
        if s.expire_time.is_none() {
            s.expire_time = Some(grace_end);
        }
    }
    secrets.retain(|s| s.secret != new && s.expire_time.is_some_and(|t| t > now));
    secrets.truncate(MAX_PREVIOUS_SECRETS);
    secrets.insert(
        0,
        SigningSecret {
            secret: new,
            expire_time: None,
        },
    );
}

/// A change of origin (scheme, host or port) sends requests to another server: the stored
/// credentials do not go with them unless the same update gives them again (or removes them).
/// Refused rather than cleared, so that a move never silently stops authenticating or signing.
fn check_credentials_follow(auth_header_stays: bool, secret_stays: bool) -> Result<()> {
    let missing: Vec<&str> = [(auth_header_stays, "auth_header"), (secret_stays, "secret")]
        .into_iter()
        .filter_map(|(stays, field)| stays.then_some(field))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(ServiceError::FailedPrecondition(format!(
        "integration.url: the new URL is another origin (scheme, host or port), and the stored \
         {} would not go to it unless given again: set {} in the same update (the same values, \
         new ones, or none to remove them)",
        missing.join(" and "),
        missing.join(" and "),
    )))
}

fn check_unique_display_name(view: &AccountView, candidate: &Integration) -> Result<()> {
    let taken = view.integrations.values().find(|i| {
        i.name != candidate.name
            && i.display_name.to_lowercase() == candidate.display_name.to_lowercase()
    });
    match taken {
        Some(other) => Err(ServiceError::AlreadyExists(format!(
            "display name {:?} is already used by {}",
            candidate.display_name, other.name
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rotation_keeps_previous_secret_for_the_grace_period() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let day = Duration::from_secs(86_400);
        let mut secrets = Vec::new();
        rotate(&mut secrets, Some(Secret::new("a")), t0, t0 + day);
        assert_eq!(
            secrets,
            vec![SigningSecret {
                secret: Secret::new("a"),
                expire_time: None
            }]
        );

        rotate(&mut secrets, Some(Secret::new("a")), t0, t0 + day);
        assert_eq!(secrets.len(), 1, "same secret again changes nothing");

        rotate(&mut secrets, Some(Secret::new("b")), t0, t0 + day);
        assert_eq!(
            secrets,
            vec![
                SigningSecret {
                    secret: Secret::new("b"),
                    expire_time: None
                },
                SigningSecret {
                    secret: Secret::new("a"),
                    expire_time: Some(t0 + day)
                },
            ]
        );

        let t1 = t0 + day + Duration::from_secs(1);
        rotate(&mut secrets, Some(Secret::new("c")), t1, t1 + day);
        assert_eq!(
            secrets,
            vec![
                SigningSecret {
                    secret: Secret::new("c"),
                    expire_time: None
                },
                SigningSecret {
                    secret: Secret::new("b"),
                    expire_time: Some(t1 + day)
                },
            ]
        );

        rotate(&mut secrets, None, t1, t1 + day);
        assert!(secrets.is_empty());
    }

    #[test]
    fn rotating_back_to_a_previous_secret_keeps_one_copy() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let grace = t0 + Duration::from_secs(60);
        let mut secrets = Vec::new();
        rotate(&mut secrets, Some(Secret::new("a")), t0, grace);
        rotate(&mut secrets, Some(Secret::new("b")), t0, grace);
        rotate(&mut secrets, Some(Secret::new("a")), t0, grace);
        let names: Vec<_> = secrets.iter().map(|s| s.secret.expose()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(secrets[0].expire_time, None);
    }
}
