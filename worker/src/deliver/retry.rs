//! Retry rules of one delivery (DESIGN §4) as pure functions: which answers are retried, how
//! long to wait before the next attempt (schedule, jitter, clamped `Retry-After`) and how to read
//! a `Retry-After` header. No clock, randomness or I/O here: callers pass `now` and a random
//! number in, so every rule is tested exactly. The attempt loop itself lives in `dispatch`.

use std::time::{Duration, SystemTime};

/// Waits before the retries of the default schedule (DESIGN §4): 5 s, 30 s, 2 min, 10 min,
/// 30 min, 1 h, 2 h, 4 h, then 8 h three times, about 32 hours in all, so a receiver's outage of a
/// day loses nothing (Svix retries for about 33 h). The first attempt is immediate; retries come
/// from the delivery store, so they survive restarts. An immediate retry would hit an endpoint
/// that just failed before it had any chance to recover, and a zero step would also turn
/// `Retry-After` off (it is clamped to zero).
pub const DEFAULT_SCHEDULE: [Duration; 11] = [
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(2 * 60),
    Duration::from_secs(10 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(3600),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(4 * 3600),
    Duration::from_secs(8 * 3600),
    Duration::from_secs(8 * 3600),
    Duration::from_secs(8 * 3600),
];

/// The default schedule as `--retry-schedule` takes it.
pub const DEFAULT_SCHEDULE_FLAG: &str = "5s,30s,2m,10m,30m,1h,2h,4h,8h,8h,8h";

/// Default jitter: each scheduled wait is spread over ±20 %.
pub const DEFAULT_JITTER: f64 = 0.2;

/// Default retry window: no attempt starts later than this after the delivery was accepted
/// (room for the whole default schedule and its jitter).
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(36 * 3600);

/// How a failed delivery is retried.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Waits before attempt 2, 3, …: `delays[n]` is the wait after attempt `n + 1` failed. The
    /// first attempt is never delayed. Empty: no retries.
    pub delays: Vec<Duration>,
    /// Relative spread of each scheduled wait, in `[0, 1]` (0.2 = ±20 %); spreading keeps the
    /// retries of a burst of failures from coming back in lockstep.
    pub jitter: f64,
    /// No attempt starts after `first attempt + window` (enforced by the caller, which owns the
    /// clock; from the store, the delivery's creation time).
    pub window: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            delays: DEFAULT_SCHEDULE.to_vec(),
            jitter: DEFAULT_JITTER,
            window: DEFAULT_WINDOW,
        }
    }
}

impl RetryPolicy {
    /// Most attempts the schedule allows: the first plus one per delay (the window may cut
    /// this short).
    pub fn max_attempts(&self) -> u32 {
        u32::try_from(self.delays.len())
            .unwrap_or(u32::MAX)
            .saturating_add(1)
    }
}

/// Parses a schedule flag such as `5s,30s,2m,5m,10m` (humantime durations, comma-separated):
/// the waits before attempt 2, 3, …, as in [`RetryPolicy::delays`]. An empty string means no
/// retries; an empty item (`5s,,30s`) is refused as a likely typo.
pub fn parse_schedule(s: &str) -> Result<Vec<Duration>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .enumerate()
        .map(|(n, item)| {
            let item = item.trim();
            if item.is_empty() {
                return Err(format!("retry schedule: item {} is empty", n + 1));
            }
            humantime::parse_duration(item).map_err(|e| format!("retry schedule: {item:?}: {e}"))
        })
        .collect()
}

/// What an HTTP answer means for a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: delivered.
    Delivered,
    /// Worth another attempt (408, 429, 5xx; transport errors per the caller).
    Retry,
    /// Refused for good: any other status, 3xx included (redirects are not followed).
    Final,
    /// 410 Gone: final, and the integration is to be disabled.
    Gone,
}

/// Classifies an HTTP status. Transport errors never get here: the caller asks the error
/// whether it is retryable.
pub fn classify_status(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        410 => Verdict::Gone,
        408 | 429 | 500..=599 => Verdict::Retry,
        _ => Verdict::Final,
    }
}

/// The wait before the next attempt after `attempts_made` attempts, or `None` when the
/// schedule is exhausted. `attempts_made == 0` gives zero (the first attempt is immediate).
///
/// `rand01` is a random number in `[0, 1)` (injected for tests; out-of-range values are
/// clamped). Without `retry_after` the wait is the scheduled delay `d` spread uniformly over
/// `[d·(1−jitter), d·(1+jitter))`. With it, the server's wish is clamped to `[d, 2d]` and used
/// as a floor: the wait lies in `[clamped, clamped + jitter·(2d − clamped))`, never earlier than
/// the server asked (within the clamp) and never later than `2d`, so a hostile or confused
/// `Retry-After` can neither hammer the endpoint nor stall the delivery past its schedule.
pub fn next_delay(
    policy: &RetryPolicy,
    attempts_made: u32,
    retry_after: Option<Duration>,
    rand01: f64,
) -> Option<Duration> {
    let Some(index) = attempts_made.checked_sub(1) else {
        return Some(Duration::ZERO);
    };
    let scheduled = *policy.delays.get(usize::try_from(index).ok()?)?;
    let r = if rand01.is_finite() {
        rand01.clamp(0.0, 1.0)
    } else {
        0.5
    };
    let jitter = if policy.jitter.is_finite() {
        policy.jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    Some(match retry_after {
        None => scale(scheduled, 1.0 + jitter * (2.0 * r - 1.0)),
        Some(asked) => {
            let ceiling = scheduled.saturating_mul(2);
            let floor = asked.clamp(scheduled, ceiling);
            floor
                .saturating_add(scale(ceiling - floor, jitter * r))
                .min(ceiling)
        }
    })
}

/// `d × factor` for a factor ≥ 0, saturating instead of panicking like `Duration::mul_f64`.
fn scale(d: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * factor.max(0.0)).unwrap_or(Duration::MAX)
}

/// Reads a `Retry-After` value (RFC 9110 §10.2.3): delta-seconds, or an HTTP date (IMF-fixdate,
/// and the two obsolete forms recipients must accept) turned into a wait from `now`; a date in
/// the past is a zero wait. `None` when unreadable: the schedule alone then decides.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // More digits than a u64 holds is still "a very long time"; the clamp bounds it.
        return Some(
            value
                .parse::<u64>()
                .map_or(Duration::MAX, Duration::from_secs),
        );
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn policy(delays: &[u64]) -> RetryPolicy {
        RetryPolicy {
            delays: delays.iter().copied().map(S).collect(),
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn default_policy_reads_the_design_schedule() {
        let p = RetryPolicy::default();
        let h = |n: u64| S(n * 3600);
        assert_eq!(
            p.delays,
            [
                S(5),
                S(30),
                S(120),
                S(600),
                S(1800),
                h(1),
                h(2),
                h(4),
                h(8),
                h(8),
                h(8)
            ]
        );
        assert_eq!(p.delays, parse_schedule(DEFAULT_SCHEDULE_FLAG).unwrap());
        assert_eq!(p.max_attempts(), 12);
        assert!((p.jitter - 0.2).abs() < f64::EPSILON);
        assert_eq!(p.window, h(36));
    }

    #[test]
    fn schedule_flags() {
        let ok: &[(&str, &[u64])] = &[
            ("5s,30s,2m,5m,10m", &[5, 30, 120, 300, 600]),
            (" 1s , 1m ", &[1, 60]),
            ("0s", &[0]),
            ("1h 30m", &[5400]),
            ("", &[]),
            ("   ", &[]),
        ];
        for (flag, want) in ok {
            let want: Vec<Duration> = want.iter().copied().map(S).collect();
            assert_eq!(parse_schedule(flag).as_ref(), Ok(&want), "{flag:?}");
        }
        for bad in ["5s,,30s", "5s,", "soon", "5s,-1s", "10"] {
            let err = parse_schedule(bad).expect_err(bad);
            assert!(err.starts_with("retry schedule"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn statuses() {
        use Verdict::*;
        let rows: &[(u16, Verdict)] = &[
            (200, Delivered),
            (201, Delivered),
            (204, Delivered),
            (299, Delivered),
            (100, Final),
            (301, Final),
            (302, Final),
            (304, Final),
            (400, Final),
            (401, Final),
            (403, Final),
            (404, Final),
            (409, Final),
            (413, Final),
            (422, Final),
            (408, Retry),
            (429, Retry),
            (410, Gone),
            (500, Retry),
            (502, Retry),
            (503, Retry),
            (504, Retry),
            (599, Retry),
            (600, Final),
        ];
        for (status, want) in rows {
            assert_eq!(classify_status(*status), *want, "{status}");
        }
    }

    #[test]
    fn delays_follow_the_schedule_with_jitter_bounds() {
        let p = RetryPolicy::default();
        // (attempts made, rand01, expected wait)
        let rows: &[(u32, f64, Duration)] = &[
            (0, 0.7, Duration::ZERO),
            (1, 0.5, S(5)),
            (1, 0.0, Duration::from_millis(4000)),
            (1, 0.75, Duration::from_millis(5500)),
            (2, 0.5, S(30)),
            (2, 0.0, S(24)),
            (3, 0.25, S(108)),
            (5, 0.5, S(1800)),
            (5, 0.0, S(1440)),
            // Out-of-range randomness is clamped rather than trusted.
            (2, -3.0, S(24)),
            (2, 7.0, S(36)),
            (2, f64::NAN, S(30)),
        ];
        for (attempts, r, want) in rows {
            let got = next_delay(&p, *attempts, None, *r).expect("within the schedule");
            let diff = got.abs_diff(*want);
            assert!(
                diff < Duration::from_micros(1),
                "attempts {attempts}, r {r}: {got:?} != {want:?}"
            );
        }
    }

    #[test]
    fn jitter_stays_within_bounds_over_the_unit_interval() {
        let p = RetryPolicy::default();
        for attempts in 1..=5u32 {
            let d = p.delays[attempts as usize - 1];
            for step in 0..1000 {
                let r = f64::from(step) / 1000.0;
                let got = next_delay(&p, attempts, None, r).expect("within the schedule");
                assert!(
                    got >= d.mul_f64(0.8) && got < d.mul_f64(1.2),
                    "{attempts} {r}: {got:?}"
                );
            }
        }
        let flat = RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        };
        assert_eq!(next_delay(&flat, 2, None, 0.99), Some(S(30)));
        // A jitter beyond 100 % cannot make a wait negative.
        let wild = RetryPolicy {
            jitter: 5.0,
            ..RetryPolicy::default()
        };
        assert_eq!(next_delay(&wild, 2, None, 0.0), Some(Duration::ZERO));
    }

    #[test]
    fn schedule_exhaustion() {
        let p = policy(&[1, 2]);
        assert_eq!(p.max_attempts(), 3);
        assert!(next_delay(&p, 2, None, 0.5).is_some());
        assert_eq!(next_delay(&p, 3, None, 0.5), None);
        assert_eq!(
            next_delay(&p, 3, Some(S(1)), 0.5),
            None,
            "Retry-After does not extend the schedule"
        );
        assert_eq!(next_delay(&p, u32::MAX, None, 0.5), None);
        let none = policy(&[]);
        assert_eq!(none.max_attempts(), 1);
        assert_eq!(next_delay(&none, 1, None, 0.5), None);
        assert_eq!(next_delay(&RetryPolicy::default(), 12, None, 0.0), None);
    }

    #[test]
    fn retry_after_is_clamped_both_ways() {
        // Scheduled 30 s (after attempt 2): Retry-After lands in [30 s, 60 s].
        let p = RetryPolicy::default();
        // (Retry-After, rand01, expected wait)
        let rows: &[(Duration, f64, Duration)] = &[
            (Duration::ZERO, 0.0, S(30)),                // too early: clamped up
            (S(10), 0.0, S(30)),                         // too early: clamped up
            (S(45), 0.0, S(45)),                         // inside: honoured as asked
            (S(60), 0.0, S(60)),                         // the ceiling itself
            (S(3600), 0.0, S(60)),                       // too late: clamped down
            (Duration::MAX, 0.9, S(60)),                 // absurd: clamped down, no overflow
            (S(10), 0.5, S(33)),                         // jitter pushes later: 30 + 0.2·0.5·30
            (S(45), 0.5, Duration::from_millis(46_500)), // 45 + 0.2·0.5·15
        ];
        for (asked, r, want) in rows {
            let got = next_delay(&p, 2, Some(*asked), *r).expect("within the schedule");
            assert!(
                got.abs_diff(*want) < Duration::from_micros(1),
                "asked {asked:?}, r {r}: {got:?} != {want:?}"
            );
        }
        for step in 0..100 {
            let r = f64::from(step) / 100.0;
            for asked in [S(0), S(20), S(30), S(40), S(59), S(61), S(1000)] {
                let got = next_delay(&p, 2, Some(asked), r).expect("within the schedule");
                assert!(got >= S(30) && got <= S(60), "{asked:?} {r}: {got:?}");
                assert!(
                    got >= asked.min(S(60)),
                    "never earlier than asked (within the clamp)"
                );
            }
        }
    }

    #[test]
    fn zero_step_turns_retry_after_off() {
        let p = policy(&[0, 5]);
        assert_eq!(next_delay(&p, 1, Some(S(120)), 0.5), Some(Duration::ZERO));
        assert_eq!(next_delay(&p, 1, None, 0.9), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_values() {
        // Sun, 06 Nov 1994 08:49:37 GMT, the RFC's example date.
        let date = SystemTime::UNIX_EPOCH + S(784_111_777);
        let rows: &[(&str, SystemTime, Option<Duration>)] = &[
            ("120", date, Some(S(120))),
            (" 0 ", date, Some(S(0))),
            ("007", date, Some(S(7))),
            ("99999999999999999999999", date, Some(Duration::MAX)),
            ("-5", date, None),
            ("1.5", date, None),
            ("", date, None),
            ("soon", date, None),
            ("Sun, 06 Nov 1994 08:49:37 GMT", date - S(90), Some(S(90))),
            ("Sun, 06 Nov 1994 08:49:37 GMT", date, Some(S(0))),
            // A date in the past is no wait at all (then clamped up by `next_delay`).
            ("Sun, 06 Nov 1994 08:49:37 GMT", date + S(3600), Some(S(0))),
            // The obsolete forms a recipient must still accept.
            ("Sunday, 06-Nov-94 08:49:37 GMT", date - S(1), Some(S(1))),
            ("Sun Nov  6 08:49:37 1994", date - S(2), Some(S(2))),
            ("Sun, 06 Nov 1994 08:49:37 CET", date, None),
        ];
        for (value, now, want) in rows {
            assert_eq!(parse_retry_after(value, *now), *want, "{value:?}");
        }
    }

    #[test]
    fn past_http_date_ends_up_at_the_scheduled_delay() {
        let now = SystemTime::UNIX_EPOCH + S(1_700_000_000);
        let past = httpdate::fmt_http_date(now - S(600));
        let asked = parse_retry_after(&past, now);
        assert_eq!(asked, Some(Duration::ZERO));
        assert_eq!(
            next_delay(&RetryPolicy::default(), 1, asked, 0.0),
            Some(S(5))
        );
        let future = httpdate::fmt_http_date(now + S(8));
        let asked = parse_retry_after(&future, now);
        assert_eq!(asked, Some(S(8)));
        assert_eq!(
            next_delay(&RetryPolicy::default(), 1, asked, 0.0),
            Some(S(8))
        );
    }
}
