//! Compaction of the store's history, as the Kubernetes API server does it for etcd: every
//! interval each replica proposes to compact up to the revision it saw one interval earlier (so
//! at least one interval of history stays, for watches that resume), and a guarded write of one
//! key lets exactly one replica per interval win; the others learn of it and wait for the next
//! interval. Without it every update's history stays for ever and etcd's space quota (2 GiB
//! by default) fills, after which every write fails.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::{Compare, Op, Store, StoreError, Txn, TxnOutcome};

/// The key the replicas take turns on: its value is the revision last compacted to. Outside
/// the configuration's prefix, so the configuration feed never sees it.
pub const COMPACTION_KEY: &str = "/pushwire/compaction";

/// Default of `--etcd-compaction-interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5 * 60);

/// The compactor's metrics; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct CompactionMetrics {
    compactions: Counter,
    revision: Gauge,
}

impl CompactionMetrics {
    /// Registers `store_compactions_total` and `store_compacted_revision`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "store_compactions",
            "Compactions of the store's history this replica made",
            self.compactions.clone(),
        );
        registry.register(
            "store_compacted_revision",
            "Revision the store's history was last compacted to, by any replica, as this one \
             knows it (0 before the first)",
            self.revision.clone(),
        );
    }
}

/// One replica's view of the compaction turns.
#[derive(Debug, Default)]
pub struct Compactor {
    /// `mod_revision` of [`COMPACTION_KEY`] as this replica last saw it (0: absent).
    seen: i64,
    /// The store revision at the previous tick: what the next tick compacts to.
    previous: Option<i64>,
}

/// What one tick did.
#[derive(Debug, PartialEq, Eq)]
pub enum Tick {
    /// This replica compacted the history up to this revision.
    Compacted(i64),
    /// Another replica compacted during this interval, or this is the first tick.
    Skipped,
}

impl Compactor {
    /// One tick: proposes to compact to the revision of the previous tick, guarded on the
    /// compaction key not having moved since this replica last saw it.
    pub async fn tick(
        &mut self,
        store: &dyn Store,
        metrics: &CompactionMetrics,
    ) -> Result<Tick, StoreError> {
        let current = store.revision().await?;
        let Some(target) = self.previous.replace(current) else {
            // The first tick only learns where the key stands.
            self.learn(store, metrics).await?;
            return Ok(Tick::Skipped);
        };
        let guard = match self.seen {
            0 => Compare::Absent(COMPACTION_KEY.to_owned()),
            seen => Compare::ModRevision(COMPACTION_KEY.to_owned(), seen),
        };
        let txn = Txn {
            compares: vec![guard],
            ops: vec![Op::Put {
                key: COMPACTION_KEY.to_owned(),
                value: target.to_string().into_bytes(),
            }],
        };
        match store.txn(txn).await? {
            TxnOutcome::Committed { revision } => {
                self.seen = revision;
                store.compact(target).await?;
                metrics.compactions.inc();
                metrics.revision.set(target);
                tracing::info!(revision = target, "store history compacted");
                Ok(Tick::Compacted(target))
            }
            TxnOutcome::Conflict => {
                self.learn(store, metrics).await?;
                Ok(Tick::Skipped)
            }
        }
    }

    /// Reads where the compaction key stands.
    async fn learn(
        &mut self,
        store: &dyn Store,
        metrics: &CompactionMetrics,
    ) -> Result<(), StoreError> {
        if let Some(kv) = store.get(COMPACTION_KEY).await? {
            self.seen = kv.mod_revision;
            if let Some(revision) = std::str::from_utf8(&kv.value)
                .ok()
                .and_then(|v| v.parse::<i64>().ok())
            {
                metrics.revision.set(revision);
            }
        }
        Ok(())
    }
}

/// Compacts `store` every `interval` until `shutdown` (see the module's documentation).
pub async fn run(
    store: Arc<dyn Store>,
    interval: Duration,
    metrics: CompactionMetrics,
    shutdown: CancellationToken,
) {
    let mut compactor = Compactor::default();
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        if let Err(e) = compactor.tick(store.as_ref(), &metrics).await {
            // The next tick tries again; its target is this tick's revision, if it was read.
            tracing::warn!(error = %e, "store compaction failed; trying again next interval");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EmbeddedStore;

    async fn write(store: &dyn Store, n: usize) -> i64 {
        let txn = Txn {
            compares: Vec::new(),
            ops: vec![Op::Put {
                key: format!("/pushwire/v1/test/{n}"),
                value: b"x".to_vec(),
            }],
        };
        match store.txn(txn).await.unwrap() {
            TxnOutcome::Committed { revision } => revision,
            TxnOutcome::Conflict => panic!("unguarded write conflicted"),
        }
    }

    #[tokio::test]
    async fn one_replica_compacts_per_interval_to_the_previous_ticks_revision() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
        let metrics = CompactionMetrics::default();
        let (mut a, mut b) = (Compactor::default(), Compactor::default());

        write(&store, 1).await;
        let first = store.revision().await.unwrap();
        assert_eq!(a.tick(&store, &metrics).await.unwrap(), Tick::Skipped);
        assert_eq!(b.tick(&store, &metrics).await.unwrap(), Tick::Skipped);

        // Interval 2: the first replica to tick compacts to what it saw at its last tick; the
        // other finds the key moved and leaves it.
        write(&store, 2).await;
        assert_eq!(
            a.tick(&store, &metrics).await.unwrap(),
            Tick::Compacted(first)
        );
        assert_eq!(b.tick(&store, &metrics).await.unwrap(), Tick::Skipped);
        assert!(matches!(
            store.watch("/pushwire/v1/", first).await.err(),
            Some(StoreError::Compacted { .. })
        ));

        // Interval 3: either may win, once.
        write(&store, 3).await;
        let won = [
            b.tick(&store, &metrics).await.unwrap(),
            a.tick(&store, &metrics).await.unwrap(),
        ];
        let compacted: Vec<_> = won.iter().filter(|t| **t != Tick::Skipped).collect();
        assert_eq!(compacted.len(), 1, "{won:?}");
        assert_eq!(metrics.compactions.get(), 2);
        assert!(metrics.revision.get() > first);
    }
}
