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

use super::breaker::{Admission, Breaker};
use super::client::{AttemptError, WebhookClient};
use super::lane::{Lane, Priority};
use super::request;
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
}

struct LaneEntry {
    lane: Arc<Lane>,
    breaker: Arc<Mutex<Breaker>>,
}

/// Delivers jobs; cheap to clone.
#[derive(Clone)]
pub struct Dispatcher {
    client: WebhookClient,
    opts: Arc<DispatchOptions>,
    source: Arc<dyn IntegrationSource>,
    lanes: Arc<Mutex<HashMap<IntegrationName, Arc<LaneEntry>>>>,
    disable: mpsc::Sender<DisableRequest>,
    shutdown: CancellationToken,
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
        Self {
            client,
            opts: Arc::new(opts),
            source,
            lanes: Arc::default(),
            disable,
            shutdown,
        }
    }

    fn lane(&self, name: &IntegrationName) -> Arc<LaneEntry> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        // Lanes of deleted integrations are dropped once idle, so the map stays bounded by
        // the configuration.
        if lanes.len() > 64 {
            lanes.retain(|n, e| {
                Arc::strong_count(e) > 1
                    || e.lane.in_flight() > 0
                    || self.source.current(n).is_some()
            });
        }
        lanes
            .entry(name.clone())
            .or_insert_with(|| {
                Arc::new(LaneEntry {
                    lane: Lane::new(self.opts.concurrency),
                    breaker: Arc::new(Mutex::new(Breaker::new(self.opts.breaker_threshold))),
                })
            })
            .clone()
    }

    /// Per-integration counts of the lanes in use.
    pub fn stats(&self) -> Vec<LaneStats> {
        let lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        lanes
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
            let Some(integration) = self.source.current(&name) else {
                return skipped_or_failed(attempts, last_status, last_error, "integration deleted");
            };
            if !integration.enabled {
                return skipped_or_failed(
                    attempts,
                    last_status,
                    last_error,
                    "integration disabled",
                );
            }
            let priority = if attempts == 0 {
                Priority::First
            } else {
                Priority::Retry
            };
            let permit = tokio::select! {
                p = entry.lane.acquire(priority) => p,
                () = self.shutdown.cancelled() => return Outcome::Interrupted,
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
            attempts += 1;
            let req = request::build(
                &integration,
                &job.participation_id,
                job.body.clone(),
                SystemTime::now(),
                job.traceparent.as_deref(),
            );
            let result = self.client.post(&req).await;
            drop(permit);
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

    /// Sleeps until `at`; false when shutdown came first.
    async fn sleep_until(&self, at: Instant) -> bool {
        tokio::select! {
            () = tokio::time::sleep_until(at.into()) => true,
            () = self.shutdown.cancelled() => false,
        }
    }
}

fn describe(result: &Result<super::client::HttpResponse, AttemptError>) -> String {
    match result {
        Ok(resp) if (200..300).contains(&resp.status) => String::new(),
        Ok(resp) => format!("HTTP {}", resp.status),
        Err(e) => e.to_string(),
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
