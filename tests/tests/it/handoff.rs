//! The durable hand-off (DESIGN §3, §4): a dead endpoint's participations mixed into a stream
//! are QUEUED while the healthy ones keep arriving; a worker killed while holding leased
//! retries loses nothing (another worker delivers them once the leases run out); a standalone
//! worker without a delivery store refuses to start.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use pushwire_common::delivery_store::{DeliveryKey, DeliveryState, StoreUrl};
use pushwire_common::domain::{IntegrationName, Secret};
use pushwire_common::pb::v1 as pb;
use pushwire_common::publisher::{Publisher, PublisherOptions, ReceiptStatus};
use pushwire_tests::admin::{integration, scope};
use pushwire_tests::eventually::{Poll, eventually, within};
use pushwire_tests::faults::{
    ACCOUNT, ControlPlaneProc, DELIVERY_STORE_FILE, PUBLISHER_TOKEN, Store, WorkerFlags,
    WorkerProc, http_get,
};
use pushwire_tests::receiver::{Reply, TestReceiver};
use pushwire_tests::worker::{Stack, participation, request};

const CONTROL_PLANE: &str = env!("CARGO_BIN_EXE_pushwire-control-plane-under-test");
const WORKER: &str = env!("CARGO_BIN_EXE_pushwire-worker-under-test");

/// Hang guard of every test body.
const LIMIT: Duration = Duration::from_secs(90);

/// One Publish stream carries 200 participations of three healthy accounts and, every fifth,
/// of a dead account whose two integrations are an endpoint that accepts and never answers
/// and one that refuses connections. Every healthy participation is DELIVERED, and all of them
/// are acknowledged before the first attempt stuck on the silent endpoint ends (its request
/// timeout): the window never waits on the dead account. Every dead participation is QUEUED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_mixed_into_a_stream_stalls_no_one() -> anyhow::Result<()> {
    within("the test body", LIMIT, async {
        const N: usize = 200;
        let stack = Stack::start_with(|c, _| {
            // Long enough that the healthy traffic is done before a silent attempt ends.
            c.webhook.request_timeout = Duration::from_secs(8);
            c.ingest.window = 64;
            // Retries far away: the test watches the first attempts.
            c.delivery.retry_schedule =
                pushwire_worker::config::Schedule(vec![Duration::from_secs(600)]);
            c.delivery.retry_window = Duration::from_secs(3600);
            Ok(())
        })
        .await?;
        let healthy = TestReceiver::http().await?;
        let silent = TestReceiver::http().await?;
        silent.set_default(Reply::hang());
        let refused = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            format!("http://{}/", l.local_addr()?)
        };
        let admin = stack.admin();
        for a in ["h1", "h2", "h3"] {
            let account = format!("accounts/{a}");
            admin
                .create_routed(&account, "crm", integration("CRM", &healthy.url("/")))
                .await?;
        }
        let dead = "accounts/dead";
        let silent_name = admin
            .create_routed(dead, "silent", integration("Silent", &silent.url("/")))
            .await?;
        let refused_name = admin
            .create_routed(dead, "refused", integration("Refused", &refused))
            .await?;
        stack.sync().await?;

        let mut stream = stack.open_stream().await?;
        let sender = stream.sender();
        let accounts = ["accounts/h1", "accounts/h2", "accounts/h3"];
        let is_dead = |i: usize| i.is_multiple_of(5);
        let publisher = tokio::spawn(async move {
            for i in 0..N {
                let account = if is_dead(i) { dead } else { accounts[i % 3] };
                let json = participation(&format!("M-{i}"), 418207, Some(5120), true);
                let req = pb::PublishRequest {
                    request_id: format!("{i}"),
                    ..request(account, &json)
                };
                if sender.send(req).await.is_err() {
                    break;
                }
            }
        });
        // In the order they come.
        let mut order = Vec::new();
        let mut responses = BTreeMap::new();
        while responses.len() < N {
            let resp = stream
                .next(Duration::from_secs(30))
                .await?
                .map_err(|s| anyhow::anyhow!("stream ended: {s:?}"))?
                .ok_or_else(|| anyhow::anyhow!("stream ended after {}", responses.len()))?;
            let i: usize = resp.request_id.parse()?;
            order.push(i);
            responses.insert(i, resp);
        }
        publisher.await?;

        let mut stuck_positions = Vec::new();
        for (position, i) in order.iter().enumerate() {
            let resp = &responses[i];
            if !is_dead(*i) {
                let [d] = resp.deliveries.as_slice() else {
                    anyhow::bail!("{i}: {resp:?}");
                };
                assert_eq!(d.outcome(), pb::DeliveryOutcome::Delivered, "{i}: {d:?}");
                continue;
            }
            assert_eq!(resp.deliveries.len(), 2, "{i}: {resp:?}");
            for d in &resp.deliveries {
                assert_eq!(d.outcome(), pb::DeliveryOutcome::Queued, "{i}: {d:?}");
                assert!(d.next_attempt_time.is_some(), "{i}: {d:?}");
                assert!(d.integration == silent_name || d.integration == refused_name);
                if d.integration == silent_name && d.last_error.contains("timed out") {
                    stuck_positions.push(position);
                }
            }
        }
        let last_healthy = order
            .iter()
            .rposition(|i| !is_dead(*i))
            .expect("healthy participations");
        let first_stuck = stuck_positions.iter().min().copied();
        assert!(
            first_stuck.is_some_and(|p| p > last_healthy),
            "every healthy participation acknowledged before a silent attempt ended: last \
             healthy at {last_healthy}, first timed-out at {first_stuck:?}"
        );
        assert_eq!(healthy.received_count(), N - N / 5);

        // Durable: the store holds them, queued.
        let store = stack.delivery_store().await?;
        let key = DeliveryKey::new(IntegrationName::parse(&refused_name)?, "M-0");
        let record = store.get(&key).await?.expect("stored");
        assert_eq!(record.state, DeliveryState::Queued);
        assert!(record.body_retained);
        Ok(())
    })
    .await?
}

/// Worker 1 alone holds leases on retries in flight to an endpoint that hangs when it is
/// SIGKILLed. Worker 2, sharing its delivery store, claims them once the leases (2 s) run out
/// and delivers every one; its metrics count the lease expiries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_s_leased_retries_are_delivered_by_another() -> anyhow::Result<()> {
    within("the test body", LIMIT, async {
        const K: usize = 12;
        let dir = tempfile::tempdir()?;
        let cp = ControlPlaneProc::start(
            Path::new(CONTROL_PLANE),
            dir.path(),
            &Store::Embedded(dir.path().join("data")),
        )
        .await?;
        let receiver = TestReceiver::http().await?;
        receiver.set_default(Reply::status(503));
        let admin = cp.admin().await?;
        let crm = admin
            .create_integration(ACCOUNT, "crm", integration("CRM", &receiver.url("/")))
            .await?
            .name;
        let created = admin
            .create_scope(ACCOUNT, "all", scope(&crm, pb::PushScopeLevel::Account, ""))
            .await?;
        let revision: i64 = created.etag.parse()?;
        let flags = WorkerFlags {
            retry_schedule: format!("50ms{}", ",50ms".repeat(30)),
            retry_window: "10m".into(),
            request_timeout: "60s".into(),
            delivery_lease: "2s".into(),
            breaker_threshold: 100_000,
            ..WorkerFlags::default()
        };
        let bin = Path::new(WORKER);
        let mut w1 = WorkerProc::start(bin, dir.path(), 1, &cp.url(), &flags).await?;
        w1.wait_revision(revision, Duration::from_secs(15)).await?;

        let publisher = Publisher::connect(
            &[w1.url()],
            ACCOUNT,
            PublisherOptions {
                token: Some(Secret::new(PUBLISHER_TOKEN)),
                ..PublisherOptions::default()
            },
        )?;
        publisher
            .wait_connected(Duration::from_secs(10))
            .await
            .map_err(anyhow::Error::msg)?;
        // The first attempts fail (503): every one is QUEUED. Then the retries hang.
        let mut pending = Vec::new();
        for i in 0..K {
            let json = participation(&format!("L-{i}"), 418207, Some(5120), true);
            pending.push(publisher.publish(request(ACCOUNT, &json)).await);
        }
        for p in pending {
            let receipt = p.await;
            assert_eq!(receipt.status(), ReceiptStatus::Done, "{receipt:?}");
            let resp = receipt
                .outcome
                .as_ref()
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            assert_eq!(
                resp.deliveries[0].outcome(),
                pb::DeliveryOutcome::Queued,
                "{resp:?}"
            );
        }
        receiver.set_default(Reply::hang());
        // Every delivery's first retry is in flight, under worker 1's lease.
        eventually("every retry in flight", Duration::from_secs(20), || async {
            let n = receiver.received_count();
            Ok(Poll::when(n >= 2 * K, n))
        })
        .await?;
        w1.process.kill().await?;
        publisher.close().await;

        receiver.set_default(Reply::ok());
        let w2 = WorkerProc::start(bin, dir.path(), 2, &cp.url(), &flags).await?;
        let store = pushwire_common::delivery_store::open(
            &StoreUrl::sqlite(dir.path().join(DELIVERY_STORE_FILE)),
            &Default::default(),
        )
        .await?;
        let name = IntegrationName::parse(&crm)?;
        for i in 0..K {
            let key = DeliveryKey::new(name.clone(), format!("L-{i}"));
            eventually("delivered by worker 2", Duration::from_secs(30), || async {
                let r = store.get(&key).await?;
                Ok(match r {
                    Some(r) if r.state == DeliveryState::Delivered => Poll::Ready(()),
                    other => Poll::not_yet(other.map(|r| (r.state, r.attempt_count))),
                })
            })
            .await?;
        }
        let (_, metrics) = http_get(w2.http, "/metrics").await?;
        let expiries = metrics
            .lines()
            .find_map(|l| l.strip_prefix("pushwire_worker_lease_expiries_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_default();
        assert!(expiries >= 1.0, "lease expiries counted:\n{metrics}");
        Ok(())
    })
    .await?
}

/// A standalone worker started without `--delivery-store` exits at once with an error naming
/// the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_worker_without_a_delivery_store_refuses_to_start() -> anyhow::Result<()> {
    within("the test body", LIMIT, async {
        let out = tokio::process::Command::new(WORKER)
            .args([
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--control-plane",
                "http://127.0.0.1:9",
            ])
            .env_remove("PUSHWIRE_DELIVERY_STORE")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await?;
        assert!(!out.status.success(), "{:?}", out.status);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("--delivery-store"), "{text}");
        assert!(text.contains("no delivery store"), "{text}");

        // A password in a bad URL is never shown.
        let out = tokio::process::Command::new(WORKER)
            .args([
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--control-plane",
                "http://127.0.0.1:9",
                "--delivery-store",
                "postgres://pushwire:hunter2@127.0.0.1:9/nothing?connect_timeout=1",
            ])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await?;
        assert!(!out.status.success(), "{:?}", out.status);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("--delivery-store"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        Ok(())
    })
    .await?
}

/// A worker on PostgreSQL: while the database is down, hand-offs wait (the participations are
/// not acknowledged, nothing is lost), `/readyz` answers 503 naming the delivery store and
/// `pushwire_worker_delivery_store_up` is 0; once it is back, the waiting hand-offs are
/// answered QUEUED and every delivery, queued before or during the outage, is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_store_outage_loses_nothing_on_postgresql() -> anyhow::Result<()> {
    within("the test body", LIMIT, async {
        const K: usize = 10;
        let mut pg =
            tokio::task::spawn_blocking(pushwire_tests::postgres::PostgresServer::start).await??;
        let url = pg.create_database("deliveries")?;
        let dir = tempfile::tempdir()?;
        let cp = ControlPlaneProc::start(
            Path::new(CONTROL_PLANE),
            dir.path(),
            &Store::Embedded(dir.path().join("data")),
        )
        .await?;
        let receiver = TestReceiver::http().await?;
        receiver.set_default(Reply::status(503));
        let admin = cp.admin().await?;
        let crm = admin
            .create_integration(ACCOUNT, "crm", integration("CRM", &receiver.url("/")))
            .await?
            .name;
        let created = admin
            .create_scope(ACCOUNT, "all", scope(&crm, pb::PushScopeLevel::Account, ""))
            .await?;
        let revision: i64 = created.etag.parse()?;
        let flags = WorkerFlags {
            retry_schedule: format!("200ms{}", ",200ms".repeat(100)),
            retry_window: "10m".into(),
            breaker_threshold: 100_000,
            delivery_store: Some(url.clone()),
            ..WorkerFlags::default()
        };
        let w = WorkerProc::start(Path::new(WORKER), dir.path(), 1, &cp.url(), &flags).await?;
        w.wait_revision(revision, Duration::from_secs(15)).await?;
        let publisher = Publisher::connect(
            &[w.url()],
            ACCOUNT,
            PublisherOptions {
                token: Some(Secret::new(PUBLISHER_TOKEN)),
                ..PublisherOptions::default()
            },
        )?;
        publisher
            .wait_connected(Duration::from_secs(10))
            .await
            .map_err(anyhow::Error::msg)?;
        let publish = |i: usize| {
            let json = participation(&format!("D-{i}"), 418207, Some(5120), true);
            publisher.publish(request(ACCOUNT, &json))
        };
        let mut before = Vec::new();
        for i in 0..K {
            before.push(publish(i).await);
        }
        for p in before {
            let receipt = p.await;
            let resp = receipt
                .outcome
                .as_ref()
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            assert_eq!(resp.deliveries[0].outcome(), pb::DeliveryOutcome::Queued);
        }

        let mut pg = tokio::task::spawn_blocking(move || pg.stop().map(|()| pg)).await??;
        let mut during = Vec::new();
        for i in K..2 * K {
            during.push(publish(i).await);
        }
        eventually(
            "readiness names the delivery store",
            Duration::from_secs(30),
            || async {
                let (status, body) = http_get(w.http, "/readyz").await?;
                Ok(Poll::when(
                    status == 503 && body.contains("delivery store"),
                    (status, body),
                ))
            },
        )
        .await?;
        let (_, metrics) = http_get(w.http, "/metrics").await?;
        assert!(
            metrics.contains("pushwire_worker_delivery_store_up 0"),
            "{metrics}"
        );
        assert!(
            !metrics.contains(pg.password()),
            "no password in the metrics"
        );
        assert!(
            during
                .iter_mut()
                .all(|p| futures_util::FutureExt::now_or_never(p).is_none()),
            "none acknowledged while down"
        );

        receiver.set_default(Reply::ok());
        pg = tokio::task::spawn_blocking(move || pg.resume().map(|()| pg)).await??;
        for p in during {
            let receipt = p.await;
            assert_eq!(receipt.status(), ReceiptStatus::Done, "{receipt:?}");
        }
        let store =
            pushwire_common::delivery_store::open(&StoreUrl::parse(&url)?, &Default::default())
                .await?;
        let name = IntegrationName::parse(&crm)?;
        for i in 0..2 * K {
            let key = DeliveryKey::new(name.clone(), format!("D-{i}"));
            eventually(
                "delivered after the outage",
                Duration::from_secs(30),
                || async {
                    let r = store.get(&key).await?;
                    Ok(match r {
                        Some(r) if r.state == DeliveryState::Delivered => Poll::Ready(()),
                        other => Poll::not_yet(other.map(|r| (r.state, r.attempt_count))),
                    })
                },
            )
            .await?;
        }
        eventually("ready again", Duration::from_secs(30), || async {
            let (status, body) = http_get(w.http, "/readyz").await?;
            Ok(Poll::when(status == 200, (status, body)))
        })
        .await?;
        let log = std::fs::read_to_string(dir.path().join("worker-1.log"))?;
        assert!(!log.contains(pg.password()), "no password in the log");
        drop(pg);
        Ok(())
    })
    .await?
}

/// The delivery log: final outcomes of first attempts are recorded in the delivery store with
/// their attempt, after the acknowledgement (it does not wait for them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_attempt_outcomes_are_logged_in_the_delivery_store() -> anyhow::Result<()> {
    within("the test body", LIMIT, async {
        let stack = Stack::start().await?;
        let ok = TestReceiver::http().await?;
        let refusing = TestReceiver::http().await?;
        refusing.set_default(Reply::status(400));
        let admin = stack.admin();
        let ok_name = admin
            .create_routed("accounts/log", "ok", integration("Ok", &ok.url("/")))
            .await?;
        let refusing_name = admin
            .create_routed(
                "accounts/log",
                "refusing",
                integration("Refusing", &refusing.url("/")),
            )
            .await?;
        stack.sync().await?;
        let json = participation("LOG-1", 418207, Some(5120), true);
        let resp = stack.publish_one(request("accounts/log", &json)).await??;
        assert_eq!(resp.deliveries.len(), 2, "{resp:?}");

        let delivered = stack
            .settled(&ok_name, "LOG-1", Duration::from_secs(10))
            .await?;
        assert_eq!(delivered.state, DeliveryState::Delivered);
        assert_eq!(
            (delivered.attempt_count, delivered.last_status_code),
            (1, Some(200))
        );
        assert!(delivered.body_retained);
        let failed = stack
            .settled(&refusing_name, "LOG-1", Duration::from_secs(10))
            .await?;
        assert_eq!(failed.state, DeliveryState::Failed);
        assert_eq!(
            (failed.attempt_count, failed.last_status_code),
            (1, Some(400))
        );

        // An incomplete participation is skipped by integrations that want completed ones
        // only: nothing is sent, and the log says why (the statistics count it apart).
        let mut doc: serde_json::Value =
            serde_json::from_str(&participation("LOG-2", 418207, Some(5120), true))?;
        doc["state"] = serde_json::json!("STARTED");
        let resp = stack
            .publish_one(request("accounts/log", &doc.to_string()))
            .await??;
        assert!(
            resp.deliveries
                .iter()
                .all(|d| d.outcome() == pb::DeliveryOutcome::Skipped),
            "{resp:?}"
        );
        let skipped = stack
            .settled(&ok_name, "LOG-2", Duration::from_secs(10))
            .await?;
        assert_eq!(skipped.state, DeliveryState::Skipped);
        assert_eq!(skipped.attempt_count, 0);
        assert!(
            skipped.skip_reason.as_deref().is_some_and(
                |r| r.starts_with(pushwire_common::delivery_store::INCOMPLETE_SKIP_PREFIX)
            ),
            "{skipped:?}"
        );
        Ok(())
    })
    .await?
}
