//! `pushwire.v1.ConfigService.WatchConfig`: each watcher is a task reading the shared
//! [`ConfigFeed`] and writing into a small bounded channel, so a slow watcher only slows
//! itself, and ends on client disconnect or shutdown.
//!
//! While the feed is current (its store watch is live, [`ConfigFeed::is_current`]), a watcher
//! that has been sent everything also gets a progress message every
//! [`DEFAULT_PROGRESS_INTERVAL`]: a `WatchConfigResponse` with neither snapshot nor changes, at
//! the revision the watcher was last brought to. Workers take it as proof that their
//! configuration is current (and expose how long ago that was); a control plane cut off from
//! its store sends none, so its workers' staleness grows; it also refuses new streams that
//! resume from a revision (UNAVAILABLE), so that their workers try another replica.

use std::pin::Pin;

use prost::Message as _;
use std::time::Duration;

use futures_util::Stream;
use pb::config_change::Change as PbChange;
use pb::config_service_server::ConfigService;
use pushwire_common::auth::{Action, authorize};
use pushwire_common::domain::convert::integration_config;
use pushwire_common::pb::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::service::{Change, ConfigFeed, FeedUpdate};

/// How long a worker resuming from a revision this replica has not reached waits for it
/// before it gets this replica's snapshot instead.
const CATCH_UP: Duration = Duration::from_secs(5);

/// Messages buffered per watcher before the feed waits for it.
const WATCHER_BUFFER: usize = 16;

/// Pause between progress messages by default (`--watch-progress-interval`).
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// How long after sending changes a watcher waits before it sends more, by default
/// (`--watch-batch-window`).
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_millis(2);

/// At most this many batch windows between two messages of changes: the wait after a message
/// is one window per revision it held, up to this many.
const MAX_BATCH_WINDOWS: usize = 5;

/// How long a watcher waits after sending `revisions` revisions of changes before it sends
/// more: one `window` per revision, at most [`MAX_BATCH_WINDOWS`]. While changes come slower
/// than one per window, each message holds one revision and the wait stays one window; while
/// they come faster, each wait gathers more revisions than the last and grows to its
/// maximum, so a worker wakes once per many changes. Latency is added only then.
fn batch_wait(window: Duration, revisions: usize) -> Duration {
    let windows = revisions.clamp(1, MAX_BATCH_WINDOWS);
    window * u32::try_from(windows).unwrap_or(1)
}

/// Serves `ConfigService` from the [`ConfigFeed`].
#[derive(Clone, Debug)]
pub struct ConfigApi {
    feed: ConfigFeed,
    shutdown: CancellationToken,
    progress_interval: Duration,
    batch_window: Duration,
}

impl ConfigApi {
    /// The service over `feed`; streams end with UNAVAILABLE on `shutdown`.
    pub fn new(feed: ConfigFeed, shutdown: CancellationToken) -> Self {
        Self {
            feed,
            shutdown,
            progress_interval: DEFAULT_PROGRESS_INTERVAL,
            batch_window: DEFAULT_BATCH_WINDOW,
        }
    }

    /// The feed it serves.
    pub fn feed(&self) -> &ConfigFeed {
        &self.feed
    }

    /// The same, waiting `window` per revision sent, at most five windows, after sending
    /// changes before sending more: revisions committed meanwhile then go out together, in
    /// one message (zero: each as soon as it is committed; revisions already pending still
    /// go together).
    pub fn with_batch_window(mut self, window: Duration) -> Self {
        self.batch_window = window;
        self
    }

    /// The same, sending progress messages every `interval` (at least 10 ms).
    pub fn with_progress_interval(mut self, interval: Duration) -> Self {
        self.progress_interval = interval.max(Duration::from_millis(10));
        self
    }
}

/// The progress message of a watcher at `revision`: neither snapshot nor changes.
fn progress(revision: i64) -> pb::WatchConfigResponse {
    pb::WatchConfigResponse {
        revision,
        ..Default::default()
    }
}

fn change_to_pb(c: &Change) -> pb::ConfigChange {
    let change = match c {
        Change::UpsertIntegration(i) => PbChange::UpsertIntegration(integration_config(i)),
        Change::DeleteIntegration(n) => PbChange::DeleteIntegration(n.to_string()),
        Change::UpsertPushScope(s) => PbChange::UpsertPushScope(s.as_ref().into()),
        Change::DeletePushScope(n) => PbChange::DeletePushScope(n.to_string()),
    };
    pb::ConfigChange {
        change: Some(change),
    }
}

/// Largest part of a snapshot sent in parts (when the client accepts parts).
const MAX_PART_BYTES: usize = 4 << 20;

/// Revisions go together in one message up to about this size (a revision larger than it
/// goes alone): well within the 4 MiB a client takes by default, and big enough that a
/// burst costs a worker one message per hundreds of changes.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// What a change counts towards [`MAX_BATCH_BYTES`]: its encoding and its field's framing.
fn batch_bytes(change: &pb::ConfigChange) -> usize {
    change.encoded_len() + 8
}

/// The size of the parts of a snapshot for a client that accepts messages of up to
/// `max_message_bytes` (0: no parts, one message whatever its size).
fn part_bytes(max_message_bytes: i64) -> usize {
    match usize::try_from(max_message_bytes) {
        Ok(0) | Err(_) => usize::MAX,
        Ok(max) => (max / 2).clamp(1, MAX_PART_BYTES),
    }
}

/// The messages for one feed update, built one at a time as the watcher takes them (a big
/// installation's snapshot is never held encoded all at once). A snapshot goes in parts of
/// about `part_bytes` (at least one item each), all but the last flagged
/// `snapshot_continues`. Revisions go together, in order, in messages of about
/// [`MAX_BATCH_BYTES`] or `part_bytes` if smaller (at least one revision each, never part of
/// one), each at the last revision it holds: a worker wakes, decodes and swaps its table once
/// per message, not once per revision.
fn messages(
    update: FeedUpdate,
    part_bytes: usize,
) -> Box<dyn Iterator<Item = pb::WatchConfigResponse> + Send> {
    match update {
        FeedUpdate::Snapshot {
            revision,
            integrations,
            push_scopes,
        } => {
            let mut integrations = integrations.into_iter().peekable();
            let mut push_scopes = push_scopes.into_iter().peekable();
            let mut done = false;
            Box::new(std::iter::from_fn(move || {
                if done {
                    return None;
                }
                let mut part = pb::ConfigSnapshot::default();
                let mut bytes = 0;
                while bytes < part_bytes {
                    if let Some(i) = integrations.next() {
                        let i = integration_config(&i);
                        bytes += i.encoded_len() + 8;
                        part.integrations.push(i);
                    } else if let Some(s) = push_scopes.next() {
                        let s = pb::PushScope::from(s.as_ref());
                        bytes += s.encoded_len() + 8;
                        part.push_scopes.push(s);
                    } else {
                        break;
                    }
                }
                let continues = integrations.peek().is_some() || push_scopes.peek().is_some();
                done = !continues;
                Some(pb::WatchConfigResponse {
                    revision,
                    snapshot: Some(part),
                    changes: Vec::new(),
                    snapshot_continues: continues,
                })
            }))
        }
        FeedUpdate::Changes(revisions) => {
            let limit = part_bytes.min(MAX_BATCH_BYTES);
            let mut revisions = revisions.into_iter();
            Box::new(std::iter::from_fn(move || {
                let mut next = Some(revisions.next()?);
                let mut msg = pb::WatchConfigResponse::default();
                let mut bytes = 0;
                while let Some(r) = next {
                    for change in &r.changes {
                        let change = change_to_pb(change);
                        bytes += batch_bytes(&change);
                        msg.changes.push(change);
                    }
                    msg.revision = r.revision;
                    next = if bytes < limit {
                        revisions.next()
                    } else {
                        None
                    };
                }
                Some(msg)
            }))
        }
    }
}

#[tonic::async_trait]
impl ConfigService for ConfigApi {
    type WatchConfigStream =
        Pin<Box<dyn Stream<Item = Result<pb::WatchConfigResponse, Status>> + Send>>;

    async fn watch_config(
        &self,
        request: Request<pb::WatchConfigRequest>,
    ) -> Result<Response<Self::WatchConfigStream>, Status> {
        // Every account's configuration, secrets included: worker tokens for all accounts.
        authorize(&request, Action::WatchConfig)?.all_accounts()?;
        let from = request.get_ref().from_revision;
        if from < 0 {
            return Err(super::invalid("from_revision", "must not be negative"));
        }
        if request.get_ref().max_message_bytes < 0 {
            return Err(super::invalid("max_message_bytes", "must not be negative"));
        }
        let part_bytes = part_bytes(request.get_ref().max_message_bytes);
        // A worker that has a configuration is better served by a replica that is current:
        // this one could only send what may be older than what the worker has (a snapshot it
        // would take). UNAVAILABLE makes it try the next control plane; one with nothing yet
        // (from 0) is served, a configuration being better than none.
        if from > 0 && !self.feed.is_current() {
            return Err(Status::unavailable(
                "this control plane is not current (its store watch is down or not yet \
                 established); try another replica",
            ));
        }
        let (tx, rx) = mpsc::channel(WATCHER_BUFFER);
        let mut view = self.feed.subscribe();
        let shutdown = self.shutdown.clone();
        let feed = self.feed.clone();
        let (period, window) = (self.progress_interval, self.batch_window);
        tokio::spawn(async move {
            // A worker resuming from a revision this replica has not seen yet (it followed
            // another one) waits for it to catch up, not for an older snapshot; after
            // CATCH_UP it gets the snapshot (a store restored from a backup stays behind).
            if from > 0 {
                tokio::select! {
                    _ = view.reach(from, CATCH_UP) => {}
                    () = tx.closed() => return,
                    () = shutdown.cancelled() => return,
                }
            }
            let mut last = from;
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // When changes were last sent, and how long the next ones wait from then.
            let mut sent: Option<(tokio::time::Instant, Duration)> = None;
            loop {
                if let Some((at, wait)) = sent.take() {
                    tokio::select! {
                        () = tokio::time::sleep_until(at + wait) => {}
                        () = tx.closed() => return,
                        () = shutdown.cancelled() => {}
                    }
                }
                let update = tokio::select! {
                    // Updates first: a progress message only goes to a watcher sent everything.
                    biased;
                    u = view.next(last) => u,
                    _ = ticks.tick() => {
                        // Only at a revision this watcher has (0: it has nothing yet), and only
                        // while the feed is current. `last` is always safe: the watcher has
                        // every change up to it, and one at its own revision is ignored.
                        if last > 0 && feed.is_current() && tx.send(Ok(progress(last))).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    () = tx.closed() => return,
                    () = shutdown.cancelled() => {
                        let _ = tx.send(Err(Status::unavailable("control plane shutting down; reconnect"))).await;
                        return;
                    }
                };
                let Some(update) = update else { return };
                if let FeedUpdate::Changes(revisions) = &update
                    && !window.is_zero()
                {
                    let wait = batch_wait(window, revisions.len());
                    sent = Some((tokio::time::Instant::now(), wait));
                }
                for msg in messages(update, part_bytes) {
                    let revision = msg.revision;
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    last = revision;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use pushwire_common::domain::{Integration, IntegrationName};

    use super::*;
    use crate::service::feed::RevisionChanges;

    fn revision(revision: i64, ids: &[&str]) -> Arc<RevisionChanges> {
        Arc::new(RevisionChanges {
            revision,
            changes: ids
                .iter()
                .map(|id| Change::UpsertIntegration(Arc::new(Integration::example("acme", id))))
                .collect(),
        })
    }

    /// Each message's revision and the integration ids of its changes.
    fn sent(update: FeedUpdate, part_bytes: usize) -> Vec<(i64, Vec<String>)> {
        messages(update, part_bytes)
            .map(|m| {
                assert!(m.snapshot.is_none() && !m.snapshot_continues);
                let ids = m
                    .changes
                    .iter()
                    .map(|c| match &c.change {
                        Some(PbChange::UpsertIntegration(i)) => {
                            let name = &i.integration.as_ref().unwrap().name;
                            IntegrationName::parse(name).unwrap().id().to_owned()
                        }
                        other => panic!("unexpected change {other:?}"),
                    })
                    .collect();
                (m.revision, ids)
            })
            .collect()
    }

    #[test]
    fn pending_revisions_go_together_in_order_at_the_last_one() {
        let update = || {
            FeedUpdate::Changes(vec![
                revision(5, &["a", "b"]),
                revision(6, &[]),
                revision(7, &["c"]),
            ])
        };
        assert_eq!(
            sent(update(), usize::MAX),
            [(7, vec!["a".to_owned(), "b".into(), "c".into()])]
        );
        // Within a size: a message closes once it reached it, never inside a revision.
        let one = batch_bytes(&change_to_pb(&revision(1, &["a"]).changes[0]));
        assert_eq!(
            sent(update(), one),
            [
                (5, vec!["a".to_owned(), "b".into()]),
                (7, vec!["c".to_owned()])
            ]
        );
        assert_eq!(
            sent(update(), 3 * one),
            [(7, vec!["a".to_owned(), "b".into(), "c".into()])]
        );
    }

    #[test]
    fn a_burst_is_cut_at_the_batch_size_whatever_the_client_accepts() {
        // Enough revisions of one integration each for about three messages.
        let one = batch_bytes(&change_to_pb(&revision(1, &["i1"]).changes[0]));
        let n = i64::try_from(3 * MAX_BATCH_BYTES / one).unwrap();
        let burst: Vec<_> = (1..=n)
            .map(|r| revision(r, &[format!("i{r}").as_str()]))
            .collect();
        let msgs: Vec<_> = messages(FeedUpdate::Changes(burst), usize::MAX).collect();
        assert!((3..=4).contains(&msgs.len()), "{} messages", msgs.len());
        for m in &msgs {
            assert!(
                m.encoded_len() <= MAX_BATCH_BYTES + 2 * one,
                "{}",
                m.encoded_len()
            );
        }
        let changes: usize = msgs.iter().map(|m| m.changes.len()).sum();
        assert_eq!(i64::try_from(changes).unwrap(), n);
        assert_eq!(msgs.last().unwrap().revision, n);
        assert!(msgs.windows(2).all(|w| w[0].revision < w[1].revision));
    }
}
