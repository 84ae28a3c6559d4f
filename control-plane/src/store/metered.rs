//! A [`Store`] decorator recording the latency and errors of every call, by operation.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::{KeyValue, Pages, Range, Store, StoreError, Txn, TxnOutcome, WatchStream};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

/// The metrics of a [`Metered`] store; cheap to clone.
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    latency: Family<OpLabel, Histogram>,
    errors: Family<OpLabel, Counter>,
    /// The compactor's.
    pub compaction: super::compaction::CompactionMetrics,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        Self {
            latency: Family::new_with_constructor(|| {
                Histogram::new([
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    1.0,
                ])
            }),
            errors: Family::default(),
            compaction: Default::default(),
        }
    }
}

impl StoreMetrics {
    /// Registers `store_call_duration_seconds`, `store_errors_total` and the compactor's.
    pub fn register(&self, registry: &mut Registry) {
        self.compaction.register(registry);
        registry.register_with_unit(
            "store_call_duration",
            "Configuration store calls by operation (watch: until the stream is open)",
            Unit::Seconds,
            self.latency.clone(),
        );
        registry.register(
            "store_errors",
            "Configuration store calls that failed, by operation",
            self.errors.clone(),
        );
    }

    fn observe<T>(&self, op: &'static str, started: Instant, r: &Result<T, StoreError>) {
        self.latency
            .get_or_create(&OpLabel { op })
            .observe(started.elapsed().as_secs_f64());
        if r.is_err() {
            self.errors.get_or_create(&OpLabel { op }).inc();
        }
    }
}

/// `inner`, with every call measured.
#[derive(Debug)]
pub struct Metered {
    inner: Arc<dyn Store>,
    metrics: StoreMetrics,
}

impl Metered {
    /// Measures `inner` into `metrics`.
    pub fn new(inner: Arc<dyn Store>, metrics: StoreMetrics) -> Self {
        Self { inner, metrics }
    }
}

macro_rules! measured {
    ($self:ident, $op:literal, $call:expr) => {{
        let started = Instant::now();
        let r = $call.await;
        $self.metrics.observe($op, started, &r);
        r
    }};
}

#[async_trait]
impl Store for Metered {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        measured!(self, "get", self.inner.get(key))
    }

    async fn range(&self, prefix: &str) -> Result<Range, StoreError> {
        measured!(self, "range", self.inner.range(prefix))
    }

    /// Not measured: its time is mostly the caller's, handling one page while the next is
    /// read.
    fn range_pages<'a>(&'a self, prefix: &'a str) -> Pages<'a> {
        self.inner.range_pages(prefix)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        measured!(self, "txn", self.inner.txn(txn))
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream, StoreError> {
        measured!(self, "watch", self.inner.watch(prefix, from_revision))
    }

    async fn compact(&self, revision: i64) -> Result<(), StoreError> {
        measured!(self, "compact", self.inner.compact(revision))
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        measured!(self, "revision", self.inner.revision())
    }

    async fn recovered(&self) {
        self.inner.recovered().await;
    }
}
