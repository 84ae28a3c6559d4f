//! Retries from the delivery store (DESIGN §4): a claimer loop per worker claims due
//! deliveries with a lease (fairly across integrations, none whose circuit breaker is open, at
//! most the free retry capacity) and runs each through the same lanes as first attempts, which
//! go first ([`Dispatcher::retry`]). At shutdown it stops claiming, lets the attempts in flight
//! finish within the grace period, and leaves the rest to their leases.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pushwire_common::delivery_store::ClaimRequest;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::budget::MemoryBudget;
use crate::metrics::Metrics;

use super::dispatch::Dispatcher;
use super::store::StoreHandle;

/// Settings of the claimer.
#[derive(Clone, Debug)]
pub struct RetryOptions {
    /// This worker's id, recorded on its leases.
    pub worker_id: String,
    /// How long a claim is exclusive; a killed worker's claims come back after it.
    pub lease: Duration,
    /// Pause between claims when nothing was due, unless something this worker queued falls
    /// due earlier ([`super::due::DueTimes`]): how late another worker's deliveries are
    /// noticed when that worker is gone.
    pub poll: Duration,
    /// Retries in flight at most (claimed and not finished).
    pub capacity: usize,
}

/// The memory budget retries take their bodies' share of, as participations do.
#[derive(Clone, Debug)]
pub struct RetryBudget {
    /// The worker-wide budget.
    pub budget: MemoryBudget,
    /// The share of the largest participation accepted: a claim takes no more deliveries than
    /// the budget has room for at that size, so bodies read from the store are never held
    /// beyond it.
    pub largest: u64,
}

/// Default [`RetryOptions::lease`].
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);
/// Default [`RetryOptions::poll`].
pub const DEFAULT_POLL: Duration = Duration::from_secs(1);
/// Default [`RetryOptions::capacity`].
pub const DEFAULT_CAPACITY: usize = 512;
/// Longest pause between claims while the store is down.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A worker id for leases: the host name and the process id, unique among live workers.
pub fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "worker".to_owned());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Claims and retries due deliveries until `stop` (no new claims), then waits for the retries
/// in flight; those still running at `interrupt` are cut short by the dispatcher. With a
/// `budget`, each retry holds its body's share of it.
pub async fn run(
    dispatcher: Dispatcher,
    store: StoreHandle,
    metrics: Arc<Metrics>,
    opts: RetryOptions,
    budget: Option<RetryBudget>,
    stop: CancellationToken,
) {
    let capacity = opts.capacity.max(1);
    let slots = Arc::new(Semaphore::new(capacity));
    let mut tasks = JoinSet::new();
    let mut backoff = opts.poll;
    let concurrency = u32::try_from(dispatcher.options().concurrency).unwrap_or(u32::MAX);
    let due = dispatcher.due_times();
    loop {
        while tasks.try_join_next().is_some() {}
        // Wait for room: at least one free slot.
        let first = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            permit = slots.clone().acquire_owned() => permit.expect("never closed"),
        };
        let mut free = slots.available_permits() + 1;
        if let Some(b) = &budget {
            let room = usize::try_from(b.budget.available() / b.largest.max(1)).unwrap_or(0);
            if room == 0 {
                // The budget is spent (the streams hold it): claim again when the poll ends.
                drop(first);
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(opts.poll) => {}
                }
                continue;
            }
            free = free.min(room);
        }
        let request = ClaimRequest {
            worker: opts.worker_id.clone(),
            lease: opts.lease,
            now: SystemTime::now(),
            limit: u32::try_from(free).unwrap_or(u32::MAX),
            max_per_integration: concurrency,
            exclude: dispatcher.open_breakers(),
        };
        due.forget_through(request.now);
        let claimed = store
            .call("claim_due", store.store().claim_due(&request))
            .await;
        let pause = match claimed {
            Ok(claimed) if claimed.is_empty() => {
                backoff = opts.poll;
                // Until the poll interval, or earlier when something this worker queued falls
                // due.
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = due.wait(opts.poll) => {}
                }
                None
            }
            Ok(claimed) => {
                backoff = opts.poll;
                let mut permit = Some(first);
                metrics.claims.inc_by(claimed.len() as u64);
                for delivery in claimed {
                    if delivery.lease_expired {
                        metrics.lease_expiries.inc();
                    }
                    let Some(slot) = permit
                        .take()
                        .or_else(|| slots.clone().try_acquire_owned().ok())
                    else {
                        // Cannot happen (claimed at most the free slots); the lease returns it.
                        break;
                    };
                    let dispatcher = dispatcher.clone();
                    let store = store.clone();
                    let lease = opts.lease;
                    let budget = budget.clone();
                    tasks.spawn(async move {
                        let size = delivery.body.as_ref().map_or(0, bytes::Bytes::len);
                        let charge = match budget {
                            Some(b) => Some(b.budget.acquire(MemoryBudget::share(size)).await),
                            None => None,
                        };
                        dispatcher.retry(delivery, &store, lease).await;
                        drop((charge, slot));
                    });
                }
                None
            }
            Err(_) => {
                let pause = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF.max(opts.poll));
                Some(pause)
            }
        };
        if let Some(pause) = pause {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
    // Attempts in flight end by themselves, or at the dispatcher's interrupt.
    while tasks.join_next().await.is_some() {}
}
