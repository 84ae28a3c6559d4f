//! What the control plane and the worker share to run their servers (the `server` feature):
//!
//! - [`access`]: the token and TLS flags both servers take;
//! - [`stack`]: the one gRPC server stack (call spans, metrics, authentication, TLS, health,
//!   reflection, `TCP_NODELAY`);
//! - [`health`]: gRPC health in step with readiness;
//! - [`shutdown`]: listeners, signals, the body of a server binary and the
//!   interrupt-after-grace task;
//! - [`telemetry`]: logs and traces; [`grpc_metrics`]: the gRPC call metrics;
//! - [`exposition`]: `/metrics` as OpenMetrics or the classic text format, as asked.

pub mod access;
pub mod exposition;
pub mod grpc_metrics;
pub mod health;
pub mod shutdown;
pub mod stack;
pub mod telemetry;

pub use shutdown::Listeners;
