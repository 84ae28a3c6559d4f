//! Pushwire worker: watches the configuration, accepts participation streams, routes each
//! participation by push scope and delivers it as signed webhooks.
//!
//! - [`config`]: flags; [`run`]: the standalone worker; [`Worker`]: its parts, also embedded
//!   by `control-plane --with-worker`;
//! - [`config_watch`] keeps a [`router::RoutingTable`] in step with the control plane;
//! - [`ingest`]: the gRPC `IngestService` (parse, route, acknowledge);
//! - [`deliver`]: per-integration queues, breakers and retries (requests are built, signed and
//!   sent by `pushwire_common::webhook`);
//! - [`disable`]: turns `410 Gone` answers into control-plane updates;
//! - [`in_process`]: the in-memory channel of the worker embedded by `--with-worker`;
//! - [`http`]: health, readiness and metrics; [`trace`]: W3C `traceparent`.

pub mod config;
pub mod config_watch;
pub mod deliver;
pub mod disable;
pub mod http;
pub mod in_process;
pub mod ingest;
pub mod metrics;
pub mod router;
pub mod trace;

use std::sync::Arc;
use std::time::Duration;

use pushwire_common::auth::Bearer;
use pushwire_common::domain::{Integration, IntegrationName};
use pushwire_common::pb::v1 as pb;
use pushwire_common::webhook::{DeliveryConfigError, WebhookArgs};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub use config::Config;
use config::{AccessError, DeliveryArgs, IngestArgs};
use deliver::dispatch::{Dispatcher, IntegrationSource};
use ingest::{Ingest, IngestOptions};
use metrics::Metrics;
pub use pushwire_common::shutdown::Listeners;
use router::RoutingTable;

/// A channel to the control plane whose calls carry the worker's token.
pub type ControlPlaneChannel = InterceptedService<Channel, Bearer>;

/// The routing table of the moment; `None` until the first snapshot.
pub type TableWatch = watch::Receiver<Option<Arc<RoutingTable>>>;

/// Why the worker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The delivery flags are unusable.
    #[error("invalid delivery settings")]
    Delivery(#[source] DeliveryConfigError),
    /// The `--control-plane` address is not a URI.
    #[error("--control-plane: {0}")]
    ControlPlane(String),
    /// Tokens or TLS settings are unusable.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// A listener failed.
    #[error("server failed")]
    Serve(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What readiness and metrics read; cheap to clone.
#[derive(Clone, Debug)]
pub struct Status {
    table: TableWatch,
    metrics: Arc<Metrics>,
    dispatcher: Dispatcher,
}

impl Status {
    /// The configuration revision in use, or why the worker is not ready.
    pub fn ready(&self) -> Result<i64, String> {
        self.table
            .borrow()
            .as_ref()
            .map(|t| t.revision())
            .ok_or_else(|| "no configuration received from the control plane yet".to_owned())
    }

    /// The routing table of the moment.
    pub fn table(&self) -> TableWatch {
        self.table.clone()
    }

    /// The worker's metrics in the Prometheus text format.
    pub fn encode_metrics(&self) -> String {
        self.metrics.set_lanes(self.dispatcher.stats());
        self.metrics.encode()
    }
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
    /// Starts the background parts, talking to the control plane through `control_plane`
    /// (made with `connect_lazy`, so it reconnects by itself; with a `worker` token).
    ///
    /// `intake` stops the intake: streams stop reading and end with `UNAVAILABLE` once what
    /// they hold is settled. `interrupt`, cancelled some grace period later, interrupts the
    /// deliveries still waiting (they are not acknowledged) and stops the background tasks.
    pub fn start(
        control_plane: ControlPlaneChannel,
        ingest: &IngestArgs,
        webhook: &WebhookArgs,
        delivery: &DeliveryArgs,
        intake: CancellationToken,
        interrupt: CancellationToken,
    ) -> Result<Self, DeliveryConfigError> {
        let client = webhook.client()?;
        let metrics = Arc::new(Metrics::default());
        let (table_tx, table) = watch::channel(None);
        let (disable_tx, disable_rx) = mpsc::channel(disable::QUEUE);
        let dispatcher = Dispatcher::new(
            client,
            delivery.dispatch_options(),
            Arc::new(TableSource(table.clone())),
            disable_tx,
            interrupt.clone(),
        )
        .with_metrics(metrics.clone());
        let mut tasks = JoinSet::new();
        tasks.spawn(config_watch::run(
            control_plane.clone(),
            table_tx,
            interrupt.clone(),
        ));
        tasks.spawn(disable::run(control_plane, disable_rx, interrupt.clone()));
        tasks.spawn(observe_tables(table.clone(), metrics.clone(), interrupt));
        let ingest = Ingest::new(
            table.clone(),
            dispatcher.clone(),
            IngestOptions {
                window: ingest.window as usize,
                max_participation_bytes: ingest.max_participation_bytes,
            },
            metrics.clone(),
            intake,
        );
        Ok(Self {
            ingest,
            status: Status {
                table,
                metrics,
                dispatcher,
            },
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

/// Records each new table's revision and how long its changes took to arrive.
async fn observe_tables(mut table: TableWatch, metrics: Arc<Metrics>, stop: CancellationToken) {
    loop {
        tokio::select! {
            changed = table.changed() => if changed.is_err() { return },
            () = stop.cancelled() => return,
        }
        let Some(t) = table.borrow_and_update().clone() else {
            continue;
        };
        metrics.config_revision.set(t.revision());
        if let Some(lag) = t
            .changed_at()
            .and_then(|at| std::time::SystemTime::now().duration_since(at).ok())
        {
            metrics.config_propagation_lag.observe(lag.as_secs_f64());
        }
    }
}

/// Keeps gRPC health in step with readiness: SERVING once the first snapshot is applied,
/// NOT_SERVING from `shutdown` on.
pub async fn report_health(
    health: tonic_health::server::HealthReporter,
    services: &[&str],
    mut table: TableWatch,
    shutdown: CancellationToken,
) {
    use tonic_health::ServingStatus;
    for s in services {
        health
            .set_service_status(*s, ServingStatus::NotServing)
            .await;
    }
    let ready = tokio::select! {
        r = table.wait_for(Option::is_some) => r.is_ok(),
        () = shutdown.cancelled() => false,
    };
    if ready {
        for s in services {
            health.set_service_status(*s, ServingStatus::Serving).await;
        }
    }
    shutdown.cancelled().await;
    for s in services {
        health
            .set_service_status(*s, ServingStatus::NotServing)
            .await;
    }
}

/// Runs a standalone worker until `shutdown`; then stops reading streams, lets deliveries in
/// flight finish within `config.shutdown_grace`, and interrupts the rest.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let channel = InterceptedService::new(
        config
            .control_plane_client
            .endpoint(&config.control_plane)?
            .connect_lazy(),
        config.control_plane_client.bearer()?,
    );
    let auth = config.access.authenticator(|b| b)?;
    let tls = config.access.server_tls()?;
    tokio::spawn(
        auth.clone()
            .watch(pushwire_common::auth::RELOAD_INTERVAL, shutdown.clone()),
    );
    let interrupt = CancellationToken::new();
    let worker = Worker::start(
        channel,
        &config.ingest,
        &config.webhook,
        &config.delivery,
        shutdown.clone(),
        interrupt.clone(),
    )
    .map_err(RunError::Delivery)?;

    let (health, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(report_health(
        health,
        &["", "pushwire.v1.IngestService"],
        worker.status.table.clone(),
        shutdown.clone(),
    ));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pushwire_common::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| RunError::Serve(e.into()))?;
    tracing::info!(
        grpc = ?listeners.grpc.local_addr().ok(),
        http = ?listeners.http.local_addr().ok(),
        control_plane = %config.control_plane,
        tls = tls.is_some(),
        "worker listening"
    );
    let grpc_shutdown = shutdown.clone();
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls).map_err(|e| {
            RunError::Access(AccessError::Tls(format!("--tls-cert/--tls-key: {e}")))
        })?;
    }
    let grpc = server
        .trace_fn(pushwire_common::telemetry::grpc_server_span)
        .layer(worker.status.metrics.grpc.clone())
        .layer(auth.layer())
        .add_service(health_service)
        .add_service(reflection)
        .add_service(worker.ingest_service())
        .serve_with_incoming_shutdown(
            pushwire_common::shutdown::nodelay_incoming(listeners.grpc),
            async move {
                grpc_shutdown.cancelled().await;
            },
        );
    let http_shutdown = shutdown.clone();
    let http = axum::serve(listeners.http, http::router(worker.status()))
        .with_graceful_shutdown(async move { http_shutdown.cancelled().await });

    // Deliveries still running `shutdown_grace` after the signal are interrupted.
    let grace = config.shutdown_grace;
    let interrupter = {
        let (shutdown, interrupt) = (shutdown.clone(), interrupt.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
            interrupt.cancel();
        })
    };
    let (g, h) = tokio::join!(grpc, http);
    interrupt.cancel();
    interrupter.abort();
    // Bounded: every background task ends on `interrupt`.
    let _ = tokio::time::timeout(Duration::from_secs(5), worker.stopped()).await;
    tracing::info!("worker stopped");
    g.map_err(|e| RunError::Serve(e.into()))?;
    h.map_err(|e| RunError::Serve(e.into()))
}
