//! End-to-end tests of the control plane's gRPC API through real tonic clients, each run
//! against both stores: the embedded one and a real etcd.

use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use prost_types::FieldMask;
use pushwire_common::pb::v1 as pb;
use pushwire_tests::admin::integration;
use pushwire_tests::control_plane::{Backend, Backends, ControlPlane, test_config};
use tonic::Code;

const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The next WatchConfig message, failing (not hanging) when none comes within READ_TIMEOUT.
async fn next_msg(
    stream: &mut tonic::Streaming<pb::WatchConfigResponse>,
) -> anyhow::Result<pb::WatchConfigResponse> {
    Ok(tokio::time::timeout(READ_TIMEOUT, stream.next())
        .await?
        .context("stream ended")??)
}

async fn create(
    cp: &ControlPlane,
    account: &str,
    id: &str,
    i: pb::Integration,
) -> anyhow::Result<pb::Integration> {
    Ok(cp.admin().await?.create_integration(account, id, i).await?)
}

fn scope(
    integration: &str,
    level: pb::PushScopeLevel,
    target: &str,
    action: pb::PushAction,
) -> pb::PushScope {
    pb::PushScope {
        integration: integration.into(),
        level: level.into(),
        target_id: target.into(),
        action: action.into(),
        ..Default::default()
    }
}

async fn create_scope(
    cp: &ControlPlane,
    account: &str,
    id: &str,
    s: pb::PushScope,
) -> anyhow::Result<pb::PushScope> {
    Ok(cp.admin().await?.create_scope(account, id, s).await?)
}

/// Runs `body` against a fresh control plane on each backend.
macro_rules! on_both_backends {
    ($body:ident) => {{
        let backends = Backends::start()?;
        for backend in backends.all() {
            let cp = ControlPlane::on(&backend).await?;
            $body(&cp)
                .await
                .with_context(|| format!("on {backend:?}"))?;
            cp.stop().await?;
        }
        Ok(())
    }};
}

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
        assert!(created.secret_set && created.secret_fingerprint.starts_with("sha256:"));
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
async fn bad_input_is_refused_and_changes_nothing() -> anyhow::Result<()> {
    async fn body(cp: &ControlPlane) -> anyhow::Result<()> {
        let ok = create(
            cp,
            "accounts/42",
            "crm",
            integration("CRM", "https://crm.example.com/hook"),
        )
        .await?;
        create(
            cp,
            "accounts/7",
            "theirs",
            integration("Theirs", "https://theirs.example.com/"),
        )
        .await?;
        let before = cp.admin().await?.list_all("accounts/42").await?;

        let with = |f: &dyn Fn(&mut pb::Integration)| {
            let mut i = integration("New", "https://new.example.com/");
            f(&mut i);
            i
        };
        let header = |value: &str| {
            Some(pb::AuthHeader {
                name: "Authorization".into(),
                value: value.into(),
                value_set: false,
            })
        };
        let cases: Vec<(&str, pb::Integration, Code, &str)> = vec![
            (
                "unknown enum",
                with(&|i| i.incomplete_participations = 42),
                Code::InvalidArgument,
                "integration.incomplete_participations",
            ),
            (
                "unknown scheme",
                with(&|i| i.signature_schemes = vec![7]),
                Code::InvalidArgument,
                "integration.signature_schemes[0]",
            ),
            (
                "empty url",
                with(&|i| i.url.clear()),
                Code::InvalidArgument,
                "integration.url",
            ),
            (
                "ftp url",
                with(&|i| i.url = "ftp://files.example.com/".into()),
                Code::InvalidArgument,
                "integration.url",
            ),
            (
                "relative url",
                with(&|i| i.url = "/hook".into()),
                Code::InvalidArgument,
                "integration.url",
            ),
            (
                "header CR/LF",
                with(&|i| i.auth_header = header("Bearer x\r\nX-Evil: 1")),
                Code::InvalidArgument,
                "integration.auth_header.value",
            ),
            (
                "reserved header",
                with(&|i| {
                    i.auth_header = Some(pb::AuthHeader {
                        name: "Content-Type".into(),
                        value: "x".into(),
                        value_set: false,
                    })
                }),
                Code::InvalidArgument,
                "integration.auth_header.name",
            ),
            (
                "long display name",
                with(&|i| i.display_name = "x".repeat(101)),
                Code::InvalidArgument,
                "integration.display_name",
            ),
            (
                "duplicate display name",
                with(&|i| i.display_name = "crm".into()),
                Code::AlreadyExists,
                "display name",
            ),
        ];
        for (what, i, code, needle) in cases {
            let err = create(cp, "accounts/42", "", i).await.unwrap_err();
            let status = err
                .downcast_ref::<tonic::Status>()
                .with_context(|| format!("{what}: {err}"))?;
            assert_eq!(status.code(), code, "{what}: {status:?}");
            assert!(
                status.message().contains(needle),
                "{what}: {:?} lacks {needle:?}",
                status.message()
            );
            assert!(
                !status.message().contains("X-Evil"),
                "{what}: secret echoed"
            );
        }

        // A 10 MB display name never reaches the service: the message is too large.
        let err = create(
            cp,
            "accounts/42",
            "huge",
            integration(&"x".repeat(10 << 20), "https://x.example.com/"),
        )
        .await
        .unwrap_err();
        let status = err.downcast_ref::<tonic::Status>().context("status")?;
        assert!(
            matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange),
            "{status:?}"
        );

        // Bad ids and names.
        let err = create(
            cp,
            "accounts/42",
            "Not_An_Id",
            integration("Other", "https://o.example.com/"),
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.downcast_ref::<tonic::Status>()
                .context("status")?
                .code(),
            Code::InvalidArgument
        );
        let err = create(
            cp,
            "accounts/42",
            "crm",
            integration("Other", "https://o.example.com/"),
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.downcast_ref::<tonic::Status>()
                .context("status")?
                .code(),
            Code::AlreadyExists
        );

        // Scopes: another account's integration, a missing one, no level, a target on ACCOUNT.
        let scope_cases = vec![
            (
                "other account",
                scope(
                    "accounts/7/integrations/theirs",
                    pb::PushScopeLevel::Account,
                    "",
                    pb::PushAction::Push,
                ),
                Code::InvalidArgument,
                "must be an integration of accounts/42",
            ),
            (
                "missing integration",
                scope(
                    "accounts/42/integrations/ghost",
                    pb::PushScopeLevel::Account,
                    "",
                    pb::PushAction::Push,
                ),
                Code::FailedPrecondition,
                "does not exist",
            ),
            (
                "no level",
                scope(
                    &ok.name,
                    pb::PushScopeLevel::Unspecified,
                    "",
                    pb::PushAction::Push,
                ),
                Code::InvalidArgument,
                "push_scope.level",
            ),
            (
                "unknown level",
                pb::PushScope {
                    level: 12,
                    ..scope(
                        &ok.name,
                        pb::PushScopeLevel::Account,
                        "",
                        pb::PushAction::Push,
                    )
                },
                Code::InvalidArgument,
                "push_scope.level",
            ),
            (
                "target on account",
                scope(
                    &ok.name,
                    pb::PushScopeLevel::Account,
                    "7",
                    pb::PushAction::Push,
                ),
                Code::InvalidArgument,
                "push_scope.target_id",
            ),
            (
                "website without target",
                scope(
                    &ok.name,
                    pb::PushScopeLevel::Website,
                    "",
                    pb::PushAction::Push,
                ),
                Code::InvalidArgument,
                "push_scope.target_id",
            ),
        ];
        for (what, s, code, needle) in scope_cases {
            let err = create_scope(cp, "accounts/42", "", s).await.unwrap_err();
            let status = err
                .downcast_ref::<tonic::Status>()
                .with_context(|| format!("{what}: {err}"))?;
            assert_eq!(status.code(), code, "{what}: {status:?}");
            assert!(
                status.message().contains(needle),
                "{what}: {:?} lacks {needle:?}",
                status.message()
            );
        }

        // Updates: unknown mask path, and a bad value with an explicit mask.
        let err = cp
            .integrations()
            .await?
            .update_integration(pb::UpdateIntegrationRequest {
                integration: Some(pb::Integration {
                    name: ok.name.clone(),
                    ..Default::default()
                }),
                update_mask: Some(FieldMask {
                    paths: vec!["create_time".into()],
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        let err = cp
            .integrations()
            .await?
            .update_integration(pb::UpdateIntegrationRequest {
                integration: Some(pb::Integration {
                    name: ok.name.clone(),
                    ..Default::default()
                }),
                update_mask: Some(FieldMask {
                    paths: vec!["url".into()],
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

        let resolve_err = cp
            .push_scopes()
            .await?
            .resolve_pushes(pb::ResolvePushesRequest {
                account: "accounts/42".into(),
                campaign_id: "1".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(
            resolve_err.message().contains("identified"),
            "{resolve_err:?}"
        );

        assert_eq!(
            cp.admin().await?.list_all("accounts/42").await?,
            before,
            "nothing changed"
        );
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

        for (id, level, target) in [
            ("a", pb::PushScopeLevel::Account, ""),
            ("w", pb::PushScopeLevel::Website, "7"),
            ("c", pb::PushScopeLevel::Campaign, "9"),
        ] {
            create_scope(
                cp,
                "accounts/42",
                id,
                scope(&crm.name, level, target, pb::PushAction::Push),
            )
            .await?;
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

        // Forced: the integration and its three scopes go in one revision.
        let mut watch = cp
            .config()
            .await?
            .watch_config(pb::WatchConfigRequest { from_revision: 0 })
            .await?
            .into_inner();
        let mut revision = next_msg(&mut watch).await?.revision;
        cp.integrations()
            .await?
            .delete_integration(pb::DeleteIntegrationRequest {
                name: crm.name.clone(),
                etag: fresh.etag,
                force: true,
            })
            .await?;
        // The feed may have served a snapshot from just before the last writes: those come
        // first, then the delete.
        let deleted = loop {
            let msg = next_msg(&mut watch).await?;
            let is_delete = msg.changes.iter().any(|c| {
                matches!(
                    c.change,
                    Some(pb::config_change::Change::DeleteIntegration(_))
                )
            });
            if is_delete {
                break msg;
            }
            revision = msg.revision;
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
async fn secrets_are_never_read_back_but_reach_workers() -> anyhow::Result<()> {
    async fn body(cp: &ControlPlane) -> anyhow::Result<()> {
        const FIRST: &str = "first-signing-secret";
        const SECOND: &str = "second-signing-secret";
        const HEADER: &str = "Bearer header-secret-value";
        let mut i = integration("CRM", "https://crm.example.com/hook");
        i.secret = FIRST.into();
        i.auth_header = Some(pb::AuthHeader {
            name: "Authorization".into(),
            value: HEADER.into(),
            value_set: false,
        });
        let created = create(cp, "accounts/42", "crm", i).await?;
        let rotated = cp
            .integrations()
            .await?
            .update_integration(pb::UpdateIntegrationRequest {
                integration: Some(pb::Integration {
                    name: created.name.clone(),
                    secret: SECOND.into(),
                    ..Default::default()
                }),
                update_mask: None,
            })
            .await?
            .into_inner();
        assert_ne!(rotated.secret_fingerprint, created.secret_fingerprint);

        let (listed, _) = cp.admin().await?.list_all("accounts/42").await?;
        let got = cp
            .integrations()
            .await?
            .get_integration(pb::GetIntegrationRequest {
                name: created.name.clone(),
            })
            .await?
            .into_inner();
        for read in [&created, &rotated, &got, &listed[0]] {
            let bytes = prost::Message::encode_to_vec(read);
            for secret in [FIRST, SECOND, HEADER] {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{secret} read back"
                );
            }
            assert!(
                read.secret_set
                    && read
                        .auth_header
                        .as_ref()
                        .is_some_and(|h| h.value_set && h.value.is_empty())
            );
        }

        // Workers get both secrets during the grace period, newest first, and the header value.
        let mut watch = cp
            .config()
            .await?
            .watch_config(pb::WatchConfigRequest { from_revision: 0 })
            .await?
            .into_inner();
        // The feed may serve a snapshot from before the rotation: follow it until the rotation
        // arrives (each read is bounded).
        let snapshot = next_msg(&mut watch).await?;
        let mut cfg = snapshot
            .snapshot
            .context("snapshot")?
            .integrations
            .first()
            .cloned();
        while cfg.as_ref().is_none_or(|c| c.signing_secrets.len() < 2) {
            let msg = next_msg(&mut watch).await?;
            for change in msg.changes {
                if let Some(pb::config_change::Change::UpsertIntegration(c)) = change.change {
                    cfg = Some(c);
                }
            }
        }
        let cfg = cfg.context("integration")?;
        assert_eq!(cfg.auth_header_value, HEADER);
        let secrets: Vec<_> = cfg
            .signing_secrets
            .iter()
            .map(|s| (s.secret.as_str(), s.expire_time.is_some()))
            .collect();
        assert_eq!(secrets, [(SECOND, false), (FIRST, true)]);
        Ok(())
    }
    on_both_backends!(body)
}

/// Applies a WatchConfig message to a map of name → etag, as a worker would.
fn apply(state: &mut std::collections::BTreeMap<String, String>, msg: &pb::WatchConfigResponse) {
    use pb::config_change::Change;
    if let Some(s) = &msg.snapshot {
        state.clear();
        for i in &s.integrations {
            let i = i.integration.as_ref().expect("integration");
            state.insert(i.name.clone(), i.etag.clone());
        }
        for p in &s.push_scopes {
            state.insert(p.name.clone(), p.etag.clone());
        }
    }
    for c in &msg.changes {
        match c.change.as_ref().expect("change") {
            Change::UpsertIntegration(i) => {
                let i = i.integration.as_ref().expect("integration");
                state.insert(i.name.clone(), i.etag.clone());
            }
            Change::UpsertPushScope(p) => {
                state.insert(p.name.clone(), p.etag.clone());
            }
            Change::DeleteIntegration(n) | Change::DeletePushScope(n) => {
                state.remove(n);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_config_resumes_without_missing_or_repeating() -> anyhow::Result<()> {
    async fn body(cp: &ControlPlane) -> anyhow::Result<()> {
        let mut config = cp.config().await?;
        let mut watch = config
            .watch_config(pb::WatchConfigRequest { from_revision: 0 })
            .await?
            .into_inner();
        let first = next_msg(&mut watch).await?;
        assert!(
            first.snapshot.is_some(),
            "a fresh watch starts with a snapshot"
        );
        let mut state = std::collections::BTreeMap::new();
        apply(&mut state, &first);
        let mut revisions = vec![first.revision];

        // Changes while connected.
        for n in 0..3 {
            create(
                cp,
                "accounts/1",
                &format!("i{n}"),
                integration(&format!("I{n}"), "https://a.example.com/"),
            )
            .await?;
        }
        while state.len() < 3 {
            let msg = next_msg(&mut watch).await?;
            assert!(msg.snapshot.is_none());
            revisions.push(msg.revision);
            apply(&mut state, &msg);
        }
        drop(watch);

        // Changes while disconnected, then resume from the last revision seen.
        create_scope(
            cp,
            "accounts/1",
            "s",
            scope(
                "accounts/1/integrations/i0",
                pb::PushScopeLevel::Account,
                "",
                pb::PushAction::Push,
            ),
        )
        .await?;
        cp.integrations()
            .await?
            .delete_integration(pb::DeleteIntegrationRequest {
                name: "accounts/1/integrations/i2".into(),
                etag: String::new(),
                force: false,
            })
            .await?;
        let i1 = create(
            cp,
            "accounts/1",
            "i3",
            integration("I3", "https://b.example.com/"),
        )
        .await?;
        let mut watch = config
            .watch_config(pb::WatchConfigRequest {
                from_revision: *revisions.last().unwrap(),
            })
            .await?
            .into_inner();
        loop {
            let msg = next_msg(&mut watch).await?;
            assert!(msg.snapshot.is_none(), "resume must not re-send a snapshot");
            revisions.push(msg.revision);
            apply(&mut state, &msg);
            if msg.revision >= i1.etag.parse::<i64>()? {
                break;
            }
        }
        assert!(
            revisions.windows(2).all(|w| w[0] < w[1]),
            "revisions strictly increase: {revisions:?}"
        );
        assert_eq!(
            revisions.len(),
            1 + 3 + 3,
            "one message per change: {revisions:?}"
        );

        // The state built from the stream equals a fresh snapshot.
        let mut fresh = config
            .watch_config(pb::WatchConfigRequest { from_revision: 0 })
            .await?
            .into_inner();
        let snap = next_msg(&mut fresh).await?;
        let mut expected = std::collections::BTreeMap::new();
        apply(&mut expected, &snap);
        assert_eq!(state, expected);
        assert_eq!(
            state.keys().cloned().collect::<Vec<_>>(),
            [
                "accounts/1/integrations/i0",
                "accounts/1/integrations/i1",
                "accounts/1/integrations/i3",
                "accounts/1/pushScopes/s"
            ]
        );
        Ok(())
    }
    on_both_backends!(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_forgotten_revision_gets_a_fresh_snapshot() -> anyhow::Result<()> {
    let backends = Backends::start()?;
    for backend in backends.all() {
        let mut config = test_config(&backend);
        config.watch_history = 2;
        let cp = ControlPlane::start(config).await?;
        let first = create(
            &cp,
            "accounts/1",
            "a",
            integration("A", "https://a.example.com/"),
        )
        .await?;
        let mut last = first.clone();
        for n in 0..4 {
            last = create(
                &cp,
                "accounts/1",
                &format!("b{n}"),
                integration(&format!("B{n}"), "https://a.example.com/"),
            )
            .await?;
        }
        // The feed follows the store asynchronously: wait until it has applied the last change.
        let mut probe = cp
            .config()
            .await?
            .watch_config(pb::WatchConfigRequest { from_revision: 0 })
            .await?
            .into_inner();
        let target = last.etag.parse::<i64>()?;
        while next_msg(&mut probe).await?.revision < target {}

        let from = first.etag.parse::<i64>()?;
        let mut watch = cp
            .config()
            .await?
            .watch_config(pb::WatchConfigRequest {
                from_revision: from,
            })
            .await?
            .into_inner();
        let msg = next_msg(&mut watch).await?;
        let described = format!("{msg:?}");
        let snapshot = msg
            .snapshot
            .with_context(|| format!("{backend:?}: expected a snapshot, got {described}"))?;
        assert_eq!(msg.revision, target);
        assert_eq!(snapshot.integrations.len(), 5, "{backend:?}");
        cp.stop().await?;
    }
    Ok(())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_keeps_everything_across_restarts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let backend = Backend::Embedded(dir.path().to_path_buf());
    let cp = ControlPlane::on(&backend).await?;
    let created = create(
        &cp,
        "accounts/1",
        "a",
        integration("A", "https://a.example.com/"),
    )
    .await?;
    cp.stop().await?;
    let cp = ControlPlane::on(&backend).await?;
    let got = cp
        .integrations()
        .await?
        .get_integration(pb::GetIntegrationRequest {
            name: created.name.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(got, created);
    let next = create(
        &cp,
        "accounts/1",
        "b",
        integration("B", "https://a.example.com/"),
    )
    .await?;
    assert!(
        next.etag.parse::<i64>()? > created.etag.parse::<i64>()?,
        "revisions keep growing"
    );
    cp.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_holds_the_records_and_replicas_share_them() -> anyhow::Result<()> {
    let backends = Backends::start()?;
    let backend = Backend::Etcd(vec![backends.etcd.endpoint()]);
    let first = ControlPlane::on(&backend).await?;
    let second = ControlPlane::on(&backend).await?;
    let mut watch = second
        .config()
        .await?
        .watch_config(pb::WatchConfigRequest { from_revision: 0 })
        .await?
        .into_inner();
    let snapshot = next_msg(&mut watch).await?;

    let mut i = integration("CRM", "https://crm.example.com/hook");
    i.secret = "plain-for-now".into();
    let created = create(&first, "accounts/42", "crm", i).await?;
    create_scope(
        &first,
        "accounts/42",
        "all",
        scope(
            &created.name,
            pb::PushScopeLevel::Account,
            "",
            pb::PushAction::Push,
        ),
    )
    .await?;

    // The second replica streams what went through the first, in order.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let msg = next_msg(&mut watch).await?;
        assert!(msg.revision > snapshot.revision);
        seen.extend(msg.changes.into_iter().map(|c| match c.change {
            Some(pb::config_change::Change::UpsertIntegration(i)) => {
                i.integration.map(|i| i.name).unwrap_or_default()
            }
            Some(pb::config_change::Change::UpsertPushScope(s)) => s.name,
            other => format!("unexpected {other:?}"),
        }));
    }
    assert_eq!(
        seen,
        ["accounts/42/integrations/crm", "accounts/42/pushScopes/all"]
    );
    assert_eq!(
        second.admin().await?.list_all("accounts/42").await?,
        first.admin().await?.list_all("accounts/42").await?
    );

    // Read etcd directly: the records sit under /pushwire/v1/, beside the encryption check.
    let mut etcd = etcd_client::Client::connect([backends.etcd.endpoint()], None).await?;
    let keys = etcd
        .get(
            "/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await?;
    let keys: Vec<_> = keys
        .kvs()
        .iter()
        .map(|kv| kv.key_str().map(str::to_owned))
        .collect::<Result<_, _>>()?;
    assert_eq!(
        keys,
        [
            "/pushwire/v1/accounts/42/integrations/crm",
            "/pushwire/v1/accounts/42/pushScopes/all",
            "/pushwire/v1/meta/encryption-check"
        ]
    );
    first.stop().await?;
    second.stop().await?;
    Ok(())
}
