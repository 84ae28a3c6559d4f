//! Bad input is refused with the right status and changes nothing.

use anyhow::Context as _;
use prost_types::FieldMask;
use pushwire_common::pb::v1 as pb;
use pushwire_tests::admin::integration;
use pushwire_tests::control_plane::{Backends, ControlPlane};
use tonic::Code;

use super::{create, create_scope, scope};

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
