//! Bulk import of one account's configuration: integrations and push scopes created by the
//! same rules as `CreateIntegration` and `CreatePushScope` (validation, defaults, encryption,
//! per-account limits, unique display names, scopes only for integrations of the account),
//! against the account as read once, and committed in ONE guarded transaction. It is how large
//! configurations are loaded (the `scale` benchmark loads 3 million objects this way): a create
//! costs a read and a durable commit each, an import one of each per account.

use std::collections::BTreeMap;
use std::time::SystemTime;

use pushwire_common::domain::convert::InvalidField;
use pushwire_common::domain::{
    AccountName, Integration, IntegrationName, PushScope, PushScopeName,
};

use super::push_scopes::Draft;
use super::{Attempt, Catalog, IntegrationPatch, PushScopePatch, Result};
use crate::store::records;
use crate::store::{Compare, MAX_TXN_OPS, Op, Txn, keys};

/// Most objects (integrations and push scopes together) one import may create: one write
/// each, and one guard each beside the account's, in a transaction of at most
/// [`MAX_TXN_OPS`] writes and guards.
pub const MAX_IMPORT_OBJECTS: usize = MAX_TXN_OPS - 1;

/// What [`Catalog::import_account`] created, as the creates would have returned it.
#[derive(Debug)]
pub struct Imported {
    /// The store revision of the transaction: every created resource's etag.
    pub revision: i64,
    /// The integrations, in the order given.
    pub integrations: Vec<Integration>,
    /// The push scopes, in the order given.
    pub push_scopes: Vec<PushScope>,
}

impl Catalog {
    /// Creates `integrations` and then `push_scopes` (each with its id) in `account`, all or
    /// none, in one transaction. Each is checked as its create would check it, in the order
    /// given, against the account as read plus what the import created before it; the first
    /// refusal ends the call with the error that create would have returned (an id that
    /// exists, in the account or earlier in the import, is ALREADY_EXISTS). A scope may name an
    /// integration of the import or one that exists. The transaction is guarded by the
    /// account's prefix (and the revision of every existing integration a scope names), so a
    /// concurrent change in the account makes it read and check again, as creates do.
    ///
    /// At most [`MAX_IMPORT_OBJECTS`] objects per call (INVALID_ARGUMENT beyond: split the
    /// account's configuration, or create the rest one by one); none is refused too.
    pub async fn import_account(
        &self,
        account: &AccountName,
        integrations: Vec<(String, IntegrationPatch)>,
        push_scopes: Vec<(String, PushScopePatch)>,
    ) -> Result<Imported> {
        let objects = integrations.len() + push_scopes.len();
        if objects == 0 {
            return Err(InvalidField::new("import", "nothing to import").into());
        }
        if objects > MAX_IMPORT_OBJECTS {
            return Err(too_many(objects));
        }
        // Validation and defaults as the creates do them, before anything is read.
        let now = SystemTime::now();
        let mut new_integrations = Vec::with_capacity(integrations.len());
        for (id, patch) in integrations {
            let name = IntegrationName::new(account, &id)
                .map_err(|e| InvalidField::new("integration_id", e.to_string()))?;
            let mut integration = Integration::new(name, now);
            self.apply(&mut integration, patch, now)?;
            new_integrations.push(integration);
        }
        let mut new_scopes = Vec::with_capacity(push_scopes.len());
        for (id, patch) in push_scopes {
            let name = PushScopeName::new(account, &id)
                .map_err(|e| InvalidField::new("push_scope_id", e.to_string()))?;
            let (integration, target, audience, action) = Draft::new().apply(account, patch)?;
            new_scopes.push(PushScope {
                name,
                integration,
                target,
                audience,
                action,
                create_time: now,
                update_time: now,
                revision: 0,
            });
        }
        // Encrypted once: the values do not depend on what is read.
        let puts: Vec<Op> = new_integrations
            .iter()
            .map(|i| Op::Put {
                key: records::integration_key(&i.name),
                value: records::encode_integration(i, &self.keys),
            })
            .chain(new_scopes.iter().map(|s| Op::Put {
                key: records::push_scope_key(&s.name),
                value: records::encode_push_scope(s),
            }))
            .collect();
        let ((), revision) = self
            .transact(
                move || self.view(account),
                |mut view| {
                    let mut compares: Vec<Compare> = Vec::with_capacity(objects + 1);
                    for integration in &new_integrations {
                        self.check_new_integration(&view, integration)?;
                        compares.push(Compare::Absent(records::integration_key(&integration.name)));
                        view.integrations
                            .insert(integration.name.id().to_owned(), integration.clone());
                    }
                    // Existing integrations the scopes name, by key: their revisions are
                    // guarded, since the prefix guard does not see a deletion.
                    let mut named = BTreeMap::new();
                    for scope in &new_scopes {
                        let integration_rev = self.check_new_scope(&view, scope)?;
                        if integration_rev != 0 {
                            named.insert(
                                records::integration_key(&scope.integration),
                                integration_rev,
                            );
                        }
                        compares.push(Compare::Absent(records::push_scope_key(&scope.name)));
                        view.scopes
                            .insert(scope.name.id().to_owned(), scope.clone());
                    }
                    compares.extend(
                        named
                            .into_iter()
                            .map(|(key, rev)| Compare::ModRevision(key, rev)),
                    );
                    compares.push(Compare::PrefixUnchangedSince {
                        prefix: keys::account_prefix(account.id()),
                        revision: view.revision,
                    });
                    if compares.len() > MAX_TXN_OPS {
                        return Err(too_many(objects));
                    }
                    let txn = Txn {
                        compares,
                        ops: puts.clone(),
                    };
                    Ok(Attempt::Commit { txn, value: () })
                },
            )
            .await?;
        for integration in &mut new_integrations {
            integration.revision = revision;
        }
        for scope in &mut new_scopes {
            scope.revision = revision;
        }
        Ok(Imported {
            revision,
            integrations: new_integrations,
            push_scopes: new_scopes,
        })
    }
}

fn too_many(objects: usize) -> super::ServiceError {
    InvalidField::new(
        "import",
        format!(
            "{objects} objects (or guards), at most {MAX_IMPORT_OBJECTS} per import: split the \
             account's configuration, or create the rest one by one"
        ),
    )
    .into()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use pushwire_common::domain::convert::Level;
    use pushwire_common::domain::{Audience, PushAction, Secret};

    use super::*;
    use crate::crypto::Keyring;
    use crate::service::{AuthHeaderInput, CatalogOptions, PageRequest};
    use crate::store::EmbeddedStore;

    /// A catalog over a fresh embedded store, with these per-account limits.
    fn catalog(max_integrations: usize, max_scopes: usize) -> (tempfile::TempDir, Catalog) {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
        let keys =
            Keyring::parse("k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "test").unwrap();
        let opts = CatalogOptions {
            max_integrations_per_account: max_integrations,
            max_push_scopes_per_account: max_scopes,
            ..CatalogOptions::default()
        };
        (dir, Catalog::new(Arc::new(store), Arc::new(keys), opts))
    }

    fn account() -> AccountName {
        AccountName::from_id("42").unwrap()
    }

    fn integration(display_name: &str, url: &str) -> IntegrationPatch {
        IntegrationPatch {
            display_name: Some(display_name.into()),
            url: Some(url.into()),
            auth_header: Some(Some(AuthHeaderInput {
                name: "Authorization".into(),
                value: Secret::new("Bearer t0k3n"),
            })),
            secret: Some(Some(Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"))),
            ..IntegrationPatch::default()
        }
    }

    fn scope(integration: &str, level: Level, target: &str, action: PushAction) -> PushScopePatch {
        PushScopePatch {
            integration: Some(format!("accounts/42/integrations/{integration}")),
            level: Some(level),
            target_id: (!target.is_empty()).then(|| target.to_owned()),
            audience: Some(Audience::Identified),
            action: Some(action),
        }
    }

    /// The same integrations and scopes created one call at a time, stopping at the first
    /// refusal.
    async fn create_each(
        catalog: &Catalog,
        integrations: &[(String, IntegrationPatch)],
        scopes: &[(String, PushScopePatch)],
    ) -> Result<()> {
        for (id, patch) in integrations {
            catalog
                .create_integration(&account(), Some(id), patch.clone())
                .await?;
        }
        for (id, patch) in scopes {
            catalog
                .create_push_scope(&account(), Some(id), patch.clone())
                .await?;
        }
        Ok(())
    }

    /// Everything in the account, without revisions and times (which differ between two
    /// stores).
    async fn contents(catalog: &Catalog) -> (Vec<Integration>, Vec<PushScope>) {
        let page = PageRequest {
            size: 1000,
            token: String::new(),
        };
        let epoch = SystemTime::UNIX_EPOCH;
        let integrations = catalog
            .list_integrations(&account(), &page)
            .await
            .unwrap()
            .value
            .items
            .into_iter()
            .map(|i| Integration {
                revision: 0,
                create_time: epoch,
                update_time: epoch,
                ..i
            })
            .collect();
        let scopes = catalog
            .list_push_scopes(&account(), None, &page)
            .await
            .unwrap()
            .value
            .items
            .into_iter()
            .map(|s| PushScope {
                revision: 0,
                create_time: epoch,
                update_time: epoch,
                ..s
            })
            .collect();
        (integrations, scopes)
    }

    fn ids<T>(items: Vec<(&str, T)>) -> Vec<(String, T)> {
        items
            .into_iter()
            .map(|(id, t)| (id.to_owned(), t))
            .collect()
    }

    #[tokio::test]
    async fn an_import_stores_what_the_creates_store() {
        let integrations = ids(vec![
            (
                "crm",
                integration("CRM", "https://crm.example.com/hooks/pushwire"),
            ),
            (
                "mail",
                integration("Mailing", "https://mail.example.net/in"),
            ),
        ]);
        let scopes = ids(vec![
            ("all", scope("crm", Level::Account, "", PushAction::Push)),
            (
                "site",
                scope("mail", Level::Website, "site-7", PushAction::Push),
            ),
            (
                "not-c9",
                scope("crm", Level::Campaign, "c9", PushAction::DoNotPush),
            ),
        ]);
        let (_a, created) = catalog(10, 10);
        create_each(&created, &integrations, &scopes).await.unwrap();
        let (_b, imported) = catalog(10, 10);
        let result = imported
            .import_account(&account(), integrations, scopes)
            .await
            .unwrap();

        let expected = contents(&created).await;
        assert_eq!(expected.0.len(), 2);
        assert_eq!(expected.1.len(), 3);
        assert_eq!(contents(&imported).await, expected);
        // One transaction: every resource has its revision, as returned.
        let stored = imported
            .get_integration(&result.integrations[0].name)
            .await
            .unwrap()
            .value;
        assert_eq!(stored.revision, result.revision);
        assert_eq!(stored, result.integrations[0]);
        assert!(
            result
                .push_scopes
                .iter()
                .all(|s| s.revision == result.revision)
        );
        // The same secret under the same key: the same fingerprint as the created one's.
        let fingerprint = imported.secret_fingerprint(&stored);
        assert!(fingerprint.is_some());
        assert_eq!(
            fingerprint,
            created.secret_fingerprint(&contents(&created).await.0[0])
        );
    }

    /// Each case: what is there first, then what is imported (or created one by one); the
    /// import must fail with the error the creates fail with, and store nothing.
    #[tokio::test]
    async fn an_import_refuses_what_the_creates_refuse() {
        type Case = (
            &'static str,
            Vec<(String, IntegrationPatch)>,
            Vec<(String, PushScopePatch)>,
        );
        let ok = || integration("CRM", "https://crm.example.com/hook");
        let cases: Vec<Case> = vec![
            (
                "a URL that is not https",
                ids(vec![(
                    "crm",
                    integration("CRM", "http://crm.example.com/hook"),
                )]),
                vec![],
            ),
            (
                "a URL to a private address",
                ids(vec![("crm", integration("CRM", "https://10.1.2.3/hook"))]),
                vec![],
            ),
            ("a bad id", ids(vec![("Not An Id!", ok())]), vec![]),
            ("an id that exists", ids(vec![("existing", ok())]), vec![]),
            (
                "an id twice in the import",
                ids(vec![
                    ("crm", ok()),
                    ("crm", integration("Other", "https://o.example.com/")),
                ]),
                vec![],
            ),
            (
                "a display name that is taken (case aside)",
                ids(vec![(
                    "crm",
                    integration("existing CRM", "https://c.example.com/"),
                )]),
                vec![],
            ),
            (
                "a display name twice in the import",
                ids(vec![
                    ("crm", ok()),
                    ("crm2", integration("crm", "https://c.example.com/")),
                ]),
                vec![],
            ),
            (
                "more integrations than the account may have",
                ids(vec![
                    ("a", integration("A", "https://a.example.com/")),
                    ("b", integration("B", "https://b.example.com/")),
                    ("c", integration("C", "https://c.example.com/")),
                ]),
                vec![],
            ),
            (
                "a scope for a missing integration",
                ids(vec![("crm", ok())]),
                ids(vec![(
                    "s",
                    scope("missing", Level::Account, "", PushAction::Push),
                )]),
            ),
            (
                "a scope for another account's integration",
                vec![],
                ids(vec![(
                    "s",
                    PushScopePatch {
                        integration: Some("accounts/7/integrations/crm".into()),
                        ..scope("crm", Level::Account, "", PushAction::Push)
                    },
                )]),
            ),
            (
                "a scope without a target at the campaign level",
                ids(vec![("crm", ok())]),
                ids(vec![(
                    "s",
                    scope("crm", Level::Campaign, "", PushAction::Push),
                )]),
            ),
            (
                "the same rule twice",
                ids(vec![("crm", ok())]),
                ids(vec![
                    ("s1", scope("crm", Level::Website, "w1", PushAction::Push)),
                    (
                        "s2",
                        scope("crm", Level::Website, "w1", PushAction::DoNotPush),
                    ),
                ]),
            ),
            (
                "more push scopes than the account may have",
                ids(vec![("crm", ok())]),
                ids(vec![
                    ("s1", scope("crm", Level::Website, "w1", PushAction::Push)),
                    ("s2", scope("crm", Level::Website, "w2", PushAction::Push)),
                    (
                        "s3",
                        scope("existing", Level::Website, "w3", PushAction::Push),
                    ),
                ]),
            ),
        ];
        for (what, integrations, scopes) in cases {
            // Two integrations and one scope allowed; one of each is there already.
            let setup = |c: Catalog| async move {
                c.create_integration(
                    &account(),
                    Some("existing"),
                    integration("Existing CRM", "https://existing.example.com/"),
                )
                .await
                .unwrap();
                c.create_push_scope(
                    &account(),
                    Some("existing-all"),
                    scope("existing", Level::Account, "", PushAction::Push),
                )
                .await
                .unwrap();
                c
            };
            let (_a, created) = catalog(3, 3);
            let created = setup(created).await;
            let (_b, imported) = catalog(3, 3);
            let imported = setup(imported).await;
            let before = contents(&imported).await;

            let by_creates = create_each(&created, &integrations, &scopes)
                .await
                .expect_err(what);
            let by_import = imported
                .import_account(&account(), integrations, scopes)
                .await
                .expect_err(what);
            assert_eq!(
                format!("{by_import:?}"),
                format!("{by_creates:?}"),
                "{what}"
            );
            assert_eq!(contents(&imported).await, before, "{what}: nothing stored");
        }
    }

    #[tokio::test]
    async fn an_import_fits_one_transaction() {
        let (_dir, c) = catalog(1000, 1000);
        let many = |n: usize| {
            (0..n)
                .map(|i| {
                    let id = format!("i{i}");
                    let patch = integration(&id, &format!("https://{id}.example.com/"));
                    (id, patch)
                })
                .collect::<Vec<_>>()
        };
        let err = c
            .import_account(&account(), many(MAX_IMPORT_OBJECTS + 1), vec![])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, crate::service::ServiceError::InvalidArgument(e) if e.to_string().contains("at most 127")),
            "{err:?}"
        );
        let err = c
            .import_account(&account(), vec![], vec![])
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            crate::service::ServiceError::InvalidArgument(_)
        ));
        let done = c
            .import_account(&account(), many(MAX_IMPORT_OBJECTS), vec![])
            .await
            .unwrap();
        assert_eq!(done.integrations.len(), MAX_IMPORT_OBJECTS);
        assert_eq!(contents(&c).await.0.len(), MAX_IMPORT_OBJECTS);
    }

    #[tokio::test]
    async fn a_scope_may_name_an_existing_integration_and_secrets_are_encrypted() {
        let (_dir, c) = catalog(10, 10);
        c.create_integration(
            &account(),
            Some("crm"),
            integration("CRM", "https://c.example.com/"),
        )
        .await
        .unwrap();
        let done = c
            .import_account(
                &account(),
                ids(vec![(
                    "mail",
                    integration("Mail", "https://m.example.com/"),
                )]),
                ids(vec![
                    ("on-crm", scope("crm", Level::Account, "", PushAction::Push)),
                    (
                        "on-mail",
                        scope("mail", Level::Account, "", PushAction::Push),
                    ),
                ]),
            )
            .await
            .unwrap();
        assert_eq!(done.push_scopes.len(), 2);
        let range = c.store().range(&keys::account_prefix("42")).await.unwrap();
        assert_eq!(range.kvs.len(), 4);
        for kv in &range.kvs {
            let raw = String::from_utf8_lossy(&kv.value);
            assert!(
                !raw.contains("t0k3n") && !raw.contains("whsec_"),
                "{}",
                kv.key
            );
        }
    }
}
