//! The retry queue: hand-off, claims and leases, fairness, finishes, skips, outcomes, purge.

use super::*;

pub(super) async fn migrations_run_twice_and_concurrently(backend: &Backend) {
    // Four "processes" opening the same fresh database at once, each migrating.
    let stores = futures_util::future::join_all((0..4).map(|_| backend.open())).await;
    for store in &stores {
        store.migrate().await.expect("migrating again is a no-op");
    }
    // Every store sees the one schema.
    stores[0]
        .hand_off(&[queued(key("1", "crm", "p1"), t0())], t0())
        .await
        .unwrap();
    for store in &stores {
        assert_eq!(store.count_queued().await.unwrap(), 1);
    }
}

pub(super) async fn hand_off_then_claim(backend: &Backend) {
    let store = backend.open().await;
    let due = queued(key("1", "crm", "p1"), t0());
    let same_participation = queued(key("1", "erp", "p1"), t0() - secs(1));
    let later = queued(key("1", "crm", "p2"), t0() + secs(60));
    store
        .hand_off(&[due, same_participation, later], t0() - secs(10))
        .await
        .unwrap();
    assert_eq!(store.count_queued().await.unwrap(), 3);

    let claimed = store.claim_due(&claim("w1", t0(), 10)).await.unwrap();
    assert_eq!(
        keys(&claimed),
        [key("1", "crm", "p1"), key("1", "erp", "p1")],
        "only what is due"
    );
    let first = claimed
        .iter()
        .find(|c| c.lease.key == key("1", "crm", "p1"))
        .unwrap();
    assert_eq!(first.body.as_deref(), Some(&body_of("p1")[..]));
    assert_eq!(first.attempt_count, 1);
    assert_eq!(first.campaign_id, "7");
    assert_eq!(first.website_id.as_deref(), Some("3"));
    assert_eq!(first.next_attempt, t0());
    assert_eq!(first.create_time, t0() - secs(10));
    assert_eq!(first.lease.worker, "w1");
    assert_eq!(first.lease.expires, t0() + LEASE);
    assert_eq!(first.trace.as_ref().unwrap().tracestate, "vendor=1");

    // Claimed rows are not claimed twice while their lease runs.
    assert!(
        store
            .claim_due(&claim("w2", t0() + secs(1), 10))
            .await
            .unwrap()
            .is_empty()
    );
    let record = store.get(&key("1", "crm", "p1")).await.unwrap().unwrap();
    assert_eq!(record.state, DeliveryState::Queued);
    assert_eq!(record.lease, Some(("w1".to_owned(), t0() + LEASE)));
    assert!(record.body_retained);
    assert_eq!(record.attempts, [failed_attempt(t0() - secs(5))]);
    assert_eq!(record.last_status_code, Some(503));
    assert_eq!(
        record.last_error.as_deref(),
        Some("status: 503 Service Unavailable")
    );
    assert_eq!(record.key.webhook_id(), "p1_crm");
}

pub(super) async fn lease_expiry_returns_claims(backend: &Backend) {
    let store = backend.open().await;
    store
        .hand_off(&[queued(key("1", "crm", "p1"), t0())], t0())
        .await
        .unwrap();
    let first = store.claim_due(&claim("w1", t0(), 10)).await.unwrap();
    assert_eq!(first.len(), 1);
    // Just before the lease runs out: still w1's.
    let early = t0() + LEASE - Duration::from_millis(1);
    assert!(
        store
            .claim_due(&claim("w2", early, 10))
            .await
            .unwrap()
            .is_empty()
    );
    // w1 died: when the lease runs out, w2 gets it, under a new token.
    let second = store
        .claim_due(&claim("w2", t0() + LEASE, 10))
        .await
        .unwrap();
    assert_eq!(keys(&second), [key("1", "crm", "p1")]);
    assert_eq!(second[0].lease.worker, "w2");
    assert_ne!(second[0].lease.token, first[0].lease.token);
    assert!(!first[0].lease_expired);
    assert!(second[0].lease_expired, "w1's claim ran out");
    assert_eq!(second[0].body.as_deref(), Some(&body_of("p1")[..]));
}

pub(super) async fn lease_guard_refuses_a_stale_finish(backend: &Backend) {
    let store = backend.open().await;
    let k = key("1", "crm", "p1");
    store
        .hand_off(&[queued(k.clone(), t0())], t0())
        .await
        .unwrap();
    let stale = store
        .claim_due(&claim("w1", t0(), 1))
        .await
        .unwrap()
        .remove(0);
    // The same worker id claims again after its lease ran out (a restarted worker): the old
    // lease must not finish the new claim either.
    let later = t0() + LEASE + secs(1);
    let fresh = store
        .claim_due(&claim("w1", later, 1))
        .await
        .unwrap()
        .remove(0);
    let attempt = Attempt {
        time: later,
        status_code: Some(200),
        error_class: None,
        error_message: None,
        duration: Duration::from_millis(3),
    };
    assert_eq!(
        store
            .finish(&stale.lease, Some(&attempt), &Outcome::Delivered, later)
            .await
            .unwrap(),
        FinishResult::LeaseLost
    );
    let record = store.get(&k).await.unwrap().unwrap();
    assert_eq!(
        record.state,
        DeliveryState::Queued,
        "the stale finish wrote nothing"
    );
    assert_eq!(record.attempt_count, 1);
    assert_eq!(record.attempts.len(), 1);

    assert_eq!(
        store
            .finish(&fresh.lease, Some(&attempt), &Outcome::Delivered, later)
            .await
            .unwrap(),
        FinishResult::Applied
    );
    let record = store.get(&k).await.unwrap().unwrap();
    assert_eq!(record.state, DeliveryState::Delivered);
    assert_eq!(record.attempt_count, 2);
    assert_eq!(record.last_status_code, Some(200));
    assert_eq!(record.last_error, None);
    assert_eq!(record.lease, None);
    assert_eq!(record.next_attempt, None);
    assert_eq!(record.update_time, later);
    assert_eq!(record.attempts.last(), Some(&attempt));
    // Finishing twice is refused too.
    assert_eq!(
        store
            .finish(&fresh.lease, None, &Outcome::Failed, later)
            .await
            .unwrap(),
        FinishResult::LeaseLost
    );
    assert_eq!(store.count_queued().await.unwrap(), 0);
}

pub(super) async fn finish_batch_applies_each_finish_whose_lease_holds(backend: &Backend) {
    let store = backend.open().await;
    store
        .hand_off(
            &[
                queued(key("1", "a", "p1"), t0()),
                queued(key("1", "b", "p1"), t0()),
                queued(key("1", "c", "p1"), t0()),
            ],
            t0(),
        )
        .await
        .unwrap();
    let claimed = store.claim_due(&claim("w1", t0(), 10)).await.unwrap();
    let lease = |id: &str| {
        claimed
            .iter()
            .find(|c| c.lease.key.integration.id() == id)
            .unwrap()
            .lease
            .clone()
    };
    let mut stale = lease("c");
    stale.token -= 1;
    let ok = Attempt {
        time: t0() + secs(1),
        status_code: Some(200),
        error_class: None,
        error_message: None,
        duration: Duration::from_millis(9),
    };
    let next = t0() + secs(300);
    let batch = [
        Finish {
            lease: lease("b"),
            attempt: Some(failed_attempt(t0() + secs(1))),
            outcome: Outcome::Queued { next_attempt: next },
        },
        Finish {
            lease: lease("a"),
            attempt: Some(ok.clone()),
            outcome: Outcome::Delivered,
        },
        Finish {
            lease: stale,
            attempt: Some(ok.clone()),
            outcome: Outcome::Delivered,
        },
        // The same delivery twice: only the first applies.
        Finish {
            lease: lease("a"),
            attempt: None,
            outcome: Outcome::Failed,
        },
    ];
    let results = store.finish_batch(&batch, t0() + secs(2)).await.unwrap();
    assert_eq!(
        results,
        [
            FinishResult::Applied,
            FinishResult::Applied,
            FinishResult::LeaseLost,
            FinishResult::LeaseLost,
        ]
    );
    let a = store.get(&key("1", "a", "p1")).await.unwrap().unwrap();
    assert_eq!(a.state, DeliveryState::Delivered);
    assert_eq!(a.attempts.last(), Some(&ok));
    assert_eq!(a.attempt_count, 2);
    let b = store.get(&key("1", "b", "p1")).await.unwrap().unwrap();
    assert_eq!(b.state, DeliveryState::Queued);
    assert_eq!(b.next_attempt, Some(next));
    assert_eq!(b.lease, None);
    assert_eq!(b.attempt_count, 2);
    let c = store.get(&key("1", "c", "p1")).await.unwrap().unwrap();
    assert_eq!(c.state, DeliveryState::Queued);
    assert_eq!(c.attempt_count, 1, "the stale finish wrote nothing");
    assert!(c.lease.is_some());
    assert_eq!(store.finish_batch(&[], t0()).await.unwrap(), []);
}

pub(super) async fn rescheduled_delivery_is_claimed_again_when_due(backend: &Backend) {
    let store = backend.open().await;
    let k = key("1", "crm", "p1");
    store
        .hand_off(&[queued(k.clone(), t0())], t0())
        .await
        .unwrap();
    let claimed = store
        .claim_due(&claim("w1", t0(), 1))
        .await
        .unwrap()
        .remove(0);
    let next = t0() + secs(120);
    assert_eq!(
        store
            .finish(
                &claimed.lease,
                Some(&failed_attempt(t0())),
                &Outcome::Queued { next_attempt: next },
                t0() + secs(1),
            )
            .await
            .unwrap(),
        FinishResult::Applied
    );
    let record = store.get(&k).await.unwrap().unwrap();
    assert_eq!(record.state, DeliveryState::Queued);
    assert_eq!(record.next_attempt, Some(next));
    assert_eq!(record.lease, None);
    assert_eq!(record.attempt_count, 2);
    // Not before it is due, even though no lease holds it.
    assert!(
        store
            .claim_due(&claim("w2", next - secs(1), 1))
            .await
            .unwrap()
            .is_empty()
    );
    let again = store.claim_due(&claim("w2", next, 1)).await.unwrap();
    assert_eq!(keys(&again), [k]);
    assert!(!again[0].lease_expired, "the last claim was finished");
    assert_eq!(again[0].attempt_count, 2);
}

pub(super) async fn claims_are_fair_across_integrations(backend: &Backend) {
    let store = backend.open().await;
    // Integration A has 60 deliveries due long ago; B has one, due last; C has two.
    let mut batch: Vec<_> = (0..60)
        .map(|i| queued(key("1", "a", &format!("pa{i:03}")), t0() - secs(3600 - i)))
        .collect();
    batch.push(queued(key("2", "b", "pb"), t0()));
    batch.push(queued(key("1", "c", "pc1"), t0() - secs(10)));
    batch.push(queued(key("1", "c", "pc2"), t0() - secs(5)));
    store.hand_off(&batch, t0()).await.unwrap();

    let first = store.claim_due(&claim("w1", t0(), 3)).await.unwrap();
    assert_eq!(
        keys(&first),
        [
            key("1", "a", "pa000"),
            key("1", "c", "pc1"),
            key("2", "b", "pb")
        ],
        "one per integration before anyone's second"
    );
    // A and C are due: both are in the claim, A's oldest first. (How many of A's depends on the
    // store: its share of the limit, or all the limit leaves.)
    let second = store.claim_due(&claim("w1", t0(), 10)).await.unwrap();
    let second_keys = keys(&second);
    assert!(second.len() >= 2 && second.len() <= 10, "{second_keys:?}");
    assert!(
        second_keys.contains(&key("1", "c", "pc2")),
        "{second_keys:?}"
    );
    let from_a: Vec<_> = second_keys
        .iter()
        .filter(|k| k.integration.id() == "a")
        .map(|k| k.participation_id.clone())
        .collect();
    let expected: Vec<_> = (1..=from_a.len()).map(|i| format!("pa{i:03}")).collect();
    assert_eq!(from_a, expected, "A's oldest first");
    // A lane with two free slots takes two.
    let mut capped = claim("w1", t0(), 10);
    capped.max_per_integration = 2;
    let third = store.claim_due(&capped).await.unwrap();
    let next = from_a.len() + 1;
    assert_eq!(
        keys(&third),
        [
            key("1", "a", &format!("pa{next:03}")),
            key("1", "a", &format!("pa{:03}", next + 1))
        ],
        "at most two of A, oldest first"
    );
}

pub(super) async fn no_backlog_starves_another_integration(backend: &Backend) {
    let store = backend.open().await;
    // Five integrations with 20 old deliveries each, more due integrations than a claim takes;
    // B's one delivery is the newest. Oldest-first across integrations would serve B after all
    // 100; it must come within a few claims (the draw among ties is random: this fails with
    // probability (2/3)^30, about 5 in a million).
    let mut batch: Vec<_> = (0..100)
        .map(|i| {
            let id = format!("a{}", i % 5);
            queued(key("1", &id, &format!("p{i:03}")), t0() - secs(3600 - i))
        })
        .collect();
    batch.push(queued(key("1", "b", "pb"), t0()));
    store.hand_off(&batch, t0()).await.unwrap();
    for round in 0..30 {
        let claimed = store.claim_due(&claim("w1", t0(), 2)).await.unwrap();
        assert_eq!(claimed.len(), 2);
        assert_ne!(
            claimed[0].lease.key.integration, claimed[1].lease.key.integration,
            "one per integration before anyone's second"
        );
        if claimed.iter().any(|c| c.lease.key.integration.id() == "b") {
            return;
        }
        assert!(round < 29, "B waited behind the others' backlog");
    }
}

pub(super) async fn concurrent_claims_never_overlap(backend: &Backend) {
    let store = backend.open().await;
    let batch: Vec<_> = (0..120)
        .map(|i| queued(key("1", &format!("i{}", i % 6), &format!("p{i:03}")), t0()))
        .collect();
    store.hand_off(&batch, t0()).await.unwrap();
    // Four workers claim at once, more than there is in all.
    let claims = futures_util::future::join_all((0..4).map(|w| {
        let store = Arc::clone(&store);
        async move { store.claim_due(&claim(&format!("w{w}"), t0(), 50)).await }
    }))
    .await;
    let mut all: Vec<DeliveryKey> = Vec::new();
    for claimed in claims {
        all.extend(keys(&claimed.unwrap()));
    }
    let claimed = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), claimed, "a delivery was claimed twice");
    // What the race left is claimed next; nothing twice, nothing lost.
    let rest = store.claim_due(&claim("w9", t0(), 200)).await.unwrap();
    all.extend(keys(&rest));
    all.sort();
    all.dedup();
    assert_eq!(all.len(), claimed + rest.len());
    assert_eq!(all.len(), 120);
}

pub(super) async fn excluded_integrations_are_not_claimed(backend: &Backend) {
    let store = backend.open().await;
    store
        .hand_off(
            &[
                queued(key("1", "a", "p1"), t0()),
                queued(key("1", "a", "p2"), t0()),
                queued(key("1", "b", "p1"), t0()),
                // Same integration id in another account: not excluded.
                queued(key("2", "a", "p1"), t0()),
            ],
            t0(),
        )
        .await
        .unwrap();
    let mut request = claim("w1", t0(), 10);
    request.exclude = vec![integration("1", "a")];
    let claimed = store.claim_due(&request).await.unwrap();
    assert_eq!(keys(&claimed), [key("1", "b", "p1"), key("2", "a", "p1")]);
    // Once the breaker closes, A's deliveries are there.
    let rest = store.claim_due(&claim("w1", t0(), 10)).await.unwrap();
    assert_eq!(keys(&rest), [key("1", "a", "p1"), key("1", "a", "p2")]);
}

pub(super) async fn skip_integration_ends_its_pending_deliveries(backend: &Backend) {
    let store = backend.open().await;
    let mut delivered = queued(key("1", "a", "p0"), t0());
    delivered.outcome = Outcome::Delivered;
    store.record_outcomes(&[delivered], t0()).await.unwrap();
    store
        .hand_off(
            &[
                queued(key("1", "a", "p1"), t0()),
                queued(key("1", "a", "p2"), t0()),
                queued(key("1", "a", "p3"), t0() + secs(3600)),
                queued(key("1", "b", "p1"), t0()),
            ],
            t0(),
        )
        .await
        .unwrap();
    let mut only_a = claim("w1", t0(), 1);
    only_a.exclude = vec![integration("1", "b")];
    let held = store.claim_due(&only_a).await.unwrap().remove(0);

    let later = t0() + secs(5);
    let skipped = store
        .skip_integration(&integration("1", "a"), "integration deleted", later)
        .await
        .unwrap();
    assert_eq!(skipped, 3, "claimed, due and not yet due alike");
    for p in ["p1", "p2", "p3"] {
        let record = store.get(&key("1", "a", p)).await.unwrap().unwrap();
        assert_eq!(record.state, DeliveryState::Skipped, "{p}");
        assert_eq!(record.skip_reason.as_deref(), Some("integration deleted"));
        assert_eq!(record.next_attempt, None);
        assert_eq!(record.update_time, later);
    }
    let untouched = store.get(&key("1", "a", "p0")).await.unwrap().unwrap();
    assert_eq!(untouched.state, DeliveryState::Delivered);
    assert_eq!(
        store
            .finish(&held.lease, None, &Outcome::Delivered, later)
            .await
            .unwrap(),
        FinishResult::LeaseLost
    );
    assert_eq!(store.count_queued().await.unwrap(), 1);
    let rest = store.claim_due(&claim("w1", later, 10)).await.unwrap();
    assert_eq!(keys(&rest), [key("1", "b", "p1")]);
}

pub(super) async fn final_outcomes_are_recorded_and_override_claims(backend: &Backend) {
    let store = backend.open().await;
    let k = key("1", "crm", "p1");
    store
        .hand_off(&[queued(k.clone(), t0())], t0())
        .await
        .unwrap();
    let held = store
        .claim_due(&claim("w1", t0(), 1))
        .await
        .unwrap()
        .remove(0);

    // The live path delivered the re-published participation meanwhile: a final outcome wins,
    // and the holder of the claim can no longer finish.
    let mut delivered = queued(k.clone(), t0());
    delivered.outcome = Outcome::Delivered;
    delivered.attempts = vec![Attempt {
        time: t0() + secs(1),
        status_code: Some(204),
        error_class: None,
        error_message: None,
        duration: Duration::from_millis(4),
    }];
    delivered.body = None;
    let mut skipped = queued(key("1", "erp", "p1"), t0());
    skipped.outcome = Outcome::Skipped {
        reason: "incomplete participation".into(),
    };
    skipped.attempts = vec![];
    skipped.body = None;
    store
        .record_outcomes(&[delivered, skipped], t0() + secs(2))
        .await
        .unwrap();
    assert_eq!(
        store
            .finish(
                &held.lease,
                Some(&failed_attempt(t0())),
                &Outcome::Failed,
                t0()
            )
            .await
            .unwrap(),
        FinishResult::LeaseLost
    );
    let record = store.get(&k).await.unwrap().unwrap();
    assert_eq!(record.state, DeliveryState::Delivered);
    assert_eq!(record.attempt_count, 2);
    assert_eq!(record.last_status_code, Some(204));
    assert_eq!(record.lease, None);
    assert_eq!(record.create_time, t0());
    assert_eq!(record.update_time, t0() + secs(2));
    assert!(
        record.body_retained,
        "the hand-off's body stays for redelivery"
    );
    let skipped = store.get(&key("1", "erp", "p1")).await.unwrap().unwrap();
    assert_eq!(skipped.state, DeliveryState::Skipped);
    assert_eq!(
        skipped.skip_reason.as_deref(),
        Some("incomplete participation")
    );
    assert_eq!(skipped.attempt_count, 0);
    assert!(skipped.attempts.is_empty());

    // Handing off a delivery that had a final outcome queues it again (a re-publication whose
    // first attempt failed); handing off a queued one keeps its schedule.
    store
        .hand_off(&[queued(k.clone(), t0() + secs(60))], t0() + secs(3))
        .await
        .unwrap();
    store
        .hand_off(&[queued(k.clone(), t0() + secs(999))], t0() + secs(4))
        .await
        .unwrap();
    let record = store.get(&k).await.unwrap().unwrap();
    assert_eq!(record.state, DeliveryState::Queued);
    assert_eq!(record.next_attempt, Some(t0() + secs(60)));
    assert_eq!(record.attempt_count, 4);
    assert_eq!(store.count_queued().await.unwrap(), 1);

    // A hand-off needs the body.
    let mut no_body = queued(key("1", "crm", "p9"), t0());
    no_body.body = None;
    assert!(store.hand_off(&[no_body], t0()).await.is_err());
    assert!(store.get(&key("1", "crm", "p9")).await.unwrap().is_none());
}

pub(super) async fn purge_removes_old_rows_and_orphaned_bodies_only(backend: &Backend) {
    let store = backend.open().await;
    let old = t0() - secs(10 * 86_400);
    let retention_cut = t0() - secs(7 * 86_400);
    // p1: one delivery finished long ago, one still queued: the body stays.
    // p2: two deliveries finished long ago: everything goes.
    // p3: finished recently: stays.
    // p4: queued long ago and still queued: stays.
    store
        .hand_off(
            &[
                queued(key("1", "a", "p1"), old),
                queued(key("1", "b", "p1"), old),
                queued(key("1", "a", "p2"), old),
                queued(key("1", "b", "p2"), old),
                queued(key("1", "a", "p3"), old),
                queued(key("1", "a", "p4"), old),
            ],
            old,
        )
        .await
        .unwrap();
    let claimed = store
        .claim_due(&claim("w1", old + secs(1), 100))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 6);
    for c in &claimed {
        let p = c.lease.key.participation_id.as_str();
        let (outcome, at) = match (p, c.lease.key.integration.id()) {
            ("p1", "a") | ("p2", _) => (Outcome::Failed, old + secs(2)),
            ("p3", _) => (Outcome::Delivered, t0() - secs(60)),
            _ => (
                Outcome::Queued {
                    next_attempt: t0() + secs(60),
                },
                old + secs(2),
            ),
        };
        let attempt = failed_attempt(at);
        assert_eq!(
            store
                .finish(&c.lease, Some(&attempt), &outcome, at)
                .await
                .unwrap(),
            FinishResult::Applied
        );
    }

    // Batches of one: the loop must go on until nothing old is left.
    let stats = store.purge(retention_cut, 1).await.unwrap();
    assert_eq!(stats.deliveries, 3, "{stats:?}");
    assert_eq!(
        stats.attempts, 6,
        "a hand-off attempt and a finish attempt each: {stats:?}"
    );
    assert_eq!(stats.bodies, 1, "only p2's body is orphaned: {stats:?}");

    for gone in [
        key("1", "a", "p1"),
        key("1", "a", "p2"),
        key("1", "b", "p2"),
    ] {
        assert!(store.get(&gone).await.unwrap().is_none(), "{gone:?}");
    }
    let p1 = store.get(&key("1", "b", "p1")).await.unwrap().unwrap();
    assert_eq!(p1.state, DeliveryState::Queued);
    assert!(p1.body_retained, "p1 still has a queued delivery");
    assert_eq!(p1.attempts.len(), 2);
    let p3 = store.get(&key("1", "a", "p3")).await.unwrap().unwrap();
    assert!(p3.body_retained);
    assert_eq!(p3.attempts.len(), 2);
    assert!(
        store
            .get(&key("1", "a", "p4"))
            .await
            .unwrap()
            .unwrap()
            .body_retained
    );

    // Nothing more to purge; the queued delivery of p1 is still claimable with its body.
    assert_eq!(
        store.purge(retention_cut, 100).await.unwrap(),
        Default::default()
    );
    let again = store
        .claim_due(&claim("w1", t0() + secs(60), 10))
        .await
        .unwrap();
    assert_eq!(keys(&again), [key("1", "a", "p4"), key("1", "b", "p1")]);
    assert!(again.iter().all(|c| c.body.is_some()));
}
