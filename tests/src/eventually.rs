//! Bounded waits with a message naming what was awaited: one helper for every "until this
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
        async move { Ok(Poll::when(done, "false")) }
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
