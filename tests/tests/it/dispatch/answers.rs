//! What is sent and what each answer means: signed requests, retried and final
//! statuses, timeouts, the retry window and connection errors.

use std::collections::HashSet;
use std::time::Duration;

use pushwire_common::webhook::client::ClientOptions;
use pushwire_common::webhook::ssrf::AllowList;
use pushwire_tests::eventually::within;
use pushwire_tests::receiver::{Reply, TestReceiver};
use pushwire_worker::deliver::dispatch::{DispatchOptions, Outcome};

use super::{
    Harness, LIMIT, SECRET, WAIT, check_webhook, client_options, closed_port, delivered,
    dispatch_options, failed, job, next,
};

// ---------------------------------------------------------------------------------------------
// 1. What is sent
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_on_first_try_with_a_signed_request() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        let h = Harness::new(
            dispatch_options(&[20, 40], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        )
        .await;
        let crm = h.add("crm", &receiver.url("/hooks/crm?tenant=7"));

        let outcome = h.deliver(job(&crm, "P-1")).await;
        assert_eq!(outcome, delivered(1, 200));
        let r = next(&receiver).await;
        assert_eq!(r.path, "/hooks/crm?tenant=7");
        check_webhook(&r, &crm, "P-1", SECRET);
        assert_eq!(r.header("webhook-id"), Some("P-1_crm"));

        // No traceparent given: none sent. Another participation: another id.
        let mut untraced = job(&crm, "P-2");
        untraced.traceparent = None;
        assert_eq!(h.deliver(untraced).await, delivered(1, 200));
        let r = next(&receiver).await;
        assert_eq!(r.header("webhook-id"), Some("P-2_crm"));
        assert_eq!(r.header("traceparent"), None);
        assert_eq!(receiver.received_count(), 2);
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_2xx_is_delivered_over_https_with_a_private_ca() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::https().await.unwrap();
        receiver.set_default(Reply::status(204));
        let h = Harness::new(
            dispatch_options(&[20], Duration::from_secs(10)),
            ClientOptions {
                extra_ca_pem: Some(receiver.ca_pem().expect("CA").as_bytes().to_vec()),
                ..client_options(Duration::from_secs(5))
            },
        )
        .await;
        let crm = h.add("crm-tls", &receiver.localhost_url("/in"));
        assert_eq!(h.deliver(job(&crm, "P-9")).await, delivered(1, 204));
        check_webhook(&next(&receiver).await, &crm, "P-9", SECRET);
    })
    .await
    .expect("the test finished within its limit");
}

// ---------------------------------------------------------------------------------------------
// 2, 3. Retried answers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_with_a_stable_webhook_id() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.respond_with(vec![Reply::status(500), Reply::status(500), Reply::ok()]);
        let h = Harness::new(
            dispatch_options(&[20, 40, 80, 160], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        )
        .await;
        let crm = h.add("crm", &receiver.url("/"));

        assert_eq!(h.deliver(job(&crm, "P-1")).await, delivered(3, 200));
        let seen = receiver.drain();
        assert_eq!(seen.len(), 3);
        for r in &seen {
            // Each attempt is signed for its own timestamp.
            check_webhook(r, &crm, "P-1", SECRET);
        }
        let ids: HashSet<_> = seen.iter().map(|r| r.header("webhook-id")).collect();
        assert_eq!(ids, HashSet::from([Some("P-1_crm")]));
        assert_eq!(receiver.received_count(), 3);
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_429_408_and_503_are_retried() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.respond_with(vec![
            Reply::status(429).with_header("Retry-After", "0"),
            Reply::status(408),
            Reply::status(503).with_header("Retry-After", "0"),
            Reply::status(502),
            Reply::status(201),
        ]);
        let h = Harness::new(
            dispatch_options(&[20; 6], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        )
        .await;
        let crm = h.add("crm", &receiver.url("/"));
        assert_eq!(h.deliver(job(&crm, "P-1")).await, delivered(5, 201));
        assert_eq!(receiver.received_count(), 5);
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_capped_at_twice_the_scheduled_delay() {
    // An hour-long Retry-After (seconds) and a far-future HTTP date are clamped to 2 × 20 ms:
    // the delivery completes well within the test's limit instead of stalling.
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.respond_with(vec![
            Reply::status(503).with_header("Retry-After", "3600"),
            Reply::status(429).with_header("Retry-After", "Fri, 01 Jan 2100 00:00:00 GMT"),
            Reply::ok(),
        ]);
        let h = Harness::new(
            dispatch_options(&[20, 20], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        )
        .await;
        let crm = h.add("crm", &receiver.url("/"));
        assert_eq!(h.deliver(job(&crm, "P-1")).await, delivered(3, 200));
    })
    .await
    .expect("the test finished within its limit");
}

// ---------------------------------------------------------------------------------------------
// 4, 5. Final answers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_final() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        let h = Harness::new(
            dispatch_options(&[20, 20, 20], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        )
        .await;
        let crm = h.add("crm", &receiver.url("/"));
        for (n, status) in [400u16, 404, 401, 403, 422].into_iter().enumerate() {
            receiver.respond_with(vec![Reply::status(status)]);
            let outcome = h.deliver(job(&crm, &format!("P-{status}"))).await;
            let error = failed(1, Some(status), &outcome);
            assert!(error.contains(&status.to_string()), "{error}");
            assert_eq!(
                receiver.received_count(),
                n + 1,
                "{status}: one attempt only"
            );
        }
        assert!(h.disabled.is_empty(), "only 410 disables");
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_final_and_not_followed() {
    within("the test body", LIMIT, async {
        let target = TestReceiver::http().await.unwrap();
        let receiver = TestReceiver::http().await.unwrap();
        let h = Harness::new(
            dispatch_options(&[20, 20, 20], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        )
        .await;
        let crm = h.add("crm", &receiver.url("/"));
        for (n, status) in [301u16, 302, 307, 308].into_iter().enumerate() {
            receiver.respond_with(vec![
                Reply::status(status).with_header("Location", target.url("/elsewhere")),
            ]);
            let outcome = h.deliver(job(&crm, &format!("P-{status}"))).await;
            failed(1, Some(status), &outcome);
            assert_eq!(receiver.received_count(), n + 1);
        }
        // Each outcome came after its answer was read: a client following the Location would
        // have sent (and been answered by) the target before.
        assert_eq!(target.received_count(), 0, "the Location was not followed");
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_fails_and_asks_to_disable_the_integration() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.set_default(Reply::status(410));
        let mut h = Harness::new(
            dispatch_options(&[20, 20], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        )
        .await;
        let crm = h.add("crm", &receiver.url("/"));
        let error = failed(1, Some(410), &h.deliver(job(&crm, "P-1")).await);
        assert!(error.contains("410"), "{error}");
        assert_eq!(receiver.received_count(), 1, "410 is not retried");

        let request = tokio::time::timeout(WAIT, h.disabled.recv())
            .await
            .expect("a disable request in time")
            .expect("channel open");
        assert_eq!(request.integration, crm.name);
        assert!(request.reason.contains("410"), "{}", request.reason);
        assert!(h.disabled.is_empty(), "one request per 410");
    })
    .await
    .expect("the test finished within its limit");
}

// ---------------------------------------------------------------------------------------------
// 6, 7, 8. Timeouts, the retry window, connection errors
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_endpoint_times_out_and_is_retried_until_the_schedule_ends() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.set_default(Reply::hang());
        let h = Harness::new(
            dispatch_options(&[20, 40], Duration::from_secs(15)),
            client_options(Duration::from_millis(300)),
        )
        .await;
        let crm = h.add("crm", &receiver.url("/"));
        let error = failed(3, None, &h.deliver(job(&crm, "P-1")).await);
        assert!(error.contains("timed out"), "{error}");
        assert_eq!(
            receiver.received_count(),
            3,
            "each attempt reached the endpoint"
        );
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_window_ends_retries_before_the_schedule_does() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.set_default(Reply::status(500));
        // 20 retries 100 ms apart, but a 350 ms window: attempts at 0, 100, 200 and 300 ms at
        // most; the one due at 400 ms would start after the window.
        let h = Harness::new(
            dispatch_options(&[100; 20], Duration::from_millis(350)),
            client_options(Duration::from_secs(5)),
        )
        .await;
        let crm = h.add("crm", &receiver.url("/"));
        let outcome = h.deliver(job(&crm, "P-1")).await;
        let Outcome::Failed {
            attempts,
            last_status,
            last_error,
        } = outcome
        else {
            panic!("expected Failed, got {outcome:?}");
        };
        assert!((1..=4).contains(&attempts), "{attempts} attempts");
        assert_eq!(last_status, Some(500));
        assert!(last_error.contains("500"), "{last_error}");
        // The outcome is the barrier: every attempt of a job is awaited before it is reported.
        assert_eq!(receiver.received_count(), attempts as usize);
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_attempt_behind_a_saturated_lane_does_not_wait_for_it() {
    // Concurrency 1: job A holds the only slot on a hanging endpoint for 1.5 s; job B, queued
    // behind it, gets its answer when its slot wait ends (with no retries to hand off to: a
    // failure naming the saturated lane), and never starts an attempt once A's slot frees up.
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.set_default(Reply::hang());
        let h = Harness::new(
            DispatchOptions {
                concurrency: 1,
                ..dispatch_options(&[], Duration::from_millis(300))
            },
            client_options(Duration::from_millis(1500)),
        )
        .await;
        let crm = h.add("crm", &receiver.url("/"));
        let a = h.spawn(job(&crm, "P-A"));
        let first = next(&receiver).await;
        assert_eq!(first.header("webhook-id"), Some("P-A_crm"));

        let b = h.deliver(job(&crm, "P-B")).await;
        let error = failed(0, None, &b);
        assert!(error.contains("saturated"), "{error}");

        let a = a.await.unwrap();
        assert!(failed(1, None, &a).contains("timed out"));
        // Barrier: a sentinel through the same single slot, after A. Had B kept its place in
        // the queue, it would have been sent before the sentinel.
        receiver.set_default(Reply::ok());
        assert_eq!(h.deliver(job(&crm, "P-S")).await, delivered(1, 200));
        let sent: Vec<_> = receiver
            .drain()
            .iter()
            .map(|r| r.header("webhook-id").map(str::to_owned))
            .collect();
        assert_eq!(
            sent,
            [Some("P-S_crm".to_owned())],
            "B never reached the endpoint"
        );
        assert_eq!(h.stats(&crm).map(|s| (s.in_flight, s.queued)), Some((0, 0)));
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_is_retried_then_fails_without_a_status() {
    within("the test body", LIMIT, async {
        let port = closed_port().await;
        let h = Harness::new(
            dispatch_options(&[20, 20], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        )
        .await;
        let crm = h.add("crm", &format!("http://127.0.0.1:{port}/hook"));
        let error = failed(3, None, &h.deliver(job(&crm, "P-1")).await);
        assert!(error.contains("connection"), "{error}");
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_address_is_final() {
    // Without the allow-list, loopback is refused by the SSRF guard: final, not retried.
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        let h = Harness::new(
            dispatch_options(&[20, 20], Duration::from_secs(10)),
            ClientOptions {
                allow: AllowList::default(),
                ..client_options(Duration::from_secs(5))
            },
        )
        .await;
        let crm = h.add("crm", &receiver.url("/"));
        let error = failed(1, None, &h.deliver(job(&crm, "P-1")).await);
        assert!(error.contains("127.0.0.1"), "{error}");
        assert_eq!(receiver.received_count(), 0);
    })
    .await
    .expect("the test finished within its limit");
}
