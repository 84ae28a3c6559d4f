//! What the control plane and the worker share.
//!
//! - [`auth`]: tokens, roles and the layer that authenticates every gRPC call;
//! - [`pb`]: generated protobuf/gRPC bindings (the only place prost types are defined);
//! - [`domain`]: the domain types (no prost or storage types), push-scope matching and the
//!   conversions between the two;
//! - [`participation`]: parsing and validation of participation documents;
//! - [`payload`]: the body transformations an integration can ask for (the `variables`
//!   object);
//! - [`delivery_store`]: where deliveries live once handed off (PostgreSQL, embedded SQLite),
//!   their attempts and bodies (`server` feature);
//! - [`publisher`]: the client that publishes participations to workers, holding each until
//!   acknowledged (the `publish` command is built on it).

pub mod auth;
pub mod backoff;
#[cfg(feature = "server")]
pub mod delivery_store;
pub mod domain;
pub mod grpc_metrics;
pub mod participation;
pub mod payload;
pub mod pb;
pub mod publisher;
pub mod shutdown;
pub mod signing;
pub mod telemetry;
