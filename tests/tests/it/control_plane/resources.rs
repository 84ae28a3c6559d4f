//! Integration and scope lifecycles, etags, references and forced deletes, and paging.

use anyhow::Context as _;
use prost_types::FieldMask;
use pushwire_common::pb::v1 as pb;
use pushwire_tests::admin::integration;
use pushwire_tests::control_plane::{Backends, ControlPlane};
use tonic::Code;

use super::{create, create_scope, next_msg, scope};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integration_and_scope_lifecycle() -> anyhow::Result<()> {
    async fn body(cp: &ControlPlane) -> anyhow::Result<()> {
        let mut crm = integration("CRM", "https://crm.example.com/hook");
        crm.auth_header = Some(pb::AuthHeader {
            name: "Authorization".into(),
            value: "Bearer t0k3n".into(),
            value_set: false,
        });
        crm.secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into();
        let created = create(cp, "accounts/42", "crm", crm).await?;
        assert_eq!(created.name, "accounts/42/integrations/crm");
        assert_eq!(created.enabled, Some(true), "enabled by default");
        assert_eq!(
            created.incomplete_participations,
            pb::IncompleteParticipations::Skip as i32
        );
        assert_eq!(
            created.signature_schemes,
            vec![pb::SignatureScheme::Qualifio as i32]
        );
        assert!(created.secret_set && created.secret_fingerprint.starts_with("hmac-sha256:"));
        assert!(created.create_time.is_some() && !created.etag.is_empty());

        let got = cp
            .integrations()
            .await?
            .get_integration(pb::GetIntegrationRequest {
                name: created.name.clone(),
            })
            .await?
            .into_inner();
        assert_eq!(got, created);

        let site = create_scope(
            cp,
            "accounts/42",
            "site-7",
            scope(
                &created.name,
                pb::PushScopeLevel::Website,
                "7",
                pb::PushAction::Push,
            ),
        )
        .await?;
        assert_eq!(
            site.audience,
            pb::Audience::All as i32,
            "audience defaults to ALL"
        );
        create_scope(
            cp,
            "accounts/42",
            "not-99",
            scope(
                &created.name,
                pb::PushScopeLevel::Campaign,
                "99",
                pb::PushAction::DoNotPush,
            ),
        )
        .await?;

        let resolve = |campaign: &str| pb::ResolvePushesRequest {
            account: "accounts/42".into(),
            website_id: "7".into(),
            campaign_id: campaign.into(),
            identified: Some(true),
            ..Default::default()
        };
        let pushes = cp
            .push_scopes()
            .await?
            .resolve_pushes(resolve("1"))
            .await?
            .into_inner()
            .pushes;
        assert_eq!(
            pushes,
            vec![pb::ResolvedPush {
                integration: created.name.clone(),
                decided_by: site.name.clone()
            }]
        );
        let pushes = cp
            .push_scopes()
            .await?
            .resolve_pushes(resolve("0099"))
            .await?
            .into_inner()
            .pushes;
        assert!(pushes.is_empty(), "campaign 99 is excluded: {pushes:?}");

        // Update with a mask: only the URL changes; the etag moves.
        let mut change = integration("", "https://crm.example.com/v2");
        change.name = created.name.clone();
        let updated = cp
            .integrations()
            .await?
            .update_integration(pb::UpdateIntegrationRequest {
                integration: Some(change),
                update_mask: Some(FieldMask {
                    paths: vec!["url".into()],
                }),
            })
            .await?
            .into_inner();
        assert_eq!(updated.url, "https://crm.example.com/v2");
        assert_eq!(updated.display_name, "CRM");
        assert_eq!(updated.secret_fingerprint, created.secret_fingerprint);
        assert_ne!(updated.etag, created.etag);

        // Disable with a reason, then enable: the reason goes.
        let mut off = pb::Integration {
            name: created.name.clone(),
            enabled: Some(false),
            disabled_reason: "410 Gone".into(),
            ..Default::default()
        };
        let disabled = cp
            .integrations()
            .await?
            .update_integration(pb::UpdateIntegrationRequest {
                integration: Some(off.clone()),
                update_mask: None,
            })
            .await?
            .into_inner();
        assert_eq!(
            (disabled.enabled, disabled.disabled_reason.as_str()),
            (Some(false), "410 Gone")
        );
        let pushes = cp
            .push_scopes()
            .await?
            .resolve_pushes(resolve("1"))
            .await?
            .into_inner()
            .pushes;
        assert!(pushes.is_empty(), "disabled integrations do not fire");
        off.enabled = Some(true);
        off.disabled_reason.clear();
        let enabled = cp
            .integrations()
            .await?
            .update_integration(pb::UpdateIntegrationRequest {
                integration: Some(off),
                update_mask: None,
            })
            .await?
            .into_inner();
        assert_eq!(
            (enabled.enabled, enabled.disabled_reason.as_str()),
            (Some(true), "")
        );

        // Scope update: website 7 → account level clears the target.
        let moved = cp
            .push_scopes()
            .await?
            .update_push_scope(pb::UpdatePushScopeRequest {
                push_scope: Some(pb::PushScope {
                    name: site.name.clone(),
                    level: pb::PushScopeLevel::Account.into(),
                    ..Default::default()
                }),
                update_mask: Some(FieldMask {
                    paths: vec!["level".into()],
                }),
            })
            .await?
            .into_inner();
        assert_eq!(
            (moved.level, moved.target_id.as_str()),
            (pb::PushScopeLevel::Account as i32, "")
        );

        let (integrations, scopes) = cp.admin().await?.list_all("accounts/42").await?;
        assert_eq!(integrations.len(), 1);
        assert_eq!(scopes.len(), 2);
        let only_other = cp
            .push_scopes()
            .await?
            .list_push_scopes(pb::ListPushScopesRequest {
                parent: "accounts/42".into(),
                integration: "accounts/42/integrations/other".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        assert!(only_other.push_scopes.is_empty());

        cp.push_scopes()
            .await?
            .delete_push_scope(pb::DeletePushScopeRequest {
                name: site.name.clone(),
                etag: String::new(),
            })
            .await?;
        let err = cp
            .push_scopes()
            .await?
            .get_push_scope(pb::GetPushScopeRequest { name: site.name })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        Ok(())
    }
    on_both_backends!(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etags_references_and_forced_deletes() -> anyhow::Result<()> {
    async fn body(cp: &ControlPlane) -> anyhow::Result<()> {
        let crm = create(
            cp,
            "accounts/42",
            "crm",
            integration("CRM", "https://crm.example.com/hook"),
        )
        .await?;
        let mut stale = pb::Integration {
            name: crm.name.clone(),
            display_name: "CRM 2".into(),
            etag: crm.etag.clone(),
            ..Default::default()
        };
        let fresh = cp
            .integrations()
            .await?
            .update_integration(pb::UpdateIntegrationRequest {
                integration: Some(stale.clone()),
                update_mask: None,
            })
            .await?
            .into_inner();
        stale.display_name = "CRM 3".into();
        let err = cp
            .integrations()
            .await?
            .update_integration(pb::UpdateIntegrationRequest {
                integration: Some(stale),
                update_mask: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Aborted, "{err:?}");
        let err = cp
            .integrations()
            .await?
            .delete_integration(pb::DeleteIntegrationRequest {
                name: crm.name.clone(),
                etag: crm.etag.clone(),
                force: false,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Aborted);

        let mut written = 0;
        for (id, level, target) in [
            ("a", pb::PushScopeLevel::Account, ""),
            ("w", pb::PushScopeLevel::Website, "7"),
            ("c", pb::PushScopeLevel::Campaign, "9"),
        ] {
            let created = create_scope(
                cp,
                "accounts/42",
                id,
                scope(&crm.name, level, target, pb::PushAction::Push),
            )
            .await?;
            written = created.etag.parse::<i64>()?;
        }
        let err = create_scope(
            cp,
            "accounts/42",
            "twin",
            scope(
                &crm.name,
                pb::PushScopeLevel::Website,
                "007",
                pb::PushAction::DoNotPush,
            ),
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.downcast_ref::<tonic::Status>()
                .context("status")?
                .code(),
            Code::AlreadyExists,
            "same rule as scope w"
        );

        let err = cp
            .integrations()
            .await?
            .delete_integration(pb::DeleteIntegrationRequest {
                name: crm.name.clone(),
                etag: String::new(),
                force: false,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("3 push scope"), "{}", err.message());

        // Forced: the integration and its three scopes go in one revision. The watch first
        // catches up with every write above (the feed may serve a snapshot from just before
        // the last of them), so the delete is the only revision pending after it.
        let mut watch = cp.watch(0).await?;
        let mut revision = next_msg(&mut watch).await?.revision;
        while revision < written {
            revision = next_msg(&mut watch).await?.revision;
        }
        cp.integrations()
            .await?
            .delete_integration(pb::DeleteIntegrationRequest {
                name: crm.name.clone(),
                etag: fresh.etag,
                force: true,
            })
            .await?;
        // (Skipping a progress message, should one come meanwhile.)
        let deleted = loop {
            let msg = next_msg(&mut watch).await?;
            if !msg.changes.is_empty() {
                break msg;
            }
        };
        assert_eq!(deleted.revision, revision + 1);
        let mut kinds: Vec<String> = deleted
            .changes
            .iter()
            .map(|c| match c.change.as_ref() {
                Some(pb::config_change::Change::DeleteIntegration(n))
                | Some(pb::config_change::Change::DeletePushScope(n)) => n.clone(),
                other => format!("unexpected {other:?}"),
            })
            .collect();
        kinds.sort();
        assert_eq!(
            kinds,
            [
                "accounts/42/integrations/crm",
                "accounts/42/pushScopes/a",
                "accounts/42/pushScopes/c",
                "accounts/42/pushScopes/w"
            ]
        );
        assert_eq!(
            cp.admin().await?.list_all("accounts/42").await?,
            (vec![], vec![])
        );
        Ok(())
    }
    on_both_backends!(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_through_everything() -> anyhow::Result<()> {
    async fn body(cp: &ControlPlane) -> anyhow::Result<()> {
        for n in 0..7 {
            create(
                cp,
                "accounts/5",
                &format!("i{n}"),
                integration(&format!("I{n}"), "https://a.example.com/"),
            )
            .await?;
        }
        let mut names = Vec::new();
        let mut token = String::new();
        loop {
            let page = cp
                .integrations()
                .await?
                .list_integrations(pb::ListIntegrationsRequest {
                    parent: "accounts/5".into(),
                    page_size: 3,
                    page_token: token,
                })
                .await?
                .into_inner();
            assert!(page.integrations.len() <= 3);
            names.extend(page.integrations.into_iter().map(|i| i.name));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        let expected: Vec<_> = (0..7)
            .map(|n| format!("accounts/5/integrations/i{n}"))
            .collect();
        assert_eq!(names, expected);
        let err = cp
            .integrations()
            .await?
            .list_integrations(pb::ListIntegrationsRequest {
                parent: "accounts/5".into(),
                page_size: 3,
                page_token: "garbage!".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        Ok(())
    }
    on_both_backends!(body)
}
