//! When this worker's own hand-offs and rescheduled retries fall due, so the claimer
//! ([`super::retries`]) wakes for them instead of waiting out its poll interval: a delivery
//! handed off here is claimed within milliseconds of its due time (by this worker, or by
//! another that polls first), and the poll interval only bounds how late another worker's
//! deliveries are noticed when theirs has gone.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

/// Due times are kept to this resolution (rounded up: never a wake before the due time).
const RESOLUTION_MS: u64 = 10;
/// Most due times kept; past it the latest are dropped (the poll interval still finds them).
const MAX_TIMES: usize = 4096;
/// Shortest wait: a stream of hand-offs due at different times (say, for an endpoint whose
/// breaker is open, so nothing is claimed) wakes the claimer 20 times a second at most.
const MIN_WAIT: Duration = Duration::from_millis(50);

/// The due times of this worker's queued deliveries, earliest first; bounded.
#[derive(Debug, Default)]
pub struct DueTimes {
    /// Due times in units of [`RESOLUTION_MS`] since the epoch.
    times: Mutex<BTreeSet<u64>>,
    earlier: Notify,
}

fn slot(at: SystemTime) -> u64 {
    let ms = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    ms.div_ceil(RESOLUTION_MS)
}

fn time_of(slot: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(slot.saturating_mul(RESOLUTION_MS))
}

impl DueTimes {
    /// Notes a delivery due at `at`; wakes the claimer if that is earlier than any it knew.
    pub fn note(&self, at: SystemTime) {
        let at = slot(at);
        let mut times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        if times.len() >= MAX_TIMES {
            match times.last().copied() {
                Some(last) if last > at => {
                    times.remove(&last);
                }
                _ => return,
            }
        }
        let earliest = times.first().is_none_or(|first| at < *first);
        times.insert(at);
        drop(times);
        if earliest {
            self.earlier.notify_one();
        }
    }

    /// Forgets the due times up to `now` (a claim at `now` takes what they stood for).
    pub fn forget_through(&self, now: SystemTime) {
        let now = slot(now);
        let mut times = self.times.lock().unwrap_or_else(|e| e.into_inner());
        let later = times.split_off(&(now + 1));
        *times = later;
    }

    /// Waits `poll` at most, less if a noted delivery falls due earlier (also one noted
    /// meanwhile), but not less than 50 ms.
    pub async fn wait(&self, poll: Duration) {
        let start = tokio::time::Instant::now();
        let (deadline, floor) = (start + poll, start + MIN_WAIT.min(poll));
        loop {
            let earlier = self.earlier.notified();
            let first = self
                .times
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .first()
                .copied();
            let until = first.map_or(deadline, |first| {
                let after = time_of(first)
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                deadline.min(tokio::time::Instant::now() + after).max(floor)
            });
            tokio::select! {
                () = tokio::time::sleep_until(until) => return,
                () = earlier => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_earliest_within_its_bound_and_forgets_what_is_due() {
        let due = DueTimes::default();
        let base = UNIX_EPOCH + Duration::from_secs(1_000_000);
        for n in 0..(MAX_TIMES as u64 + 10) {
            due.note(base + Duration::from_millis(100 * (n + 1)));
        }
        // The latest ten were dropped; an earlier one still gets in, pushing out the latest.
        due.note(base + Duration::from_millis(5));
        let times = due.times.lock().unwrap().clone();
        assert_eq!(times.len(), MAX_TIMES);
        assert_eq!(times.first().copied(), Some(slot(base) + 1));
        assert_eq!(
            times.last().copied(),
            Some(slot(
                base + Duration::from_millis(100 * (MAX_TIMES as u64 - 1))
            ))
        );
        due.forget_through(base + Duration::from_millis(250));
        assert_eq!(
            due.times.lock().unwrap().first().copied(),
            Some(slot(base + Duration::from_millis(300)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_at_the_poll_interval_or_when_something_falls_due() {
        let due = DueTimes::default();
        let started = tokio::time::Instant::now();
        due.wait(Duration::from_secs(1)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        // Something due now (in the wall clock the times are kept in): the shortest wait.
        due.note(SystemTime::now());
        let started = tokio::time::Instant::now();
        due.wait(Duration::from_secs(1)).await;
        assert_eq!(started.elapsed(), MIN_WAIT);
    }
}
