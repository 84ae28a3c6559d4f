//! The worker's Prometheus metrics (served on `/metrics`). A leaf module: it imports nothing
//! from the rest of the worker; the modules that record here depend on it, not the reverse.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use pushwire_common::domain::IntegrationName;
use std::sync::atomic::AtomicU64;

/// Latency buckets, in seconds: 1 ms to about 16 min, doubling (retries take minutes).
const LATENCY_BUCKETS: [f64; 21] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192, 16.384, 32.768, 65.536, 131.072, 262.144, 524.288, 1048.576,
];

/// Label of [`Metrics::deliveries`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `delivered`, `failed`, `skipped`, `queued` (handed off to the delivery store) or
    /// `interrupted`.
    pub outcome: &'static str,
}

/// Label of the per-integration gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IntegrationLabel {
    /// The integration's resource name, or `other` for the sum of the less busy ones.
    pub integration: String,
}

/// Most integrations given their own series in the per-integration gauges; the rest are
/// summed as `other`, so the number of series stays bounded whatever the configuration.
pub const MAX_INTEGRATION_SERIES: usize = 50;

/// Label of [`Metrics::attempts`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusClassLabel {
    /// `2xx`, `3xx`, `4xx`, `5xx`, or `error` (no answer: connection, TLS, timeout, refused).
    pub class: &'static str,
}

/// Label of [`Metrics::handoffs`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `failure` (a retryable first attempt), `breaker` (open, no attempt) or `saturated` (no
    /// slot in the lane promptly, no attempt).
    pub reason: &'static str,
}

/// Label of the delivery store call metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    /// The store operation: `hand_off`, `claim_due`, `finish`, `count_queued`, `record_outcomes`.
    pub operation: &'static str,
}

/// Buckets of the delivery store's call latency, in seconds: 0.5 ms to about 16 s.
const STORE_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048,
    4.096, 8.192, 16.384,
];

fn store_histogram() -> Histogram {
    Histogram::new(STORE_BUCKETS.iter().copied())
}

/// Label of [`Metrics::participations`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `acknowledged`, `rejected` or `interrupted`.
    pub result: &'static str,
}

/// One integration's lane as the dispatcher reports it, for the per-integration gauges.
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

/// Every metric of the worker, registered once.
#[derive(Debug)]
pub struct Metrics {
    /// The registry to encode.
    pub registry: Registry,
    /// gRPC calls served (a layer of the standalone worker's server).
    pub grpc: pushwire_common::server::grpc_metrics::GrpcMetrics,
    /// Participations handled, by result.
    pub participations: Family<ResultLabel, Counter>,
    /// Deliveries (one participation to one integration) by final outcome.
    pub deliveries: Family<OutcomeLabel, Counter>,
    /// HTTP attempts by status class.
    pub attempts: Family<StatusClassLabel, Counter>,
    /// Time of one HTTP attempt, in seconds.
    pub attempt_latency: Histogram,
    /// Time from accepting a participation to a 2xx from an integration, in seconds.
    pub delivery_latency: Histogram,
    /// Participations accepted and not yet acknowledged.
    pub in_flight: Gauge,
    /// Open Publish streams.
    pub streams: Gauge,
    /// Bytes of participations held on the memory budget (`--memory-budget`).
    pub memory_held: Gauge,
    /// The memory budget, in bytes.
    pub memory_budget: Gauge,
    /// Time a participation waited for room on the memory budget, in seconds (only waits).
    pub memory_budget_wait: Histogram,
    /// `PublishOne` calls refused with `RESOURCE_EXHAUSTED`: no room on the memory budget.
    pub memory_budget_refusals: Counter,
    /// Attempts in flight, for the busiest integrations (set at scrape time).
    pub lane_in_flight: Family<IntegrationLabel, Gauge>,
    /// Attempts waiting for a slot, for the busiest integrations (set at scrape time).
    pub lane_queued: Family<IntegrationLabel, Gauge>,
    /// Integrations whose circuit breaker is open or probing (set at scrape time).
    pub breakers_open: Gauge,
    /// Revision of the routing table in use (0 before the first snapshot).
    pub config_revision: Gauge,
    /// Time since a control plane last confirmed the configuration current, in seconds (set
    /// at scrape time).
    pub config_staleness: Gauge<f64, AtomicU64>,
    /// Configuration snapshots applied (a stream resumed from the worker's revision applies
    /// none).
    pub config_snapshots: Counter,
    /// Routing tables built from configuration changes: one per WatchConfig message of
    /// changes, however many it carries.
    pub config_updates: Counter,
    /// Time from a configuration write (its `update_time`) to its routing table being in
    /// use here, in seconds, one observation per change written (deletions carry no time);
    /// assumes the control plane's and the worker's clocks agree.
    pub config_propagation_lag: Histogram,
    /// Deliveries handed off to the delivery store, by reason.
    pub handoffs: Family<ReasonLabel, Counter>,
    /// Due deliveries claimed from the delivery store.
    pub claims: Counter,
    /// Attempts of claimed deliveries, by what they ended in (`delivered`, `failed`,
    /// `skipped`, `requeued`).
    pub retries: Family<OutcomeLabel, Counter>,
    /// Claims that took over an expired lease (the worker holding it died or stalled).
    pub lease_expiries: Counter,
    /// Deliveries queued in the delivery store (all workers'; refreshed periodically).
    pub queued_deliveries: Gauge,
    /// Time of delivery store calls, by operation, in seconds.
    pub store_latency: Family<OperationLabel, Histogram, fn() -> Histogram>,
    /// Failed delivery store calls, by operation.
    pub store_errors: Family<OperationLabel, Counter>,
    /// 1 while the last delivery store call succeeded, 0 while it is unreachable.
    pub store_up: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("pushwire_worker");
        let grpc = pushwire_common::server::grpc_metrics::GrpcMetrics::default();
        grpc.register(&mut registry);
        let participations = Family::<ResultLabel, Counter>::default();
        let deliveries = Family::<OutcomeLabel, Counter>::default();
        let delivery_latency = Histogram::new(LATENCY_BUCKETS.iter().copied());
        let attempts = Family::<StatusClassLabel, Counter>::default();
        let attempt_latency = Histogram::new(LATENCY_BUCKETS.iter().copied());
        let in_flight = Gauge::default();
        let streams = Gauge::default();
        let memory_held = Gauge::default();
        let memory_budget = Gauge::default();
        let memory_budget_wait = Histogram::new(LATENCY_BUCKETS.iter().copied());
        let memory_budget_refusals = Counter::default();
        let lane_in_flight = Family::<IntegrationLabel, Gauge>::default();
        let lane_queued = Family::<IntegrationLabel, Gauge>::default();
        let breakers_open = Gauge::default();
        let config_revision = Gauge::default();
        let config_staleness = Gauge::<f64, AtomicU64>::default();
        let config_snapshots = Counter::default();
        let config_updates = Counter::default();
        let config_propagation_lag = Histogram::new(LATENCY_BUCKETS.iter().copied());
        let handoffs = Family::<ReasonLabel, Counter>::default();
        let claims = Counter::default();
        let retries = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "retries",
            "Deliveries claimed from the delivery store, by what their turn ended in",
            retries.clone(),
        );
        let lease_expiries = Counter::default();
        let queued_deliveries = Gauge::default();
        let store_latency =
            Family::<OperationLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                store_histogram,
            );
        let store_errors = Family::<OperationLabel, Counter>::default();
        let store_up = Gauge::default();
        registry.register(
            "handoffs",
            "Deliveries handed off to the delivery store (QUEUED), by reason",
            handoffs.clone(),
        );
        registry.register(
            "claims",
            "Due deliveries claimed from the delivery store for a retry",
            claims.clone(),
        );
        registry.register(
            "lease_expiries",
            "Claims that took over an expired lease of another claim",
            lease_expiries.clone(),
        );
        registry.register(
            "queued_deliveries",
            "Deliveries queued in the delivery store (refreshed periodically)",
            queued_deliveries.clone(),
        );
        registry.register_with_unit(
            "delivery_store_latency",
            "Time of delivery store calls, by operation",
            prometheus_client::registry::Unit::Seconds,
            store_latency.clone(),
        );
        registry.register(
            "delivery_store_errors",
            "Failed delivery store calls, by operation",
            store_errors.clone(),
        );
        registry.register(
            "delivery_store_up",
            "1 while the delivery store answers, 0 while it is unreachable",
            store_up.clone(),
        );
        registry.register(
            "participations",
            "Participations handled, by result",
            participations.clone(),
        );
        registry.register(
            "deliveries",
            "Deliveries of a participation to an integration, by final outcome",
            deliveries.clone(),
        );
        registry.register(
            "attempts",
            "HTTP attempts by status class (error: no answer)",
            attempts.clone(),
        );
        registry.register_with_unit(
            "attempt_latency",
            "Time of one HTTP attempt, to the end of the (capped) response body",
            prometheus_client::registry::Unit::Seconds,
            attempt_latency.clone(),
        );
        registry.register_with_unit(
            "delivery_latency",
            "Time from accepting a participation to its delivery (2xx) to an integration",
            prometheus_client::registry::Unit::Seconds,
            delivery_latency.clone(),
        );
        registry.register(
            "in_flight_participations",
            "Participations accepted and not yet acknowledged",
            in_flight.clone(),
        );
        registry.register("publish_streams", "Open Publish streams", streams.clone());
        registry.register_with_unit(
            "memory_held",
            "Participations held in memory, as charged on the memory budget",
            prometheus_client::registry::Unit::Bytes,
            memory_held.clone(),
        );
        registry.register_with_unit(
            "memory_budget",
            "The memory budget for participations (--memory-budget)",
            prometheus_client::registry::Unit::Bytes,
            memory_budget.clone(),
        );
        registry.register_with_unit(
            "memory_budget_wait",
            "Time a participation waited for room on the memory budget (waits only)",
            prometheus_client::registry::Unit::Seconds,
            memory_budget_wait.clone(),
        );
        registry.register(
            "memory_budget_refusals",
            "PublishOne calls refused with RESOURCE_EXHAUSTED: the memory budget was full",
            memory_budget_refusals.clone(),
        );
        registry.register(
            "integration_in_flight_attempts",
            "Attempts in flight per integration (the busiest ones; the rest as other)",
            lane_in_flight.clone(),
        );
        registry.register(
            "integration_queued_attempts",
            "Attempts waiting for a slot per integration (the busiest ones; the rest as other)",
            lane_queued.clone(),
        );
        registry.register(
            "open_breakers",
            "Integrations whose circuit breaker is open or probing",
            breakers_open.clone(),
        );
        registry.register(
            "config_revision",
            "Configuration revision the routing table is at",
            config_revision.clone(),
        );
        registry.register_with_unit(
            "config_staleness",
            "Time since a control plane last confirmed the configuration current (a snapshot, \
             a change or a progress message); since the start before the first",
            prometheus_client::registry::Unit::Seconds,
            config_staleness.clone(),
        );
        registry.register(
            "config_snapshots",
            "Configuration snapshots applied (a resumed WatchConfig stream applies none)",
            config_snapshots.clone(),
        );
        registry.register(
            "config_updates",
            "Routing tables built from configuration changes: one per WatchConfig message of \
             changes, however many it carries",
            config_updates.clone(),
        );
        registry.register_with_unit(
            "config_propagation_lag",
            "Time from a configuration write to the worker routing with it, per change written",
            prometheus_client::registry::Unit::Seconds,
            config_propagation_lag.clone(),
        );
        Self {
            registry,
            grpc,
            participations,
            deliveries,
            attempts,
            attempt_latency,
            delivery_latency,
            in_flight,
            streams,
            memory_held,
            memory_budget,
            memory_budget_wait,
            memory_budget_refusals,
            lane_in_flight,
            lane_queued,
            breakers_open,
            config_revision,
            config_staleness,
            config_snapshots,
            config_updates,
            config_propagation_lag,
            handoffs,
            claims,
            retries,
            lease_expiries,
            queued_deliveries,
            store_latency,
            store_errors,
            store_up,
        }
    }
}

impl Metrics {
    /// Sets the per-integration gauges from the dispatcher's lanes.
    pub fn set_lanes(&self, mut lanes: Vec<LaneStats>) {
        self.lane_in_flight.clear();
        self.lane_queued.clear();
        let open = lanes.iter().filter(|l| l.breaker_open).count();
        self.breakers_open
            .set(i64::try_from(open).unwrap_or(i64::MAX));
        lanes.sort_by_key(|l| std::cmp::Reverse(l.in_flight + l.queued));
        let gauge = |f: &Family<IntegrationLabel, Gauge>, name: String, v: usize| {
            f.get_or_create(&IntegrationLabel { integration: name })
                .inc_by(i64::try_from(v).unwrap_or(i64::MAX));
        };
        for (n, lane) in lanes.into_iter().enumerate() {
            if lane.in_flight + lane.queued == 0 {
                break;
            }
            let name = if n < MAX_INTEGRATION_SERIES {
                lane.integration.to_string()
            } else {
                "other".to_owned()
            };
            gauge(&self.lane_in_flight, name.clone(), lane.in_flight);
            gauge(&self.lane_queued, name, lane.queued);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
