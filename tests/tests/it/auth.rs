//! Authentication and roles on every gRPC call, against a real control plane with its
//! in-process worker (`--with-worker`, embedded store):
//!
//! - the matrix: each kind of token (admin of every account, admin, viewer and publisher of
//!   one account, worker, none, unknown) × every RPC of `pushwire.v1` × its own account and
//!   another one → the expected code, from one literal table ([`ALLOWED`]);
//! - a token limited to one account gets the same answer for another account's existing
//!   resources as for resources that never existed (nothing leaks);
//! - health and reflection are open without a token;
//! - the token file is reloaded on change, an invalid one keeps the previous tokens, and an
//!   invalid one at start refuses the start.

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context as _;
use prost_types::FieldMask;
use pushwire_common::auth::RELOAD_INTERVAL;
use pushwire_common::pb::v1 as pb;
use pushwire_tests::admin::{Admin, integration, scope};
use pushwire_tests::control_plane::{
    AuthChannel, TEST_ADMIN_TOKEN, TEST_WORKER_TOKEN, test_config, with_token,
};
use pushwire_tests::eventually::{Poll, eventually};
use pushwire_tests::faults::http_get;
use pushwire_tests::tokens::{Accounts, entry, write_atomically, write_token_file};
use pushwire_tests::worker::{COMPLETED, PublishStream, Stack, WAIT, request};
use tonic::{Code, Status};

/// The account the limited tokens may use.
const OWN: &str = "accounts/own";
/// An account they may not use, with the same resources as [`OWN`].
const OTHER: &str = "accounts/other";
/// An account that never had anything.
const GHOST: &str = "accounts/ghost";

const ADMIN_OWN: &str = "tok-admin-own";
const VIEWER_OWN: &str = "tok-viewer-own";
const PUBLISHER_OWN: &str = "tok-publisher-own";
const UNKNOWN: &str = "tok-unknown-to-the-server";

/// The RPCs of `pushwire.v1`, and the two open services.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rpc {
    CreateIntegration,
    GetIntegration,
    ListIntegrations,
    UpdateIntegration,
    /// UpdateIntegration with `enabled: false` and `disabled_reason` only (a worker's 410).
    DisableIntegration,
    DeleteIntegration,
    TestIntegration,
    CreatePushScope,
    GetPushScope,
    ListPushScopes,
    UpdatePushScope,
    DeletePushScope,
    ResolvePushes,
    Publish,
    PublishOne,
    WatchConfig,
    HealthCheck,
    Reflection,
}

/// Who may call what: the roles allowed for each RPC (`open` for everyone, token or not).
/// Limited tokens may do it in their own account only; WatchConfig names no account.
const ALLOWED: &[(Rpc, &[&str])] = &[
    (Rpc::CreateIntegration, &["admin"]),
    (Rpc::GetIntegration, &["admin", "viewer"]),
    (Rpc::ListIntegrations, &["admin", "viewer"]),
    (Rpc::UpdateIntegration, &["admin"]),
    (Rpc::DisableIntegration, &["admin", "worker"]),
    (Rpc::DeleteIntegration, &["admin"]),
    (Rpc::TestIntegration, &["admin"]),
    (Rpc::CreatePushScope, &["admin"]),
    (Rpc::GetPushScope, &["admin", "viewer"]),
    (Rpc::ListPushScopes, &["admin", "viewer"]),
    (Rpc::UpdatePushScope, &["admin"]),
    (Rpc::DeletePushScope, &["admin"]),
    (Rpc::ResolvePushes, &["admin", "viewer"]),
    (Rpc::Publish, &["admin", "publisher"]),
    (Rpc::PublishOne, &["admin", "publisher"]),
    (Rpc::WatchConfig, &["worker"]),
    (Rpc::HealthCheck, &["open"]),
    (Rpc::Reflection, &["open"]),
];

/// A kind of caller.
struct Caller {
    label: &'static str,
    token: Option<&'static str>,
    /// `None` when the server does not know the token.
    role: Option<&'static str>,
    all_accounts: bool,
}

const CALLERS: &[Caller] = &[
    Caller {
        label: "admin of every account",
        token: Some(TEST_ADMIN_TOKEN),
        role: Some("admin"),
        all_accounts: true,
    },
    Caller {
        label: "admin of accounts/own",
        token: Some(ADMIN_OWN),
        role: Some("admin"),
        all_accounts: false,
    },
    Caller {
        label: "viewer of accounts/own",
        token: Some(VIEWER_OWN),
        role: Some("viewer"),
        all_accounts: false,
    },
    Caller {
        label: "publisher of accounts/own",
        token: Some(PUBLISHER_OWN),
        role: Some("publisher"),
        all_accounts: false,
    },
    Caller {
        label: "worker",
        token: Some(TEST_WORKER_TOKEN),
        role: Some("worker"),
        all_accounts: true,
    },
    Caller {
        label: "no token",
        token: None,
        role: None,
        all_accounts: false,
    },
    Caller {
        label: "unknown token",
        token: Some(UNKNOWN),
        role: None,
        all_accounts: false,
    },
];

/// What `caller` calling `rpc` on `account` must get.
fn expected(caller: &Caller, rpc: Rpc, account: &str) -> Code {
    let allowed = ALLOWED
        .iter()
        .find(|(r, _)| *r == rpc)
        .map(|(_, roles)| *roles)
        .expect("every RPC is in the table");
    if allowed == ["open"] {
        return Code::Ok;
    }
    let Some(role) = caller.role else {
        return Code::Unauthenticated;
    };
    if !allowed.contains(&role) {
        return Code::PermissionDenied;
    }
    if account != OWN && !caller.all_accounts && rpc != Rpc::WatchConfig {
        return Code::PermissionDenied;
    }
    Code::Ok
}

/// The test set-up: a stack whose token file holds the limited tokens and the worker token,
/// with an integration `crm` (disabled: publishing routes nothing) and a scope `all` in
/// [`OWN`] and [`OTHER`].
struct Fixture {
    stack: Stack,
    n: AtomicUsize,
}

impl Fixture {
    async fn start() -> anyhow::Result<Self> {
        let stack = Stack::start_with(|config, dir| {
            let own = Accounts::Only(&[OWN]);
            let path = dir.join("tokens.json");
            write_token_file(
                &path,
                &[
                    entry("admin own", ADMIN_OWN, "admin", own),
                    entry("viewer own", VIEWER_OWN, "viewer", own),
                    entry("publisher own", PUBLISHER_OWN, "publisher", own),
                    entry("worker", TEST_WORKER_TOKEN, "worker", Accounts::All),
                ],
            )?;
            config.access.token_file = Some(path);
            Ok(())
        })
        .await?;
        let admin = stack.admin();
        for account in [OWN, OTHER] {
            admin
                .create_integration(
                    account,
                    "crm",
                    pb::Integration {
                        enabled: Some(false),
                        ..integration("CRM", "http://127.0.0.1:9/hook")
                    },
                )
                .await?;
            admin
                .create_scope(
                    account,
                    "all",
                    scope(
                        &format!("{account}/integrations/crm"),
                        pb::PushScopeLevel::Account,
                        "",
                    ),
                )
                .await?;
        }
        Ok(Self {
            stack,
            n: AtomicUsize::new(0),
        })
    }

    fn next(&self) -> usize {
        self.n.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn channel(&self, token: Option<&str>) -> AuthChannel {
        with_token(self.stack.raw_channel(), token)
    }

    /// Calls `rpc` on `account` as the holder of `token`; resources it deletes are made first
    /// (by the admin of every account).
    async fn call(&self, rpc: Rpc, account: &str, token: Option<&str>) -> Result<(), Status> {
        use pb::config_service_client::ConfigServiceClient;
        use pb::integration_service_client::IntegrationServiceClient;
        use pb::push_scope_service_client::PushScopeServiceClient;
        let ch = self.channel(token);
        let n = self.next();
        let crm = format!("{account}/integrations/crm");
        let as_caller = Admin::new(ch.clone());
        let mut integrations = IntegrationServiceClient::new(ch.clone());
        let mut scopes = PushScopeServiceClient::new(ch.clone());
        match rpc {
            Rpc::CreateIntegration => as_caller
                .create_integration(
                    account,
                    &format!("c{n}"),
                    integration(&format!("c{n}"), "http://127.0.0.1:9/c"),
                )
                .await
                .map(drop),
            Rpc::GetIntegration => as_caller.get_integration(&crm).await.map(drop),
            Rpc::ListIntegrations => integrations
                .list_integrations(pb::ListIntegrationsRequest {
                    parent: account.into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            Rpc::UpdateIntegration => as_caller
                .update_integration(
                    pb::Integration {
                        name: crm,
                        display_name: format!("CRM {n}"),
                        ..Default::default()
                    },
                    &["display_name"],
                )
                .await
                .map(drop),
            Rpc::DisableIntegration => as_caller
                .update_integration(
                    pb::Integration {
                        name: crm,
                        enabled: Some(false),
                        disabled_reason: "410 Gone".into(),
                        ..Default::default()
                    },
                    &["enabled", "disabled_reason"],
                )
                .await
                .map(drop),
            Rpc::DeleteIntegration => {
                let victim = self
                    .stack
                    .admin()
                    .create_integration(
                        account,
                        &format!("v{n}"),
                        integration(&format!("v{n}"), "http://127.0.0.1:9/v"),
                    )
                    .await
                    .map_err(|e| Status::internal(format!("{e:#}")))?;
                integrations
                    .delete_integration(pb::DeleteIntegrationRequest {
                        name: victim.name,
                        ..Default::default()
                    })
                    .await
                    .map(drop)
            }
            Rpc::TestIntegration => integrations
                .test_integration(pb::TestIntegrationRequest { name: crm })
                .await
                .map(drop),
            Rpc::CreatePushScope => as_caller
                .create_scope(
                    account,
                    &format!("s{n}"),
                    scope(&crm, pb::PushScopeLevel::Campaign, &n.to_string()),
                )
                .await
                .map(drop),
            Rpc::GetPushScope => scopes
                .get_push_scope(pb::GetPushScopeRequest {
                    name: format!("{account}/pushScopes/all"),
                })
                .await
                .map(drop),
            Rpc::ListPushScopes => scopes
                .list_push_scopes(pb::ListPushScopesRequest {
                    parent: account.into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            Rpc::UpdatePushScope => scopes
                .update_push_scope(pb::UpdatePushScopeRequest {
                    push_scope: Some(pb::PushScope {
                        name: format!("{account}/pushScopes/all"),
                        audience: pb::Audience::All.into(),
                        ..Default::default()
                    }),
                    update_mask: Some(FieldMask {
                        paths: vec!["audience".into()],
                    }),
                })
                .await
                .map(drop),
            Rpc::DeletePushScope => {
                let victim = self
                    .stack
                    .admin()
                    .create_scope(
                        account,
                        &format!("d{n}"),
                        scope(
                            &crm,
                            pb::PushScopeLevel::Campaign,
                            &(100_000 + n).to_string(),
                        ),
                    )
                    .await
                    .map_err(|e| Status::internal(format!("{e:#}")))?;
                scopes
                    .delete_push_scope(pb::DeletePushScopeRequest {
                        name: victim.name,
                        ..Default::default()
                    })
                    .await
                    .map(drop)
            }
            Rpc::ResolvePushes => scopes
                .resolve_pushes(pb::ResolvePushesRequest {
                    account: account.into(),
                    campaign_id: "1".into(),
                    identified: Some(true),
                    ..Default::default()
                })
                .await
                .map(drop),
            Rpc::Publish => {
                let client = pb::ingest_service_client::IngestServiceClient::new(ch);
                let mut stream = match PublishStream::open(client).await {
                    Ok(s) => s,
                    Err(e) => {
                        return Err(e
                            .downcast_ref::<Status>()
                            .cloned()
                            .unwrap_or_else(|| Status::internal(format!("{e:#}"))));
                    }
                };
                stream
                    .send(request(account, COMPLETED))
                    .await
                    .map_err(|e| Status::internal(format!("{e:#}")))?;
                match stream.next(WAIT).await {
                    Ok(Ok(Some(_))) => Ok(()),
                    Ok(Ok(None)) => Err(Status::internal("the stream ended without an answer")),
                    Ok(Err(status)) => Err(status),
                    Err(e) => Err(Status::internal(format!("{e:#}"))),
                }
            }
            Rpc::PublishOne => pb::ingest_service_client::IngestServiceClient::new(ch)
                .publish_one(request(account, COMPLETED))
                .await
                .map(drop),
            Rpc::WatchConfig => {
                let mut stream = ConfigServiceClient::new(ch)
                    .watch_config(pb::WatchConfigRequest {
                        from_revision: 0,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                // A granted watch starts with the snapshot.
                match tokio::time::timeout(WAIT, stream.message()).await {
                    Ok(Ok(Some(m))) if m.snapshot.is_some() => Ok(()),
                    Ok(Err(status)) => Err(status),
                    other => Err(Status::internal(format!("no snapshot: {other:?}"))),
                }
            }
            Rpc::HealthCheck => {
                use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
                HealthClient::new(ch)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map(drop)
            }
            Rpc::Reflection => reflect(ch).await,
        }
    }
}

/// Lists the services through reflection (v1).
async fn reflect(ch: AuthChannel) -> Result<(), Status> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(ch)
        .server_reflection_info(tokio_stream::once(req))
        .await?
        .into_inner();
    match answers.message().await? {
        Some(ServerReflectionResponse {
            message_response: Some(MessageResponse::ListServicesResponse(list)),
            ..
        }) if list
            .service
            .iter()
            .any(|s| s.name == "pushwire.v1.IntegrationService") =>
        {
            Ok(())
        }
        other => Err(Status::internal(format!(
            "unexpected reflection answer {other:?}"
        ))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_gets_exactly_its_rpcs_in_its_accounts() -> anyhow::Result<()> {
    let fx = Fixture::start().await?;
    let mut failures = Vec::new();
    let mut checked = 0;
    for caller in CALLERS {
        for &(rpc, _) in ALLOWED {
            let accounts: &[&str] = match rpc {
                Rpc::WatchConfig | Rpc::HealthCheck | Rpc::Reflection => &[OWN],
                _ => &[OWN, OTHER],
            };
            for &account in accounts {
                let want = expected(caller, rpc, account);
                let got = tokio::time::timeout(WAIT * 2, fx.call(rpc, account, caller.token))
                    .await
                    .with_context(|| format!("{} {rpc:?} {account}: no answer", caller.label))?;
                checked += 1;
                let code = got.as_ref().err().map_or(Code::Ok, Status::code);
                if code != want {
                    failures.push(format!(
                        "{:<26} {rpc:<20?} {account:<15} expected {want:?}, got {got:?}",
                        caller.label
                    ));
                }
                if let Err(status) = &got {
                    assert!(
                        !caller.token.is_some_and(|t| status.message().contains(t)),
                        "a token in an error message: {status:?}"
                    );
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} calls got the wrong code:\n{}",
        failures.len(),
        failures.join("\n")
    );
    fx.stack.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_accounts_resources_look_the_same_whether_they_exist_or_not() -> anyhow::Result<()>
{
    let fx = Fixture::start().await?;
    for (token, rpcs) in [
        (
            ADMIN_OWN,
            &[
                Rpc::GetIntegration,
                Rpc::UpdateIntegration,
                Rpc::TestIntegration,
                Rpc::CreatePushScope,
                Rpc::GetPushScope,
                Rpc::UpdatePushScope,
                Rpc::ListIntegrations,
                Rpc::ResolvePushes,
                Rpc::PublishOne,
            ][..],
        ),
        (
            VIEWER_OWN,
            &[
                Rpc::GetIntegration,
                Rpc::GetPushScope,
                Rpc::ListPushScopes,
                Rpc::ResolvePushes,
            ][..],
        ),
        (PUBLISHER_OWN, &[Rpc::PublishOne, Rpc::Publish][..]),
    ] {
        for &rpc in rpcs {
            let existing = fx.call(rpc, OTHER, Some(token)).await.unwrap_err();
            let never = fx.call(rpc, GHOST, Some(token)).await.unwrap_err();
            assert_eq!(
                existing.code(),
                Code::PermissionDenied,
                "{rpc:?} {existing:?}"
            );
            assert_eq!(
                (
                    existing.code(),
                    existing.message().replace(OTHER, "ACCOUNT")
                ),
                (never.code(), never.message().replace(GHOST, "ACCOUNT")),
                "{token} {rpc:?}"
            );
        }
    }
    // The admin of every account sees the difference: the resource exists in one only.
    let admin = fx
        .call(Rpc::GetIntegration, GHOST, Some(TEST_ADMIN_TOKEN))
        .await;
    assert_eq!(admin.unwrap_err().code(), Code::NotFound);
    fx.stack.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_file_is_reloaded_and_a_bad_one_keeps_the_last_good_tokens() -> anyhow::Result<()>
{
    let path = std::sync::Arc::new(std::sync::Mutex::new(None));
    let kept = path.clone();
    let stack = Stack::start_with(move |config, dir| {
        let file = dir.join("tokens.json");
        write_token_file(
            &file,
            &[
                entry("one", "tok-one", "viewer", Accounts::All),
                entry("worker", TEST_WORKER_TOKEN, "worker", Accounts::All),
            ],
        )?;
        config.access.token_file = Some(file.clone());
        *kept.lock().expect("not poisoned") = Some(file);
        Ok(())
    })
    .await?;
    let file = path
        .lock()
        .expect("not poisoned")
        .clone()
        .context("token file")?;
    let list = |token: &'static str| {
        let ch = with_token(stack.raw_channel(), Some(token));
        async move {
            pb::integration_service_client::IntegrationServiceClient::new(ch)
                .list_integrations(pb::ListIntegrationsRequest {
                    parent: OWN.into(),
                    ..Default::default()
                })
                .await
                .map(drop)
                .map_err(|s| s.code())
        }
    };
    assert_eq!(list("tok-one").await, Ok(()));
    assert_eq!(list("tok-two").await, Err(Code::Unauthenticated));

    // A new file: tok-two in, tok-one out, within a few reload intervals.
    write_token_file(
        &file,
        &[
            entry("two", "tok-two", "viewer", Accounts::All),
            entry("worker", TEST_WORKER_TOKEN, "worker", Accounts::All),
        ],
    )?;
    eventually("the new token accepted", RELOAD_INTERVAL * 5, || async {
        let answer = list("tok-two").await;
        Ok(Poll::when(answer.is_ok(), answer))
    })
    .await?;
    assert_eq!(list("tok-one").await, Err(Code::Unauthenticated));

    // An invalid file is not taken: the last good tokens stay, however long it is there, and
    // /readyz and the token_file_applied gauge say that the file is not in force.
    let http = stack.cp.http_addr;
    write_atomically(&file, "{\"tokens\": [{\"name\": \"x\"")?;
    let readyz = eventually(
        "/readyz names the token file",
        RELOAD_INTERVAL * 5,
        || async {
            let (status, body) = http_get(http, "/readyz").await?;
            // Still ready: the previous tokens work, and a mistake in a file every replica
            // mounts must not take them all out of their Service.
            Ok(if status == 200 && body.contains("token file") {
                Poll::Ready(body)
            } else {
                Poll::not_yet((status, body))
            })
        },
    )
    .await?;
    assert!(
        readyz.contains("warning: token file not applied, the previous tokens stay in use")
            && readyz.contains("not JSON"),
        "{readyz}"
    );
    let (_, metrics) = http_get(http, "/metrics").await?;
    assert!(
        metrics
            .lines()
            .any(|l| l == "pushwire_token_file_applied 0"),
        "{metrics}"
    );
    assert_eq!(list("tok-two").await, Ok(()));
    assert_eq!(list("tok-one").await, Err(Code::Unauthenticated));

    // Emptied in an emergency: every token of the file is refused.
    write_atomically(&file, "")?;
    eventually(
        "the emptied file's tokens refused",
        RELOAD_INTERVAL * 5,
        || async {
            let answer = list("tok-two").await;
            Ok(Poll::when(answer == Err(Code::Unauthenticated), answer))
        },
    )
    .await?;
    let (_, metrics) = http_get(http, "/metrics").await?;
    assert!(
        metrics
            .lines()
            .any(|l| l == "pushwire_token_file_applied 1"),
        "{metrics}"
    );
    let (_, readyz) = http_get(http, "/readyz").await?;
    assert!(!readyz.contains("token file"), "{readyz}");
    stack.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_token_file_refuses_the_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("tokens.json");
    std::fs::write(
        &file,
        r#"{"tokens": [{"name": "x", "sha256": "not-a-hash", "role": "admin", "accounts": "*"}]}"#,
    )?;
    let mut config = test_config(&pushwire_tests::control_plane::Backend::Embedded(
        dir.path().join("data"),
    ));
    config.access.token_file = Some(file);
    let listeners = pushwire_control_plane::Listeners {
        grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        http: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let result = tokio::time::timeout(
        WAIT,
        pushwire_control_plane::run(config, listeners, shutdown.clone()),
    )
    .await
    .context("the control plane started with an invalid token file")?;
    let err = result.expect_err("refused");
    let chain = format!("{:?}", anyhow::Error::new(err));
    assert!(
        chain.contains("tokens.json") && chain.contains("tokens[0].sha256"),
        "{chain}"
    );
    Ok(())
}
