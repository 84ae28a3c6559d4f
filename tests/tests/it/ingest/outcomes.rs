//! How deliveries end: a retryable first attempt handed off (QUEUED) and retried from the
//! delivery store within the window, 410 Gone disabling the integration, and shutdown handing
//! unacknowledged participations back.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pushwire_common::delivery_store::DeliveryState;
use pushwire_common::pb::v1 as pb;
use pushwire_tests::admin::integration;
use pushwire_tests::eventually::{Poll, eventually, within};
use pushwire_tests::receiver::{Reply, TestReceiver};
use pushwire_tests::worker::{
    COMPLETED, COMPLETED_ID, FIXTURE_CAMPAIGN, FIXTURE_WEBSITE, Stack, WAIT, by_integration,
    delivered_once, participation, queued_after, request, without_next_attempt, worker_config,
};
use pushwire_worker::config::Schedule;
use tonic::Code;

use super::{ACCOUNT, TEST_LIMIT, body, next, webhook_parts};

// ---------------------------------------------------------------------------------------------
// 6. Retries.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_are_queued_then_retried_from_the_store_within_the_window()
-> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        const SCHEDULE: usize = 50;
        let stack = Stack::start_with(|c, _| {
            // 100 ms (± 20 %) apart, within 450 ms: a few attempts, then the window ends it
            // long before the schedule does.
            c.delivery.retry_schedule = Schedule(vec![Duration::from_millis(100); SCHEDULE]);
            c.delivery.retry_window = Duration::from_millis(450);
            Ok(())
        })
        .await?;
        let flaky_rx = TestReceiver::http().await?;
        flaky_rx.respond_with(vec![Reply::status(500), Reply::status(500)]);
        let refusing_rx = TestReceiver::http().await?;
        refusing_rx.set_default(Reply::status(400).with_body("bad payload"));
        let down_rx = TestReceiver::http().await?;
        down_rx.set_default(Reply::status(503));
        let flaky = stack
            .admin()
            .create_routed(ACCOUNT, "flaky", integration("Flaky", &flaky_rx.url("/")))
            .await?;
        let refusing = stack
            .admin()
            .create_routed(
                ACCOUNT,
                "refusing",
                integration("Refusing", &refusing_rx.url("/")),
            )
            .await?;
        let down = stack
            .admin()
            .create_routed(ACCOUNT, "down", integration("Down", &down_rx.url("/")))
            .await?;
        stack.sync().await?;

        let resp = stack.publish_one(request(ACCOUNT, COMPLETED)).await??;
        let outcomes = by_integration(&resp);
        assert_eq!(outcomes.len(), 3, "{resp:?}");
        assert_eq!(
            without_next_attempt(&outcomes[&flaky]),
            queued_after(&flaky, 500)
        );
        assert_eq!(
            outcomes[&refusing],
            pb::Delivery {
                integration: refusing.clone(),
                outcome: pb::DeliveryOutcome::Failed.into(),
                attempts: 1,
                last_status_code: 400,
                last_error: "HTTP 400".into(),
                skip_reason: String::new(),
                next_attempt_time: None,
            },
            "a 400 is final"
        );
        assert_eq!(
            without_next_attempt(&outcomes[&down]),
            queued_after(&down, 503)
        );

        // The store retries: flaky is delivered at its third attempt, down fails when its
        // next attempt would start after the 450 ms window.
        let f = stack.settled(&flaky, COMPLETED_ID, WAIT).await?;
        assert_eq!(f.state, DeliveryState::Delivered);
        assert_eq!((f.attempt_count, f.last_status_code), (3, Some(200)));
        let d = stack.settled(&down, COMPLETED_ID, WAIT).await?;
        assert_eq!(d.state, DeliveryState::Failed);
        assert_eq!(d.last_status_code, Some(503));
        assert!(
            (2..=6).contains(&d.attempt_count),
            "retried until the 450 ms window ended: {} attempts",
            d.attempt_count
        );

        // Every attempt reached the receiver, with the same webhook-id and body.
        assert_eq!(flaky_rx.received_count(), 3);
        assert_eq!(refusing_rx.received_count(), 1);
        assert_eq!(down_rx.received_count(), d.attempt_count as usize);
        for (rx, id) in [(&flaky_rx, "flaky"), (&down_rx, "down")] {
            for got in rx.drain() {
                assert_eq!(body(&got)?, COMPLETED);
                assert_eq!(
                    webhook_parts(&got)?,
                    (COMPLETED_ID.to_owned(), id.to_owned())
                );
            }
        }
        Ok(())
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// 7. 410 Gone disables the integration.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_fails_and_disables_the_integration() -> anyhow::Result<()> {
    within("the test body", TEST_LIMIT, async {
        let stack = Stack::start().await?;
        let gone_rx = TestReceiver::http().await?;
        gone_rx.set_default(Reply::status(410));
        let alive_rx = TestReceiver::http().await?;
        let gone = stack
            .admin()
            .create_routed(ACCOUNT, "gone", integration("Gone", &gone_rx.url("/")))
            .await?;
        let alive = stack
            .admin()
            .create_routed(ACCOUNT, "alive", integration("Alive", &alive_rx.url("/")))
            .await?;
        stack.sync().await?;

        let resp = stack.publish_one(request(ACCOUNT, COMPLETED)).await??;
        let outcomes = by_integration(&resp);
        assert_eq!(outcomes[&alive], delivered_once(&alive));
        let g = &outcomes[&gone];
        assert_eq!(g.outcome(), pb::DeliveryOutcome::Failed);
        assert_eq!((g.attempts, g.last_status_code), (1, 410), "410 is final");
        assert!(g.last_error.contains("410"), "{:?}", g.last_error);

        // The worker disables it through the control plane.
        let disabled = eventually(&format!("{gone} disabled"), WAIT, || async {
            let i = stack.admin().get_integration(&gone).await?;
            Ok(if i.enabled == Some(false) {
                Poll::Ready(i)
            } else {
                Poll::not_yet(i)
            })
        })
        .await?;
        assert!(
            disabled.disabled_reason.contains("410"),
            "{:?}",
            disabled.disabled_reason
        );
        assert_eq!(
            stack.admin().get_integration(&alive).await?.enabled,
            Some(true),
            "only the integration that answered 410"
        );

        // From then on it is not routed to.
        stack.sync().await?;
        let placement = pb::ResolvePushesRequest {
            account: ACCOUNT.into(),
            website_id: FIXTURE_WEBSITE.into(),
            master_form_id: String::new(),
            campaign_id: FIXTURE_CAMPAIGN.into(),
            identified: Some(true),
        };
        assert_eq!(
            stack.admin().resolve(placement).await?,
            BTreeSet::from([alive.clone()])
        );
        let later = participation("AFTER-410", 418207, Some(5120), true);
        let resp = stack.publish_one(request(ACCOUNT, &later)).await??;
        assert_eq!(resp.deliveries, vec![delivered_once(&alive)]);
        assert_eq!(gone_rx.received_count(), 1);
        assert_eq!(alive_rx.received_count(), 2);
        Ok(())
    })
    .await?
}

// ---------------------------------------------------------------------------------------------
// 14. Shutdown hands unacknowledged participations back.

/// Publishes one participation to an integration whose receiver answers `reply`, stops the
/// control plane once the first attempt arrived, and checks that the stream ends with
/// UNAVAILABLE, with no acknowledgement, within the shutdown grace.
async fn shutdown_while_delivering(
    reply: Reply,
    tweak: fn(&mut pushwire_control_plane::Config),
) -> anyhow::Result<()> {
    let stack = Stack::start_with(|c, _| {
        tweak(c);
        Ok(())
    })
    .await?;
    let grace = Duration::from_secs(2);
    assert_eq!(worker_config(stack.dir()).shutdown_grace, grace);
    let receiver = TestReceiver::http().await?;
    receiver.set_default(reply);
    stack
        .admin()
        .create_routed(ACCOUNT, "stuck", integration("Stuck", &receiver.url("/")))
        .await?;
    stack.sync().await?;

    let mut stream = stack.open_stream().await?;
    stream
        .send(pb::PublishRequest {
            request_id: "held".into(),
            ..request(ACCOUNT, COMPLETED)
        })
        .await?;
    next(&receiver).await?;

    let started = Instant::now();
    let stop = tokio::spawn(stack.stop());
    let end = stream.next(Duration::from_secs(20)).await?;
    let ended_after = started.elapsed();
    let status = match end {
        Err(status) => status,
        Ok(other) => anyhow::bail!("expected UNAVAILABLE and no acknowledgement, got {other:?}"),
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("re-publish"), "{status:?}");
    stop.await??;
    assert!(
        ended_after < grace + Duration::from_secs(1),
        "the stream ended {ended_after:?} after the stop, beyond the {grace:?} grace"
    );
    assert_eq!(receiver.received_count(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participation_waiting_for_a_retry_is_acknowledged_queued_and_kept() -> anyhow::Result<()>
{
    within("the test body", TEST_LIMIT, async {
        let stack = Stack::start_with(|c, _| {
            // The retry comes long after the test.
            c.delivery.retry_schedule = Schedule(vec![Duration::from_secs(30)]);
            c.delivery.retry_window = Duration::from_secs(60);
            Ok(())
        })
        .await?;
        let receiver = TestReceiver::http().await?;
        receiver.set_default(Reply::status(503));
        let stuck = stack
            .admin()
            .create_routed(ACCOUNT, "stuck", integration("Stuck", &receiver.url("/")))
            .await?;
        stack.sync().await?;
        let before = std::time::SystemTime::now();
        let resp = stack.publish_one(request(ACCOUNT, COMPLETED)).await??;
        let d = &by_integration(&resp)[&stuck];
        assert_eq!(without_next_attempt(d), queued_after(&stuck, 503));
        let next_attempt = std::time::SystemTime::try_from(d.next_attempt_time.unwrap())?;
        assert!(
            next_attempt >= before + Duration::from_secs(24),
            "{next_attempt:?}"
        );

        // The store holds it with its attempt, due then; the stop leaves it there.
        stack.stop().await?;
        assert_eq!(receiver.received_count(), 1);
        Ok(())
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_interrupts_an_attempt_in_flight() -> anyhow::Result<()> {
    within(
        "the test body",
        TEST_LIMIT,
        shutdown_while_delivering(Reply::hang(), |c| {
            c.delivery.retry_window = Duration::from_secs(600);
        }),
    )
    .await?
}
