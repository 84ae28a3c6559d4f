//! Configuration changes between attempts: new URL, rotated secret, deleted or
//! disabled integrations.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use pushwire_common::domain::{Secret, SigningSecret};
use pushwire_common::webhook::signing;
use pushwire_tests::eventually::within;
use pushwire_tests::receiver::{Received, Reply, TestReceiver};
use pushwire_worker::deliver::dispatch::{DispatchOptions, Outcome};
use tokio::sync::mpsc;

use super::{
    Harness, HookReceiver, LIMIT, SECRET, check_webhook, client_options, delivered,
    dispatch_options, failed, job, next, settled,
};

// ---------------------------------------------------------------------------------------------
// 9. Configuration changes between attempts
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_goes_to_the_new_url() {
    within("the test body", LIMIT, async {
        let b = TestReceiver::http().await.unwrap();
        let h = Harness::new(
            dispatch_options(&[20, 20], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        )
        .await;
        let crm = h.add("crm", "http://127.0.0.1:9/unused");
        // Receiver A moves the integration to B before answering 500, so the change is in
        // place before the retry reads the configuration.
        let count_a = Arc::new(AtomicUsize::new(0));
        let a = HookReceiver::start({
            let (source, name, url_b, count_a) = (
                Arc::clone(&h.source),
                crm.name.clone(),
                b.url("/b"),
                Arc::clone(&count_a),
            );
            move |_| {
                count_a.fetch_add(1, Ordering::SeqCst);
                source.update(&name, |i| i.url.clone_from(&url_b));
                std::future::ready(Reply::status(500))
            }
        })
        .await;
        h.source.update(&crm.name, |i| i.url.clone_from(&a.url));

        assert_eq!(h.deliver(job(&crm, "P-1")).await, delivered(2, 200));
        assert_eq!(count_a.load(Ordering::SeqCst), 1);
        let r = next(&b).await;
        assert_eq!(r.path, "/b");
        check_webhook(&r, &crm, "P-1", SECRET);
        assert_eq!(b.received_count(), 1);
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_signed_with_the_rotated_secret() {
    within("the test body", LIMIT, async {
        let h = Harness::new(
            dispatch_options(&[20, 20], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        )
        .await;
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let crm = h.add("crm", "http://127.0.0.1:9/unused");
        let a = HookReceiver::start({
            let (source, name) = (Arc::clone(&h.source), crm.name.clone());
            move |r: Received| {
                let first = r.header("x-qualifio-signature").is_some_and(|sig| {
                    signing::verify_qualifio(&Secret::new(SECRET), &r.body, sig)
                });
                let _ = seen_tx.send(r);
                if first {
                    // Rotate: the new secret signs, the old one keeps signing Standard
                    // Webhooks for an hour.
                    source.update(&name, |i| {
                        i.secrets = vec![
                            SigningSecret {
                                secret: Secret::new("rotated-secret"),
                                expire_time: None,
                            },
                            SigningSecret {
                                secret: Secret::new(SECRET),
                                expire_time: Some(SystemTime::now() + Duration::from_secs(3600)),
                            },
                        ];
                    });
                    std::future::ready(Reply::status(503))
                } else {
                    std::future::ready(Reply::ok())
                }
            }
        })
        .await;
        h.source.update(&crm.name, |i| i.url.clone_from(&a.url));

        assert_eq!(h.deliver(job(&crm, "P-1")).await, delivered(2, 200));
        let first = seen.recv().await.unwrap();
        check_webhook(&first, &crm, "P-1", SECRET);
        let retry = seen.recv().await.unwrap();
        check_webhook(&retry, &crm, "P-1", "rotated-secret");
        let qualifio = retry.header("x-qualifio-signature").unwrap();
        assert!(
            !signing::verify_qualifio(&Secret::new(SECRET), &retry.body, qualifio),
            "Qualifio carries the newest secret only"
        );
        let ts: i64 = retry.header("webhook-timestamp").unwrap().parse().unwrap();
        let standard = retry.header("webhook-signature").unwrap();
        assert_eq!(standard.split(' ').count(), 2, "{standard}");
        assert!(signing::verify_standard_webhooks(
            &Secret::new(SECRET),
            "P-1_crm",
            ts,
            &retry.body,
            standard
        ));
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_between_attempts_is_skipped_with_its_attempt_kept() {
    within("the test body", LIMIT, async {
        let h = Harness::new(
            dispatch_options(&[20, 20], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        )
        .await;
        let crm = h.add("crm", "http://127.0.0.1:9/unused");
        let count = Arc::new(AtomicUsize::new(0));
        let a = HookReceiver::start({
            let (source, name, count) = (Arc::clone(&h.source), crm.name.clone(), count.clone());
            move |_| {
                count.fetch_add(1, Ordering::SeqCst);
                source.remove(&name);
                std::future::ready(Reply::status(500))
            }
        })
        .await;
        h.source.update(&crm.name, |i| i.url.clone_from(&a.url));

        assert_eq!(
            h.deliver(job(&crm, "P-1")).await,
            Outcome::Skipped {
                reason: "integration deleted".into()
            }
        );
        let record = settled(&h.store, &crm.name, "P-1").await;
        assert_eq!(
            (record.attempt_count, record.last_status_code),
            (1, Some(500))
        );
        assert_eq!(count.load(Ordering::SeqCst), 1);
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_between_attempts_is_skipped_with_its_attempt_kept() {
    within("the test body", LIMIT, async {
        let h = Harness::new(
            dispatch_options(&[20, 20], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        )
        .await;
        let crm = h.add("crm", "http://127.0.0.1:9/unused");
        let count = Arc::new(AtomicUsize::new(0));
        let a = HookReceiver::start({
            let (source, name, count) = (Arc::clone(&h.source), crm.name.clone(), count.clone());
            move |_| {
                count.fetch_add(1, Ordering::SeqCst);
                source.update(&name, |i| i.enabled = false);
                std::future::ready(Reply::status(503))
            }
        })
        .await;
        h.source.update(&crm.name, |i| i.url.clone_from(&a.url));

        assert_eq!(
            h.deliver(job(&crm, "P-1")).await,
            Outcome::Skipped {
                reason: "integration disabled".into()
            }
        );
        let record = settled(&h.store, &crm.name, "P-1").await;
        assert_eq!(
            (record.attempt_count, record.last_status_code),
            (1, Some(503))
        );
        assert_eq!(count.load(Ordering::SeqCst), 1);
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_or_disabled_before_the_first_attempt_is_skipped() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        let h = Harness::new(
            dispatch_options(&[20], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        )
        .await;
        let gone = h.add("gone", &receiver.url("/"));
        h.source.remove(&gone.name);
        match h.deliver(job(&gone, "P-1")).await {
            Outcome::Skipped { reason } => assert!(reason.contains("deleted"), "{reason}"),
            other => panic!("expected Skipped, got {other:?}"),
        }

        let off = h.add("off", &receiver.url("/"));
        h.source.update(&off.name, |i| i.enabled = false);
        match h.deliver(job(&off, "P-1")).await {
            Outcome::Skipped { reason } => assert!(reason.contains("disabled"), "{reason}"),
            other => panic!("expected Skipped, got {other:?}"),
        }
        assert_eq!(receiver.received_count(), 0);
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_while_waiting_for_a_slot_is_not_sent() {
    // Concurrency 1: job B waits behind A's hanging attempt; the integration is deleted
    // meanwhile. B must read the configuration again once it has the slot, not send to the
    // version it read before queueing.
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.set_default(Reply::hang());
        let h = Harness::new(
            DispatchOptions {
                concurrency: 1,
                ..dispatch_options(&[], Duration::from_secs(10))
            },
            client_options(Duration::from_millis(800)),
        )
        .await;
        let crm = h.add("crm", &receiver.url("/"));
        let a = h.spawn(job(&crm, "P-A"));
        next(&receiver).await;
        let b = h.spawn(job(&crm, "P-B"));
        h.wait_stats(&crm, |s| s.queued == 1).await;
        h.source.remove(&crm.name);

        match b.await.unwrap() {
            Outcome::Skipped { reason } => assert!(reason.contains("deleted"), "{reason}"),
            other => panic!("expected Skipped, got {other:?}"),
        }
        assert!(failed(1, None, &a.await.unwrap()).contains("timed out"));
        // Barrier: the integration back, and a sentinel through the same single slot after A.
        // Had B been sent to the version it read before queueing, it would have come first.
        h.source.put((*crm).clone());
        receiver.set_default(Reply::ok());
        assert_eq!(h.deliver(job(&crm, "P-S")).await, delivered(1, 200));
        let sent: Vec<_> = receiver
            .drain()
            .iter()
            .map(|r| r.header("webhook-id").map(str::to_owned))
            .collect();
        assert_eq!(sent, [Some("P-S_crm".to_owned())], "B was not sent");
    })
    .await
    .expect("the test finished within its limit");
}
