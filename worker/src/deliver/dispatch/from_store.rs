//! Retries from the delivery store: one attempt of a claimed delivery, through the same lanes
//! and breaker as first attempts (after them), finished in the store under its lease.

use super::*;

impl Dispatcher {
    /// Makes one attempt of a delivery claimed from the store (with `store`'s lease) and
    /// finishes it there: delivered, failed, skipped (the integration was deleted or disabled,
    /// or the body is gone) or rescheduled by the retry rules within the retry window, counted
    /// from the delivery's creation. Interrupted by shutdown, it finishes nothing: the lease
    /// gives it back.
    pub async fn retry(&self, claimed: ClaimedDelivery, store: &StoreHandle, lease: Duration) {
        let name = claimed.lease.key.integration.clone();
        let Some((attempt, outcome)) = self.retry_outcome(&claimed, lease).await else {
            return;
        };
        if let Some(m) = &self.metrics {
            let outcome = match outcome {
                ds::Outcome::Queued { .. } => "requeued",
                ds::Outcome::Delivered => "delivered",
                ds::Outcome::Failed => "failed",
                ds::Outcome::Skipped { .. } => "skipped",
            };
            m.retries.get_or_create(&OutcomeLabel { outcome }).inc();
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            let finished = store
                .call(
                    "finish",
                    store.store().finish(
                        &claimed.lease,
                        attempt.as_ref(),
                        &outcome,
                        SystemTime::now(),
                    ),
                )
                .await;
            match finished {
                Ok(FinishResult::Applied) => {
                    if let ds::Outcome::Queued { next_attempt } = outcome {
                        self.handoff.due_times().note(next_attempt);
                    }
                    return;
                }
                Ok(FinishResult::LeaseLost) => {
                    tracing::debug!(integration = %name, participation = %claimed.lease.key.participation_id, "lease lost before the finish");
                    return;
                }
                Err(err) if err.is_transient() && SystemTime::now() < claimed.lease.expires => {
                    if !self.sleep_until(Instant::now() + backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                // The lease runs out and another claim retries it.
                Err(_) => return,
            }
        }
    }

    /// The attempt (if one was made) and the outcome of a claimed delivery; `None` when
    /// shutdown interrupted it.
    async fn retry_outcome(
        &self,
        claimed: &ClaimedDelivery,
        lease: Duration,
    ) -> Option<(Option<Attempt>, ds::Outcome)> {
        let name = &claimed.lease.key.integration;
        let skipped = |reason: &str| {
            Some((
                None,
                ds::Outcome::Skipped {
                    reason: reason.to_owned(),
                },
            ))
        };
        if let Err(why) = self.sendable(name) {
            return skipped(why);
        }
        let Some(body) = claimed.body.clone() else {
            return skipped("participation body no longer retained");
        };
        let entry = self.lane(name);
        let later = |after: Duration| {
            Some((
                None,
                ds::Outcome::Queued {
                    next_attempt: SystemTime::now() + after,
                },
            ))
        };
        // Behind the first attempts; given back (due again soon) rather than kept past half the
        // lease, so no other worker claims it while it waits here.
        let permit = tokio::select! {
            biased;
            () = self.shutdown.cancelled() => return None,
            permit = entry.lane.acquire(Priority::Retry) => permit,
            () = tokio::time::sleep(lease / 2) => return later(Duration::from_secs(1)),
        };
        let integration = match self.sendable(name) {
            Ok(integration) => integration,
            Err(why) => return skipped(why),
        };
        let Some(probe) = admit(&entry) else {
            return later(self.opts.retry.delays.first().copied().unwrap_or_default());
        };
        let number = claimed.attempt_count.saturating_add(1);
        let span = attempt_span(&claimed.lease.key.participation_id, &integration, number);
        if let Some(trace) = &claimed.trace {
            telemetry::set_remote_parent(&span, &trace.traceparent, &trace.tracestate);
        }
        let traceparent = telemetry::traceparent_of(&span)
            .or_else(|| claimed.trace.as_ref().map(|t| t.traceparent.clone()));
        let tracestate = claimed.trace.as_ref().map_or("", |t| t.tracestate.as_str());
        let made = self
            .attempt(
                &integration,
                &claimed.lease.key.participation_id,
                body,
                (traceparent.as_deref(), tracestate),
                span,
                permit,
            )
            .await?;
        record_health(&entry, &made, probe);
        let outcome = match made.verdict {
            Verdict::Delivered => ds::Outcome::Delivered,
            Verdict::Final => ds::Outcome::Failed,
            Verdict::Gone => {
                self.request_disable(&integration.name, integration.revision);
                ds::Outcome::Failed
            }
            Verdict::Retry => {
                let window_end = claimed.create_time + self.opts.retry.window;
                retry::next_delay(
                    &self.opts.retry,
                    number,
                    made.retry_after,
                    rand::random::<f64>(),
                )
                .map(|delay| SystemTime::now() + delay)
                .filter(|at| *at <= window_end)
                .map_or(ds::Outcome::Failed, |next_attempt| ds::Outcome::Queued {
                    next_attempt,
                })
            }
        };
        Some((Some(made.record), outcome))
    }
}
