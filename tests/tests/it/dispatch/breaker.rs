//! The per-integration circuit breaker: opening, probing, the window, abandoned probes.

use std::time::Duration;

use pushwire_tests::eventually::within;
use pushwire_tests::receiver::{Reply, TestReceiver};
use pushwire_worker::deliver::breaker::BreakerOptions;

use super::{
    Gated, Harness, LIMIT, WAIT, client_options, delivered, dispatch_options, failed, job,
};

// ---------------------------------------------------------------------------------------------
// 10. Circuit breaker
// ---------------------------------------------------------------------------------------------

fn test_breaker(threshold: u32, cool_down: Duration) -> BreakerOptions {
    BreakerOptions {
        failure_threshold: threshold,
        cool_down,
        max_cool_down: cool_down * 4,
        probe_timeout: Duration::from_secs(60),
        probe_recheck: Duration::from_millis(20),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_breaker_opens_holds_jobs_back_and_one_probe_closes_it() {
    within("the test body", LIMIT, async {
        let (receiver, state, mut seen) = Gated::start(500).await;
        // No retries: one attempt per job, so requests and jobs can be counted against each
        // other. The window is long enough to outlast the cool-down.
        let h = Harness::with_breaker(
            dispatch_options(&[], Duration::from_secs(15)),
            client_options(Duration::from_secs(10)),
            test_breaker(3, Duration::from_millis(400)),
        )
        .await;
        let crm = h.add("crm", &receiver.url);

        // Three consecutive failures open it.
        for n in 1..=3 {
            let error = failed(1, Some(500), &h.deliver(job(&crm, &format!("F-{n}"))).await);
            assert!(error.contains("500"), "{error}");
        }
        assert_eq!(state.count(), 3);
        assert!(h.stats(&crm).expect("lane").breaker_open);
        while seen.try_recv().is_ok() {}

        // While open, a job is answered at once without an attempt (with no retries to hand
        // off to: a failure).
        let error = failed(0, None, &h.deliver(job(&crm, "H-1")).await);
        assert!(error.contains("circuit breaker open"), "{error}");
        assert_eq!(state.count(), 3);

        // The endpoint recovers, but answers are held so the probe stays in flight.
        state.set_status(200);
        state.hold(true);
        h.wait_cool_down(&crm).await;
        let probe = h.spawn(job(&crm, "R-1"));
        let sent = tokio::time::timeout(WAIT, seen.recv())
            .await
            .expect("a probe after the cool-down")
            .expect("receiver alive");
        assert_eq!(sent.header("webhook-id"), Some("R-1_crm"));
        // One probe at a time while half-open: the others are refused without sending.
        for n in 2..=4 {
            let error = failed(0, None, &h.deliver(job(&crm, &format!("R-{n}"))).await);
            assert!(error.contains("circuit breaker open"), "{error}");
        }
        assert_eq!(state.count(), 4, "one probe, the other jobs held back");
        assert!(h.stats(&crm).expect("lane").breaker_open);

        // The probe succeeds: the breaker closes and jobs go again.
        state.hold(false);
        assert_eq!(probe.await.unwrap(), delivered(1, 200));
        assert!(!h.stats(&crm).expect("lane").breaker_open);
        for n in 5..=7 {
            assert_eq!(
                h.deliver(job(&crm, &format!("R-{n}"))).await,
                delivered(1, 200)
            );
        }
        assert_eq!(state.count(), 7, "each job sent exactly once");

        // A failing probe opens it again.
        state.set_status(500);
        for n in 4..=6 {
            failed(1, Some(500), &h.deliver(job(&crm, &format!("F-{n}"))).await);
        }
        assert!(h.stats(&crm).expect("lane").breaker_open);
        let before = state.count();
        h.wait_cool_down(&crm).await;
        failed(1, Some(500), &h.deliver(job(&crm, "F-probe")).await);
        assert_eq!(state.count(), before + 1, "the probe itself was sent");
        assert!(h.stats(&crm).expect("lane").breaker_open, "re-opened");
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_outlasting_the_window_fails_jobs_without_sending() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.set_default(Reply::status(503));
        let h = Harness::with_breaker(
            dispatch_options(&[], Duration::from_millis(500)),
            client_options(Duration::from_secs(5)),
            test_breaker(2, Duration::from_secs(60)),
        )
        .await;
        let crm = h.add("crm", &receiver.url("/"));
        for n in 0..2 {
            failed(1, Some(503), &h.deliver(job(&crm, &format!("F-{n}"))).await);
        }
        for n in 0..5 {
            let error = failed(0, None, &h.deliver(job(&crm, &format!("H-{n}"))).await);
            assert!(error.contains("circuit breaker open"), "{error}");
        }
        assert_eq!(receiver.received_count(), 2, "nothing sent while open");
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_is_per_integration_and_client_errors_do_not_open_it() {
    within("the test body", LIMIT, async {
        let bad = TestReceiver::http().await.unwrap();
        bad.set_default(Reply::status(500));
        let good = TestReceiver::http().await.unwrap();
        good.set_default(Reply::status(404));
        let h = Harness::with_breaker(
            dispatch_options(&[], Duration::from_millis(500)),
            client_options(Duration::from_secs(5)),
            test_breaker(1, Duration::from_secs(60)),
        )
        .await;
        let x = h.add("x", &bad.url("/"));
        let y = h.add("y", &good.url("/"));
        failed(1, Some(500), &h.deliver(job(&x, "P-1")).await);
        assert!(h.stats(&x).unwrap().breaker_open);
        // A 4xx is the endpoint working: no failure counted even at threshold 1.
        for n in 0..3 {
            failed(1, Some(404), &h.deliver(job(&y, &format!("P-{n}"))).await);
        }
        assert!(!h.stats(&y).unwrap().breaker_open);
        good.set_default(Reply::ok());
        assert_eq!(h.deliver(job(&y, "P-ok")).await, delivered(1, 200));
        assert_eq!(bad.received_count(), 1);
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_probe_does_not_wedge_the_breaker() {
    // The probe's delivery is dropped mid-request (its task aborted, as when a publish stream
    // goes away). The next job must be able to probe at once, not after the 60 s probe timeout.
    within("the test body", LIMIT, async {
        let (receiver, state, mut seen) = Gated::start(500).await;
        let h = Harness::with_breaker(
            dispatch_options(&[], Duration::from_secs(5)),
            client_options(Duration::from_secs(10)),
            test_breaker(1, Duration::from_millis(100)),
        )
        .await;
        let crm = h.add("crm", &receiver.url);
        failed(1, Some(500), &h.deliver(job(&crm, "P-1")).await);
        assert!(h.stats(&crm).unwrap().breaker_open);
        let _ = seen.recv().await;

        state.set_status(200);
        state.hold(true);
        h.wait_cool_down(&crm).await;
        let probe = h.spawn(job(&crm, "P-probe"));
        let r = tokio::time::timeout(WAIT, seen.recv())
            .await
            .expect("the probe is sent")
            .unwrap();
        assert_eq!(r.header("webhook-id"), Some("P-probe_crm"));
        probe.abort();
        assert!(probe.await.unwrap_err().is_cancelled());
        state.hold(false);

        assert_eq!(h.deliver(job(&crm, "P-next")).await, delivered(1, 200));
        assert!(!h.stats(&crm).unwrap().breaker_open);
    })
    .await
    .expect("the test finished within its limit");
}
