//! DeliveryService end to end: a control plane reading a real PostgreSQL or SQLite delivery
//! store, whose rows are written here through the store trait (`hand_off`, `record_outcomes`),
//! as a worker would. Listing, filters and paging, one delivery's attempts, stats,
//! redelivery, access, retention and bad input.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use pushwire_common::delivery_store::{
    self, Attempt, ClaimRequest, DeliveryKey, DeliveryStore, INCOMPLETE_SKIP_PREFIX, NewDelivery,
    OpenOptions, Outcome, StoreUrl,
};
use pushwire_common::domain::IntegrationName;
use pushwire_common::pb::v1 as pb;
use pushwire_tests::control_plane::{
    AuthChannel, ControlPlane, TEST_ADMIN_TOKEN, TEST_WORKER_TOKEN, test_config, with_token,
};
use pushwire_tests::eventually::{Poll, eventually};
use pushwire_tests::postgres::PostgresServer;
use pushwire_tests::tokens::{Accounts, entry, write_token_file};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;

type Client = pb::delivery_service_client::DeliveryServiceClient<AuthChannel>;

fn integration(account: &str, id: &str) -> IntegrationName {
    IntegrationName::parse(&format!("accounts/{account}/integrations/{id}")).unwrap()
}

fn key(account: &str, id: &str, participation: &str) -> DeliveryKey {
    DeliveryKey::new(integration(account, id), participation)
}

/// A delivery of `key` on `campaign`, first tried at `at`, with `outcome`.
fn delivery(key: DeliveryKey, campaign: &str, outcome: Outcome, at: SystemTime) -> NewDelivery {
    let status = match outcome {
        Outcome::Delivered => Some(200),
        Outcome::Failed => Some(400),
        Outcome::Queued { .. } => Some(503),
        Outcome::Skipped { .. } => None,
    };
    let attempts = match outcome {
        Outcome::Skipped { .. } => vec![],
        _ => vec![Attempt {
            time: at,
            status_code: status,
            error_class: (status != Some(200)).then(|| "status".to_owned()),
            error_message: (status != Some(200)).then(|| format!("HTTP {}", status.unwrap())),
            duration: Duration::from_millis(15),
        }],
    };
    let body = Bytes::from(format!(
        r#"{{"id":"{}","campaign":{{"id":{campaign}}}}}"#,
        key.participation_id
    ));
    NewDelivery {
        key,
        campaign_id: campaign.into(),
        website_id: Some("3".into()),
        trace: None,
        outcome,
        attempts,
        body: Some(body),
    }
}

/// A delivery store (PostgreSQL or an SQLite file) kept alive for a test.
struct StoreBackend {
    url: String,
    _postgres: Option<PostgresServer>,
    _dir: tempfile::TempDir,
}

impl StoreBackend {
    async fn postgres() -> Self {
        let server = tokio::task::spawn_blocking(PostgresServer::start)
            .await
            .unwrap()
            .expect("starting PostgreSQL");
        let url = server.create_database("deliveries").unwrap();
        Self {
            url,
            _postgres: Some(server),
            _dir: tempfile::tempdir().unwrap(),
        }
    }

    fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "sqlite://{}",
            dir.path().join("deliveries.sqlite3").display()
        );
        Self {
            url,
            _postgres: None,
            _dir: dir,
        }
    }

    async fn store(&self) -> Arc<dyn DeliveryStore> {
        delivery_store::open(
            &StoreUrl::parse(&self.url).unwrap(),
            &OpenOptions::default(),
        )
        .await
        .expect("opening the delivery store")
    }

    /// A control plane on the embedded config store reading this delivery store.
    async fn control_plane(
        &self,
        edit: impl FnOnce(&mut pushwire_control_plane::Config),
    ) -> ControlPlane {
        let backend =
            pushwire_tests::control_plane::Backend::Embedded(self._dir.path().join("data"));
        let mut config = test_config(&backend);
        config.delivery.delivery_store = Some(StoreUrl::parse(&self.url).unwrap().into());
        edit(&mut config);
        ControlPlane::start(config).await.expect("control plane")
    }
}

async fn client(cp: &ControlPlane, token: Option<&str>) -> Client {
    Client::new(with_token(cp.raw_channel().await.unwrap(), token))
}

fn list(parent: &str, filter: &str, size: i32, token: &str) -> pb::ListDeliveriesRequest {
    pb::ListDeliveriesRequest {
        parent: parent.into(),
        filter: filter.into(),
        page_size: size,
        page_token: token.into(),
    }
}

fn ts(time: SystemTime) -> Option<prost_types::Timestamp> {
    Some(time.into())
}

#[tokio::test]
async fn postgres_log_stats_and_redelivery() {
    log_stats_and_redelivery(&StoreBackend::postgres().await).await;
}

#[tokio::test]
async fn sqlite_log_stats_and_redelivery() {
    log_stats_and_redelivery(&StoreBackend::sqlite()).await;
}

async fn log_stats_and_redelivery(backend: &StoreBackend) {
    let store = backend.store().await;
    let now = SystemTime::now();
    let ago = |secs: u64| now - Duration::from_secs(secs);
    let incomplete = format!("{INCOMPLETE_SKIP_PREFIX}STARTED; completed only");
    let rows = vec![
        delivery(key("42", "crm", "p1"), "7", Outcome::Delivered, ago(600)),
        delivery(key("42", "crm", "p2"), "7", Outcome::Failed, ago(500)),
        delivery(key("42", "crm", "p3"), "8", Outcome::Failed, ago(400)),
        delivery(
            key("42", "crm", "p4"),
            "8",
            Outcome::Skipped { reason: incomplete },
            ago(300),
        ),
        delivery(key("42", "erp", "p1"), "7", Outcome::Delivered, ago(600)),
        delivery(key("43", "crm", "p9"), "7", Outcome::Failed, ago(200)),
    ];
    for row in &rows {
        let at = row.attempts.first().map_or(ago(300), |a| a.time);
        store
            .record_outcomes(std::slice::from_ref(row), at)
            .await
            .unwrap();
    }
    let queued = delivery(
        key("42", "crm", "p5"),
        "7",
        Outcome::Queued {
            next_attempt: ago(50) + Duration::from_secs(3600),
        },
        ago(100),
    );
    store.hand_off(&[queued], ago(100)).await.unwrap();
    let cp = backend.control_plane(|_| {}).await;
    let mut api = client(&cp, Some(TEST_ADMIN_TOKEN)).await;

    // An integration's failures, newest first.
    let failures = api
        .list_deliveries(list(
            "accounts/42/integrations/crm",
            "state = FAILED",
            0,
            "",
        ))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = failures
        .deliveries
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "accounts/42/integrations/crm/deliveries/p3",
            "accounts/42/integrations/crm/deliveries/p2"
        ]
    );
    assert_eq!(failures.deliveries[0].last_status_code, 400);
    assert_eq!(failures.deliveries[0].state(), pb::DeliveryState::Failed);
    assert!(failures.deliveries[0].attempts.is_empty());
    assert!(failures.next_page_token.is_empty());

    // Paging the account, two at a time, while newer deliveries arrive: each one once.
    let mut seen = Vec::new();
    let mut token = String::new();
    for n in 0.. {
        let page = api
            .list_deliveries(list("accounts/42", "", 2, &token))
            .await
            .unwrap()
            .into_inner();
        assert!(page.deliveries.len() <= 2);
        seen.extend(page.deliveries.into_iter().map(|d| d.name));
        let newer = delivery(
            key("42", "crm", &format!("new{n}")),
            "7",
            Outcome::Delivered,
            now,
        );
        store.record_outcomes(&[newer], now).await.unwrap();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let expected: Vec<String> = [
        "crm/deliveries/p5",
        "crm/deliveries/p4",
        "crm/deliveries/p3",
    ]
    .into_iter()
    .chain([
        "crm/deliveries/p2",
        "crm/deliveries/p1",
        "erp/deliveries/p1",
    ])
    .map(|tail| format!("accounts/42/integrations/{tail}"))
    .collect();
    assert_eq!(seen, expected);

    // A page token belongs to its listing.
    let first = api
        .list_deliveries(list("accounts/42", "", 1, ""))
        .await
        .unwrap()
        .into_inner();
    let err = api
        .list_deliveries(list(
            "accounts/42",
            "state = FAILED",
            1,
            &first.next_page_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("page_token"), "{}", err.message());

    // One delivery's attempts.
    let p2 = api
        .get_delivery(pb::GetDeliveryRequest {
            name: "accounts/42/integrations/crm/deliveries/p2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p2.participation_id, "p2");
    assert_eq!(p2.campaign_id, "7");
    assert_eq!(p2.attempts.len(), 1);
    assert_eq!(p2.attempts[0].status_code, 400);
    assert_eq!(p2.attempts[0].error, "status: HTTP 400");
    assert_eq!(p2.attempts[0].duration_ms, 15);
    assert!(p2.body_retained);
    let missing = api
        .get_delivery(pb::GetDeliveryRequest {
            name: "accounts/42/integrations/crm/deliveries/nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // Stats per campaign of the integration, over the hour before the paging began.
    let stats = api
        .get_delivery_stats(pb::GetDeliveryStatsRequest {
            parent: "accounts/42/integrations/crm".into(),
            start_time: ts(ago(3600)),
            end_time: ts(ago(1)),
            group_by: vec![pb::DeliveryStatsGroup::Campaign.into()],
        })
        .await
        .unwrap()
        .into_inner();
    let counts: Vec<_> = stats
        .groups
        .iter()
        .map(|g| {
            (
                g.campaign_id.as_str(),
                [
                    g.delivered,
                    g.failed,
                    g.skipped,
                    g.skipped_incomplete,
                    g.queued,
                ],
            )
        })
        .collect();
    assert_eq!(counts, [("7", [1, 1, 0, 0, 1]), ("8", [0, 1, 0, 1, 0])]);

    // Redelivering the failures since a time: FAILED only by default, this integration only.
    let since = humantime::format_rfc3339_seconds(ago(450)).to_string();
    let redelivered = api
        .redeliver_deliveries(pb::RedeliverDeliveriesRequest {
            parent: "accounts/42/integrations/crm".into(),
            filter: format!("create_time >= \"{since}\""),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(redelivered.redelivered, 1, "p3 only");
    let p3 = api
        .get_delivery(pb::GetDeliveryRequest {
            name: "accounts/42/integrations/crm/deliveries/p3".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p3.state(), pb::DeliveryState::Queued);
    // A claim returns it, with the same key (so the same webhook-id).
    let claimed = store
        .claim_due(&ClaimRequest {
            worker: "w".into(),
            lease: Duration::from_secs(30),
            now: SystemTime::now(),
            limit: 10,
            max_per_integration: 0,
            exclude: vec![],
        })
        .await
        .unwrap();
    let claimed: Vec<_> = claimed.iter().map(|c| c.lease.key.webhook_id()).collect();
    assert_eq!(claimed, ["p3_crm"]);

    // Bad filters name the problem.
    for (filter, problem) in [
        ("state = LOST", "unknown state"),
        ("state = FAILED OR state = QUEUED", "OR is not supported"),
        ("create_time >= \"last week\"", "RFC 3339"),
        ("colour = red", "unknown field"),
    ] {
        let err = api
            .list_deliveries(list("accounts/42", filter, 0, ""))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{filter}");
        assert!(
            err.message().contains("filter") && err.message().contains(problem),
            "{filter}: {}",
            err.message()
        );
        let err = api
            .redeliver_deliveries(pb::RedeliverDeliveriesRequest {
                parent: "accounts/42/integrations/crm".into(),
                filter: filter.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{filter}");
    }
}

const ADMIN_42: &str = "deliveries-admin-42";
const VIEWER_42: &str = "deliveries-viewer-42";
const PUBLISHER_42: &str = "deliveries-publisher-42";
const ADMIN_43: &str = "deliveries-admin-43";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rpc {
    List,
    ListIntegration,
    Get,
    Stats,
    Redeliver,
}

async fn call(api: &mut Client, rpc: Rpc, account: &str) -> Result<(), tonic::Status> {
    let parent = format!("accounts/{account}");
    let crm = format!("accounts/{account}/integrations/crm");
    match rpc {
        Rpc::List => api
            .list_deliveries(list(&parent, "", 0, ""))
            .await
            .map(drop),
        Rpc::ListIntegration => api.list_deliveries(list(&crm, "", 0, "")).await.map(drop),
        Rpc::Get => api
            .get_delivery(pb::GetDeliveryRequest {
                name: format!("{crm}/deliveries/p1"),
            })
            .await
            .map(drop),
        Rpc::Stats => api
            .get_delivery_stats(pb::GetDeliveryStatsRequest {
                parent,
                start_time: ts(SystemTime::now() - Duration::from_secs(3600)),
                end_time: ts(SystemTime::now() + Duration::from_secs(60)),
                group_by: vec![],
            })
            .await
            .map(drop),
        Rpc::Redeliver => api
            .redeliver_deliveries(pb::RedeliverDeliveriesRequest {
                parent: crm,
                filter: String::new(),
            })
            .await
            .map(drop),
    }
}

#[tokio::test]
async fn every_delivery_call_checks_the_role_and_the_account() {
    let backend = StoreBackend::sqlite();
    let store = backend.store().await;
    for account in ["42", "43"] {
        let d = delivery(
            key(account, "crm", "p1"),
            "7",
            Outcome::Failed,
            SystemTime::now(),
        );
        store
            .record_outcomes(&[d], SystemTime::now())
            .await
            .unwrap();
    }
    let tokens = backend._dir.path().join("tokens.json");
    write_token_file(
        &tokens,
        &[
            entry(
                "admin 42",
                ADMIN_42,
                "admin",
                Accounts::Only(&["accounts/42"]),
            ),
            entry(
                "viewer 42",
                VIEWER_42,
                "viewer",
                Accounts::Only(&["accounts/42"]),
            ),
            entry(
                "publisher 42",
                PUBLISHER_42,
                "publisher",
                Accounts::Only(&["accounts/42"]),
            ),
            entry(
                "admin 43",
                ADMIN_43,
                "admin",
                Accounts::Only(&["accounts/43"]),
            ),
            entry("worker", TEST_WORKER_TOKEN, "worker", Accounts::All),
        ],
    )
    .unwrap();
    let cp = backend
        .control_plane(|config| config.access.token_file = Some(tokens.clone()))
        .await;
    let rpcs = [
        Rpc::List,
        Rpc::ListIntegration,
        Rpc::Get,
        Rpc::Stats,
        Rpc::Redeliver,
    ];
    for (token, role_may_read, role_may_redeliver, own) in [
        (Some(ADMIN_42), true, true, "42"),
        (Some(VIEWER_42), true, false, "42"),
        (Some(PUBLISHER_42), false, false, "42"),
        (Some(TEST_WORKER_TOKEN), false, false, "*"),
        (Some("not-a-token"), false, false, "-"),
        (None, false, false, "-"),
    ] {
        let mut api = client(&cp, token).await;
        for rpc in rpcs {
            for account in ["42", "43"] {
                let got = call(&mut api, rpc, account).await.err().map(|s| s.code());
                let allowed = if rpc == Rpc::Redeliver {
                    role_may_redeliver
                } else {
                    role_may_read
                };
                let expected = match token {
                    None | Some("not-a-token") => Some(Code::Unauthenticated),
                    _ if !allowed => Some(Code::PermissionDenied),
                    _ if own != account => Some(Code::PermissionDenied),
                    _ => None,
                };
                assert_eq!(got, expected, "{token:?} {rpc:?} accounts/{account}");
            }
        }
    }
    // A token of account 43 gets the same answer for 42's delivery that exists and one that
    // does not.
    let mut other = client(&cp, Some(ADMIN_43)).await;
    for participation in ["p1", "absent"] {
        let err = other
            .get_delivery(pb::GetDeliveryRequest {
                name: format!("accounts/42/integrations/crm/deliveries/{participation}"),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
    }
}

#[tokio::test]
async fn without_a_delivery_store_the_service_names_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let backend = pushwire_tests::control_plane::Backend::Embedded(dir.path().join("data"));
    let cp = ControlPlane::start(test_config(&backend)).await.unwrap();
    let mut api = client(&cp, Some(TEST_ADMIN_TOKEN)).await;
    let err = api
        .list_deliveries(list("accounts/42", "", 0, ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("--delivery-store"),
        "{}",
        err.message()
    );
}

/// The samples of the control plane's `/metrics`.
async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut text = String::new();
    conn.read_to_string(&mut text).await?;
    Ok(text)
}

#[tokio::test]
async fn retention_removes_what_is_older_and_keeps_the_rest() {
    let backend = StoreBackend::sqlite();
    let store = backend.store().await;
    let now = SystemTime::now();
    let hours = |h: u64| now - Duration::from_secs(h * 3600);
    for (participation, outcome, at) in [
        ("old", Outcome::Failed, hours(3)),
        ("recent", Outcome::Delivered, hours(1)),
    ] {
        let d = delivery(key("42", "crm", participation), "7", outcome, at);
        store.record_outcomes(&[d], at).await.unwrap();
    }
    let old_queued = delivery(
        key("42", "crm", "queued"),
        "7",
        Outcome::Queued { next_attempt: now },
        hours(5),
    );
    store.hand_off(&[old_queued], hours(5)).await.unwrap();
    let cp = backend
        .control_plane(|config| config.deliveries.delivery_retention = Duration::from_secs(7200))
        .await;
    eventually(
        "retention to purge the delivery older than 2 h",
        Duration::from_secs(20),
        || async {
            let metrics = scrape(cp.http_addr).await?;
            let done = metrics.contains("pushwire_delivery_store_purged_rows_total 1")
                && metrics.contains("pushwire_delivery_store_rows 2");
            Ok(Poll::when(
                done,
                metrics
                    .lines()
                    .filter(|l| l.contains("delivery_store"))
                    .collect::<Vec<_>>(),
            ))
        },
    )
    .await
    .unwrap();
    assert!(store.get(&key("42", "crm", "old")).await.unwrap().is_none());
    assert!(
        store
            .get(&key("42", "crm", "recent"))
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .get(&key("42", "crm", "queued"))
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn an_unreachable_delivery_store_leaves_the_rest_of_the_control_plane_serving() {
    let dir = tempfile::tempdir().unwrap();
    let backend = pushwire_tests::control_plane::Backend::Embedded(dir.path().join("data"));
    let mut config = test_config(&backend);
    // Nothing listens on port 1 of loopback.
    config.delivery.delivery_store = Some(
        StoreUrl::parse("postgres://pushwire@127.0.0.1:1/pushwire")
            .unwrap()
            .into(),
    );
    let cp = ControlPlane::start(config).await.unwrap();
    let mut api = client(&cp, Some(TEST_ADMIN_TOKEN)).await;
    let err = api
        .list_deliveries(list("accounts/42", "", 0, ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("not reachable"), "{}", err.message());
    let mut integrations = cp.integrations().await.unwrap();
    integrations
        .list_integrations(pb::ListIntegrationsRequest {
            parent: "accounts/42".into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap();
}
