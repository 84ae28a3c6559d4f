//! Conformance suite of the storage contract: every test body runs against an `EmbeddedStore`
//! in a temp dir (`embedded::*`) and an `EtcdStore` on a real etcd started for the test
//! (`etcd::*`), with each backend fresh so that revision numbers are exact. A few tests at the
//! end cover what only one backend has (reopening a file, an etcd outage).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use futures_util::StreamExt;
use pushwire_control_plane::store::{
    Compare, EmbeddedStore, EtcdLimits, EtcdStore, Event, KeyValue, Op, Store, StoreError, Txn,
    TxnOutcome, WatchBatch, WatchStream, keys,
};
use pushwire_tests::etcd::EtcdServer;
use pushwire_tests::eventually::{Poll, eventually};

/// Bound on every wait for a watch stream, so a bug fails the test instead of hanging it.
const STREAM_WAIT: Duration = Duration::from_secs(10);

/// What keeps a backend alive for the duration of a test: its temp dir or its etcd process.
type Backend = Box<dyn std::any::Any + Send>;

fn embedded() -> anyhow::Result<(Arc<dyn Store>, Backend)> {
    let dir = tempfile::tempdir()?;
    let store = EmbeddedStore::open(&dir.path().join("store.redb"))?;
    Ok((Arc::new(store), Box::new(dir)))
}

async fn etcd() -> anyhow::Result<(Arc<dyn Store>, Backend)> {
    let server = EtcdServer::start()?;
    let store = EtcdStore::connect(&[server.endpoint()]).await?;
    Ok((Arc::new(store), Box::new(server)))
}

/// Declares each listed body as a test against both backends.
macro_rules! conformance {
    ($($body:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $body() -> anyhow::Result<()> {
                    let (store, _backend) = super::embedded()?;
                    super::$body(store).await
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test]
                async fn $body() -> anyhow::Result<()> {
                    let (store, _backend) = super::etcd().await?;
                    super::$body(store).await
                }
            )*
        }
    };
}

conformance!(
    revisions_follow_etcd,
    absent_guard_conflicts_when_key_exists,
    stale_mod_revision_conflicts,
    prefix_unchanged_since_both_ways,
    failed_guard_applies_nothing,
    delete_then_recreate_gets_new_create_revision,
    conflicts_leave_no_trace,
    invalid_transactions_are_refused,
    watch_replays_history_then_follows,
    resumed_watch_misses_and_repeats_nothing,
    watch_sees_only_its_prefix,
    watch_from_compacted_revision_fails,
    compacting_the_empty_revision_loses_nothing,
    watch_from_future_revision_waits,
);

// Keys: integrations of account 42 are the watched prefix in most tests; account 4's share a
// string prefix with them but must never show up under it.
fn a() -> String {
    keys::integration("42", "crm")
}
fn b() -> String {
    keys::integration("42", "billing")
}
fn scope() -> String {
    keys::push_scope("42", "all")
}
fn other() -> String {
    keys::integration("4", "crm")
}
fn prefix() -> String {
    keys::integrations_prefix("42")
}

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
    }
}

fn del(key: &str) -> Op {
    Op::Delete {
        key: key.to_owned(),
    }
}

fn txn(compares: Vec<Compare>, ops: Vec<Op>) -> Txn {
    Txn { compares, ops }
}

fn kv(key: &str, value: &str, create_revision: i64, mod_revision: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
        create_revision,
        mod_revision,
    }
}

fn put_event(key: &str, value: &str, create_revision: i64, mod_revision: i64) -> Event {
    Event::Put(kv(key, value, create_revision, mod_revision))
}

fn delete_event(key: &str) -> Event {
    Event::Delete {
        key: key.to_owned(),
    }
}

fn batch(revision: i64, events: Vec<Event>) -> WatchBatch {
    WatchBatch { revision, events }
}

/// Applies a transaction that must commit; returns its revision.
async fn commit(store: &dyn Store, txn: Txn) -> anyhow::Result<i64> {
    match store.txn(txn.clone()).await? {
        TxnOutcome::Committed { revision } => Ok(revision),
        TxnOutcome::Conflict => bail!("unexpected conflict for {txn:?}"),
    }
}

/// Applies a transaction that must conflict, and checks it moved nothing.
async fn conflict(store: &dyn Store, txn: Txn) -> anyhow::Result<()> {
    let before = store.revision().await?;
    let outcome = store.txn(txn.clone()).await?;
    ensure!(
        outcome == TxnOutcome::Conflict,
        "expected a conflict for {txn:?}, got {outcome:?}"
    );
    ensure!(
        store.revision().await? == before,
        "a conflict moved the revision"
    );
    Ok(())
}

async fn next_batch(stream: &mut WatchStream) -> anyhow::Result<WatchBatch> {
    match tokio::time::timeout(STREAM_WAIT, stream.next()).await {
        Err(_) => bail!("no watch batch within {STREAM_WAIT:?}"),
        Ok(None) => bail!("watch stream ended"),
        Ok(Some(item)) => item.context("watch stream failed"),
    }
}

/// Reads batches until one at `revision` or later and returns them all.
async fn batches_through(
    stream: &mut WatchStream,
    revision: i64,
) -> anyhow::Result<Vec<WatchBatch>> {
    let mut seen = Vec::new();
    loop {
        let batch = next_batch(stream).await?;
        let done = batch.revision >= revision;
        seen.push(batch);
        if done {
            return Ok(seen);
        }
    }
}

/// Proves a stream holds nothing it should not: commits a marker under its prefix and checks
/// that the marker's batch comes next.
async fn expect_only_marker(
    store: &dyn Store,
    stream: &mut WatchStream,
    marker_key: &str,
) -> anyhow::Result<()> {
    let revision = commit(store, txn(vec![], vec![put(marker_key, "marker")])).await?;
    let next = next_batch(stream).await?;
    ensure!(
        next.revision == revision,
        "expected only the marker at {revision}, got {next:?}"
    );
    Ok(())
}

/// Both places the contract allows a `Compacted` error: from `watch` or as the first item.
async fn watch_error(store: &dyn Store, prefix: &str, from: i64) -> anyhow::Result<StoreError> {
    match store.watch(prefix, from).await {
        Err(err) => Ok(err),
        Ok(mut stream) => match tokio::time::timeout(STREAM_WAIT, stream.next()).await {
            Ok(Some(Err(err))) => Ok(err),
            other => bail!("expected a watch error, got {other:?}"),
        },
    }
}

async fn revisions_follow_etcd(store: Arc<dyn Store>) -> anyhow::Result<()> {
    let store = &*store;
    // Like etcd, an empty store is at revision 1 and its first write is revision 2.
    assert_eq!(store.revision().await?, 1);
    assert_eq!(store.get(&a()).await?, None);
    assert_eq!(commit(store, txn(vec![], vec![put(&a(), "v1")])).await?, 2);
    assert_eq!(store.get(&a()).await?, Some(kv(&a(), "v1", 2, 2)));
    assert_eq!(commit(store, txn(vec![], vec![put(&a(), "v2")])).await?, 3);
    assert_eq!(store.get(&a()).await?, Some(kv(&a(), "v2", 2, 3)));
    // Several writes share one revision.
    let ops = vec![put(&b(), "b"), put(&scope(), "s")];
    assert_eq!(commit(store, txn(vec![], ops)).await?, 4);
    assert_eq!(
        commit(store, txn(vec![], vec![put(&other(), "o")])).await?,
        5
    );

    let range = store.range(&prefix()).await?;
    assert_eq!(range.revision, 5);
    assert_eq!(
        range.kvs,
        vec![kv(&b(), "b", 4, 4), kv(&a(), "v2", 2, 3)],
        "sorted by key"
    );
    let account = store.range(&keys::account_prefix("42")).await?;
    let account_keys: Vec<_> = account.kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(account_keys, vec![b(), a(), scope()]);
    let short = store.range(&keys::account_prefix("4")).await?;
    assert_eq!(short.kvs, vec![kv(&other(), "o", 5, 5)]);
    let empty = store.range("/pushwire/v1/accounts/7/").await?;
    assert_eq!((empty.revision, empty.kvs.len()), (5, 0));
    assert_eq!(store.revision().await?, 5);
    Ok(())
}

async fn absent_guard_conflicts_when_key_exists(store: Arc<dyn Store>) -> anyhow::Result<()> {
    let store = &*store;
    let create = |value: &str| txn(vec![Compare::Absent(a())], vec![put(&a(), value)]);
    assert_eq!(commit(store, create("first")).await?, 2);
    conflict(store, create("second")).await?;
    assert_eq!(store.get(&a()).await?, Some(kv(&a(), "first", 2, 2)));
    let other_create = txn(vec![Compare::Absent(b())], vec![put(&b(), "b")]);
    assert_eq!(commit(store, other_create).await?, 3);
    Ok(())
}

async fn stale_mod_revision_conflicts(store: Arc<dyn Store>) -> anyhow::Result<()> {
    let store = &*store;
    let update = |seen: i64, value: &str| {
        txn(
            vec![Compare::ModRevision(a(), seen)],
            vec![put(&a(), value)],
        )
    };
    commit(store, txn(vec![], vec![put(&a(), "v1")])).await?;
    commit(store, txn(vec![], vec![put(&a(), "v2")])).await?;
    conflict(store, update(2, "stale")).await?;
    assert_eq!(commit(store, update(3, "v3")).await?, 4);
    assert_eq!(store.get(&a()).await?, Some(kv(&a(), "v3", 2, 4)));
    // A missing key never matches a real revision; like etcd, it reads as mod revision 0.
    let missing = txn(vec![Compare::ModRevision(b(), 4)], vec![put(&b(), "b")]);
    conflict(store, missing).await?;
    let zero = txn(vec![Compare::ModRevision(b(), 0)], vec![put(&b(), "b")]);
    assert_eq!(commit(store, zero).await?, 5);
    Ok(())
}

async fn prefix_unchanged_since_both_ways(store: Arc<dyn Store>) -> anyhow::Result<()> {
    let store = &*store;
    let unchanged_since = |revision: i64| Compare::PrefixUnchangedSince {
        prefix: prefix(),
        revision,
    };
    commit(store, txn(vec![], vec![put(&a(), "a")])).await?;
    let read = store.range(&prefix()).await?;
    assert_eq!(read.revision, 2);
    // Nothing under the prefix changed since the read: holds.
    let add_b = txn(vec![unchanged_since(read.revision)], vec![put(&b(), "b")]);
    assert_eq!(commit(store, add_b).await?, 3);
    // b was written after revision 2: fails.
    let stale = txn(vec![unchanged_since(2)], vec![put(&scope(), "s")]);
    conflict(store, stale).await?;
    // Writes outside the prefix do not count; a guard-only transaction commits at the current
    // revision without making a new one.
    assert_eq!(
        commit(store, txn(vec![], vec![put(&other(), "o")])).await?,
        4
    );
    let guard_only = txn(vec![unchanged_since(3)], vec![]);
    assert_eq!(commit(store, guard_only).await?, 4);
    // Deletions do not count either.
    assert_eq!(commit(store, txn(vec![], vec![del(&a())])).await?, 5);
    let after_delete = txn(vec![unchanged_since(3)], vec![put(&scope(), "s")]);
    assert_eq!(commit(store, after_delete).await?, 6);
    // An empty prefix holds for any revision.
    let empty = Compare::PrefixUnchangedSince {
        prefix: keys::integrations_prefix("7"),
        revision: 1,
    };
    assert_eq!(commit(store, txn(vec![empty], vec![])).await?, 6);
    Ok(())
}

async fn failed_guard_applies_nothing(store: Arc<dyn Store>) -> anyhow::Result<()> {
    let store = &*store;
    commit(store, txn(vec![], vec![put(&a(), "a")])).await?;
    let ops = || vec![put(&b(), "b"), put(&scope(), "s"), del(&a())];
    let holding = || vec![Compare::Absent(b()), Compare::ModRevision(a(), 2)];
    let mut failing = holding();
    failing.push(Compare::Absent(a()));
    conflict(store, txn(failing, ops())).await?;
    assert_eq!(store.get(&b()).await?, None);
    assert_eq!(store.get(&scope()).await?, None);
    assert_eq!(store.get(&a()).await?, Some(kv(&a(), "a", 2, 2)));

    assert_eq!(commit(store, txn(holding(), ops())).await?, 3);
    assert_eq!(store.get(&b()).await?, Some(kv(&b(), "b", 3, 3)));
    assert_eq!(store.get(&scope()).await?, Some(kv(&scope(), "s", 3, 3)));
    assert_eq!(store.get(&a()).await?, None);
    Ok(())
}

async fn delete_then_recreate_gets_new_create_revision(
    store: Arc<dyn Store>,
) -> anyhow::Result<()> {
    let store = &*store;
    commit(store, txn(vec![], vec![put(&a(), "v1")])).await?;
    commit(store, txn(vec![], vec![put(&a(), "v2")])).await?;
    assert_eq!(commit(store, txn(vec![], vec![del(&a())])).await?, 4);
    assert_eq!(store.get(&a()).await?, None);
    let range = store.range(&prefix()).await?;
    assert_eq!((range.revision, range.kvs.len()), (4, 0));
    // Deleting a missing key changes nothing, so, as in etcd, there is no new revision.
    assert_eq!(commit(store, txn(vec![], vec![del(&a())])).await?, 4);
    assert_eq!(store.revision().await?, 4);
    let recreate = txn(vec![Compare::Absent(a())], vec![put(&a(), "v3")]);
    assert_eq!(commit(store, recreate).await?, 5);
    assert_eq!(store.get(&a()).await?, Some(kv(&a(), "v3", 5, 5)));
    Ok(())
}

async fn conflicts_leave_no_trace(store: Arc<dyn Store>) -> anyhow::Result<()> {
    let store = &*store;
    commit(store, txn(vec![], vec![put(&a(), "a")])).await?;
    conflict(store, txn(vec![Compare::Absent(a())], vec![put(&a(), "x")])).await?;
    conflict(
        store,
        txn(vec![Compare::ModRevision(a(), 1)], vec![del(&a())]),
    )
    .await?;
    let changed = Compare::PrefixUnchangedSince {
        prefix: prefix(),
        revision: 1,
    };
    conflict(store, txn(vec![changed], vec![put(&b(), "x")])).await?;
    assert_eq!(commit(store, txn(vec![], vec![put(&b(), "b")])).await?, 3);
    // The history holds exactly the two commits: no revision went to a conflict.
    let mut stream = store.watch(&prefix(), 1).await?;
    assert_eq!(
        next_batch(&mut stream).await?,
        batch(2, vec![put_event(&a(), "a", 2, 2)])
    );
    assert_eq!(
        next_batch(&mut stream).await?,
        batch(3, vec![put_event(&b(), "b", 3, 3)])
    );
    expect_only_marker(store, &mut stream, &a()).await
}

async fn invalid_transactions_are_refused(store: Arc<dyn Store>) -> anyhow::Result<()> {
    let store = &*store;
    let refused = [
        txn(vec![], vec![put(&a(), "1"), put(&a(), "2")]),
        txn(vec![], vec![put(&a(), "1"), del(&a())]),
        txn(vec![], vec![put("", "empty key")]),
        txn(
            vec![],
            (0..=pushwire_control_plane::store::MAX_TXN_OPS)
                .map(|i| put(&keys::integration("42", &i.to_string()), "x"))
                .collect(),
        ),
    ];
    for invalid in refused {
        let result = store.txn(invalid.clone()).await;
        ensure!(
            matches!(result, Err(StoreError::Corrupt(_))),
            "{invalid:?} gave {result:?}"
        );
    }
    assert_eq!(store.revision().await?, 1);
    Ok(())
}

async fn watch_replays_history_then_follows(store: Arc<dyn Store>) -> anyhow::Result<()> {
    let store = &*store;
    commit(store, txn(vec![], vec![put(&a(), "a1")])).await?; // 2
    commit(
        store,
        txn(vec![], vec![put(&b(), "b1"), put(&scope(), "s")]),
    )
    .await?; // 3
    commit(store, txn(vec![], vec![del(&a())])).await?; // 4
    commit(store, txn(vec![], vec![put(&other(), "o")])).await?; // 5, outside
    commit(store, txn(vec![], vec![put(&b(), "b2")])).await?; // 6

    let mut stream = store.watch(&prefix(), 2).await?;
    let history = batches_through(&mut stream, 6).await?;
    assert_eq!(
        history,
        vec![
            batch(2, vec![put_event(&a(), "a1", 2, 2)]),
            batch(3, vec![put_event(&b(), "b1", 3, 3)]),
            batch(4, vec![delete_event(&a())]),
            batch(6, vec![put_event(&b(), "b2", 3, 6)]),
        ]
    );
    // Live: events of one revision come together, in the order of the operations (not of keys).
    let z = keys::integration("42", "zeta");
    let live = txn(vec![], vec![put(&z, "z"), put(&a(), "a2"), del(&b())]);
    assert_eq!(commit(store, live).await?, 7);
    assert_eq!(
        next_batch(&mut stream).await?,
        batch(
            7,
            vec![
                put_event(&z, "z", 7, 7),
                put_event(&a(), "a2", 7, 7),
                delete_event(&b()),
            ]
        )
    );
    expect_only_marker(store, &mut stream, &a()).await
}

async fn resumed_watch_misses_and_repeats_nothing(store: Arc<dyn Store>) -> anyhow::Result<()> {
    let store = &*store;
    commit(store, txn(vec![], vec![put(&a(), "1")])).await?; // 2
    commit(store, txn(vec![], vec![put(&b(), "1")])).await?; // 3
    let mut first = store.watch(&prefix(), 2).await?;
    let seen = next_batch(&mut first).await?;
    assert_eq!(seen.revision, 2);
    drop(first);
    commit(store, txn(vec![], vec![put(&a(), "2")])).await?; // 4, while nobody watches

    let mut resumed = store.watch(&prefix(), seen.revision + 1).await?;
    let history = batches_through(&mut resumed, 4).await?;
    assert_eq!(
        history,
        vec![
            batch(3, vec![put_event(&b(), "1", 3, 3)]),
            batch(4, vec![put_event(&a(), "2", 2, 4)]),
        ]
    );
    commit(store, txn(vec![], vec![put(&b(), "2")])).await?; // 5, live
    assert_eq!(
        next_batch(&mut resumed).await?,
        batch(5, vec![put_event(&b(), "2", 3, 5)])
    );
    expect_only_marker(store, &mut resumed, &a()).await
}

async fn watch_sees_only_its_prefix(store: Arc<dyn Store>) -> anyhow::Result<()> {
    let store = &*store;
    let mut ours = store.watch(&prefix(), 1).await?;
    let mut theirs = store.watch(&keys::account_prefix("4"), 1).await?;
    let other2 = keys::push_scope("4", "x");
    commit(store, txn(vec![], vec![put(&other(), "o")])).await?; // 2, account 4
    commit(store, txn(vec![], vec![put(&a(), "a")])).await?; // 3, ours
    commit(store, txn(vec![], vec![put(&scope(), "s")])).await?; // 4, account 42 scopes
    commit(store, txn(vec![], vec![put(&other2, "x")])).await?; // 5, account 4
    commit(
        store,
        txn(vec![], vec![put(&b(), "b"), put(&other(), "o2")]),
    )
    .await?; // 6, both

    let revisions = |batches: Vec<WatchBatch>| -> Vec<i64> {
        batches.iter().map(|batch| batch.revision).collect()
    };
    let ours_seen = batches_through(&mut ours, 6).await?;
    assert_eq!(revisions(ours_seen.clone()), vec![3, 6]);
    assert_eq!(ours_seen[1].events, vec![put_event(&b(), "b", 6, 6)]);
    let theirs_seen = batches_through(&mut theirs, 6).await?;
    assert_eq!(revisions(theirs_seen.clone()), vec![2, 5, 6]);
    assert_eq!(theirs_seen[2].events, vec![put_event(&other(), "o2", 2, 6)]);
    expect_only_marker(store, &mut ours, &a()).await?;
    expect_only_marker(store, &mut theirs, &other()).await
}

async fn watch_from_compacted_revision_fails(store: Arc<dyn Store>) -> anyhow::Result<()> {
    let store = &*store;
    commit(store, txn(vec![], vec![put(&a(), "a")])).await?; // 2
    commit(store, txn(vec![], vec![put(&b(), "b")])).await?; // 3
    commit(store, txn(vec![], vec![del(&a())])).await?; // 4
    commit(store, txn(vec![], vec![put(&b(), "b2")])).await?; // 5
    commit(store, txn(vec![], vec![put(&a(), "a2")])).await?; // 6
    store.compact(4).await?;
    // The compaction revision itself is gone too: etcd keeps its puts but not its deletions, so
    // a watch from it could not be complete.
    for from in [3, 4] {
        let err = watch_error(store, &prefix(), from).await?;
        ensure!(
            matches!(err, StoreError::Compacted { requested, compacted: 4 } if requested == from),
            "watch from {from}: expected Compacted {{ requested: {from}, compacted: 4 }}, \
             got {err:?}"
        );
    }
    let mut stream = store.watch(&prefix(), 5).await?;
    assert_eq!(
        batches_through(&mut stream, 6).await?,
        vec![
            batch(5, vec![put_event(&b(), "b2", 3, 5)]),
            batch(6, vec![put_event(&a(), "a2", 6, 6)]),
        ]
    );
    expect_only_marker(store, &mut stream, &b()).await?;
    // Compacting again at or below is a no-op; beyond the current revision is refused.
    store.compact(4).await?;
    store.compact(3).await?;
    let current = store.revision().await?;
    let future = store.compact(current + 1).await;
    ensure!(
        matches!(future, Err(StoreError::Unavailable(_))),
        "compacting a future revision gave {future:?}"
    );
    // Reads are unaffected.
    assert_eq!(store.get(&a()).await?, Some(kv(&a(), "a2", 6, 6)));
    Ok(())
}

/// Revision 1 is the empty store: compacting at it loses nothing, so watching from it still works.
async fn compacting_the_empty_revision_loses_nothing(store: Arc<dyn Store>) -> anyhow::Result<()> {
    let store = &*store;
    store.compact(1).await?;
    let mut stream = store.watch(&prefix(), 1).await?;
    commit(store, txn(vec![], vec![put(&a(), "a")])).await?; // 2
    assert_eq!(
        next_batch(&mut stream).await?,
        batch(2, vec![put_event(&a(), "a", 2, 2)])
    );
    Ok(())
}

async fn watch_from_future_revision_waits(store: Arc<dyn Store>) -> anyhow::Result<()> {
    let store = &*store;
    commit(store, txn(vec![], vec![put(&a(), "1")])).await?; // 2
    let mut stream = store.watch(&prefix(), 4).await?;
    commit(store, txn(vec![], vec![put(&a(), "2")])).await?; // 3, before the start
    commit(store, txn(vec![], vec![put(&a(), "3")])).await?; // 4
    assert_eq!(
        next_batch(&mut stream).await?,
        batch(4, vec![put_event(&a(), "3", 2, 4)])
    );
    // Revision 0 means "from the next commit".
    let mut from_now = store.watch(&prefix(), 0).await?;
    commit(store, txn(vec![], vec![put(&b(), "b")])).await?; // 5
    assert_eq!(next_batch(&mut from_now).await?.revision, 5);
    Ok(())
}

/// Keys per page in [`pages_are_one_read_at_one_revision`].
const PAGE_KEYS: usize = 3;

#[tokio::test]
async fn embedded_pages_are_one_read_at_one_revision() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = EmbeddedStore::open(&dir.path().join("store.redb"))?.with_page_keys(PAGE_KEYS);
    pages_are_one_read_at_one_revision(&store).await
}

#[tokio::test]
async fn etcd_pages_are_one_read_at_one_revision() -> anyhow::Result<()> {
    let server = EtcdServer::start()?;
    let limits = EtcdLimits {
        page_keys: PAGE_KEYS as i64,
        ..EtcdLimits::default()
    };
    let store = EtcdStore::connect_with(&[server.endpoint()], limits).await?;
    pages_are_one_read_at_one_revision(&store).await
}

/// A read in pages is the range at one revision, even when the store changes between pages:
/// ten keys under the prefix in pages of three, with a write and a delete after the first page.
async fn pages_are_one_read_at_one_revision(store: &dyn Store) -> anyhow::Result<()> {
    let keys: Vec<String> = (0..10)
        .map(|n| keys::integration("42", &format!("i{n}")))
        .collect();
    for key in &keys {
        commit(store, txn(vec![], vec![put(key, key)])).await?;
    }
    let at = commit(store, txn(vec![], vec![put(&other(), "outside")])).await?;
    let whole = store.range(&prefix()).await?;
    assert_eq!(whole.revision, at);
    assert_eq!(whole.kvs.len(), keys.len());

    let prefix = prefix();
    let mut pages = store.range_pages(&prefix);
    let first = pages.next().await.context("no first page")??;
    commit(store, txn(vec![], vec![put(&b(), "new"), del(&keys[9])])).await?;
    let mut read = vec![first];
    while let Some(page) = tokio::time::timeout(STREAM_WAIT, pages.next()).await? {
        read.push(page?);
    }
    let sizes: Vec<usize> = read.iter().map(|page| page.kvs.len()).collect();
    assert_eq!(sizes, vec![3, 3, 3, 1], "keys per page");
    for page in &read {
        assert_eq!(page.revision, at, "every page at the first page's revision");
    }
    let kvs: Vec<KeyValue> = read.into_iter().flat_map(|page| page.kvs).collect();
    assert_eq!(kvs, whole.kvs, "the pages together are the range");
    Ok(())
}

#[tokio::test]
async fn embedded_reopen_keeps_data_and_revision() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("state/store.redb");
    {
        let store = EmbeddedStore::open(&path)?;
        commit(&store, txn(vec![], vec![put(&a(), "a")])).await?; // 2
        commit(&store, txn(vec![], vec![put(&b(), "b")])).await?; // 3
        commit(&store, txn(vec![], vec![del(&b())])).await?; // 4
    }
    let store = EmbeddedStore::open(&path)?;
    assert_eq!(store.revision().await?, 4);
    assert_eq!(store.get(&a()).await?, Some(kv(&a(), "a", 2, 2)));
    assert_eq!(store.get(&b()).await?, None);
    let mut stream = store.watch(&prefix(), 2).await?;
    let history: Vec<i64> = batches_through(&mut stream, 4)
        .await?
        .iter()
        .map(|batch| batch.revision)
        .collect();
    assert_eq!(history, vec![2, 3, 4]);
    assert_eq!(commit(&store, txn(vec![], vec![put(&a(), "a2")])).await?, 5);
    assert_eq!(store.get(&a()).await?, Some(kv(&a(), "a2", 2, 5)));
    assert_eq!(next_batch(&mut stream).await?.revision, 5);
    Ok(())
}

#[tokio::test]
async fn etcd_outage_yields_unavailable_then_recovers() -> anyhow::Result<()> {
    let mut server = EtcdServer::start()?;
    let store = EtcdStore::connect(&[server.endpoint()]).await?;
    commit(&store, txn(vec![], vec![put(&a(), "a")])).await?; // 2
    let mut stream = store.watch(&prefix(), 0).await?;

    server.stop()?;
    let ended = tokio::time::timeout(STREAM_WAIT, stream.next()).await;
    ensure!(
        matches!(ended, Ok(Some(Err(StoreError::Unavailable(_))))),
        "watch during an outage gave {ended:?}"
    );
    let down = tokio::time::timeout(Duration::from_secs(15), store.revision()).await;
    ensure!(
        matches!(down, Ok(Err(StoreError::Unavailable(_)))),
        "a call during an outage gave {down:?}"
    );

    server.resume()?;
    // The client reconnects on its own; poll until it does, within a bound.
    let revision = eventually(
        "the etcd client reconnected",
        Duration::from_secs(20),
        || async {
            Ok(match store.revision().await {
                Ok(revision) => Poll::Ready(revision),
                Err(err) => Poll::not_yet(err),
            })
        },
    )
    .await?;
    assert_eq!(revision, 2, "etcd kept its data over the restart");
    assert_eq!(store.get(&a()).await?, Some(kv(&a(), "a", 2, 2)));
    server.restart()?;
    let connected = EtcdStore::connect(&[server.endpoint()]).await?;
    assert_eq!(connected.revision().await?, 2);
    Ok(())
}

#[tokio::test]
async fn etcd_connect_fails_fast_when_nothing_listens() -> anyhow::Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let connected = tokio::time::timeout(
        Duration::from_secs(15),
        EtcdStore::connect(std::slice::from_ref(&endpoint)),
    )
    .await
    .context("connect hung")?;
    ensure!(
        matches!(connected, Err(StoreError::Unavailable(_))),
        "connecting to nothing gave {connected:?}"
    );
    Ok(())
}

/// A range larger than the response cap comes in pages, all at the revision of the first:
/// 200 values of 4 KiB (800 KiB) under a 256 KiB cap with pages asked for 1,000 keys at a time
/// (too large: halved until a page fits).
#[tokio::test]
async fn etcd_ranges_above_the_response_cap_come_in_pages_at_one_revision() -> anyhow::Result<()> {
    let server = EtcdServer::start()?;
    let limits = EtcdLimits {
        max_response_bytes: 256 * 1024,
        page_keys: 1000,
    };
    let store = EtcdStore::connect_with(&[server.endpoint()], limits).await?;
    let value = vec![b'x'; 4096];
    let mut last = 0;
    for n in 0..200 {
        let txn = Txn {
            compares: Vec::new(),
            ops: vec![Op::Put {
                key: format!("/pushwire/v1/paged/{n:03}"),
                value: value.clone(),
            }],
        };
        let TxnOutcome::Committed { revision } = store.txn(txn).await? else {
            bail!("an unguarded write conflicted");
        };
        last = revision;
    }
    // A key outside the prefix that sorts right after it stays out.
    store
        .txn(Txn {
            compares: Vec::new(),
            ops: vec![Op::Put {
                key: "/pushwire/v1/paged0".into(),
                value: b"outside".to_vec(),
            }],
        })
        .await?;
    let range = store.range("/pushwire/v1/paged/").await?;
    ensure!(range.kvs.len() == 200, "{} keys", range.kvs.len());
    ensure!(
        range.revision == last + 1,
        "revision {} after {last}",
        range.revision
    );
    let keys: Vec<&str> = range.kvs.iter().map(|kv| kv.key.as_str()).collect();
    let want: Vec<String> = (0..200)
        .map(|n| format!("/pushwire/v1/paged/{n:03}"))
        .collect();
    ensure!(keys == want, "keys out of order or missing");
    ensure!(range.kvs.iter().all(|kv| kv.value == value));
    Ok(())
}
