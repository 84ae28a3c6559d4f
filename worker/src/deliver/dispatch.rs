//! Delivery of one participation to one integration: attempts through the integration's
//! [`Lane`] and circuit breaker, retried per the [`RetryPolicy`] until a final outcome or the
//! retry window ends. Reads the newest configuration of the integration before every attempt,
//! so URL and secret changes apply to retries too. Knows nothing of gRPC.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use pushwire_common::domain::{Integration, IntegrationName};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use pushwire_common::telemetry;
use pushwire_common::webhook::client::{AttemptError, HttpResponse, WebhookClient};
use pushwire_common::webhook::request;
use tracing::Instrument as _;

use crate::metrics::{Metrics, StatusClassLabel};

use super::breaker::{Admission, Breaker, BreakerOptions};
use super::lane::{Lane, Priority};
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

/// Per-integration counts, for metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaneStats {
    /// The integration.
    pub integration: IntegrationName,
    /// Attempts in flight.
    pub in_flight: usize,
    /// Attempts waiting for a slot.
    pub queued: usize,
    /// Whether its breaker is not closed.
    pub breaker_open: bool,
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

    /// Delivers `job` to its final outcome.
    pub async fn deliver(&self, job: Job) -> Outcome {
        let name = job.integration.name.clone();
        let entry = self.lane(&name);
        let started = Instant::now();
        let deadline = started + self.opts.retry.window;
        let mut attempts = 0u32;
        let mut last_status = None;
        let mut last_error = String::new();
        loop {
            // Nothing new starts once shutdown began, even when a slot is free.
            if self.shutdown.is_cancelled() {
                return Outcome::Interrupted;
            }
            if let Err(why) = self.sendable(&name) {
                return skipped_or_failed(attempts, last_status, last_error, why);
            }
            let priority = if attempts == 0 {
                Priority::First
            } else {
                Priority::Retry
            };
            // `biased`: shutdown wins over a free slot. The retry window bounds the wait for a
            // slot as it bounds the waits between attempts: behind a slow endpoint a queued job
            // would otherwise start long after its window and delay the acknowledgement.
            let permit = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return Outcome::Interrupted,
                p = entry.lane.acquire(priority) => p,
                () = tokio::time::sleep_until(deadline.into()) => {
                    return window_ended(attempts, last_status, last_error);
                }
            };
            // Read again: the wait for a slot may have been long.
            let integration = match self.sendable(&name) {
                Ok(integration) => integration,
                Err(why) => return skipped_or_failed(attempts, last_status, last_error, why),
            };
            let admission = entry
                .breaker
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .admit(Instant::now());
            if let Admission::Rejected { retry_at } = admission {
                drop(permit);
                if retry_at >= deadline {
                    return Outcome::Failed {
                        attempts,
                        last_status,
                        last_error: if last_error.is_empty() {
                            "circuit breaker open".into()
                        } else {
                            last_error
                        },
                    };
                }
                if !self.sleep_until(retry_at).await {
                    return Outcome::Interrupted;
                }
                continue;
            }
            // A probe whose delivery is dropped mid-request (its task aborted) must free the
            // probe slot, or every job of the integration waits out the probe timeout.
            let mut probe = ProbeGuard {
                breaker: &entry.breaker,
                armed: admission == Admission::Probe,
            };
            attempts += 1;
            let span = tracing::info_span!(
                "attempt",
                otel.kind = "client",
                pushwire.participation.id = %job.participation_id,
                pushwire.integration = %name,
                pushwire.attempt = attempts,
                http.request.method = "POST",
                url.full = %request::redacted_url(&integration.url),
                http.response.status_code = tracing::field::Empty,
                error.type = tracing::field::Empty,
            );
            // The receiver's spans join ours under this attempt.
            let traceparent = telemetry::traceparent_of(&span).or_else(|| job.traceparent.clone());
            let req = request::build(
                &integration,
                &job.participation_id,
                job.body.clone(),
                SystemTime::now(),
                traceparent.as_deref(),
            );
            let sent = Instant::now();
            // An attempt in flight is cut short at shutdown: the participation is not
            // acknowledged, so its publisher sends it again.
            let result = tokio::select! {
                biased;
                r = self.client.post(&req).instrument(span.clone()) => r,
                () = self.shutdown.cancelled() => return Outcome::Interrupted,
            };
            drop(permit);
            self.record_attempt(&span, &result, sent);
            let (verdict, retry_after) = match &result {
                Ok(resp) => {
                    last_status = Some(resp.status);
                    let retry_after = resp
                        .headers
                        .iter()
                        .find(|(n, _)| n == "retry-after")
                        .and_then(|(_, v)| retry::parse_retry_after(v, SystemTime::now()));
                    (retry::classify_status(resp.status), retry_after)
                }
                Err(e) => {
                    last_status = None;
                    (
                        if e.is_retryable() {
                            Verdict::Retry
                        } else {
                            Verdict::Final
                        },
                        None,
                    )
                }
            };
            {
                let mut breaker = entry.breaker.lock().unwrap_or_else(|e| e.into_inner());
                // Only the endpoint's health counts: a 4xx answer is the endpoint working.
                match (&result, verdict) {
                    (Ok(_), Verdict::Delivered | Verdict::Final | Verdict::Gone) => {
                        breaker.on_success()
                    }
                    _ => breaker.on_failure(Instant::now()),
                }
                probe.armed = false;
            }
            last_error = describe(&result);
            match verdict {
                Verdict::Delivered => {
                    return Outcome::Delivered {
                        attempts,
                        status: last_status.unwrap_or_default(),
                    };
                }
                Verdict::Final => {
                    return Outcome::Failed {
                        attempts,
                        last_status,
                        last_error,
                    };
                }
                Verdict::Gone => {
                    let reason = format!(
                        "endpoint answered 410 Gone; disabled by the worker at {}",
                        humantime::format_rfc3339_seconds(SystemTime::now())
                    );
                    if self
                        .disable
                        .try_send(DisableRequest {
                            integration: name.clone(),
                            reason,
                            revision: integration.revision,
                        })
                        .is_err()
                    {
                        tracing::warn!(integration = %name, "disable queue full; the next 410 will ask again");
                    }
                    return Outcome::Failed {
                        attempts,
                        last_status,
                        last_error,
                    };
                }
                Verdict::Retry => {
                    let Some(delay) = retry::next_delay(
                        &self.opts.retry,
                        attempts,
                        retry_after,
                        rand::random::<f64>(),
                    ) else {
                        return Outcome::Failed {
                            attempts,
                            last_status,
                            last_error,
                        };
                    };
                    let at = Instant::now() + delay;
                    if at >= deadline {
                        return Outcome::Failed {
                            attempts,
                            last_status,
                            last_error,
                        };
                    }
                    if !self.sleep_until(at).await {
                        return Outcome::Interrupted;
                    }
                }
            }
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
                span.record("http.response.status_code", resp.status);
                if !(200..300).contains(&resp.status) {
                    span.record("error.type", format!("http_{}", resp.status));
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

/// Reports an admitted probe as abandoned when dropped still armed (see `deliver`).
struct ProbeGuard<'a> {
    breaker: &'a Mutex<Breaker>,
    armed: bool,
}

impl Drop for ProbeGuard<'_> {
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

fn window_ended(attempts: u32, last_status: Option<u16>, last_error: String) -> Outcome {
    let why = "retry window ended while waiting for a delivery slot";
    Outcome::Failed {
        attempts,
        last_status,
        last_error: if attempts == 0 {
            why.to_owned()
        } else {
            format!("{why}; last: {last_error}")
        },
    }
}

fn skipped_or_failed(
    attempts: u32,
    last_status: Option<u16>,
    last_error: String,
    why: &str,
) -> Outcome {
    if attempts == 0 {
        Outcome::Skipped {
            reason: why.to_owned(),
        }
    } else {
        Outcome::Failed {
            attempts,
            last_status,
            last_error: format!("{why} after {attempts} attempt(s); last: {last_error}"),
        }
    }
}
