//! The one gRPC server stack of every Pushwire server: a span per call, the gRPC call metrics,
//! authentication of every call (tokens, see [`crate::auth`]), TLS when configured, and on a
//! public server gRPC health and server reflection; accepted TCP connections get
//! `TCP_NODELAY`.

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Router;
use tonic::transport::{Server, ServerTlsConfig};
use tonic_health::server::HealthReporter;
use tower_layer::{Identity, Stack};

use super::access::AccessError;
use super::grpc_metrics::GrpcMetrics;
use super::telemetry::grpc_server_span;
use crate::auth::{AuthLayer, Authenticator};

/// The layers in front of every service, outermost first: gRPC metrics, then authentication.
pub type Layers = Stack<AuthLayer, Stack<GrpcMetrics, Identity>>;

/// Why a server stack could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// The TLS settings are unusable.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// The reflection service could not read the descriptors.
    #[error("server reflection")]
    Reflection(#[source] tonic_reflection::server::Error),
}

/// Builds a gRPC server with the stack every Pushwire server shares.
#[derive(Debug)]
pub struct ServerStack {
    auth: Authenticator,
    metrics: GrpcMetrics,
    tls: Option<ServerTlsConfig>,
}

impl ServerStack {
    /// Calls authenticated by `auth` and counted in `metrics`; no TLS.
    pub fn new(auth: &Authenticator, metrics: GrpcMetrics) -> Self {
        auth.report_to(metrics.token_file_applied());
        Self {
            auth: auth.clone(),
            metrics,
            tls: None,
        }
    }

    /// Serves TLS only, with these settings (from `--tls-cert`, `--tls-key`), when given.
    pub fn tls(mut self, tls: Option<ServerTlsConfig>) -> Self {
        self.tls = tls;
        self
    }

    /// The server, its services to be added (no health or reflection: for a server no one but
    /// the process itself calls).
    pub fn server(self) -> Result<Server<Layers>, AccessError> {
        let mut server = Server::builder();
        if let Some(tls) = self.tls {
            server = server
                .tls_config(tls)
                .map_err(|e| AccessError::Tls(format!("--tls-cert/--tls-key: {e}")))?;
        }
        Ok(server
            .trace_fn(grpc_server_span)
            .layer(self.metrics)
            .layer(self.auth.layer()))
    }

    /// A public server: [`Self::server`] with gRPC health and server reflection (both open
    /// without a token), and the reporter that sets the health of each service (see
    /// [`super::health::report_health`]).
    ///
    /// Reflection answers both `grpc.reflection.v1` and the older `v1alpha` (grpcurl 1.8 and
    /// other clients still ask for it only), and lists exactly `services` (the full names of
    /// the application services the caller adds to the router) plus health and reflection:
    /// a client must not see, and try, services this server does not serve. The descriptors
    /// of every Pushwire file stay resolvable (a service's messages live there).
    pub fn public(self, services: &[&str]) -> Result<(Router<Layers>, HealthReporter), StackError> {
        let builder = || {
            let builder = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
            services
                .iter()
                .copied()
                .chain(ALWAYS_SERVED)
                .fold(builder, |b, name| b.with_service_name(name))
        };
        let v1 = builder().build_v1().map_err(StackError::Reflection)?;
        let v1alpha = builder().build_v1alpha().map_err(StackError::Reflection)?;
        let (health, health_service) = tonic_health::server::health_reporter();
        let router = self
            .server()?
            .add_service(health_service)
            .add_service(v1)
            .add_service(v1alpha);
        Ok((router, health))
    }
}

/// The services every public server serves besides its own (see [`ServerStack::public`]).
pub const ALWAYS_SERVED: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Serves `router` on the connections accepted on `listener` (with `TCP_NODELAY`) until
/// `shutdown`, then lets the calls in progress finish.
pub async fn serve(
    router: Router<Layers>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    router
        .serve_with_incoming_shutdown(nodelay_incoming(listener), async move {
            shutdown.cancelled().await;
        })
        .await
}

/// The connections accepted on `listener`, with Nagle's algorithm off: gRPC writes small
/// frames and waits for answers, and Nagle with delayed ACKs adds ~40 ms to such exchanges.
pub fn nodelay_incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<TcpStream>> {
    use tokio_stream::StreamExt as _;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}
