//! gRPC health (`grpc.health.v1`) in step with readiness, for every server.

use std::future::Future;

use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Keeps the health of `services` in step with readiness: NOT_SERVING until `ready` completes
/// with `true` (the configuration is loaded, the first snapshot applied...), SERVING then,
/// NOT_SERVING again from `shutdown` on. `ready` completing with `false` (its source is gone)
/// leaves them NOT_SERVING. Ends once `shutdown` is cancelled.
pub async fn report_health(
    health: HealthReporter,
    services: &[&str],
    ready: impl Future<Output = bool>,
    shutdown: CancellationToken,
) {
    set_all(&health, services, ServingStatus::NotServing).await;
    let ready = tokio::select! {
        ready = ready => ready,
        () = shutdown.cancelled() => false,
    };
    if ready {
        set_all(&health, services, ServingStatus::Serving).await;
    }
    shutdown.cancelled().await;
    set_all(&health, services, ServingStatus::NotServing).await;
}

async fn set_all(health: &HealthReporter, services: &[&str], status: ServingStatus) {
    for s in services {
        health.set_service_status(*s, status).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::pb::health_check_response::ServingStatus as Wire;
    use tonic_health::pb::health_server::Health as _;
    use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

    async fn status_of(health: &tonic_health::server::HealthService, service: &str) -> i32 {
        let request = tonic::Request::new(HealthCheckRequest {
            service: service.to_owned(),
        });
        // Unknown until the reporter first sets it: -1.
        match health.check(request).await {
            Ok(response) => {
                let response: HealthCheckResponse = response.into_inner();
                response.status
            }
            Err(_) => -1,
        }
    }

    async fn wait_for(health: &tonic_health::server::HealthService, want: Wire) {
        let wait = async {
            while status_of(health, "pushwire.v1.IngestService").await != want as i32 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), wait)
            .await
            .unwrap_or_else(|_| panic!("never {want:?}"));
    }

    #[tokio::test]
    async fn follows_readiness_then_shutdown() {
        let reporter = HealthReporter::new();
        let health = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(report_health(
            reporter,
            &["", "pushwire.v1.IngestService"],
            async move { ready_rx.await.is_ok() },
            shutdown.clone(),
        ));
        wait_for(&health, Wire::NotServing).await;
        assert_eq!(status_of(&health, "").await, Wire::NotServing as i32);
        ready_tx.send(()).unwrap();
        wait_for(&health, Wire::Serving).await;
        assert_eq!(status_of(&health, "").await, Wire::Serving as i32);
        shutdown.cancel();
        task.await.unwrap();
        assert_eq!(status_of(&health, "").await, Wire::NotServing as i32);
    }

    #[tokio::test]
    async fn a_source_gone_before_ready_leaves_not_serving() {
        let reporter = HealthReporter::new();
        let health = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(report_health(
            reporter,
            &["pushwire.v1.IngestService"],
            std::future::ready(false),
            shutdown.clone(),
        ));
        wait_for(&health, Wire::NotServing).await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            status_of(&health, "pushwire.v1.IngestService").await,
            Wire::NotServing as i32
        );
        shutdown.cancel();
        task.await.unwrap();
    }
}
