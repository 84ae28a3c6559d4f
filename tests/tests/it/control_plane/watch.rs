//! WatchConfig: secrets reach workers but are never read back, resuming without gaps or
//! repeats, and a fresh snapshot after a forgotten revision.

use anyhow::Context as _;
use pushwire_common::pb::v1 as pb;
use pushwire_tests::admin::integration;
use pushwire_tests::control_plane::{Backends, ControlPlane, test_config};

use super::{create, create_scope, next_msg, scope};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_never_read_back_but_reach_workers() -> anyhow::Result<()> {
    async fn body(cp: &ControlPlane) -> anyhow::Result<()> {
        const FIRST: &str = "first-signing-secret-of-24b";
        const SECOND: &str = "second-signing-secret-of-24b";
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
        let mut watch = cp.watch(0).await?;
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
        let mut watch = cp.watch(0).await?;
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
        let mut watch = cp.watch(*revisions.last().unwrap()).await?;
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
        // The snapshot, then at most one message per change: revisions pending together (the
        // three made while disconnected, changes made within the batch window) share one.
        assert!(
            (3..=7).contains(&revisions.len()),
            "at most one message per change: {revisions:?}"
        );

        // The state built from the stream equals a fresh snapshot.
        let mut fresh = cp.watch(0).await?;
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
        let mut probe = cp.watch(0).await?;
        let target = last.etag.parse::<i64>()?;
        while next_msg(&mut probe).await?.revision < target {}

        let from = first.etag.parse::<i64>()?;
        let mut watch = cp.watch(from).await?;
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

/// While its store watch is live, a control plane sends a watcher that has everything a
/// progress message every `--watch-progress-interval`: neither snapshot nor changes, at the
/// watcher's revision, on either store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_current_control_plane_sends_progress_messages() -> anyhow::Result<()> {
    let backends = Backends::start()?;
    for backend in backends.all() {
        let mut config = test_config(&backend);
        config.watch_progress_interval = std::time::Duration::from_millis(100);
        let cp = ControlPlane::start(config).await?;
        let created = create(
            &cp,
            "accounts/42",
            "crm",
            integration("CRM", "https://crm.example.com/hook"),
        )
        .await?;
        let mut watch = cp.watch(0).await?;
        let snapshot = next_msg(&mut watch).await?;
        assert!(snapshot.snapshot.is_some(), "{backend:?}");
        // The snapshot may be from just before the write: then its change comes next.
        let written: i64 = created.etag.parse()?;
        let mut revision = snapshot.revision;
        while revision < written {
            revision = next_msg(&mut watch).await?.revision;
        }
        for _ in 0..3 {
            let msg = tokio::time::timeout(std::time::Duration::from_secs(5), watch.message())
                .await
                .context("no progress message")??
                .context("stream ended")?;
            assert_eq!(
                msg,
                pb::WatchConfigResponse {
                    revision,
                    ..Default::default()
                },
                "{backend:?}"
            );
        }
        cp.stop().await?;
    }
    Ok(())
}

/// After a message of changes a watcher waits one `--watch-batch-window` per revision the
/// message held (at most five) before it sends more: changes that come faster than one per
/// window stretch the wait, so a worker wakes once for more of them. The gaps are lower
/// bounds (sleeping never ends early), with a margin for the two messages' transit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_coming_faster_than_the_batch_window_stretch_it() -> anyhow::Result<()> {
    use std::time::{Duration, Instant};
    const WINDOW: Duration = Duration::from_millis(250);
    const MARGIN: Duration = Duration::from_millis(50);
    let dir = tempfile::tempdir()?;
    let mut config = test_config(&pushwire_tests::control_plane::Backend::Embedded(
        dir.path().join("data"),
    ));
    config.watch_batch_window = WINDOW;
    let cp = ControlPlane::start(config).await?;
    let mut watch = cp.watch(0).await?;
    assert!(next_msg(&mut watch).await?.snapshot.is_some());
    let mut made = 0;
    let mut make = |n: usize| {
        let ids: Vec<String> = (made..made + n).map(|k| format!("i{k}")).collect();
        made += n;
        let cp = &cp;
        async move {
            for id in ids {
                create(
                    cp,
                    "accounts/7",
                    &id,
                    integration(&id, "https://a.example.com/"),
                )
                .await?;
            }
            anyhow::Ok(())
        }
    };
    // A change to an idle watcher goes at once: one revision, so a wait of one window.
    make(1).await?;
    let first = next_msg(&mut watch).await?;
    let at_first = Instant::now();
    assert_eq!(first.changes.len(), 1);
    // Three made within that window go out together when it ends.
    make(3).await?;
    let three = next_msg(&mut watch).await?;
    let at_three = Instant::now();
    assert_eq!(three.changes.len(), 3, "{three:?}");
    assert!(
        at_three - at_first >= WINDOW - MARGIN,
        "{:?}",
        at_three - at_first
    );
    // One made right after waits three windows, not one.
    make(1).await?;
    let next = next_msg(&mut watch).await?;
    assert_eq!(next.changes.len(), 1);
    assert!(
        at_three.elapsed() >= 3 * WINDOW - MARGIN,
        "{:?} after a message of three revisions",
        at_three.elapsed()
    );
    cp.stop().await?;
    Ok(())
}
