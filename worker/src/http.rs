//! The operations endpoint: `/healthz` (the process is up), `/readyz` (a configuration
//! snapshot is applied; says why not) and `/metrics` (Prometheus text format).

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::Status;

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
        Ok(revision) => (
            StatusCode::OK,
            format!("ready: configuration revision {revision}\n"),
        ),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn metrics(State(status): State<Status>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        status.encode_metrics(),
    )
}
