//! Pushwire worker: watches the configuration, accepts participation streams, routes each
//! participation by push scope and delivers it as signed webhooks.
//!
//! - [`config`]: flags; [`run`]: the standalone worker; [`Worker`]: its parts, also embedded
//!   by `control-plane --with-worker`;
//! - [`config_watch`] decodes the control plane's configuration stream and keeps a
//!   [`router::RoutingTable`] in step with it, over the [`control_plane`] channel;
//! - [`router`] (pure): the routing table, and the plan of one participation's deliveries;
//! - [`ingest`]: the gRPC `IngestService` (parse, plan, deliver, acknowledge), within the
//!   worker-wide memory [`budget`];
//! - [`deliver`]: per-integration queues and breakers, the first attempt, the hand-off to the
//!   delivery store and the retries claimed from it (requests are built, signed and sent by
//!   `pushwire_common::webhook`);
//! - [`disable`]: turns `410 Gone` answers into control-plane updates;
//! - [`in_process`]: the in-memory channel of the worker embedded by `--with-worker`;
//! - [`http`]: health, readiness and metrics ([`metrics`]).

pub mod budget;
pub mod config;
pub mod config_watch;
pub mod control_plane;
pub mod deliver;
pub mod disable;
pub mod http;
pub mod in_process;
pub mod ingest;
pub mod metrics;
pub mod router;

use std::sync::Arc;
use std::time::Duration;

use pushwire_common::delivery_store::{self, InvalidStoreUrl, StoreError, StoreUrl};
use pushwire_common::domain::{Integration, IntegrationName};
use pushwire_common::pb::v1 as pb;
use pushwire_common::webhook::{DeliveryConfigError, WebhookArgs};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use budget::MemoryBudget;
pub use config::Config;
use config::{DeliveryArgs, IngestArgs};
pub use config_watch::TableWatch;
pub use control_plane::{ControlPlaneChannel, ControlPlanes};
use deliver::dispatch::{Dispatcher, IntegrationSource};
use deliver::retries::RetryBudget;
use deliver::store::{Handoff, OutcomeLog, StoreHandle};
pub use http::Status;
use ingest::{Ingest, IngestOptions};
use metrics::Metrics;
pub use pushwire_common::server::Listeners;
use pushwire_common::server::access::AccessError;
use pushwire_common::server::health::report_health;
use pushwire_common::server::shutdown::interrupt_after_grace;
use pushwire_common::server::stack::{self, ServerStack, StackError};

/// Why the worker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The delivery flags are unusable.
    #[error("invalid delivery settings")]
    Delivery(#[source] DeliveryConfigError),
    /// A standalone worker was started without a delivery store.
    #[error(
        "no delivery store: set --delivery-store (or PUSHWIRE_DELIVERY_STORE) to postgres://USER:PASSWORD@HOST:PORT/DATABASE or sqlite://PATH; deliveries whose first attempt fails are handed off and retried from there"
    )]
    NoDeliveryStore,
    /// `--delivery-store` is not a delivery store URL.
    #[error("--delivery-store: {0}")]
    DeliveryStoreUrl(#[source] InvalidStoreUrl),
    /// The delivery store could not be opened or its schema brought up to date.
    #[error("--delivery-store {url}: cannot open the delivery store: {source}")]
    DeliveryStore {
        /// The store, redacted.
        url: StoreUrl,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// Tokens or TLS settings are unusable.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// The config watch's thread could not be started.
    #[error("cannot start the config watch's thread: {0}")]
    ConfigWatch(#[source] std::io::Error),
    /// A listener failed.
    #[error("server failed")]
    Serve(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A started worker: the config watch and the 410 consumer run in the background; the
/// ingest service is to be added to a gRPC server.
#[derive(Debug)]
pub struct Worker {
    ingest: Ingest,
    status: Status,
    tasks: JoinSet<()>,
}

/// Reads integrations from the newest routing table.
struct TableSource(TableWatch);

impl IntegrationSource for TableSource {
    fn current(&self, name: &IntegrationName) -> Option<Arc<Integration>> {
        self.0.borrow().as_ref()?.integration(name)
    }
}

impl Worker {
    /// Starts the background parts, talking to the control planes of `control_plane` (their
    /// channels made with `connect_lazy`, so they reconnect by themselves; with a `worker`
    /// token), one at a time, failing over between them; logs a warning when the
    /// configuration was not confirmed current for `watch.stale_after`.
    ///
    /// `intake` stops the intake: streams stop reading and end with `UNAVAILABLE` once what
    /// they hold is settled. `interrupt`, cancelled some grace period later, interrupts the
    /// deliveries still waiting (they are not acknowledged) and stops the background tasks.
    ///
    /// Opens the delivery store (`--delivery-store`, required) and brings its schema up to
    /// date first; a store that cannot be opened is an error (the process exits and its
    /// supervisor starts it again).
    pub async fn start(
        control_plane: ControlPlanes,
        watch: config_watch::WatchOptions,
        ingest: &IngestArgs,
        webhook: &WebhookArgs,
        delivery: &DeliveryArgs,
        intake: CancellationToken,
        interrupt: CancellationToken,
    ) -> Result<Self, RunError> {
        let client = webhook.client().map_err(RunError::Delivery)?;
        let url = match &delivery.delivery_store {
            None => return Err(RunError::NoDeliveryStore),
            Some(arg) => arg.0.clone().map_err(RunError::DeliveryStoreUrl)?,
        };
        let store = delivery_store::open(&url, &delivery_store::OpenOptions::default())
            .await
            .map_err(|source| RunError::DeliveryStore {
                url: url.clone(),
                source,
            })?;
        tracing::info!(delivery_store = %url, "delivery store open");
        let metrics = Arc::new(Metrics::default());
        let store = StoreHandle::new(store, metrics.clone());
        let (table_tx, table) = watch::channel(None);
        let (disable_tx, disable_rx) = mpsc::channel(disable::QUEUE);
        let (handoff, writer) = Handoff::new(store.clone(), interrupt.clone());
        let mut dispatcher = Dispatcher::new(
            client,
            delivery.dispatch_options(),
            Arc::new(TableSource(table.clone())),
            disable_tx,
            handoff,
            interrupt.clone(),
        )
        .with_metrics(metrics.clone());
        let mut tasks = JoinSet::new();
        tasks.spawn(writer);
        if delivery.delivery_log {
            let (log, log_writer) = OutcomeLog::new(store.clone(), interrupt.clone());
            dispatcher = dispatcher.with_outcome_log(log);
            tasks.spawn(log_writer);
        }
        tasks.spawn(store.clone().count_queued(interrupt.clone()));
        let max_participation_bytes = ingest.max_participation_bytes;
        let ingest = Ingest::new(
            table.clone(),
            dispatcher.clone(),
            IngestOptions {
                window: ingest.window as usize,
                max_participation_bytes,
                memory_budget: ingest.memory_budget.bytes(),
            },
            metrics.clone(),
            intake.clone(),
        );
        // Retries start once the first configuration snapshot is applied: before it every
        // integration would look deleted and its claimed deliveries would end SKIPPED.
        let retries = deliver::retries::run(
            dispatcher.clone(),
            store.clone(),
            metrics.clone(),
            delivery.retry_options(),
            Some(RetryBudget {
                budget: ingest.budget(),
                largest: MemoryBudget::share(max_participation_bytes),
            }),
            // No new claims once the intake stops; attempts in flight end at `interrupt`.
            intake.clone(),
        );
        let (mut first_table, retries_stop) = (table.clone(), intake.clone());
        tasks.spawn(async move {
            let ready = tokio::select! {
                ready = first_table.wait_for(Option::is_some) => ready.is_ok(),
                () = retries_stop.cancelled() => false,
            };
            if ready {
                retries.await;
            }
        });
        let health = Arc::new(
            config_watch::WatchHealth::new(metrics.config_snapshots.clone()).with_table_metrics(
                metrics.config_revision.clone(),
                metrics.config_updates.clone(),
                metrics.config_propagation_lag.clone(),
            ),
        );
        tasks.spawn(
            config_watch::run_on_own_thread(
                control_plane.clone(),
                table_tx,
                health.clone(),
                interrupt.clone(),
                watch.clone(),
            )
            .map_err(RunError::ConfigWatch)?,
        );
        tasks.spawn(config_watch::log_staleness(
            health.clone(),
            watch.stale_after,
            interrupt.clone(),
        ));
        tasks.spawn(disable::run(control_plane, disable_rx, interrupt));
        Ok(Self {
            ingest,
            status: Status::new(table, metrics, health, dispatcher, store),
            tasks,
        })
    }

    /// The `IngestService` to serve.
    pub fn ingest_service(&self) -> pb::ingest_service_server::IngestServiceServer<Ingest> {
        self.ingest.clone().into_service()
    }

    /// Readiness and metrics.
    pub fn status(&self) -> Status {
        self.status.clone()
    }

    /// Waits for the background tasks, which end once `interrupt` is cancelled.
    pub async fn stopped(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Runs a standalone worker until `shutdown`; then stops reading streams, lets deliveries in
/// flight finish within `config.shutdown_grace`, and interrupts the rest.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let control_planes = config
        .control_plane_client
        .control_planes(&config.control_plane)?;
    let auth = config.access.authenticator(|b| b)?;
    let tls = config.access.server_tls()?;
    tokio::spawn(
        auth.clone()
            .watch(pushwire_common::auth::RELOAD_INTERVAL, shutdown.clone()),
    );
    let interrupt = CancellationToken::new();
    let worker = Worker::start(
        control_planes,
        config_watch::WatchOptions {
            stale_after: config.config_stale_after,
            max_message_size: config.watch_max_message_size,
            ..Default::default()
        },
        &config.ingest,
        &config.webhook,
        &config.delivery,
        shutdown.clone(),
        interrupt.clone(),
    )
    .await?;

    let tls_on = tls.is_some();
    let (router, health) = ServerStack::new(&auth, worker.status.metrics.grpc.clone())
        .tls(tls)
        .public(&["pushwire.v1.IngestService"])
        .map_err(|e| match e {
            StackError::Access(e) => RunError::Access(e),
            StackError::Reflection(e) => RunError::Serve(e.into()),
        })?;
    tokio::spawn(report_health(
        health,
        &["", "pushwire.v1.IngestService"],
        worker.status.until_ready(),
        shutdown.clone(),
    ));
    tracing::info!(
        grpc = ?listeners.grpc.local_addr().ok(),
        http = ?listeners.http.local_addr().ok(),
        control_plane = %config.control_plane.join(","),
        tls = tls_on,
        "worker listening"
    );
    let grpc = stack::serve(
        router.add_service(worker.ingest_service()),
        listeners.grpc,
        shutdown.clone(),
    );
    let http_shutdown = shutdown.clone();
    let status = worker.status().with_token_file(auth.clone());
    let http = axum::serve(listeners.http, http::router(status))
        .with_graceful_shutdown(async move { http_shutdown.cancelled().await });

    // Deliveries still running `shutdown_grace` after the signal are interrupted.
    let interrupter = interrupt_after_grace(&shutdown, config.shutdown_grace, &interrupt);
    let (g, h) = tokio::join!(grpc, http);
    interrupt.cancel();
    interrupter.abort();
    // Bounded: every background task ends on `interrupt`.
    let _ = tokio::time::timeout(Duration::from_secs(5), worker.stopped()).await;
    tracing::info!("worker stopped");
    g.map_err(|e| RunError::Serve(e.into()))?;
    h.map_err(|e| RunError::Serve(e.into()))
}
