//! The operations endpoint: `/healthz` (the process is up), `/readyz` (the configuration is
//! loaded; says why not, and warns when the store does not answer) and `/metrics` (Prometheus text format).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use pushwire_common::server::exposition::Format;

use crate::service::ConfigFeed;
use crate::store::Store;

/// How long `/readyz` and `/metrics` wait for the store (it answers in milliseconds when well).
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the endpoints read.
#[derive(Clone)]
pub struct Ops {
    feed: ConfigFeed,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    /// The in-process worker of `--with-worker`.
    worker: Option<pushwire_worker::Status>,
    /// The tokens the server accepts, for its token file's state.
    auth: Option<pushwire_common::auth::Authenticator>,
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops")
            .field("feed", &self.feed)
            .finish_non_exhaustive()
    }
}

struct Metrics {
    registry: Registry,
    revision: Gauge,
    watchers: Gauge,
    store_up: Gauge,
}

impl Ops {
    /// Endpoints over the feed, the store and the in-process worker if any, exposing the
    /// gRPC and store metrics too.
    pub fn new(
        feed: ConfigFeed,
        store: Arc<dyn Store>,
        grpc: &pushwire_common::server::grpc_metrics::GrpcMetrics,
        store_metrics: &crate::store::metered::StoreMetrics,
        retention: &crate::service::deliveries::RetentionMetrics,
        worker: Option<pushwire_worker::Status>,
    ) -> Self {
        let mut registry = Registry::with_prefix("pushwire");
        grpc.register(&mut registry);
        store_metrics.register(&mut registry);
        retention.register(&mut registry);
        let revision = Gauge::default();
        let watchers = Gauge::default();
        let store_up = Gauge::default();
        registry.register(
            "config_revision",
            "Store revision of the configuration served to workers",
            revision.clone(),
        );
        registry.register(
            "config_watchers",
            "WatchConfig streams open",
            watchers.clone(),
        );
        registry.register(
            "store_up",
            "1 when the configuration store answered the last probe",
            store_up.clone(),
        );
        Self {
            feed,
            store,
            worker,
            auth: None,
            metrics: Arc::new(Metrics {
                registry,
                revision,
                watchers,
                store_up,
            }),
        }
    }

    /// The same, `/readyz` also saying when `auth`'s token file is not in force.
    pub fn with_token_file(mut self, auth: pushwire_common::auth::Authenticator) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Checks the store within the probe timeout; the reason when it fails.
    async fn store_ok(&self) -> Result<(), String> {
        let ok = match tokio::time::timeout(STORE_PROBE_TIMEOUT, self.store.revision()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("store unreachable: {e}")),
            Err(_) => Err(format!(
                "store unreachable: no answer within {STORE_PROBE_TIMEOUT:?}"
            )),
        };
        self.metrics.store_up.set(i64::from(ok.is_ok()));
        ok
    }

    /// The axum router.
    pub fn router(self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(self)
    }
}

async fn readyz(State(ops): State<Ops>) -> impl IntoResponse {
    if !ops.feed.is_loaded() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: configuration not loaded from the store yet\n".to_owned(),
        );
    }
    // The revision deliveries route with: the in-process worker's, else the one served.
    let revision = match ops.worker.as_ref().map(|w| w.ready()) {
        Some(Err(why)) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: worker: {why}\n"),
            );
        }
        Some(Ok(revision)) => revision,
        None => ops.feed.revision(),
    };
    // Once loaded, the control plane serves workers and reads from memory even while the
    // store is unreachable (writes fail): it stays ready and says so.
    let store = match ops.store_ok().await {
        Ok(()) => String::new(),
        Err(why) => format!(
            "warning: {why}; reads and WatchConfig are served from memory at revision {}, \
             writes fail\n",
            ops.feed.revision()
        ),
    };
    let warning = ops.auth.as_ref().and_then(|a| a.readiness_warning());
    let warning = warning.map(|w| format!("{w}\n")).unwrap_or_default();
    (
        StatusCode::OK,
        format!("ready: configuration revision {revision}\n{store}{warning}"),
    )
}

/// The control plane's metrics (and its in-process worker's), in the format the `Accept`
/// header asks for (see [`pushwire_common::server::exposition`]).
async fn metrics(State(ops): State<Ops>, headers: HeaderMap) -> impl IntoResponse {
    let format = Format::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let m = &ops.metrics;
    m.revision.set(ops.feed.revision());
    m.watchers
        .set(i64::try_from(ops.feed.watchers()).unwrap_or(i64::MAX));
    let _ = ops.store_ok().await;
    let mut body = String::new();
    if encode(&mut body, &m.registry).is_err() {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            String::new(),
        );
    }
    if let Some(worker) = &ops.worker {
        // Both expositions end with `# EOF`, which must come once, at the end.
        body.truncate(
            body.trim_end()
                .strip_suffix("# EOF")
                .map_or(body.len(), str::len),
        );
        body.push_str(&worker.encode_metrics());
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, format.content_type())],
        format.render(body),
    )
}
