//! Exponential backoff with full jitter for reconnect loops (config watch, store watch): the
//! delay grows from `initial` to `max`, each wait is uniformly random below it so replicas that
//! lost the same server do not come back in lockstep.

use std::time::Duration;

/// Reconnect delays.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Delays from `initial` doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            current: initial,
        }
    }

    /// The next delay: random in `[current/2, current]`, then doubles `current`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = ceiling / 2;
        half + half.mul_f64(rand_unit())
    }

    /// Back to `initial`, after a success.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// A number in [0, 1) from the standard library's randomly keyed hasher: jitter needs no
/// cryptographic quality and this keeps `rand` out of `common`.
fn rand_unit() -> f64 {
    use std::hash::{BuildHasher, RandomState};
    let bits = RandomState::new().hash_one(std::time::Instant::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_max_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(
            delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100),
            "{delays:?}"
        );
        for d in &delays[4..] {
            assert!(
                *d >= Duration::from_millis(500) && *d <= Duration::from_secs(1),
                "{delays:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
