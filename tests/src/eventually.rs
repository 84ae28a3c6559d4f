//! Bounded waits with a message naming what was awaited: one function for every "until this
//! holds" and "this must answer within" of the tests, instead of hand-written deadline loops.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;

/// Pause between two checks of a condition.
const POLL: Duration = Duration::from_millis(20);

/// Polls `check` until it returns `Ok(Some(value))`, at most `limit`; `Ok(None)` means "not
/// yet", `Err` fails at once. The error names `what` was awaited and the last `not yet` state
/// `check` reported through [`Poll::not_yet`].
///
/// Uses Tokio's clock: under `tokio::time::pause()` the wait costs no real time.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Poll<T>>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let last = match check().await? {
            Poll::Ready(value) => return Ok(value),
            Poll::NotYet(last) => last,
        };
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("{what}: not within {limit:?} (last: {last})");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What one check of [`eventually`] found.
#[derive(Debug)]
pub enum Poll<T> {
    /// Done, with this value.
    Ready(T),
    /// Not yet; what was seen, for the error at the deadline.
    NotYet(String),
}

impl<T> Poll<T> {
    /// Not yet, having seen `state`.
    pub fn not_yet(state: impl std::fmt::Debug) -> Self {
        Self::NotYet(format!("{state:?}"))
    }
}

impl Poll<()> {
    /// Ready when `done`, otherwise not yet with `state`.
    pub fn when(done: bool, state: impl std::fmt::Debug) -> Self {
        if done {
            Self::Ready(())
        } else {
            Self::not_yet(state)
        }
    }
}

/// Polls `condition` until it holds, at most `limit`; the error names `what` was awaited.
pub async fn until(
    what: &str,
    limit: Duration,
    mut condition: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    eventually(what, limit, || {
        let done = condition();
        async move {
            Ok(if done {
                Poll::Ready(())
            } else {
                Poll::NotYet("the condition does not hold".to_owned())
            })
        }
    })
    .await
}

/// `future`'s output if it completes within `limit`; otherwise an error naming `what` was
/// awaited.
pub async fn within<F: Future>(
    what: &str,
    limit: Duration,
    future: F,
) -> anyhow::Result<F::Output> {
    tokio::time::timeout(limit, future)
        .await
        .ok()
        .with_context(|| format!("{what}: not within {limit:?}"))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn polls_until_ready_and_returns_the_value() {
        let checks = AtomicUsize::new(0);
        let started = tokio::time::Instant::now();
        let got = eventually("the third check", Duration::from_secs(1), || async {
            let n = checks.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(if n == 3 {
                Poll::Ready(n)
            } else {
                Poll::not_yet(n)
            })
        })
        .await
        .expect("ready on the third check");
        assert_eq!(got, 3);
        assert_eq!(started.elapsed(), POLL * 2);
    }

    #[tokio::test(start_paused = true)]
    async fn fails_at_the_limit_naming_what_and_the_last_state() {
        let err = eventually("the answer", Duration::from_secs(1), || async {
            Ok(Poll::<()>::not_yet("still 41"))
        })
        .await
        .expect_err("never ready");
        let message = err.to_string();
        assert!(
            message.contains("the answer") && message.contains("still 41"),
            "{message}"
        );
        let err = until("the flag", Duration::from_millis(100), || false)
            .await
            .expect_err("never true");
        assert!(err.to_string().contains("the flag"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_check_ends_the_wait_at_once() {
        let started = tokio::time::Instant::now();
        let err = eventually("anything", Duration::from_secs(60), || async {
            Err::<Poll<()>, _>(anyhow::anyhow!("broken"))
        })
        .await
        .expect_err("the check failed");
        assert_eq!(err.to_string(), "broken");
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn within_bounds_a_future() {
        assert_eq!(
            within("a ready future", Duration::from_secs(1), async { 7 })
                .await
                .expect("ready"),
            7
        );
        let err = within(
            "a pending future",
            Duration::from_secs(1),
            std::future::pending::<()>(),
        )
        .await
        .expect_err("never ready");
        assert!(err.to_string().contains("a pending future"), "{err}");
    }
}
