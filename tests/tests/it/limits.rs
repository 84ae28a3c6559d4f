//! End-to-end tests of the input limits and of the early SSRF check (issue 5): per-account
//! limits on integrations and push scopes (enforced in the create transaction, so concurrent
//! creates cannot exceed them), field limits, request sizes, URLs whose host is a literal
//! non-public address, and participation nesting. Every refusal is a clear gRPC error, and a
//! refused call leaves nothing behind.

use anyhow::Context as _;
use futures_util::future::join_all;
use pushwire_common::pb::v1 as pb;
use pushwire_control_plane::Config;
use pushwire_tests::admin::{Admin, integration};
use pushwire_tests::control_plane::{Backend, Backends, ControlPlane, test_config};
use pushwire_tests::worker::{Stack, completed_doc, request};
use tonic::Code;

const MAX_INTEGRATIONS: usize = 3;
const MAX_SCOPES: usize = 4;

/// The admin API of `cp`; a failure to connect as a status, like the refusals.
async fn admin(cp: &ControlPlane) -> Result<Admin, tonic::Status> {
    cp.admin()
        .await
        .map_err(|e| tonic::Status::unknown(e.to_string()))
}

async fn create_integration(
    cp: &ControlPlane,
    account: &str,
    id: &str,
    i: pb::Integration,
) -> Result<pb::Integration, tonic::Status> {
    admin(cp).await?.create_integration(account, id, i).await
}

async fn update_integration(
    cp: &ControlPlane,
    i: pb::Integration,
    paths: &[&str],
) -> Result<pb::Integration, tonic::Status> {
    admin(cp).await?.update_integration(i, paths).await
}

/// Creates a CAMPAIGN scope `id` for `target` in `account`.
async fn create_scope(
    cp: &ControlPlane,
    account: &str,
    id: &str,
    integration: &str,
    target: &str,
) -> Result<pb::PushScope, tonic::Status> {
    let scope = pb::PushScope {
        integration: integration.into(),
        level: pb::PushScopeLevel::Campaign.into(),
        target_id: target.into(),
        ..Default::default()
    };
    admin(cp).await?.create_scope(account, id, scope).await
}

fn assert_refused(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err(needle);
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} lacks {needle:?}",
        status.message()
    );
}

fn limited(backend: &Backend) -> Config {
    let mut config = test_config(backend);
    config.max_integrations_per_account = MAX_INTEGRATIONS;
    config.max_push_scopes_per_account = MAX_SCOPES;
    config
}

// ---------------------------------------------------------------------------------------------
// Per-account limits.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_account_limits_hold_under_concurrent_creates() -> anyhow::Result<()> {
    let backends = Backends::start()?;
    for backend in backends.all() {
        let cp = ControlPlane::start(limited(&backend)).await?;
        per_account_limits(&cp)
            .await
            .with_context(|| format!("on {backend:?}"))?;
        cp.stop().await?;
    }
    Ok(())
}

async fn per_account_limits(cp: &ControlPlane) -> anyhow::Result<()> {
    let account = "accounts/7";
    for n in 0..MAX_INTEGRATIONS {
        create_integration(
            cp,
            account,
            &format!("i{n}"),
            integration(&format!("I{n}"), &format!("https://i{n}.example.com/")),
        )
        .await?;
    }
    let refused = create_integration(
        cp,
        account,
        "one-more",
        integration("More", "https://m.example.com/"),
    )
    .await;
    assert_refused(
        refused,
        Code::ResourceExhausted,
        "accounts/7 has 3 integrations, the most allowed per account (--max-integrations-per-account 3)",
    );
    // Generated ids too, and nothing was written.
    let refused = create_integration(
        cp,
        account,
        "",
        integration("More", "https://m.example.com/"),
    )
    .await;
    assert_refused(
        refused,
        Code::ResourceExhausted,
        "--max-integrations-per-account",
    );
    assert_eq!(
        cp.admin().await?.list_all(account).await?.0.len(),
        MAX_INTEGRATIONS
    );
    // Limits are per account.
    create_integration(
        cp,
        "accounts/8",
        "x",
        integration("X", "https://x.example.com/"),
    )
    .await?;

    // Scopes: up to the limit, then RESOURCE_EXHAUSTED.
    for n in 0..MAX_SCOPES {
        create_scope(
            cp,
            account,
            &format!("s{n}"),
            "accounts/7/integrations/i0",
            &n.to_string(),
        )
        .await?;
    }
    let refused = create_scope(cp, account, "s-more", "accounts/7/integrations/i1", "99").await;
    assert_refused(
        refused,
        Code::ResourceExhausted,
        "accounts/7 has 4 push scopes, the most allowed per account (--max-push-scopes-per-account 4)",
    );
    assert_eq!(
        cp.admin().await?.list_all(account).await?.1.len(),
        MAX_SCOPES
    );

    // Deleting makes room again.
    cp.push_scopes()
        .await?
        .delete_push_scope(pb::DeletePushScopeRequest {
            name: "accounts/7/pushScopes/s0".into(),
            ..Default::default()
        })
        .await?;
    create_scope(cp, account, "s-more", "accounts/7/integrations/i1", "99").await?;
    cp.integrations()
        .await?
        .delete_integration(pb::DeleteIntegrationRequest {
            name: "accounts/7/integrations/i2".into(),
            ..Default::default()
        })
        .await?;
    create_integration(
        cp,
        account,
        "one-more",
        integration("More", "https://m.example.com/"),
    )
    .await?;

    // Concurrent creates in a fresh account: never more than the limit, whatever the order
    // the transactions commit in; the losers get RESOURCE_EXHAUSTED (or ABORTED when the
    // contention outlasted the retries).
    let burst = "accounts/9";
    let results = join_all((0..10).map(|n| async move {
        create_integration(
            cp,
            burst,
            &format!("c{n}"),
            integration(&format!("C{n}"), &format!("https://c{n}.example.com/")),
        )
        .await
    }))
    .await;
    let created = results.iter().filter(|r| r.is_ok()).count();
    for r in &results {
        if let Err(s) = r {
            assert!(
                matches!(s.code(), Code::ResourceExhausted | Code::Aborted),
                "{s:?}"
            );
        }
    }
    let (integrations, _) = cp.admin().await?.list_all(burst).await?;
    assert_eq!(integrations.len(), created);
    assert!(
        (1..=MAX_INTEGRATIONS).contains(&created),
        "{created} created"
    );

    let target = integrations[0].name.clone();
    let results = join_all((0..12).map(|n| {
        let target = target.clone();
        async move { create_scope(cp, burst, &format!("b{n}"), &target, &n.to_string()).await }
    }))
    .await;
    let created = results.iter().filter(|r| r.is_ok()).count();
    for r in &results {
        if let Err(s) = r {
            assert!(
                matches!(s.code(), Code::ResourceExhausted | Code::Aborted),
                "{s:?}"
            );
        }
    }
    let (_, scopes) = cp.admin().await?.list_all(burst).await?;
    assert_eq!(scopes.len(), created);
    assert!((1..=MAX_SCOPES).contains(&created), "{created} created");
    Ok(())
}

#[test]
fn limits_default_and_parse() {
    use clap::Parser as _;
    let defaults = Config::defaults();
    assert_eq!(defaults.max_integrations_per_account, 100);
    assert_eq!(defaults.max_push_scopes_per_account, 1000);
    let set = Config::parse_from([
        "control-plane",
        "--max-integrations-per-account",
        "5",
        "--max-push-scopes-per-account",
        "50",
    ]);
    assert_eq!(
        (
            set.max_integrations_per_account,
            set.max_push_scopes_per_account
        ),
        (5, 50)
    );
    for bad in ["0", "-1", "many", "1000001"] {
        assert!(
            Config::try_parse_from(["control-plane", "--max-integrations-per-account", bad])
                .is_err(),
            "{bad}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Field limits and request sizes.

#[tokio::test]
async fn field_limits_are_refused_with_the_field_named_and_nothing_written() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::on(&Backend::Embedded(dir.path().join("data"))).await?;
    let account = "accounts/42";
    let existing = create_integration(
        &cp,
        account,
        "crm",
        integration("CRM", "https://crm.example.com/"),
    )
    .await?;

    let header = |name: &str, value: &str| {
        Some(pb::AuthHeader {
            name: name.into(),
            value: value.into(),
            value_set: false,
        })
    };
    let with = |f: &dyn Fn(&mut pb::Integration)| {
        let mut i = integration("New", "https://new.example.com/");
        f(&mut i);
        i
    };
    // (what, integration, update mask path, text the message holds)
    let cases: Vec<(&str, pb::Integration, &str, String)> = vec![
        (
            "display name of 101 characters",
            with(&|i| i.display_name = "é".repeat(101)),
            "display_name",
            "integration.display_name: at most 100 characters".into(),
        ),
        (
            "URL of 2049 bytes",
            with(&|i| i.url = format!("https://new.example.com/{}", "a".repeat(2049 - 24))),
            "url",
            "integration.url: at most 2048 bytes".into(),
        ),
        (
            "URL with CR LF",
            with(&|i| i.url = "https://new.example.com/a\r\nX-Evil: 1".into()),
            "url",
            "integration.url: must not contain control, whitespace or invisible characters, found U+000D".into(),
        ),
        (
            "URL with a trailing space",
            with(&|i| i.url = "https://new.example.com/ ".into()),
            "url",
            "integration.url: must not contain control, whitespace or invisible characters, found U+0020".into(),
        ),
        (
            "display name with a zero-width space",
            with(&|i| i.display_name = "C\u{200b}RM".into()),
            "display_name",
            "integration.display_name: must not contain invisible".into(),
        ),
        (
            "display name reversed by U+202E",
            with(&|i| i.display_name = "\u{202e}MRC".into()),
            "display_name",
            "integration.display_name: must not contain invisible".into(),
        ),
        (
            "header name that is no token",
            with(&|i| i.auth_header = header("X Api Key", "v")),
            "auth_header",
            "integration.auth_header.name: must be an HTTP header name".into(),
        ),
        (
            "header name of 257 bytes",
            with(&|i| i.auth_header = header(&"x".repeat(257), "v")),
            "auth_header",
            "integration.auth_header.name: at most 256 bytes".into(),
        ),
        (
            "header value of 4097 bytes",
            with(&|i| i.auth_header = header("Authorization", &"v".repeat(4097))),
            "auth_header",
            "integration.auth_header.value: at most 4096 bytes".into(),
        ),
        (
            "header value with a leading space",
            with(&|i| i.auth_header = header("Authorization", " Bearer x")),
            "auth_header",
            "integration.auth_header.value: must not start or end with a space or tab".into(),
        ),
        (
            "header value not ASCII",
            with(&|i| i.auth_header = header("Authorization", "Bearer caf\u{e9}")),
            "auth_header",
            "integration.auth_header.value: must be visible ASCII".into(),
        ),
        (
            "secret of 1025 bytes",
            with(&|i| i.secret = "s".repeat(1025)),
            "secret",
            "integration.secret: at most 1024 bytes".into(),
        ),
        (
            "disabled reason of 501 characters",
            with(&|i| {
                i.enabled = Some(false);
                i.disabled_reason = "r".repeat(501);
            }),
            "disabled_reason",
            "integration.disabled_reason: at most 500 characters".into(),
        ),
    ];
    for (what, i, path, needle) in cases {
        let refused = create_integration(&cp, account, "new", i.clone()).await;
        let status = refused.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().starts_with(&needle),
            "{what}: {:?}",
            status.message()
        );

        // The same change as an update of the existing integration.
        let mut update = i;
        update.name = existing.name.clone();
        let refused = update_integration(&cp, update, &[path]).await;
        let status = refused.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().starts_with(&needle),
            "{what}: {:?}",
            status.message()
        );
    }
    // Nothing half-written: the one integration, unchanged.
    let (integrations, scopes) = cp.admin().await?.list_all(account).await?;
    assert_eq!(integrations, vec![existing]);
    assert!(scopes.is_empty());

    // The limits themselves are accepted.
    let at_limits = pb::Integration {
        display_name: "é".repeat(100),
        url: format!("https://new.example.com/{}", "a".repeat(2048 - 24)),
        auth_header: header(&"X".repeat(256), &"v".repeat(4096)),
        secret: "s".repeat(1024),
        ..Default::default()
    };
    assert_eq!(at_limits.url.len(), 2048);
    create_integration(&cp, account, "at-limits", at_limits).await?;

    // A URL is stored as it is called.
    let typed = pb::Integration {
        display_name: "Typed".into(),
        url: "HTTPS://Typed.Example.COM:443".into(),
        ..Default::default()
    };
    let stored = create_integration(&cp, account, "typed", typed).await?;
    assert_eq!(stored.url, "https://typed.example.com/");
    cp.stop().await
}

#[tokio::test]
async fn oversized_admin_requests_are_refused_before_parsing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cp = ControlPlane::on(&Backend::Embedded(dir.path().join("data"))).await?;
    // 64 KiB per admin request: a display name of 100 KiB never reaches validation.
    let refused = create_integration(
        &cp,
        "accounts/42",
        "huge",
        integration(&"x".repeat(100 * 1024), "https://x.example.com/"),
    )
    .await;
    let status = refused.expect_err("too large");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("the limit is: 65536 bytes"),
        "{:?}",
        status.message()
    );
    let refused = cp
        .push_scopes()
        .await?
        .create_push_scope(pb::CreatePushScopeRequest {
            parent: "accounts/42".into(),
            push_scope_id: "x".repeat(70 * 1024),
            push_scope: None,
        })
        .await;
    assert_eq!(refused.expect_err("too large").code(), Code::OutOfRange);
    assert_eq!(
        cp.admin().await?.list_all("accounts/42").await?,
        (vec![], vec![])
    );
    // A request just under the limit is read and refused for what it holds.
    let refused = create_integration(
        &cp,
        "accounts/42",
        "big",
        integration(&"x".repeat(60 * 1024), "https://x.example.com/"),
    )
    .await;
    assert_refused(
        refused,
        Code::InvalidArgument,
        "integration.display_name: at most 100",
    );
    cp.stop().await
}

// ---------------------------------------------------------------------------------------------
// SSRF: literal non-public hosts refused at create and update.

/// URLs refused without an allow-list, and the address class their message names.
const NON_PUBLIC_URLS: &[(&str, &str)] = &[
    (
        "http://127.0.0.1:9000/hook",
        "host 127.0.0.1 is loopback (127.0.0.0/8), not public and not allow-listed",
    ),
    (
        "http://localhost:9000/hook",
        "host \"localhost\" is loopback",
    ),
    (
        "http://api.localhost/hook",
        "host \"api.localhost\" is loopback",
    ),
    ("https://[::1]/hook", "host ::1 is loopback (::1)"),
    (
        "https://10.0.0.1/hook",
        "host 10.0.0.1 is private (RFC 1918, 10.0.0.0/8)",
    ),
    (
        "https://172.20.1.1/hook",
        "private (RFC 1918, 172.16.0.0/12)",
    ),
    (
        "https://192.168.1.10/hook",
        "private (RFC 1918, 192.168.0.0/16)",
    ),
    (
        "https://100.64.0.1/hook",
        "carrier-grade NAT (100.64.0.0/10)",
    ),
    (
        "http://169.254.169.254/latest/meta-data/",
        "cloud metadata (169.254.169.254), never contacted, even when allow-listed",
    ),
    ("https://169.254.10.10/", "link-local (169.254.0.0/16)"),
    ("https://198.18.0.1/", "benchmarking (198.18.0.0/15)"),
    (
        "https://203.0.113.5/",
        "documentation (TEST-NET-3, 203.0.113.0/24)",
    ),
    ("https://224.0.0.251/", "multicast (224.0.0.0/4)"),
    ("https://255.255.255.255/", "broadcast (255.255.255.255)"),
    ("https://0.0.0.0/", "unspecified (0.0.0.0)"),
    ("https://240.1.2.3/", "reserved (240.0.0.0/4)"),
    (
        "https://[::ffff:10.0.0.1]/",
        "the IPv4-mapped (::ffff:0:0/96) form of 10.0.0.1, private",
    ),
    (
        "https://[::10.0.0.1]/",
        "IPv4-compatible (::/96, deprecated)",
    ),
    (
        "https://[64:ff9b::a9fe:a9fe]/",
        "the NAT64 (64:ff9b::/96) form of 169.254.169.254, cloud metadata",
    ),
    (
        "https://[2002:a00:1::1]/",
        "the 6to4 (2002::/16) form of 10.0.0.1, private",
    ),
    (
        "https://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
        "Teredo (2001::/32)",
    ),
    ("https://[fd12:3456::1]/", "unique local (fc00::/7)"),
    ("https://[fe80::1]/", "link-local (fe80::/10)"),
    ("https://[2001:db8::1]/", "documentation (2001:db8::/32)"),
    ("https://[ff02::1]/", "multicast (ff00::/8)"),
];

#[tokio::test]
async fn literal_non_public_urls_are_refused_at_create_and_update() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // The production default: no --allow-cidr (plain http allowed, to see the host refused).
    let cp = ControlPlane::on(&Backend::Embedded(dir.path().join("data"))).await?;
    let account = "accounts/42";
    let existing = create_integration(
        &cp,
        account,
        "crm",
        integration("CRM", "https://crm.example.com/hook"),
    )
    .await?;
    for &(url, needle) in NON_PUBLIC_URLS {
        let refused = create_integration(&cp, account, "new", integration("New", url)).await;
        let status = refused.expect_err(url);
        assert_eq!(status.code(), Code::InvalidArgument, "{url}: {status:?}");
        let message = status.message();
        assert!(
            message.starts_with("integration.url: host "),
            "{url}: {message:?}"
        );
        assert!(
            message.contains(needle),
            "{url}: {message:?} lacks {needle:?}"
        );

        let mut update = integration("", url);
        update.name = existing.name.clone();
        let status = update_integration(&cp, update, &["url"])
            .await
            .expect_err(url);
        assert_eq!(status.code(), Code::InvalidArgument, "{url}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{url}: {:?}",
            status.message()
        );
    }
    // Nothing written; the existing integration unchanged. Names are not resolved here.
    assert_eq!(
        cp.admin().await?.list_all(account).await?.0,
        vec![existing.clone()]
    );
    create_integration(
        &cp,
        account,
        "named",
        integration("Named", "https://intranet.example/hook"),
    )
    .await?;
    cp.stop().await
}

#[tokio::test]
async fn the_allow_list_lets_its_networks_through_but_never_cloud_metadata() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = Backend::Embedded(dir.path().join("data"));
    let mut config = test_config(&data);
    config.webhook.allow_cidr = vec!["127.0.0.0/8".into(), "169.254.0.0/16".into()];
    let cp = ControlPlane::start(config).await?;
    let account = "accounts/42";
    for (id, url) in [
        ("literal", "http://127.0.0.1:9000/hook"),
        ("mapped", "http://[::ffff:127.0.0.1]:9000/hook"),
        ("by-name", "http://localhost:9000/hook"),
        ("link-local", "http://169.254.10.10/hook"),
    ] {
        create_integration(&cp, account, id, integration(id, url)).await?;
    }
    for url in [
        "http://169.254.169.254/latest/",
        "http://10.0.0.1/",
        "http://[::1]/",
    ] {
        let refused = create_integration(&cp, account, "other", integration("Other", url)).await;
        assert_eq!(
            refused.expect_err(url).code(),
            Code::InvalidArgument,
            "{url}"
        );
    }
    let refused = create_integration(
        &cp,
        account,
        "other",
        integration("Other", "http://169.254.169.254/"),
    )
    .await;
    assert_refused(
        refused,
        Code::InvalidArgument,
        "cloud metadata (169.254.169.254), never contacted, even when allow-listed",
    );
    assert_eq!(cp.admin().await?.list_all(account).await?.0.len(), 4);
    cp.stop().await?;

    // The same store under the production default (no allow-list): what is stored stays
    // readable and updatable (disabling it, say), but its URL cannot be set again.
    let cp = ControlPlane::on(&data).await?;
    let mut disable = integration("", "");
    disable.name = format!("{account}/integrations/literal");
    disable.enabled = Some(false);
    let disabled = update_integration(&cp, disable, &["enabled"]).await?;
    assert_eq!(disabled.enabled, Some(false));
    let mut same_url = integration("", "http://127.0.0.1:9000/hook");
    same_url.name = disabled.name.clone();
    let refused = update_integration(&cp, same_url, &["url"]).await;
    assert_refused(
        refused,
        Code::InvalidArgument,
        "integration.url: host 127.0.0.1 is loopback",
    );
    cp.stop().await
}

// ---------------------------------------------------------------------------------------------
// Participation nesting depth, through the worker.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_participations_are_refused_with_their_path() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let deep = |levels: usize| {
        let mut doc = completed_doc("DEEP-1");
        doc["extra"] = serde_json::Value::Null;
        doc.to_string().replace(
            "\"extra\":null",
            &format!("\"extra\":{}{}", "[".repeat(levels), "]".repeat(levels)),
        )
    };
    // 63 levels under the root object: accepted (nothing routes it).
    let resp = stack
        .publish_one(request("accounts/5", &deep(63)))
        .await??;
    assert_eq!(resp.error, "");
    for levels in [64, 200, 100_000] {
        let resp = stack
            .publish_one(request("accounts/5", &deep(levels)))
            .await??;
        assert!(
            resp.error.starts_with("participation_json: $.extra[0][0]")
                && resp
                    .error
                    .ends_with(": nested deeper than 64 levels of arrays and objects"),
            "{levels}: {}",
            resp.error
        );
        assert!(resp.error.len() < 300, "{levels}: {}", resp.error);
        assert!(resp.deliveries.is_empty());
    }
    stack.stop().await
}
