//! Property tests (the fuzzing of issue 5) of admin-input validation, through the gRPC API of a
//! real control plane (embedded store, loopback port 0): any Create/Update request for
//! integrations and push scopes either succeeds or is refused with a clear code, an
//! INVALID_ARGUMENT names its field, and a refused call changes nothing.
//!
//! `cargo test` runs 64 cases (a few seconds). Run longer by hand:
//! `PROPTEST_CASES=5000 cargo test --release -p pushwire-control-plane --test validation_props`.

use std::net::SocketAddr;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use pushwire_common::pb::v1 as pb;
use pushwire_control_plane::{Config, Listeners};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

/// `default_cases` per property, unless `PROPTEST_CASES` says otherwise.
fn config(default_cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = default_cases;
    }
    config
}

/// The admin token of the server under test (every account).
const TOKEN: &str = "validation-props-admin-token";

/// `msg` as a request carrying [`TOKEN`].
fn authed<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}")
            .parse()
            .expect("an ASCII header value"),
    );
    req
}

/// Accounts the requests spread over: few enough that the per-account limits are reached.
const ACCOUNTS: usize = 6;
const MAX_INTEGRATIONS: usize = 6;
const MAX_SCOPES: usize = 8;

/// A control plane for the whole test, with its runtime.
struct Server {
    rt: Runtime,
    channel: Channel,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::defaults();
        config.data_dir = dir.path().join("data");
        config.allow_insecure_http = true;
        config.webhook.allow_cidr = vec!["127.0.0.0/8".into()];
        config.max_integrations_per_account = MAX_INTEGRATIONS;
        config.max_push_scopes_per_account = MAX_SCOPES;
        config.access.admin_token = Some(pushwire_common::domain::Secret::new(TOKEN));
        let shutdown = CancellationToken::new();
        let channel = rt.block_on(async {
            let listeners = Listeners {
                grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
                http: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            };
            let addr: SocketAddr = listeners.grpc.local_addr().unwrap();
            tokio::spawn(pushwire_control_plane::run(
                config,
                listeners,
                shutdown.clone(),
            ));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let connected = Channel::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect()
                    .await;
                if let Ok(channel) = connected {
                    // Serving once a list answers (the configuration is loaded).
                    let mut c = pb::integration_service_client::IntegrationServiceClient::new(
                        channel.clone(),
                    );
                    if c.list_integrations(authed(pb::ListIntegrationsRequest {
                        parent: "accounts/probe".into(),
                        ..Default::default()
                    }))
                    .await
                    .is_ok()
                    {
                        break channel;
                    }
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "control plane not serving"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Self {
            rt,
            channel,
            shutdown,
            _dir: dir,
        }
    }

    fn integrations(&self) -> pb::integration_service_client::IntegrationServiceClient<Channel> {
        pb::integration_service_client::IntegrationServiceClient::new(self.channel.clone())
    }

    fn scopes(&self) -> pb::push_scope_service_client::PushScopeServiceClient<Channel> {
        pb::push_scope_service_client::PushScopeServiceClient::new(self.channel.clone())
    }

    /// Every integration and scope of every test account, as the API lists them.
    fn state(&self) -> (Vec<pb::Integration>, Vec<pb::PushScope>) {
        self.rt.block_on(async {
            let (mut integrations, mut scopes) = (Vec::new(), Vec::new());
            for a in 0..ACCOUNTS {
                let parent = format!("accounts/fz{a}");
                integrations.extend(
                    self.integrations()
                        .list_integrations(authed(pb::ListIntegrationsRequest {
                            parent: parent.clone(),
                            page_size: 1000,
                            ..Default::default()
                        }))
                        .await
                        .unwrap()
                        .into_inner()
                        .integrations,
                );
                scopes.extend(
                    self.scopes()
                        .list_push_scopes(authed(pb::ListPushScopesRequest {
                            parent,
                            page_size: 1000,
                            ..Default::default()
                        }))
                        .await
                        .unwrap()
                        .into_inner()
                        .push_scopes,
                );
            }
            (integrations, scopes)
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Checks a refusal: an expected code, INVALID_ARGUMENT naming its field first, short text.
fn check_refusal(status: &tonic::Status) -> Result<(), TestCaseError> {
    prop_assert!(
        matches!(
            status.code(),
            Code::InvalidArgument
                | Code::AlreadyExists
                | Code::NotFound
                | Code::FailedPrecondition
                | Code::ResourceExhausted
                | Code::Aborted
        ),
        "{status:?}"
    );
    let message = status.message();
    prop_assert!(!message.is_empty(), "{status:?}");
    prop_assert!(message.chars().count() < 600, "{} chars", message.len());
    if status.code() == Code::InvalidArgument {
        let field = message.split(": ").next().unwrap_or_default();
        let named = !field.is_empty()
            && field.split('.').all(|part| {
                let name = part.split('[').next().unwrap_or_default();
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            });
        prop_assert!(
            named && message.len() > field.len() + 2,
            "no field named: {message:?}"
        );
    }
    if status.code() == Code::ResourceExhausted {
        prop_assert!(message.contains("--max-"), "{message:?}");
    }
    // Write-only values never come back.
    prop_assert!(!message.contains("s3cret"), "{message:?}");
    Ok(())
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z0-9-]{1,8}", ".{0,12}"]
}

fn account() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (0..ACCOUNTS).prop_map(|a| format!("accounts/fz{a}")),
        1 => text(),
    ]
}

fn integration_id() -> impl Strategy<Value = String> {
    prop_oneof![4 => "i[0-4]", 1 => Just(String::new()), 1 => text()]
}

fn url() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => "[a-z]{1,6}".prop_map(|h| format!("https://{h}.example.com/hook")),
        4 => (1..65535u16).prop_map(|p| format!("http://127.0.0.1:{p}/in")),
        2 => prop::sample::select(vec![
            "http://localhost/",
            "http://10.0.0.1/",
            "https://169.254.169.254/latest",
            "https://[::1]/",
            "https://[::ffff:192.168.0.1]/",
            "https://[64:ff9b::a00:1]/",
            "https://100.64.0.1/",
            "https://[fd00::1]/",
            "ftp://files.example.com/",
            "https://user:pw@x.example.com/",
            "https://x.example.com/#frag",
            "/relative",
        ])
        .prop_map(str::to_owned),
        1 => Just(format!("https://x.example.com/{}", "a".repeat(2100))),
        1 => text(),
    ]
}

fn auth_header() -> impl Strategy<Value = Option<pb::AuthHeader>> {
    let name = prop_oneof![
        10 => prop::sample::select(vec!["Authorization", "X-Api-Key"]).prop_map(str::to_owned),
        1 => prop::sample::select(vec!["Content-Type", "", "Bad Name"]).prop_map(str::to_owned),
        1 => text(),
        1 => Just("x".repeat(300)),
    ];
    let value = prop_oneof![
        10 => "Bearer s3cret-[a-z]{1,8}",
        1 => prop::sample::select(vec!["", " s3cret", "s3cret\r\nX-Evil: 1"]).prop_map(str::to_owned),
        1 => Just("s".repeat(5000)),
        1 => text(),
    ];
    prop_oneof![
        1 => Just(None),
        1 => (name, value).prop_map(|(name, value)| Some(pb::AuthHeader {
            name,
            value,
            value_set: false,
        })),
    ]
}

fn secret() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => Just(String::new()),
        // Plain secrets of 24 to 47 bytes (the minimum is 24), now and then too short.
        6 => "s3cret-[a-z]{17,40}",
        1 => "s3cret-[a-z]{1,16}",
        // A whsec_ key of 29 bytes (Standard Webhooks needs one) and one of 10 bytes (too short).
        3 => Just("whsec_cHJvcGVydHktdGVzdC1zaWduaW5nLWtleS0zMmI=".to_owned()),
        1 => Just("whsec_czNjcmV0LWtleQ==".to_owned()),
        1 => Just("whsec_not base64!".to_owned()),
        1 => Just("s".repeat(1025)),
        1 => text(),
    ]
}

/// Mostly values of the enum (`0..max`), now and then anything.
fn enum_value(max: i32) -> impl Strategy<Value = i32> {
    prop_oneof![20 => 0..max, 1 => any::<i32>()]
}

fn integration() -> impl Strategy<Value = pb::Integration> {
    (
        (
            prop_oneof![
                12 => "[A-Za-z][A-Za-z ]{0,19}",
                1 => text(),
                1 => Just("n".repeat(101)),
            ],
            url(),
            prop::option::of(any::<bool>()),
            prop_oneof![12 => Just(String::new()), 1 => text()],
        ),
        (
            enum_value(3),
            enum_value(3),
            prop::collection::vec(prop_oneof![20 => 1..3i32, 1 => enum_value(3)], 0..3),
        ),
        (
            auth_header(),
            secret(),
            prop_oneof![12 => Just(String::new()), 2 => "[1-9][0-9]{0,2}", 1 => text()],
        ),
    )
        .prop_map(
            |(
                (display_name, url, enabled, disabled_reason),
                (incomplete, variables, schemes),
                (auth_header, secret, etag),
            )| pb::Integration {
                display_name,
                url,
                enabled,
                disabled_reason,
                incomplete_participations: incomplete,
                payload_variables: variables,
                signature_schemes: schemes,
                auth_header,
                secret,
                etag,
                ..Default::default()
            },
        )
}

/// An update mask naming mostly fields of the resource (`fields`), now and then others.
fn update_mask(
    fields: &'static [&'static str],
) -> impl Strategy<Value = Option<prost_types::FieldMask>> {
    let path = prop_oneof![
        12 => prop::sample::select(fields).prop_map(str::to_owned),
        1 => prop::sample::select(vec!["integration", "display_name", "etag", "name"])
            .prop_map(str::to_owned),
        1 => text(),
    ];
    prop_oneof![
        1 => Just(None),
        1 => prop::collection::vec(path, 1..3)
            .prop_map(|paths| Some(prost_types::FieldMask { paths })),
    ]
}

const INTEGRATION_FIELDS: &[&str] = &[
    "display_name",
    "url",
    "enabled",
    "disabled_reason",
    "incomplete_participations",
    "payload_variables",
    "auth_header",
    "secret",
    "signature_schemes",
];
const SCOPE_FIELDS: &[&str] = &["integration", "level", "target_id", "audience", "action"];

/// A push scope of account `fz{account}` (mostly referring to an integration of it).
fn push_scope(account: usize) -> impl Strategy<Value = pb::PushScope> {
    (
        prop_oneof![
            12 => "i[0-4]".prop_map(move |i| format!("accounts/fz{account}/integrations/{i}")),
            1 => (0..ACCOUNTS, "i[0-4]").prop_map(|(a, i)| format!("accounts/fz{a}/integrations/{i}")),
            1 => text(),
        ],
        prop_oneof![20 => 1..5i32, 1 => enum_value(5)],
        prop_oneof![
            3 => Just(String::new()),
            6 => "[0-9]{1,4}",
            1 => text(),
            1 => Just("7".repeat(65)),
        ],
        enum_value(4),
        enum_value(3),
    )
        .prop_map(|(integration, level, target_id, audience, action)| {
            // The account level has no target id.
            let target_id = if level == 1 && target_id.bytes().all(|b| b.is_ascii_digit()) {
                String::new()
            } else {
                target_id
            };
            pb::PushScope {
                integration,
                level,
                target_id,
                audience,
                action,
                ..Default::default()
            }
        })
}

/// A change the test makes, and the resource it is about.
#[derive(Clone, Debug)]
enum Call {
    CreateIntegration(pb::CreateIntegrationRequest),
    UpdateIntegration(pb::UpdateIntegrationRequest),
    CreateScope(pb::CreatePushScopeRequest),
    UpdateScope(pb::UpdatePushScopeRequest),
}

fn call() -> impl Strategy<Value = Call> {
    let body = || prop_oneof![12 => integration().prop_map(Some), 1 => Just(None)];
    prop_oneof![
        3 => (account(), integration_id(), body()).prop_map(
            |(parent, integration_id, integration)| Call::CreateIntegration(
                pb::CreateIntegrationRequest { parent, integration_id, integration },
            )
        ),
        2 => (account(), integration_id(), body(), update_mask(INTEGRATION_FIELDS)).prop_map(
            |(account, id, integration, update_mask)| {
                let integration = integration.map(|mut i| {
                    i.name = format!("{account}/integrations/{id}");
                    i
                });
                Call::UpdateIntegration(pb::UpdateIntegrationRequest { integration, update_mask })
            }
        ),
        3 => (0..ACCOUNTS).prop_flat_map(|a| (
            prop_oneof![12 => Just(format!("accounts/fz{a}")), 1 => text()],
            prop_oneof![6 => "s[0-9]", 1 => Just(String::new()), 1 => text()],
            prop_oneof![12 => push_scope(a).prop_map(Some), 1 => Just(None)],
        ))
        .prop_map(|(parent, push_scope_id, push_scope)| Call::CreateScope(
            pb::CreatePushScopeRequest { parent, push_scope_id, push_scope },
        )),
        1 => (0..ACCOUNTS).prop_flat_map(|a| (Just(a), "s[0-9]", push_scope(a), update_mask(SCOPE_FIELDS)))
            .prop_map(|(a, id, mut push_scope, update_mask)| {
                push_scope.name = format!("accounts/fz{a}/pushScopes/{id}");
                Call::UpdateScope(pb::UpdatePushScopeRequest {
                    push_scope: Some(push_scope),
                    update_mask,
                })
            }),
    ]
}

/// The limits hold: no account holds more than the flags allow.
fn check_limits(state: &(Vec<pb::Integration>, Vec<pb::PushScope>)) -> Result<(), TestCaseError> {
    for a in 0..ACCOUNTS {
        let prefix = format!("accounts/fz{a}/");
        let integrations = state
            .0
            .iter()
            .filter(|i| i.name.starts_with(&prefix))
            .count();
        let scopes = state
            .1
            .iter()
            .filter(|s| s.name.starts_with(&prefix))
            .count();
        prop_assert!(integrations <= MAX_INTEGRATIONS, "{prefix}: {integrations}");
        prop_assert!(scopes <= MAX_SCOPES, "{prefix}: {scopes}");
    }
    Ok(())
}

#[test]
fn any_admin_change_succeeds_or_is_refused_cleanly_and_changes_nothing() {
    // The strategies are deep types: generating cases takes more than a test thread's stack
    // in debug builds.
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(admin_changes)
        .unwrap()
        .join()
        .unwrap();
}

fn admin_changes() {
    let server = Server::start();
    let mut runner = proptest::test_runner::TestRunner::new(config(64));
    let outcomes = std::sync::Mutex::new(std::collections::BTreeMap::<String, usize>::new());
    runner
        .run(&call(), |call| {
            let before = server.state();
            let outcome: Result<(), tonic::Status> = server.rt.block_on(async {
                match call.clone() {
                    Call::CreateIntegration(r) => server
                        .integrations()
                        .create_integration(authed(r))
                        .await
                        .map(drop),
                    Call::UpdateIntegration(r) => server
                        .integrations()
                        .update_integration(authed(r))
                        .await
                        .map(drop),
                    Call::CreateScope(r) => {
                        server.scopes().create_push_scope(authed(r)).await.map(drop)
                    }
                    Call::UpdateScope(r) => {
                        server.scopes().update_push_scope(authed(r)).await.map(drop)
                    }
                }
            });
            let after = server.state();
            let label = match &outcome {
                Ok(()) => "OK".to_owned(),
                Err(s) => format!("{:?}", s.code()),
            };
            *outcomes.lock().unwrap().entry(label).or_default() += 1;
            match outcome {
                Err(status) => {
                    check_refusal(&status)?;
                    // Nothing half-written: every resource as it was, etags included.
                    prop_assert_eq!(&after, &before, "changed by refused {:?}", status);
                }
                Ok(()) => {
                    let created = matches!(call, Call::CreateIntegration(_) | Call::CreateScope(_));
                    let count =
                        |s: &(Vec<pb::Integration>, Vec<pb::PushScope>)| s.0.len() + s.1.len();
                    if created {
                        prop_assert_eq!(count(&after), count(&before) + 1);
                    } else {
                        prop_assert_eq!(count(&after), count(&before));
                    }
                }
            }
            check_limits(&after)
        })
        .unwrap();
    // The cases are not all refused, nor all accepted.
    let outcomes = outcomes.into_inner().unwrap();
    eprintln!("outcomes: {outcomes:?}");
    assert!(outcomes.get("OK").is_some_and(|&n| n > 0), "{outcomes:?}");
    assert!(
        outcomes.get("InvalidArgument").is_some_and(|&n| n > 0),
        "{outcomes:?}"
    );
}
