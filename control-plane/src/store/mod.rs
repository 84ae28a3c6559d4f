//! Storage of the configuration: a small revisioned key-value contract modelled on etcd v3
//! (global revision, per-key create/mod revisions, compare-and-swap transactions, prefix watch
//! from a revision), with two implementations behind one conformance suite (`tests/`):
//! [`EtcdStore`] for production and [`EmbeddedStore`] (a single redb file) for one-node use.
//! Nothing above this module sees an etcd or redb type; record encoding lives in `records.rs`.

pub mod compaction;
mod embedded;
pub mod encryption;
mod etcd;
#[cfg(test)]
mod fixtures;
pub mod keys;
pub mod metered;
pub mod pb;
pub mod records;
pub mod snapshot;

use std::pin::Pin;

use async_trait::async_trait;
use futures_util::{Stream, StreamExt as _};

pub use embedded::EmbeddedStore;
pub use etcd::{EtcdStore, Limits as EtcdLimits};

/// A stored key with its value and revisions, as etcd reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyValue {
    /// Full key, e.g. `/pushwire/v1/accounts/42/integrations/crm`.
    pub key: String,
    /// Encoded record.
    pub value: Vec<u8>,
    /// Revision of the transaction that created the key (since its last deletion).
    pub create_revision: i64,
    /// Revision of the transaction that last wrote the key; used as the resource etag.
    pub mod_revision: i64,
}

/// A consistent read of every key under a prefix, sorted by key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    /// Store revision the read was taken at.
    pub revision: i64,
    /// The keys under the prefix, in ascending key order.
    pub kvs: Vec<KeyValue>,
}

/// A read of every key under a prefix, a page at a time ([`Store::range_pages`]): each page is
/// a [`Range`] of the keys after the previous page's, all at the first page's revision. The
/// last page may be empty; an `Err` ends the read; dropping the stream stops it.
pub type Pages<'a> = Pin<Box<dyn Stream<Item = Result<Range, StoreError>> + Send + 'a>>;

/// A guard of a transaction; every guard must hold for the operations to apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist (etcd: `create_revision == 0`).
    Absent(String),
    /// The key exists and was last written at exactly this revision (etcd: `mod_revision == r`).
    ModRevision(String, i64),
    /// No key under the prefix was created or written after `revision` (etcd: a range compare
    /// `mod_revision < revision + 1`). Deletions after `revision` do not make it fail.
    PrefixUnchangedSince {
        /// Key prefix; should end with `/`.
        prefix: String,
        /// Revision of the read the caller's decision was based on.
        revision: i64,
    },
}

/// A write of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create or overwrite `key`.
    Put {
        /// Full key.
        key: String,
        /// Encoded record.
        value: Vec<u8>,
    },
    /// Delete `key` if it exists.
    Delete {
        /// Full key.
        key: String,
    },
}

/// An atomic compare-then-write: all `ops` apply in one new revision if all `compares` hold,
/// and none apply otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    /// Guards, all of which must hold.
    pub compares: Vec<Compare>,
    /// Writes applied atomically when the guards hold.
    pub ops: Vec<Op>,
}

/// What a transaction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    /// The guards held and the writes were applied; `revision` is the store revision after them.
    Committed {
        /// Store revision after the transaction.
        revision: i64,
    },
    /// A guard failed; nothing was written.
    Conflict,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The key was created or overwritten; `mod_revision` is the event's revision.
    Put(KeyValue),
    /// The key was deleted.
    Delete {
        /// Full key.
        key: String,
    },
}

/// Every event under the watched prefix from one revision (one transaction), in key order of
/// the transaction's operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchBatch {
    /// Revision of the transaction.
    pub revision: i64,
    /// Its events under the watched prefix; never empty.
    pub events: Vec<Event>,
}

/// Batches in strictly increasing revision order. An `Err` ends the stream: the caller
/// re-watches from the revision after the last batch it saw.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchBatch, StoreError>> + Send>>;

/// Failures of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The watch start revision is older than the oldest revision the store still keeps.
    #[error("revision {requested} has been compacted (compacted up to {compacted})")]
    Compacted {
        /// Requested start revision.
        requested: i64,
        /// Revision the store was compacted at; watches may start after it.
        compacted: i64,
    },
    /// The store cannot be reached or failed to answer.
    #[error("store unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A write's answer was lost after it may have reached the store: it may or may not have
    /// been applied. The caller must read before deciding to write again.
    #[error("outcome of the write unknown")]
    OutcomeUnknown(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store holds something this version cannot read.
    #[error("store data corrupt: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Wraps any error as [`StoreError::Unavailable`].
    pub fn unavailable(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Unavailable(Box::new(err))
    }
}

/// Most operations or guards one transaction may carry: etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;

/// Rejects transactions etcd would refuse, before either store sees them, so that both
/// implementations refuse them the same way: an empty key, more than [`MAX_TXN_OPS`] guards or
/// writes, or one key written twice (etcd: "duplicate key given in txn request").
pub(crate) fn check_txn(txn: &Txn) -> Result<(), StoreError> {
    let invalid = |why: String| Err(StoreError::Corrupt(format!("invalid transaction: {why}")));
    if txn.compares.len() > MAX_TXN_OPS || txn.ops.len() > MAX_TXN_OPS {
        return invalid(format!("more than {MAX_TXN_OPS} guards or writes"));
    }
    let mut seen = std::collections::HashSet::with_capacity(txn.ops.len());
    for op in &txn.ops {
        let key = match op {
            Op::Put { key, .. } | Op::Delete { key } => key,
        };
        if key.is_empty() {
            return invalid("empty key".to_owned());
        }
        if !seen.insert(key.as_str()) {
            return invalid(format!("key {key:?} written twice"));
        }
    }
    for compare in &txn.compares {
        let key = match compare {
            Compare::Absent(key) | Compare::ModRevision(key, _) => key,
            Compare::PrefixUnchangedSince { prefix, .. } => prefix,
        };
        if key.is_empty() {
            return invalid("empty key or prefix in a guard".to_owned());
        }
    }
    Ok(())
}

/// The storage contract. Implementations must give the same answers for the same calls; the
/// conformance suite in `tests/tests/it/store_conformance.rs` checks that.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Reads every key under `prefix` at one revision.
    async fn range(&self, prefix: &str) -> Result<Range, StoreError> {
        let mut pages = self.range_pages(prefix);
        let mut range = Range {
            revision: 0,
            kvs: Vec::new(),
        };
        while let Some(page) = pages.next().await {
            let page = page?;
            range.revision = page.revision;
            range.kvs.extend(page.kvs);
        }
        Ok(range)
    }

    /// Reads every key under `prefix` at one revision, as [`Store::range`] does, in pages of
    /// the store's size, the next one read while the caller handles this one: a read of
    /// everything (a control plane's start) never holds all of it at once.
    fn range_pages<'a>(&'a self, prefix: &'a str) -> Pages<'a>;

    /// Applies a transaction atomically.
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError>;

    /// Streams every change under `prefix` with revision `>= from_revision`, first the history
    /// then live changes. Fails with [`StoreError::Compacted`] (either here or as the stream's
    /// first item) when `from_revision` is no longer kept.
    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream, StoreError>;

    /// Discards history up to and including `revision`; watches must then start after it.
    async fn compact(&self, revision: i64) -> Result<(), StoreError>;

    /// The current store revision; also a liveness check of the backend.
    async fn revision(&self) -> Result<i64, StoreError>;

    /// Resolves when the store, having been unreachable, may answer again (for loops that back
    /// off meanwhile); never, for a store that is never unreachable.
    async fn recovered(&self) {
        std::future::pending::<()>().await;
    }
}
