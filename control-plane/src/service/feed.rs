//! The configuration feed behind `WatchConfig`: one store watch on the whole key space keeps an
//! in-memory copy of every integration and scope plus a bounded log of recent revisions; any
//! number of watchers are served from it (the pattern of the Kubernetes API server's watch
//! cache). A watcher resumes from the log when its revision is still there and gets a fresh
//! snapshot otherwise, so it never misses or repeats a change.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt as _;
use pushwire_common::backoff::Backoff;
use pushwire_common::domain::{
    AccountName, Integration, IntegrationName, PushScope, PushScopeName,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::crypto::Keyring;
use crate::store::keys::{self, Parsed};
use crate::store::records::{self, Record};
use crate::store::snapshot::{self, Snapshot};
use crate::store::{Event, Store, StoreError, WatchBatch};

/// Revisions kept for resuming watchers by default.
pub const DEFAULT_HISTORY: usize = 4096;

/// One change of the configuration.
#[derive(Clone, Debug)]
pub enum Change {
    /// An integration was created or changed.
    UpsertIntegration(Arc<Integration>),
    /// An integration was deleted.
    DeleteIntegration(IntegrationName),
    /// A push scope was created or changed.
    UpsertPushScope(Arc<PushScope>),
    /// A push scope was deleted.
    DeletePushScope(PushScopeName),
}

/// The changes of one store revision.
#[derive(Debug)]
pub struct RevisionChanges {
    /// The revision.
    pub revision: i64,
    /// Its changes, in the order the store reported them.
    pub changes: Vec<Change>,
}

/// What a watcher has to be sent next.
#[derive(Debug)]
pub enum FeedUpdate {
    /// Everything at `revision`.
    Snapshot {
        /// Revision of the snapshot.
        revision: i64,
        /// Every integration.
        integrations: Vec<Arc<Integration>>,
        /// Every push scope.
        push_scopes: Vec<Arc<PushScope>>,
    },
    /// The revisions after the watcher's, in order.
    Changes(Vec<Arc<RevisionChanges>>),
}

#[derive(Debug, Default)]
struct State {
    loaded: bool,
    revision: i64,
    /// Watchers at a revision `>= base` can be served from `log`.
    base: i64,
    integrations: BTreeMap<String, Arc<Integration>>,
    push_scopes: BTreeMap<String, Arc<PushScope>>,
    log: VecDeque<Arc<RevisionChanges>>,
}

/// The shared configuration cache; cheap to clone.
#[derive(Clone, Debug)]
pub struct ConfigFeed {
    state: Arc<RwLock<State>>,
    revision_tx: Arc<watch::Sender<i64>>,
    history: usize,
    /// See [`ConfigFeed::is_current`].
    live: Arc<AtomicBool>,
}

/// A watcher's handle on the feed.
#[derive(Debug)]
pub struct FeedView {
    feed: ConfigFeed,
    revision_rx: watch::Receiver<i64>,
}

impl ConfigFeed {
    /// An empty feed keeping `history` revisions for resuming watchers.
    pub fn new(history: usize) -> Self {
        Self {
            state: Arc::default(),
            revision_tx: Arc::new(watch::channel(0).0),
            history: history.max(1),
            live: Arc::default(),
        }
    }

    /// Whether the feed is current: loaded, and its store watch established and not failed
    /// since. False from a failed read or watch of the store until the watch is re-established;
    /// `WatchConfig` sends its progress messages only while true.
    pub fn is_current(&self) -> bool {
        self.live.load(Ordering::Acquire) && self.is_loaded()
    }

    fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::Release);
    }

    /// Whether the first load from the store is done.
    pub fn is_loaded(&self) -> bool {
        self.read().loaded
    }

    /// Revision of the cached configuration (0 before the first load).
    pub fn revision(&self) -> i64 {
        self.read().revision
    }

    /// Runs `read` on the cached configuration (store key -> record) at its revision; `None`
    /// before the first load. For answering reads while the store is unavailable.
    pub fn read_cached<R>(
        &self,
        read: impl FnOnce(&BTreeMap<String, Arc<Integration>>, &BTreeMap<String, Arc<PushScope>>) -> R,
    ) -> Option<(i64, R)> {
        let state = self.read();
        state.loaded.then(|| {
            (
                state.revision,
                read(&state.integrations, &state.push_scopes),
            )
        })
    }

    /// Number of watchers attached.
    pub fn watchers(&self) -> usize {
        self.revision_tx.receiver_count()
    }

    /// A handle for one watcher.
    pub fn subscribe(&self) -> FeedView {
        FeedView {
            feed: self.clone(),
            revision_rx: self.revision_tx.subscribe(),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps the feed in step with the store until `shutdown`: load everything, watch from the
    /// next revision, reload when the watch's start was compacted, back off while the store is
    /// unreachable. `keys` decrypt the secrets in records.
    pub async fn run(self, store: Arc<dyn Store>, keys: Arc<Keyring>, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        // Backing off ends early when the store says it answers again: the feed resumes at
        // once instead of up to one backoff late.
        let pause = |backoff: &mut Backoff| {
            let delay = backoff.next_delay();
            let store = store.clone();
            let shutdown = shutdown.clone();
            async move {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = store.recovered() => {}
                    () = shutdown.cancelled() => {}
                }
            }
        };
        // Loaded already ([`ConfigFeed::load`]): watch from the revision after the load.
        let mut resume_from = self.is_loaded().then(|| self.revision() + 1);
        while !shutdown.is_cancelled() {
            let from = match resume_from {
                Some(from) => from,
                None => {
                    let read = tokio::select! {
                        r = snapshot::read(store.as_ref(), &keys) => r,
                        () = shutdown.cancelled() => return,
                    };
                    match read {
                        Ok(snapshot) => {
                            if let Some(e) = &snapshot.refusal {
                                tracing::error!(
                                    error = %e, records = snapshot.refused,
                                    "config feed: skipping records whose secrets do not decrypt"
                                );
                            }
                            let revision = snapshot.revision;
                            self.load(snapshot);
                            revision + 1
                        }
                        Err(e) => {
                            self.set_live(false);
                            tracing::warn!(error = %e, "config feed: cannot read the store; retrying");
                            pause(&mut backoff).await;
                            continue;
                        }
                    }
                }
            };
            resume_from = Some(from);
            let mut stream = match store.watch(keys::ROOT, from).await {
                Ok(s) => {
                    self.set_live(true);
                    s
                }
                Err(e) => {
                    resume_from = self.after_error(e, from);
                    pause(&mut backoff).await;
                    continue;
                }
            };
            loop {
                let item = tokio::select! {
                    item = stream.next() => item,
                    () = shutdown.cancelled() => return,
                };
                match item {
                    Some(Ok(batch)) => {
                        backoff.reset();
                        resume_from = Some(batch.revision + 1);
                        self.apply(batch, &keys);
                    }
                    Some(Err(e)) => {
                        resume_from = self.after_error(e, resume_from.unwrap_or(from));
                        pause(&mut backoff).await;
                        break;
                    }
                    None => {
                        self.set_live(false);
                        pause(&mut backoff).await;
                        break;
                    }
                }
            }
        }
    }

    /// Where to resume after a watch error: nowhere (reload) when the history is gone.
    fn after_error(&self, e: StoreError, from: i64) -> Option<i64> {
        self.set_live(false);
        match e {
            StoreError::Compacted { .. } => {
                tracing::info!(from, "config feed: watch start compacted; reloading");
                None
            }
            e => {
                tracing::warn!(error = %e, from, "config feed: store watch failed; re-watching");
                Some(from)
            }
        }
    }

    /// Loads the configuration from `snapshot`, read at start-up for the key check and for
    /// this; [`ConfigFeed::run`] then watches from the revision after it.
    pub fn load(&self, snapshot: Snapshot) {
        let revision = snapshot.revision;
        // In key order, as read, each in a vector of its exact size: the maps are built in
        // one pass, in place, instead of a descent per key.
        let integrations = snapshot.integrations.into_iter().collect();
        let push_scopes = snapshot.push_scopes.into_iter().collect();
        {
            let mut state = self.write();
            *state = State {
                loaded: true,
                revision,
                base: revision,
                integrations,
                push_scopes,
                log: VecDeque::new(),
            };
        }
        tracing::info!(revision, "config feed: loaded");
        self.revision_tx.send_replace(revision);
    }

    fn apply(&self, batch: WatchBatch, keys: &Keyring) {
        let mut changes = Vec::with_capacity(batch.events.len());
        let mut state = self.write();
        for event in batch.events {
            match event {
                Event::Put(kv) => match records::decode(&kv, keys) {
                    Ok(Some(Record::Integration(i))) => {
                        let i = Arc::new(i);
                        state.integrations.insert(kv.key, i.clone());
                        changes.push(Change::UpsertIntegration(i));
                    }
                    Ok(Some(Record::PushScope(s))) => {
                        let s = Arc::new(s);
                        state.push_scopes.insert(kv.key, s.clone());
                        changes.push(Change::UpsertPushScope(s));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "config feed: skipping unreadable record")
                    }
                },
                Event::Delete { key } => match deleted_name(&key) {
                    Some(Deleted::Integration(name)) => {
                        state.integrations.remove(&key);
                        changes.push(Change::DeleteIntegration(name));
                    }
                    Some(Deleted::PushScope(name)) => {
                        state.push_scopes.remove(&key);
                        changes.push(Change::DeletePushScope(name));
                    }
                    None => {}
                },
            }
        }
        state.revision = batch.revision;
        if !changes.is_empty() {
            state.log.push_back(Arc::new(RevisionChanges {
                revision: batch.revision,
                changes,
            }));
            while state.log.len() > self.history {
                if let Some(dropped) = state.log.pop_front() {
                    state.base = dropped.revision;
                }
            }
        }
        drop(state);
        self.revision_tx.send_replace(batch.revision);
    }
}

enum Deleted {
    Integration(IntegrationName),
    PushScope(PushScopeName),
}

fn deleted_name(key: &str) -> Option<Deleted> {
    match keys::parse(key)? {
        Parsed::Integration(a, id) => Some(Deleted::Integration(
            IntegrationName::new(&AccountName::from_id(a).ok()?, id).ok()?,
        )),
        Parsed::PushScope(a, id) => Some(Deleted::PushScope(
            PushScopeName::new(&AccountName::from_id(a).ok()?, id).ok()?,
        )),
    }
}

impl FeedView {
    /// Waits until the feed has reached `revision`, at most `limit`; whether it did. A replica
    /// a moment behind a worker that resumes from another replica's revision catches up,
    /// instead of answering it with an older snapshot.
    pub async fn reach(&mut self, revision: i64, limit: Duration) -> bool {
        let reached = self.revision_rx.wait_for(|r| *r >= revision);
        matches!(tokio::time::timeout(limit, reached).await, Ok(Ok(_)))
    }

    /// Waits until there is something newer than `last` (0: nothing yet) and returns it; `None`
    /// when the feed is gone.
    pub async fn next(&mut self, last: i64) -> Option<FeedUpdate> {
        loop {
            if let Some(update) = self.pending(last) {
                return Some(update);
            }
            self.revision_rx.changed().await.ok()?;
        }
    }

    fn pending(&mut self, last: i64) -> Option<FeedUpdate> {
        let state = self.feed.read();
        self.revision_rx.mark_unchanged();
        if !state.loaded {
            return None;
        }
        // A client ahead of us (a store that was reset, or another replica) or behind our log
        // gets a snapshot: always a consistent answer.
        if last <= 0 || last < state.base || last > state.revision {
            return Some(FeedUpdate::Snapshot {
                revision: state.revision,
                integrations: state.integrations.values().cloned().collect(),
                push_scopes: state.push_scopes.values().cloned().collect(),
            });
        }
        let start = state.log.partition_point(|c| c.revision <= last);
        if start == state.log.len() {
            return None;
        }
        Some(FeedUpdate::Changes(
            state.log.range(start..).cloned().collect(),
        ))
    }
}
