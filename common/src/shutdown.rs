//! Process lifecycle: the listeners, a future that completes on SIGTERM or SIGINT, and the body
//! of a server binary. Binaries turn it into a
//! `CancellationToken` passed down to every long-running loop; libraries never install signal
//! handlers themselves.

/// Completes when the process receives SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The body of a server binary: telemetry for `service` (see [`crate::telemetry`]), then
/// `serve` with a token cancelled on SIGTERM/SIGINT, then the last spans flushed.
pub async fn serve_until_signal<F, Fut>(
    service: &'static str,
    log_format: crate::telemetry::LogFormat,
    serve: F,
) -> anyhow::Result<()>
where
    F: FnOnce(tokio_util::sync::CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let telemetry = crate::telemetry::Settings::from_env(service, log_format)
        .and_then(crate::telemetry::init)
        .map_err(|e| anyhow::anyhow!("telemetry: {e}"))?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        signal().await;
        tracing::info!("shutdown requested");
        on_signal.cancel();
    });
    let result = serve(shutdown).await;
    telemetry.shutdown().await;
    result
}

/// The sockets a server listens on (gRPC, and HTTP for health and metrics); bound before the
/// server starts so tests can use port 0 and learn the ports.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC.
    pub grpc: tokio::net::TcpListener,
    /// HTTP operations endpoint.
    pub http: tokio::net::TcpListener,
}

impl Listeners {
    /// Binds both addresses.
    pub async fn bind(
        grpc: std::net::SocketAddr,
        http: std::net::SocketAddr,
    ) -> std::io::Result<Self> {
        Ok(Self {
            grpc: tokio::net::TcpListener::bind(grpc).await?,
            http: tokio::net::TcpListener::bind(http).await?,
        })
    }
}

/// The connections accepted on `listener`, with Nagle's algorithm off: gRPC writes small
/// frames and waits for answers, and Nagle with delayed ACKs adds ~40 ms to such exchanges.
pub fn nodelay_incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        let conn = conn?;
        conn.set_nodelay(true)?;
        Ok(conn)
    })
}
