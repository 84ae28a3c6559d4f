//! The operations endpoint: `/healthz` (the process is up), `/readyz` (a configuration
//! snapshot is applied and the delivery store answers; says why not, and when ready how long
//! ago the configuration was last confirmed current: a stale one does not make the worker
//! unready) and `/metrics`
//! (OpenMetrics or the classic Prometheus text format, as the scraper asks), over the
//! [`Status`] they read.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use pushwire_common::server::exposition::Format;

use std::sync::Arc;

use pushwire_common::auth::Authenticator;

use crate::config_watch::{TableWatch, WatchHealth};
use crate::deliver::dispatch::Dispatcher;
use crate::deliver::store::StoreHandle;
use crate::metrics::Metrics;

/// What readiness and metrics read; cheap to clone.
#[derive(Clone, Debug)]
pub struct Status {
    pub(crate) table: TableWatch,
    pub(crate) metrics: Arc<Metrics>,
    health: Arc<WatchHealth>,
    dispatcher: Dispatcher,
    /// The tokens of the worker's own server, for its token file's state.
    auth: Option<Authenticator>,
    store: StoreHandle,
}

impl Status {
    /// Readiness and metrics over the routing table of the moment, the worker's metrics and
    /// the dispatcher's lanes.
    pub(crate) fn new(
        table: TableWatch,
        metrics: Arc<Metrics>,
        health: Arc<WatchHealth>,
        dispatcher: Dispatcher,
        store: StoreHandle,
    ) -> Self {
        Self {
            table,
            metrics,
            health,
            dispatcher,
            auth: None,
            store,
        }
    }

    /// The same, `/readyz` also saying when `auth`'s token file is not in force.
    pub fn with_token_file(mut self, auth: Authenticator) -> Self {
        self.auth = Some(auth);
        self
    }

    /// The configuration revision in use, or why the worker is not ready: no configuration
    /// yet, or the delivery store is unreachable (hand-offs wait meanwhile). A stale
    /// configuration (no control plane reachable) does not make the worker unready: it keeps
    /// routing with the last one, see [`Status::staleness`].
    pub fn ready(&self) -> Result<i64, String> {
        let revision = self
            .table
            .borrow()
            .as_ref()
            .map(|t| t.revision())
            .ok_or_else(|| "no configuration received from the control plane yet".to_owned())?;
        match self.store.unreachable() {
            Some(why) => Err(format!("the delivery store is unreachable: {why}")),
            None => Ok(revision),
        }
    }

    /// Time since a control plane last confirmed the configuration current, and the control
    /// plane in use or last tried.
    pub fn staleness(&self) -> (std::time::Duration, Option<String>) {
        (self.health.staleness(), self.health.control_plane())
    }

    /// The routing table of the moment.
    pub fn table(&self) -> TableWatch {
        self.table.clone()
    }

    /// Completes with `true` once the first snapshot is applied (the worker is ready), with
    /// `false` when none ever will be (the config watch stopped): the readiness gRPC health
    /// follows (see [`pushwire_common::server::health::report_health`]).
    pub fn until_ready(&self) -> impl std::future::Future<Output = bool> + Send + 'static {
        let mut table = self.table.clone();
        async move { table.wait_for(Option::is_some).await.is_ok() }
    }

    /// The worker's metrics in the OpenMetrics text format (ending with `# EOF`).
    pub fn encode_metrics(&self) -> String {
        self.metrics.set_lanes(self.dispatcher.stats());
        self.metrics
            .config_staleness
            .set(self.health.staleness().as_secs_f64());
        self.metrics.encode()
    }
}

/// The axum router over `status`.
pub fn router(status: Status) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(status)
}

async fn readyz(State(status): State<Status>) -> impl IntoResponse {
    match status.ready() {
        Ok(revision) => {
            let warning = status
                .auth
                .as_ref()
                .and_then(Authenticator::readiness_warning);
            let warning = warning.map(|w| format!("{w}\n")).unwrap_or_default();
            let (staleness, control_plane) = status.staleness();
            let control_plane = control_plane.unwrap_or_else(|| "none".into());
            (
                StatusCode::OK,
                format!(
                    "ready: configuration revision {revision}\n\
                     configuration confirmed current {}s ago (control plane {control_plane})\n\
                     {warning}",
                    staleness.as_secs()
                ),
            )
        }
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// The exposition in the format the `Accept` header asks for (see
/// [`pushwire_common::server::exposition`]).
async fn metrics(State(status): State<Status>, headers: HeaderMap) -> impl IntoResponse {
    let format = Format::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    (
        [(header::CONTENT_TYPE, format.content_type())],
        format.render(status.encode_metrics()),
    )
}
