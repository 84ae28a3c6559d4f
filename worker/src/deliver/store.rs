//! The worker's side of the delivery store (DESIGN §3, §4, §6): [`StoreHandle`] times every
//! call, counts its errors and keeps the store's health for `/readyz` and the metrics;
//! [`Handoff`] batches hand-offs into one transaction per few milliseconds and answers each
//! caller once its row is committed, retrying with backoff while the store is down (nothing is
//! lost: the caller keeps its participation meanwhile, and its stream's window stays occupied),
//! and notes when each falls due for the claimer ([`DueTimes`]).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use pushwire_common::delivery_store::{DeliveryStore, NewDelivery, Outcome, StoreError};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::due::DueTimes;
use crate::metrics::{Metrics, OperationLabel};

/// Most deliveries written in one hand-off transaction.
pub const MAX_BATCH: usize = 256;
/// How long the writer gathers a batch after its first delivery.
const BATCH_WAIT: Duration = Duration::from_millis(2);
/// Hand-offs waiting for the writer (callers wait for room beyond it).
const QUEUE: usize = 4 * MAX_BATCH;
/// Most outcomes written in one delivery-log transaction.
const LOG_BATCH: usize = 1024;
/// Outcomes waiting for the log writer.
const LOG_QUEUE: usize = 4 * LOG_BATCH;
/// First and longest wait between tries while the store is down.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(5));
/// How often the queued-deliveries gauge is refreshed.
pub const COUNT_INTERVAL: Duration = Duration::from_secs(10);

/// The delivery store with its metrics and health; cheap to clone.
#[derive(Clone, Debug)]
pub struct StoreHandle {
    store: Arc<dyn DeliveryStore>,
    metrics: Arc<Metrics>,
    /// Why the last call failed, while the store is unreachable.
    down: Arc<Mutex<Option<String>>>,
}

impl StoreHandle {
    /// `store`, reporting into `metrics`.
    pub fn new(store: Arc<dyn DeliveryStore>, metrics: Arc<Metrics>) -> Self {
        metrics.store_up.set(1);
        Self {
            store,
            metrics,
            down: Arc::default(),
        }
    }

    /// The store itself.
    pub fn store(&self) -> &Arc<dyn DeliveryStore> {
        &self.store
    }

    /// Why the store is considered unreachable, if it is (the last call failed transiently).
    pub fn unreachable(&self) -> Option<String> {
        self.down.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs `call` (operation `op`), recording its latency, its error and the store's health.
    pub async fn call<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = call.await;
        let label = OperationLabel { operation: op };
        self.metrics
            .store_latency
            .get_or_create(&label)
            .observe(started.elapsed().as_secs_f64());
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(_) => {
                if down.take().is_some() {
                    tracing::info!("the delivery store answers again");
                }
                self.metrics.store_up.set(1);
            }
            Err(err) => {
                self.metrics.store_errors.get_or_create(&label).inc();
                if !matches!(
                    err,
                    StoreError::InvalidArgument(_) | StoreError::Corrupt(_) | StoreError::Url(_)
                ) {
                    if down.is_none() {
                        tracing::warn!(operation = op, error = %err, "the delivery store is unreachable");
                    }
                    *down = Some(err.to_string());
                    self.metrics.store_up.set(0);
                } else {
                    tracing::error!(operation = op, error = %err, "delivery store call failed");
                }
            }
        }
        result
    }

    /// Keeps [`Metrics::queued_deliveries`] up to date until `stop`.
    pub async fn count_queued(self, stop: CancellationToken) {
        loop {
            if let Ok(n) = self.call("count_queued", self.store.count_queued()).await {
                self.metrics
                    .queued_deliveries
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(COUNT_INTERVAL) => {}
            }
        }
    }
}

/// Why a hand-off did not commit.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The worker is stopping: the delivery is not stored, so its participation is not
    /// acknowledged (its publisher sends it again).
    #[error("the worker is stopping")]
    Interrupted,
    /// The store refused the write for good (not a passing outage).
    #[error("the delivery store refused the hand-off: {0}")]
    Refused(String),
}

struct Pending {
    delivery: NewDelivery,
    /// Whether the claimer should wake when it falls due.
    wake: bool,
    done: oneshot::Sender<Result<(), String>>,
}

/// Hands deliveries off to the store, batched; cheap to clone.
#[derive(Clone, Debug)]
pub struct Handoff {
    tx: mpsc::Sender<Pending>,
    stop: CancellationToken,
    due: Arc<DueTimes>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("key", &self.delivery.key)
            .finish_non_exhaustive()
    }
}

impl Handoff {
    /// A hand-off writer over `store`, and the task to run (it ends at `stop`).
    pub fn new(
        store: StoreHandle,
        stop: CancellationToken,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let due = Arc::new(DueTimes::default());
        let task = write(store, rx, Arc::clone(&due), stop.clone());
        (Self { tx, stop, due }, task)
    }

    /// When the deliveries this worker queued fall due (hand-offs, and retries rescheduled
    /// through [`DueTimes::note`]).
    pub fn due_times(&self) -> &Arc<DueTimes> {
        &self.due
    }

    /// Writes `delivery` (queued, with its body) and returns once it is committed; waits and
    /// retries while the store is down. With `wake`, the claimer looks for it when it falls due
    /// (not worth it for an integration whose breaker is open: its deliveries are left out of
    /// claims until the breaker lets an attempt through, and the poll interval finds them).
    pub async fn hand_off(&self, delivery: NewDelivery, wake: bool) -> Result<(), HandoffError> {
        let (done, committed) = oneshot::channel();
        tokio::select! {
            biased;
            () = self.stop.cancelled() => return Err(HandoffError::Interrupted),
            sent = self.tx.send(Pending { delivery, wake, done }) => {
                sent.map_err(|_| HandoffError::Interrupted)?;
            }
        }
        match committed.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(HandoffError::Refused(why)),
            Err(_) => Err(HandoffError::Interrupted),
        }
    }
}

/// The writer: one transaction per batch (up to [`MAX_BATCH`] rows gathered for
/// [`BATCH_WAIT`]), each caller answered after the commit.
async fn write(
    store: StoreHandle,
    mut rx: mpsc::Receiver<Pending>,
    due: Arc<DueTimes>,
    stop: CancellationToken,
) {
    while let Some(batch) = next_batch(&mut rx, MAX_BATCH, &stop).await {
        let wake: Vec<bool> = batch.iter().map(|p| p.wake).collect();
        let (rows, waiters): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|p| (p.delivery, p.done)).unzip();
        let (store, rows_ref) = (&store, &rows);
        let Some(result) = until_written(&stop, move || {
            store.call(
                "hand_off",
                store.store.hand_off(rows_ref, SystemTime::now()),
            )
        })
        .await
        else {
            return;
        };
        if result.is_ok() {
            for (row, wake) in rows.iter().zip(wake) {
                if let (Outcome::Queued { next_attempt }, true) = (&row.outcome, wake) {
                    due.note(*next_attempt);
                }
            }
        }
        for done in waiters {
            let _ = done.send(result.clone());
        }
    }
}

/// The next batch of a writer: waits for a first item, then takes what arrives within
/// [`BATCH_WAIT`], up to `max`; `None` at `stop` or once every sender is gone.
async fn next_batch<T>(
    rx: &mut mpsc::Receiver<T>,
    max: usize,
    stop: &CancellationToken,
) -> Option<Vec<T>> {
    let first = tokio::select! {
        biased;
        () = stop.cancelled() => return None,
        next = rx.recv() => next?,
    };
    let mut batch = vec![first];
    let gather_until = tokio::time::Instant::now() + BATCH_WAIT;
    while batch.len() < max {
        match tokio::time::timeout_at(gather_until, rx.recv()).await {
            Ok(Some(item)) => batch.push(item),
            _ => break,
        }
    }
    Some(batch)
}

/// Runs `write` until it commits (`Ok`) or the store refuses it for good (`Err`, why); while
/// the store is unreachable, restarting or failing for a reason an operator must fix, tries
/// again with a growing backoff (readiness says why meanwhile). `None` at `stop`.
async fn until_written<F, Fut>(stop: &CancellationToken, mut write: F) -> Option<Result<(), String>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), StoreError>>,
{
    let mut backoff = BACKOFF.0;
    loop {
        match write().await {
            Ok(()) => return Some(Ok(())),
            Err(err @ (StoreError::InvalidArgument(_) | StoreError::Corrupt(_))) => {
                return Some(Err(err.to_string()));
            }
            Err(_) => {
                tokio::select! {
                    () = stop.cancelled() => return None,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF.1);
            }
        }
    }
}

/// The delivery log of the live path (issue 15): final outcomes of first attempts, with their
/// attempts and body, written in batches by a writer the acknowledgement does not wait for.
/// Its channel is bounded: when the store falls behind (or is down), recording waits for room,
/// so the window pushes back on the publisher; nothing is dropped while the worker runs.
#[derive(Clone, Debug)]
pub struct OutcomeLog {
    tx: mpsc::Sender<NewDelivery>,
    stop: CancellationToken,
}

impl OutcomeLog {
    /// A log writer over `store`, and the task to run (it ends at `stop`; what it holds then
    /// is not written).
    pub fn new(
        store: StoreHandle,
        stop: CancellationToken,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (tx, rx) = mpsc::channel(LOG_QUEUE);
        let task = log_outcomes(store, rx, stop.clone());
        (Self { tx, stop }, task)
    }

    /// Queues `delivery` (a final outcome) for the log; waits only for room in the queue.
    pub async fn record(&self, delivery: NewDelivery) {
        tokio::select! {
            biased;
            () = self.stop.cancelled() => {}
            _ = self.tx.send(delivery) => {}
        }
    }
}

/// The log writer: one transaction per batch, retried with backoff while the store fails (a
/// batch the store refuses for good is dropped: it is logged by the store handle).
async fn log_outcomes(
    store: StoreHandle,
    mut rx: mpsc::Receiver<NewDelivery>,
    stop: CancellationToken,
) {
    while let Some(batch) = next_batch(&mut rx, LOG_BATCH, &stop).await {
        let (store, batch) = (&store, &batch);
        let written = until_written(&stop, move || {
            store.call(
                "record_outcomes",
                store.store.record_outcomes(batch, SystemTime::now()),
            )
        })
        .await;
        if written.is_none() {
            return;
        }
    }
}
