//! Delivery of one participation to one integration: attempts through the integration's
//! [`Lane`] and circuit breaker, retried per the [`RetryPolicy`] until a final outcome or the
//! retry window ends. Reads the newest configuration of the integration before every attempt,
//! so URL and secret changes apply to retries too. Knows nothing of gRPC.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
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
use crate::metrics::{Metrics, StatusClassLabel};

use super::breaker::{Admission, Breaker, BreakerOptions};
use super::lane::{Lane, LanePermit, Priority};
use super::retry::{self, RetryPolicy, Verdict};

/// Settings of the [`Dispatcher`].
#[derive(Clone, Debug)]
pub struct DispatchOptions {
    /// Retry schedule and window.
    pub retry: RetryPolicy,
    /// Attempts in flight per integration.
    pub concurrency: usize,
    /// Consecutive failures that open an integration's circuit breaker.
    pub breaker_threshold: u32,
}

impl Default for DispatchOptions {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            concurrency: 32,
            breaker_threshold: 10,
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
    /// A dispatcher sending with `client`; 410 answers are reported on `disable`.
    pub fn new(
        client: WebhookClient,
        opts: DispatchOptions,
        source: Arc<dyn IntegrationSource>,
        disable: mpsc::Sender<DisableRequest>,
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

    /// Delivers `job` to its final outcome: rounds of slot, breaker, attempt and verdict until
    /// one ends it.
    pub async fn deliver(&self, job: Job) -> Outcome {
        let mut delivery = Delivery::new(self, &job);
        loop {
            if let ControlFlow::Break(outcome) = delivery.round().await {
                return outcome;
            }
        }
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

/// What a step of a [`Delivery`] says: go on (with a value), or stop with the final outcome.
type Step<T = ()> = ControlFlow<Outcome, T>;

/// One job on its way to a final outcome: what its rounds share.
struct Delivery<'a> {
    dispatcher: &'a Dispatcher,
    job: &'a Job,
    entry: Arc<LaneEntry>,
    /// End of the retry window: no wait (for a slot, a breaker, a retry) goes past it.
    deadline: Instant,
    /// Attempts made so far.
    attempts: u32,
    /// Status of the last answer, if it was one.
    last_status: Option<u16>,
    /// Why the last attempt failed (empty when it did not).
    last_error: String,
}

impl<'a> Delivery<'a> {
    fn new(dispatcher: &'a Dispatcher, job: &'a Job) -> Self {
        let entry = dispatcher.lane(&job.integration.name);
        Self {
            dispatcher,
            job,
            entry,
            deadline: Instant::now() + dispatcher.opts.retry.window,
            attempts: 0,
            last_status: None,
            last_error: String::new(),
        }
    }

    /// One round: a slot, the breaker's leave, one attempt, and what its answer means.
    /// `Continue` to go round again, after the wait the round asked for.
    async fn round(&mut self) -> Step {
        let (permit, integration) = self.acquire_slot().await?;
        let probe = match self.admit() {
            Ok(probe) => probe,
            Err(retry_at) => {
                drop(permit);
                return self.wait_for_breaker(retry_at).await;
            }
        };
        // Dropped still armed (shutdown cut the attempt, or the task was aborted), `probe`
        // frees the breaker's probe slot.
        let result = self.attempt(&integration, permit).await?;
        let (verdict, retry_after) = self.classify(&result);
        self.record_health(&result, verdict, probe);
        self.finish(verdict, &integration)?;
        self.schedule_retry(retry_after).await
    }

    /// Waits for a slot in the integration's lane, and reads the integration as it is now.
    /// Stops at shutdown (nothing new starts then, even when a slot is free), when the
    /// integration was deleted or disabled, and when the retry window ends first: behind a
    /// slow endpoint a queued job would otherwise start long after its window and delay the
    /// acknowledgement.
    async fn acquire_slot(&self) -> Step<(LanePermit, Arc<Integration>)> {
        let shutdown = &self.dispatcher.shutdown;
        if shutdown.is_cancelled() {
            return ControlFlow::Break(Outcome::Interrupted);
        }
        self.sendable()?;
        let priority = if self.attempts == 0 {
            Priority::First
        } else {
            Priority::Retry
        };
        // `biased`: shutdown wins over a free slot.
        let permit = tokio::select! {
            biased;
            () = shutdown.cancelled() => return ControlFlow::Break(Outcome::Interrupted),
            p = self.entry.lane.acquire(priority) => p,
            () = tokio::time::sleep_until(self.deadline.into()) => {
                return ControlFlow::Break(self.window_ended());
            }
        };
        // Read again: the wait for a slot may have been long.
        let integration = self.sendable()?;
        ControlFlow::Continue((permit, integration))
    }

    /// The newest version of the integration, or the outcome when it may no longer be sent to.
    fn sendable(&self) -> Step<Arc<Integration>> {
        match self.dispatcher.sendable(&self.job.integration.name) {
            Ok(integration) => ControlFlow::Continue(integration),
            Err(why) => ControlFlow::Break(self.skipped_or_failed(why)),
        }
    }

    /// Asks the circuit breaker for leave to attempt: a guard for the probe slot when it
    /// grants one (half-open), or when to ask again.
    fn admit(&self) -> Result<ProbeGuard, Instant> {
        let admission = self
            .entry
            .breaker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(Instant::now());
        match admission {
            Admission::Rejected { retry_at } => Err(retry_at),
            Admission::Allowed | Admission::Probe => Ok(ProbeGuard {
                breaker: Arc::clone(&self.entry.breaker),
                armed: admission == Admission::Probe,
            }),
        }
    }

    /// The breaker refused: waits until it may let an attempt through, unless that is past
    /// the retry window.
    async fn wait_for_breaker(&self, retry_at: Instant) -> Step {
        if retry_at >= self.deadline {
            let last_error = if self.last_error.is_empty() {
                "circuit breaker open".into()
            } else {
                self.last_error.clone()
            };
            return ControlFlow::Break(self.failed(last_error));
        }
        self.wait_until(retry_at).await
    }

    /// Makes one attempt in `permit`'s slot, frees the slot once answered and records the
    /// attempt (span, metrics). An attempt in flight is cut short at shutdown: the
    /// participation is not acknowledged, so its publisher sends it again.
    async fn attempt(
        &mut self,
        integration: &Integration,
        permit: LanePermit,
    ) -> Step<Result<HttpResponse, AttemptError>> {
        self.attempts += 1;
        let (server_address, server_port) = request::server_of(&integration.url);
        let span = tracing::info_span!(
            "attempt",
            otel.kind = "client",
            pushwire.participation.id = %self.job.participation_id,
            pushwire.integration = %integration.name,
            pushwire.attempt = i64::from(self.attempts),
            http.request.method = "POST",
            url.full = %request::redacted_url(&integration.url),
            server.address = %server_address,
            server.port = i64::from(server_port),
            http.response.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        // The receiver's spans join ours under this attempt.
        let traceparent = telemetry::traceparent_of(&span).or_else(|| self.job.traceparent.clone());
        let req = request::build(
            integration,
            &self.job.participation_id,
            self.job.body.clone(),
            SystemTime::now(),
            traceparent.as_deref(),
        );
        let mut req = req;
        request::add_tracestate(&mut req, &self.job.tracestate);
        let sent = Instant::now();
        let result = tokio::select! {
            biased;
            r = self.dispatcher.client.post(&req).instrument(span.clone()) => r,
            () = self.dispatcher.shutdown.cancelled() => {
                return ControlFlow::Break(Outcome::Interrupted);
            }
        };
        drop(permit);
        self.dispatcher.record_attempt(&span, &result, sent);
        ControlFlow::Continue(result)
    }

    /// What an attempt's answer means: the verdict, and the delay a `Retry-After` header asked
    /// for. Keeps its status and error for the outcome.
    fn classify(
        &mut self,
        result: &Result<HttpResponse, AttemptError>,
    ) -> (Verdict, Option<Duration>) {
        self.last_error = describe(result);
        match result {
            Ok(resp) => {
                self.last_status = Some(resp.status);
                let retry_after = resp
                    .headers
                    .iter()
                    .find(|(n, _)| n == "retry-after")
                    .and_then(|(_, v)| retry::parse_retry_after(v, SystemTime::now()));
                (retry::classify_status(resp.status), retry_after)
            }
            Err(e) => {
                self.last_status = None;
                let verdict = if e.is_retryable() {
                    Verdict::Retry
                } else {
                    Verdict::Final
                };
                (verdict, None)
            }
        }
    }

    /// Tells the breaker how the endpoint did, and settles the probe. Only the endpoint's
    /// health counts: a 4xx answer is the endpoint working.
    fn record_health(
        &self,
        result: &Result<HttpResponse, AttemptError>,
        verdict: Verdict,
        mut probe: ProbeGuard,
    ) {
        let mut breaker = self.entry.breaker.lock().unwrap_or_else(|e| e.into_inner());
        match (result, verdict) {
            (Ok(_), Verdict::Delivered | Verdict::Final | Verdict::Gone) => breaker.on_success(),
            _ => breaker.on_failure(Instant::now()),
        }
        probe.armed = false;
    }

    /// Ends the delivery on a final verdict (after `410 Gone`, asking for the integration to
    /// be disabled); `Continue` when the verdict is to retry.
    fn finish(&self, verdict: Verdict, integration: &Integration) -> Step {
        match verdict {
            Verdict::Delivered => ControlFlow::Break(Outcome::Delivered {
                attempts: self.attempts,
                status: self.last_status.unwrap_or_default(),
            }),
            Verdict::Final => ControlFlow::Break(self.failed(self.last_error.clone())),
            Verdict::Gone => {
                self.dispatcher
                    .request_disable(&integration.name, integration.revision);
                ControlFlow::Break(self.failed(self.last_error.clone()))
            }
            Verdict::Retry => ControlFlow::Continue(()),
        }
    }

    /// Waits before the next attempt, as long as the retry policy says (or `retry_after`);
    /// fails when the policy has no more attempts or the wait would end past the window.
    async fn schedule_retry(&self, retry_after: Option<Duration>) -> Step {
        let delay = retry::next_delay(
            &self.dispatcher.opts.retry,
            self.attempts,
            retry_after,
            rand::random::<f64>(),
        );
        let Some(at) = delay
            .map(|delay| Instant::now() + delay)
            .filter(|at| *at < self.deadline)
        else {
            return ControlFlow::Break(self.failed(self.last_error.clone()));
        };
        self.wait_until(at).await
    }

    /// Sleeps until `at`; interrupted by shutdown.
    async fn wait_until(&self, at: Instant) -> Step {
        if self.dispatcher.sleep_until(at).await {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(Outcome::Interrupted)
        }
    }

    /// Failed after the attempts made so far.
    fn failed(&self, last_error: String) -> Outcome {
        Outcome::Failed {
            attempts: self.attempts,
            last_status: self.last_status,
            last_error,
        }
    }

    /// The retry window ended while waiting for a slot.
    fn window_ended(&self) -> Outcome {
        let why = "retry window ended while waiting for a delivery slot";
        self.failed(if self.attempts == 0 {
            why.to_owned()
        } else {
            format!("{why}; last: {}", self.last_error)
        })
    }

    /// The integration may no longer be sent to: skipped when nothing was attempted yet,
    /// failed otherwise.
    fn skipped_or_failed(&self, why: &str) -> Outcome {
        if self.attempts == 0 {
            Outcome::Skipped {
                reason: why.to_owned(),
            }
        } else {
            self.failed(format!(
                "{why} after {} attempt(s); last: {}",
                self.attempts, self.last_error
            ))
        }
    }
}

/// Reports an admitted probe as abandoned when dropped still armed (see [`Delivery::round`]).
struct ProbeGuard {
    breaker: Arc<Mutex<Breaker>>,
    armed: bool,
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if self.armed {
            self.breaker
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .on_probe_abandoned();
        }
    }
}

fn describe(result: &Result<HttpResponse, AttemptError>) -> String {
    match result {
        Ok(resp) if (200..300).contains(&resp.status) => String::new(),
        Ok(resp) => format!("HTTP {}", resp.status),
        Err(e) => e.to_string(),
    }
}
