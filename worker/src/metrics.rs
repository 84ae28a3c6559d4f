//! The worker's Prometheus metrics (served on `/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label of [`Metrics::deliveries`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `delivered`, `failed`, `skipped` or `interrupted`.
    pub outcome: &'static str,
}

/// Label of [`Metrics::participations`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `acknowledged`, `rejected` or `interrupted`.
    pub result: &'static str,
}

/// Every metric of the worker, registered once.
#[derive(Debug)]
pub struct Metrics {
    /// The registry to encode.
    pub registry: Registry,
    /// Participations handled, by result.
    pub participations: Family<ResultLabel, Counter>,
    /// Deliveries (one participation to one integration) by final outcome.
    pub deliveries: Family<OutcomeLabel, Counter>,
    /// Participations accepted and not yet acknowledged.
    pub in_flight: Gauge,
    /// Open Publish streams.
    pub streams: Gauge,
    /// Revision of the routing table in use (0 before the first snapshot).
    pub config_revision: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("pushwire_worker");
        let participations = Family::<ResultLabel, Counter>::default();
        let deliveries = Family::<OutcomeLabel, Counter>::default();
        let in_flight = Gauge::default();
        let streams = Gauge::default();
        let config_revision = Gauge::default();
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
            "in_flight_participations",
            "Participations accepted and not yet acknowledged",
            in_flight.clone(),
        );
        registry.register("publish_streams", "Open Publish streams", streams.clone());
        registry.register(
            "config_revision",
            "Configuration revision the routing table is at",
            config_revision.clone(),
        );
        Self {
            registry,
            participations,
            deliveries,
            in_flight,
            streams,
            config_revision,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
