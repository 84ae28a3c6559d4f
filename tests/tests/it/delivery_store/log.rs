//! The delivery log: listing and paging, filters, statistics, redelivery.

use super::*;

/// A delivery recorded with a final `outcome` on campaign `campaign`, first written at `at`.
pub(super) async fn record(
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
pub(super) async fn list_all(
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

pub(super) async fn list_pages_newest_first_without_duplicates_or_gaps_while_rows_arrive(
    backend: &Backend,
) {
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

pub(super) async fn list_filters_by_each_field(backend: &Backend) {
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

pub(super) async fn stats_count_what_was_written_by_campaign_and_day(backend: &Backend) {
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

pub(super) async fn redeliver_requeues_retained_deliveries_with_the_same_key(backend: &Backend) {
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
