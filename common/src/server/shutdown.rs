//! Process lifecycle: the listeners, a future that completes on SIGTERM or SIGINT, the body
//! of a server binary, and the task that interrupts what is still running once the shutdown
//! grace period is over. Binaries turn the signal into a `CancellationToken` passed down to
//! every long-running loop; libraries never install signal handlers themselves.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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

/// The body of a server binary: telemetry for `service` (see [`super::telemetry`]), then
/// `serve` with a token cancelled on SIGTERM/SIGINT, then the last spans flushed.
pub async fn serve_until_signal<F, Fut>(
    service: &'static str,
    log_format: super::telemetry::LogFormat,
    serve: F,
) -> anyhow::Result<()>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let telemetry = super::telemetry::Settings::from_env(service, log_format)
        .and_then(super::telemetry::init)
        .map_err(|e| anyhow::anyhow!("telemetry: {e}"))?;
    let shutdown = CancellationToken::new();
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

/// Cancels `interrupt` `grace` after `shutdown` is cancelled, so that work still running then
/// (deliveries in flight) is interrupted rather than waited for. The task ends then, or as soon
/// as `interrupt` is cancelled by someone else; abort it when the server stops earlier.
pub fn interrupt_after_grace(
    shutdown: &CancellationToken,
    grace: Duration,
    interrupt: &CancellationToken,
) -> JoinHandle<()> {
    let (shutdown, interrupt) = (shutdown.clone(), interrupt.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
                interrupt.cancel();
            }
            () = interrupt.cancelled() => {}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITHIN: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn interrupts_once_shutdown_and_the_grace_period_are_over() {
        let (shutdown, interrupt) = (CancellationToken::new(), CancellationToken::new());
        let task = interrupt_after_grace(&shutdown, Duration::ZERO, &interrupt);
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(!interrupt.is_cancelled(), "no shutdown yet");
        shutdown.cancel();
        tokio::time::timeout(WITHIN, interrupt.cancelled())
            .await
            .expect("interrupted");
        tokio::time::timeout(WITHIN, task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn waits_for_the_grace_period_and_ends_when_interrupted_by_someone_else() {
        let (shutdown, interrupt) = (CancellationToken::new(), CancellationToken::new());
        let task = interrupt_after_grace(&shutdown, Duration::from_secs(3600), &interrupt);
        shutdown.cancel();
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(!interrupt.is_cancelled(), "within the grace period");
        interrupt.cancel();
        tokio::time::timeout(WITHIN, task)
            .await
            .expect("the task ended")
            .unwrap();
    }
}
