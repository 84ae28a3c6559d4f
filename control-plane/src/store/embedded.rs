//! [`EmbeddedStore`]: the [`Store`] contract on a single redb file, for one-node deployments.
//! It reproduces etcd's revision model (a global revision, per-key create/mod revisions, no new
//! revision for a transaction that changes nothing) and keeps a bounded log of the events of
//! each recent revision, from which watches replay history and then follow new commits.

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::watch;

use super::{
    Compare, Event, KeyValue, Op, Pages, Range, Store, StoreError, Txn, TxnOutcome, WatchBatch,
    WatchStream, check_txn,
};

/// Current state: key -> (create_revision, mod_revision, value).
const KV: TableDefinition<&str, (i64, i64, &[u8])> = TableDefinition::new("kv");
/// History: revision -> the encoded events of that revision (see [`encode_events`]).
const LOG: TableDefinition<i64, &[u8]> = TableDefinition::new("log");
/// Counters, under the names below.
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
/// The store revision.
const META_REVISION: &str = "revision";
/// Revision the history was compacted at: it and everything before it are gone, so watches
/// must start after it (as with etcd, which drops the deletions of the compaction revision).
const META_COMPACTED: &str = "compacted";

/// Revision of an empty store. etcd starts at 1 so that its first write is revision 2; the
/// conformance suite holds both stores to the same numbers.
const EMPTY_REVISION: i64 = 1;

/// Revisions a watch reads from the history per step, which bounds what it buffers.
const WATCH_READ_REVISIONS: usize = 256;

/// redb's page cache (its default is 1 GiB). The config feed holds every record decoded
/// already; the cache only has to keep the tree's inner pages and what a write touches, and
/// reading everything at a start would otherwise leave up to its size of file pages in memory.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// How long opening waits for a file another store holds: a control plane that is still
/// stopping (a restart, or one run after another in a process) releases it within this.
const OPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

const EVENT_PUT: u8 = 0;
const EVENT_DELETE: u8 = 1;

/// A [`Store`] on one redb file: every call is one redb transaction run on the blocking pool,
/// and watches read the history table, woken by a revision broadcast after each commit.
///
/// Cheap to clone; clones share the open database. Dropping the last clone closes the file and
/// ends every watch stream.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
    /// Keys per page of [`Store::range_pages`].
    page_keys: usize,
}

struct Inner {
    db: Database,
    path: PathBuf,
    /// How many revisions of history survive automatic compaction; at least 1.
    keep_revisions: i64,
    /// Latest committed revision. Watch streams hold receivers only, so dropping the store
    /// drops the sender and wakes every stream to end.
    committed: watch::Sender<i64>,
}

/// What a write transaction decided, before it is committed or aborted.
enum Applied {
    Conflict,
    /// Guards held but nothing changed (e.g. deleting a missing key): like etcd, no new revision.
    Unchanged(i64),
    Changed(i64),
}

/// A step of a watch through the history.
struct LogChunk {
    batches: Vec<WatchBatch>,
    /// First revision not read yet.
    next: i64,
    /// Whether the history holds more after `next` already.
    more: bool,
}

/// The store file stayed locked by another open store for all of [`OPEN_WAIT`].
#[derive(Debug, thiserror::Error)]
#[error("it is in use (another control plane on this data directory?)")]
struct InUse;

/// Why opening the store file failed, with the path for the operator.
#[derive(Debug, thiserror::Error)]
#[error("cannot open store file {path}")]
struct OpenFailed {
    path: PathBuf,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// etcd refuses to compact a revision it has not reached; so does the embedded store.
#[derive(Debug, thiserror::Error)]
#[error("cannot compact at revision {requested}: the store is at revision {current}")]
struct FutureRevision {
    requested: i64,
    current: i64,
}

impl EmbeddedStore {
    /// History kept by [`EmbeddedStore::open`], in revisions.
    pub const DEFAULT_KEEP_REVISIONS: u64 = 10_000;

    /// Keys per page of [`Store::range_pages`] by default: a few MiB, and enough for every
    /// core to decode a share of the page while the next one is read.
    pub const DEFAULT_PAGE_KEYS: usize = 16_384;

    /// The same store, reading [`Store::range_pages`] in pages of `page_keys` keys (at least
    /// 1).
    #[must_use]
    pub fn with_page_keys(mut self, page_keys: usize) -> Self {
        self.page_keys = page_keys.max(1);
        self
    }

    /// Opens (or creates, with its parent directory) the store file at `path`, keeping the last
    /// [`Self::DEFAULT_KEEP_REVISIONS`] revisions of history for watches.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_history(path, Self::DEFAULT_KEEP_REVISIONS)
    }

    /// Like [`EmbeddedStore::open`], keeping the last `keep_revisions` revisions (at least 1) of
    /// history; a watch from an older revision fails with [`StoreError::Compacted`].
    ///
    /// Blocks on file I/O, and while another open store holds the file (at most 10 s, then
    /// fails); call it from a blocking context.
    pub fn open_with_history(path: &Path, keep_revisions: u64) -> Result<Self, StoreError> {
        Self::open_waiting(path, keep_revisions, OPEN_WAIT)
    }

    fn open_waiting(
        path: &Path,
        keep_revisions: u64,
        wait: std::time::Duration,
    ) -> Result<Self, StoreError> {
        let failed = |source: Box<dyn std::error::Error + Send + Sync>| {
            StoreError::Unavailable(Box::new(OpenFailed {
                path: path.to_owned(),
                source,
            }))
        };
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|err| failed(Box::new(err)))?;
        }
        create_private(path).map_err(|err| failed(Box::new(err)))?;
        let started = std::time::Instant::now();
        let db = loop {
            match Database::builder().set_cache_size(CACHE_BYTES).create(path) {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if started.elapsed() < wait => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    return Err(failed(Box::new(InUse)));
                }
                Err(err) => return Err(failed(Box::new(redb::Error::from(err)))),
            }
        };
        let revision = initialise(&db)?;
        let (committed, _) = watch::channel(revision);
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                path: path.to_owned(),
                keep_revisions: i64::try_from(keep_revisions.max(1)).unwrap_or(i64::MAX),
                committed,
            }),
            page_keys: Self::DEFAULT_PAGE_KEYS,
        })
    }

    /// Runs a redb call on the blocking pool, since redb does file I/O and may wait for the
    /// single writer.
    async fn blocking<T, F>(&self, call: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || call(&inner))
            .await
            .map_err(StoreError::unavailable)?
    }
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.inner.path)
            .field("keep_revisions", &self.inner.keep_revisions)
            .field("revision", &*self.inner.committed.borrow())
            .finish()
    }
}

/// Creates the store file, empty and readable by its owner only (0600, like the key and token
/// files: it holds every integration, with encrypted secrets), when it does not exist yet;
/// redb then initialises it. An existing file is left as it is, with a warning when group or
/// others may read it (an operator may have chosen that mode, for a backup job say).
fn create_private(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            crate::crypto::warn_if_shared(path, "the store file");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Creates the tables of a new file and returns the store revision.
fn initialise(db: &Database) -> Result<i64, StoreError> {
    let wtx = db.begin_write().map_err(db_err)?;
    let revision = {
        wtx.open_table(KV).map_err(db_err)?;
        wtx.open_table(LOG).map_err(db_err)?;
        let mut meta = wtx.open_table(META).map_err(db_err)?;
        let existing = meta.get(META_REVISION).map_err(db_err)?.map(|g| g.value());
        match existing {
            Some(revision) => revision,
            None => {
                meta.insert(META_REVISION, EMPTY_REVISION).map_err(db_err)?;
                meta.insert(META_COMPACTED, 0).map_err(db_err)?;
                EMPTY_REVISION
            }
        }
    };
    wtx.commit().map_err(db_err)?;
    Ok(revision)
}

/// redb reports damage as `Corrupted`; everything else is an I/O or resource failure.
fn db_err(err: impl Into<redb::Error>) -> StoreError {
    match err.into() {
        redb::Error::Corrupted(what) => StoreError::Corrupt(what),
        err => StoreError::unavailable(err),
    }
}

fn meta_value(meta: &impl ReadableTable<&'static str, i64>, name: &str) -> Result<i64, StoreError> {
    meta.get(name)
        .map_err(db_err)?
        .map(|g| g.value())
        .ok_or_else(|| StoreError::Corrupt(format!("store file has no {name} counter")))
}

fn to_key_value(key: &str, stored: (i64, i64, &[u8])) -> KeyValue {
    let (create_revision, mod_revision, value) = stored;
    KeyValue {
        key: key.to_owned(),
        value: value.to_vec(),
        create_revision,
        mod_revision,
    }
}

/// Whether a guard holds, with etcd's reading of a missing key as all-zero revisions.
fn holds(
    kv: &impl ReadableTable<&'static str, (i64, i64, &'static [u8])>,
    compare: &Compare,
) -> Result<bool, StoreError> {
    match compare {
        Compare::Absent(key) => Ok(kv.get(key.as_str()).map_err(db_err)?.is_none()),
        Compare::ModRevision(key, revision) => {
            let current = kv
                .get(key.as_str())
                .map_err(db_err)?
                .map_or(0, |g| g.value().1);
            Ok(current == *revision)
        }
        Compare::PrefixUnchangedSince { prefix, revision } => {
            for entry in kv.range(prefix.as_str()..).map_err(db_err)? {
                let (key, stored) = entry.map_err(db_err)?;
                if !key.value().starts_with(prefix.as_str()) {
                    break;
                }
                if stored.value().1 > *revision {
                    return Ok(false);
                }
            }
            Ok(true)
        }
    }
}

/// Drops the history up to and including `revision` unless it is already gone; returns whether
/// anything changed. Revision 1, the empty store, has no history, so compacting at it is a no-op
/// (etcd then still serves watches from 1, and so must this store).
fn compact_log(
    meta: &mut redb::Table<'_, &'static str, i64>,
    log: &mut redb::Table<'_, i64, &'static [u8]>,
    revision: i64,
) -> Result<bool, StoreError> {
    let compacted = meta_value(meta, META_COMPACTED)?;
    if revision <= compacted.max(EMPTY_REVISION) {
        return Ok(false);
    }
    log.retain_in(..=revision, |_, _| false).map_err(db_err)?;
    meta.insert(META_COMPACTED, revision).map_err(db_err)?;
    Ok(true)
}

impl Inner {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let rtx = self.db.begin_read().map_err(db_err)?;
        let kv = rtx.open_table(KV).map_err(db_err)?;
        let found = kv.get(key).map_err(db_err)?;
        Ok(found.map(|g| to_key_value(key, g.value())))
    }

    fn range(&self, prefix: &str) -> Result<Range, StoreError> {
        let mut whole = None;
        self.range_pages(prefix, usize::MAX, |range| {
            whole = Some(range);
            true
        })?;
        Ok(whole.expect("a read emits its last page"))
    }

    /// Reads every key under `prefix` in one read transaction, handing `emit` a page of
    /// `page_keys` keys at a time and then the rest (perhaps none) as the last page, until
    /// `emit` returns false.
    fn range_pages(
        &self,
        prefix: &str,
        page_keys: usize,
        mut emit: impl FnMut(Range) -> bool,
    ) -> Result<(), StoreError> {
        let rtx = self.db.begin_read().map_err(db_err)?;
        let revision = meta_value(&rtx.open_table(META).map_err(db_err)?, META_REVISION)?;
        let kv = rtx.open_table(KV).map_err(db_err)?;
        // A read of the whole range (a few keys, mostly) grows its vector as it goes.
        let capacity = match page_keys {
            usize::MAX => 0,
            keys => keys.min(EmbeddedStore::DEFAULT_PAGE_KEYS),
        };
        let page = || Vec::with_capacity(capacity);
        let mut kvs = page();
        for entry in kv.range(prefix..).map_err(db_err)? {
            let (key, stored) = entry.map_err(db_err)?;
            let key = key.value();
            if !key.starts_with(prefix) {
                break;
            }
            kvs.push(to_key_value(key, stored.value()));
            if kvs.len() == page_keys {
                let full = std::mem::replace(&mut kvs, page());
                if !emit(Range {
                    revision,
                    kvs: full,
                }) {
                    return Ok(());
                }
            }
        }
        emit(Range { revision, kvs });
        Ok(())
    }

    /// The store revision and the oldest revision still in the history.
    fn revisions(&self) -> Result<(i64, i64), StoreError> {
        let rtx = self.db.begin_read().map_err(db_err)?;
        let meta = rtx.open_table(META).map_err(db_err)?;
        Ok((
            meta_value(&meta, META_REVISION)?,
            meta_value(&meta, META_COMPACTED)?,
        ))
    }

    fn txn(&self, txn: &Txn) -> Result<TxnOutcome, StoreError> {
        let wtx = self.db.begin_write().map_err(db_err)?;
        // An error drops `wtx`, which aborts it.
        match self.apply(&wtx, txn)? {
            Applied::Conflict => {
                wtx.abort().map_err(db_err)?;
                Ok(TxnOutcome::Conflict)
            }
            Applied::Unchanged(revision) => {
                wtx.abort().map_err(db_err)?;
                Ok(TxnOutcome::Committed { revision })
            }
            Applied::Changed(revision) => {
                wtx.commit().map_err(db_err)?;
                self.announce(revision);
                Ok(TxnOutcome::Committed { revision })
            }
        }
    }

    fn apply(&self, wtx: &redb::WriteTransaction, txn: &Txn) -> Result<Applied, StoreError> {
        let mut meta = wtx.open_table(META).map_err(db_err)?;
        let mut kv = wtx.open_table(KV).map_err(db_err)?;
        let current = meta_value(&meta, META_REVISION)?;
        for compare in &txn.compares {
            if !holds(&kv, compare)? {
                return Ok(Applied::Conflict);
            }
        }
        let revision = current + 1;
        let mut events = Vec::with_capacity(txn.ops.len());
        for op in &txn.ops {
            match op {
                Op::Put { key, value } => {
                    let create_revision = kv
                        .get(key.as_str())
                        .map_err(db_err)?
                        .map_or(revision, |g| g.value().0);
                    kv.insert(key.as_str(), (create_revision, revision, value.as_slice()))
                        .map_err(db_err)?;
                    events.push(Event::Put(KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision,
                        mod_revision: revision,
                    }));
                }
                Op::Delete { key } => {
                    if kv.remove(key.as_str()).map_err(db_err)?.is_some() {
                        events.push(Event::Delete { key: key.clone() });
                    }
                }
            }
        }
        if events.is_empty() {
            return Ok(Applied::Unchanged(current));
        }
        let mut log = wtx.open_table(LOG).map_err(db_err)?;
        log.insert(revision, encode_events(&events).as_slice())
            .map_err(db_err)?;
        meta.insert(META_REVISION, revision).map_err(db_err)?;
        compact_log(
            &mut meta,
            &mut log,
            revision.saturating_sub(self.keep_revisions),
        )?;
        Ok(Applied::Changed(revision))
    }

    fn compact(&self, revision: i64) -> Result<(), StoreError> {
        let wtx = self.db.begin_write().map_err(db_err)?;
        let changed = {
            let mut meta = wtx.open_table(META).map_err(db_err)?;
            let current = meta_value(&meta, META_REVISION)?;
            if revision > current {
                return Err(StoreError::unavailable(FutureRevision {
                    requested: revision,
                    current,
                }));
            }
            let mut log = wtx.open_table(LOG).map_err(db_err)?;
            compact_log(&mut meta, &mut log, revision)?
        };
        if changed {
            wtx.commit().map_err(db_err)?;
        } else {
            wtx.abort().map_err(db_err)?;
        }
        Ok(())
    }

    /// Reads up to `limit` revisions of history from `from`, keeping the events under `prefix`.
    fn read_log(&self, prefix: &str, from: i64, limit: usize) -> Result<LogChunk, StoreError> {
        let rtx = self.db.begin_read().map_err(db_err)?;
        let compacted = meta_value(&rtx.open_table(META).map_err(db_err)?, META_COMPACTED)?;
        if from <= compacted {
            return Err(StoreError::Compacted {
                requested: from,
                compacted,
            });
        }
        let log = rtx.open_table(LOG).map_err(db_err)?;
        let mut chunk = LogChunk {
            batches: Vec::new(),
            next: from,
            more: false,
        };
        for (read, entry) in log.range(from..).map_err(db_err)?.enumerate() {
            if read == limit {
                chunk.more = true;
                break;
            }
            let (revision, data) = entry.map_err(db_err)?;
            let revision = revision.value();
            let events: Vec<Event> = decode_events(revision, data.value())?
                .into_iter()
                .filter(|event| event_key(event).starts_with(prefix))
                .collect();
            if !events.is_empty() {
                chunk.batches.push(WatchBatch { revision, events });
            }
            chunk.next = revision + 1;
        }
        Ok(chunk)
    }

    /// Wakes the watches. Commits of concurrent callers may announce out of order, so the
    /// broadcast value only ever grows.
    fn announce(&self, revision: i64) {
        self.committed.send_if_modified(|seen| {
            let newer = revision > *seen;
            if newer {
                *seen = revision;
            }
            newer
        });
    }
}

fn event_key(event: &Event) -> &str {
    match event {
        Event::Put(kv) => &kv.key,
        Event::Delete { key } => key,
    }
}

/// History entry format: per event, a tag byte, the key as a length-prefixed (u64 LE) byte
/// string, and for a put the create revision (i64 LE) and the length-prefixed value. The mod
/// revision is the entry's own revision.
fn encode_events(events: &[Event]) -> Vec<u8> {
    fn bytes(out: &mut Vec<u8>, data: &[u8]) {
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        out.extend_from_slice(data);
    }
    let mut out = Vec::new();
    for event in events {
        match event {
            Event::Put(kv) => {
                out.push(EVENT_PUT);
                bytes(&mut out, kv.key.as_bytes());
                out.extend_from_slice(&kv.create_revision.to_le_bytes());
                bytes(&mut out, &kv.value);
            }
            Event::Delete { key } => {
                out.push(EVENT_DELETE);
                bytes(&mut out, key.as_bytes());
            }
        }
    }
    out
}

fn decode_events(revision: i64, mut data: &[u8]) -> Result<Vec<Event>, StoreError> {
    fn take<'a>(data: &mut &'a [u8], len: usize) -> Option<&'a [u8]> {
        let (head, rest) = data.split_at_checked(len)?;
        *data = rest;
        Some(head)
    }
    fn word(data: &mut &[u8]) -> Option<[u8; 8]> {
        take(data, 8)?.try_into().ok()
    }
    fn bytes<'a>(data: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = usize::try_from(u64::from_le_bytes(word(data)?)).ok()?;
        take(data, len)
    }
    let malformed = || StoreError::Corrupt(format!("history of revision {revision} is malformed"));
    let key = |data: &mut &[u8]| -> Result<String, StoreError> {
        let raw = bytes(data).ok_or_else(malformed)?;
        String::from_utf8(raw.to_vec()).map_err(|_| malformed())
    };
    let mut events = Vec::new();
    while let Some(tag) = take(&mut data, 1) {
        match tag[0] {
            EVENT_PUT => {
                let key = key(&mut data)?;
                let create_revision = i64::from_le_bytes(word(&mut data).ok_or_else(malformed)?);
                let value = bytes(&mut data).ok_or_else(malformed)?.to_vec();
                events.push(Event::Put(KeyValue {
                    key,
                    value,
                    create_revision,
                    mod_revision: revision,
                }));
            }
            EVENT_DELETE => events.push(Event::Delete {
                key: key(&mut data)?,
            }),
            _ => return Err(malformed()),
        }
    }
    if events.is_empty() {
        return Err(malformed());
    }
    Ok(events)
}

/// A watch's position in the history. It holds the store weakly so an idle watch neither keeps
/// the file open nor outlives the store.
struct Follower {
    store: Weak<Inner>,
    committed: watch::Receiver<i64>,
    prefix: Arc<str>,
    next: i64,
    ready: VecDeque<WatchBatch>,
    finished: bool,
}

impl Follower {
    async fn next_batch(&mut self) -> Option<Result<WatchBatch, StoreError>> {
        // Each pass reads history or waits for a commit, and ends the stream once the store is
        // gone; a commit is never missed because the broadcast is marked seen before the read.
        loop {
            if let Some(batch) = self.ready.pop_front() {
                return Some(Ok(batch));
            }
            if self.finished {
                return None;
            }
            let inner = self.store.upgrade()?;
            self.committed.mark_unchanged();
            let (prefix, from) = (Arc::clone(&self.prefix), self.next);
            let read = tokio::task::spawn_blocking(move || {
                inner.read_log(&prefix, from, WATCH_READ_REVISIONS)
            })
            .await
            .map_err(StoreError::unavailable)
            .and_then(|read| read);
            let chunk = match read {
                Ok(chunk) => chunk,
                Err(err) => {
                    self.finished = true;
                    return Some(Err(err));
                }
            };
            self.next = chunk.next;
            self.ready.extend(chunk.batches);
            if self.ready.is_empty() && !chunk.more && self.committed.changed().await.is_err() {
                return None;
            }
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_owned();
        self.blocking(move |inner| inner.get(&key)).await
    }

    async fn range(&self, prefix: &str) -> Result<Range, StoreError> {
        let prefix = prefix.to_owned();
        self.blocking(move |inner| inner.range(&prefix)).await
    }

    /// Read on a thread of its own, at most two pages ahead of the caller.
    fn range_pages<'a>(&'a self, prefix: &'a str) -> Pages<'a> {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let (inner, page_keys) = (Arc::clone(&self.inner), self.page_keys);
        let prefix = prefix.to_owned();
        tokio::task::spawn_blocking(move || {
            let read = inner.range_pages(&prefix, page_keys, |page| {
                tx.blocking_send(Ok(page)).is_ok()
            });
            if let Err(e) = read {
                let _ = tx.blocking_send(Err(e));
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        check_txn(&txn)?;
        self.blocking(move |inner| inner.txn(&txn)).await
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream, StoreError> {
        let committed = self.inner.committed.subscribe();
        let (current, compacted) = self.blocking(Inner::revisions).await?;
        // etcd reads a start revision of 0 as "from the next commit".
        let from = if from_revision <= 0 {
            current + 1
        } else {
            from_revision
        };
        if from <= compacted {
            return Err(StoreError::Compacted {
                requested: from,
                compacted,
            });
        }
        let follower = Follower {
            store: Arc::downgrade(&self.inner),
            committed,
            prefix: Arc::from(prefix),
            next: from,
            ready: VecDeque::new(),
            finished: false,
        };
        Ok(Box::pin(futures_util::stream::unfold(
            follower,
            |mut follower| async move {
                let item = follower.next_batch().await?;
                Some((item, follower))
            },
        )))
    }

    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        self.blocking(move |inner| inner.compact(revision)).await
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        self.blocking(|inner| inner.revisions().map(|(revision, _)| revision))
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::StreamExt;

    use super::*;

    fn put(key: &str, value: &str) -> Txn {
        Txn {
            compares: Vec::new(),
            ops: vec![Op::Put {
                key: key.to_owned(),
                value: value.as_bytes().to_vec(),
            }],
        }
    }

    async fn next(stream: &mut WatchStream) -> Option<Result<WatchBatch, StoreError>> {
        tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("watch stream stalled")
    }

    #[cfg(unix)]
    #[test]
    fn a_new_store_file_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data").join("pushwire.redb");
        let store = EmbeddedStore::open(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(store);
        // Reopening keeps it so, and still reads the file.
        EmbeddedStore::open(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn opening_waits_for_the_store_that_holds_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pushwire.redb");
        let first = EmbeddedStore::open(&path).unwrap();
        let Err(err) = EmbeddedStore::open_waiting(&path, 1, Duration::from_millis(100)) else {
            panic!("opened a file another store holds");
        };
        let message =
            std::iter::successors(Some(&err as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            })
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(": ");
        assert!(
            message.contains("pushwire.redb") && message.contains("in use (another control plane"),
            "{message}"
        );
        // Released while the second waits: it opens.
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(first);
        });
        EmbeddedStore::open(&path).unwrap();
        release.join().unwrap();
    }

    #[test]
    fn history_entries_round_trip() {
        let events = vec![
            Event::Put(KeyValue {
                key: "/a/é".to_owned(),
                value: vec![0, 1, 255],
                create_revision: 3,
                mod_revision: 7,
            }),
            Event::Delete {
                key: "/a/b".to_owned(),
            },
            Event::Put(KeyValue {
                key: "/a/c".to_owned(),
                value: Vec::new(),
                create_revision: 7,
                mod_revision: 7,
            }),
        ];
        let encoded = encode_events(&events);
        assert_eq!(decode_events(7, &encoded).unwrap(), events);
        assert!(decode_events(7, &encoded[..encoded.len() - 1]).is_err());
        assert!(decode_events(7, &[]).is_err());
        assert!(matches!(
            decode_events(7, &[9]),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[tokio::test]
    async fn automatic_compaction_keeps_the_last_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_with_history(&dir.path().join("s.redb"), 3).unwrap();
        for i in 0..5 {
            store.txn(put("/p/k", &i.to_string())).await.unwrap();
        }
        assert_eq!(store.revision().await.unwrap(), 6);
        // Revisions 4, 5 and 6 are kept.
        let err = store.watch("/p/", 3).await.err().expect("compacted");
        assert!(matches!(
            err,
            StoreError::Compacted {
                requested: 3,
                compacted: 3
            }
        ));
        let mut stream = store.watch("/p/", 4).await.unwrap();
        for revision in 4..=6 {
            assert_eq!(next(&mut stream).await.unwrap().unwrap().revision, revision);
        }
    }

    #[tokio::test]
    async fn compacting_a_future_revision_fails() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        assert!(matches!(
            store.compact(2).await,
            Err(StoreError::Unavailable(_))
        ));
        store.compact(1).await.unwrap();
        // Compacting again at or below the compacted revision is a no-op.
        store.compact(1).await.unwrap();
        store.compact(0).await.unwrap();
    }

    #[tokio::test]
    async fn watch_ends_when_store_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/s.redb");
        let store = EmbeddedStore::open(&path).unwrap();
        let mut stream = store.watch("/p/", 0).await.unwrap();
        store.txn(put("/p/k", "v")).await.unwrap();
        assert_eq!(next(&mut stream).await.unwrap().unwrap().revision, 2);
        drop(store);
        assert!(next(&mut stream).await.is_none());
        // The stream held no reference to the file, so it can be opened again at once.
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.revision().await.unwrap(), 2);
    }

    #[tokio::test]
    async fn a_slow_watcher_overtaken_by_compaction_fails() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_with_history(&dir.path().join("s.redb"), 2).unwrap();
        store.txn(put("/p/k", "1")).await.unwrap();
        let mut stream = store.watch("/p/", 2).await.unwrap();
        for i in 0..4 {
            store.txn(put("/p/k", &i.to_string())).await.unwrap();
        }
        assert!(matches!(
            next(&mut stream).await,
            Some(Err(StoreError::Compacted {
                requested: 2,
                compacted: 4
            }))
        ));
        assert!(next(&mut stream).await.is_none());
    }
}
