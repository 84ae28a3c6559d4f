//! The publish stream itself: per-message errors, the in-flight window, readiness and
//! accounts with nothing configured, and the size limit.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context as _;
use pushwire_common::delivery_store::DeliveryState;
use pushwire_common::pb::v1 as pb;
use pushwire_tests::admin::integration;
use pushwire_tests::eventually::{Poll, eventually, within};
use pushwire_tests::receiver::{Reply, TestReceiver};
use pushwire_tests::worker::{
    COMPLETED, COMPLETED_ID, Stack, WAIT, completed_doc, delivered_once, participation, request,
    wait_ingest_ready, worker_config,
};
use pushwire_worker::config::Schedule;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use super::{ACCOUNT, TEST_LIMIT, body, next, webhook_parts};

// ---------------------------------------------------------------------------------------------
// 8. Per-message errors keep the stream open.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_errors_and_the_stream_stays_open() -> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        let stack = Stack::start().await?;
        let receiver = TestReceiver::http().await?;
        let crm = stack
            .admin()
            .create_routed(ACCOUNT, "crm", integration("CRM", &receiver.url("/")))
            .await?;
        stack.sync().await?;

        let mut no_campaign_id = completed_doc("S-3");
        no_campaign_id["campaign"]
            .as_object_mut()
            .expect("object")
            .remove("id");
        let requests = [
            ("r1", ACCOUNT, completed_doc("S-1").to_string()),
            ("r2", ACCOUNT, r#"{"id": "S-2", "state": "#.to_owned()),
            ("r3", ACCOUNT, no_campaign_id.to_string()),
            ("r4", "acct/42", completed_doc("S-4").to_string()),
            ("r5", ACCOUNT, completed_doc("S-5").to_string()),
            ("r4m", ACCOUNT, completed_doc("S-4M").to_string()),
        ];
        let mut stream = stack.open_stream().await?;
        for (id, account, json) in &requests {
            stream
                .send(pb::PublishRequest {
                    request_id: (*id).into(),
                    master_form_id: if *id == "r4m" {
                        "form 7!".into()
                    } else {
                        String::new()
                    },
                    ..request(account, json)
                })
                .await?;
        }
        let responses = stream.responses(requests.len()).await?;

        for (id, participation) in [("r1", "S-1"), ("r5", "S-5")] {
            let r = &responses[id];
            assert_eq!(r.error, "", "{id}");
            assert_eq!(r.participation_id, participation);
            assert_eq!(r.deliveries, vec![delivered_once(&crm)]);
        }
        let rejected = |id: &str| {
            let r = &responses[id];
            assert_eq!(r.participation_id, "", "{id}");
            assert!(r.deliveries.is_empty(), "{id}");
            r.error.clone()
        };
        let e = rejected("r2");
        assert!(
            e.starts_with("participation_json: $: not valid JSON"),
            "{e}"
        );
        assert_eq!(rejected("r3"), "participation_json: $.campaign.id: missing");
        let e = rejected("r4m");
        assert!(e.starts_with("master_form_id: must be"), "{e}");
        let e = rejected("r4");
        assert!(
            e.starts_with(r#"account: invalid account "acct/42""#),
            "{e}"
        );

        // Still open: another participation goes through.
        stream
            .send(pb::PublishRequest {
                request_id: "r6".into(),
                ..request(ACCOUNT, &completed_doc("S-6").to_string())
            })
            .await?;
        let r6 = stream.responses(1).await?.remove("r6").context("r6")?;
        assert_eq!(r6.participation_id, "S-6");
        assert_eq!(r6.deliveries, vec![delivered_once(&crm)]);

        // Only the valid ones were sent.
        let sent: BTreeSet<String> = receiver
            .drain()
            .iter()
            .map(|g| webhook_parts(g).map(|(p, _)| p))
            .collect::<Result<_, _>>()?;
        assert_eq!(
            sent,
            BTreeSet::from(["S-1".into(), "S-5".into(), "S-6".into()])
        );
        assert_eq!(receiver.received_count(), 3);

        // Closing the publisher's side ends the stream cleanly.
        stream.close();
        let end = stream.next(WAIT).await?;
        assert!(matches!(end, Ok(None)), "{end:?}");
        Ok(())
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// 10. The in-flight window of a stream.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_holds_at_most_its_window_in_flight() -> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        const WINDOW: usize = 2;
        const MESSAGES: usize = 10;
        const REPLY_DELAY: Duration = Duration::from_millis(100);
        let stack = Stack::start_with(|c, _| {
            c.ingest.window = WINDOW as u32;
            // Hung attempts end after 2 s, are handed off and retried from the store at once.
            c.webhook.request_timeout = Duration::from_secs(2);
            c.delivery.retry_schedule = Schedule(vec![Duration::from_millis(10); 3]);
            c.delivery.retry_window = Duration::from_secs(10);
            Ok(())
        })
        .await?;
        let receiver = TestReceiver::http().await?;
        receiver.set_default(Reply::hang());
        let slow = stack
            .admin()
            .create_routed(ACCOUNT, "slow", integration("Slow", &receiver.url("/")))
            .await?;
        stack.sync().await?;

        let mut stream = stack.open_stream().await?;
        let sender = stream.sender();
        let publisher = tokio::spawn(async move {
            for i in 0..MESSAGES {
                let json = participation(&format!("W-{i}"), 418207, Some(5120), true);
                let req = pb::PublishRequest {
                    request_id: format!("w{i}"),
                    ..request(ACCOUNT, &json)
                };
                if sender.send(req).await.is_err() {
                    break;
                }
            }
        });

        // Blocked replies: the window's worth arrives, and nothing more.
        let mut arrivals = vec![next(&receiver).await?, next(&receiver).await?];
        let third = receiver.next(Duration::from_millis(700)).await;
        assert!(
            third.is_none(),
            "a third request while {WINDOW} hang: {:?}",
            third.map(|r| r.header("webhook-id").map(str::to_owned))
        );
        assert_eq!(receiver.received_count(), WINDOW);

        // Unblocked (the hung attempts time out and are handed off, QUEUED): all are
        // acknowledged, and the store's retries deliver the hung ones.
        receiver.set_default(Reply::ok().after(REPLY_DELAY));
        let responses = stream.responses(MESSAGES).await?;
        publisher.await?;
        let hung: BTreeSet<String> = arrivals
            .iter()
            .map(|g| webhook_parts(g).map(|(p, _)| p))
            .collect::<Result<_, _>>()?;
        for (id, resp) in &responses {
            let [d] = resp.deliveries.as_slice() else {
                anyhow::bail!("{id}: {resp:?}");
            };
            if hung.contains(&resp.participation_id) {
                assert_eq!(d.outcome(), pb::DeliveryOutcome::Queued, "{id}: {d:?}");
                assert_eq!((d.attempts, d.last_error.as_str()), (1, "timed out"));
                let r = stack.settled(&slow, &resp.participation_id, WAIT).await?;
                assert_eq!((r.state, r.attempt_count), (DeliveryState::Delivered, 2));
            } else {
                assert_eq!(d, &delivered_once(&slow), "{id}");
            }
        }
        arrivals.extend(receiver.drain());
        assert_eq!(arrivals.len(), MESSAGES + WINDOW);
        assert_eq!(receiver.received_count(), MESSAGES + WINDOW);

        // Never more than WINDOW first attempts outstanding: each answer takes REPLY_DELAY (or
        // the request timeout), so of any three consecutive first attempts the third came at
        // least REPLY_DELAY after the first. (Retries from the store are outside the window.)
        arrivals.sort_by_key(|g| g.at);
        let mut seen = BTreeSet::new();
        arrivals.retain(|g| seen.insert(g.header("webhook-id").map(str::to_owned)));
        for w in arrivals.windows(WINDOW + 1) {
            let gap = w[WINDOW].at.duration_since(w[0].at);
            assert!(
                gap >= REPLY_DELAY,
                "{} requests in flight: {gap:?} between arrivals",
                WINDOW + 1
            );
        }
        stream.close();
        let end = stream.next(WAIT).await?;
        assert!(matches!(end, Ok(None)), "{end:?}");
        Ok(())
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// 12. Readiness, and accounts with nothing configured.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_without_integrations_is_acknowledged_with_no_delivery() -> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        let stack = Stack::start().await?;
        let receiver = TestReceiver::http().await?;
        stack
            .admin()
            .create_routed(ACCOUNT, "crm", integration("CRM", &receiver.url("/")))
            .await?;
        stack.sync().await?;
        let expected = pb::PublishResponse {
            participation_id: COMPLETED_ID.into(),
            error: String::new(),
            deliveries: Vec::new(),
            request_id: "u1".into(),
        };
        let req = pb::PublishRequest {
            request_id: "u1".into(),
            ..request("accounts/777", COMPLETED)
        };
        assert_eq!(stack.publish_one(req.clone()).await??, expected);
        let mut stream = stack.open_stream().await?;
        stream.send(req).await?;
        assert_eq!(stream.responses(1).await?.remove("u1"), Some(expected));
        assert_eq!(receiver.received_count(), 0);
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refuses_participations_until_it_has_a_configuration() -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    within("the test body", TEST_LIMIT, async {
        let dir = tempfile::tempdir()?;
        // The control plane's port is taken now and served later: until then the worker gets
        // no snapshot.
        let cp_listeners = pushwire_control_plane::Listeners {
            grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
            http: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        };
        let mut worker_config_ = pushwire_worker::Config::defaults();
        worker_config_.delivery.delivery_store = Some(
            pushwire_common::delivery_store::StoreUrl::sqlite(
                dir.path().join("deliveries.sqlite3"),
            )
            .into(),
        );
        worker_config_.control_plane = vec![format!("http://{}", cp_listeners.grpc.local_addr()?)];
        worker_config_.control_plane_client.control_plane_token = Some(
            pushwire_common::domain::Secret::new(pushwire_tests::control_plane::TEST_WORKER_TOKEN),
        );
        worker_config_.access.admin_token = Some(pushwire_common::domain::Secret::new(
            pushwire_tests::control_plane::TEST_ADMIN_TOKEN,
        ));
        let worker_listeners = pushwire_worker::Listeners {
            grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
            http: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        };
        let worker_addr = worker_listeners.grpc.local_addr()?;
        let worker_shutdown = CancellationToken::new();
        let worker = tokio::spawn(pushwire_worker::run(
            worker_config_,
            worker_listeners,
            worker_shutdown.clone(),
        ));
        let channel = tonic::transport::Channel::from_shared(format!("http://{worker_addr}"))?
            .connect()
            .await?;

        let health = HealthClient::new(channel.clone());
        let check = HealthCheckRequest {
            service: pushwire_tests::worker::INGEST_SERVICE.into(),
        };
        // The status is registered as the server starts; until then the service is unknown.
        let status = eventually("the ingest health status registered", WAIT, || {
            let (mut health, check) = (health.clone(), check.clone());
            async move {
                match health.check(check).await {
                    Ok(r) => Ok(Poll::Ready(r.into_inner().status)),
                    Err(s) if s.code() == Code::NotFound => Ok(Poll::not_yet(s)),
                    Err(s) => Err(s.into()),
                }
            }
        })
        .await?;
        assert_eq!(status, ServingStatus::NotServing as i32);
        let mut ingest = pb::ingest_service_client::IngestServiceClient::new(
            pushwire_tests::control_plane::as_admin(channel.clone()),
        );
        let refused = ingest
            .publish_one(request(ACCOUNT, COMPLETED))
            .await
            .expect_err("not ready");
        assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
        assert!(
            refused.message().contains("no configuration"),
            "{refused:?}"
        );
        let refused = pushwire_tests::worker::PublishStream::open(ingest.clone())
            .await
            .expect_err("not ready");
        let status = refused
            .downcast_ref::<tonic::Status>()
            .with_context(|| format!("{refused:#}"))?;
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");

        // The control plane comes up: the worker gets its snapshot and serves.
        let mut cp_config = worker_config(dir.path());
        cp_config.with_worker = false;
        let cp_shutdown = CancellationToken::new();
        let cp = tokio::spawn(pushwire_control_plane::run(
            cp_config,
            cp_listeners,
            cp_shutdown.clone(),
        ));
        wait_ingest_ready(&channel, Duration::from_secs(20)).await?;
        let resp = ingest
            .publish_one(request(ACCOUNT, COMPLETED))
            .await?
            .into_inner();
        assert_eq!(
            (resp.participation_id.as_str(), resp.error.as_str()),
            (COMPLETED_ID, "")
        );
        assert!(resp.deliveries.is_empty());

        worker_shutdown.cancel();
        cp_shutdown.cancel();
        worker.await??;
        cp.await??;
        Ok(())
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// 13. The size limit.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_document_gets_an_error_naming_the_limit() -> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        const LIMIT: usize = 2048;
        let stack = Stack::start_with(|c, _| {
            c.ingest.max_participation_bytes = LIMIT;
            Ok(())
        })
        .await?;
        let receiver = TestReceiver::http().await?;
        let crm = stack
            .admin()
            .create_routed(ACCOUNT, "crm", integration("CRM", &receiver.url("/")))
            .await?;
        stack.sync().await?;

        let mut big = completed_doc("BIG-1");
        big["padding"] = json!("x".repeat(4 * LIMIT));
        let big = big.to_string();
        let expected = format!(
            "participation_json: $: document is {} bytes, over the limit of {LIMIT} bytes",
            big.len()
        );
        let resp = stack.publish_one(request(ACCOUNT, &big)).await??;
        assert_eq!(resp.error, expected);
        assert!(resp.deliveries.is_empty());

        let mut stream = stack.open_stream().await?;
        for (id, json) in [("big", big.as_str()), ("small", COMPLETED)] {
            stream
                .send(pb::PublishRequest {
                    request_id: id.into(),
                    ..request(ACCOUNT, json)
                })
                .await?;
        }
        assert!(COMPLETED.len() <= LIMIT);
        let responses = stream.responses(2).await?;
        assert_eq!(responses["big"].error, expected);
        assert_eq!(responses["small"].deliveries, vec![delivered_once(&crm)]);
        assert_eq!(receiver.received_count(), 1);

        // Beyond the gRPC message limit (the document limit plus room for the envelope) a
        // request cannot even be decoded: PublishOne fails, and a stream acknowledges what it
        // holds, then ends with that status.
        let mut huge = completed_doc("HUGE-1");
        huge["padding"] = json!("x".repeat(100 * 1024));
        let huge = huge.to_string();
        let refused = stack
            .publish_one(request(ACCOUNT, &huge))
            .await?
            .expect_err("too large to decode");
        assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
        assert!(refused.message().contains("limit"), "{refused:?}");

        assert_eq!(body(&next(&receiver).await?)?, COMPLETED);
        receiver.set_default(Reply::ok().after(Duration::from_millis(300)));
        let held = participation("HELD-1", 418207, Some(5120), true);
        stream
            .send(pb::PublishRequest {
                request_id: "held".into(),
                ..request(ACCOUNT, &held)
            })
            .await?;
        assert_eq!(body(&next(&receiver).await?)?, held);
        stream
            .send(pb::PublishRequest {
                request_id: "huge".into(),
                ..request(ACCOUNT, &huge)
            })
            .await?;
        match stream.next(WAIT).await? {
            Ok(Some(r)) => {
                assert_eq!(r.request_id, "held");
                assert_eq!(r.deliveries, vec![delivered_once(&crm)]);
            }
            other => anyhow::bail!("expected the acknowledgement of HELD-1, got {other:?}"),
        }
        match stream.next(WAIT).await? {
            Err(status) => {
                assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
                assert!(status.message().contains("limit"), "{status:?}");
            }
            other => anyhow::bail!("expected OUT_OF_RANGE, got {other:?}"),
        }
        assert_eq!(receiver.received_count(), 2);
        Ok(())
    })
    .await?
}
