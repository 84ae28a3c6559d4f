//! One attempt's bookkeeping: its span, the breaker's admission and health record, and what
//! the answer means ([`Made`]), shared by first attempts and retries from the store.

use super::*;

/// An attempt made: its verdict, the wait a `Retry-After` asked for, and its record for the
/// store.
pub(super) struct Made {
    pub(super) verdict: Verdict,
    pub(super) retry_after: Option<Duration>,
    /// Whether the endpoint answered (its health is judged on answers).
    pub(super) answered: bool,
    /// Why it failed (empty when it did not).
    pub(super) error: String,
    pub(super) record: Attempt,
}

impl Made {
    pub(super) fn new(
        result: Result<HttpResponse, AttemptError>,
        time: SystemTime,
        took: Duration,
    ) -> Self {
        let error = describe(&result);
        match result {
            Ok(resp) => {
                let retry_after = resp
                    .headers
                    .iter()
                    .find(|(n, _)| n == "retry-after")
                    .and_then(|(_, v)| retry::parse_retry_after(v, SystemTime::now()));
                let failed = !(200..300).contains(&resp.status);
                Self {
                    verdict: retry::classify_status(resp.status),
                    retry_after,
                    answered: true,
                    record: Attempt {
                        time,
                        status_code: Some(resp.status),
                        error_class: failed.then(|| "status".to_owned()),
                        error_message: failed.then(|| error.clone()),
                        duration: took,
                    },
                    error,
                }
            }
            Err(e) => Self {
                verdict: if e.is_retryable() {
                    Verdict::Retry
                } else {
                    Verdict::Final
                },
                retry_after: None,
                answered: false,
                record: Attempt {
                    time,
                    status_code: None,
                    error_class: Some(e.kind().to_owned()),
                    error_message: Some(error.clone()),
                    duration: took,
                },
                error,
            },
        }
    }

    /// Failed after `attempts`, this one the last.
    pub(super) fn failed(&self, attempts: u32) -> Outcome {
        Outcome::Failed {
            attempts,
            last_status: self.record.status_code,
            last_error: self.error.clone(),
        }
    }
}

/// The span of one HTTP attempt.
pub(super) fn attempt_span(
    participation_id: &str,
    integration: &Integration,
    number: u32,
) -> tracing::Span {
    let (server_address, server_port) = request::server_of(&integration.url);
    tracing::info_span!(
        "attempt",
        otel.kind = "client",
        pushwire.participation.id = %participation_id,
        pushwire.integration = %integration.name,
        pushwire.attempt = i64::from(number),
        http.request.method = "POST",
        url.full = %request::redacted_url(&integration.url),
        server.address = %server_address,
        server.port = i64::from(server_port),
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// Asks the circuit breaker for leave to attempt: a guard for the probe slot when it grants
/// one (half-open), `None` when it refuses.
pub(super) fn admit(entry: &LaneEntry) -> Option<ProbeGuard> {
    let admission = entry
        .breaker
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .admit(Instant::now());
    match admission {
        Admission::Rejected { .. } => None,
        Admission::Allowed | Admission::Probe => Some(ProbeGuard {
            breaker: Arc::clone(&entry.breaker),
            armed: admission == Admission::Probe,
        }),
    }
}

/// Tells the breaker how the endpoint did, and settles the probe. Only the endpoint's health
/// counts: a 4xx answer is the endpoint working.
pub(super) fn record_health(entry: &LaneEntry, made: &Made, mut probe: ProbeGuard) {
    let mut breaker = entry.breaker.lock().unwrap_or_else(|e| e.into_inner());
    match (made.answered, made.verdict) {
        (true, Verdict::Delivered | Verdict::Final | Verdict::Gone) => breaker.on_success(),
        _ => breaker.on_failure(Instant::now()),
    }
    probe.armed = false;
}

/// Reports an admitted probe as abandoned when dropped still armed (see [`Delivery::round`]).
pub(super) struct ProbeGuard {
    pub(super) breaker: Arc<Mutex<Breaker>>,
    pub(super) armed: bool,
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
