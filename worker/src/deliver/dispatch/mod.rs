//! Delivery of one participation to one integration (DESIGN §3, §4): ONE first attempt in
//! memory through the integration's [`Lane`] and circuit breaker; a retryable failure, an open
//! breaker or a saturated lane hands the delivery off to the delivery store ([`Handoff`]), which
//! owns its retries from then on ([`Dispatcher::retry`] makes each one, claimed by
//! `deliver::retries`, through the same lanes after the first attempts). Reads the newest
//! configuration of the integration before every attempt, so URL and secret changes apply to
//! retries too. Knows nothing of gRPC.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use pushwire_common::delivery_store::{
    self as ds, Attempt, ClaimedDelivery, DeliveryKey, FinishResult, NewDelivery, TraceContext,
};
use pushwire_common::domain::{Integration, IntegrationName};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use pushwire_common::server::telemetry;
use pushwire_common::webhook::client::{AttemptError, HttpResponse, WebhookClient};
use pushwire_common::webhook::request;
use tracing::Instrument as _;

// `LaneStats` is defined by the metrics it feeds (so `metrics` imports nothing from here);
// re-exported where the dispatcher's users have always found it.
pub use crate::metrics::LaneStats;
use crate::metrics::{Metrics, OutcomeLabel, ReasonLabel, StatusClassLabel};

use super::breaker::{Admission, Breaker, BreakerOptions};
use super::lane::{Lane, LanePermit, Priority};
use super::retry::{self, RetryPolicy, Verdict};
use super::store::{Handoff, HandoffError, OutcomeLog, StoreHandle};

/// Settings of the [`Dispatcher`].
#[derive(Clone, Debug)]
pub struct DispatchOptions {
    /// Retry schedule and window.
    pub retry: RetryPolicy,
    /// Attempts in flight per integration.
    pub concurrency: usize,
    /// Consecutive failures that open an integration's circuit breaker.
    pub breaker_threshold: u32,
    /// Longest wait of a first attempt for a slot in its lane; past it, or when the lane's
    /// recent hold times say the wait would be longer, the delivery is handed off as
    /// saturated.
    pub slot_wait: Duration,
}

/// Default [`DispatchOptions::slot_wait`].
pub const DEFAULT_SLOT_WAIT: Duration = Duration::from_secs(1);

impl Default for DispatchOptions {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            concurrency: 32,
            breaker_threshold: 10,
            slot_wait: DEFAULT_SLOT_WAIT,
        }
    }
}

/// One participation for one integration.
#[derive(Clone, Debug)]
pub struct Job {
    /// The integration as routed (its newest version is looked up before each attempt).
    pub integration: Arc<Integration>,
    /// The participation's `id`.
    pub participation_id: Arc<str>,
    /// The body to send, exactly.
    pub body: Bytes,
    /// `traceparent` to send.
    pub traceparent: Option<String>,
    /// The publisher's `tracestate`, forwarded with a `traceparent` of its trace (empty: none).
    pub tracestate: String,
    /// `$.campaign.id` of the participation (stored with a hand-off).
    pub campaign_id: Arc<str>,
    /// `$.campaign.channel.website.id`, if any (stored with a hand-off).
    pub website_id: Option<Arc<str>>,
}

/// The final outcome of a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer.
    Delivered {
        /// Attempts made.
        attempts: u32,
        /// The 2xx status.
        status: u16,
    },
    /// Refused, or retries ran out.
    Failed {
        /// Attempts made.
        attempts: u32,
        /// Status of the last answer, if any.
        last_status: Option<u16>,
        /// Why the last attempt failed.
        last_error: String,
    },
    /// Not attempted (the integration went away or was disabled meanwhile).
    Skipped {
        /// Why.
        reason: String,
    },
    /// Handed off: committed to the delivery store, which retries it from now on.
    Queued {
        /// Attempts made (0 when the breaker was open or the lane saturated).
        attempts: u32,
        /// Status of the last answer, if any.
        last_status: Option<u16>,
        /// Why the last attempt failed (empty without an attempt).
        last_error: String,
        /// When the store's next attempt is due.
        next_attempt: SystemTime,
    },
    /// The worker is shutting down before a final outcome: not to be acknowledged.
    Interrupted,
}

/// Where the newest configuration of an integration comes from.
pub trait IntegrationSource: Send + Sync + 'static {
    /// The newest version, or `None` when it was deleted.
    fn current(&self, name: &IntegrationName) -> Option<Arc<Integration>>;
}

/// A request to disable an integration after `410 Gone`.
#[derive(Clone, Debug)]
pub struct DisableRequest {
    /// The integration.
    pub integration: IntegrationName,
    /// The reason to record.
    pub reason: String,
    /// Revision of the integration that answered 410: the update is made only if the
    /// integration did not change since (an admin's fix wins).
    pub revision: i64,
}

struct LaneEntry {
    lane: Arc<Lane>,
    breaker: Arc<Mutex<Breaker>>,
}

/// Size below which the lane map is never swept.
const MIN_SWEEP: usize = 64;

#[derive(Default)]
struct Lanes {
    map: HashMap<IntegrationName, Arc<LaneEntry>>,
    /// Size at which the next new lane sweeps out idle lanes of deleted integrations: twice the
    /// size left by the last sweep, so sweeping costs O(1) per new lane however many
    /// integrations there are, and the map stays within twice the live lanes.
    sweep_at: usize,
}

/// Delivers jobs; cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    client: WebhookClient,
    opts: Arc<DispatchOptions>,
    breaker: Arc<BreakerOptions>,
    source: Arc<dyn IntegrationSource>,
    lanes: Arc<Mutex<Lanes>>,
    disable: mpsc::Sender<DisableRequest>,
    handoff: Handoff,
    log: Option<OutcomeLog>,
    shutdown: CancellationToken,
    metrics: Option<Arc<Metrics>>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl Dispatcher {
    /// A dispatcher sending with `client`, handing retries off with `handoff`; 410 answers are
    /// reported on `disable`.
    pub fn new(
        client: WebhookClient,
        opts: DispatchOptions,
        source: Arc<dyn IntegrationSource>,
        disable: mpsc::Sender<DisableRequest>,
        handoff: Handoff,
        shutdown: CancellationToken,
    ) -> Self {
        let breaker = BreakerOptions {
            failure_threshold: opts.breaker_threshold,
            ..BreakerOptions::default()
        };
        Self {
            client,
            opts: Arc::new(opts),
            breaker: Arc::new(breaker),
            source,
            lanes: Arc::default(),
            disable,
            handoff,
            log: None,
            shutdown,
            metrics: None,
        }
    }

    /// Replaces the circuit breaker settings (threshold included: it overrides
    /// [`DispatchOptions::breaker_threshold`]), e.g. for shorter cool-downs in tests. Applies to
    /// breakers created afterwards, so call it before the first delivery.
    #[must_use]
    pub fn with_breaker_options(mut self, opts: BreakerOptions) -> Self {
        self.breaker = Arc::new(opts);
        self
    }

    /// Records the final outcomes of first attempts (delivered, failed, skipped) in the
    /// delivery log.
    #[must_use]
    pub fn with_outcome_log(mut self, log: OutcomeLog) -> Self {
        self.log = Some(log);
        self
    }

    /// Counts attempts and their latency into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn lane(&self, name: &IntegrationName) -> Arc<LaneEntry> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = lanes.map.get(name) {
            return Arc::clone(entry);
        }
        // Lanes of deleted integrations are dropped once idle, so the map stays bounded by
        // the configuration. Only when a new lane makes the map reach `sweep_at`: sweeping on
        // every call once past 64 lanes cost every delivery a scan of all integrations under
        // this lock.
        if lanes.map.len() >= lanes.sweep_at.max(MIN_SWEEP) {
            lanes.map.retain(|n, e| {
                Arc::strong_count(e) > 1
                    || e.lane.in_flight() > 0
                    || self.source.current(n).is_some()
            });
            lanes.sweep_at = lanes.map.len().saturating_mul(2).max(MIN_SWEEP);
        }
        lanes
            .map
            .entry(name.clone())
            .or_insert_with(|| {
                Arc::new(LaneEntry {
                    lane: Lane::new(self.opts.concurrency),
                    breaker: Arc::new(Mutex::new(Breaker::with_options((*self.breaker).clone()))),
                })
            })
            .clone()
    }

    /// When the deliveries this worker queued fall due.
    pub fn due_times(&self) -> Arc<super::due::DueTimes> {
        Arc::clone(self.handoff.due_times())
    }

    /// The retry settings.
    pub fn options(&self) -> &DispatchOptions {
        &self.opts
    }

    /// Integrations whose circuit breaker is open now (not to be claimed for).
    pub fn open_breakers(&self) -> Vec<IntegrationName> {
        let lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        lanes
            .map
            .iter()
            .filter(|(_, e)| {
                e.breaker
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_rejecting(now)
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Per-integration counts of the lanes in use.
    pub fn stats(&self) -> Vec<LaneStats> {
        let lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        lanes
            .map
            .iter()
            .map(|(name, e)| LaneStats {
                integration: name.clone(),
                in_flight: e.lane.in_flight(),
                queued: e.lane.queued(),
                breaker_open: !matches!(
                    e.breaker.lock().unwrap_or_else(|e| e.into_inner()).state(),
                    super::breaker::BreakerState::Closed
                ),
            })
            .collect()
    }

    /// Delivers `job`: one attempt, and what it means. A retryable failure, an open breaker or
    /// a saturated lane hands the delivery off to the store and answers `Queued` once it is
    /// committed; without retries (an empty schedule) those end as `Failed`.
    pub async fn deliver(&self, job: Job) -> Outcome {
        let (outcome, attempt) = self.first_attempt(&job).await;
        if let Some(log) = &self.log
            && matches!(
                outcome,
                Outcome::Delivered { .. } | Outcome::Failed { .. } | Outcome::Skipped { .. }
            )
        {
            log.record(self.log_entry(&job, &outcome, attempt)).await;
        }
        outcome
    }

    /// A routing skip (an incomplete participation for an integration that takes completed
    /// ones only): nothing is sent, and the delivery log records the skip with its reason.
    pub async fn skip(&self, job: Job, reason: String) -> Outcome {
        let outcome = Outcome::Skipped { reason };
        if let Some(log) = &self.log {
            log.record(self.log_entry(&job, &outcome, None)).await;
        }
        outcome
    }

    /// The delivery-log row of a final first-attempt outcome.
    fn log_entry(&self, job: &Job, outcome: &Outcome, attempt: Option<Attempt>) -> NewDelivery {
        NewDelivery {
            key: DeliveryKey::new(
                job.integration.name.clone(),
                job.participation_id.to_string(),
            ),
            campaign_id: job.campaign_id.to_string(),
            website_id: job.website_id.as_deref().map(str::to_owned),
            trace: job.traceparent.clone().map(|traceparent| TraceContext {
                traceparent,
                tracestate: job.tracestate.clone(),
            }),
            outcome: match outcome {
                Outcome::Delivered { .. } => ds::Outcome::Delivered,
                Outcome::Skipped { reason } => ds::Outcome::Skipped {
                    reason: reason.clone(),
                },
                _ => ds::Outcome::Failed,
            },
            attempts: attempt.into_iter().collect(),
            body: Some(job.body.clone()),
        }
    }

    /// [`Dispatcher::deliver`] without the log: the outcome, and the attempt when it is final
    /// after one.
    async fn first_attempt(&self, job: &Job) -> (Outcome, Option<Attempt>) {
        if self.shutdown.is_cancelled() {
            return (Outcome::Interrupted, None);
        }
        if let Err(why) = self.sendable(&job.integration.name) {
            let reason = why.to_owned();
            return (Outcome::Skipped { reason }, None);
        }
        let entry = self.lane(&job.integration.name);
        let permit = match self.first_slot(&entry).await {
            Slot::Got(permit) => permit,
            Slot::Saturated => return (self.hand_off(job, Handed::saturated()).await, None),
            Slot::Interrupted => return (Outcome::Interrupted, None),
        };
        // Read again: the wait for a slot may have been long.
        let integration = match self.sendable(&job.integration.name) {
            Ok(integration) => integration,
            Err(why) => {
                let reason = why.to_owned();
                return (Outcome::Skipped { reason }, None);
            }
        };
        let Some(probe) = admit(&entry) else {
            drop(permit);
            return (self.hand_off(job, Handed::breaker()).await, None);
        };
        let span = attempt_span(&job.participation_id, &integration, 1);
        let traceparent = telemetry::traceparent_of(&span).or_else(|| job.traceparent.clone());
        let Some(made) = self
            .attempt(
                &integration,
                &job.participation_id,
                job.body.clone(),
                (traceparent.as_deref(), &job.tracestate),
                span,
                permit,
            )
            .await
        else {
            return (Outcome::Interrupted, None);
        };
        record_health(&entry, &made, probe);
        let outcome = match made.verdict {
            Verdict::Delivered => Outcome::Delivered {
                attempts: 1,
                status: made.record.status_code.unwrap_or_default(),
            },
            Verdict::Final => made.failed(1),
            Verdict::Gone => {
                self.request_disable(&integration.name, integration.revision);
                made.failed(1)
            }
            Verdict::Retry => {
                let delay =
                    retry::next_delay(&self.opts.retry, 1, made.retry_after, rand::random::<f64>());
                match delay.filter(|d| *d <= self.opts.retry.window) {
                    None => made.failed(1),
                    Some(delay) => {
                        let handed = Handed {
                            reason: "failure",
                            delay,
                            attempt: Some(made),
                        };
                        return (self.hand_off(job, handed).await, None);
                    }
                }
            }
        };
        (outcome, Some(made.record))
    }

    /// A slot for a first attempt: at once, or within [`DispatchOptions::slot_wait`] unless
    /// the lane expects a longer wait (then saturated at once: a slow endpoint's participations
    /// leave their streams' windows instead of waiting there). A fast endpoint's queue may be
    /// long: it drains in milliseconds, and handing it off would cost a store write each.
    async fn first_slot(&self, entry: &LaneEntry) -> Slot {
        if let Some(permit) = entry.lane.try_acquire() {
            return Slot::Got(permit);
        }
        if entry.lane.expected_wait(Priority::First) > self.opts.slot_wait {
            return Slot::Saturated;
        }
        tokio::select! {
            biased;
            () = self.shutdown.cancelled() => Slot::Interrupted,
            permit = entry.lane.acquire(Priority::First) => Slot::Got(permit),
            () = tokio::time::sleep(self.opts.slot_wait) => Slot::Saturated,
        }
    }

    /// Hands `job` off to the store, due after `handed.delay`, and answers `Queued` once it is
    /// committed.
    async fn hand_off(&self, job: &Job, handed: Handed) -> Outcome {
        let (attempts, last_status, last_error) = match &handed.attempt {
            Some(made) => (1, made.record.status_code, made.error.clone()),
            None => (0, None, String::new()),
        };
        let Some(delay) = (if handed.attempt.is_some() {
            Some(handed.delay)
        } else {
            // No attempt: due after the schedule's first step.
            retry::next_delay(&self.opts.retry, 1, None, rand::random::<f64>())
        }) else {
            let why = if handed.reason == "breaker" {
                "circuit breaker open"
            } else {
                "delivery lane saturated"
            };
            return Outcome::Failed {
                attempts,
                last_status,
                last_error: why.to_owned(),
            };
        };
        let next_attempt = SystemTime::now() + delay;
        let span = tracing::info_span!(
            "handoff",
            pushwire.participation.id = %job.participation_id,
            pushwire.integration = %job.integration.name,
            pushwire.handoff.reason = handed.reason,
            pushwire.attempts = attempts,
            error.type = tracing::field::Empty,
        );
        let traceparent = telemetry::traceparent_of(&tracing::Span::current())
            .or_else(|| job.traceparent.clone());
        let delivery = NewDelivery {
            key: DeliveryKey::new(
                job.integration.name.clone(),
                job.participation_id.to_string(),
            ),
            campaign_id: job.campaign_id.to_string(),
            website_id: job.website_id.as_deref().map(str::to_owned),
            trace: traceparent.map(|traceparent| TraceContext {
                traceparent,
                tracestate: job.tracestate.clone(),
            }),
            outcome: ds::Outcome::Queued { next_attempt },
            attempts: handed.attempt.map(|made| made.record).into_iter().collect(),
            body: Some(job.body.clone()),
        };
        match self
            .handoff
            .hand_off(delivery, handed.reason != "breaker")
            .instrument(span.clone())
            .await
        {
            Ok(()) => {
                if let Some(m) = &self.metrics {
                    m.handoffs
                        .get_or_create(&ReasonLabel {
                            reason: handed.reason,
                        })
                        .inc();
                }
                Outcome::Queued {
                    attempts,
                    last_status,
                    last_error,
                    next_attempt,
                }
            }
            Err(HandoffError::Interrupted) => {
                span.record("error.type", "interrupted");
                Outcome::Interrupted
            }
            Err(err @ HandoffError::Refused(_)) => {
                span.record("error.type", "store_refused");
                Outcome::Failed {
                    attempts,
                    last_status,
                    last_error: err.to_string(),
                }
            }
        }
    }

    /// Makes one attempt in `permit`'s slot, frees the slot once answered and records it
    /// (span, metrics). Cut short at shutdown (`None`): a first attempt's participation is
    /// then not acknowledged, a retry's lease gives it back.
    async fn attempt(
        &self,
        integration: &Integration,
        participation_id: &str,
        body: Bytes,
        (traceparent, tracestate): (Option<&str>, &str),
        span: tracing::Span,
        permit: LanePermit,
    ) -> Option<Made> {
        let time = SystemTime::now();
        let mut req = request::build(integration, participation_id, body, time, traceparent);
        request::add_tracestate(&mut req, tracestate);
        let sent = Instant::now();
        let result = tokio::select! {
            biased;
            r = self.client.post(&req).instrument(span.clone()) => r,
            () = self.shutdown.cancelled() => return None,
        };
        drop(permit);
        self.record_attempt(&span, &result, sent);
        Some(Made::new(result, time, sent.elapsed()))
    }

    /// Asks the control plane to disable `integration` after a `410 Gone` from the version at
    /// `revision`; a full queue is only logged (the next 410 asks again).
    fn request_disable(&self, integration: &IntegrationName, revision: i64) {
        let reason = format!(
            "endpoint answered 410 Gone; disabled by the worker at {}",
            humantime::format_rfc3339_seconds(SystemTime::now())
        );
        if self
            .disable
            .try_send(DisableRequest {
                integration: integration.clone(),
                reason,
                revision,
            })
            .is_err()
        {
            tracing::warn!(integration = %integration, "disable queue full; the next 410 will ask again");
        }
    }

    /// Records an attempt's answer on its span and in the metrics.
    fn record_attempt(
        &self,
        span: &tracing::Span,
        result: &Result<HttpResponse, AttemptError>,
        sent: Instant,
    ) {
        let class = match result {
            Ok(resp) => {
                // Integers, and the status code as `error.type`, as the conventions ask.
                span.record("http.response.status_code", i64::from(resp.status));
                if !(200..300).contains(&resp.status) {
                    span.record("error.type", resp.status.to_string());
                    telemetry::set_error(span);
                }
                match resp.status {
                    200..=299 => "2xx",
                    300..=399 => "3xx",
                    400..=499 => "4xx",
                    _ => "5xx",
                }
            }
            Err(e) => {
                span.record("error.type", e.kind());
                telemetry::set_error(span);
                "error"
            }
        };
        if let Some(m) = &self.metrics {
            m.attempts.get_or_create(&StatusClassLabel { class }).inc();
            m.attempt_latency.observe(sent.elapsed().as_secs_f64());
        }
    }

    /// Sleeps until `at`; false when shutdown came first.
    async fn sleep_until(&self, at: Instant) -> bool {
        tokio::select! {
            biased;
            () = self.shutdown.cancelled() => false,
            () = tokio::time::sleep_until(at.into()) => true,
        }
    }

    /// The newest version of the integration if it may be sent to; why not otherwise.
    fn sendable(&self, name: &IntegrationName) -> Result<Arc<Integration>, &'static str> {
        match self.source.current(name) {
            None => Err("integration deleted"),
            Some(integration) if !integration.enabled => Err("integration disabled"),
            Some(integration) => Ok(integration),
        }
    }
}

/// What [`Dispatcher::first_slot`] got.
enum Slot {
    Got(LanePermit),
    Saturated,
    Interrupted,
}

/// Why and when a delivery is handed off.
struct Handed {
    /// `failure`, `breaker` or `saturated`.
    reason: &'static str,
    /// Until the store's first attempt (for `failure`; the others take the schedule's first
    /// step).
    delay: Duration,
    /// The first attempt, if one was made.
    attempt: Option<Made>,
}

impl Handed {
    fn saturated() -> Self {
        Self {
            reason: "saturated",
            delay: Duration::ZERO,
            attempt: None,
        }
    }

    fn breaker() -> Self {
        Self {
            reason: "breaker",
            delay: Duration::ZERO,
            attempt: None,
        }
    }
}

mod attempt;
mod from_store;

use attempt::{Made, admit, attempt_span, record_health};
