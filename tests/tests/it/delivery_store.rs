//! The delivery store's conformance suite: every case runs against a real PostgreSQL (a
//! throw-away cluster per test) and an embedded SQLite file. Times are passed to the store
//! explicitly, so leases and retention are tested without waiting.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pushwire_common::delivery_store::{
    self, Attempt, ClaimRequest, ClaimedDelivery, DeliveryFilter, DeliveryKey, DeliveryParent,
    DeliveryState, DeliveryStore, Finish, FinishResult, INCOMPLETE_SKIP_PREFIX, ListRequest,
    NewDelivery, OpenOptions, Outcome, StatsRequest, StatsRow, StoreError, StoreUrl, TraceContext,
};
use pushwire_common::domain::AccountName;
use pushwire_common::domain::IntegrationName;
use pushwire_tests::postgres::PostgresServer;

/// A fixed "now" far from the epoch, so "an hour before" stays positive.
const T0_MS: u64 = 1_800_000_000_000;
const LEASE: Duration = Duration::from_secs(30);

fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(T0_MS)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn integration(account: &str, id: &str) -> IntegrationName {
    IntegrationName::parse(&format!("accounts/{account}/integrations/{id}")).unwrap()
}

fn key(account: &str, id: &str, participation: &str) -> DeliveryKey {
    DeliveryKey::new(integration(account, id), participation)
}

fn body_of(participation: &str) -> Bytes {
    Bytes::from(format!(
        r#"{{"id":"{participation}","campaign":{{"id":7}}}}"#
    ))
}

fn failed_attempt(at: SystemTime) -> Attempt {
    Attempt {
        time: at,
        status_code: Some(503),
        error_class: Some("status".into()),
        error_message: Some("503 Service Unavailable".into()),
        duration: Duration::from_millis(12),
    }
}

/// A delivery handed off after a failed first attempt, due at `due`.
fn queued(key: DeliveryKey, due: SystemTime) -> NewDelivery {
    let participation = key.participation_id.clone();
    NewDelivery {
        key,
        campaign_id: "7".into(),
        website_id: Some("3".into()),
        trace: Some(TraceContext {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            tracestate: "vendor=1".into(),
        }),
        outcome: Outcome::Queued { next_attempt: due },
        attempts: vec![failed_attempt(due - secs(5))],
        body: Some(body_of(&participation)),
    }
}

fn claim(worker: &str, now: SystemTime, limit: u32) -> ClaimRequest {
    ClaimRequest {
        worker: worker.into(),
        lease: LEASE,
        now,
        limit,
        max_per_integration: 0,
        exclude: vec![],
    }
}

fn keys(claimed: &[ClaimedDelivery]) -> Vec<DeliveryKey> {
    let mut keys: Vec<_> = claimed.iter().map(|c| c.lease.key.clone()).collect();
    keys.sort();
    keys
}

/// One backend under test: the database (kept alive for the test) and a way to open stores.
struct Backend {
    url: String,
    _postgres: Option<PostgresServer>,
    _dir: Option<tempfile::TempDir>,
}

impl Backend {
    async fn postgres() -> Self {
        let server = tokio::task::spawn_blocking(PostgresServer::start)
            .await
            .unwrap()
            .expect("starting PostgreSQL");
        let url = server.create_database("deliveries").unwrap();
        Self {
            url,
            _postgres: Some(server),
            _dir: None,
        }
    }

    fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("deliveries.db").display());
        Self {
            url,
            _postgres: None,
            _dir: Some(dir),
        }
    }

    async fn open(&self) -> Arc<dyn DeliveryStore> {
        delivery_store::open(
            &StoreUrl::parse(&self.url).unwrap(),
            &OpenOptions::default(),
        )
        .await
        .expect("opening the delivery store")
    }
}

/// Runs each case against PostgreSQL and SQLite.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(&super::Backend::postgres().await).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(&super::Backend::sqlite()).await;
                }
            )*
        }
    };
}

conformance!(
    migrations_run_twice_and_concurrently,
    hand_off_then_claim,
    lease_expiry_returns_claims,
    lease_guard_refuses_a_stale_finish,
    finish_batch_applies_each_finish_whose_lease_holds,
    rescheduled_delivery_is_claimed_again_when_due,
    claims_are_fair_across_integrations,
    no_backlog_starves_another_integration,
    concurrent_claims_never_overlap,
    excluded_integrations_are_not_claimed,
    skip_integration_ends_its_pending_deliveries,
    final_outcomes_are_recorded_and_override_claims,
    purge_removes_old_rows_and_orphaned_bodies_only,
    list_pages_newest_first_without_duplicates_or_gaps_while_rows_arrive,
    list_filters_by_each_field,
    stats_count_what_was_written_by_campaign_and_day,
    redeliver_requeues_retained_deliveries_with_the_same_key,
);

async fn migrations_run_twice_and_concurrently(backend: &Backend) {
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

async fn hand_off_then_claim(backend: &Backend) {
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

async fn lease_expiry_returns_claims(backend: &Backend) {
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

async fn lease_guard_refuses_a_stale_finish(backend: &Backend) {
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

async fn finish_batch_applies_each_finish_whose_lease_holds(backend: &Backend) {
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

async fn rescheduled_delivery_is_claimed_again_when_due(backend: &Backend) {
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

async fn claims_are_fair_across_integrations(backend: &Backend) {
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

async fn no_backlog_starves_another_integration(backend: &Backend) {
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

async fn concurrent_claims_never_overlap(backend: &Backend) {
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

async fn excluded_integrations_are_not_claimed(backend: &Backend) {
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

async fn skip_integration_ends_its_pending_deliveries(backend: &Backend) {
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

async fn final_outcomes_are_recorded_and_override_claims(backend: &Backend) {
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

async fn purge_removes_old_rows_and_orphaned_bodies_only(backend: &Backend) {
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

#[tokio::test]
async fn postgres_credentials_never_appear_in_errors_or_debug() {
    let backend = Backend::postgres().await;
    let server = backend._postgres.as_ref().unwrap();
    let wrong = "Wr0ngS3cretValue";
    let text = format!(
        "postgres://pushwire:{wrong}@127.0.0.1:{}/deliveries",
        server.port()
    );
    let url = StoreUrl::parse(&text).unwrap();
    assert!(!url.to_string().contains(wrong));
    assert!(!format!("{url:?}").contains(wrong));
    let err = delivery_store::open(&url, &OpenOptions::default())
        .await
        .expect_err("a wrong password is refused");
    for shown in [
        err.to_string(),
        format!("{err:?}"),
        format!("{:#}", anyhow::Error::new(err)),
    ] {
        assert!(!shown.contains(wrong), "{shown}");
        assert!(shown.contains("pushwire:***@127.0.0.1"), "{shown}");
    }

    // The right password works, and neither the URL nor the store shows it.
    let store = backend.open().await;
    let debug = format!("{store:?}");
    assert!(!debug.contains(server.password()), "{debug}");
    assert!(debug.contains("***"), "{debug}");
    let url = StoreUrl::parse(&backend.url).unwrap();
    assert!(!url.to_string().contains(server.password()));

    // Another scheme is refused by name, without the rest of the URL.
    let err = StoreUrl::parse(&format!("mysql://root:{wrong}@127.0.0.1/x")).unwrap_err();
    assert!(err.to_string().contains("mysql"), "{err}");
    assert!(!err.to_string().contains(wrong), "{err}");
}

#[tokio::test]
async fn postgres_outage_is_transient_and_the_store_recovers_by_itself() {
    let mut server = tokio::task::spawn_blocking(PostgresServer::start)
        .await
        .unwrap()
        .unwrap();
    let url = StoreUrl::parse(&server.create_database("deliveries").unwrap()).unwrap();
    let options = OpenOptions {
        max_connections: 2,
        acquire_timeout: Duration::from_secs(2),
    };
    let store = delivery_store::open(&url, &options).await.unwrap();
    store
        .hand_off(&[queued(key("1", "crm", "p1"), t0())], t0())
        .await
        .unwrap();

    let server = tokio::task::spawn_blocking(move || {
        server.stop().unwrap();
        server
    })
    .await
    .unwrap();
    let err = store
        .count_queued()
        .await
        .expect_err("the database is down");
    assert!(err.is_transient(), "{err}");
    let err = store
        .hand_off(&[queued(key("1", "crm", "p2"), t0())], t0())
        .await
        .expect_err("the database is down");
    assert!(err.is_transient(), "{err}");

    let mut server = server;
    let server = tokio::task::spawn_blocking(move || {
        server.resume().unwrap();
        server
    })
    .await
    .unwrap();
    // The pool reconnects on its own; the row handed off before the outage is there.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match store.count_queued().await {
            Ok(count) => {
                assert_eq!(count, 1);
                break;
            }
            Err(err) if tokio::time::Instant::now() < deadline => {
                assert!(err.is_transient(), "{err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("the store did not recover: {err}"),
        }
    }
    drop(server);

    // Not transient: a URL that names no store.
    let err = StoreError::from(StoreUrl::parse("mysql://x/y").unwrap_err());
    assert!(!err.is_transient());
}

#[tokio::test]
async fn a_wrong_password_is_not_transient() {
    let server = tokio::task::spawn_blocking(PostgresServer::start)
        .await
        .unwrap()
        .unwrap();
    let url = StoreUrl::parse(&format!(
        "postgres://pushwire:wrong@127.0.0.1:{}/postgres",
        server.port()
    ))
    .unwrap();
    let err = delivery_store::open(&url, &OpenOptions::default())
        .await
        .expect_err("refused");
    assert!(!err.is_transient(), "{err}");
}

/// A delivery recorded with a final `outcome` on campaign `campaign`, first written at `at`.
async fn record(
    store: &dyn DeliveryStore,
    key: DeliveryKey,
    campaign: &str,
    outcome: Outcome,
    at: SystemTime,
) {
    let participation = key.participation_id.clone();
    let delivery = NewDelivery {
        key,
        campaign_id: campaign.into(),
        website_id: Some(format!("w{campaign}")),
        trace: None,
        outcome,
        attempts: vec![failed_attempt(at)],
        body: Some(body_of(&participation)),
    };
    store.record_outcomes(&[delivery], at).await.unwrap();
}

fn list_request(parent: DeliveryParent, filter: DeliveryFilter, size: u32) -> ListRequest {
    ListRequest {
        parent,
        filter,
        page_size: size,
        after: None,
    }
}

/// Every delivery of a listing, page after page (`between` runs between pages).
async fn list_all(
    store: &dyn DeliveryStore,
    mut request: ListRequest,
    mut between: impl FnMut(usize) -> Option<NewDelivery>,
) -> Vec<DeliveryKey> {
    let mut seen = Vec::new();
    for page_number in 0.. {
        let page = store.list(&request).await.unwrap();
        assert!(page.deliveries.len() <= request.page_size as usize);
        seen.extend(page.deliveries.iter().map(|d| d.key.clone()));
        if let Some(delivery) = between(page_number) {
            store.record_outcomes(&[delivery], t0()).await.unwrap();
        }
        match page.next {
            Some(next) => request.after = Some(next),
            None => break,
        }
    }
    seen
}

async fn list_pages_newest_first_without_duplicates_or_gaps_while_rows_arrive(backend: &Backend) {
    let store = backend.open().await;
    // 25 deliveries over two integrations, several sharing a create time (ties are ordered by
    // integration and participation id).
    let mut expected = Vec::new();
    for i in 0..25u64 {
        let id = if i % 2 == 0 { "a" } else { "b" };
        let at = t0() - secs(100 - i / 3);
        let k = key("42", id, &format!("p{i:02}"));
        record(&*store, k.clone(), "7", Outcome::Delivered, at).await;
        expected.push((at, k));
    }
    record(
        &*store,
        key("43", "a", "other"),
        "7",
        Outcome::Delivered,
        t0(),
    )
    .await;
    expected.sort_by(|(at1, k1), (at2, k2)| at2.cmp(at1).then(k1.cmp(k2)));
    let expected: Vec<_> = expected.into_iter().map(|(_, k)| k).collect();
    let account = DeliveryParent::Account(AccountName::from_id("42").unwrap());
    // Newer deliveries arrive between pages: they are not part of this walk and shift nothing.
    let seen = list_all(
        &*store,
        list_request(account.clone(), DeliveryFilter::default(), 4),
        |n| {
            let mut newer = queued(key("42", "a", &format!("new{n}")), t0());
            newer.outcome = Outcome::Delivered;
            Some(newer)
        },
    )
    .await;
    assert_eq!(seen, expected);
    // One integration, same guarantees.
    let only_a = list_all(
        &*store,
        list_request(
            DeliveryParent::Integration(integration("42", "a")),
            DeliveryFilter {
                created_before: Some(t0() - secs(1)),
                ..DeliveryFilter::default()
            },
            3,
        ),
        |_| None,
    )
    .await;
    let expected_a: Vec<_> = expected
        .iter()
        .filter(|k| k.integration.id() == "a")
        .cloned()
        .collect();
    assert_eq!(only_a, expected_a);
    // A page lists no attempts, but says whether the body is retained.
    let page = store
        .list(&list_request(account, DeliveryFilter::default(), 1))
        .await
        .unwrap();
    assert!(page.deliveries[0].attempts.is_empty());
    assert!(page.deliveries[0].body_retained);
}

async fn list_filters_by_each_field(backend: &Backend) {
    let store = backend.open().await;
    record(
        &*store,
        key("42", "a", "p1"),
        "7",
        Outcome::Delivered,
        t0() - secs(30),
    )
    .await;
    record(
        &*store,
        key("42", "a", "p2"),
        "8",
        Outcome::Failed,
        t0() - secs(20),
    )
    .await;
    record(
        &*store,
        key("42", "b", "p2"),
        "8",
        Outcome::Delivered,
        t0() - secs(10),
    )
    .await;
    store
        .hand_off(&[queued(key("42", "b", "p3"), t0())], t0())
        .await
        .unwrap();
    let account = DeliveryParent::Account(AccountName::from_id("42").unwrap());
    let cases: Vec<(DeliveryFilter, Vec<DeliveryKey>)> = vec![
        (
            DeliveryFilter {
                state: Some(DeliveryState::Failed),
                ..Default::default()
            },
            vec![key("42", "a", "p2")],
        ),
        (
            DeliveryFilter {
                state: Some(DeliveryState::Queued),
                ..Default::default()
            },
            vec![key("42", "b", "p3")],
        ),
        (
            DeliveryFilter {
                campaign_id: Some("8".into()),
                ..Default::default()
            },
            vec![key("42", "b", "p2"), key("42", "a", "p2")],
        ),
        (
            DeliveryFilter {
                website_id: Some("w7".into()),
                ..Default::default()
            },
            vec![key("42", "a", "p1")],
        ),
        (
            DeliveryFilter {
                participation_id: Some("p2".into()),
                state: Some(DeliveryState::Delivered),
                ..Default::default()
            },
            vec![key("42", "b", "p2")],
        ),
        (
            DeliveryFilter {
                created_from: Some(t0() - secs(20)),
                created_before: Some(t0() - secs(10)),
                ..Default::default()
            },
            vec![key("42", "a", "p2")],
        ),
    ];
    for (filter, expected) in cases {
        let seen = list_all(
            &*store,
            list_request(account.clone(), filter.clone(), 10),
            |_| None,
        )
        .await;
        assert_eq!(seen, expected, "{filter:?}");
    }
}

async fn stats_count_what_was_written_by_campaign_and_day(backend: &Backend) {
    let store = backend.open().await;
    let day = Duration::from_secs(86_400);
    // t0 is 2027-01-15T08:00:00Z; day0 starts at its midnight.
    let day0 = UNIX_EPOCH + day * u32::try_from(T0_MS / 86_400_000).unwrap();
    let day0_number = i64::try_from(T0_MS / 86_400_000).unwrap();
    let skipped = |reason: &str| Outcome::Skipped {
        reason: reason.into(),
    };
    let incomplete = format!("{INCOMPLETE_SKIP_PREFIX}STARTED; completed only");
    let a = |p: &str| key("42", "a", p);
    record(&*store, a("p1"), "7", Outcome::Delivered, day0 + secs(10)).await;
    record(&*store, a("p2"), "7", Outcome::Delivered, day0 + secs(20)).await;
    record(&*store, a("p3"), "7", Outcome::Failed, day0 + day + secs(5)).await;
    record(&*store, a("p4"), "8", skipped(&incomplete), day0 + secs(30)).await;
    record(
        &*store,
        a("p5"),
        "8",
        skipped("integration deleted"),
        day0 + secs(40),
    )
    .await;
    store
        .hand_off(&[queued(a("p6"), day0 + day)], day0 + day + secs(1))
        .await
        .unwrap();
    record(
        &*store,
        key("42", "b", "p1"),
        "7",
        Outcome::Delivered,
        day0 + secs(50),
    )
    .await;
    record(
        &*store,
        key("43", "a", "p1"),
        "7",
        Outcome::Delivered,
        day0 + secs(50),
    )
    .await;
    // Outside the range.
    record(&*store, a("p0"), "7", Outcome::Delivered, day0 - secs(1)).await;

    let request = |parent, by_campaign, by_day| StatsRequest {
        parent,
        start: day0,
        end: day0 + day * 2,
        by_campaign,
        by_day,
    };
    let account = || DeliveryParent::Account(AccountName::from_id("42").unwrap());
    let crm = || DeliveryParent::Integration(integration("42", "a"));
    let row = |campaign: Option<&str>, day: Option<i64>, counts: [u64; 5]| StatsRow {
        campaign_id: campaign.map(Into::into),
        day,
        delivered: counts[0],
        failed: counts[1],
        skipped: counts[2],
        skipped_incomplete: counts[3],
        queued: counts[4],
    };
    assert_eq!(
        store
            .stats(&request(account(), false, false))
            .await
            .unwrap(),
        [row(None, None, [3, 1, 1, 1, 1])]
    );
    assert_eq!(
        store.stats(&request(crm(), true, false)).await.unwrap(),
        [
            row(Some("7"), None, [2, 1, 0, 0, 1]),
            row(Some("8"), None, [0, 0, 1, 1, 0]),
        ]
    );
    assert_eq!(
        store.stats(&request(account(), true, true)).await.unwrap(),
        [
            row(Some("7"), Some(day0_number), [3, 0, 0, 0, 0]),
            row(Some("8"), Some(day0_number), [0, 0, 1, 1, 0]),
            row(Some("7"), Some(day0_number + 1), [0, 1, 0, 0, 1]),
        ]
    );
    assert_eq!(
        store.stats(&request(crm(), false, true)).await.unwrap(),
        [
            row(None, Some(day0_number), [2, 0, 1, 1, 0]),
            row(None, Some(day0_number + 1), [0, 1, 0, 0, 1]),
        ]
    );
}

async fn redeliver_requeues_retained_deliveries_with_the_same_key(backend: &Backend) {
    let store = backend.open().await;
    let crm = integration("42", "crm");
    let old = t0() - secs(3600);
    record(&*store, key("42", "crm", "p1"), "7", Outcome::Failed, old).await;
    record(
        &*store,
        key("42", "crm", "p2"),
        "7",
        Outcome::Failed,
        t0() - secs(60),
    )
    .await;
    record(
        &*store,
        key("42", "crm", "p3"),
        "7",
        Outcome::Delivered,
        t0() - secs(60),
    )
    .await;
    record(
        &*store,
        key("42", "other", "p4"),
        "7",
        Outcome::Failed,
        t0() - secs(60),
    )
    .await;
    // p5 failed without its body: it cannot be sent again.
    let mut bodiless = queued(key("42", "crm", "p5"), t0());
    bodiless.outcome = Outcome::Failed;
    bodiless.body = None;
    store
        .record_outcomes(&[bodiless], t0() - secs(60))
        .await
        .unwrap();

    let failed_since = DeliveryFilter {
        state: Some(DeliveryState::Failed),
        created_from: Some(t0() - secs(120)),
        ..DeliveryFilter::default()
    };
    assert_eq!(store.redeliver(&crm, &failed_since, t0()).await.unwrap(), 1);
    let p2 = store.get(&key("42", "crm", "p2")).await.unwrap().unwrap();
    assert_eq!(p2.state, DeliveryState::Queued);
    assert_eq!(p2.next_attempt, Some(t0()));
    assert_eq!(p2.attempt_count, 1, "attempts are kept");
    for untouched in [key("42", "crm", "p1"), key("42", "crm", "p5")] {
        let record = store.get(&untouched).await.unwrap().unwrap();
        assert_eq!(record.state, DeliveryState::Failed, "{untouched:?}");
    }
    assert_eq!(
        store
            .get(&key("42", "other", "p4"))
            .await
            .unwrap()
            .unwrap()
            .state,
        DeliveryState::Failed
    );
    // A claim returns it, under its key (so its webhook-id), with the body.
    let claimed = store.claim_due(&claim("w1", t0(), 10)).await.unwrap();
    assert_eq!(keys(&claimed), [key("42", "crm", "p2")]);
    assert_eq!(claimed[0].body, Some(body_of("p2")));
    // Redelivering it again while claimed keeps the claim.
    let queued_filter = DeliveryFilter {
        state: Some(DeliveryState::Queued),
        ..DeliveryFilter::default()
    };
    assert_eq!(
        store.redeliver(&crm, &queued_filter, t0()).await.unwrap(),
        1
    );
    let finish = store
        .finish(&claimed[0].lease, None, &Outcome::Delivered, t0())
        .await
        .unwrap();
    assert_eq!(finish, FinishResult::Applied);
    // A purge right after the redelivery keeps the body (touched now).
    store
        .record_outcomes(
            &[{
                let mut d = queued(key("42", "crm", "p1"), t0());
                d.outcome = Outcome::Failed;
                d.body = None;
                d.attempts = vec![];
                d
            }],
            old,
        )
        .await
        .unwrap();
    let everything = DeliveryFilter::default();
    assert_eq!(store.redeliver(&crm, &everything, t0()).await.unwrap(), 3);
    store.purge(t0() + secs(1), 100).await.unwrap();
    let p1 = store.get(&key("42", "crm", "p1")).await.unwrap().unwrap();
    assert_eq!(p1.state, DeliveryState::Queued);
    assert!(p1.body_retained);
}
