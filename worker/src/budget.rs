//! The worker's memory budget (`--memory-budget`): one limit on the bytes of participation
//! documents held, shared by every Publish stream and every `PublishOne` call. A participation
//! holds a [`Charge`] (its document's size plus [`PARTICIPATION_OVERHEAD`]) from the moment it
//! is read until its acknowledgement is sent; the charge is given back when dropped.
//! Owns the accounting and its metrics only; what waiting means for a caller is `ingest`'s.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

/// Memory a participation holds besides its document, in bytes: the decoded request, the
/// parsed fields kept (id, state, campaign), the plan, one job per delivery, spans and task.
/// Estimated from issue 14's measurement (a waiting participation with a 2 KiB document held
/// about 9 KiB); generous rather than exact, it keeps many tiny documents from looking free.
pub const PARTICIPATION_OVERHEAD: usize = 8 * 1024;

/// Default `--memory-budget`: about half of a 512 MiB pod, leaving the rest to the process
/// itself, HTTP/2 buffers of open streams and documents being parsed.
pub const DEFAULT_BUDGET: ByteSize = ByteSize(256 << 20);

/// The accounting unit: permits are KiB, so a `u32` count covers 4 TiB.
const UNIT: u64 = 1024;

/// A size in bytes as flags take it: an integer with an optional unit, `B`, `KiB`, `MiB`,
/// `GiB` (powers of 1024) or `KB`, `MB`, `GB` (powers of 1000), e.g. `256MiB`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("{s:?} is not a size (e.g. 256MiB)"))?;
        let factor: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => {
                return Err(format!(
                    "unknown unit {other:?} in {s:?} (B, KiB, MiB, GiB, KB, MB, GB)"
                ));
            }
        };
        n.checked_mul(factor)
            .map(Self)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        match b {
            0 => write!(f, "0B"),
            _ if b.is_multiple_of(1 << 30) => write!(f, "{}GiB", b >> 30),
            _ if b.is_multiple_of(1 << 20) => write!(f, "{}MiB", b >> 20),
            _ if b.is_multiple_of(1 << 10) => write!(f, "{}KiB", b >> 10),
            _ => write!(f, "{b}B"),
        }
    }
}

/// The worker-wide budget; cheap to clone (clones share it).
#[derive(Clone)]
pub struct MemoryBudget {
    permits: Arc<Semaphore>,
    /// Permits in all ([`UNIT`]s).
    total: u32,
    held: Gauge,
    wait: Histogram,
}

impl fmt::Debug for MemoryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBudget")
            .field("total_kib", &self.total)
            .field("available_kib", &self.permits.available_permits())
            .finish()
    }
}

/// Memory held on the budget by one participation; given back on drop.
#[derive(Debug)]
pub struct Charge {
    _permit: OwnedSemaphorePermit,
    bytes: i64,
    held: Gauge,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.held.dec_by(self.bytes);
    }
}

impl MemoryBudget {
    /// A budget of `bytes` (rounded down to whole KiB, at least one), reporting on `metrics`:
    /// the budget and the bytes held as gauges, and every wait for room.
    pub fn new(bytes: u64, metrics: &Metrics) -> Self {
        let total = u32::try_from(bytes / UNIT).unwrap_or(u32::MAX).max(1);
        metrics
            .memory_budget
            .set(i64::try_from(u64::from(total) * UNIT).unwrap_or(i64::MAX));
        Self {
            permits: Arc::new(Semaphore::new(total as usize)),
            total,
            held: metrics.memory_held.clone(),
            wait: metrics.memory_budget_wait.clone(),
        }
    }

    /// The share of a participation whose document is `document_len` bytes, in bytes.
    pub fn share(document_len: usize) -> u64 {
        (document_len as u64).saturating_add(PARTICIPATION_OVERHEAD as u64)
    }

    /// Permits for `bytes`: rounded up to whole KiB, and at most the whole budget, so a
    /// participation larger than the budget (which `--memory-budget` ≥
    /// `--max-participation-bytes` rules out) would hold all of it instead of waiting forever.
    fn permits_for(&self, bytes: u64) -> u32 {
        u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .clamp(1, self.total)
    }

    fn charge(&self, permit: OwnedSemaphorePermit) -> Charge {
        let bytes = i64::from(permit.num_permits() as u32) * UNIT as i64;
        self.held.inc_by(bytes);
        Charge {
            _permit: permit,
            bytes,
            held: self.held.clone(),
        }
    }

    /// Takes `bytes` from the budget, waiting (first come, first served) until there is room.
    pub async fn acquire(&self, bytes: u64) -> Charge {
        let n = self.permits_for(bytes);
        if let Ok(p) = self.permits.clone().try_acquire_many_owned(n) {
            return self.charge(p);
        }
        let started = Instant::now();
        let p = self
            .permits
            .clone()
            .acquire_many_owned(n)
            .await
            .expect("the budget's semaphore is never closed");
        self.wait.observe(started.elapsed().as_secs_f64());
        self.charge(p)
    }

    /// Like [`MemoryBudget::acquire`], giving up after `limit`: `None` when there was no room.
    pub async fn acquire_within(&self, bytes: u64, limit: Duration) -> Option<Charge> {
        let n = self.permits_for(bytes);
        if let Ok(p) = self.permits.clone().try_acquire_many_owned(n) {
            return Some(self.charge(p));
        }
        let started = Instant::now();
        let p = tokio::time::timeout(limit, self.permits.clone().acquire_many_owned(n)).await;
        self.wait.observe(started.elapsed().as_secs_f64());
        match p {
            Ok(p) => Some(self.charge(p.expect("the budget's semaphore is never closed"))),
            Err(_) => None,
        }
    }

    /// Bytes free now.
    pub fn available(&self) -> u64 {
        self.permits.available_permits() as u64 * UNIT
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        u64::from(self.total - self.permits.available_permits() as u32) * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(bytes: u64) -> (MemoryBudget, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        (MemoryBudget::new(bytes, &metrics), metrics)
    }

    #[test]
    fn sizes_parse_and_print() {
        let ok = |s: &str| s.parse::<ByteSize>().unwrap().bytes();
        assert_eq!(ok("256MiB"), 256 << 20);
        assert_eq!(ok("1GiB"), 1 << 30);
        assert_eq!(ok("64KiB"), 64 << 10);
        assert_eq!(ok("1048576"), 1 << 20);
        assert_eq!(ok("100B"), 100);
        assert_eq!(ok("5MB"), 5_000_000);
        assert_eq!(ok(" 2 GiB "), 2 << 30);
        for bad in [
            "",
            "MiB",
            "12 parsecs",
            "-1MiB",
            "1.5GiB",
            "99999999999999GiB",
        ] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad:?}");
        }
        assert_eq!(DEFAULT_BUDGET.to_string(), "256MiB");
        assert_eq!(ByteSize(1536).to_string(), "1536B");
        assert_eq!(ByteSize(3 << 10).to_string(), "3KiB");
    }

    #[tokio::test]
    async fn charges_are_whole_kib_and_come_back_on_drop() {
        let (b, m) = budget(1 << 20);
        assert_eq!(m.memory_budget.get(), 1 << 20);
        let one = b.acquire(1).await;
        assert_eq!(m.memory_held.get(), 1024);
        let share = b.acquire(MemoryBudget::share(10_000)).await;
        // 10,000 + 8,192 bytes: 18 KiB.
        assert_eq!(m.memory_held.get(), 1024 + 18 * 1024);
        assert_eq!(b.held(), 19 * 1024);
        drop(one);
        drop(share);
        assert_eq!(m.memory_held.get(), 0);
        assert_eq!(b.held(), 0);
    }

    #[tokio::test]
    async fn a_full_budget_makes_callers_wait_in_order() {
        let (b, m) = budget(100 * 1024);
        let big = b.acquire(90 * 1024).await;
        // 20 KiB does not fit: it waits, and so does a smaller one behind it (first come,
        // first served, so a large document is not starved by small ones).
        let b2 = b.clone();
        let mut first = tokio::spawn(async move { b2.acquire(20 * 1024).await });
        tokio::task::yield_now().await;
        let b3 = b.clone();
        let mut second = tokio::spawn(async move { b3.acquire(1024).await });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!first.is_finished() && !second.is_finished());
        assert!(m.memory_held.get() <= 100 * 1024);
        drop(big);
        let first = (&mut first).await.unwrap();
        let second = (&mut second).await.unwrap();
        assert_eq!(m.memory_held.get(), 21 * 1024);
        drop((first, second));
        assert_eq!(m.memory_held.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_within_gives_up_after_its_limit() {
        let (b, m) = budget(64 * 1024);
        let all = b.acquire(64 * 1024).await;
        let refused = b.acquire_within(1024, Duration::from_secs(1)).await;
        assert!(refused.is_none());
        assert_eq!(m.memory_held.get(), 64 * 1024);
        let text = m.encode();
        assert!(
            text.contains("pushwire_worker_memory_budget_wait_seconds_count 1\n"),
            "one wait observed: {text}"
        );
        drop(all);
        assert!(
            b.acquire_within(1024, Duration::from_secs(1))
                .await
                .is_some()
        );
    }

    #[tokio::test]
    async fn a_share_larger_than_the_budget_takes_all_of_it_instead_of_waiting_forever() {
        let (b, m) = budget(4 * 1024);
        let huge = b.acquire(1 << 30).await;
        assert_eq!(m.memory_held.get(), 4 * 1024);
        drop(huge);
    }
}
