//! The circuit breaker of one integration (DESIGN §4) as a pure state machine: closed until N
//! consecutive failures, then open for a cool-down (doubling while probes keep failing), then
//! half-open with exactly one probe at a time. Time is passed in (`Instant`), so it is tested
//! without clocks; it holds no lock, task or timer — the dispatcher owns those, and it alone
//! decides what counts as a failure.

use std::time::{Duration, Instant};

/// Consecutive failures that open the breaker by default.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 10;
/// First cool-down by default.
pub const DEFAULT_COOL_DOWN: Duration = Duration::from_secs(30);
/// Longest cool-down by default.
pub const DEFAULT_MAX_COOL_DOWN: Duration = Duration::from_secs(5 * 60);
/// How long a probe may stay unanswered by default: longer than a whole webhook request (15 s)
/// so a live probe never times out, short enough that a lost one costs little.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long callers refused during a probe wait by default before asking again.
pub const DEFAULT_PROBE_RECHECK: Duration = Duration::from_secs(1);

/// Settings of a [`Breaker`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerOptions {
    /// Consecutive failures that open the breaker (at least 1).
    pub failure_threshold: u32,
    /// Cool-down after opening; doubled each time a probe fails.
    pub cool_down: Duration,
    /// Upper bound of the doubled cool-down.
    pub max_cool_down: Duration,
    /// A probe that has not reported after this long is considered lost (its task was dropped
    /// or cancelled) and the next caller becomes the probe, so the breaker cannot wedge.
    pub probe_timeout: Duration,
    /// While a probe is in flight, refused callers are told to come back after at most this
    /// long (the probe usually answers well before its timeout).
    pub probe_recheck: Duration,
}

impl Default for BreakerOptions {
    fn default() -> Self {
        Self {
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            cool_down: DEFAULT_COOL_DOWN,
            max_cool_down: DEFAULT_MAX_COOL_DOWN,
            probe_timeout: DEFAULT_PROBE_TIMEOUT,
            probe_recheck: DEFAULT_PROBE_RECHECK,
        }
    }
}

/// The answer of [`Breaker::admit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Closed: send.
    Allowed,
    /// Half-open: send, as the single probe; report its outcome (or
    /// [`Breaker::on_probe_abandoned`]).
    Probe,
    /// Do not send; ask again at `retry_at`.
    Rejected {
        /// When asking again may succeed.
        retry_at: Instant,
    },
}

/// The breaker's state, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests flow.
    Closed,
    /// Requests are refused until the cool-down ends.
    Open,
    /// One probe decides whether to close again.
    HalfOpen,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// `probe_since`: when the probe in flight was admitted; `None` when the slot is free.
    HalfOpen {
        probe_since: Option<Instant>,
    },
}

/// The circuit breaker of one integration.
#[derive(Clone, Debug)]
pub struct Breaker {
    opts: BreakerOptions,
    state: State,
    /// Cool-down of the current (or next) opening.
    cool_down: Duration,
}

impl Breaker {
    /// A closed breaker opening after `failure_threshold` consecutive failures, with the other
    /// settings at their defaults.
    pub fn new(failure_threshold: u32) -> Self {
        Self::with_options(BreakerOptions {
            failure_threshold,
            ..BreakerOptions::default()
        })
    }

    /// A closed breaker with these settings.
    pub fn with_options(opts: BreakerOptions) -> Self {
        let cool_down = opts.cool_down;
        Self {
            opts,
            state: State::Closed { failures: 0 },
            cool_down,
        }
    }

    /// Whether a request may be sent at `now`. An open breaker whose cool-down has ended turns
    /// half-open here and hands out the probe slot.
    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.state {
            State::Closed { .. } => Admission::Allowed,
            State::Open { until } if now < until => Admission::Rejected { retry_at: until },
            State::Open { .. } | State::HalfOpen { probe_since: None } => self.start_probe(now),
            State::HalfOpen {
                probe_since: Some(since),
            } => {
                let lost_at = since.checked_add(self.opts.probe_timeout).unwrap_or(since);
                if now >= lost_at {
                    tracing::debug!("circuit breaker probe lost (no report); starting another");
                    self.start_probe(now)
                } else {
                    let recheck = now.checked_add(self.opts.probe_recheck).unwrap_or(lost_at);
                    Admission::Rejected {
                        retry_at: recheck.min(lost_at),
                    }
                }
            }
        }
    }

    fn start_probe(&mut self, now: Instant) -> Admission {
        self.state = State::HalfOpen {
            probe_since: Some(now),
        };
        Admission::Probe
    }

    /// A request succeeded (the endpoint is healthy). Closes a half-open breaker. An open one
    /// ignores it: it comes from a request sent before the breaker opened, and only a probe
    /// after the cool-down may let the full load back in.
    pub fn on_success(&mut self) {
        match self.state {
            State::Closed { .. } | State::HalfOpen { .. } => {
                self.state = State::Closed { failures: 0 };
                self.cool_down = self.opts.cool_down;
            }
            State::Open { .. } => {}
        }
    }

    /// A request failed at `now`. Opens a closed breaker at the threshold, re-opens a half-open
    /// one with a doubled cool-down; an open one ignores it (a request sent before it opened).
    pub fn on_failure(&mut self, now: Instant) {
        match self.state {
            State::Closed { failures } => {
                let failures = failures.saturating_add(1);
                if failures >= self.opts.failure_threshold.max(1) {
                    self.cool_down = self.opts.cool_down;
                    self.open(now);
                } else {
                    self.state = State::Closed { failures };
                }
            }
            State::HalfOpen { .. } => {
                self.cool_down = self
                    .cool_down
                    .saturating_mul(2)
                    .min(self.opts.max_cool_down.max(self.opts.cool_down));
                self.open(now);
            }
            State::Open { .. } => {}
        }
    }

    /// The probe was dropped before it had an outcome (cancelled, shutting down): frees the
    /// probe slot at once instead of waiting for the probe timeout. No effect otherwise.
    pub fn on_probe_abandoned(&mut self) {
        if let State::HalfOpen {
            probe_since: Some(_),
        } = self.state
        {
            self.state = State::HalfOpen { probe_since: None };
        }
    }

    fn open(&mut self, now: Instant) {
        let until = now.checked_add(self.cool_down).unwrap_or(now);
        tracing::debug!(cool_down = ?self.cool_down, "circuit breaker open");
        self.state = State::Open { until };
    }

    /// Whether [`Breaker::admit`] would refuse at `now` (open within its cool-down, or half-open
    /// with its probe out), without changing anything: retries are not claimed for it.
    pub fn is_rejecting(&self, now: Instant) -> bool {
        match self.state {
            State::Closed { .. } | State::HalfOpen { probe_since: None } => false,
            State::Open { until } => now < until,
            State::HalfOpen {
                probe_since: Some(since),
            } => now < since.checked_add(self.opts.probe_timeout).unwrap_or(since),
        }
    }

    /// The current state, for metrics. An open breaker whose cool-down has ended still reads
    /// `Open` until the next [`Breaker::admit`] turns it half-open.
    pub fn state(&self) -> BreakerState {
        match self.state {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Consecutive failures counted while closed (0 otherwise).
    pub fn consecutive_failures(&self) -> u32 {
        match self.state {
            State::Closed { failures } => failures,
            _ => 0,
        }
    }
}

impl Default for Breaker {
    fn default() -> Self {
        Self::with_options(BreakerOptions::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn is_rejecting_matches_admit_without_changing_the_state() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        assert!(!b.is_rejecting(t0));
        b = opened(t0);
        assert!(b.is_rejecting(t0));
        let after = t0 + DEFAULT_COOL_DOWN;
        assert!(!b.is_rejecting(after), "the cool-down is over");
        assert_eq!(b.state(), BreakerState::Open, "asking changed nothing");
        assert_eq!(b.admit(after), Admission::Probe);
        assert!(b.is_rejecting(after), "the probe is out");
        assert!(
            !b.is_rejecting(after + DEFAULT_PROBE_TIMEOUT),
            "the probe is lost"
        );
        b.on_probe_abandoned();
        assert!(!b.is_rejecting(after));
    }

    fn opened(t0: Instant) -> Breaker {
        let mut b = Breaker::default();
        for _ in 0..DEFAULT_FAILURE_THRESHOLD {
            assert_eq!(b.admit(t0), Admission::Allowed);
            b.on_failure(t0);
        }
        assert_eq!(b.state(), BreakerState::Open);
        b
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3);
        b.on_failure(t0);
        b.on_failure(t0);
        assert_eq!(b.consecutive_failures(), 2);
        b.on_success();
        assert_eq!(b.consecutive_failures(), 0, "a success breaks the streak");
        b.on_failure(t0);
        b.on_failure(t0);
        assert_eq!(
            (b.state(), b.admit(t0)),
            (BreakerState::Closed, Admission::Allowed)
        );
        b.on_failure(t0);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            b.admit(t0 + SEC),
            Admission::Rejected {
                retry_at: t0 + 30 * SEC
            }
        );
    }

    #[test]
    fn zero_threshold_behaves_as_one() {
        let t0 = Instant::now();
        let mut b = Breaker::new(0);
        assert_eq!(b.admit(t0), Admission::Allowed);
        b.on_failure(t0);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn half_open_allows_exactly_one_probe_and_success_closes() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        assert_eq!(
            b.admit(t0 + 29 * SEC),
            Admission::Rejected {
                retry_at: t0 + 30 * SEC
            }
        );
        let t1 = t0 + 30 * SEC;
        assert_eq!(b.admit(t1), Admission::Probe);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // Everyone else waits, and is told to look again soon, not at the probe timeout.
        for dt in [0, 1, 5] {
            assert_eq!(
                b.admit(t1 + dt * SEC),
                Admission::Rejected {
                    retry_at: t1 + (dt + 1) * SEC
                }
            );
        }
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(t1 + 2 * SEC), Admission::Allowed);
        // Closing resets the cool-down: the next opening waits 30 s again.
        for _ in 0..DEFAULT_FAILURE_THRESHOLD {
            b.on_failure(t1);
        }
        assert_eq!(
            b.admit(t1),
            Admission::Rejected {
                retry_at: t1 + 30 * SEC
            }
        );
    }

    #[test]
    fn failing_probes_double_the_cool_down_up_to_the_cap() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..7 {
            let Admission::Rejected { retry_at } = b.admit(now) else {
                panic!("should be open")
            };
            waits.push((retry_at - now).as_secs());
            now = retry_at;
            assert_eq!(b.admit(now), Admission::Probe);
            b.on_failure(now);
            assert_eq!(b.state(), BreakerState::Open);
        }
        assert_eq!(waits, [30, 60, 120, 240, 300, 300, 300]);
        // A probe success after all that closes it and resets the cool-down.
        assert_eq!(b.admit(now + 300 * SEC), Admission::Probe);
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_lost_probe_is_replaced_after_the_probe_timeout() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let t1 = t0 + 30 * SEC;
        assert_eq!(b.admit(t1), Admission::Probe);
        // The probe's task is dropped without reporting.
        let near_end = t1 + DEFAULT_PROBE_TIMEOUT - SEC / 2;
        assert_eq!(
            b.admit(near_end),
            Admission::Rejected {
                retry_at: t1 + DEFAULT_PROBE_TIMEOUT
            }
        );
        assert_eq!(b.admit(t1 + DEFAULT_PROBE_TIMEOUT), Admission::Probe);
        assert_eq!(
            b.admit(t1 + DEFAULT_PROBE_TIMEOUT),
            Admission::Rejected {
                retry_at: t1 + DEFAULT_PROBE_TIMEOUT + SEC
            },
            "still one probe at a time"
        );
    }

    #[test]
    fn an_abandoned_probe_frees_the_slot_at_once() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        let t1 = t0 + 30 * SEC;
        assert_eq!(b.admit(t1), Admission::Probe);
        b.on_probe_abandoned();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.admit(t1), Admission::Probe);
        assert!(matches!(b.admit(t1), Admission::Rejected { .. }));
        // Abandoning means nothing when no probe is out.
        let mut closed = Breaker::default();
        closed.on_probe_abandoned();
        assert_eq!(closed.state(), BreakerState::Closed);
    }

    #[test]
    fn late_reports_while_open_change_nothing() {
        let t0 = Instant::now();
        let mut b = opened(t0);
        // Requests sent before it opened report afterwards.
        b.on_success();
        b.on_failure(t0 + 20 * SEC);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            b.admit(t0 + 20 * SEC),
            Admission::Rejected {
                retry_at: t0 + 30 * SEC
            }
        );
    }

    #[test]
    fn custom_options() {
        let t0 = Instant::now();
        let mut b = Breaker::with_options(BreakerOptions {
            failure_threshold: 1,
            cool_down: 2 * SEC,
            max_cool_down: 3 * SEC,
            probe_timeout: 10 * SEC,
            probe_recheck: 20 * SEC,
        });
        b.on_failure(t0);
        assert_eq!(
            b.admit(t0),
            Admission::Rejected {
                retry_at: t0 + 2 * SEC
            }
        );
        assert_eq!(b.admit(t0 + 2 * SEC), Admission::Probe);
        // The recheck hint never points past the probe timeout.
        assert_eq!(
            b.admit(t0 + 3 * SEC),
            Admission::Rejected {
                retry_at: t0 + 12 * SEC
            }
        );
        b.on_failure(t0 + 3 * SEC);
        assert_eq!(
            b.admit(t0 + 3 * SEC),
            Admission::Rejected {
                retry_at: t0 + 6 * SEC
            },
            "doubled, capped at 3 s"
        );
    }
}
