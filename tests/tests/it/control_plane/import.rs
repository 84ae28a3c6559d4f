//! The bulk path (`Catalog::import_account`, through `open_catalog` as the `scale` benchmark
//! uses it): what it stores reads back through the API as the same resources created through
//! the API do, on both stores, and a refused import stores nothing.

use anyhow::Context as _;
use pushwire_common::domain::AccountName;
use pushwire_common::pb::v1 as pb;
use pushwire_control_plane::api::{integration_create_patch, push_scope_create_patch};
use pushwire_tests::admin::integration;
use pushwire_tests::control_plane::{Backends, ControlPlane, test_config};

use super::scope;

/// Integrations and push scopes by id.
type Configuration = (Vec<(String, pb::Integration)>, Vec<(String, pb::PushScope)>);

/// The integrations and push scopes of the test, in `account`: ids and messages as an admin
/// would send them.
fn configuration(account: &str) -> Configuration {
    let mut crm = integration("CRM", "https://crm.example.com/hooks/pushwire?tenant=42");
    crm.auth_header = Some(pb::AuthHeader {
        name: "Authorization".into(),
        value: "Bearer t0k3n-imported".into(),
        value_set: false,
    });
    crm.secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into();
    crm.signature_schemes = vec![
        pb::SignatureScheme::Qualifio.into(),
        pb::SignatureScheme::StandardWebhooks.into(),
    ];
    let mut mail = integration("Mailing", "https://mail.example.net/in");
    mail.enabled = Some(false);
    mail.disabled_reason = "paused by the customer".into();
    mail.incomplete_participations = pb::IncompleteParticipations::Send.into();
    let crm_name = format!("{account}/integrations/crm");
    let mail_name = format!("{account}/integrations/mail");
    let mut identified = scope(
        &mail_name,
        pb::PushScopeLevel::Website,
        "site-7",
        pb::PushAction::Push,
    );
    identified.audience = pb::Audience::Identified.into();
    (
        vec![("crm".into(), crm), ("mail".into(), mail)],
        vec![
            (
                "all".into(),
                scope(
                    &crm_name,
                    pb::PushScopeLevel::Account,
                    "",
                    pb::PushAction::Push,
                ),
            ),
            ("site".into(), identified),
            (
                "not-c9".into(),
                scope(
                    &crm_name,
                    pb::PushScopeLevel::Campaign,
                    "c9",
                    pb::PushAction::DoNotPush,
                ),
            ),
        ],
    )
}

/// What a read shows, less what differs between two creations of the same thing (times,
/// etags), with the account renamed.
fn normalised(
    (integrations, scopes): (Vec<pb::Integration>, Vec<pb::PushScope>),
    account: &str,
) -> (Vec<pb::Integration>, Vec<pb::PushScope>) {
    let rename = |s: &str| s.replacen(account, "accounts/any", 1);
    let integrations = integrations
        .into_iter()
        .map(|i| pb::Integration {
            name: rename(&i.name),
            create_time: None,
            update_time: None,
            etag: String::new(),
            ..i
        })
        .collect();
    let scopes = scopes
        .into_iter()
        .map(|s| pb::PushScope {
            name: rename(&s.name),
            integration: rename(&s.integration),
            create_time: None,
            update_time: None,
            etag: String::new(),
            ..s
        })
        .collect();
    (integrations, scopes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_configuration_reads_back_as_created_one() -> anyhow::Result<()> {
    let backends = Backends::start()?;
    for backend in backends.all() {
        let config = test_config(&backend);
        // Through the API, one call at a time.
        let cp = ControlPlane::start(config.clone()).await?;
        let admin = cp.admin().await?;
        let (integrations, scopes) = configuration("accounts/1");
        for (id, i) in integrations {
            admin.create_integration("accounts/1", &id, i).await?;
        }
        for (id, s) in scopes {
            admin.create_scope("accounts/1", &id, s).await?;
        }
        let created = admin.list_all("accounts/1").await?;
        // The embedded store is one process's at a time.
        cp.stop().await?;

        let catalog = pushwire_control_plane::open_catalog(&config)
            .await
            .with_context(|| format!("opening the catalog on {backend:?}"))?;
        let account = AccountName::from_id("2")?;
        let (integrations, scopes) = configuration("accounts/2");
        let integrations = integrations
            .into_iter()
            .map(|(id, i)| Ok((id, integration_create_patch(i)?)))
            .collect::<Result<Vec<_>, tonic::Status>>()?;
        let scopes = scopes
            .into_iter()
            .map(|(id, s)| Ok((id, push_scope_create_patch(s)?)))
            .collect::<Result<Vec<_>, tonic::Status>>()?;
        // A refused import (the last scope names a missing integration) stores nothing.
        let mut bad = scopes.clone();
        bad[2].1.integration = Some("accounts/2/integrations/missing".into());
        let refused = catalog
            .import_account(&account, integrations.clone(), bad)
            .await
            .expect_err("a scope for a missing integration");
        assert!(refused.to_string().contains("does not exist"), "{refused}");
        let imported = catalog
            .import_account(&account, integrations, scopes)
            .await?;
        drop(catalog);

        let cp = ControlPlane::start(config).await?;
        let admin = cp.admin().await?;
        let read = admin.list_all("accounts/2").await?;
        assert_eq!(read.0.len(), 2, "on {backend:?}");
        assert_eq!(read.1.len(), 3, "on {backend:?}");
        let etag = imported.revision.to_string();
        assert!(
            read.0.iter().all(|i| i.etag == etag) && read.1.iter().all(|s| s.etag == etag),
            "one transaction, revision {etag}, on {backend:?}: {read:?}"
        );
        assert_eq!(
            normalised(read, "accounts/2"),
            normalised(created, "accounts/1"),
            "on {backend:?}"
        );
        // Resolved as the created ones are.
        let resolve = |account: &str| pb::ResolvePushesRequest {
            account: account.into(),
            website_id: "site-7".into(),
            campaign_id: "c1".into(),
            identified: Some(true),
            ..Default::default()
        };
        let names = |set: std::collections::BTreeSet<String>| {
            set.into_iter()
                .map(|n| n.replacen("accounts/2", "accounts/1", 1))
                .collect::<Vec<_>>()
        };
        let fired = names(admin.resolve(resolve("accounts/2")).await?);
        assert_eq!(fired, ["accounts/1/integrations/crm"]);
        assert_eq!(fired, names(admin.resolve(resolve("accounts/1")).await?));
        cp.stop().await?;
    }
    Ok(())
}
