//! Per-integration lanes: the concurrency limit, isolation between integrations,
//! shutdown of waiting jobs, and dropping the lanes of deleted integrations.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use pushwire_common::delivery_store::{DeliveryKey, DeliveryState};

use pushwire_tests::eventually::{until, within};
use pushwire_tests::receiver::{Received, Reply, TestReceiver};
use pushwire_worker::budget::MemoryBudget;
use pushwire_worker::deliver::dispatch::{DispatchOptions, Outcome};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{
    Harness, HookReceiver, LIMIT, WAIT, client_options, delivered, dispatch_options, failed, job,
    next, wait_count,
};

// ---------------------------------------------------------------------------------------------
// 11, 12. Concurrency limit and isolation
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_is_limited_per_integration() {
    const JOBS: usize = 10;
    within("the test body", LIMIT, async {
        // The receiver counts requests being answered at once, and holds each one until a
        // second is in (or it is the last), so the limit is reached and not merely allowed.
        let current = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let arrived = Arc::new(AtomicUsize::new(0));
        let (ids_tx, mut ids) = mpsc::unbounded_channel();
        let receiver = HookReceiver::start({
            let (current, peak, arrived) = (current.clone(), peak.clone(), arrived.clone());
            move |r: Received| {
                let (current, peak, arrived) = (current.clone(), peak.clone(), arrived.clone());
                let _ = ids_tx.send(r.header("webhook-id").unwrap_or_default().to_owned());
                async move {
                    let now = current.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    let all_in = arrived.fetch_add(1, Ordering::SeqCst) + 1 >= JOBS;
                    if !all_in {
                        // Held at most 2 s: then answered anyway (the peak assertion fails).
                        let _ = until("a second request in", Duration::from_secs(2), || {
                            current.load(Ordering::SeqCst) >= 2
                                || arrived.load(Ordering::SeqCst) >= JOBS
                        })
                        .await;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    current.fetch_sub(1, Ordering::SeqCst);
                    Reply::ok()
                }
            }
        })
        .await;
        let h = Harness::new(
            DispatchOptions {
                concurrency: 2,
                ..dispatch_options(&[20], Duration::from_secs(15))
            },
            client_options(Duration::from_secs(10)),
        )
        .await;
        let crm = h.add("crm", &receiver.url);

        let jobs: Vec<_> = (0..JOBS)
            .map(|n| h.spawn(job(&crm, &format!("P-{n}"))))
            .collect();
        // Sample the lane while the jobs run.
        let (mut max_in_flight, mut max_queued) = (0, 0);
        while !jobs.iter().all(JoinHandle::is_finished) {
            if let Some(s) = h.stats(&crm) {
                max_in_flight = max_in_flight.max(s.in_flight);
                max_queued = max_queued.max(s.queued);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for j in jobs {
            assert_eq!(j.await.unwrap(), delivered(1, 200));
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2, "receiver-side concurrency");
        assert!(max_in_flight <= 2, "in flight {max_in_flight}");
        assert!(max_queued > 0, "jobs waited for a slot");
        let mut seen = HashSet::new();
        while let Ok(id) = ids.try_recv() {
            assert!(seen.insert(id), "each job sent once");
        }
        assert_eq!(seen.len(), JOBS);
        assert_eq!(h.stats(&crm).map(|s| (s.in_flight, s.queued)), Some((0, 0)));
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_integration_does_not_delay_another() {
    within("the test body", LIMIT, async {
        let stuck = TestReceiver::http().await.unwrap();
        stuck.set_default(Reply::hang());
        let fine = TestReceiver::http().await.unwrap();
        let h = Harness::new(
            DispatchOptions {
                concurrency: 2,
                ..dispatch_options(&[], Duration::from_secs(60))
            },
            client_options(Duration::from_secs(30)),
        )
        .await;
        let x = h.add("x", &stuck.url("/"));
        let y = h.add("y", &fine.url("/"));

        // X's two slots hang and two more jobs queue behind them.
        let x_jobs: Vec<_> = (0..4)
            .map(|n| h.spawn(job(&x, &format!("X-{n}"))))
            .collect();
        wait_count(&stuck, 2).await;
        h.wait_stats(&x, |s| s.in_flight == 2 && s.queued == 2)
            .await;

        // Y delivers every job while X is still stuck.
        for n in 0..5 {
            assert_eq!(
                h.deliver(job(&y, &format!("Y-{n}"))).await,
                delivered(1, 200)
            );
        }
        assert_eq!(fine.received_count(), 5);
        assert!(x_jobs.iter().all(|j| !j.is_finished()), "X is still stuck");
        assert_eq!(stuck.received_count(), 2);
        for j in x_jobs {
            j.abort();
        }
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_lane_queues_its_first_attempts_instead_of_handing_them_off() {
    // One slot, 20 first attempts at once to a receiver that answers at once: the queue drains
    // in milliseconds, so every one is delivered by its first attempt, none handed off.
    const JOBS: usize = 20;
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        let h = Harness::new(
            DispatchOptions {
                concurrency: 1,
                slot_wait: Duration::from_secs(10),
                ..dispatch_options(&[20], Duration::from_secs(15))
            },
            client_options(Duration::from_secs(5)),
        )
        .await;
        let crm = h.add("crm", &receiver.url("/"));
        let jobs: Vec<_> = (0..JOBS)
            .map(|n| h.spawn_first(job(&crm, &format!("P-{n}"))))
            .collect();
        for j in jobs {
            assert_eq!(j.await.unwrap(), delivered(1, 200));
        }
        assert_eq!(receiver.received_count(), JOBS);
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_known_to_be_slow_hands_off_without_waiting() {
    // One slot, attempts time out after 1.5 s, a first attempt waits up to 2 s for a slot.
    // Once an attempt held the slot for 1.5 s, the lane expects 1.5 s per waiter: the first
    // waiter behind a running attempt still waits (1.5 s < 2 s), the second (3 s) is handed
    // off at once, while the attempt ahead of both is still running.
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.set_default(Reply::hang());
        let h = Harness::new(
            DispatchOptions {
                concurrency: 1,
                slot_wait: Duration::from_secs(2),
                ..dispatch_options(&[], Duration::from_secs(60))
            },
            client_options(Duration::from_millis(1500)),
        )
        .await;
        let crm = h.add("crm", &receiver.url("/"));
        assert!(failed(1, None, &h.deliver(job(&crm, "P-0")).await).contains("timed out"));

        let a = h.spawn_first(job(&crm, "P-A"));
        h.wait_stats(&crm, |s| s.in_flight == 1).await;
        let b1 = h.spawn_first(job(&crm, "P-B1"));
        h.wait_stats(&crm, |s| s.queued == 1).await;
        let b2 = h.dispatcher.deliver(job(&crm, "P-B2")).await;
        assert!(failed(0, None, &b2).contains("saturated"));
        assert!(
            !a.is_finished(),
            "B2 was answered while A's attempt still ran"
        );
        assert_eq!(h.stats(&crm).map(|s| (s.in_flight, s.queued)), Some((1, 1)));
        assert!(failed(1, None, &a.await.unwrap()).contains("timed out"));
        assert!(failed(1, None, &b1.await.unwrap()).contains("timed out"));
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_from_the_store_holds_its_share_of_the_memory_budget() {
    // The first attempt gets a 503 and is handed off; its retry, claimed from the store, hangs
    // at the receiver: while it is in flight the budget holds the body's share, and once it
    // timed out and went back to the store, nothing.
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.respond_with(vec![Reply::status(503)]);
        receiver.set_default(Reply::hang());
        let h = Harness::new(
            dispatch_options(&[20, 60_000], Duration::from_secs(600)),
            client_options(Duration::from_millis(1500)),
        )
        .await;
        let crm = h.add("crm", &receiver.url("/"));
        let job = job(&crm, "P-1");
        let share = MemoryBudget::share(job.body.len()).div_ceil(1024) * 1024;
        assert!(matches!(
            h.dispatcher.deliver(job).await,
            Outcome::Queued { attempts: 1, .. }
        ));
        assert_eq!(h.budget.held(), 0, "a queued delivery holds nothing");
        wait_count(&receiver, 2).await;
        assert_eq!(
            h.budget.held(),
            share,
            "the retry in flight holds its share"
        );
        until("the retry's share given back", WAIT, || {
            h.budget.held() == 0
        })
        .await
        .expect("the retry ended and gave its share back");
    })
    .await
    .expect("the test finished within its limit");
}

// ---------------------------------------------------------------------------------------------
// 13. Shutdown
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_failure_is_queued_and_nothing_new_starts_after_shutdown() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.set_default(Reply::status(500));
        // The retry is 30 s away: the first attempt's failure is handed off, not waited for.
        let h = Harness::new(
            dispatch_options(&[30_000], Duration::from_secs(60)),
            client_options(Duration::from_secs(5)),
        )
        .await;
        let crm = h.add("crm", &receiver.url("/"));
        let before = SystemTime::now();
        let outcome = h.dispatcher.deliver(job(&crm, "P-1")).await;
        let Outcome::Queued {
            attempts: 1,
            last_status: Some(500),
            next_attempt,
            ..
        } = outcome
        else {
            panic!("expected QUEUED after one attempt, got {outcome:?}");
        };
        assert!(
            next_attempt >= before + Duration::from_secs(30),
            "{next_attempt:?}"
        );
        let key = DeliveryKey::new(crm.name.clone(), "P-1");
        let record = h.store.store().get(&key).await.unwrap().expect("stored");
        assert_eq!(record.state, DeliveryState::Queued);
        assert_eq!(record.attempt_count, 1);
        assert!(record.body_retained);

        h.shutdown.cancel();
        // After shutdown nothing new is sent.
        for n in 0..20 {
            assert_eq!(
                h.deliver(job(&crm, &format!("late-{n}"))).await,
                Outcome::Interrupted
            );
        }
        // Each of them reported Interrupted without an attempt: nothing can be in flight.
        assert_eq!(receiver.received_count(), 1);
    })
    .await
    .expect("the test finished within its limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_interrupts_a_job_waiting_for_a_slot() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        receiver.set_default(Reply::hang());
        let h = Harness::new(
            DispatchOptions {
                concurrency: 1,
                ..dispatch_options(&[20], Duration::from_secs(60))
            },
            client_options(Duration::from_millis(1500)),
        )
        .await;
        let crm = h.add("crm", &receiver.url("/"));
        let running = h.spawn(job(&crm, "P-run"));
        next(&receiver).await;
        let queued = h.spawn(job(&crm, "P-queued"));
        h.wait_stats(&crm, |s| s.queued == 1).await;

        h.shutdown.cancel();
        let outcome = tokio::time::timeout(WAIT, queued)
            .await
            .expect("interrupted promptly")
            .unwrap();
        assert_eq!(outcome, Outcome::Interrupted);
        // The attempt in flight is finished (here: its timeout), then not retried.
        assert_eq!(running.await.unwrap(), Outcome::Interrupted);
        assert_eq!(receiver.received_count(), 1);
        assert_eq!(h.stats(&crm).map(|s| (s.in_flight, s.queued)), Some((0, 0)));
    })
    .await
    .expect("the test finished within its limit");
}

// ---------------------------------------------------------------------------------------------
// Lanes of deleted integrations
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_of_deleted_integrations_are_dropped() {
    within("the test body", LIMIT, async {
        let receiver = TestReceiver::http().await.unwrap();
        let h = Harness::new(
            dispatch_options(&[], Duration::from_secs(10)),
            client_options(Duration::from_secs(5)),
        )
        .await;
        let many: Vec<_> = (0..100)
            .map(|n| h.add(&format!("i{n}"), &receiver.url("/")))
            .collect();
        for i in &many {
            assert_eq!(h.deliver(job(i, "P-1")).await, delivered(1, 200));
        }
        assert_eq!(
            h.dispatcher.stats().len(),
            100,
            "live integrations keep their lanes"
        );
        for i in &many {
            h.source.remove(&i.name);
        }
        // New integrations come and go; the lanes of the deleted ones do not pile up.
        let fresh: Vec<_> = (0..100)
            .map(|n| h.add(&format!("j{n}"), &receiver.url("/")))
            .collect();
        for i in &fresh {
            assert_eq!(h.deliver(job(i, "P-2")).await, delivered(1, 200));
        }
        let lanes: HashSet<_> = h
            .dispatcher
            .stats()
            .into_iter()
            .map(|s| s.integration)
            .collect();
        let live: HashSet<_> = fresh.iter().map(|i| i.name.clone()).collect();
        assert_eq!(lanes, live, "only live integrations keep lanes");
        assert_eq!(receiver.received_count(), 200);
    })
    .await
    .expect("the test finished within its limit");
}
