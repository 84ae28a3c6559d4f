//! One integration's concurrency limit with two priorities: a free slot goes to a waiting
//! first attempt before any waiting retry, so a backlog of retries never delays fresh
//! participations. Waiters are tasks that already hold a participation, so the queues are
//! bounded by the ingest windows. The lane also keeps a moving average of how long a slot is
//! held, so a caller can tell at once whether a wait would be long ([`Lane::expected_wait`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

/// Weight of the newest hold time in the moving average.
const HOLD_WEIGHT: f64 = 0.1;

/// Whether an attempt is a participation's first or a retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// First attempt: served first.
    First,
    /// A retry.
    Retry,
}

#[derive(Debug)]
struct State {
    limit: usize,
    available: usize,
    in_flight: usize,
    /// Moving average of how long a slot is held, in seconds (0 before the first release).
    mean_hold: f64,
    first: VecDeque<oneshot::Sender<()>>,
    retry: VecDeque<oneshot::Sender<()>>,
}

/// A concurrency limit with priorities.
#[derive(Debug)]
pub struct Lane {
    state: Mutex<State>,
}

/// A slot of a [`Lane`], given back on drop.
#[derive(Debug)]
pub struct LanePermit {
    lane: Arc<Lane>,
    since: Instant,
}

impl Lane {
    /// A lane with `limit` slots (at least one).
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                limit: limit.max(1),
                available: limit.max(1),
                in_flight: 0,
                mean_hold: 0.0,
                first: VecDeque::new(),
                retry: VecDeque::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Attempts running now.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// Attempts waiting for a slot.
    pub fn queued(&self) -> usize {
        let s = self.lock();
        s.first.len() + s.retry.len()
    }

    /// How long a new waiter of `priority` would likely wait for a slot: the waiters ahead of
    /// it (and itself) served `limit` at a time, each holding its slot for the average hold
    /// time so far. Zero before any slot was given back.
    pub fn expected_wait(&self, priority: Priority) -> Duration {
        let s = self.lock();
        let ahead = match priority {
            Priority::First => s.first.len(),
            Priority::Retry => s.first.len() + s.retry.len(),
        };
        let rounds = (ahead + 1) as f64 / s.limit as f64;
        Duration::try_from_secs_f64(rounds * s.mean_hold).unwrap_or(Duration::MAX)
    }

    fn permit(self: &Arc<Self>) -> LanePermit {
        LanePermit {
            lane: self.clone(),
            since: Instant::now(),
        }
    }

    /// A slot if one is free now (nobody waits for one).
    pub fn try_acquire(self: &Arc<Self>) -> Option<LanePermit> {
        let mut s = self.lock();
        if s.available > 0 {
            s.available -= 1;
            s.in_flight += 1;
            drop(s);
            return Some(self.permit());
        }
        None
    }

    /// Waits for a slot.
    pub async fn acquire(self: &Arc<Self>, priority: Priority) -> LanePermit {
        let rx = {
            let mut s = self.lock();
            if s.available > 0 {
                s.available -= 1;
                s.in_flight += 1;
                drop(s);
                return self.permit();
            }
            let (tx, rx) = oneshot::channel();
            match priority {
                Priority::First => s.first.push_back(tx),
                Priority::Retry => s.retry.push_back(tx),
            }
            rx
        };
        let mut waiter = Waiter {
            lane: self.clone(),
            rx: Some(rx),
        };
        let granted = waiter.rx.as_mut().expect("set above").await;
        waiter.rx = None;
        match granted {
            Ok(()) => self.permit(),
            // The lane never drops a sender without sending; keep the type honest anyway.
            Err(_) => Box::pin(self.acquire(priority)).await,
        }
    }

    /// Hands the slot of a finished attempt (held for `held`, if it was used) to the next
    /// waiter, first attempts first.
    fn release(&self, held: Option<Duration>) {
        let mut s = self.lock();
        s.in_flight -= 1;
        if let Some(held) = held {
            let held = held.as_secs_f64();
            s.mean_hold = if s.mean_hold == 0.0 {
                held
            } else {
                s.mean_hold + HOLD_WEIGHT * (held - s.mean_hold)
            };
        }
        loop {
            let next = match s.first.pop_front() {
                Some(tx) => Some(tx),
                None => s.retry.pop_front(),
            };
            match next {
                Some(tx) => {
                    if tx.send(()).is_ok() {
                        s.in_flight += 1;
                        return;
                    }
                    // That waiter gave up; try the next one.
                }
                None => {
                    s.available += 1;
                    return;
                }
            }
        }
    }
}

impl Drop for LanePermit {
    fn drop(&mut self) {
        self.lane.release(Some(self.since.elapsed()));
    }
}

/// A queued acquire; if it is cancelled after a slot was granted, the slot is handed on.
struct Waiter {
    lane: Arc<Lane>,
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take()
            && rx.try_recv().is_ok()
        {
            // Granted but never used: not a hold time to learn from.
            self.lane.release(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn first_attempts_go_before_retries() {
        let lane = Lane::new(1);
        let held = lane.acquire(Priority::First).await;
        let (order_tx, mut order_rx) = tokio::sync::mpsc::channel(4);
        let mut tasks = Vec::new();
        for (name, p) in [
            ("retry-1", Priority::Retry),
            ("first-1", Priority::First),
            ("retry-2", Priority::Retry),
            ("first-2", Priority::First),
        ] {
            let task_lane = lane.clone();
            let order_tx = order_tx.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = task_lane.acquire(p).await;
                order_tx.send(name).await.unwrap();
            }));
            // Let the task queue itself before the next one, so arrival order is fixed.
            while lane.queued() < tasks.len() {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        let mut order = Vec::new();
        for _ in 0..4 {
            order.push(
                tokio::time::timeout(Duration::from_secs(5), order_rx.recv())
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        assert_eq!(order, ["first-1", "first-2", "retry-1", "retry-2"]);
        assert_eq!((lane.in_flight(), lane.queued()), (0, 0));
    }

    #[tokio::test]
    async fn limit_holds_and_cancelled_waiters_lose_nothing() {
        let lane = Lane::new(2);
        let a = lane.acquire(Priority::First).await;
        let _b = lane.acquire(Priority::First).await;
        assert_eq!(lane.in_flight(), 2);
        let waiting = tokio::spawn({
            let lane = lane.clone();
            async move { lane.acquire(Priority::Retry).await }
        });
        while lane.queued() < 1 {
            tokio::task::yield_now().await;
        }
        waiting.abort();
        let _ = waiting.await;
        drop(a);
        // The slot freed by `a` must be usable again even though its waiter is gone.
        let c = tokio::time::timeout(Duration::from_secs(5), lane.acquire(Priority::First))
            .await
            .unwrap();
        assert_eq!(lane.in_flight(), 2);
        drop(c);
        assert_eq!(lane.in_flight(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn expected_wait_follows_hold_times_and_waiters() {
        let lane = Lane::new(2);
        assert_eq!(lane.expected_wait(Priority::First), Duration::ZERO);
        let (a, b) = (lane.acquire(Priority::First).await, lane.try_acquire());
        tokio::time::advance(Duration::from_millis(100)).await;
        drop((a, b));
        // Nobody waits: half a round of 100 ms.
        assert_eq!(
            lane.expected_wait(Priority::First),
            Duration::from_millis(50)
        );
        let _held = (lane.try_acquire().unwrap(), lane.try_acquire().unwrap());
        let mut waiters = Vec::new();
        for p in [Priority::Retry, Priority::First, Priority::First] {
            let task_lane = lane.clone();
            waiters.push(tokio::spawn(
                async move { drop(task_lane.acquire(p).await) },
            ));
            while lane.queued() < waiters.len() {
                tokio::task::yield_now().await;
            }
        }
        // A first attempt waits behind the 2 first attempts only; a retry behind all 3.
        assert_eq!(
            lane.expected_wait(Priority::First),
            Duration::from_millis(150)
        );
        assert_eq!(
            lane.expected_wait(Priority::Retry),
            Duration::from_millis(200)
        );
        for w in waiters {
            w.abort();
        }
    }
}
