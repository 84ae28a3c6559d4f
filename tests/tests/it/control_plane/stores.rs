//! The stores themselves: the embedded store across restarts, etcd shared by replicas.

use pushwire_common::pb::v1 as pb;
use pushwire_tests::admin::integration;
use pushwire_tests::control_plane::{Backend, Backends, ControlPlane};

use super::{create, create_scope, next_msg, scope};

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
    let mut watch = second.watch(0).await?;
    let snapshot = next_msg(&mut watch).await?;

    let mut i = integration("CRM", "https://crm.example.com/hook");
    i.secret = "plain-for-now-24-bytes-long".into();
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
