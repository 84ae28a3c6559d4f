//! `pushwire.v1.IngestService` (DESIGN §3): parses each participation once, plans its
//! deliveries with the routing table of the moment ([`router::plan`]: which integrations get
//! it, which skip it and why), delivers it to every matched integration through the
//! [`Dispatcher`] and acknowledges it once every one of them has an outcome the publisher may
//! forget: final, or `QUEUED` (committed to the delivery store, which retries it).
//!
//! A Publish stream holds at most `window` participations in flight: when the window is full
//! the stream is not read, so HTTP/2 flow control pushes back on the publisher and memory stays
//! bounded. Responses come in completion order. A participation whose delivery is interrupted
//! (shutdown, the publisher went away) is never acknowledged: the stream then ends with
//! `UNAVAILABLE` and the publisher re-publishes what it holds.
//!
//! Every participation also holds its share of the worker-wide memory [`MemoryBudget`] from
//! the moment it is read until its acknowledgement is sent: a stream whose next participation
//! finds no room is not read until some is released (flow control again); a `PublishOne`
//! call waits at most [`PUBLISH_ONE_BUDGET_WAIT`], then gets `RESOURCE_EXHAUSTED`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesOrdered;
use pb::ingest_service_server::{IngestService, IngestServiceServer};
use pushwire_common::auth::{self, Action, Principal};
use pushwire_common::domain::matching::Placement;
use pushwire_common::domain::{AccountName, IntegrationName, convert};
use pushwire_common::participation::{self, Participation};
use pushwire_common::pb::v1 as pb;
use pushwire_common::server::telemetry;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::budget::{self, MemoryBudget};
use crate::deliver::dispatch::{Dispatcher, Job, Outcome};
use crate::metrics::{Metrics, OutcomeLabel, ResultLabel};
use crate::router::{self, Decision, RoutingTable, RoutingView};
use pushwire_common::webhook::traceparent::TraceParent;

/// Room for the request's fields around the document in one gRPC message.
const ENVELOPE_BYTES: usize = 64 * 1024;

/// How long a `PublishOne` call waits for room on the memory budget before it is refused.
pub const PUBLISH_ONE_BUDGET_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Settings of the ingest service.
#[derive(Clone, Copy, Debug)]
pub struct IngestOptions {
    /// Participations in flight per Publish stream.
    pub window: usize,
    /// Largest participation document accepted, in bytes.
    pub max_participation_bytes: usize,
    /// Bytes of participations held in memory by all streams and calls together.
    pub memory_budget: u64,
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            window: 256,
            max_participation_bytes: participation::DEFAULT_MAX_BYTES,
            memory_budget: budget::DEFAULT_BUDGET.bytes(),
        }
    }
}

/// The ingest service; cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    table: watch::Receiver<Option<Arc<RoutingTable>>>,
    dispatcher: Dispatcher,
    opts: IngestOptions,
    budget: MemoryBudget,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

/// Why a request was refused before any delivery; goes to `PublishResponse.error`.
struct Rejection(String);

/// A request that passed [`Ingest::check`].
struct Checked {
    account: AccountName,
    participation: Participation,
    /// `master_form_id` in canonical form (as push scopes and `ResolvePushes` hold it).
    master_form_id: Option<String>,
    only: Option<Vec<IntegrationName>>,
}

impl Ingest {
    /// The worker-wide memory budget (retries from the store take their share of it too).
    pub fn budget(&self) -> MemoryBudget {
        self.budget.clone()
    }

    /// The service routing on `table` and delivering with `dispatcher`. After `shutdown`,
    /// streams stop reading and end with `UNAVAILABLE` once their deliveries are settled.
    pub fn new(
        table: watch::Receiver<Option<Arc<RoutingTable>>>,
        dispatcher: Dispatcher,
        opts: IngestOptions,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            table,
            dispatcher,
            opts,
            budget: MemoryBudget::new(opts.memory_budget, &metrics),
            metrics,
            shutdown,
        }
    }

    /// The gRPC service, accepting messages as large as the largest document allowed.
    pub fn into_service(self) -> IngestServiceServer<Self> {
        let max = self
            .opts
            .max_participation_bytes
            .saturating_add(ENVELOPE_BYTES);
        IngestServiceServer::new(self).max_decoding_message_size(max)
    }

    /// The routing table, or `UNAVAILABLE` before the first snapshot.
    fn ready_table(&self) -> Result<Arc<RoutingTable>, Status> {
        if self.shutdown.is_cancelled() {
            return Err(Status::unavailable("worker is shutting down"));
        }
        self.table.borrow().clone().ok_or_else(|| {
            Status::unavailable("worker has no configuration from the control plane yet")
        })
    }

    /// Handles one request to its acknowledgement; `None` when a delivery was interrupted
    /// (not to be acknowledged).
    async fn handle(&self, req: pb::PublishRequest) -> Option<pb::PublishResponse> {
        // The participation's own trace: the publisher's, else the call's (PublishOne).
        let span = tracing::info_span!(
            "publish",
            pushwire.participation.id = tracing::field::Empty,
            pushwire.account = tracing::field::Empty,
            pushwire.deliveries = tracing::field::Empty,
            error.type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        if let Some(t) = &req.trace_context {
            telemetry::set_remote_parent(&span, &t.traceparent, &t.tracestate);
        }
        self.handle_in(req, &span).instrument(span.clone()).await
    }

    async fn handle_in(
        &self,
        req: pb::PublishRequest,
        span: &tracing::Span,
    ) -> Option<pb::PublishResponse> {
        let request_id = req.request_id.clone();
        let response = match self.check(&req) {
            Err(Rejection(error)) => {
                span.record("error.type", "invalid_request");
                telemetry::set_error(span);
                tracing::info!(error = %error, "participation refused");
                self.count("rejected");
                pb::PublishResponse {
                    participation_id: String::new(),
                    error,
                    deliveries: Vec::new(),
                    request_id,
                }
            }
            Ok(checked) => {
                let _in_flight = Held::on(&self.metrics.in_flight);
                let participation_id = checked.participation.id.clone();
                span.record("pushwire.participation.id", participation_id.as_str());
                span.record("pushwire.account", checked.account.to_string());
                let deliveries = self.deliver(req, checked).await;
                let Some(deliveries) = deliveries else {
                    span.record("error.type", "interrupted");
                    telemetry::set_error(span);
                    self.count("interrupted");
                    return None;
                };
                span.record(
                    "pushwire.deliveries",
                    i64::try_from(deliveries.len()).unwrap_or(i64::MAX),
                );
                self.count("acknowledged");
                pb::PublishResponse {
                    participation_id,
                    error: String::new(),
                    deliveries,
                    request_id,
                }
            }
        };
        Some(response)
    }

    fn count(&self, result: &'static str) {
        self.metrics
            .participations
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Validates a request: the account, the document, `master_form_id`, `only_integrations`.
    fn check(&self, req: &pb::PublishRequest) -> Result<Checked, Rejection> {
        let account =
            AccountName::parse(&req.account).map_err(|e| Rejection(format!("account: {e}")))?;
        let participation =
            participation::parse(&req.participation_json, self.opts.max_participation_bytes)
                .map_err(|e| Rejection(format!("participation_json: {e}")))?;
        // Canonical like scope targets and ResolvePushes' ids: `077` is master form 77.
        let master_form_id = match req.master_form_id.as_str() {
            "" => None,
            id => {
                convert::validate_target_id("master_form_id", id)
                    .map_err(|e| Rejection(e.to_string()))?;
                Some(convert::canonical_target_id(id))
            }
        };
        let only = if req.only_integrations.is_empty() {
            None
        } else {
            let mut names = Vec::with_capacity(req.only_integrations.len());
            for (i, raw) in req.only_integrations.iter().enumerate() {
                let name = IntegrationName::parse(raw)
                    .map_err(|e| Rejection(format!("only_integrations[{i}]: {e}")))?;
                if name.account() != &account {
                    return Err(Rejection(format!(
                        "only_integrations[{i}]: not an integration of {account}"
                    )));
                }
                names.push(name);
            }
            Some(names)
        };
        Ok(Checked {
            account,
            participation,
            master_form_id,
            only,
        })
    }

    /// Plans the deliveries ([`router::plan`]) and carries the plan out: the final outcome of
    /// every planned integration, sent or skipped, or `None` when one was interrupted.
    async fn deliver(
        &self,
        req: pb::PublishRequest,
        checked: Checked,
    ) -> Option<Vec<pb::Delivery>> {
        let Checked {
            account,
            participation: mut p,
            master_form_id,
            only,
        } = checked;
        // Only validation needed the parsed tree (a `variables` body is built from the raw
        // bytes): dropped here, it is not kept while deliveries wait for retries (13.5 KiB of
        // the 23 KiB a waiting 2 KiB participation held).
        p.document = serde_json::Value::Null;
        let table = self.table.borrow().clone().unwrap_or_default();
        let view = RoutingView {
            account: &account,
            placement: Placement {
                website_id: p.website_id.as_deref(),
                master_form_id: master_form_id.as_deref(),
                campaign_id: &p.campaign_id,
                identified: req.identified.unwrap_or(p.has_form_responses),
            },
            state: &p.state,
            complete: p.is_complete(),
        };
        let plan =
            tracing::info_span!("route", pushwire.routes = tracing::field::Empty).in_scope(|| {
                let plan = router::plan(&table, &view, only.as_deref());
                tracing::Span::current().record(
                    "pushwire.routes",
                    i64::try_from(plan.routed()).unwrap_or(i64::MAX),
                );
                plan
            });
        let started = Instant::now();
        let parent = req
            .trace_context
            .as_ref()
            .and_then(|t| TraceParent::parse(&t.traceparent));
        // Forwarded only within the publisher's trace: a new trace starts without state.
        let tracestate = parent
            .and(req.trace_context.as_ref())
            .map(|t| t.tracestate.clone())
            .unwrap_or_default();
        let participation_id: Arc<str> = Arc::from(p.id.as_str());
        let campaign_id: Arc<str> = Arc::from(p.campaign_id.as_str());
        let website_id: Option<Arc<str>> = p.website_id.as_deref().map(Arc::from);
        let body = Bytes::from(req.participation_json);

        let work = plan.decisions.into_iter().map(|decision| {
            let integration = decision.route().integration.clone();
            let job = Job {
                integration: integration.clone(),
                participation_id: participation_id.clone(),
                body: body.clone(),
                traceparent: Some(TraceParent::child_of(parent.as_ref()).to_string()),
                tracestate: tracestate.clone(),
                campaign_id: campaign_id.clone(),
                website_id: website_id.clone(),
            };
            let span = tracing::info_span!(
                "deliver",
                pushwire.integration = %integration.name,
                pushwire.outcome = tracing::field::Empty,
                pushwire.attempts = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            );
            async move {
                let outcome = match decision {
                    Decision::Send(_) => self.dispatcher.deliver(job).await,
                    Decision::Skip { reason, .. } => {
                        self.dispatcher.skip(job, reason.to_string()).await
                    }
                };
                let span = tracing::Span::current();
                span.record("pushwire.outcome", label(&outcome));
                if let Outcome::Delivered { attempts, .. }
                | Outcome::Failed { attempts, .. }
                | Outcome::Queued { attempts, .. } = &outcome
                {
                    span.record("pushwire.attempts", i64::from(*attempts));
                }
                if let Outcome::Failed { .. } | Outcome::Interrupted = &outcome {
                    telemetry::set_error(&span);
                }
                if let Outcome::Delivered { .. } = &outcome {
                    self.metrics
                        .delivery_latency
                        .observe(started.elapsed().as_secs_f64());
                }
                (integration.name.to_string(), outcome)
            }
            .instrument(span)
        });
        // Polls only the deliveries that were woken (join_all polls all, entering each span).
        let outcomes: Vec<_> = work.collect::<FuturesOrdered<_>>().collect().await;

        let mut deliveries = Vec::with_capacity(outcomes.len());
        let mut interrupted = false;
        for (integration, outcome) in outcomes {
            let label = label(&outcome);
            self.metrics
                .deliveries
                .get_or_create(&OutcomeLabel { outcome: label })
                .inc();
            tracing::debug!(participation = %participation_id, %integration, outcome = label, "delivery settled");
            match to_pb(integration, outcome) {
                Some(d) => deliveries.push(d),
                None => interrupted = true,
            }
        }
        (!interrupted).then_some(deliveries)
    }

    /// Reads a Publish stream, delivering each request in its own task, at most `window` at a
    /// time and within the memory budget, sending responses on `out` as they complete. A
    /// request for an account `who` may not use ends the stream with `PERMISSION_DENIED`, once
    /// what is in flight is settled.
    async fn drive(
        self,
        who: Arc<Principal>,
        mut inbound: Streaming<pb::PublishRequest>,
        out: mpsc::Sender<Result<pb::PublishResponse, Status>>,
    ) {
        let window = Arc::new(Semaphore::new(self.opts.window));
        let mut tasks = JoinSet::new();
        let mut unacked = false;
        let _stream = Held::on(&self.metrics.streams);
        let end: Option<Status> = loop {
            let permit = tokio::select! {
                p = window.clone().acquire_owned() => p.expect("the window is never closed"),
                () = out.closed() => break None,
                () = self.shutdown.cancelled() => break Some(shutting_down()),
            };
            let next = tokio::select! {
                m = inbound.message() => m,
                () = out.closed() => break None,
                () = self.shutdown.cancelled() => break Some(shutting_down()),
            };
            match next {
                Ok(Some(req)) => {
                    if let Err(status) = permitted(&who, &req) {
                        break Some(status);
                    }
                    // Nothing more is read until the budget has room for this one.
                    let share = MemoryBudget::share(req.participation_json.len());
                    let charge = tokio::select! {
                        c = self.budget.acquire(share) => c,
                        () = out.closed() => break None,
                        () = self.shutdown.cancelled() => break Some(shutting_down()),
                    };
                    let this = self.clone();
                    let out = out.clone();
                    tasks.spawn(async move {
                        let response = this.handle(req).await;
                        let acked = response.is_some();
                        if let Some(r) = response {
                            let _ = out.send(Ok(r)).await;
                        }
                        drop((permit, charge));
                        acked
                    });
                }
                // The publisher closed its side: finish what is in flight.
                Ok(None) => break None,
                // Nothing more can be read: the publisher reset the stream, or sent a message
                // that does not decode (over the size limit, say). A publisher that went away
                // has closed `out` (what is in flight is then dropped, below); one that is still
                // there gets the acknowledgements of what is in flight, then this status, so it
                // learns why instead of seeing its stream cut.
                Err(status) => {
                    tracing::debug!(code = ?status.code(), "publish stream broke");
                    if out.is_closed() {
                        tasks.abort_all();
                        break None;
                    }
                    break Some(status);
                }
            }
            while let Some(done) = tasks.try_join_next() {
                unacked |= !done.unwrap_or(false);
            }
        };
        // Deliveries settle by themselves: on shutdown the dispatcher interrupts what waits.
        tokio::select! {
            () = async {
                while let Some(done) = tasks.join_next().await {
                    unacked |= !done.unwrap_or(false);
                }
            } => {}
            () = out.closed() => tasks.abort_all(),
        }
        if let Some(status) = end {
            let _ = out.send(Err(status)).await;
        } else if unacked {
            let _ = out.send(Err(shutting_down())).await;
        }
    }
}

/// Whether `who` may publish `req`: to an account of its token. An account that does not
/// parse is left to [`Ingest::check`], which refuses it in the response.
fn permitted(who: &Principal, req: &pb::PublishRequest) -> Result<(), Status> {
    match AccountName::parse(&req.account) {
        Ok(account) => Ok(who.account(&account)?),
        Err(_) => Ok(()),
    }
}

/// The refusal of a `PublishOne` call that found no room on the memory budget.
/// With the standard details: `RetryInfo` (try again in about the time waited) and
/// `QuotaFailure` naming the flag.
fn at_budget() -> Status {
    use tonic_types::{QuotaFailure, RetryInfo, StatusExt as _};
    Status::with_error_details_vec(
        tonic::Code::ResourceExhausted,
        format!(
            "worker is at its memory budget (--memory-budget): no room for this participation \
             within {PUBLISH_ONE_BUDGET_WAIT:?}; retry later with backoff, or publish on a \
             Publish stream, which waits for room instead"
        ),
        [
            RetryInfo::new(Some(PUBLISH_ONE_BUDGET_WAIT)).into(),
            QuotaFailure::with_violation(
                "--memory-budget",
                "bytes of participations held by this worker, all streams and calls together",
            )
            .into(),
        ],
    )
}

fn shutting_down() -> Status {
    Status::unavailable(
        "worker is shutting down; re-publish the participations not acknowledged on this stream",
    )
}

/// Counts one more on a gauge while alive (a participation in flight, an open stream).
struct Held(prometheus_client::metrics::gauge::Gauge);

impl Held {
    fn on(gauge: &prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The metric label and span value of an outcome.
fn label(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Delivered { .. } => "delivered",
        Outcome::Failed { .. } => "failed",
        Outcome::Skipped { .. } => "skipped",
        Outcome::Queued { .. } => "queued",
        Outcome::Interrupted => "interrupted",
    }
}

/// The protobuf form of an outcome; `None` for an interrupted one.
fn to_pb(integration: String, outcome: Outcome) -> Option<pb::Delivery> {
    let mut d = pb::Delivery {
        integration,
        ..Default::default()
    };
    match outcome {
        Outcome::Delivered { attempts, status } => {
            d.set_outcome(pb::DeliveryOutcome::Delivered);
            d.attempts = i32::try_from(attempts).unwrap_or(i32::MAX);
            d.last_status_code = i32::from(status);
        }
        Outcome::Failed {
            attempts,
            last_status,
            last_error,
        } => {
            d.set_outcome(pb::DeliveryOutcome::Failed);
            d.attempts = i32::try_from(attempts).unwrap_or(i32::MAX);
            d.last_status_code = last_status.map(i32::from).unwrap_or(0);
            d.last_error = last_error;
        }
        Outcome::Skipped { reason } => {
            d.set_outcome(pb::DeliveryOutcome::Skipped);
            d.skip_reason = reason;
        }
        Outcome::Queued {
            attempts,
            last_status,
            last_error,
            next_attempt,
        } => {
            d.set_outcome(pb::DeliveryOutcome::Queued);
            d.attempts = i32::try_from(attempts).unwrap_or(i32::MAX);
            d.last_status_code = last_status.map(i32::from).unwrap_or(0);
            d.last_error = last_error;
            d.next_attempt_time = Some(prost_types::Timestamp::from(next_attempt));
        }
        Outcome::Interrupted => return None,
    }
    Some(d)
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::PublishResponse, Status>> + Send>>;

#[tonic::async_trait]
impl IngestService for Ingest {
    type PublishStream = ResponseStream;

    async fn publish(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        let who = auth::authorize(&request, Action::Publish)?;
        self.ready_table()?;
        let (tx, rx) = mpsc::channel(self.opts.window);
        tokio::spawn(self.clone().drive(who, request.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn publish_one(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let who = auth::authorize(&request, Action::Publish)?;
        permitted(&who, request.get_ref())?;
        self.ready_table()?;
        let req = request.into_inner();
        let share = MemoryBudget::share(req.participation_json.len());
        let Some(_charge) = self
            .budget
            .acquire_within(share, PUBLISH_ONE_BUDGET_WAIT)
            .await
        else {
            self.metrics.memory_budget_refusals.inc();
            return Err(at_budget());
        };
        // A caller that hangs up drops this future and with it the deliveries: nobody is left
        // to take the acknowledgement, and the publisher re-publishes.
        match self.handle(req).await {
            Some(response) => Ok(Response::new(response)),
            None => Err(shutting_down()),
        }
    }
}
