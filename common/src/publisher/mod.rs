//! A publisher of participations (DESIGN §3, "Acknowledgement contract"): keeps `Publish`
//! streams open to every worker it is given and holds each participation until a worker
//! acknowledges it, so that nothing is lost when a stream or a worker fails.
//!
//! - **Endpoints**: `http://host:port`, `https://host:port` (TLS, see [`TlsOptions`]),
//!   `host:port` or `dns:///host:port`; calls carry [`PublisherOptions::token`] (a `publisher`
//!   token of the account). A name is resolved to all its addresses (a Kubernetes headless service lists every ready worker) and each
//!   address gets its own stream (a *lane*); names are resolved again when a stream fails and
//!   every [`PublisherOptions::resolve_interval`], so new workers get streams and vanished ones
//!   are let go.
//! - **Balancing and redelivery**: participations wait in one queue; every lane takes from it
//!   while it has room in its window ([`PublisherOptions::window`] participations in flight, at
//!   most the workers' `--window`). A worker that is slow or gone takes nothing more, so the
//!   others get the work. When a stream fails (worker killed, drained with `UNAVAILABLE`,
//!   unreachable), what it did not acknowledge goes back to the front of the queue and another
//!   stream sends it again; the failed lane reconnects with a jittered backoff. Delivery is
//!   therefore at least once: duplicates are bounded by what was in flight on the streams that
//!   failed, and receivers de-duplicate on `webhook-id`.
//! - **Outcomes**: every participation is reported exactly once, with a [`Receipt`]: the
//!   worker's response (deliveries `DELIVERED`, `FAILED` or `SKIPPED`, or a per-message
//!   `error` for a malformed request: both final, never sent again), or [`GaveUp`] when no
//!   acknowledgement came within [`PublisherOptions::deadline`] of publishing.
//!   [`Receipt::republish`] gives the request to send later for what failed (`FAILED`
//!   deliveries with `only_integrations` set to them).
//! - **Memory**: at most [`PublisherOptions::max_pending`] participations are held; publishing
//!   waits beyond that.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use pushwire_common::publisher::{Publisher, PublisherOptions};
//! let publisher = Publisher::connect(
//!     &["dns:///pushwire-worker.pushwire.svc.cluster.local:50052"],
//!     "accounts/42",
//!     PublisherOptions::default(),
//! )?;
//! let receipt = publisher
//!     .publish(pushwire_common::pb::v1::PublishRequest {
//!         participation_json: r#"{"id":"p1","state":"COMPLETED","campaign":{"id":7}}"#.into(),
//!         ..Default::default()
//!     })
//!     .await
//!     .await;
//! println!("{:?}", receipt.status());
//! publisher.close().await;
//! # Ok(())
//! # }
//! ```

mod lane;
mod queue;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_stream::{Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;

pub use crate::target::{EndpointError, Target};

/// The worker's default gRPC port, used when an endpoint names none.
pub const DEFAULT_PORT: u16 = crate::target::WORKER_PORT;

use crate::auth::Bearer;
use crate::backoff::Backoff;
use crate::domain::{AccountName, Secret};
use crate::pb::v1 as pb;
use queue::{Shared, sleep_or};

/// Settings of a [`Publisher`].
#[derive(Clone, Debug)]
pub struct PublisherOptions {
    /// Participations in flight per stream; keep it at most the workers' `--window` (256 by
    /// default), beyond which they stop reading and the rest waits in HTTP/2 buffers.
    pub window: usize,
    /// Participations held at once (waiting for a stream, in flight, being reported);
    /// publishing waits beyond.
    pub max_pending: usize,
    /// Time from publishing after which a participation not acknowledged is given up
    /// ([`GaveUp`]). Leave room for the workers' `--retry-window` (15 min by default).
    pub deadline: Duration,
    /// Bound on connecting to a worker and on opening a stream.
    pub connect_timeout: Duration,
    /// First and longest wait before a failed lane opens a new stream.
    pub backoff: (Duration, Duration),
    /// How often names are resolved again to find new workers (also after a failure).
    pub resolve_interval: Duration,
    /// Sent as `authorization: Bearer <token>` on every call: a `publisher` (or `admin`)
    /// token of the accounts published for.
    pub token: Option<Secret>,
    /// For `https://` endpoints.
    pub tls: TlsOptions,
}

/// TLS to `https://` workers.
#[derive(Clone, Default)]
pub struct TlsOptions {
    /// PEM CA certificates to trust; the system's roots when `None`.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate chain and private key, for workers that require client
    /// certificates (mTLS).
    pub client_identity: Option<(Vec<u8>, Secret)>,
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<set>"))
            .field(
                "client_identity",
                &self.client_identity.as_ref().map(|_| "<set>"),
            )
            .finish()
    }
}

impl Default for PublisherOptions {
    fn default() -> Self {
        Self {
            window: 256,
            max_pending: 4096,
            deadline: Duration::from_secs(20 * 60),
            connect_timeout: Duration::from_secs(5),
            backoff: (Duration::from_millis(100), Duration::from_secs(5)),
            resolve_interval: Duration::from_secs(30),
            token: None,
            tls: TlsOptions::default(),
        }
    }
}

/// Why a publisher could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No endpoint was given.
    #[error("no worker endpoint given")]
    NoEndpoints,
    /// An endpoint is unusable.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The account is not `accounts/{id}`.
    #[error("account: {0}")]
    Account(String),
    /// The token cannot be sent.
    #[error("token: {0}")]
    Token(#[from] crate::auth::InvalidToken),
}

/// No acknowledgement within the deadline (or the publisher was dropped first): the
/// participation may or may not have been delivered; publish it again later.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct GaveUp {
    /// What happened, with the last stream error when there was one.
    pub message: String,
}

/// The final report on one participation.
#[derive(Debug)]
pub struct Receipt {
    /// The request as published (with its own `request_id`), to publish again if need be.
    pub request: pb::PublishRequest,
    /// The worker's acknowledgement, or why there was none.
    pub outcome: Result<pb::PublishResponse, GaveUp>,
    /// Streams it was written to: more than one when a stream failed before acknowledging it
    /// (it may then have been delivered more than once).
    pub sends: u32,
    /// Time from publishing to this report.
    pub elapsed: Duration,
}

/// What a [`Receipt`] says, in short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReceiptStatus {
    /// Acknowledged; every matched integration `DELIVERED` or `SKIPPED` (or none matched).
    Done,
    /// Acknowledged with at least one `FAILED` delivery: see [`Receipt::republish`].
    Failed,
    /// Refused as malformed (`error`); publishing it again would not help.
    Rejected,
    /// Not acknowledged within the deadline.
    GaveUp,
}

impl Receipt {
    /// What it says, in short.
    pub fn status(&self) -> ReceiptStatus {
        match &self.outcome {
            Err(_) => ReceiptStatus::GaveUp,
            Ok(r) if !r.error.is_empty() => ReceiptStatus::Rejected,
            Ok(_) if self.failed_deliveries().next().is_some() => ReceiptStatus::Failed,
            Ok(_) => ReceiptStatus::Done,
        }
    }

    /// The `FAILED` deliveries.
    pub fn failed_deliveries(&self) -> impl Iterator<Item = &pb::Delivery> {
        self.outcome
            .as_ref()
            .ok()
            .into_iter()
            .flat_map(|r| &r.deliveries)
            .filter(|d| d.outcome() == pb::DeliveryOutcome::Failed)
    }

    /// The participation's `id`: from the response, else read from the document (empty when
    /// it has none).
    pub fn participation_id(&self) -> String {
        match &self.outcome {
            Ok(r) if !r.participation_id.is_empty() => r.participation_id.clone(),
            _ => serde_json::from_str::<serde_json::Value>(&self.request.participation_json)
                .ok()
                .and_then(|v| v.get("id")?.as_str().map(str::to_owned))
                .unwrap_or_default(),
        }
    }

    /// The request to publish later for what did not get through: the same request
    /// restricted to the `FAILED` integrations (`only_integrations`), or unchanged when it
    /// was given up; `None` when done or rejected.
    pub fn republish(&self) -> Option<pb::PublishRequest> {
        match self.status() {
            ReceiptStatus::Done | ReceiptStatus::Rejected => None,
            ReceiptStatus::GaveUp => Some(self.request.clone()),
            ReceiptStatus::Failed => Some(pb::PublishRequest {
                only_integrations: self
                    .failed_deliveries()
                    .map(|d| d.integration.clone())
                    .collect(),
                ..self.request.clone()
            }),
        }
    }
}

/// A participation being published; resolves to its [`Receipt`].
#[derive(Debug)]
pub struct Pending(oneshot::Receiver<Receipt>);

impl Future for Pending {
    type Output = Receipt;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Receipt> {
        Pin::new(&mut self.0).poll(cx).map(|r| {
            // Every participation is reported, even when the publisher is dropped; this is
            // for a reply lost to a panic.
            r.unwrap_or_else(|_| Receipt {
                request: pb::PublishRequest::default(),
                outcome: Err(GaveUp {
                    message: "the publisher stopped before an acknowledgement".into(),
                }),
                sends: 0,
                elapsed: Duration::ZERO,
            })
        })
    }
}

/// What the publisher is doing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Worker addresses with a lane.
    pub lanes: usize,
    /// Streams open.
    pub open_streams: usize,
    /// Participations waiting for a stream.
    pub queued: usize,
    /// Participations sent and not acknowledged.
    pub in_flight: usize,
    /// Times a participation was taken back from a failed stream to be sent again.
    pub resent: u64,
    /// Streams that failed or could not be opened.
    pub stream_failures: u64,
}

/// Counts over many receipts ([`Publisher::publish_all`]).
#[derive(Debug, Default)]
pub struct Report {
    /// Receipts.
    pub receipts: u64,
    /// Participations [`ReceiptStatus::Done`].
    pub done: u64,
    /// Participations with a `FAILED` delivery.
    pub failed: u64,
    /// Participations refused as malformed.
    pub rejected: u64,
    /// Participations given up.
    pub gave_up: u64,
    /// Deliveries `DELIVERED`.
    pub delivered_deliveries: u64,
    /// Deliveries `FAILED`.
    pub failed_deliveries: u64,
    /// Deliveries `SKIPPED`.
    pub skipped_deliveries: u64,
    /// Deliveries `QUEUED`: handed to the worker's delivery store, which retries them; done as
    /// far as the publisher is concerned.
    pub queued_deliveries: u64,
    /// Participations written to more than one stream.
    pub resent: u64,
    /// Longest time from publishing to a receipt.
    pub max_latency: Duration,
    /// The receipts not [`ReceiptStatus::Done`].
    pub problems: Vec<Receipt>,
}

impl Report {
    /// Counts `receipt` in; keeps it when it is a problem.
    pub fn add(&mut self, receipt: Receipt) {
        self.receipts += 1;
        self.max_latency = self.max_latency.max(receipt.elapsed);
        if receipt.sends > 1 {
            self.resent += 1;
        }
        if let Ok(r) = &receipt.outcome {
            for d in &r.deliveries {
                match d.outcome() {
                    pb::DeliveryOutcome::Delivered => self.delivered_deliveries += 1,
                    pb::DeliveryOutcome::Failed => self.failed_deliveries += 1,
                    pb::DeliveryOutcome::Skipped => self.skipped_deliveries += 1,
                    pb::DeliveryOutcome::Queued => self.queued_deliveries += 1,
                    pb::DeliveryOutcome::Unspecified => {}
                }
            }
        }
        match receipt.status() {
            ReceiptStatus::Done => {
                self.done += 1;
                return;
            }
            ReceiptStatus::Failed => self.failed += 1,
            ReceiptStatus::Rejected => self.rejected += 1,
            ReceiptStatus::GaveUp => self.gave_up += 1,
        }
        self.problems.push(receipt);
    }

    /// Whether every participation is done.
    pub fn all_done(&self) -> bool {
        self.done == self.receipts
    }
}

/// Publishes participations to workers; see the [module documentation](self).
#[derive(Debug)]
pub struct Publisher {
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("account", &self.account)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher to the workers at `endpoints`, for `account` (`accounts/{id}`: the account
    /// of requests that name none; empty when every request names its own, a request naming
    /// none is then refused by the worker as a malformed message). Returns at once (call it inside a tokio runtime): streams
    /// are opened in the background, see [`Publisher::wait_connected`].
    pub fn connect<S: AsRef<str>>(
        endpoints: &[S],
        account: &str,
        opts: PublisherOptions,
    ) -> Result<Self, ConnectError> {
        if !account.is_empty() {
            AccountName::parse(account).map_err(|e| ConnectError::Account(e.to_string()))?;
        }
        let mut targets = Vec::new();
        for e in endpoints {
            let t = Target::parse(e.as_ref(), DEFAULT_PORT)?;
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
        if targets.is_empty() {
            return Err(ConnectError::NoEndpoints);
        }
        let bearer = match &opts.token {
            Some(t) => Bearer::new(t)?,
            None => Bearer::none(),
        };
        let shared = Arc::new(Shared::new(account.to_owned(), opts, bearer));
        let mut tasks = JoinSet::new();
        for t in targets {
            tasks.spawn(follow(shared.clone(), Arc::new(t)));
        }
        tasks.spawn(reap(shared.clone()));
        Ok(Self { shared, tasks })
    }

    /// Publishes one participation (an empty `account` is the publisher's), waiting while
    /// [`PublisherOptions::max_pending`] are held; `reply` gets its receipt, from a
    /// publisher task, once.
    pub async fn publish_with(
        &self,
        request: pb::PublishRequest,
        reply: impl FnOnce(Receipt) + Send + 'static,
    ) {
        let permit = self
            .shared
            .capacity
            .clone()
            .acquire_owned()
            .await
            .expect("the capacity semaphore is never closed");
        self.shared
            .push(self.shared.item(request, Box::new(reply), permit));
    }

    /// Publishes one participation; the returned future resolves to its receipt.
    pub async fn publish(&self, request: pb::PublishRequest) -> Pending {
        let (tx, rx) = oneshot::channel();
        self.publish_with(request, move |r| {
            let _ = tx.send(r);
        })
        .await;
        Pending(rx)
    }

    /// Publishes every request of `requests` and waits for all their receipts, calling
    /// `each` on every receipt as it comes; the counts and the problems.
    pub async fn publish_all(
        &self,
        requests: impl Stream<Item = pb::PublishRequest>,
        mut each: impl FnMut(&Receipt),
    ) -> Report {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut report = Report::default();
        let mut requests = std::pin::pin!(requests);
        let mut next: Option<pb::PublishRequest> = None;
        let mut input_done = false;
        let mut outstanding = 0u64;
        loop {
            // Every branch is cancel-safe: a request is taken from the stream only when it
            // can be kept in `next`, and published once a permit is in hand.
            tokio::select! {
                Some(receipt) = rx.recv(), if outstanding > 0 => {
                    outstanding -= 1;
                    each(&receipt);
                    report.add(receipt);
                }
                r = requests.next(), if next.is_none() && !input_done => match r {
                    Some(r) => next = Some(r),
                    None => input_done = true,
                },
                permit = self.shared.capacity.clone().acquire_owned(), if next.is_some() => {
                    let permit = permit.expect("the capacity semaphore is never closed");
                    let tx = tx.clone();
                    let request = next.take().expect("guarded by the branch condition");
                    self.shared.push(self.shared.item(
                        request,
                        Box::new(move |r| {
                            let _ = tx.send(r);
                        }),
                        permit,
                    ));
                    outstanding += 1;
                }
                else => break,
            }
        }
        report
    }

    /// Waits until a stream is open to some worker, at most `limit`; the last connection
    /// error otherwise. A refused token ends the wait at once, with an error that starts with
    /// `the token was refused` (see [`Publisher::token_refused`]).
    pub async fn wait_connected(&self, limit: Duration) -> Result<(), String> {
        let mut open = self.shared.open_streams.subscribe();
        let mut refused = self.shared.token_refused.subscribe();
        // True once a stream is open, false on a refused token.
        let connected = async {
            tokio::select! {
                r = open.wait_for(|n| *n > 0) => r.is_ok(),
                _ = refused.wait_for(Option::is_some) => false,
            }
        };
        match tokio::time::timeout(limit, connected).await {
            Ok(true) => Ok(()),
            _ => Err(self
                .token_refused()
                .map(|why| format!("the token was refused: {why}"))
                .or_else(|| self.shared.last_error())
                .unwrap_or_else(|| format!("no worker answered within {limit:?}"))),
        }
    }

    /// Why a worker refused the publisher's token (`UNAUTHENTICATED`: no token or one it does
    /// not know; `PERMISSION_DENIED`: not a `publisher` token) when no stream could open since;
    /// `None` once a stream is open. [`Publisher::wait_connected`] returns as soon as this is
    /// set: every worker reads the same token file, so waiting would not change the answer.
    pub fn token_refused(&self) -> Option<String> {
        self.shared.token_refused.borrow().clone()
    }

    /// What the publisher is doing.
    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        Stats {
            lanes: s.lanes.load(Ordering::Relaxed),
            open_streams: *s.open_streams.borrow(),
            queued: s.queued(),
            in_flight: s.in_flight.load(Ordering::Relaxed),
            resent: s.resent.load(Ordering::Relaxed),
            stream_failures: s.stream_failures.load(Ordering::Relaxed),
        }
    }

    /// Waits until every participation published is reported (each within its deadline),
    /// then closes the streams. Dropping the publisher instead stops at once and reports
    /// what it held as given up.
    pub async fn close(mut self) {
        let all = u32::try_from(self.shared.opts.max_pending.max(1)).unwrap_or(u32::MAX);
        let _all_reported = self.shared.capacity.acquire_many(all).await;
        self.shared.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

/// Gives up queued participations past their deadline, also while no stream takes any.
async fn reap(shared: Arc<Shared>) {
    while sleep_or(&shared.stop, Duration::from_millis(250)).await {
        shared.reap();
    }
}

/// Keeps one lane per address of `target`: resolves it now, again after a lane failed (at
/// most once a second) and every `resolve_interval`, starting lanes for new addresses and
/// retiring those of addresses gone. An address is never re-resolved.
async fn follow(shared: Arc<Shared>, target: Arc<Target>) {
    let failed = Arc::new(Notify::new());
    let mut lanes: HashMap<SocketAddr, CancellationToken> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut backoff = Backoff::new(Duration::from_millis(500), shared.opts.resolve_interval);
    loop {
        let resolved = tokio::select! {
            r = tokio::time::timeout(shared.opts.connect_timeout, target.resolve()) => r,
            () = shared.stop.cancelled() => break,
        };
        match resolved {
            Ok(Ok(addrs)) if !addrs.is_empty() => {
                backoff.reset();
                for addr in &addrs {
                    if !lanes.contains_key(addr) {
                        let retire = shared.stop.child_token();
                        lanes.insert(*addr, retire.clone());
                        tasks.spawn(lane::run(
                            shared.clone(),
                            target.clone(),
                            *addr,
                            retire,
                            failed.clone(),
                        ));
                    }
                }
                lanes.retain(|addr, retire| {
                    let keep = addrs.contains(addr);
                    if !keep {
                        tracing::info!(%target, %addr, "worker address gone; retiring its stream");
                        retire.cancel();
                    }
                    keep
                });
            }
            Ok(Ok(_)) => shared.set_last_error(format!("{target}: the name has no address")),
            Ok(Err(e)) => shared.set_last_error(format!("{target}: cannot resolve: {e}")),
            Err(_) => shared.set_last_error(format!("{target}: resolving timed out")),
        }
        if !target.is_name() && !lanes.is_empty() {
            // An address: nothing to resolve again.
            shared.stop.cancelled().await;
            break;
        }
        let wait = if lanes.is_empty() {
            backoff.next_delay()
        } else {
            shared.opts.resolve_interval
        };
        tokio::select! {
            () = shared.stop.cancelled() => break,
            () = failed.notified() => {
                if !sleep_or(&shared.stop, Duration::from_secs(1)).await {
                    break;
                }
            }
            () = tokio::time::sleep(wait) => {}
            // Retired lanes end once their worker answered for what they held.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests;
