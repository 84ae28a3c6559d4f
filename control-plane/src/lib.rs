//! Pushwire control plane: owns the configuration (integrations and push scopes), validates
//! and stores it (etcd or the embedded store), and streams it to workers.
//!
//! - [`config`]: flags; [`run`]: the whole server, started by `main` or by tests on port 0;
//! - [`access`]: the tokens accepted, and the in-process server of `--with-worker`;
//! - [`crypto`]: the keys that encrypt secrets at rest ([`reencrypt`] rotates them);
//! - [`api`]: gRPC handlers (the only place errors become `Status`);
//! - [`service`]: rules and transactions; the config feed behind `WatchConfig`;
//! - [`store`]: the storage contract and its etcd and embedded implementations;
//! - [`http`]: health, readiness and metrics.

pub mod access;
pub mod api;
pub mod config;
pub mod crypto;
pub mod http;
mod parallel;
pub mod service;
pub mod store;

use std::sync::Arc;

use pushwire_common::pb::v1 as pb;
use pushwire_worker::Worker;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use pushwire_common::server::Listeners;
use pushwire_common::server::access::AccessError;
use pushwire_common::server::grpc_metrics::GrpcMetrics;
use pushwire_common::server::health::report_health;
use pushwire_common::server::shutdown::interrupt_after_grace;
use pushwire_common::server::stack::{self, Layers, ServerStack, StackError};
use service::{Catalog, CatalogOptions, ConfigFeed};
use store::{EmbeddedStore, EtcdStore, Store, StoreError};

/// File of the embedded store inside `--data-dir`.
pub const EMBEDDED_STORE_FILE: &str = "pushwire.redb";

/// File of the SQLite delivery store `--with-worker` uses inside `--data-dir` when no
/// `--delivery-store` is given.
pub const DELIVERY_STORE_FILE: &str = "deliveries.sqlite3";

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The store could not be opened or reached.
    #[error("cannot open the configuration store")]
    Store(#[source] StoreError),
    /// The encryption keys are missing or unusable, or do not decrypt the stored secrets.
    #[error("refusing to start without usable encryption keys")]
    Encryption(#[source] store::encryption::EncryptionError),
    /// The token file or the TLS files are unusable.
    #[error("invalid tokens or TLS settings")]
    Access(#[source] AccessError),
    /// The delivery flags are unusable (bad `--allow-cidr`, unreadable `--extra-ca-file`).
    #[error("invalid delivery settings")]
    Delivery(#[source] pushwire_common::webhook::DeliveryConfigError),
    /// `--delivery-store` is not a delivery store URL (shown with its password hidden).
    #[error("--delivery-store")]
    DeliveryStoreUrl(#[source] pushwire_common::delivery_store::InvalidStoreUrl),
    /// The worker of `--with-worker` could not start (its delivery store, say).
    #[error("cannot start the worker of --with-worker")]
    Worker(#[source] Box<pushwire_worker::RunError>),
    /// A listener failed.
    #[error("server failed")]
    Serve(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The delivery store the configuration names: `--delivery-store`, else with `--with-worker`
/// the SQLite file in the data directory, else none.
pub fn delivery_store_url(
    config: &Config,
) -> Result<Option<pushwire_common::delivery_store::StoreUrl>, RunError> {
    match &config.delivery.delivery_store {
        Some(pushwire_worker::config::DeliveryStoreArg(Ok(url))) => Ok(Some(url.clone())),
        Some(pushwire_worker::config::DeliveryStoreArg(Err(e))) => {
            Err(RunError::DeliveryStoreUrl(e.clone()))
        }
        None if config.with_worker => Ok(Some(pushwire_common::delivery_store::StoreUrl::sqlite(
            config.data_dir.join(DELIVERY_STORE_FILE),
        ))),
        None => Ok(None),
    }
}

/// The delivery log of the configuration: no store, or its store opened in the background
/// (tried once before the server starts, then again with a growing pause while it is
/// unreachable: the configuration API does not depend on it), then its retention loop.
async fn delivery_log(
    config: &Config,
    metrics: &service::deliveries::RetentionMetrics,
    shutdown: &CancellationToken,
) -> Result<service::deliveries::Deliveries, RunError> {
    let Some(url) = delivery_store_url(config)? else {
        tracing::info!("no delivery store: DeliveryService answers FAILED_PRECONDITION");
        return Ok(service::deliveries::Deliveries::new(None));
    };
    if config.delivery.delivery_store.is_none()
        && let Err(e) = std::fs::create_dir_all(&config.data_dir)
    {
        tracing::warn!(error = %e, dir = %config.data_dir.display(), "cannot create the data directory");
    }
    let (deliveries, cell) = service::deliveries::Deliveries::pending();
    let retention = config.deliveries.delivery_retention;
    let open = |url: pushwire_common::delivery_store::StoreUrl| async move {
        let opened = pushwire_common::delivery_store::open(&url, &Default::default()).await;
        if let Err(e) = &opened {
            tracing::warn!(store = %url, error = %e, "delivery store not open; DeliveryService answers UNAVAILABLE until it is");
        }
        opened.ok()
    };
    let first = open(url.clone()).await;
    let metrics = metrics.clone();
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        let mut pause = std::time::Duration::from_secs(1);
        let mut store = first;
        let store = loop {
            if let Some(store) = store.take() {
                break store;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(std::time::Duration::from_secs(30));
            store = open(url.clone()).await;
        };
        tracing::info!(store = %url, ?retention, "delivery store open");
        let _ = cell.set(store.clone());
        service::deliveries::retain(
            store,
            retention,
            service::deliveries::PURGE_INTERVAL,
            metrics,
            shutdown,
        )
        .await;
    });
    Ok(deliveries)
}

/// Opens the store named by the configuration: etcd when endpoints are given, else the
/// embedded store in the data directory.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StoreError> {
    if config.etcd_endpoints.is_empty() {
        let path = config.data_dir.join(EMBEDDED_STORE_FILE);
        tracing::info!(path = %path.display(), "using the embedded store");
        let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(&path))
            .await
            .map_err(StoreError::unavailable)??;
        Ok(Arc::new(store))
    } else {
        tracing::info!(endpoints = ?config.etcd_endpoints, "using etcd");
        Ok(Arc::new(EtcdStore::connect(&config.etcd_endpoints).await?))
    }
}

fn encryption_error(e: crypto::KeyError) -> RunError {
    RunError::Encryption(e.into())
}

/// `--reencrypt`: re-encrypts every stored secret under the current key of `config`, then
/// returns what it did; serves nothing.
pub async fn reencrypt(config: &Config) -> Result<store::encryption::Reencrypted, RunError> {
    let keys = Arc::new(crypto::Keyring::from_config(config).map_err(encryption_error)?);
    let store = open_store(config).await.map_err(RunError::Store)?;
    store::encryption::reencrypt(store.as_ref(), &keys)
        .await
        .map_err(RunError::Encryption)
}

/// The rules of the [`Catalog`] the flags of `config` set.
fn catalog_options(
    config: &Config,
    client: &pushwire_common::webhook::client::WebhookClient,
) -> CatalogOptions {
    CatalogOptions {
        allow_insecure_http: config.allow_insecure_http,
        secret_rotation_grace: config.secret_rotation_grace,
        ssrf_allow: client.options().allow.clone(),
        max_integrations_per_account: config.max_integrations_per_account,
        max_push_scopes_per_account: config.max_push_scopes_per_account,
    }
}

/// The [`Catalog`] of `config`, with the keys, store and rules [`run`] would use, serving
/// nothing: for bulk loads through [`Catalog::import_account`] (the `scale` benchmark), on
/// the embedded store while no control plane has its file open (one process at a time), on
/// etcd beside running control planes. Refuses keys that do not decrypt the stored secrets,
/// as `run` does (and writes the encryption check into an empty store).
pub async fn open_catalog(config: &Config) -> Result<Catalog, RunError> {
    let client = config.webhook.client().map_err(RunError::Delivery)?;
    let keys = Arc::new(crypto::Keyring::from_config(config).map_err(encryption_error)?);
    let store = open_store(config).await.map_err(RunError::Store)?;
    store::encryption::verify(store.as_ref(), &keys)
        .await
        .map_err(RunError::Encryption)?;
    Ok(Catalog::new(store, keys, catalog_options(config, &client)))
}

/// Runs the control plane until `shutdown` is cancelled, then drains within
/// `config.shutdown_grace`.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let client = config.webhook.client().map_err(RunError::Delivery)?;
    let keys = Arc::new(crypto::Keyring::from_config(&config).map_err(encryption_error)?);
    let store_metrics = store::metered::StoreMetrics::default();
    let store: Arc<dyn Store> = Arc::new(store::metered::Metered::new(
        open_store(&config).await.map_err(RunError::Store)?,
        store_metrics.clone(),
    ));
    // Refuse to start, rather than serve secrets that do not decrypt, when the keys are wrong.
    let (_, snapshot) = store::encryption::verify_read(store.as_ref(), &keys)
        .await
        .map_err(RunError::Encryption)?;
    if !config.etcd_endpoints.is_empty() && !config.etcd_compaction_interval.is_zero() {
        tokio::spawn(store::compaction::run(
            store.clone(),
            config.etcd_compaction_interval,
            store_metrics.compaction.clone(),
            shutdown.clone(),
        ));
    }
    let retention_metrics = service::deliveries::RetentionMetrics::default();
    let deliveries = delivery_log(&config, &retention_metrics, &shutdown).await?;
    let feed = ConfigFeed::new(config.watch_history);
    // Loaded from the read the key check made; the feed watches from the revision after it.
    feed.load(snapshot);
    let feed_task = tokio::spawn(
        feed.clone()
            .run(store.clone(), keys.clone(), shutdown.clone()),
    );
    let catalog = Catalog::new(store.clone(), keys, catalog_options(&config, &client))
        .with_memory(feed.clone());

    // Every call is authenticated (tokens, reloaded from --token-file); TLS with --tls-cert.
    let worker_token = config
        .with_worker
        .then(pushwire_common::auth::generate_token);
    let auth = access::authenticator(&config, worker_token.as_ref())?;
    let tls = config.access.server_tls().map_err(RunError::Access)?;
    tokio::spawn(
        auth.clone()
            .watch(pushwire_common::auth::RELOAD_INTERVAL, shutdown.clone()),
    );

    // With --with-worker, a worker runs here too, watching this very server through an
    // in-memory connection, with a token of its own.
    let interrupt = CancellationToken::new();
    let (worker, in_process) = match &worker_token {
        None => (None, None),
        Some(token) => {
            let (worker, incoming) = start_worker(&config, token, &shutdown, &interrupt).await?;
            (Some(worker), Some(incoming))
        }
    };
    let grpc_metrics = GrpcMetrics::default();
    let (grpc, in_process_task) = grpc_server(
        catalog,
        deliveries,
        client,
        api::ConfigApi::new(feed.clone(), shutdown.clone())
            .with_progress_interval(config.watch_progress_interval)
            .with_batch_window(config.watch_batch_window),
        worker.as_ref(),
        grpc_metrics.clone(),
        (&auth, tls, in_process),
        shutdown.clone(),
    )
    .await?;
    let grpc_addr = listeners.grpc.local_addr().ok();
    let http_addr = listeners.http.local_addr().ok();
    tracing::info!(grpc = ?grpc_addr, http = ?http_addr, "control plane listening");

    let grpc_task = stack::serve(grpc, listeners.grpc, shutdown.clone());
    let http_shutdown = shutdown.clone();
    let ops = http::Ops::new(
        feed,
        store,
        &grpc_metrics,
        &store_metrics,
        &retention_metrics,
        worker.as_ref().map(|w| w.status()),
    )
    .with_token_file(auth.clone());
    let http_task = axum::serve(listeners.http, ops.router())
        .with_graceful_shutdown(async move { http_shutdown.cancelled().await });

    let servers = async {
        let (g, h) = tokio::join!(grpc_task, http_task);
        g.map_err(|e| RunError::Serve(e.into()))?;
        h.map_err(|e| RunError::Serve(e.into()))
    };
    let grace = config.shutdown_grace;
    // The in-process worker's deliveries get half the grace period to finish.
    let interrupter = interrupt_after_grace(&shutdown, grace / 2, &interrupt);
    let result = tokio::select! {
        r = servers => r,
        () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "shutdown grace period over; closing remaining calls");
            Ok(())
        }
    };
    shutdown.cancel();
    interrupt.cancel();
    interrupter.abort();
    if let Some(worker) = worker {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), worker.stopped()).await;
    }
    if let Some(task) = in_process_task {
        task.abort();
        let _ = task.await;
    }
    let _ = feed_task.await;
    tracing::info!("control plane stopped");
    result
}

/// Starts the in-process worker of `--with-worker`, presenting `token` (a worker token) on
/// an in-memory channel whose connections come out of the returned stream.
async fn start_worker(
    config: &Config,
    token: &pushwire_common::domain::Secret,
    shutdown: &CancellationToken,
    interrupt: &CancellationToken,
) -> Result<(Worker, pushwire_worker::in_process::Incoming), RunError> {
    let (channel, incoming) = pushwire_worker::in_process::channel();
    let bearer = pushwire_common::auth::Bearer::new(token)
        .map_err(|e| RunError::Access(AccessError::Token("worker", e)))?;
    let mut delivery = config.delivery.clone();
    if delivery.delivery_store.is_none() {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| RunError::Serve(format!("{}: {e}", config.data_dir.display()).into()))?;
        let url = pushwire_common::delivery_store::StoreUrl::sqlite(
            config.data_dir.join(DELIVERY_STORE_FILE),
        );
        delivery.delivery_store = Some(url.into());
    }
    let worker = Worker::start(
        pushwire_worker::ControlPlanes::fixed(
            tonic::service::interceptor::InterceptedService::new(channel, bearer),
            "in-process control plane",
        ),
        pushwire_worker::config_watch::WatchOptions::default(),
        &config.ingest,
        &config.webhook,
        &delivery,
        shutdown.clone(),
        interrupt.clone(),
    )
    .await
    .map_err(|e| RunError::Worker(Box::new(e)))?;
    Ok((worker, incoming))
}

/// What secures the gRPC servers: the tokens, TLS, and the in-process worker's connections.
type Access<'a> = (
    &'a pushwire_common::auth::Authenticator,
    Option<tonic::transport::ServerTlsConfig>,
    Option<pushwire_worker::in_process::Incoming>,
);

/// The public gRPC server, and the task serving the in-process worker (`--with-worker`).
type GrpcServer = (
    tonic::transport::server::Router<Layers>,
    Option<tokio::task::JoinHandle<()>>,
);

#[allow(clippy::too_many_arguments)]
async fn grpc_server(
    catalog: Catalog,
    deliveries: service::deliveries::Deliveries,
    client: pushwire_common::webhook::client::WebhookClient,
    config_api: api::ConfigApi,
    worker: Option<&Worker>,
    grpc_metrics: GrpcMetrics,
    (auth, tls, in_process): Access<'_>,
    shutdown: CancellationToken,
) -> Result<GrpcServer, RunError> {
    let (router, health) = ServerStack::new(auth, grpc_metrics.clone())
        .tls(tls)
        .public(SERVED)
        .map_err(|e| match e {
            StackError::Access(e) => RunError::Access(e),
            StackError::Reflection(e) => RunError::Serve(e.into()),
        })?;
    let loaded = {
        let feed = config_api.feed().clone();
        // Not a watcher: the config_watchers metric counts subscribers.
        async move {
            let mut view = feed.subscribe();
            view.next(0).await.is_some()
        }
    };
    tokio::spawn(report_health(
        health.clone(),
        CONTROL_PLANE_SERVICES,
        loaded,
        shutdown.clone(),
    ));
    if let Some(worker) = worker {
        tokio::spawn(report_health(
            health,
            &["pushwire.v1.IngestService"],
            worker.status().until_ready(),
            shutdown.clone(),
        ));
    }

    let integrations = pb::integration_service_server::IntegrationServiceServer::new(
        api::IntegrationApi::new(catalog.clone(), client),
    )
    .max_decoding_message_size(api::MAX_ADMIN_REQUEST_BYTES);
    let config_service = pb::config_service_server::ConfigServiceServer::new(config_api)
        .max_decoding_message_size(api::MAX_ADMIN_REQUEST_BYTES);
    let in_process_task = in_process.map(|incoming| {
        tokio::spawn(access::serve_in_process(
            integrations.clone(),
            config_service.clone(),
            auth.clone(),
            grpc_metrics.clone(),
            incoming,
            shutdown.clone(),
        ))
    });
    let router = router
        .add_service(integrations)
        .add_service(
            pb::push_scope_service_server::PushScopeServiceServer::new(api::PushScopeApi::new(
                catalog,
            ))
            .max_decoding_message_size(api::MAX_ADMIN_REQUEST_BYTES),
        )
        .add_service(config_service)
        .add_service(
            pb::delivery_service_server::DeliveryServiceServer::new(api::DeliveryApi::new(
                deliveries,
            ))
            .max_decoding_message_size(api::MAX_ADMIN_REQUEST_BYTES),
        )
        .add_optional_service(worker.map(Worker::ingest_service))
        .add_optional_service(
            worker
                .is_none()
                .then(|| pb::ingest_service_server::IngestServiceServer::new(api::IngestApi)),
        );
    Ok((router, in_process_task))
}

/// The services whose gRPC health follows the feed: SERVING once the configuration is
/// loaded, NOT_SERVING on shutdown.
const CONTROL_PLANE_SERVICES: &[&str] = &[
    "",
    "pushwire.v1.IntegrationService",
    "pushwire.v1.PushScopeService",
    "pushwire.v1.ConfigService",
    "pushwire.v1.DeliveryService",
];

/// The application services the public server serves (the in-process worker's
/// `IngestService`, or the one that refuses every publish): what reflection lists.
const SERVED: &[&str] = &[
    "pushwire.v1.IntegrationService",
    "pushwire.v1.PushScopeService",
    "pushwire.v1.ConfigService",
    "pushwire.v1.DeliveryService",
    "pushwire.v1.IngestService",
];
