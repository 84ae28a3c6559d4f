//! What the publisher's tasks share: the queue of participations waiting for a stream (new
//! ones at the back, those taken back from a failed stream at the front), the bound on
//! participations held, the counters, and the reporting of each participation exactly once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{GaveUp, PublisherOptions, Receipt};
use crate::auth::Bearer;
use crate::pb::v1 as pb;

/// How a participation's receipt reaches whoever published it.
pub(crate) type Reply = Box<dyn FnOnce(Receipt) + Send>;

/// A participation held until it is reported.
pub(crate) struct Item {
    /// The publisher's own request id, on the wire.
    pub(crate) id: u64,
    /// The request as sent (`request_id` is `id`).
    pub(crate) request: pb::PublishRequest,
    /// The caller's `request_id`, given back in the receipt.
    caller_request_id: String,
    published: Instant,
    pub(crate) deadline: Instant,
    /// Streams it was written to.
    pub(crate) sends: u32,
    /// Order of its last sending, among all (for finding which request a stream ended for).
    pub(crate) sent: u64,
    /// Why the last stream it was on failed.
    pub(crate) last_error: Option<String>,
    reply: Option<Reply>,
    _held: OwnedSemaphorePermit,
}

impl Item {
    /// Whether its deadline has passed.
    pub(crate) fn expired(&self, now: Instant) -> bool {
        now >= self.deadline
    }

    /// Reports the outcome; a response gets the caller's `request_id` back.
    pub(crate) fn finish(mut self, outcome: Result<pb::PublishResponse, GaveUp>) {
        let outcome = outcome.map(|mut response| {
            response.request_id = self.caller_request_id.clone();
            response
        });
        self.report(outcome);
    }

    /// Reports that the deadline passed without an acknowledgement.
    pub(crate) fn give_up(self, where_: &str) {
        let message = format!("not acknowledged within the deadline ({where_})");
        self.finish(Err(GaveUp { message }));
    }

    fn report(&mut self, outcome: Result<pb::PublishResponse, GaveUp>) {
        let Some(reply) = self.reply.take() else {
            return;
        };
        let mut request = std::mem::take(&mut self.request);
        request.request_id = std::mem::take(&mut self.caller_request_id);
        let outcome = outcome.map_err(|g| match self.last_error.take() {
            Some(e) => GaveUp {
                message: format!("{}; last stream error: {e}", g.message),
            },
            None => g,
        });
        reply(Receipt {
            request,
            outcome,
            sends: self.sends,
            elapsed: self.published.elapsed(),
        });
    }
}

impl Drop for Item {
    /// A participation dropped unreported (the publisher was dropped) is reported as given up.
    fn drop(&mut self) {
        if self.reply.is_some() {
            self.report(Err(GaveUp {
                message: "the publisher stopped before an acknowledgement".into(),
            }));
        }
    }
}

/// The state every task of one publisher shares.
pub(crate) struct Shared {
    pub(crate) account: String,
    pub(crate) opts: PublisherOptions,
    /// `authorization: Bearer` of every call.
    pub(crate) bearer: Bearer,
    queue: Mutex<VecDeque<Item>>,
    wake: Notify,
    /// One permit per participation held (queued, in flight or being reported).
    pub(crate) capacity: Arc<Semaphore>,
    next_id: AtomicU64,
    next_send: AtomicU64,
    /// Cancelled when the publisher closes or is dropped: every task ends.
    pub(crate) stop: CancellationToken,
    /// Streams open right now.
    pub(crate) open_streams: watch::Sender<usize>,
    pub(crate) in_flight: AtomicUsize,
    pub(crate) resent: AtomicU64,
    pub(crate) stream_failures: AtomicU64,
    pub(crate) lanes: AtomicUsize,
    last_error: Mutex<Option<String>>,
    /// Why the last stream that could not open was refused for its token
    /// (`UNAUTHENTICATED`, `PERMISSION_DENIED` at the start of the call); cleared when a stream
    /// opens.
    pub(crate) token_refused: watch::Sender<Option<String>>,
}

impl Shared {
    pub(crate) fn new(account: String, opts: PublisherOptions, bearer: Bearer) -> Self {
        let capacity = Arc::new(Semaphore::new(opts.max_pending.max(1)));
        Self {
            account,
            opts,
            bearer,
            queue: Mutex::default(),
            wake: Notify::new(),
            capacity,
            next_id: AtomicU64::new(1),
            next_send: AtomicU64::new(1),
            stop: CancellationToken::new(),
            open_streams: watch::channel(0).0,
            in_flight: AtomicUsize::new(0),
            resent: AtomicU64::new(0),
            stream_failures: AtomicU64::new(0),
            lanes: AtomicUsize::new(0),
            last_error: Mutex::default(),
            token_refused: watch::channel(None).0,
        }
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Item>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes an item of `request`, holding `permit` until it is reported.
    pub(crate) fn item(
        &self,
        mut request: pb::PublishRequest,
        reply: Reply,
        permit: OwnedSemaphorePermit,
    ) -> Item {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if request.account.is_empty() {
            request.account.clone_from(&self.account);
        }
        let caller_request_id = std::mem::replace(&mut request.request_id, id.to_string());
        let now = Instant::now();
        Item {
            id,
            request,
            caller_request_id,
            published: now,
            deadline: now + self.opts.deadline,
            sends: 0,
            sent: 0,
            last_error: None,
            reply: Some(reply),
            _held: permit,
        }
    }

    /// The order number of a sending.
    pub(crate) fn next_send(&self) -> u64 {
        self.next_send.fetch_add(1, Ordering::Relaxed)
    }

    /// Queues a new participation.
    pub(crate) fn push(&self, item: Item) {
        self.queue().push_back(item);
        self.wake.notify_waiters();
    }

    /// Puts back, at the front and in their order, participations a stream did not
    /// acknowledge, so that they go out before anything newer.
    pub(crate) fn requeue(&self, mut items: Vec<Item>, error: &str) {
        if items.is_empty() {
            return;
        }
        items.sort_by_key(|i| i.id);
        self.resent.fetch_add(items.len() as u64, Ordering::Relaxed);
        let mut queue = self.queue();
        for mut item in items.into_iter().rev() {
            item.last_error = Some(error.to_owned());
            queue.push_front(item);
        }
        drop(queue);
        self.wake.notify_waiters();
    }

    /// The next participation to send, waiting for one; gives up expired ones on the way.
    /// Cancel-safe: an item is taken only when this returns.
    pub(crate) async fn next(&self) -> Item {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = Instant::now();
            let mut expired = Vec::new();
            let found = {
                let mut queue = self.queue();
                loop {
                    match queue.pop_front() {
                        Some(item) if item.expired(now) => expired.push(item),
                        other => break other,
                    }
                }
            };
            for item in expired {
                item.give_up("no worker took it");
            }
            if let Some(item) = found {
                return item;
            }
            notified.await;
        }
    }

    /// Gives up every queued participation whose deadline passed (while no stream is there to
    /// take them, `next` is not called).
    pub(crate) fn reap(&self) {
        let now = Instant::now();
        let expired: Vec<Item> = {
            let mut queue = self.queue();
            if !queue.iter().any(|i| i.expired(now)) {
                return;
            }
            let (expired, kept): (Vec<Item>, Vec<Item>) = std::mem::take(&mut *queue)
                .into_iter()
                .partition(|i| i.expired(now));
            *queue = kept.into();
            expired
        };
        for item in expired {
            item.give_up("no worker took it");
        }
    }

    /// Participations waiting for a stream.
    pub(crate) fn queued(&self) -> usize {
        self.queue().len()
    }

    /// Records why a stream could not be opened or failed, for [`super::Publisher::wait_connected`].
    pub(crate) fn set_last_error(&self, error: String) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(error);
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Sleeps `d` unless `stop` comes first; false when stopped.
pub(crate) async fn sleep_or(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = stop.cancelled() => false,
    }
}
